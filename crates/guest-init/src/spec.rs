//! Command specification: parsing of the files the VMM places under
//! `/.locald/` (pure functions, plus one reader that touches the filesystem).
//!
//! Runs on init's only thread. Formats (written by `locald_vmm::assets::command_archive`):
//! - `argv`: argument strings, each terminated by a NUL byte (binary safe, no
//!   quoting). A final entry without its NUL is accepted. Absent or empty file
//!   means "interactive shell".
//! - `env`: NUL-terminated `KEY=VALUE` entries, applied over [`DEFAULT_ENV`]
//!   (same key replaces, new keys are appended in order). Entries without `=`
//!   or with an empty key are ignored.
//! - `workdir`: a path; one trailing NUL or newline is stripped; empty means none.
//! - `root` (optional): boot from a disk, `DEVICE\0FSTYPE\0MODE\0` — see
//!   [`parse_root`].
//! - `agent` (optional, content ignored): agent mode — instead of running
//!   `argv`, init starts the vsock guest agent (`crate::agent`).

use std::ffi::CString;
use std::io;
use std::path::Path;

/// Directory holding the command spec inside the guest.
pub const SPEC_DIR: &str = "/.locald";

/// Environment every command starts from.
pub const DEFAULT_ENV: &[(&[u8], &[u8])] = &[
    (
        b"PATH",
        b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    (b"HOME", b"/root"),
    (b"TERM", b"linux"),
];

/// What init should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Command and arguments; empty means interactive `/bin/sh`.
    pub argv: Vec<CString>,
    /// Final environment as `(key, value)` pairs (defaults already applied).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory, if any.
    pub workdir: Option<Vec<u8>>,
    /// Root filesystem to switch to before running the command, if any.
    pub root: Option<RootSpec>,
    /// Agent mode (`/.locald/agent` exists): serve commands over vsock
    /// instead of running `argv`.
    pub agent: bool,
}

/// Contents of `/.locald/root`: the filesystem to use as `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    /// Block device (or other `mount(2)` source), e.g. `/dev/vda`.
    pub device: CString,
    /// Filesystem type for `mount(2)`, e.g. `ext4`.
    pub fstype: CString,
    /// Mount read-only (`MODE` = `ro`).
    pub read_only: bool,
}

/// Why `/.locald/root` was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSpecError {
    /// Not exactly three fields (the count found).
    FieldCount(usize),
    /// `DEVICE` is empty.
    EmptyDevice,
    /// `FSTYPE` is empty (for the named device).
    EmptyFstype(String),
    /// `MODE` is neither `rw` nor `ro` (device, mode as found).
    BadMode(String, String),
}

impl std::fmt::Display for RootSpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FieldCount(n) => write!(
                f,
                "expected 3 NUL-terminated fields DEVICE, FSTYPE, MODE, found {n}"
            ),
            Self::EmptyDevice => write!(f, "empty DEVICE"),
            Self::EmptyFstype(dev) => write!(f, "empty FSTYPE for {dev}"),
            Self::BadMode(dev, mode) => {
                write!(f, "MODE for {dev} must be 'rw' or 'ro', got '{mode}'")
            }
        }
    }
}

impl std::error::Error for RootSpecError {}

impl Spec {
    /// Value of `key` in the final environment.
    pub fn env_var(&self, key: &[u8]) -> Option<&[u8]> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// Environment as `KEY=VALUE` C strings, ready for `envp`.
    pub fn envp(&self) -> Vec<CString> {
        envp(&self.env)
    }
}

/// `(key, value)` pairs as `KEY=VALUE` C strings, ready for `envp`. The
/// pairs must hold no NUL byte (an entry that does becomes empty).
pub fn envp(env: &[(Vec<u8>, Vec<u8>)]) -> Vec<CString> {
    env.iter()
        .map(|(k, v)| {
            let mut e = Vec::with_capacity(k.len() + v.len() + 1);
            e.extend_from_slice(k);
            e.push(b'=');
            e.extend_from_slice(v);
            CString::new(e).unwrap_or_default()
        })
        .collect()
}

/// Splits NUL-terminated entries. A trailing entry without its NUL is kept;
/// empty entries in the middle are kept (they are legitimate empty arguments).
pub fn split_nul(data: &[u8]) -> Vec<&[u8]> {
    if data.is_empty() {
        return Vec::new();
    }
    let body = data.strip_suffix(b"\0").unwrap_or(data);
    body.split(|&b| b == 0).collect()
}

/// Parses the `argv` file.
pub fn parse_argv(data: &[u8]) -> Vec<CString> {
    split_nul(data)
        .into_iter()
        // split_nul removed every NUL, so CString::new cannot fail.
        .map(|a| CString::new(a).unwrap_or_default())
        .collect()
}

/// Applies `KEY=VALUE` entries over `env`: the same key replaces its value
/// in place, new keys are appended in order; entries without `=` or with an
/// empty key are ignored (the key ends at the first `=`).
pub fn merge_env<'a>(
    env: &mut Vec<(Vec<u8>, Vec<u8>)>,
    entries: impl IntoIterator<Item = &'a [u8]>,
) {
    for entry in entries {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&entry[..eq], &entry[eq + 1..]);
        if key.is_empty() {
            continue;
        }
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_vec(),
            None => env.push((key.to_vec(), value.to_vec())),
        }
    }
}

/// Applies the `env` file over [`DEFAULT_ENV`].
pub fn parse_env(data: Option<&[u8]>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = DEFAULT_ENV
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    merge_env(&mut env, data.map(split_nul).unwrap_or_default());
    env
}

/// Parses the `workdir` file.
pub fn parse_workdir(data: Option<&[u8]>) -> Option<Vec<u8>> {
    let data = data?;
    let data = data
        .strip_suffix(b"\0")
        .or_else(|| data.strip_suffix(b"\n"))
        .unwrap_or(data);
    (!data.is_empty()).then(|| data.to_vec())
}

/// Parses the `root` file: exactly three fields `DEVICE`, `FSTYPE`, `MODE`,
/// each terminated by a NUL byte (the last NUL may be missing, as in `argv`).
/// `MODE` is `rw` or `ro`, nothing else (no trailing newline). `DEVICE` and
/// `FSTYPE` must be non-empty and are otherwise taken as raw bytes: non-UTF-8
/// is accepted and handed to `mount(2)` unchanged (a device path is just
/// bytes; an unknown fstype is the kernel's to reject).
pub fn parse_root(data: &[u8]) -> Result<RootSpec, RootSpecError> {
    let fields = split_nul(data);
    let [device, fstype, mode] = fields[..] else {
        return Err(RootSpecError::FieldCount(fields.len()));
    };
    if device.is_empty() {
        return Err(RootSpecError::EmptyDevice);
    }
    let shown = String::from_utf8_lossy(device).into_owned();
    if fstype.is_empty() {
        return Err(RootSpecError::EmptyFstype(shown));
    }
    let read_only = match mode {
        b"rw" => false,
        b"ro" => true,
        _ => {
            return Err(RootSpecError::BadMode(
                shown,
                String::from_utf8_lossy(mode).into_owned(),
            ))
        }
    };
    // split_nul removed every NUL, so CString::new cannot fail.
    Ok(RootSpec {
        device: CString::new(device).unwrap_or_default(),
        fstype: CString::new(fstype).unwrap_or_default(),
        read_only,
    })
}

/// Builds a [`Spec`] from the raw file contents (`None` = file absent). The
/// `root` file is parsed separately ([`parse_root`]) because it can fail.
pub fn parse(argv: Option<&[u8]>, env: Option<&[u8]>, workdir: Option<&[u8]>) -> Spec {
    Spec {
        argv: argv.map(parse_argv).unwrap_or_default(),
        env: parse_env(env),
        workdir: parse_workdir(workdir),
        root: None,
        agent: false,
    }
}

/// Reads `file` if it exists.
fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads and parses the spec under `dir` (normally [`SPEC_DIR`]). The error
/// names the file that could not be read.
pub fn read(dir: &Path) -> Result<Spec, (String, io::Error)> {
    let load = |name: &str| {
        let p = dir.join(name);
        read_optional(&p).map_err(|e| (format!("reading {}", p.display()), e))
    };
    let argv = load("argv")?;
    let env = load("env")?;
    let workdir = load("workdir")?;
    let agent = load("agent")?.is_some();
    let root = match load("root")? {
        Some(data) => Some(parse_root(&data).map_err(|e| {
            (
                format!("bad {}", dir.join("root").display()),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?),
        None => None,
    };
    Ok(Spec {
        root,
        agent,
        ..parse(argv.as_deref(), env.as_deref(), workdir.as_deref())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn split_handles_terminators() {
        assert!(split_nul(b"").is_empty());
        assert_eq!(split_nul(b"\0"), vec![b"" as &[u8]]);
        assert_eq!(split_nul(b"a\0b\0"), vec![b"a" as &[u8], b"b"]);
        assert_eq!(split_nul(b"a\0b"), vec![b"a" as &[u8], b"b"]);
        assert_eq!(split_nul(b"a\0\0b\0"), vec![b"a" as &[u8], b"", b"b"]);
    }

    #[test]
    fn argv_is_binary_safe() {
        let argv = parse_argv(b"echo\0hello world\0\xff\n'\"$x\0\0");
        assert_eq!(
            argv,
            vec![
                cs("echo"),
                cs("hello world"),
                CString::new(b"\xff\n'\"$x".to_vec()).unwrap(),
                cs("")
            ]
        );
    }

    #[test]
    fn absent_or_empty_argv_means_interactive() {
        assert!(parse(None, None, None).argv.is_empty());
        assert!(parse(Some(b""), None, None).argv.is_empty());
    }

    #[test]
    fn default_env() {
        let s = parse(Some(b"true\0"), None, None);
        assert_eq!(
            s.env_var(b"PATH"),
            Some(&b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"[..])
        );
        assert_eq!(s.env_var(b"HOME"), Some(&b"/root"[..]));
        assert_eq!(s.env_var(b"TERM"), Some(&b"linux"[..]));
        assert_eq!(s.env.len(), 3);
    }

    #[test]
    fn env_overrides_and_appends() {
        let s = parse(
            None,
            Some(b"HOME=/home/x\0FOO=a=b\0NOEQ\0=v\0EMPTY=\0HOME=/final\0"),
            None,
        );
        assert_eq!(s.env_var(b"HOME"), Some(&b"/final"[..]));
        assert_eq!(s.env_var(b"FOO"), Some(&b"a=b"[..]));
        assert_eq!(s.env_var(b"EMPTY"), Some(&b""[..]));
        assert_eq!(s.env_var(b"NOEQ"), None);
        assert_eq!(s.env.len(), 5);
        // Defaults keep their position; new keys follow in order.
        assert_eq!(s.env[0].0, b"PATH");
        assert_eq!(s.env[3].0, b"FOO");
        assert_eq!(
            s.envp()[1..],
            [
                cs("HOME=/final"),
                cs("TERM=linux"),
                cs("FOO=a=b"),
                cs("EMPTY=")
            ]
        );
    }

    #[test]
    fn workdir_parsing() {
        assert_eq!(parse_workdir(None), None);
        assert_eq!(parse_workdir(Some(b"")), None);
        assert_eq!(parse_workdir(Some(b"\0")), None);
        assert_eq!(parse_workdir(Some(b"/srv\0")), Some(b"/srv".to_vec()));
        assert_eq!(parse_workdir(Some(b"/srv\n")), Some(b"/srv".to_vec()));
        assert_eq!(parse_workdir(Some(b"/a b")), Some(b"/a b".to_vec()));
    }

    #[test]
    fn read_from_directory() {
        let dir = std::env::temp_dir().join(format!("locald-init-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = read(&dir).unwrap();
        assert!(s.argv.is_empty() && s.workdir.is_none());
        std::fs::write(dir.join("argv"), b"ls\0-l\0").unwrap();
        std::fs::write(dir.join("workdir"), b"/tmp").unwrap();
        let s = read(&dir).unwrap();
        assert_eq!(s.argv, vec![cs("ls"), cs("-l")]);
        assert_eq!(s.workdir.as_deref(), Some(&b"/tmp"[..]));
        assert_eq!(s.root, None);
        assert!(!s.agent);
        std::fs::write(dir.join("agent"), b"").unwrap();
        assert!(read(&dir).unwrap().agent, "content ignored, even empty");
        std::fs::remove_file(dir.join("agent")).unwrap();
        std::fs::write(dir.join("root"), b"/dev/vda\0ext4\0ro\0").unwrap();
        let s = read(&dir).unwrap();
        assert_eq!(
            s.root,
            Some(RootSpec {
                device: cs("/dev/vda"),
                fstype: cs("ext4"),
                read_only: true
            })
        );
        std::fs::write(dir.join("root"), b"/dev/vda\0ext4\0rx\0").unwrap();
        let (what, e) = read(&dir).unwrap_err();
        assert_eq!(
            crate::console::format(&what, &e),
            format!(
                "locald-init: bad {}: MODE for /dev/vda must be 'rw' or 'ro', got 'rx'\n",
                dir.join("root").display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn root(device: &str, fstype: &str, read_only: bool) -> RootSpec {
        RootSpec {
            device: cs(device),
            fstype: cs(fstype),
            read_only,
        }
    }

    #[test]
    fn root_spec_good() {
        assert_eq!(
            parse_root(b"/dev/vda\0ext4\0rw\0"),
            Ok(root("/dev/vda", "ext4", false))
        );
        assert_eq!(
            parse_root(b"/dev/vdb\0xfs\0ro\0"),
            Ok(root("/dev/vdb", "xfs", true))
        );
        // The last NUL may be missing (as in argv).
        assert_eq!(
            parse_root(b"/dev/vda\0ext4\0ro"),
            Ok(root("/dev/vda", "ext4", true))
        );
    }

    #[test]
    fn root_spec_missing_or_extra_fields() {
        use RootSpecError::*;
        assert_eq!(parse_root(b""), Err(FieldCount(0)));
        assert_eq!(parse_root(b"/dev/vda\0"), Err(FieldCount(1)));
        assert_eq!(parse_root(b"/dev/vda\0ext4\0"), Err(FieldCount(2)));
        assert_eq!(parse_root(b"/dev/vda ext4 rw\n"), Err(FieldCount(1)));
        assert_eq!(parse_root(b"/dev/vda\0ext4\0rw\0\0"), Err(FieldCount(4)));
        assert_eq!(
            parse_root(b"/dev/vda\0ext4\0rw\0noatime\0"),
            Err(FieldCount(4))
        );
        assert_eq!(parse_root(b"\0ext4\0rw\0"), Err(EmptyDevice));
        assert_eq!(
            parse_root(b"/dev/vda\0\0rw\0"),
            Err(EmptyFstype("/dev/vda".into()))
        );
    }

    #[test]
    fn root_spec_bad_mode() {
        use RootSpecError::BadMode;
        for mode in [&b""[..], b"RW", b"rw\n", b" ro", b"readonly", b"r\xffo"] {
            let mut data = b"/dev/vda\0ext4\0".to_vec();
            data.extend_from_slice(mode);
            data.push(0);
            assert!(
                matches!(parse_root(&data), Err(BadMode(d, _)) if d == "/dev/vda"),
                "{mode:?}"
            );
        }
        assert_eq!(
            parse_root(b"/dev/vda\0ext4\0rx\0").unwrap_err().to_string(),
            "MODE for /dev/vda must be 'rw' or 'ro', got 'rx'"
        );
    }

    #[test]
    fn root_spec_non_utf8_device_and_fstype_tolerated() {
        let spec = parse_root(b"/dev/disk/by-label/\xe9t\xe9\0ext\xff\0rw\0").unwrap();
        assert_eq!(spec.device.as_bytes(), b"/dev/disk/by-label/\xe9t\xe9");
        assert_eq!(spec.fstype.as_bytes(), b"ext\xff");
        assert!(!spec.read_only);
        // Shown lossily in messages.
        assert_eq!(
            parse_root(b"/dev/\xff\0ext4\0xx").unwrap_err().to_string(),
            "MODE for /dev/\u{fffd} must be 'rw' or 'ro', got 'xx'"
        );
    }
}
