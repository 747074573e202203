//! The console line that reports the command's exit status when the VM
//! has no exit port (aarch64 guests, any guest under Virtualization.framework
//! or QEMU): `locald-init: exit status N\n`, N decimal 0..=255, written in
//! one `write` right before the guest powers off. The guest init writes it
//! ([`encode`]); the VZ backend's console pump reads it back ([`parse`]),
//! the last such line wins. Pure functions, on whichever thread calls them.

/// What every exit status line starts with.
pub const PREFIX: &str = "locald-init: exit status ";

/// Longest line [`parse`] can accept (prefix, three digits, `\r`).
pub const MAX_LINE: usize = PREFIX.len() + 4;

/// The line for `code`, newline included.
pub fn encode(code: u8) -> String {
    format!("{PREFIX}{code}\n")
}

/// The status in one console line (without its `\n`; a trailing `\r` is
/// fine), or `None` when the line is anything else.
pub fn parse(line: &[u8]) -> Option<u8> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(PREFIX.as_bytes())?;
    if digits.is_empty() || digits.len() > 3 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_code() {
        for code in 0..=255u8 {
            let line = encode(code);
            assert!(line.len() <= MAX_LINE + 1, "{line:?}");
            assert_eq!(parse(line.trim_end_matches('\n').as_bytes()), Some(code));
        }
        assert_eq!(parse(b"locald-init: exit status 7\r"), Some(7));
    }

    #[test]
    fn other_lines_are_not_statuses() {
        for bad in [
            &b""[..],
            b"locald-init: exit status ",
            b"locald-init: exit status 256",
            b"locald-init: exit status 0042",
            b"locald-init: exit status -1",
            b"locald-init: exit status 1 ",
            b" locald-init: exit status 1",
            b"locald-init: exit status\t1",
            b"hello",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
