//! Fuzzes the i8042 reset-line stub as the guest reaches it: port accesses
//! of any width at and around 0x60-0x64 through the port `Bus`, mixed with
//! host-side events on the VM's control block (a kernel panic noticed on
//! the console, stops requested by the VMM).
//!
//! Oracles, besides "no panic":
//! - the VM stops with `Reset` exactly when the guest writes the CPU-reset
//!   command (0xfe) to the command port 0x64 and nothing stopped it
//!   first, and that reset reads as `Panic` once a panic was noticed;
//! - every claimed read returns zeros (status bit 1, "input buffer full",
//!   reads clear, so Linux's reboot path proceeds), unclaimed accesses
//!   (not fully inside 0x60..0x65) read 0xff and never reach the device.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::{Arc, Mutex};

use common::Input;
use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::legacy::{I8042, I8042_BASE, I8042_LEN};
use locald_vmm::devices::{Bus, ExitStatus, VmControl};

struct Model {
    panicked: bool,
    status: Option<ExitStatus>,
}

impl Model {
    fn stop(&mut self, s: ExitStatus) {
        let s = match s {
            ExitStatus::Reset | ExitStatus::TripleFault if self.panicked => ExitStatus::Panic,
            s => s,
        };
        self.status.get_or_insert(s);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let control = Arc::new(VmControl::new());
    let mut bus = Bus::new();
    bus.insert(
        Arc::new(Mutex::new(I8042::new(control.clone()))),
        I8042_BASE,
        I8042_LEN,
    )
    .unwrap();
    let mut m = Model {
        panicked: false,
        status: None,
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < 4096 {
        ops += 1;
        let op = inp.u8();
        let port = I8042_BASE - 4 + u64::from(inp.u8() % 14);
        let width = [1, 1, 1, 2, 4, 0, 8, 3][usize::from(inp.u8() % 8)];
        let claimed = port >= I8042_BASE && port + width as u64 <= I8042_BASE + I8042_LEN;
        match op % 5 {
            0 | 1 => {
                let mut bytes = inp.bytes(width).to_vec();
                bytes.resize(width, 0);
                if op % 5 == 1 {
                    if let Some(b) = bytes.first_mut() {
                        *b = 0xfe; // help the fuzzer to the reset command
                    }
                }
                assert_eq!(bus.write(port, &bytes), claimed);
                if claimed && port == I8042_BASE + 4 && bytes.first() == Some(&0xfe) {
                    m.stop(ExitStatus::Reset);
                }
            }
            2 => {
                let mut b = vec![0xa5u8; width];
                assert_eq!(bus.read(port, &mut b), claimed);
                let want = if claimed { 0 } else { 0xff };
                assert!(b.iter().all(|&x| x == want), "read {port:#x}: {b:x?}");
            }
            3 => {
                control.note_panic();
                m.panicked = true;
            }
            _ => {
                let s = [
                    ExitStatus::PowerOff,
                    ExitStatus::TimedOut,
                    ExitStatus::TripleFault,
                    ExitStatus::Exited(inp.u8()),
                ][usize::from(inp.u8() % 4)];
                control.request_stop(s);
                m.stop(s);
            }
        }
        assert_eq!(control.status(), m.status);
        assert_eq!(control.should_stop(), m.status.is_some());
    }
});
