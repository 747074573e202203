//! Docker's `User` for an OCI image root: `uid`, `uid:gid`, `name`,
//! `name:group` (and the mixed forms), resolved in the image's
//! `/etc/passwd` and `/etc/group` after the root switch. Pure functions
//! (any thread) plus [`read_db`], which reads one of the files on PID 1's
//! thread.
//!
//! The rules are runc's `user.GetExecUser`, which docker uses:
//!
//! - a user that is all digits is a uid: the first passwd entry with that
//!   uid gives its gid, home and name; with none, the uid is used as is
//!   with gid 0;
//! - otherwise it is a name: the first passwd entry with that name, or an
//!   error;
//! - an explicit group is a gid (all digits: the first group entry with
//!   that gid, or the number as is) or a name (the first group entry with
//!   that name, or an error); it replaces the primary gid and there are no
//!   supplementary groups;
//! - without an explicit group, when a passwd entry matched, the
//!   supplementary groups are the gids of the groups that list the user's
//!   name as a member;
//! - the home is the entry's home directory, `/` without one;
//! - ids above 2^31 − 1 are errors.
//!
//! Hostile files: lines are bytes; empty lines, `#` comments and lines with
//! too few fields or a non-numeric id are skipped (runc would read a bad id
//! as 0, i.e. root: we do not). [`read_db`] reads regular files only (a
//! fifo would block PID 1), at most [`MAX_DB_BYTES`].

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Largest id accepted (runc's `maxID`).
pub const MAX_ID: u64 = (1 << 31) - 1;
/// Largest passwd/group file read.
pub const MAX_DB_BYTES: u64 = 4 << 20;

/// Whom the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`setgroups`), possibly empty.
    pub groups: Vec<u32>,
    /// Home directory (`HOME` unless the environment sets it).
    pub home: Vec<u8>,
}

/// Why a `User` could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    /// A user name with no passwd entry.
    NoSuchUser(String),
    /// A group name with no group entry.
    NoSuchGroup(String),
    /// A numeric id above [`MAX_ID`].
    OutOfRange(String),
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSuchUser(u) => write!(
                f,
                "unable to find user {u}: no matching entries in /etc/passwd"
            ),
            Self::NoSuchGroup(g) => write!(
                f,
                "unable to find group {g}: no matching entries in /etc/group"
            ),
            Self::OutOfRange(id) => write!(f, "id {id} is out of range (at most {MAX_ID})"),
        }
    }
}

impl std::error::Error for UserError {}

/// One usable `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry<'a> {
    pub name: &'a [u8],
    pub uid: u32,
    pub gid: u32,
    pub home: &'a [u8],
}

/// One usable `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry<'a> {
    pub name: &'a [u8],
    pub gid: u32,
    pub members: Vec<&'a [u8]>,
}

/// `s` as an id: all ASCII digits, at most [`MAX_ID`]. `Err` holds the
/// out-of-range case, `Ok(None)` a non-number.
fn numeric(s: &[u8]) -> Result<Option<u32>, UserError> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return Ok(None);
    }
    let mut v: u64 = 0;
    for &c in s {
        v = v * 10 + u64::from(c - b'0');
        if v > MAX_ID {
            return Err(UserError::OutOfRange(lossy(s)));
        }
    }
    Ok(Some(v as u32))
}

/// A file field as an id (`None`: skip the line).
fn field_id(s: &[u8]) -> Option<u32> {
    numeric(s).ok().flatten()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn trim(mut l: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = l {
        if first.is_ascii_whitespace() {
            l = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = l {
        if last.is_ascii_whitespace() {
            l = rest;
        } else {
            break;
        }
    }
    l
}

/// The lines worth parsing: trimmed, not empty, not comments.
fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|&c| c == b'\n')
        .map(trim)
        .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
}

/// The usable entries of an `/etc/passwd` (`name:pw:uid:gid:gecos:home:shell`;
/// at least four fields).
pub fn parse_passwd(data: &[u8]) -> impl Iterator<Item = PasswdEntry<'_>> {
    lines(data).filter_map(|l| {
        let f: Vec<&[u8]> = l.split(|&c| c == b':').collect();
        if f.len() < 4 || f[0].is_empty() {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: field_id(f[2])?,
            gid: field_id(f[3])?,
            home: f.get(5).copied().unwrap_or_default(),
        })
    })
}

/// The usable entries of an `/etc/group` (`name:pw:gid:member,member`; at
/// least three fields).
pub fn parse_group(data: &[u8]) -> impl Iterator<Item = GroupEntry<'_>> {
    lines(data).filter_map(|l| {
        let f: Vec<&[u8]> = l.split(|&c| c == b':').collect();
        if f.len() < 3 || f[0].is_empty() {
            return None;
        }
        let members = f
            .get(3)
            .map(|m| {
                m.split(|&c| c == b',')
                    .map(trim)
                    .filter(|m| !m.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Some(GroupEntry {
            name: f[0],
            gid: field_id(f[2])?,
            members,
        })
    })
}

/// Resolves docker's `User` value `spec` (empty: root) against the
/// image's files (`None`: the file is missing). See the module docs.
pub fn resolve(
    spec: &[u8],
    passwd: Option<&[u8]>,
    group: Option<&[u8]>,
) -> Result<ExecUser, UserError> {
    let (user_arg, group_arg) = match spec.iter().position(|&c| c == b':') {
        Some(i) => (&spec[..i], Some(&spec[i + 1..])),
        None => (spec, None),
    };
    let group_arg = group_arg.filter(|g| !g.is_empty());
    let mut out = ExecUser {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        home: b"/".to_vec(),
    };
    let uid_arg = numeric(user_arg)?;
    let matched = passwd.and_then(|p| {
        parse_passwd(p).find(|e| match (user_arg.is_empty(), uid_arg) {
            (true, _) => e.uid == 0,
            (false, Some(uid)) => e.uid == uid,
            (false, None) => e.name == user_arg,
        })
    });
    let mut matched_name: Option<&[u8]> = None;
    match matched {
        Some(e) => {
            matched_name = Some(e.name);
            out.uid = e.uid;
            out.gid = e.gid;
            if !e.home.is_empty() {
                out.home = e.home.to_vec();
            }
        }
        None if user_arg.is_empty() => {}
        None => match uid_arg {
            Some(uid) => out.uid = uid,
            None => return Err(UserError::NoSuchUser(lossy(user_arg))),
        },
    }
    match group_arg {
        Some(g) => {
            let gid_arg = numeric(g)?;
            let found = group.and_then(|data| {
                parse_group(data).find(|e| match gid_arg {
                    Some(gid) => e.gid == gid,
                    None => e.name == g,
                })
            });
            out.gid = match (found, gid_arg) {
                (Some(e), _) => e.gid,
                (None, Some(gid)) => gid,
                (None, None) => return Err(UserError::NoSuchGroup(lossy(g))),
            };
        }
        None => {
            if let (Some(name), Some(data)) = (matched_name, group) {
                out.groups = parse_group(data)
                    .filter(|e| e.members.contains(&name))
                    .map(|e| e.gid)
                    .collect();
            }
        }
    }
    Ok(out)
}

/// Reads `path` if it is a regular file (`Ok(None)` when missing), at
/// most [`MAX_DB_BYTES`]. Opened with `O_NONBLOCK` so that a fifo cannot
/// block PID 1, then checked to be a regular file.
pub fn read_db(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut data = Vec::new();
    f.take(MAX_DB_BYTES).read_to_end(&mut data)?;
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        # a comment\n\
        \n\
        app:x:1000:1000:App,,,:/home/app:/bin/sh\n\
        dup:x:1000:5:first match wins by uid:/dup:/bin/sh\n\
        nohome:x:1001:1001\n\
        emptyhome:x:1002:1002::\n";
    const GROUP: &[u8] = b"root:x:0:\n\
        wheel:x:10:root,app\n\
        app:x:1000:\n\
        docker:x:999: app , other\n\
        staff:x:50:\n";

    fn user(uid: u32, gid: u32, groups: &[u32], home: &str) -> ExecUser {
        ExecUser {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.as_bytes().to_vec(),
        }
    }

    fn r(spec: &str) -> Result<ExecUser, UserError> {
        resolve(spec.as_bytes(), Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn default_is_root_with_its_groups() {
        assert_eq!(r(""), Ok(user(0, 0, &[10], "/root")));
        // scratch image: no files at all.
        assert_eq!(resolve(b"", None, None), Ok(user(0, 0, &[], "/")));
    }

    #[test]
    fn names() {
        assert_eq!(r("app"), Ok(user(1000, 1000, &[10, 999], "/home/app")));
        assert_eq!(r("daemon"), Ok(user(1, 1, &[], "/usr/sbin")));
        assert_eq!(r("nohome"), Ok(user(1001, 1001, &[], "/")));
        assert_eq!(r("emptyhome"), Ok(user(1002, 1002, &[], "/")));
        assert_eq!(r("nobody"), Err(UserError::NoSuchUser("nobody".into())));
        assert_eq!(
            resolve(b"app", None, None),
            Err(UserError::NoSuchUser("app".into()))
        );
    }

    #[test]
    fn numeric_users() {
        // Known uid: the first entry with it.
        assert_eq!(r("1000"), Ok(user(1000, 1000, &[10, 999], "/home/app")));
        // Unknown uid: as is, gid 0, no groups.
        assert_eq!(r("4242"), Ok(user(4242, 0, &[], "/")));
        assert_eq!(resolve(b"65534", None, None), Ok(user(65534, 0, &[], "/")));
        assert_eq!(r("2147483647"), Ok(user(2_147_483_647, 0, &[], "/")));
        assert_eq!(
            r("2147483648"),
            Err(UserError::OutOfRange("2147483648".into()))
        );
        assert_eq!(
            r("99999999999999999999999"),
            Err(UserError::OutOfRange("99999999999999999999999".into()))
        );
        // Not all digits: a name.
        assert_eq!(r("-1"), Err(UserError::NoSuchUser("-1".into())));
        assert_eq!(r("+5"), Err(UserError::NoSuchUser("+5".into())));
    }

    #[test]
    fn explicit_groups() {
        assert_eq!(r("app:staff"), Ok(user(1000, 50, &[], "/home/app")));
        assert_eq!(r("app:50"), Ok(user(1000, 50, &[], "/home/app")));
        assert_eq!(r("app:7777"), Ok(user(1000, 7777, &[], "/home/app")));
        assert_eq!(r("1000:1000"), Ok(user(1000, 1000, &[], "/home/app")));
        assert_eq!(r("4242:4242"), Ok(user(4242, 4242, &[], "/")));
        assert_eq!(r("4242:wheel"), Ok(user(4242, 10, &[], "/")));
        assert_eq!(
            r("app:nogroup"),
            Err(UserError::NoSuchGroup("nogroup".into()))
        );
        assert_eq!(resolve(b"0:0", None, None), Ok(user(0, 0, &[], "/")));
        assert_eq!(
            resolve(b"0:wheel", None, None),
            Err(UserError::NoSuchGroup("wheel".into()))
        );
        assert_eq!(
            r("0:3000000000"),
            Err(UserError::OutOfRange("3000000000".into()))
        );
        // A trailing colon is "no group".
        assert_eq!(r("app:"), Ok(user(1000, 1000, &[10, 999], "/home/app")));
    }

    #[test]
    fn hostile_lines_are_skipped() {
        let passwd = b"evil:x:notanumber:0::/evil:/bin/sh\n\
            evil2:x:0\n\
            :x:5:5::/anon:\n\
            evil3:x:99999999999:0::/x:\n\
            \xff\xfe:x:7:7::/bin\xff:\n\
            \t  spaced:x:8:8::/spaced:/bin/sh  \r\n\
            real:x:9:9::/real:/bin/sh";
        let group = b"g1:x:abc:real\n:x:3:real\ng2:x:4:real\n\
            huge:x:4294967296:real\n";
        let r = |s: &[u8]| resolve(s, Some(passwd), Some(group));
        // A bad uid is never read as 0 (root).
        assert_eq!(r(b"evil"), Err(UserError::NoSuchUser("evil".into())));
        assert_eq!(r(b"evil2"), Err(UserError::NoSuchUser("evil2".into())));
        assert_eq!(r(b"evil3"), Err(UserError::NoSuchUser("evil3".into())));
        assert_eq!(r(b"5"), Ok(user(5, 0, &[], "/")), "nameless line skipped");
        assert_eq!(
            r(b"\xff\xfe"),
            Ok(ExecUser {
                uid: 7,
                gid: 7,
                groups: vec![],
                home: b"/bin\xff".to_vec(),
            })
        );
        assert_eq!(r(b"spaced"), Ok(user(8, 8, &[], "/spaced")));
        assert_eq!(r(b"real"), Ok(user(9, 9, &[4], "/real")));
        // Garbage files.
        for junk in [&b"\0\0\0"[..], b":::::::", b"\n\n\n", &[0xff; 100]] {
            assert_eq!(
                resolve(b"x", Some(junk), Some(junk)),
                Err(UserError::NoSuchUser("x".into()))
            );
            assert_eq!(
                resolve(b"", Some(junk), Some(junk)),
                Ok(user(0, 0, &[], "/"))
            );
        }
    }

    #[test]
    fn parsers() {
        let p: Vec<_> = parse_passwd(PASSWD).collect();
        assert_eq!(p.len(), 6);
        assert_eq!(p[2].name, b"app");
        assert_eq!(p[4].home, b"");
        let g: Vec<_> = parse_group(GROUP).collect();
        assert_eq!(g[3].members, [&b"app"[..], b"other"]);
        assert!(g[0].members.is_empty());
    }

    #[test]
    fn reading_files() {
        let dir = std::env::temp_dir().join(format!("locald-init-user-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("passwd");
        std::fs::write(&f, PASSWD).unwrap();
        assert_eq!(read_db(&f).unwrap().as_deref(), Some(PASSWD));
        assert_eq!(read_db(&dir.join("missing")).unwrap(), None);
        assert!(read_db(&dir).is_err(), "a directory");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(read_db(&fifo).is_err(), "a fifo, without blocking");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
