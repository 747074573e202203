//! `/.locald/workdir`: the command's working directory, the path bytes with
//! no terminator. Pure functions, any thread.
//!
//! Decoding cuts at the first NUL (so a trailing NUL is fine) and strips
//! trailing newlines (so a decoded path re-encodes to itself); an empty path means "none". A path containing NUL
//! is cut at the NUL when encoded.

use crate::fields::until_nul;

/// The file's bytes for `path`.
pub fn encode(path: &[u8]) -> Vec<u8> {
    until_nul(path).to_vec()
}

/// The working directory in the file, `None` when empty (never fails).
pub fn decode(data: &[u8]) -> Option<Vec<u8>> {
    let mut path = until_nul(data);
    while let Some(p) = path.strip_suffix(b"\n") {
        path = p;
    }
    (!path.is_empty()).then(|| path.to_vec())
}
