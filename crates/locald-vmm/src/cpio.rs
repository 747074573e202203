//! Builder for newc ("070701") cpio archives, the format Linux unpacks as an
//! initramfs. Pure: no I/O, the archive is assembled in memory.
//!
//! Runs on the caller's thread (asset preparation, before the VM starts).
//!
//! Properties of the output:
//! - reproducible: mtime, uid, gid and device numbers are 0; inode numbers are
//!   assigned 1, 2, 3, ... in insertion order; directories have nlink 2,
//!   everything else nlink 1 (no hard links);
//! - header+name and file data are each padded to 4 bytes, and the archive
//!   ends with a `TRAILER!!!` entry, so the total is a multiple of 4 and
//!   several archives can be concatenated into one initrd (the kernel unpacks
//!   them in order; later entries replace earlier ones);
//! - entries are written in insertion order. The kernel does not create
//!   parent directories, so add a directory before anything inside it.
//!
//! Paths are UTF-8 `&str` (the API type); a leading `/` is stripped, since
//! archive names are relative to the initramfs root. A path must be non-empty,
//! must not contain NUL and must be shorter than `PATH_MAX` (4096) bytes.

use thiserror::Error;

/// Magic of the "new ASCII" format without checksums.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Name of the final entry.
pub const TRAILER: &str = "TRAILER!!!";
/// Length of a newc header (magic + 13 eight-digit hex fields).
pub const HEADER_LEN: usize = 110;
/// Longest accepted path in bytes, excluding the terminating NUL.
pub const MAX_PATH_LEN: usize = 4095;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const PERM_MASK: u32 = 0o7777;

/// Errors from [`CpioBuilder`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpioError {
    /// Empty path (or only slashes).
    #[error("cpio entry has an empty path")]
    EmptyPath,
    /// The path contains a NUL byte.
    #[error("cpio entry path {path:?} contains a NUL byte")]
    NulInPath {
        /// Offending path.
        path: String,
    },
    /// The path is too long for the kernel's unpacker.
    #[error("cpio entry path is {len} bytes long (max {MAX_PATH_LEN}): {prefix}...")]
    NameTooLong {
        /// Path length in bytes.
        len: usize,
        /// First characters of the path.
        prefix: String,
    },
    /// The file does not fit the 32-bit size field.
    #[error("cpio file {path:?} is {size} bytes, over the 4 GiB newc limit")]
    FileTooLarge {
        /// Offending path.
        path: String,
        /// Its size.
        size: usize,
    },
    /// Mode bits outside permissions/setuid/setgid/sticky (`0o7777`).
    #[error("cpio entry {path:?}: mode {mode:#o} has bits outside 0o7777")]
    InvalidMode {
        /// Offending path.
        path: String,
        /// Mode given.
        mode: u32,
    },
    /// The symlink target is empty, too long or contains NUL.
    #[error("cpio symlink {path:?}: invalid target {target:?} (empty, too long or contains NUL)")]
    InvalidLinkTarget {
        /// Offending path.
        path: String,
        /// Target given.
        target: String,
    },
}

/// Incremental newc archive writer. See the module docs.
#[derive(Debug, Clone)]
pub struct CpioBuilder {
    out: Vec<u8>,
    next_ino: u32,
}

impl Default for CpioBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Fields of one header that vary between entries.
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &'a [u8],
    ino: u32,
}

impl CpioBuilder {
    /// Empty archive.
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, CpioError> {
        let name = check_path(path)?;
        let mode = check_mode(path, mode)?;
        self.push(name, S_IFDIR | mode, 2, (0, 0), b"")
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<&mut Self, CpioError> {
        let name = check_path(path)?;
        let mode = check_mode(path, mode)?;
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::FileTooLarge {
                path: path.to_owned(),
                size: data.len(),
            });
        }
        self.push(name, S_IFREG | mode, 1, (0, 0), data)
    }

    /// Adds a symbolic link `path` → `target` (mode 0o777).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, CpioError> {
        let name = check_path(path)?;
        if target.is_empty() || target.contains('\0') || target.len() > MAX_PATH_LEN {
            return Err(CpioError::InvalidLinkTarget {
                path: path.to_owned(),
                target: target.to_owned(),
            });
        }
        self.push(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, CpioError> {
        let name = check_path(path)?;
        let mode = check_mode(path, mode)?;
        self.push(name, S_IFCHR | mode, 1, (major, minor), b"")
    }

    /// Appends the trailer and returns the archive bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.write_entry(&Entry {
            name: TRAILER,
            mode: 0,
            nlink: 1,
            rdev: (0, 0),
            data: b"",
            ino: 0,
        });
        debug_assert_eq!(self.out.len() % 4, 0);
        self.out
    }

    fn push(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<&mut Self, CpioError> {
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        self.write_entry(&Entry {
            name,
            mode,
            nlink,
            rdev,
            data,
            ino,
        });
        Ok(self)
    }

    fn write_entry(&mut self, e: &Entry<'_>) {
        // Callers validated sizes: name < PATH_MAX, data < 4 GiB.
        let namesize = e.name.len() as u32 + 1;
        let filesize = e.data.len() as u32;
        let fields: [u32; 13] = [
            e.ino, e.mode, 0, // uid
            0, // gid
            e.nlink, 0, // mtime
            filesize, 0, // devmajor
            0, // devminor
            e.rdev.0, e.rdev.1, namesize, 0, // check
        ];
        self.out.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(e.name.as_bytes());
        self.out.push(0);
        pad4(&mut self.out);
        self.out.extend_from_slice(e.data);
        pad4(&mut self.out);
    }
}

fn pad4(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(4), 0);
}

fn check_path(path: &str) -> Result<&str, CpioError> {
    let name = path.trim_start_matches('/');
    if name.is_empty() {
        return Err(CpioError::EmptyPath);
    }
    if name.contains('\0') {
        return Err(CpioError::NulInPath {
            path: path.to_owned(),
        });
    }
    if name.len() > MAX_PATH_LEN {
        return Err(CpioError::NameTooLong {
            len: name.len(),
            prefix: name.chars().take(40).collect(),
        });
    }
    Ok(name)
}

fn check_mode(path: &str, mode: u32) -> Result<u32, CpioError> {
    if mode & !PERM_MASK != 0 {
        return Err(CpioError::InvalidMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(mode)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    /// One parsed entry (test-side, independent parser).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Parsed {
        pub name: String,
        pub ino: u32,
        pub mode: u32,
        pub nlink: u32,
        pub mtime: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    /// Minimal newc parser written against the format description, not the
    /// builder. Parses a single archive up to (excluding) its trailer and
    /// returns the entries plus the number of bytes consumed.
    pub(crate) fn parse_one(buf: &[u8]) -> (Vec<Parsed>, usize) {
        let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let align = |x: usize| (x + 3) & !3;
        let mut pos = 0;
        let mut out = Vec::new();
        loop {
            let h = &buf[pos..pos + 110];
            assert_eq!(&h[..6], b"070701", "bad magic at {pos}");
            let f = |i: usize| hex(&h[6 + i * 8..14 + i * 8]);
            let (namesize, filesize) = (f(11) as usize, f(6) as usize);
            let name_start = pos + 110;
            let name = &buf[name_start..name_start + namesize];
            assert_eq!(*name.last().unwrap(), 0, "name not NUL-terminated");
            let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
            let data_start = align(name_start + namesize);
            let data = buf[data_start..data_start + filesize].to_vec();
            pos = align(data_start + filesize);
            if name == "TRAILER!!!" {
                return (out, pos);
            }
            assert_eq!(f(2), 0, "uid");
            assert_eq!(f(3), 0, "gid");
            out.push(Parsed {
                name,
                ino: f(0),
                mode: f(1),
                nlink: f(4),
                mtime: f(5),
                rdev: (f(9), f(10)),
                data,
            });
        }
    }

    /// Parses concatenated archives (skipping zero padding in between, like
    /// the kernel does).
    pub(crate) fn parse_all(mut buf: &[u8]) -> Vec<Vec<Parsed>> {
        let mut archives = Vec::new();
        while !buf.is_empty() {
            if buf[0] == 0 {
                buf = &buf[1..];
                continue;
            }
            let (entries, used) = parse_one(buf);
            archives.push(entries);
            buf = &buf[used..];
        }
        archives
    }

    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let d =
            std::env::temp_dir().join(format!("locald-vmm-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs host `cpio` with `args` in `dir`, feeding `archive` on stdin.
    pub(crate) fn host_cpio(dir: &Path, args: &[&str], archive: &[u8]) -> String {
        use std::io::Write;
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("host cpio installed");
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn sample() -> Vec<u8> {
        let mut b = CpioBuilder::new();
        b.dir("/bin", 0o755)
            .unwrap()
            .dir("etc", 0o755)
            .unwrap()
            .file("/etc/hello.txt", 0o644, b"hello, world\n")
            .unwrap()
            .file("bin/tool", 0o4755, &[0u8, 1, 2, 3, 4, 255])
            .unwrap()
            .file("etc/empty", 0o600, b"")
            .unwrap()
            .symlink("bin/sh", "/bin/tool")
            .unwrap()
            .char_dev("console", 0o600, 5, 1)
            .unwrap();
        b.finish()
    }

    #[test]
    fn round_trip_own_parser() {
        let a = sample();
        assert_eq!(a.len() % 4, 0);
        let archives = parse_all(&a);
        assert_eq!(archives.len(), 1);
        let e = &archives[0];
        let names: Vec<_> = e.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "etc",
                "etc/hello.txt",
                "bin/tool",
                "etc/empty",
                "bin/sh",
                "console"
            ]
        );
        assert_eq!(e[0].mode, 0o040_755);
        assert_eq!(e[0].nlink, 2);
        assert_eq!(e[2].mode, 0o100_644);
        assert_eq!(e[2].data, b"hello, world\n");
        assert_eq!(e[3].mode, 0o104_755);
        assert_eq!(e[3].data, [0, 1, 2, 3, 4, 255]);
        assert_eq!(e[5].mode, 0o120_777);
        assert_eq!(e[5].data, b"/bin/tool");
        assert_eq!(e[6].mode, 0o020_600);
        assert_eq!(e[6].rdev, (5, 1));
        for (i, p) in e.iter().enumerate() {
            assert_eq!(p.ino, i as u32 + 1);
            assert_eq!(p.mtime, 0);
        }
    }

    #[test]
    fn reproducible() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn empty_archive_is_just_trailer() {
        let a = CpioBuilder::new().finish();
        assert_eq!(a.len(), 124); // 110 + 11 name bytes, padded to 4
        assert!(parse_all(&a)[0].is_empty());
    }

    #[test]
    fn alignment_for_every_name_and_data_length() {
        for name_len in 1..9 {
            for data_len in 0..9 {
                let name = "n".repeat(name_len);
                let data = vec![7u8; data_len];
                let mut b = CpioBuilder::new();
                b.file(&name, 0o644, &data).unwrap();
                let a = b.finish();
                assert_eq!(a.len() % 4, 0);
                let e = &parse_all(&a)[0];
                assert_eq!(
                    (e[0].name.as_str(), e[0].data.as_slice()),
                    (name.as_str(), data.as_slice())
                );
            }
        }
    }

    #[test]
    fn concatenation() {
        let mut second = CpioBuilder::new();
        second.file("etc/hello.txt", 0o644, b"replaced").unwrap();
        let mut both = sample();
        both.extend_from_slice(&second.finish());
        let archives = parse_all(&both);
        assert_eq!(archives.len(), 2);
        assert_eq!(archives[1][0].data, b"replaced");
    }

    #[test]
    fn errors() {
        let mut b = CpioBuilder::new();
        assert_eq!(b.dir("", 0o755).unwrap_err(), CpioError::EmptyPath);
        assert_eq!(b.dir("///", 0o755).unwrap_err(), CpioError::EmptyPath);
        assert!(matches!(
            b.file("a\0b", 0o644, b""),
            Err(CpioError::NulInPath { .. })
        ));
        assert!(matches!(
            b.file(&"x".repeat(4096), 0o644, b""),
            Err(CpioError::NameTooLong { len: 4096, .. })
        ));
        assert!(b.file(&"x".repeat(4095), 0o644, b"").is_ok());
        assert!(matches!(
            b.file("f", 0o100_644, b""),
            Err(CpioError::InvalidMode { .. })
        ));
        assert!(matches!(
            b.symlink("l", ""),
            Err(CpioError::InvalidLinkTarget { .. })
        ));
        assert!(matches!(
            b.char_dev("c", 0o10_000, 1, 3),
            Err(CpioError::InvalidMode { .. })
        ));
    }

    #[test]
    fn host_cpio_lists_and_extracts() {
        let a = sample();
        let dir = temp_dir("cpio");
        let listing = host_cpio(&dir, &["-t", "--quiet"], &a);
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "etc",
                "etc/hello.txt",
                "bin/tool",
                "etc/empty",
                "bin/sh",
                "console"
            ]
        );
        let verbose = host_cpio(&dir, &["-tv", "--quiet"], &a);
        assert!(
            verbose
                .lines()
                .any(|l| l.starts_with("crw-------") && l.contains("5,") && l.ends_with("console")),
            "{verbose}"
        );
        assert!(
            verbose
                .lines()
                .any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("bin/sh -> /bin/tool")),
            "{verbose}"
        );

        // Extract (device nodes need root; leave them out of the extract).
        let mut b = CpioBuilder::new();
        b.dir("bin", 0o755)
            .unwrap()
            .dir("etc", 0o755)
            .unwrap()
            .file("etc/hello.txt", 0o644, b"hello, world\n")
            .unwrap()
            .file("bin/tool", 0o755, &[0u8, 1, 2, 3, 4, 255])
            .unwrap()
            .symlink("bin/sh", "tool")
            .unwrap();
        host_cpio(
            &dir,
            &[
                "-i",
                "--quiet",
                "--make-directories",
                "--no-absolute-filenames",
            ],
            &b.finish(),
        );
        assert_eq!(
            std::fs::read(dir.join("etc/hello.txt")).unwrap(),
            b"hello, world\n"
        );
        assert_eq!(
            std::fs::read(dir.join("bin/tool")).unwrap(),
            [0, 1, 2, 3, 4, 255]
        );
        assert_eq!(
            std::fs::read_link(dir.join("bin/sh")).unwrap(),
            Path::new("tool")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
