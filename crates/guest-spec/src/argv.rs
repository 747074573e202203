//! `/.locald/argv`: the command and its arguments, each terminated by a NUL
//! byte (binary safe, no quoting). Pure functions, any thread.
//!
//! Decoding accepts any bytes: a last entry without its NUL is kept, empty
//! entries are empty arguments, an empty file means "no command"
//! (interactive shell). An argument containing NUL is cut at the NUL when
//! encoded.

use crate::fields::{push_field, split_nul};

/// The file's bytes for `argv` (empty for an empty `argv`; the archive then
/// omits the file).
pub fn encode<S: AsRef<[u8]>>(argv: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in argv {
        push_field(&mut out, a.as_ref());
    }
    out
}

/// The arguments in the file (never fails; no entry contains NUL).
pub fn decode(data: &[u8]) -> Vec<Vec<u8>> {
    split_nul(data).into_iter().map(<[u8]>::to_vec).collect()
}
