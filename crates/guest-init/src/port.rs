//! Paravirtual exit/marker port I/O (x86 `in`/`out` from userspace), and the
//! console exit-status line where there is no such port.
//!
//! Runs on init's only thread. Protocol (implemented by the VMM's KVM
//! backend on x86_64):
//! - port `0xf4` (exit): an 8-bit OUT of `N` ends the VM with exit code `N`;
//!   an 8-bit IN returns `0x4c` (`'L'`) when the device exists.
//! - port `0xf5` (marker): value 1 = userspace reached, 2 = command started,
//!   3 = command finished; the VMM timestamps them.
//!
//! Access is granted with `ioperm(2)`; if that fails, or the IN probe does not
//! answer `'L'` (we are not under locald-vmm's KVM backend), markers are
//! no-ops and [`ExitPort::exit`] prints [`exit_status_line`] on the console
//! instead; the caller then powers off with `reboot(2)`. aarch64 has no port
//! I/O at all, so there the device is always absent (the line is how a VMM
//! without the port, e.g. Virtualization.framework or QEMU, learns the
//! status; docs/guest-init.md).

use std::io::Write;

#[cfg(target_arch = "x86_64")]
use std::arch::asm;

/// Exit port: OUT the exit code here.
pub const EXIT_PORT: u16 = 0xf4;
/// Marker port: OUT a [`Marker`] here.
pub const MARKER_PORT: u16 = 0xf5;
/// Value an IN from [`EXIT_PORT`] returns under locald-vmm.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub const PROBE_VALUE: u8 = 0x4c;

/// Boot progress markers written to [`MARKER_PORT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Marker {
    /// First instruction of init's `main`.
    UserspaceReached = 1,
    /// Right before the command is spawned.
    CommandStarted = 2,
    /// The command has been reaped.
    CommandFinished = 3,
}

/// Handle to the locald-vmm exit device. `Copy` so the panic hook can own one.
#[derive(Debug, Clone, Copy)]
pub struct ExitPort {
    present: bool,
}

/// The console line that reports the command's exit status `code` when
/// there is no exit port: `locald-init: exit status N` (decimal 0..=255,
/// newline-terminated, written in one `write`). The line is printed right
/// before the VM powers off.
pub fn exit_status_line(code: u8) -> String {
    locald_guest_spec::exit_line::encode(code)
}

impl ExitPort {
    /// Requests I/O permission for ports 0xf4..=0xf5 and probes the device.
    #[cfg(target_arch = "x86_64")]
    pub fn open() -> Self {
        // SAFETY: ioperm only changes this process' I/O permission bitmap.
        let granted = unsafe { libc::ioperm(EXIT_PORT.into(), 2, 1) } == 0;
        // SAFETY: ioperm succeeded, so `in` on EXIT_PORT cannot fault; reading
        // a port has no memory effects.
        let present = granted && unsafe { inb(EXIT_PORT) } == PROBE_VALUE;
        Self { present }
    }

    /// No port I/O on this architecture: the device is absent.
    #[cfg(not(target_arch = "x86_64"))]
    pub fn open() -> Self {
        Self { present: false }
    }

    /// Reports a boot progress marker (no-op without the device).
    pub fn marker(self, m: Marker) {
        if self.present {
            // SAFETY: permission was granted in `open` (present implies it).
            unsafe { outb(MARKER_PORT, m as u8) }
        }
    }

    /// Asks the VMM to end the VM with `code`. Without the device, prints
    /// [`exit_status_line`] on the console (stderr, which is
    /// `/dev/console`) and returns; with it, returns only if the write was
    /// ignored.
    pub fn exit(self, code: u8) {
        if self.present {
            // SAFETY: permission was granted in `open` (present implies it).
            unsafe { outb(EXIT_PORT, code) }
        } else {
            let _ = std::io::stderr().write_all(exit_status_line(code).as_bytes());
        }
    }
}

/// Gives up the I/O permission `open` requested (a forked agent process
/// must not be able to end the VM). A no-op without port I/O.
pub fn drop_access() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: ioperm only changes this process' I/O permission bitmap.
    unsafe {
        libc::ioperm(EXIT_PORT.into(), 2, 0);
    }
}

/// 8-bit port write.
///
/// # Safety
/// The caller must hold I/O permission for `port` (else SIGSEGV).
#[cfg(target_arch = "x86_64")]
unsafe fn outb(port: u16, value: u8) {
    // SAFETY: upheld by the caller; `out` touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Never called: `present` is always false without port I/O.
///
/// # Safety
/// None needed; `unsafe` only to match the x86 signature.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn outb(_port: u16, _value: u8) {}

/// 8-bit port read.
///
/// # Safety
/// The caller must hold I/O permission for `port` (else SIGSEGV).
#[cfg(target_arch = "x86_64")]
unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: upheld by the caller; `in` touches no memory.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags));
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_values_match_protocol() {
        assert_eq!(Marker::UserspaceReached as u8, 1);
        assert_eq!(Marker::CommandStarted as u8, 2);
        assert_eq!(Marker::CommandFinished as u8, 3);
    }

    #[test]
    fn exit_status_line_format() {
        assert_eq!(exit_status_line(0), "locald-init: exit status 0\n");
        assert_eq!(exit_status_line(42), "locald-init: exit status 42\n");
        assert_eq!(exit_status_line(255), "locald-init: exit status 255\n");
    }

    #[test]
    fn absent_port_is_a_no_op() {
        // Tests do not run as root under locald-vmm: whatever `open` finds,
        // an absent handle must never touch the hardware.
        let p = ExitPort { present: false };
        p.marker(Marker::UserspaceReached);
        p.exit(0);
        assert!(!p.present);
    }
}
