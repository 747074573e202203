//! The `debugfs` command file that applies the metadata table inside the
//! image: pure text generation, no I/O. Used on the builder's (the
//! caller's) thread.
//!
//! How debugfs 1.47.0 reads a command file (`debugfs -f FILE`), checked
//! against its source and by experiment (`tests` below and
//! `crates/image/tests/rootfs.rs`):
//!
//! - `fgets` into a `BUFSIZ` (8192-byte) buffer: a line of 8192 bytes or
//!   more is cut in two commands. Every line we write is at most
//!   [`MAX_LINE`] bytes, newline included, or the path is an error.
//! - The first `\n` and then the first `\r` end the line: a name holding
//!   either cannot be expressed at all, and is an error
//!   ([`EntryProblem::Unexpressible`]), never a misapplied command.
//! - A line starting with `#` is a comment, one starting with `!` a shell
//!   escape: every line we write starts with a command name.
//! - Arguments are split by `ss_parse` (libss): spaces and tabs separate,
//!   `"` opens a quoted string in which everything is literal except `""`,
//!   which stands for one `"`; there is no backslash escape. We quote
//!   every path and name: `"` + bytes with `"` doubled + `"`. Any other
//!   byte, non-UTF-8 included, passes unchanged.
//! - Path arguments go through `string_to_inode`: `<N>` would be inode N,
//!   so paths are always absolute (`/…`, which is never `<…>`), and a
//!   leading `-` (getopt) cannot occur either. `mknod`, `mkdir` and `rm`
//!   take a name relative to the current directory (`mknod "/a/b"` makes
//!   an entry literally named `/a/b`), so they are preceded by
//!   `cd "/parent"`.
//! - Commands report failures only on stderr (the exit status stays 0):
//!   the builder treats any stderr line but the version banner as an
//!   error.

use super::{EntryProblem, Ext4Error};

/// Longest line we write, newline included (`BUFSIZ` − 1).
pub const MAX_LINE: usize = 8191;

/// One argument of a command line.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    /// Written as is: command names, field names, numbers (our own text,
    /// never image data).
    Word(&'a str),
    /// Image data (paths, names): written quoted.
    Quoted(&'a [u8]),
}

/// `arg` quoted for libss, or `None` if it holds a byte no command file
/// can carry (`\n`, `\r`, NUL).
pub fn quote(arg: &[u8]) -> Option<Vec<u8>> {
    if arg.iter().any(|&c| matches!(c, b'\n' | b'\r' | 0)) {
        return None;
    }
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(b'"');
    for &c in arg {
        if c == b'"' {
            out.push(b'"');
        }
        out.push(c);
    }
    out.push(b'"');
    Some(out)
}

/// The command file being written.
#[derive(Default, Debug)]
pub struct Script {
    text: Vec<u8>,
    lines: u64,
}

impl Script {
    /// Appends one command. `path` is the image path the line is about
    /// (canonical, no leading `/`), named in the error.
    pub fn line(&mut self, path: &[u8], args: &[Arg<'_>]) -> Result<(), Ext4Error> {
        let mut line = Vec::new();
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                line.push(b' ');
            }
            match a {
                Arg::Word(w) => line.extend_from_slice(w.as_bytes()),
                Arg::Quoted(b) => {
                    let q = quote(b).ok_or_else(|| entry(path, EntryProblem::Unexpressible))?;
                    line.extend_from_slice(&q);
                }
            }
        }
        line.push(b'\n');
        if line.len() > MAX_LINE {
            return Err(entry(path, EntryProblem::LineTooLong { max: MAX_LINE }));
        }
        self.text.extend_from_slice(&line);
        self.lines += 1;
        Ok(())
    }

    /// The file's bytes.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// Number of commands.
    pub fn lines(&self) -> u64 {
        self.lines
    }
}

/// Room a path leaves on its longest `set_inode_field` line
/// (`set_inode_field "PATH" mtime_extra 4294967295\n`), with margin.
const SIF_OVERHEAD: usize = 64;

/// Checks that every command about `path` can be written, whether or not
/// the builder ends up needing one (so the result does not depend on the
/// host user running the build).
pub fn check_path(path: &[u8]) -> Result<(), Ext4Error> {
    let q = quote(&abs(path)).ok_or_else(|| entry(path, EntryProblem::Unexpressible))?;
    if q.len() + SIF_OVERHEAD > MAX_LINE {
        return Err(entry(path, EntryProblem::LineTooLong { max: MAX_LINE }));
    }
    Ok(())
}

/// The error for image path `path` (canonical form).
pub fn entry(path: &[u8], problem: EntryProblem) -> Ext4Error {
    Ext4Error::Entry {
        path: display_path(path),
        problem,
    }
}

/// `/` + the canonical path, for messages (invalid UTF-8 as U+FFFD,
/// control characters escaped).
pub fn display_path(path: &[u8]) -> String {
    let mut s = String::from("/");
    for c in String::from_utf8_lossy(path).chars() {
        if c.is_control() {
            s.extend(c.escape_default());
        } else {
            s.push(c);
        }
    }
    s
}

/// `/` + `path`: the absolute form debugfs path arguments need.
pub fn abs(path: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(path.len() + 1);
    v.push(b'/');
    v.extend_from_slice(path);
    v
}

/// (parent as an absolute path, last component) of a canonical path
/// (not the root).
pub fn split_parent(path: &[u8]) -> (Vec<u8>, &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (abs(&path[..i]), &path[i + 1..]),
        None => (b"/".to_vec(), path),
    }
}

/// `(i_mtime, i_mtime_extra)` for `secs`: the low 32 bits, and the epoch
/// bits that ext4 adds to their signed value (nanoseconds zero). `secs`
/// is clamped to ext4's range (up to 2446-05-10).
pub fn ext4_time(secs: u64) -> (u64, u32) {
    let t = secs.min(MAX_EXT4_TIME) as i64;
    let low = t as u32;
    let epoch = ((t - i64::from(low as i32)) >> 32) as u32 & 3;
    (t as u64, epoch)
}

/// Latest time ext4 can store with 256-byte inodes.
pub const MAX_EXT4_TIME: u64 = 0x3_7fff_ffff;

/// `(i_block[0], i_block[1])` of a device node, as the kernel encodes
/// `rdev` (`old_encode_dev` when both numbers fit in 8 bits, else
/// `new_encode_dev` in `i_block[1]`). `None` out of range (major above
/// 4095, minor above 2^20 − 1).
pub fn device_blocks(major: u32, minor: u32) -> Option<(u32, u32)> {
    if major > 0xfff || minor > 0xf_ffff {
        return None;
    }
    if major < 256 && minor < 256 {
        Some((major << 8 | minor, 0))
    } else {
        Some((0, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote(b"/a").unwrap(), b"\"/a\"");
        assert_eq!(quote(b"/a b\tc").unwrap(), b"\"/a b\tc\"");
        assert_eq!(quote(b"/q\"x\"\"").unwrap(), b"\"/q\"\"x\"\"\"\"\"");
        assert_eq!(quote(b"").unwrap(), b"\"\"");
        assert_eq!(quote(b"/\xff\xfe!#<1>").unwrap(), b"\"/\xff\xfe!#<1>\"");
        assert_eq!(quote(b"/a\nb"), None);
        assert_eq!(quote(b"/a\rb"), None);
        assert_eq!(quote(b"/a\0b"), None);
    }

    #[test]
    fn lines_and_errors() {
        let mut s = Script::default();
        s.line(
            b"a b",
            &[
                Arg::Word("set_inode_field"),
                Arg::Quoted(b"/a b"),
                Arg::Word("uid"),
                Arg::Word("0"),
            ],
        )
        .unwrap();
        assert_eq!(s.text(), b"set_inode_field \"/a b\" uid 0\n");
        assert_eq!(s.lines(), 1);
        let e = s
            .line(b"x\ny", &[Arg::Word("rm"), Arg::Quoted(b"x\ny")])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "image path /x\\ny: its name holds a newline or carriage return, which a debugfs command file cannot express"
        );
        // Nothing of a refused line is written.
        assert_eq!(s.lines(), 1);
        let long = vec![b'"'; 4096];
        let e = s
            .line(&long, &[Arg::Word("rm"), Arg::Quoted(&long)])
            .unwrap_err();
        assert!(matches!(
            e,
            Ext4Error::Entry {
                problem: EntryProblem::LineTooLong { .. },
                ..
            }
        ));
        assert_eq!(s.text(), b"set_inode_field \"/a b\" uid 0\n");
    }

    #[test]
    fn path_checks() {
        check_path(b"a b\"c").unwrap();
        assert!(check_path(b"a\nb").is_err());
        assert!(check_path(b"a\rb").is_err());
        check_path(&[b'x'; 4096]).unwrap();
        assert!(check_path(&[b'"'; 4096]).is_err(), "8 KiB once quoted");
    }

    #[test]
    fn parents() {
        assert_eq!(split_parent(b"a"), (b"/".to_vec(), &b"a"[..]));
        assert_eq!(split_parent(b"a/b c/d"), (b"/a/b c".to_vec(), &b"d"[..]));
        assert_eq!(abs(b""), b"/");
    }

    #[test]
    fn times() {
        assert_eq!(ext4_time(0), (0, 0));
        assert_eq!(ext4_time(1_700_000_000), (1_700_000_000, 0));
        assert_eq!(ext4_time(0x7fff_ffff), (0x7fff_ffff, 0));
        // 2100-01-01: the low word is negative as i32, epoch 1.
        assert_eq!(ext4_time(4_102_444_800), (4_102_444_800, 1));
        assert_eq!(ext4_time(0x1_0000_0000), (0x1_0000_0000, 1));
        assert_eq!(ext4_time(0x1_8000_0000), (0x1_8000_0000, 2));
        assert_eq!(ext4_time(MAX_EXT4_TIME), (MAX_EXT4_TIME, 3));
        assert_eq!(ext4_time(u64::MAX), (MAX_EXT4_TIME, 3));
        // Decoding as ext4 does gives the time back.
        for t in [
            0u64,
            5,
            0x7fff_ffff,
            0x8000_0000,
            4_102_444_800,
            MAX_EXT4_TIME,
        ] {
            let (v, e) = ext4_time(t);
            let decoded = i64::from(v as u32 as i32) + (i64::from(e) << 32);
            assert_eq!(decoded as u64, t);
        }
    }

    #[test]
    fn device_numbers() {
        assert_eq!(device_blocks(1, 3), Some((0x103, 0)));
        assert_eq!(device_blocks(0, 0), Some((0, 0)));
        assert_eq!(device_blocks(255, 255), Some((0xffff, 0)));
        assert_eq!(device_blocks(256, 0), Some((0, 0x10000)));
        assert_eq!(device_blocks(8, 256), Some((0, 0x800 | (0x100 << 12))));
        assert_eq!(
            device_blocks(4095, 0xf_ffff),
            Some((0, 0xff | (4095 << 8) | (0xf_ff00 << 12)))
        );
        assert_eq!(device_blocks(4096, 0), None);
        assert_eq!(device_blocks(0, 0x10_0000), None);
        // The kernel's new_decode_dev gives the numbers back.
        for (ma, mi) in [(256u32, 0u32), (8, 256), (300, 70_000), (4095, 0xf_ffff)] {
            let (_, d) = device_blocks(ma, mi).unwrap();
            assert_eq!(
                ((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00)),
                (ma, mi)
            );
        }
    }
}
