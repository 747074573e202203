//! The server side of the hybrid vsock protocol's handshake (Firecracker's
//! convention): a client that connects to a VM's vsock Unix socket first
//! writes `CONNECT <port>\n`. [`ConnectLine`] accumulates that line byte by
//! byte (so not one byte of the data that may follow it is consumed) and
//! parses it. Pure logic, shared by the KVM vsock muxer (on its worker
//! thread) and the Virtualization.framework vsock bridge (on its client
//! threads).

/// Longest CONNECT line we accept, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// Progress of a CONNECT line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineState {
    /// No newline yet.
    NeedMore,
    /// A complete, valid line asking for this guest port.
    Port(u32),
    /// Malformed or oversized: close the client.
    Invalid,
}

/// Accumulates one CONNECT line.
#[derive(Debug, Default)]
pub struct ConnectLine {
    buf: [u8; MAX_CONNECT_LINE],
    len: usize,
    done: bool,
}

impl ConnectLine {
    /// An empty line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one byte read from the client.
    pub fn push(&mut self, b: u8) -> LineState {
        if self.done || self.len == MAX_CONNECT_LINE {
            self.done = true;
            return LineState::Invalid;
        }
        self.buf[self.len] = b;
        self.len += 1;
        if b == b'\n' {
            self.done = true;
            return match parse_connect_line(&self.buf[..self.len]) {
                Some(p) => LineState::Port(p),
                None => LineState::Invalid,
            };
        }
        if self.len == MAX_CONNECT_LINE {
            self.done = true;
            return LineState::Invalid;
        }
        LineState::NeedMore
    }
}

/// Parses `CONNECT <port>\n` (the command is case-insensitive, words may be
/// separated by any ASCII whitespace, a `\r` before the newline is fine;
/// the port is decimal and fits in 32 bits; nothing else may follow).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\n")?;
    if line.len() >= MAX_CONNECT_LINE {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_ascii_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    let port = words.next()?;
    if words.next().is_some() || port.is_empty() || !port.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(bytes: &[u8]) -> Vec<LineState> {
        let mut l = ConnectLine::new();
        bytes.iter().map(|&b| l.push(b)).collect()
    }

    #[test]
    fn parses_valid_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect_line(b"connect 0\n"), Some(0));
        assert_eq!(
            parse_connect_line(b"Connect   4294967295 \r\n"),
            Some(u32::MAX)
        );
        assert_eq!(parse_connect_line(b"  CONNECT\t7\n"), Some(7));
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            &b"CONNECT 52"[..],
            b"\n",
            b"CONNECT\n",
            b"CONNECT x\n",
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 1 2\n",
            b"LISTEN 52\n",
            b"CONNECT52\n",
            b"CONNECT \xff\n",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{:?}", bad);
        }
    }

    #[test]
    fn accumulates_byte_by_byte() {
        let states = feed(b"CONNECT 1234\n");
        assert!(states[..states.len() - 1]
            .iter()
            .all(|s| *s == LineState::NeedMore));
        assert_eq!(*states.last().unwrap(), LineState::Port(1234));
        // Once done, any further byte is a protocol error.
        let mut l = ConnectLine::new();
        for &b in b"CONNECT 1\n" {
            l.push(b);
        }
        assert_eq!(l.push(b'x'), LineState::Invalid);
    }

    #[test]
    fn oversized_lines_are_invalid() {
        // 32 bytes without a newline: invalid at the 32nd byte.
        let states = feed(&[b'a'; 40]);
        assert_eq!(states[30], LineState::NeedMore);
        assert_eq!(states[31], LineState::Invalid);
        // 32 bytes with the newline is the longest acceptable line.
        let mut ok = b"CONNECT".to_vec();
        ok.extend_from_slice(&[b' '; 22]);
        ok.extend_from_slice(b"52\n");
        assert_eq!(ok.len(), MAX_CONNECT_LINE);
        assert_eq!(*feed(&ok).last().unwrap(), LineState::Port(52));
        // One more byte of padding and the newline comes too late.
        let mut long = b"CONNECT".to_vec();
        long.extend_from_slice(&[b' '; 23]);
        long.extend_from_slice(b"52\n");
        let states = feed(&long);
        assert_eq!(states[MAX_CONNECT_LINE - 1], LineState::Invalid);
        assert_eq!(*states.last().unwrap(), LineState::Invalid);
        assert_eq!(parse_connect_line(&long), None);
    }

    #[test]
    fn garbage_is_invalid_at_the_newline() {
        assert_eq!(
            *feed(b"GET / HTTP/1.1\r\n").last().unwrap(),
            LineState::Invalid
        );
    }
}
