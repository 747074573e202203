//! `/.locald/image`: the parts of an OCI image's configuration that only
//! the guest can apply, because they need the image's own root filesystem
//! (after the root switch) or the running kernel. Pure functions, any
//! thread.
//!
//! Format: NUL-terminated `KEY=VALUE` entries, each key at most once, in
//! any order:
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `user` | docker's `User`: `uid`, `uid:gid`, `name`, `name:group`, `uid:group`, `name:gid` | the command runs as this user, resolved in the image's `/etc/passwd` and `/etc/group` |
//! | `hostname` | 1 to 64 bytes, no control characters, space or `/` | `sethostname(2)` and `/etc/hostname` |
//! | `resolv` | `1` | write `/etc/resolv.conf` into the image's root (with `--net`) |
//!
//! The file's presence means "this root is an OCI image": the guest then
//! also sets `HOME` from the user's passwd entry (`/` without one) unless
//! the `env` file sets it, as docker does. An empty file is valid (root,
//! the default hostname, no `resolv.conf`). The encoder writes only the
//! keys that are set (`resolv` only when true), so
//! `decode(encode(x)) == x`. Unknown keys, duplicates, entries without
//! `=` and invalid values are errors (the file is written by the same
//! locald-vmm build that made the initramfs).
//!
//! Docker's other config fields need no guest code: `Entrypoint`/`Cmd`
//! become `argv`, `Env` becomes `env`, `WorkingDir` becomes `workdir`.

use crate::fields::{lossy, split_nul, until_nul};

/// Maximum hostname length (Linux `HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;
/// Maximum length of the `user` value.
pub const MAX_USER_LEN: usize = 256;

/// What the guest applies from the image's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSpec {
    /// Docker's `User` (`None`: root, as docker's empty `User`).
    pub user: Option<Vec<u8>>,
    /// Hostname (`None`: the guest init's default).
    pub hostname: Option<Vec<u8>>,
    /// Write the DNS servers of `--net` to the image root's
    /// `/etc/resolv.conf`.
    pub resolv: bool,
}

/// Why `/.locald/image` was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageError {
    /// An entry without `=` (as found).
    NoEquals(String),
    /// An unknown key.
    UnknownKey(String),
    /// A key given twice.
    Duplicate(String),
    /// `user` is empty, too long, or holds a newline or more than one `:`.
    BadUser(String),
    /// `hostname` is empty, too long, or holds a control character, a
    /// space or `/`.
    BadHostname(String),
    /// `resolv` is not `1`.
    BadResolv(String),
}

impl std::fmt::Display for ImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoEquals(e) => write!(f, "entry '{e}' is not KEY=VALUE"),
            Self::UnknownKey(k) => write!(f, "unknown key '{k}'"),
            Self::Duplicate(k) => write!(f, "key '{k}' given twice"),
            Self::BadUser(u) => write!(
                f,
                "user '{u}' must be 1 to {MAX_USER_LEN} bytes, USER or USER:GROUP, no newline"
            ),
            Self::BadHostname(h) => write!(
                f,
                "hostname '{h}' must be 1 to {MAX_HOSTNAME_LEN} bytes without control characters, spaces or '/'"
            ),
            Self::BadResolv(v) => write!(f, "resolv must be '1', got '{v}'"),
        }
    }
}

impl std::error::Error for ImageError {}

/// True for a valid `user` value.
pub fn valid_user(u: &[u8]) -> bool {
    !u.is_empty()
        && u.len() <= MAX_USER_LEN
        && !u.contains(&b'\n')
        && !u.contains(&0)
        && u.iter().filter(|&&c| c == b':').count() <= 1
        && !u.starts_with(b":")
        && !u.ends_with(b":")
}

/// True for a valid `hostname` value.
pub fn valid_hostname(h: &[u8]) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && h.iter().all(|&c| c > b' ' && c != 0x7f && c != b'/')
}

fn push_entry(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(until_nul(value));
    out.push(0);
}

impl ImageSpec {
    /// The file's bytes (values cut at a NUL).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(u) = &self.user {
            push_entry(&mut out, b"user", u);
        }
        if let Some(h) = &self.hostname {
            push_entry(&mut out, b"hostname", h);
        }
        if self.resolv {
            push_entry(&mut out, b"resolv", b"1");
        }
        out
    }

    /// Parses the file (see the module documentation).
    pub fn decode(data: &[u8]) -> Result<Self, ImageError> {
        let mut spec = ImageSpec::default();
        let mut seen_resolv = false;
        for entry in split_nul(data) {
            let eq = entry
                .iter()
                .position(|&c| c == b'=')
                .ok_or_else(|| ImageError::NoEquals(lossy(entry)))?;
            let (key, value) = (&entry[..eq], &entry[eq + 1..]);
            let dup = || ImageError::Duplicate(lossy(key));
            match key {
                b"user" => {
                    if spec.user.is_some() {
                        return Err(dup());
                    }
                    if !valid_user(value) {
                        return Err(ImageError::BadUser(lossy(value)));
                    }
                    spec.user = Some(value.to_vec());
                }
                b"hostname" => {
                    if spec.hostname.is_some() {
                        return Err(dup());
                    }
                    if !valid_hostname(value) {
                        return Err(ImageError::BadHostname(lossy(value)));
                    }
                    spec.hostname = Some(value.to_vec());
                }
                b"resolv" => {
                    if seen_resolv {
                        return Err(dup());
                    }
                    if value != b"1" {
                        return Err(ImageError::BadResolv(lossy(value)));
                    }
                    seen_resolv = true;
                    spec.resolv = true;
                }
                _ => return Err(ImageError::UnknownKey(lossy(key))),
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(user: Option<&str>, hostname: Option<&str>, resolv: bool) -> ImageSpec {
        ImageSpec {
            user: user.map(|u| u.as_bytes().to_vec()),
            hostname: hostname.map(|h| h.as_bytes().to_vec()),
            resolv,
        }
    }

    #[test]
    fn byte_exact() {
        assert_eq!(ImageSpec::default().encode(), b"");
        assert_eq!(
            spec(Some("1000:1000"), Some("web"), true).encode(),
            b"user=1000:1000\0hostname=web\0resolv=1\0"
        );
        assert_eq!(spec(Some("nobody"), None, false).encode(), b"user=nobody\0");
    }

    #[test]
    fn round_trips() {
        let users = [
            None,
            Some("0"),
            Some("1000"),
            Some("1000:1000"),
            Some("nobody"),
            Some("www-data:www-data"),
            Some("app:0"),
            Some("0:wheel"),
            Some("ünï"),
        ];
        let hosts = [
            None,
            Some("a"),
            Some("my-host.example"),
            Some(&"h".repeat(64)),
        ];
        for u in users {
            for h in hosts {
                for r in [false, true] {
                    let s = spec(u, h.map(|x| x as &str), r);
                    assert_eq!(ImageSpec::decode(&s.encode()), Ok(s.clone()), "{s:?}");
                }
            }
        }
        // Order does not matter; a missing final NUL is fine.
        assert_eq!(
            ImageSpec::decode(b"resolv=1\0hostname=h\0user=1"),
            Ok(spec(Some("1"), Some("h"), true))
        );
    }

    #[test]
    fn rejects_bad_files() {
        let bad: &[(&[u8], ImageError)] = &[
            (b"user\0", ImageError::NoEquals("user".into())),
            (b"color=red\0", ImageError::UnknownKey("color".into())),
            (b"user=a\0user=b\0", ImageError::Duplicate("user".into())),
            (
                b"resolv=1\0resolv=1\0",
                ImageError::Duplicate("resolv".into()),
            ),
            (
                b"hostname=a\0hostname=a\0",
                ImageError::Duplicate("hostname".into()),
            ),
            (b"user=\0", ImageError::BadUser("".into())),
            (b"user=a:b:c\0", ImageError::BadUser("a:b:c".into())),
            (b"user=:0\0", ImageError::BadUser(":0".into())),
            (b"user=0:\0", ImageError::BadUser("0:".into())),
            (b"user=a\nb\0", ImageError::BadUser("a\nb".into())),
            (b"hostname=\0", ImageError::BadHostname("".into())),
            (b"hostname=a b\0", ImageError::BadHostname("a b".into())),
            (b"hostname=a/b\0", ImageError::BadHostname("a/b".into())),
            (b"hostname=a\tb\0", ImageError::BadHostname("a\tb".into())),
            (b"resolv=0\0", ImageError::BadResolv("0".into())),
            (b"resolv=yes\0", ImageError::BadResolv("yes".into())),
            // A doubled NUL is an empty entry.
            (b"user=a\0\0", ImageError::NoEquals("".into())),
        ];
        for (data, err) in bad {
            assert_eq!(ImageSpec::decode(data).as_ref(), Err(err), "{data:?}");
        }
        let long = format!("hostname={}\0", "h".repeat(65));
        assert!(matches!(
            ImageSpec::decode(long.as_bytes()),
            Err(ImageError::BadHostname(_))
        ));
        let long = format!("user={}\0", "u".repeat(MAX_USER_LEN + 1));
        assert!(matches!(
            ImageSpec::decode(long.as_bytes()),
            Err(ImageError::BadUser(_))
        ));
    }
}
