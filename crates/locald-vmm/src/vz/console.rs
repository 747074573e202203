//! The guest console's output path under VZ. The serial port writes into
//! a pipe; a thread ([`pump`]) copies it to where the console goes and
//! watches for the kernel's panic message, because under VZ a panic
//! (`panic=-1` reboots) looks like any other guest stop. Pure Rust over
//! `Read`/`Write`: tested on Linux.

use std::io::{self, Read, Write};

/// What the kernel prints when it panics.
pub const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Finds [`PANIC_MARKER`] in a byte stream that arrives in pieces.
#[derive(Debug, Default)]
pub struct PanicScanner {
    /// The last `PANIC_MARKER.len() - 1` bytes seen.
    tail: Vec<u8>,
    seen: bool,
}

impl PanicScanner {
    /// Feeds the next chunk; returns true the first time the marker shows.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        if self.seen {
            return false;
        }
        let keep = PANIC_MARKER.len() - 1;
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(chunk);
        if window
            .windows(PANIC_MARKER.len())
            .any(|w| w == PANIC_MARKER)
        {
            self.seen = true;
            return true;
        }
        let start = window.len().saturating_sub(keep);
        self.tail = window.split_off(start);
        false
    }

    /// Whether the marker was seen.
    pub fn seen(&self) -> bool {
        self.seen
    }
}

/// Copies guest output from `from` to `to` until EOF, calling `on_panic`
/// once if the panic marker goes by. A failing `to` (a closed stdout) is
/// dropped and the rest is read and discarded, so the guest never blocks
/// on a full console.
pub fn pump(mut from: impl Read, mut to: Option<Box<dyn Write + Send>>, on_panic: impl Fn()) {
    let mut scanner = PanicScanner::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if scanner.feed(&buf[..n]) {
            on_panic();
        }
        if let Some(w) = to.as_mut() {
            if w.write_all(&buf[..n]).and_then(|()| w.flush()).is_err() {
                to = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SharedBuffer;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn finds_the_marker_across_chunks() {
        let text = b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n";
        for split in 0..text.len() {
            let mut s = PanicScanner::default();
            let a = s.feed(&text[..split]);
            let b = s.feed(&text[split..]);
            assert!(a ^ b, "split at {split}");
            assert!(s.seen());
            assert!(!s.feed(text), "reported twice");
        }
        // Byte by byte.
        let mut s = PanicScanner::default();
        assert_eq!(text.iter().filter(|b| s.feed(&[**b])).count(), 1);
        let mut s = PanicScanner::default();
        assert!(!s.feed(b"Kernel panic - not"));
        assert!(!s.feed(b" quite"));
        assert!(!s.seen());
    }

    #[test]
    fn pump_copies_and_reports() {
        let out = SharedBuffer::default();
        let hits = AtomicUsize::new(0);
        let input: &[u8] =
            b"boot\nKernel panic - not syncing: x\nmore Kernel panic - not syncing\n";
        pump(input, Some(Box::new(out.clone())), || {
            hits.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(out.contents(), input);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn pump_survives_a_failing_writer() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let big = vec![b'x'; 100_000];
        let mut r: &[u8] = &big;
        pump(&mut r, Some(Box::new(Broken)), || {});
        assert!(r.is_empty(), "everything was read");
        let mut r: &[u8] = &big;
        pump(&mut r, None, || {});
        assert!(r.is_empty());
    }
}
