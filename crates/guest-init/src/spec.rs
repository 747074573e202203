//! Command specification: the guest init's view of the files the VMM
//! places under `/.locald/` (formats and their decoders live in
//! `locald-guest-spec`, shared with `locald_vmm::assets::command_archive`).
//!
//! Runs on init's only thread. Here: the default environment the `env` file
//! is applied over ([`DEFAULT_ENV`]: same key replaces, new keys are
//! appended in order), conversion to C strings for `posix_spawn`, and
//! [`read`], which loads `argv`, `env`, `workdir`, `agent` and `root` (a bad
//! `root` is fatal). `shares`, `net` and `rosetta` are read by their own
//! modules, which decide how fatal a bad file is.

use std::ffi::CString;
use std::io;
use std::path::Path;

use locald_guest_spec::SpecFile;
pub use locald_guest_spec::{split_nul, RootSpec, SPEC_DIR};

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

/// Parses the `argv` file.
pub fn parse_argv(data: &[u8]) -> Vec<CString> {
    locald_guest_spec::argv::decode(data)
        .into_iter()
        // The decoder split on NUL, so CString::new cannot fail.
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
    for (key, value) in entries
        .into_iter()
        .filter_map(locald_guest_spec::env::entry)
    {
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
    let entries = data.map(split_nul).unwrap_or_default();
    merge_env(&mut env, entries);
    env
}

/// Parses the `workdir` file.
pub fn parse_workdir(data: Option<&[u8]>) -> Option<Vec<u8>> {
    locald_guest_spec::workdir::decode(data?)
}

/// Builds a [`Spec`] from the raw file contents (`None` = file absent). The
/// `root` file is parsed separately ([`RootSpec::decode`]) because it can fail.
pub fn parse(argv: Option<&[u8]>, env: Option<&[u8]>, workdir: Option<&[u8]>) -> Spec {
    Spec {
        argv: argv.map(parse_argv).unwrap_or_default(),
        env: parse_env(env),
        workdir: parse_workdir(workdir),
        root: None,
        agent: false,
    }
}

/// Reads and parses the spec under `dir` (normally [`SPEC_DIR`]). The error
/// names the file that could not be read.
pub fn read(dir: &Path) -> Result<Spec, (String, io::Error)> {
    let load = |file: SpecFile| {
        locald_guest_spec::read_file(dir, file)
            .map_err(|e| (format!("reading {}", dir.join(file.name()).display()), e))
    };
    let argv = load(SpecFile::Argv)?;
    let env = load(SpecFile::Env)?;
    let workdir = load(SpecFile::Workdir)?;
    let agent = load(SpecFile::Agent)?.is_some();
    let root = match load(SpecFile::Root)? {
        Some(data) => Some(RootSpec::decode(&data).map_err(|e| {
            (
                format!("bad {}", dir.join(SpecFile::Root.name()).display()),
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
                device: b"/dev/vda".to_vec(),
                fstype: b"ext4".to_vec(),
                read_only: true,
                overlay: false,
            })
        );
        std::fs::write(dir.join("root"), b"/dev/vda\0ext4\0rx\0").unwrap();
        let (what, e) = read(&dir).unwrap_err();
        assert_eq!(
            crate::console::format(&what, &e),
            format!(
                "locald-init: bad {}: MODE for /dev/vda must be 'rw' or 'ro', optionally followed by '+overlay', got 'rx'\n",
                dir.join("root").display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
