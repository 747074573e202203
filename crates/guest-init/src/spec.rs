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
}

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
        self.env
            .iter()
            .map(|(k, v)| {
                let mut e = Vec::with_capacity(k.len() + v.len() + 1);
                e.extend_from_slice(k);
                e.push(b'=');
                e.extend_from_slice(v);
                // Entries come from NUL-split data, so they hold no NUL.
                CString::new(e).unwrap_or_default()
            })
            .collect()
    }
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

/// Applies the `env` file over [`DEFAULT_ENV`].
pub fn parse_env(data: Option<&[u8]>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = DEFAULT_ENV
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    for entry in data.map(split_nul).unwrap_or_default() {
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

/// Builds a [`Spec`] from the raw file contents (`None` = file absent).
pub fn parse(argv: Option<&[u8]>, env: Option<&[u8]>, workdir: Option<&[u8]>) -> Spec {
    Spec {
        argv: argv.map(parse_argv).unwrap_or_default(),
        env: parse_env(env),
        workdir: parse_workdir(workdir),
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
    Ok(parse(argv.as_deref(), env.as_deref(), workdir.as_deref()))
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
