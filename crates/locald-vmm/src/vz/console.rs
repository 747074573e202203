//! The guest console's output path under VZ. The serial port writes into
//! a pipe; a thread ([`pump`]) copies it to where the console goes and
//! watches for two things, because under VZ every guest end looks like a
//! plain stop: the kernel's panic message (`panic=-1` reboots), and the
//! guest init's exit status line (`locald_guest_spec::exit_line`: there is
//! no exit port). Pure Rust over `Read`/`Write`: tested on Linux.

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

/// What the console showed that decides how the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// The kernel panicked (reported once).
    Panic,
    /// The guest init reported its command's exit status (each line).
    Exit(u8),
}

/// Finds the exit status lines in a byte stream that arrives in pieces.
#[derive(Debug, Default)]
pub struct ExitLineScanner {
    /// The current line, while it can still be a status line.
    line: Vec<u8>,
    /// The current line is already too long to be one.
    overlong: bool,
}

impl ExitLineScanner {
    /// Feeds the next chunk; returns the status of each complete status
    /// line in it, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut codes = Vec::new();
        for &b in chunk {
            if b == b'\n' {
                if !self.overlong {
                    codes.extend(locald_guest_spec::exit_line::parse(&self.line));
                }
                self.line.clear();
                self.overlong = false;
            } else if self.line.len() < locald_guest_spec::exit_line::MAX_LINE {
                self.line.push(b);
            } else {
                self.overlong = true;
            }
        }
        codes
    }
}

/// Copies guest output from `from` to `to` until EOF, calling `on_event`
/// once for a panic and for every exit status line. A failing `to` (a
/// closed stdout) is dropped and the rest is read and discarded, so the
/// guest never blocks on a full console.
pub fn pump(
    mut from: impl Read,
    mut to: Option<Box<dyn Write + Send>>,
    on_event: impl Fn(ConsoleEvent),
) {
    let mut scanner = PanicScanner::default();
    let mut exits = ExitLineScanner::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if scanner.feed(&buf[..n]) {
            on_event(ConsoleEvent::Panic);
        }
        for code in exits.feed(&buf[..n]) {
            on_event(ConsoleEvent::Exit(code));
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
        pump(input, Some(Box::new(out.clone())), |e| {
            assert_eq!(e, ConsoleEvent::Panic);
            hits.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(out.contents(), input);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn exit_lines_are_found_across_chunks() {
        let text = b"x\nlocald-init: exit status 3\nlocald-init: exit status 42\r\nno\n";
        for split in 0..text.len() {
            let mut s = ExitLineScanner::default();
            let mut codes = s.feed(&text[..split]);
            codes.extend(s.feed(&text[split..]));
            assert_eq!(codes, [3, 42], "split at {split}");
        }
        // A status line glued to a longer one is not a status line.
        let mut s = ExitLineScanner::default();
        assert!(s.feed(b"locald-init: exit status 1234567890\n").is_empty());
        assert!(s.feed(b"prefix locald-init: exit status 1\n").is_empty());
        let events = std::sync::Mutex::new(Vec::new());
        pump(&text[..], None, |e| events.lock().unwrap().push(e));
        assert_eq!(
            events.into_inner().unwrap(),
            [ConsoleEvent::Exit(3), ConsoleEvent::Exit(42)]
        );
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
        pump(&mut r, Some(Box::new(Broken)), |_| {});
        assert!(r.is_empty(), "everything was read");
        let mut r: &[u8] = &big;
        pump(&mut r, None, |_| {});
        assert!(r.is_empty());
    }
}
