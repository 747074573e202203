//! Fuzzes the COM1 UART (vm-superio's 8250 plus our host side) the way a
//! guest and the host console reach it: port accesses of any width at and
//! around 0x3f8 go through the port `Bus` the vCPUs use, and host input is
//! queued between them (`queue_input`, what the console input thread does).
//!
//! Oracles, besides "no panic":
//! - console output is exactly the bytes the guest wrote to THR while DLAB
//!   and loopback were off (a reference model tracks LCR/MCR);
//! - host input is delivered in order, once, never lost: every byte the
//!   guest reads from RBR with LSR.DR set is the next accepted host byte
//!   (host bytes carry bit 7, loopback bytes do not, so the two streams are
//!   told apart), and at the end, with loopback and DLAB off, draining the
//!   UART yields the accepted bytes (the first 512 in order, the rest
//!   accounted for as pending or in the FIFO) and, when it runs dry,
//!   leaves nothing pending;
//! - `queue_input` accepts exactly what fits in the bounded queue;
//! - accesses not fully inside the device read as 0xff (unclaimed), and
//!   claimed accesses wider than one byte read as zeros;
//! - the kernel-panic detector fires exactly when a reference scan of the
//!   output finds "Kernel panic - not syncing" in the first 256 bytes of
//!   a line.

#![no_main]

#[path = "common.rs"]
mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use common::Input;
use libfuzzer_sys::fuzz_target;
use locald_vmm::config::SharedBuffer;
use locald_vmm::devices::serial::{
    ConsoleSink, ConsoleWriter, SerialDevice, COM1_BASE, COM1_LEN, MAX_PENDING_INPUT,
};
use locald_vmm::devices::{Bus, ExitStatus, VmControl};
use vmm_sys_util::eventfd::EventFd;

const THR: u64 = COM1_BASE;
const LCR: u64 = COM1_BASE + 3;
const MCR: u64 = COM1_BASE + 4;
const LSR: u64 = COM1_BASE + 5;
const LSR_DR: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;
const PANIC_TEXT: &[u8] = b"Kernel panic - not syncing";

struct Model {
    lcr: u8,
    mcr: u8,
    /// Accepted host input not yet read by the guest, in order.
    host: VecDeque<u8>,
    /// Bytes written to THR in loopback mode (the UART may drop some when
    /// its FIFO is full, so reads must be a subsequence of these).
    looped: VecDeque<u8>,
    /// Expected console output.
    out: Vec<u8>,
}

impl Model {
    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }
    fn looping(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }
}

struct Rig {
    bus: Bus,
    dev: Arc<Mutex<SerialDevice>>,
    m: Model,
}

impl Rig {
    fn read1(&self, port: u64) -> u8 {
        let mut b = [0u8];
        assert!(self.bus.read(port, &mut b));
        b[0]
    }

    fn write(&mut self, port: u64, data: &[u8]) {
        let claimed = port >= COM1_BASE && port + data.len() as u64 <= COM1_BASE + COM1_LEN;
        let mut data = data.to_vec();
        if claimed && data.len() == 1 {
            match port - COM1_BASE {
                0 if !self.m.dlab() => {
                    if self.m.looping() {
                        data[0] &= 0x7f; // tag: loopback bytes have bit 7 clear
                        self.m.looped.push_back(data[0]);
                    } else {
                        self.m.out.push(data[0]);
                    }
                }
                3 => self.m.lcr = data[0],
                4 => self.m.mcr = data[0],
                _ => {}
            }
        }
        assert_eq!(self.bus.write(port, &data), claimed);
    }

    /// A guest receive: LSR, then RBR; checks the byte against the model.
    fn receive(&mut self) -> bool {
        assert!(!self.m.dlab());
        let lsr = self.read1(LSR);
        let v = self.read1(THR);
        if lsr & LSR_DR == 0 {
            assert_eq!(v, 0, "RBR with LSR.DR clear");
            return false;
        }
        if v & 0x80 != 0 {
            let want = self.m.host.pop_front();
            assert_eq!(Some(v), want, "host input out of order, duplicated or lost");
        } else {
            loop {
                match self.m.looped.pop_front() {
                    Some(x) if x == v => break,
                    Some(_) => continue,
                    None => panic!("RBR returned {v:#x}, never written in loopback"),
                }
            }
        }
        true
    }

    fn queue(&mut self, bytes: &[u8]) {
        let mut dev = self.dev.lock().unwrap();
        let before = dev.pending_input();
        let took = dev.queue_input(bytes);
        assert_eq!(took, bytes.len().min(MAX_PENDING_INPUT - before));
        assert!(dev.pending_input() <= MAX_PENDING_INPUT);
        drop(dev);
        self.m.host.extend(&bytes[..took]);
    }
}

fn panic_expected(out: &[u8]) -> bool {
    out.split(|&b| b == b'\n').any(|line| {
        line[..line.len().min(256)]
            .windows(PANIC_TEXT.len())
            .any(|w| w == PANIC_TEXT)
    })
}

fn port(inp: &mut Input) -> u64 {
    COM1_BASE - 4 + u64::from(inp.u8() % 16)
}

fn width(inp: &mut Input) -> usize {
    [1, 1, 1, 1, 1, 2, 4, 0][usize::from(inp.u8() % 8)]
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let out = SharedBuffer::default();
    let control = Arc::new(VmControl::new());
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dev = Arc::new(Mutex::new(SerialDevice::new(
        irq,
        ConsoleWriter::new(ConsoleSink::Buffer(out.clone()), control.clone()),
    )));
    let mut bus = Bus::new();
    bus.insert(dev.clone(), COM1_BASE, COM1_LEN).unwrap();
    let mut rig = Rig {
        bus,
        dev,
        m: Model {
            lcr: 0x03,
            mcr: 0x08,
            host: VecDeque::new(),
            looped: VecDeque::new(),
            out: Vec::new(),
        },
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < 1024 {
        ops += 1;
        match inp.u8() % 9 {
            0 => {
                let p = port(&mut inp);
                let w = width(&mut inp);
                let bytes = inp.bytes(w).to_vec();
                if bytes.len() == w {
                    rig.write(p, &bytes);
                }
            }
            1 => {
                let p = port(&mut inp);
                let w = width(&mut inp);
                let claimed = p >= COM1_BASE && p + w as u64 <= COM1_BASE + COM1_LEN;
                if claimed && w == 1 && p == THR && !rig.m.dlab() {
                    rig.receive();
                } else {
                    let mut b = vec![0x5au8; w];
                    assert_eq!(rig.bus.read(p, &mut b), claimed);
                    if !claimed {
                        assert!(b.iter().all(|&x| x == 0xff));
                    } else if w != 1 {
                        assert!(b.iter().all(|&x| x == 0));
                    }
                }
            }
            2 => {
                let n = usize::from(inp.u8() % 100);
                let bytes: Vec<u8> = inp.bytes(n).iter().map(|b| b | 0x80).collect();
                rig.queue(&bytes);
            }
            3 => {
                // Lots of input; rarely more than the bounded queue holds
                // (draining that at the end is slow).
                let n = match inp.u8() {
                    0xb1 => MAX_PENDING_INPUT + 17,
                    k => usize::from(k),
                };
                let bytes: Vec<u8> = (0..n).map(|i| 0x80 | (i % 128) as u8).collect();
                rig.queue(&bytes);
            }
            4 => {
                let v = inp.u8();
                rig.write(THR, &[v]);
            }
            5 => {
                let on = inp.u8() & 1 != 0;
                let v = if on { 0x08 | MCR_LOOP } else { 0x08 };
                rig.write(MCR, &[v]);
            }
            6 => {
                let on = inp.u8() & 1 != 0;
                let v = if on { 0x03 | LCR_DLAB } else { 0x03 };
                rig.write(LCR, &[v]);
            }
            7 => {
                if !rig.m.dlab() {
                    rig.receive();
                }
            }
            _ => {
                // A burst of text, as a kernel printing a line.
                let n = usize::from(inp.u8() % 64);
                for b in inp.bytes(n).to_vec() {
                    rig.write(THR, &[b]);
                }
                if inp.u8() & 1 != 0 {
                    for b in PANIC_TEXT {
                        rig.write(THR, &[*b]);
                    }
                }
            }
        }
    }

    // Liveness: with loopback and DLAB off, accepted input comes out, in
    // order. Draining 64 KiB byte by byte is slow, so past 512 bytes only
    // conservation is checked: what the guest has not read is what is
    // pending plus at most a FIFO's worth.
    rig.write(LCR, &[0x03]);
    rig.write(MCR, &[0x08]);
    let mut idle = 0;
    let mut got = 0;
    while idle < 2 && got < 512 {
        if rig.receive() {
            idle = 0;
            got += 1;
        } else {
            idle += 1;
        }
    }
    let pending = rig.dev.lock().unwrap().pending_input();
    if idle >= 2 {
        assert_eq!(pending, 0, "host input stuck");
        assert!(
            rig.m.host.is_empty(),
            "host input lost: {} bytes",
            rig.m.host.len()
        );
    } else {
        let unread = rig.m.host.len();
        assert!(
            unread >= pending && unread - pending <= 64,
            "host input lost: {unread} unread, {pending} pending"
        );
    }

    assert_eq!(out.contents(), rig.m.out, "console output differs");
    let panicked = panic_expected(&rig.m.out);
    control.request_stop(ExitStatus::Reset);
    let want = if panicked {
        ExitStatus::Panic
    } else {
        ExitStatus::Reset
    };
    assert_eq!(control.status(), Some(want));
});
