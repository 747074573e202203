//! The COM1 8250 UART (vm-superio's state machine) with its host side: the
//! console sink (stdout, a buffer, or nothing), a bounded input queue fed by
//! the console input thread, and kernel-panic detection on the output.
//!
//! Register accesses run on the vCPU thread that traps them; input arrives on
//! the console input thread. Both go through the device's mutex.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use super::control::VmControl;
use crate::config::SharedBuffer;

/// COM1's I/O base.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1's register count.
pub const COM1_LEN: u64 = 8;
/// COM1's ISA IRQ line (GSI).
pub const COM1_GSI: u32 = 4;
/// Most host input held back while the guest is not reading.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Raises an interrupt by writing an eventfd (registered as a KVM irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest console output goes.
pub enum ConsoleSink {
    /// Our standard output, unbuffered.
    Stdout,
    /// Our standard error, unbuffered.
    Stderr,
    /// A shared in-memory buffer.
    Buffer(SharedBuffer),
    /// Discarded.
    Null,
}

const PANIC_TEXT: &[u8] = b"Kernel panic - not syncing";

/// The UART's output side: forwards bytes and watches for a kernel panic.
pub struct ConsoleWriter {
    sink: ConsoleSink,
    control: Arc<VmControl>,
    line: Vec<u8>,
}

impl ConsoleWriter {
    /// A writer into `sink` that reports panics to `control`.
    pub fn new(sink: ConsoleSink, control: Arc<VmControl>) -> Self {
        ConsoleWriter {
            sink,
            control,
            line: Vec::with_capacity(128),
        }
    }

    fn watch(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                self.line.clear();
            } else if self.line.len() < 256 {
                self.line.push(b);
                if self.line.ends_with(PANIC_TEXT) {
                    self.control.note_panic();
                }
            }
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watch(buf);
        match &mut self.sink {
            ConsoleSink::Stdout => write_fd(1, buf),
            ConsoleSink::Stderr => write_fd(2, buf),
            ConsoleSink::Buffer(b) => b.write(buf),
            ConsoleSink::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes all of `buf` to a raw file descriptor, bypassing std's buffering so
/// interactive output appears at once.
fn write_fd(fd: i32, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the live slice `buf[done..]`.
        let n = unsafe { libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(buf.len())
}

/// The UART plus host input waiting for room in its 64-byte FIFO.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
    pending: VecDeque<u8>,
}

/// The UART's saved registers and receive FIFO (vm-superio's
/// `SerialState`, in the snapshot's format), plus host input not yet in the
/// FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
    pub pending: Vec<u8>,
}

/// A saved UART state that vm-superio refuses (a receive FIFO over 64 bytes).
#[derive(Debug, thiserror::Error)]
#[error("the saved serial port state is invalid: {0}")]
pub struct SerialRestoreError(String);

impl SerialDevice {
    /// Saves the registers, the FIFO and pending host input.
    pub fn save(&self) -> SerialSnapshot {
        let st = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer,
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// A UART in the saved state `s`, raising `irq` and writing to `out`.
    pub fn from_snapshot(
        irq: EventFd,
        out: ConsoleWriter,
        s: &SerialSnapshot,
    ) -> Result<Self, SerialRestoreError> {
        let st = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        if s.pending.len() > MAX_PENDING_INPUT {
            return Err(SerialRestoreError(format!(
                "{} bytes of pending input",
                s.pending.len()
            )));
        }
        let uart = Serial::from_state(&st, EventFdTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| SerialRestoreError(format!("{e:?}")))?;
        Ok(SerialDevice {
            uart,
            pending: s.pending.iter().copied().collect(),
        })
    }

    /// A UART raising its interrupt through `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        SerialDevice {
            uart: Serial::new(EventFdTrigger(irq), out),
            pending: VecDeque::new(),
        }
    }

    /// Queues host input for the guest. Returns how many bytes were taken
    /// (fewer than offered when the bounded queue is full).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        let n = bytes.len().min(room);
        self.pending.extend(&bytes[..n]);
        self.fill_fifo();
        n
    }

    /// Bytes still waiting to enter the FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    fn fill_fifo(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let n = self.uart.fifo_capacity().min(self.pending.len());
            let chunk: Vec<u8> = self.pending.iter().take(n).copied().collect();
            match self.uart.enqueue_raw_bytes(&chunk) {
                // Loopback mode: the UART takes no host input now; keep it
                // pending until the guest leaves loopback.
                Ok(0) => return,
                Ok(k) => {
                    self.pending.drain(..k);
                }
                Err(e) => {
                    // Only raising the interrupt failed: the bytes are queued.
                    self.pending.drain(..n);
                    tracing::warn!("serial input: {e:?}");
                    return;
                }
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.uart.read(offset as u8);
            if offset == 0 && !self.pending.is_empty() {
                self.fill_fifo();
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                tracing::debug!("serial write failed: {e:?}");
            }
            // Input held back during loopback flows again once it ends.
            if !self.pending.is_empty() {
                self.fill_fifo();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(out: SharedBuffer) -> (SerialDevice, Arc<VmControl>, EventFd) {
        let control = Arc::new(VmControl::new());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq2 = irq.try_clone().unwrap();
        let dev = SerialDevice::new(
            irq,
            ConsoleWriter::new(ConsoleSink::Buffer(out), control.clone()),
        );
        (dev, control, irq2)
    }

    #[test]
    fn output_reaches_sink() {
        let out = SharedBuffer::default();
        let (mut dev, _, _) = device(out.clone());
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.contents(), b"hi\n");
        // Wide accesses are ignored, not misread.
        dev.write(0, b"xy");
        assert_eq!(out.contents(), b"hi\n");
    }

    #[test]
    fn input_flows_through_fifo_beyond_its_size() {
        let (mut dev, _, _) = device(SharedBuffer::default());
        let input: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(dev.queue_input(&input), 200);
        let mut got = Vec::new();
        for _ in 0..1000 {
            let mut lsr = [0u8];
            dev.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(dev.pending_input(), 0);
    }

    /// Found by the `serial` fuzz target: host input waiting for FIFO room
    /// was silently dropped while the guest had the UART in loopback mode
    /// (as Linux's 8250 probe does), and input then stalled.
    #[test]
    fn loopback_keeps_pending_input() {
        let (mut dev, _, _) = device(SharedBuffer::default());
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(dev.queue_input(&input), 100);
        dev.write(4, &[0x18]); // MCR: OUT2 | LOOP
        let mut got = Vec::new();
        let mut b = [0u8];
        dev.read(0, &mut b); // reads from the FIFO and tries to refill it
        got.push(b[0]);
        assert_eq!(dev.queue_input(b"!"), 1);
        assert_eq!(dev.pending_input(), 37);
        dev.write(4, &[0x08]); // loopback off: input flows again
        for _ in 0..1000 {
            let mut lsr = [0u8];
            dev.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        let mut want = input;
        want.push(b'!');
        assert_eq!(got, want);
        assert_eq!(dev.pending_input(), 0);
    }

    #[test]
    fn input_queue_is_bounded() {
        let (mut dev, _, _) = device(SharedBuffer::default());
        let big = vec![b'a'; MAX_PENDING_INPUT * 2];
        let taken = dev.queue_input(&big);
        assert_eq!(taken, MAX_PENDING_INPUT);
        // Only what moved into the 64-byte FIFO made room; then nothing fits.
        assert_eq!(dev.queue_input(&big), 64);
        assert_eq!(dev.queue_input(&big), 0);
        assert_eq!(dev.pending_input(), MAX_PENDING_INPUT);
    }

    #[test]
    fn a_saved_uart_restores_registers_fifo_and_pending_input() {
        let (mut dev, _, _) = device(SharedBuffer::default());
        dev.write(3, &[0x83]); // LCR: DLAB + 8 bits
        dev.write(0, &[0x01]); // divisor low
        dev.write(3, &[0x03]); // LCR back
        dev.write(7, &[0x5a]); // scratch
        dev.write(1, &[0x01]); // IER
        assert_eq!(dev.queue_input(&[7u8; 100]), 100);
        let snap = dev.save();
        assert_eq!(snap.in_buffer.len(), 64);
        assert_eq!(snap.pending.len(), 36);
        let json = serde_json::to_string(&snap).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let control = Arc::new(VmControl::new());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r = SerialDevice::from_snapshot(
            irq,
            ConsoleWriter::new(ConsoleSink::Buffer(SharedBuffer::default()), control),
            &back,
        )
        .unwrap();
        assert_eq!(r.save(), snap);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        // A FIFO over 64 bytes is refused, not trusted.
        let bad = SerialSnapshot {
            in_buffer: vec![0; 65],
            ..snap
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let c = Arc::new(VmControl::new());
        assert!(
            SerialDevice::from_snapshot(irq, ConsoleWriter::new(ConsoleSink::Null, c), &bad)
                .is_err()
        );
    }

    #[test]
    fn interrupt_fires_when_enabled() {
        let (mut dev, _, irq) = device(SharedBuffer::default());
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        dev.write(0, b"x");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn panic_text_is_noticed() {
        let out = SharedBuffer::default();
        let (mut dev, control, _) = device(out);
        for b in b"[ 1.0] Kernel panic - not syncing: VFS\n" {
            dev.write(0, &[*b]);
        }
        control.request_stop(crate::devices::ExitStatus::Reset);
        assert_eq!(control.status(), Some(crate::devices::ExitStatus::Panic));
    }
}
