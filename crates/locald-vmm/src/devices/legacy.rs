//! Legacy PC odds and ends: the i8042 controller's reset line (enough for
//! Linux's `reboot=k`) on ports 0x60–0x64. Runs on the accessing vCPU thread.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use super::control::{ExitStatus, VmControl};

/// First i8042 port.
pub const I8042_BASE: u64 = 0x60;
/// i8042 port span (0x60 data … 0x64 command/status).
pub const I8042_LEN: u64 = 5;

/// Turns the i8042 CPU-reset command into a VM stop.
pub struct ResetTrigger(pub Arc<VmControl>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(ExitStatus::Reset);
        Ok(())
    }
}

/// The i8042 stub on the port bus.
pub struct I8042(pub I8042Device<ResetTrigger>);

impl I8042 {
    /// A stub that reports resets to `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        I8042(I8042Device::new(ResetTrigger(control)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.0.write(offset as u8, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_vm() {
        let c = Arc::new(VmControl::new());
        let mut d = I8042::new(c.clone());
        d.write(4, &[0x00]);
        assert!(!c.should_stop());
        let mut b = [0xffu8];
        d.read(4, &mut b);
        assert_eq!(b[0] & 0x02, 0, "input buffer reads empty so Linux proceeds");
        d.write(4, &[0xfe]);
        assert_eq!(c.status(), Some(ExitStatus::Reset));
    }
}
