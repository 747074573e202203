//! The snapshot state file's envelope: a magic, a format version, the
//! body's length and SHA-256, then the body (JSON of the backend's saved
//! state). Pure functions, run on whichever thread saves or restores; the
//! decoder is fuzzed (`fuzz_targets/snapshot_state.rs`).
//!
//! ```text
//! offset  size  field
//! 0       8     magic "LCLDSNAP"
//! 8       4     format version, u32 LE
//! 12      8     body length, u64 LE
//! 20      32    SHA-256 of the body
//! 52      n     body
//! ```
//!
//! A file that is truncated, longer than its header says, of another
//! version, or whose body does not match its checksum is refused with one
//! error naming the problem; only then is the body parsed.

use sha2::{Digest, Sha256};

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"LCLDSNAP";
/// The format this VMM writes and reads.
pub const VERSION: u32 = 1;
/// Header length.
pub const HEADER: usize = 8 + 4 + 8 + 32;
/// Largest body accepted (the saved state is tens of KiB; guest memory
/// lives in its own file).
pub const MAX_BODY: u64 = 16 << 20;

/// Why a state file was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a locald-vmm snapshot state file (bad magic)")]
    Magic,
    #[error("snapshot state format version {0}; this locald-vmm reads version {VERSION}")]
    Version(u32),
    #[error("snapshot state file is truncated ({have} bytes, {want} expected)")]
    Truncated { have: u64, want: u64 },
    #[error("snapshot state file has {0} bytes after its end")]
    Trailing(u64),
    #[error("snapshot state body of {0} bytes is larger than the {MAX_BODY}-byte limit")]
    TooLarge(u64),
    #[error("snapshot state file is corrupt or was modified (checksum mismatch)")]
    Checksum,
    #[error("snapshot state file is corrupt: {0}")]
    Body(String),
}

/// The state file for `body`.
pub fn encode<T: serde::Serialize>(body: &T) -> Vec<u8> {
    // Our own plain structs: serialisation cannot fail.
    let json = serde_json::to_vec(body).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&json));
    out.extend_from_slice(&json);
    out
}

/// Checks the envelope of `bytes` and parses the body.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let body = envelope(bytes)?;
    serde_json::from_slice(body).map_err(|e| FormatError::Body(e.to_string()))
}

/// Checks magic, version, length and checksum; returns the body.
pub fn envelope(bytes: &[u8]) -> Result<&[u8], FormatError> {
    let have = bytes.len() as u64;
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        if bytes.len() >= 8 && &bytes[..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        if bytes.len() < 8 && !MAGIC.starts_with(bytes) {
            return Err(FormatError::Magic);
        }
        return Err(FormatError::Truncated {
            have,
            want: HEADER as u64,
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    if bytes.len() < HEADER {
        return Err(FormatError::Truncated {
            have,
            want: HEADER as u64,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    if len > MAX_BODY {
        return Err(FormatError::TooLarge(len));
    }
    let want = HEADER as u64 + len;
    if have < want {
        return Err(FormatError::Truncated { have, want });
    }
    if have > want {
        return Err(FormatError::Trailing(have - want));
    }
    let body = &bytes[HEADER..];
    if Sha256::digest(body).as_slice() != &bytes[20..52] {
        return Err(FormatError::Checksum);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Body {
        a: u32,
        b: Vec<u8>,
    }

    fn sample() -> Vec<u8> {
        encode(&Body {
            a: 7,
            b: vec![1, 2, 3],
        })
    }

    #[test]
    fn a_body_round_trips() {
        let back: Body = decode(&sample()).unwrap();
        assert_eq!(
            back,
            Body {
                a: 7,
                b: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let f = sample();
        for n in 0..f.len() {
            let e = decode::<Body>(&f[..n]).unwrap_err();
            assert!(matches!(e, FormatError::Truncated { .. }), "{n} bytes: {e}");
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let f = sample();
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x40;
            assert!(decode::<Body>(&g).is_err(), "byte {i} flipped was accepted");
        }
    }

    #[test]
    fn foreign_versions_lengths_and_trailers_get_their_own_error() {
        let f = sample();
        assert_eq!(
            decode::<Body>(b"\x7fELF\x02\x01\x01\0rest").unwrap_err(),
            FormatError::Magic
        );
        let mut v = f.clone();
        v[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(decode::<Body>(&v).unwrap_err(), FormatError::Version(9));
        let mut t = f.clone();
        t.push(0);
        assert_eq!(decode::<Body>(&t).unwrap_err(), FormatError::Trailing(1));
        let mut l = f.clone();
        l[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            decode::<Body>(&l).unwrap_err(),
            FormatError::TooLarge(u64::MAX)
        );
        // A valid envelope around a body of another shape.
        let other = encode(&vec!["x"]);
        assert!(matches!(
            decode::<Body>(&other).unwrap_err(),
            FormatError::Body(_)
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut b = bytes.clone();
            if len % 2 == 0 && b.len() >= 8 {
                b[..8].copy_from_slice(MAGIC);
            }
            let _ = decode::<Body>(&b);
        }
    }
}
