//! `/.locald/env`: extra environment, NUL-terminated `KEY=VALUE` entries.
//! Pure functions, any thread.
//!
//! The key ends at the first `=` (a key containing `=` is therefore split
//! there, and the rest goes to the value). Decoding skips entries without
//! `=` or with an empty key instead of failing: the guest applies the rest
//! over its default environment (same key replaces, new keys appended in
//! order). Keys and values containing NUL are cut at the NUL when encoded.

use crate::fields::{split_nul, until_nul};

/// The file's bytes for `env` (empty for an empty list; the archive then
/// omits the file).
pub fn encode<K: AsRef<[u8]>, V: AsRef<[u8]>>(env: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in env {
        out.extend_from_slice(until_nul(k.as_ref()));
        out.push(b'=');
        out.extend_from_slice(until_nul(v.as_ref()));
        out.push(0);
    }
    out
}

/// Splits one `KEY=VALUE` entry at its first `=`; `None` without `=` or
/// with an empty key.
pub fn entry(e: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = e.iter().position(|&b| b == b'=')?;
    let (key, value) = (&e[..eq], &e[eq + 1..]);
    (!key.is_empty()).then_some((key, value))
}

/// The entries in the file, in order, duplicates kept (never fails).
pub fn decode(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    split_nul(data)
        .into_iter()
        .filter_map(entry)
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}
