//! What to do with each vCPU exit, as a pure function of the exit and the
//! buses, so every case is tested without KVM. Runs on the vCPU thread.

use crate::devices::{Bus, ExitStatus};

/// A vCPU exit, stripped of KVM's types.
#[derive(Debug)]
pub enum Exit<'a> {
    /// Port read.
    IoIn(u16, &'a mut [u8]),
    /// Port write.
    IoOut(u16, &'a [u8]),
    /// MMIO read.
    MmioRead(u64, &'a mut [u8]),
    /// MMIO write.
    MmioWrite(u64, &'a [u8]),
    /// HLT reached userspace (only without an in-kernel LAPIC).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT` with its type.
    SystemEvent(u32),
    /// `KVM_EXIT_INTERNAL_ERROR` with its suberror.
    InternalError(u32),
    /// `KVM_EXIT_FAIL_ENTRY` with the hardware reason.
    FailEntry(u64),
    /// Any other exit, by name.
    Other(&'static str),
}

/// What the vCPU loop does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the guest.
    Continue,
    /// End the VM with this status.
    Stop(ExitStatus),
    /// KVM could not emulate an instruction: hand it to the instruction
    /// emulation module (the one place such exits are handled).
    EmulationFailure,
    /// Unrecoverable; the message says why.
    Fatal(String),
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
/// `KVM_INTERNAL_ERROR_EMULATION`.
pub const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// Decides what an exit means. Unclaimed port and MMIO accesses are
/// ignored (reads see all-ones), as on a real bus.
pub fn handle(exit: Exit<'_>, pio: &Bus, mmio: &Bus) -> Action {
    match exit {
        Exit::IoIn(port, data) => {
            pio.read(u64::from(port), data);
            Action::Continue
        }
        Exit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            Action::Continue
        }
        Exit::MmioRead(addr, data) => {
            mmio.read(addr, data);
            Action::Continue
        }
        Exit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
            Action::Continue
        }
        Exit::Hlt => Action::Continue,
        Exit::Shutdown => Action::Stop(ExitStatus::TripleFault),
        Exit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN) => Action::Stop(ExitStatus::PowerOff),
        Exit::SystemEvent(KVM_SYSTEM_EVENT_RESET) => Action::Stop(ExitStatus::Reset),
        Exit::SystemEvent(KVM_SYSTEM_EVENT_CRASH) => Action::Stop(ExitStatus::Panic),
        Exit::SystemEvent(t) => Action::Fatal(format!("unknown system event type {t}")),
        Exit::InternalError(KVM_INTERNAL_ERROR_EMULATION) => Action::EmulationFailure,
        Exit::InternalError(sub) => Action::Fatal(format!("KVM internal error, suberror {sub}")),
        Exit::FailEntry(reason) => Action::Fatal(format!(
            "KVM failed to enter the guest (hardware reason {reason:#x})"
        )),
        Exit::Other(name) => Action::Fatal(format!("unexpected vCPU exit: {name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::exit_port::{ExitPort, EXIT_PORT_BASE, EXIT_PORT_LEN};
    use crate::devices::VmControl;
    use std::sync::{Arc, Mutex};

    fn buses() -> (Bus, Bus, Arc<VmControl>) {
        let control = Arc::new(VmControl::new());
        let mut pio = Bus::new();
        pio.insert(
            Arc::new(Mutex::new(ExitPort::new(control.clone()))),
            EXIT_PORT_BASE,
            EXIT_PORT_LEN,
        )
        .unwrap();
        (pio, Bus::new(), control)
    }

    #[test]
    fn port_io_reaches_devices() {
        let (pio, mmio, control) = buses();
        let mut b = [0u8];
        assert_eq!(
            handle(Exit::IoIn(0xf4, &mut b), &pio, &mmio),
            Action::Continue
        );
        assert_eq!(b[0], 0x4c);
        assert_eq!(
            handle(Exit::IoOut(0xf4, &[9]), &pio, &mmio),
            Action::Continue
        );
        assert_eq!(control.status(), Some(ExitStatus::Exited(9)));
    }

    #[test]
    fn unclaimed_accesses_are_harmless() {
        let (pio, mmio, control) = buses();
        let mut b = [0u8; 4];
        assert_eq!(
            handle(Exit::IoIn(0x80, &mut b), &pio, &mmio),
            Action::Continue
        );
        assert_eq!(b, [0xff; 4]);
        assert_eq!(
            handle(Exit::IoOut(0x80, &[1]), &pio, &mmio),
            Action::Continue
        );
        assert_eq!(
            handle(Exit::MmioRead(0xd000_0000, &mut b), &pio, &mmio),
            Action::Continue
        );
        assert_eq!(
            handle(Exit::MmioWrite(u64::MAX, &b), &pio, &mmio),
            Action::Continue
        );
        assert!(!control.should_stop());
    }

    #[test]
    fn ends_of_the_vm() {
        let (pio, mmio, _) = buses();
        assert_eq!(
            handle(Exit::Shutdown, &pio, &mmio),
            Action::Stop(ExitStatus::TripleFault)
        );
        assert_eq!(
            handle(Exit::SystemEvent(1), &pio, &mmio),
            Action::Stop(ExitStatus::PowerOff)
        );
        assert_eq!(
            handle(Exit::SystemEvent(2), &pio, &mmio),
            Action::Stop(ExitStatus::Reset)
        );
        assert_eq!(
            handle(Exit::SystemEvent(3), &pio, &mmio),
            Action::Stop(ExitStatus::Panic)
        );
        assert!(matches!(
            handle(Exit::SystemEvent(99), &pio, &mmio),
            Action::Fatal(_)
        ));
        assert_eq!(
            handle(Exit::InternalError(1), &pio, &mmio),
            Action::EmulationFailure
        );
        assert!(matches!(
            handle(Exit::InternalError(3), &pio, &mmio),
            Action::Fatal(_)
        ));
        assert!(
            matches!(handle(Exit::FailEntry(0x21), &pio, &mmio), Action::Fatal(m) if m.contains("0x21"))
        );
        assert!(
            matches!(handle(Exit::Other("Debug"), &pio, &mmio), Action::Fatal(m) if m.contains("Debug"))
        );
        assert_eq!(handle(Exit::Hlt, &pio, &mmio), Action::Continue);
    }
}
