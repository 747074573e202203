//! Unit tests of the trusted-directory checks (no KVM). Tests that need
//! another owner `chown` to uid 4242 and so need root; they skip loudly
//! without it.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh scratch directory under the system temp dir (mode 0700).
fn scratch() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "locald-hostdir-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
    d
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn root_or_skip() -> bool {
    if euid() == 0 {
        return true;
    }
    crate::test_support::skip(crate::test_support::Why::NotRoot("chown to another uid"));
    false
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), None).unwrap();
}

fn problem(r: Result<impl std::fmt::Debug, HostDirError>) -> String {
    match r {
        Err(e @ HostDirError::Untrusted { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn creates_missing_levels_private_one_by_one() {
    let s = scratch();
    let want = s.join("a/b/own");
    assert_eq!(check_private_dir(&want).unwrap(), None);
    assert!(!s.join("a").exists(), "a check creates nothing");
    let got = ensure_private_dir(&want).unwrap();
    assert_eq!(got, want);
    for p in [s.join("a"), s.join("a/b"), want.clone()] {
        let m = fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700, "{}", p.display());
    }
    // Existing and fine: accepted as is, twice.
    assert_eq!(ensure_private_dir(&want).unwrap(), want);
    assert_eq!(check_private_dir(&want).unwrap(), Some(want.clone()));
    // A 0755 directory of ours (e.g. an existing ~/.cache/locald-vmm) is fine.
    chmod(&want, 0o755);
    assert_eq!(check_private_dir(&want).unwrap(), Some(want));
    fs::remove_dir_all(&s).unwrap();
}

#[test]
fn world_writable_own_dir_is_refused() {
    let s = scratch();
    let own = s.join("own");
    fs::create_dir(&own).unwrap();
    chmod(&own, 0o777);
    let msg = problem(ensure_private_dir(&own));
    assert!(
        msg.contains("writable by group or others (mode 0777)"),
        "{msg}"
    );
    assert!(msg.contains(&own.display().to_string()), "{msg}");
    chmod(&own, 0o770);
    problem(check_private_dir(&own));
    fs::remove_dir_all(&s).unwrap();
}

#[test]
fn own_dir_of_another_user_is_refused() {
    if !root_or_skip() {
        return;
    }
    let s = scratch();
    let own = s.join("own");
    fs::create_dir(&own).unwrap();
    chmod(&own, 0o700);
    chown(&own, 4242);
    let msg = problem(ensure_private_dir(&own));
    assert!(
        msg.contains("owned by uid 4242, not by you (uid 0)"),
        "{msg}"
    );
    // Nothing was created inside or next to it.
    assert_eq!(fs::read_dir(&own).unwrap().count(), 0);
    assert_eq!(fs::read_dir(&s).unwrap().count(), 1);
    fs::remove_dir_all(&s).unwrap();
}

#[test]
fn symlinked_own_dir_is_refused() {
    let s = scratch();
    let real = s.join("real");
    fs::DirBuilder::new().mode(0o700).create(&real).unwrap();
    let link = s.join("own");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let msg = problem(ensure_private_dir(&link));
    assert!(msg.contains("a symlink"), "{msg}");
    problem(check_private_dir(&link));
    // A dangling one too (nothing is created through it).
    let dangling = s.join("dangling");
    std::os::unix::fs::symlink(s.join("nowhere"), &dangling).unwrap();
    problem(ensure_private_dir(&dangling));
    assert!(!s.join("nowhere").exists());
    fs::remove_dir_all(&s).unwrap();
}

#[test]
fn ancestors_must_be_trusted() {
    let s = scratch();
    // Writable by others and not sticky: anyone could swap what is below.
    let open = s.join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let msg = problem(ensure_private_dir(&open.join("own")));
    assert!(msg.contains("not sticky (mode 0777)"), "{msg}");
    assert!(!open.join("own").exists(), "nothing created");
    // Sticky, like /tmp: fine.
    chmod(&open, 0o1777);
    let own = ensure_private_dir(&open.join("own")).unwrap();
    assert_eq!(own, open.join("own"));
    // Not a directory.
    fs::write(s.join("file"), b"").unwrap();
    let msg = problem(ensure_private_dir(&s.join("file/own")));
    assert!(msg.contains("not a directory"), "{msg}");
    fs::remove_dir_all(&s).unwrap();
}

#[test]
fn ancestor_of_another_user_is_refused() {
    if !root_or_skip() {
        return;
    }
    let s = scratch();
    let theirs = s.join("theirs");
    fs::create_dir(&theirs).unwrap();
    chmod(&theirs, 0o755);
    chown(&theirs, 4242);
    let msg = problem(ensure_private_dir(&theirs.join("own")));
    assert!(
        msg.contains("owned by uid 4242, neither root nor you"),
        "{msg}"
    );
    // A symlink of theirs in a sticky directory is refused as well.
    let sticky = s.join("sticky");
    fs::create_dir(&sticky).unwrap();
    chmod(&sticky, 0o1777);
    let mine = s.join("mine");
    fs::DirBuilder::new().mode(0o700).create(&mine).unwrap();
    let link = sticky.join("link");
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    chown(&link, 4242);
    let msg = problem(ensure_private_dir(&link.join("own")));
    assert!(msg.contains("a symlink owned by uid 4242"), "{msg}");
    assert!(!mine.join("own").exists());
    fs::remove_dir_all(&s).unwrap();
}

#[test]
fn trusted_ancestor_symlinks_are_resolved() {
    let s = scratch();
    let real = s.join("real");
    fs::DirBuilder::new().mode(0o700).create(&real).unwrap();
    std::os::unix::fs::symlink("real", s.join("rel")).unwrap();
    std::os::unix::fs::symlink(&real, s.join("abs")).unwrap();
    for via in ["rel", "abs"] {
        let got = ensure_private_dir(&s.join(via).join("x/own")).unwrap();
        assert_eq!(got, real.join("x/own"), "via {via}");
    }
    // `..` after a symlink is taken in the resolved path.
    let sub = real.join("sub");
    fs::DirBuilder::new().mode(0o700).create(&sub).unwrap();
    std::os::unix::fs::symlink(&sub, s.join("tosub")).unwrap();
    let got = ensure_private_dir(&s.join("tosub/../y")).unwrap();
    assert_eq!(got, real.join("y"));
    // A loop ends.
    std::os::unix::fs::symlink("loop", s.join("loop")).unwrap();
    let msg = problem(ensure_private_dir(&s.join("loop/own")));
    assert!(msg.contains("too many levels of symlinks"), "{msg}");
    fs::remove_dir_all(&s).unwrap();
}

#[test]
fn files_are_opened_without_following_symlinks() {
    let s = scratch();
    let target = s.join("target");
    fs::write(&target, b"precious").unwrap();
    let link = s.join("console.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for c in [Create::No, Create::New, Create::IfMissing] {
        let msg = problem(open_nofollow(&link, c));
        assert!(msg.contains("a symlink"), "{c:?}: {msg}");
    }
    assert_eq!(fs::read(&target).unwrap(), b"precious");
    // O_EXCL: an existing file is not taken over.
    let f = s.join("lock");
    open_nofollow(&f, Create::New).unwrap();
    assert_eq!(fs::symlink_metadata(&f).unwrap().mode() & 0o777, 0o600);
    assert!(open_nofollow(&f, Create::New).is_err());
    open_nofollow(&f, Create::IfMissing).unwrap();
    open_nofollow(&f, Create::No).unwrap();
    // Not a regular file (a planted FIFO does not block the open).
    let fifo = s.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path we pass.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let msg = problem(open_nofollow(&fifo, Create::IfMissing));
    assert!(msg.contains("not a regular file"), "{msg}");
    fs::remove_dir_all(&s).unwrap();
}
