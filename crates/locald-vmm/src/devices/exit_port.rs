//! The paravirtual exit port, how a guest ends the VM with a status and
//! reports progress. Runs on the vCPU thread that does the port access.
//!
//! Protocol (I/O ports, any access width, the low byte counts):
//! - `0xf4` write N: the VM stops and `run()` returns `Exited(N)`.
//!   A read returns `0x4c` (`'L'`) so a guest can detect the port.
//! - `0xf5` write N: marker N is timestamped (1 = userspace reached,
//!   2 = command started, 3 = command finished). A read returns 0.
//!
//! Port 0xf4 is also where QEMU's `isa-debug-exit` lives, so a test guest
//! ends both VMMs the same way (QEMU exits with `(N << 1) | 1`).

use std::sync::Arc;

use super::bus::BusDevice;
use super::control::{ExitStatus, VmControl};

/// First port of the device.
pub const EXIT_PORT_BASE: u64 = 0xf4;
/// Number of ports.
pub const EXIT_PORT_LEN: u64 = 2;
/// Value read from the exit port.
pub const EXIT_PORT_MAGIC: u8 = 0x4c;

/// The exit/marker port pair.
pub struct ExitPort {
    control: Arc<VmControl>,
}

impl ExitPort {
    /// A port that reports to `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        ExitPort { control }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = EXIT_PORT_MAGIC;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.control.request_stop(ExitStatus::Exited(value)),
            1 => self.control.mark(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_and_markers() {
        let c = Arc::new(VmControl::new());
        let mut p = ExitPort::new(c.clone());
        let mut b = [0u8; 1];
        p.read(0, &mut b);
        assert_eq!(b[0], EXIT_PORT_MAGIC);
        p.write(1, &[1]);
        p.write(1, &[2]);
        assert!(!c.should_stop());
        assert_eq!(
            c.markers().iter().map(|m| m.value).collect::<Vec<_>>(),
            vec![1, 2]
        );
        p.write(0, &[42, 0, 0, 0]);
        assert_eq!(c.status(), Some(ExitStatus::Exited(42)));
        p.write(0, &[]); // empty access is ignored
    }
}
