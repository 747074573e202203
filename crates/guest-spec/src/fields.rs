//! Byte-field helpers shared by the spec files: NUL-terminated fields, the
//! `rw`/`ro` mode field, single-value files. Pure functions, any thread.

/// Bytes of `b` up to its first NUL (the binary formats cannot carry a
/// NUL inside a field, and neither can `execve` or `mount`).
pub(crate) fn until_nul(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// Appends `field` (cut at its first NUL) and a terminating NUL.
pub(crate) fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(until_nul(field));
    out.push(0);
}

/// Splits NUL-terminated entries. A trailing entry without its NUL is kept;
/// empty entries in the middle are kept (they are legitimate empty
/// arguments); empty input gives no entries.
pub fn split_nul(data: &[u8]) -> Vec<&[u8]> {
    if data.is_empty() {
        return Vec::new();
    }
    let body = data.strip_suffix(b"\0").unwrap_or(data);
    body.split(|&b| b == 0).collect()
}

/// The `MODE` field: `ro` or `rw`.
pub(crate) fn mode_field(read_only: bool) -> &'static [u8] {
    if read_only {
        b"ro"
    } else {
        b"rw"
    }
}

/// Parses a `MODE` field: `Some(read_only)` for exactly `ro` / `rw`.
pub(crate) fn parse_mode(m: &[u8]) -> Option<bool> {
    match m {
        b"ro" => Some(true),
        b"rw" => Some(false),
        _ => None,
    }
}

/// A single-value file: one trailing NUL or newline is stripped.
pub(crate) fn strip_terminator(data: &[u8]) -> &[u8] {
    data.strip_suffix(b"\0")
        .or_else(|| data.strip_suffix(b"\n"))
        .unwrap_or(data)
}

/// `b` for messages (invalid UTF-8 shown as U+FFFD).
pub(crate) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
