//! Fuzzes the paravirtual exit/marker port pair (0xf4/0xf5) and the VM
//! control block behind it: guest port accesses of any width at and around
//! the ports go through the port `Bus`; host-side events (stops the VMM
//! requests, VMM failures, a noticed kernel panic, and the waits `run()`
//! and `RunningVm::stop` do with their timeouts) are interleaved.
//!
//! Oracles, besides "no panic":
//! - the first stop wins: the status is `Exited(N)` for the first claimed,
//!   non-empty write of N to 0xf4 unless something stopped the VM before
//!   (a reset or triple fault after a panic reads as `Panic`; a VMM
//!   failure leaves no guest status);
//! - markers are exactly the values written to 0xf5, in order;
//! - reads of 0xf4 return 'L' then zeros, of 0xf5 zeros; unclaimed
//!   accesses read 0xff and never reach the device;
//! - `wait(timeout)` returns the recorded outcome for any timeout once
//!   stopped, and `None` at once for a zero timeout before.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Input;
use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::exit_port::{ExitPort, EXIT_PORT_BASE, EXIT_PORT_LEN, EXIT_PORT_MAGIC};
use locald_vmm::devices::{Bus, ExitStatus, Outcome, VmControl};

struct Model {
    panicked: bool,
    outcome: Option<Outcome>,
    markers: Vec<u8>,
}

impl Model {
    fn stop(&mut self, s: ExitStatus) {
        let s = match s {
            ExitStatus::Reset | ExitStatus::TripleFault if self.panicked => ExitStatus::Panic,
            s => s,
        };
        self.outcome.get_or_insert(Outcome::Status(s));
    }
    fn status(&self) -> Option<ExitStatus> {
        match self.outcome {
            Some(Outcome::Status(s)) => Some(s),
            _ => None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let control = Arc::new(VmControl::new());
    let mut bus = Bus::new();
    bus.insert(
        Arc::new(Mutex::new(ExitPort::new(control.clone()))),
        EXIT_PORT_BASE,
        EXIT_PORT_LEN,
    )
    .unwrap();
    let mut m = Model {
        panicked: false,
        outcome: None,
        markers: Vec::new(),
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < 4096 {
        ops += 1;
        let op = inp.u8();
        match op % 6 {
            0 | 1 => {
                let port = EXIT_PORT_BASE - 4 + u64::from(inp.u8() % 10);
                let width = [1, 1, 1, 2, 4, 0, 8, 3][usize::from(inp.u8() % 8)];
                let claimed =
                    port >= EXIT_PORT_BASE && port + width as u64 <= EXIT_PORT_BASE + EXIT_PORT_LEN;
                if op % 6 == 0 {
                    let mut bytes = inp.bytes(width).to_vec();
                    bytes.resize(width, 0);
                    assert_eq!(bus.write(port, &bytes), claimed);
                    if claimed {
                        if let Some(&v) = bytes.first() {
                            match port - EXIT_PORT_BASE {
                                0 => m.stop(ExitStatus::Exited(v)),
                                _ => m.markers.push(v),
                            }
                        }
                    }
                } else {
                    let mut b = vec![0xa5u8; width];
                    assert_eq!(bus.read(port, &mut b), claimed);
                    for (i, &x) in b.iter().enumerate() {
                        let want = match (claimed, port - EXIT_PORT_BASE.min(port), i) {
                            (false, _, _) => 0xff,
                            (true, 0, 0) => EXIT_PORT_MAGIC,
                            _ => 0,
                        };
                        assert_eq!(x, want, "read {port:#x} width {width}: {b:x?}");
                    }
                }
            }
            2 => {
                control.note_panic();
                m.panicked = true;
            }
            3 => {
                let s = [
                    ExitStatus::PowerOff,
                    ExitStatus::TimedOut,
                    ExitStatus::TripleFault,
                    ExitStatus::Reset,
                    ExitStatus::Panic,
                    ExitStatus::Exited(inp.u8()),
                ][usize::from(inp.u8() % 6)];
                control.request_stop(s);
                m.stop(s);
            }
            4 => {
                let msg = format!("vcpu {}: fuzz", inp.u8());
                control.fail(msg.clone());
                m.outcome.get_or_insert(Outcome::Failed(msg));
            }
            _ => {
                // The waits `run()` (the configured --timeout) and
                // `RunningVm::stop` (the control protocol's timeout_secs)
                // do. Only when they cannot block: once stopped, or zero.
                let t = match inp.u8() % 4 {
                    0 => Duration::from_secs(inp.u64()),
                    1 => Duration::new(inp.u64(), inp.u32() % 1_000_000_000),
                    2 => Duration::MAX,
                    _ => Duration::from_millis(u64::from(inp.u16())),
                };
                if m.outcome.is_some() {
                    assert_eq!(control.wait(Some(t)), m.outcome);
                    assert_eq!(control.wait(None), m.outcome);
                } else {
                    assert_eq!(control.wait(Some(Duration::ZERO)), None);
                }
            }
        }
        assert_eq!(control.status(), m.status());
        assert_eq!(control.should_stop(), m.outcome.is_some());
    }
    let got: Vec<u8> = control.markers().iter().map(|k| k.value).collect();
    assert_eq!(got, m.markers);
});
