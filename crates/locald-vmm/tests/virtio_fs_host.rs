//! Host-side tests of the virtio-fs server: the same `ShareFs` + FUSE
//! `Server` the device uses, mounted on the host through `/dev/fuse`
//! (`HostMount`), with real programs run against it. Needs root and
//! `/dev/fuse`; skips loudly without them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use locald_vmm::devices::virtio::fs::host::HostMount;
use locald_vmm::devices::virtio::fs::{ShareCache, ShareFsOptions};

#[path = "../src/test_support.rs"]
mod test_support;
use test_support::{skip, Why};

/// Host mounts need `/dev/fuse` and root; otherwise the test skips (and
/// fails in strict mode).
fn usable() -> bool {
    if !Path::new("/dev/fuse").exists() {
        skip(Why::Missing("/dev/fuse"));
        return false;
    }
    if !test_support::is_root() {
        skip(Why::NotRoot("host FUSE mounts"));
        return false;
    }
    true
}

struct Dirs {
    base: PathBuf,
    share: PathBuf,
    mnt: PathBuf,
}
impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
fn dirs(name: &str) -> Dirs {
    let base = std::env::temp_dir().join(format!("locald-fs-host-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let share = base.join("share");
    let mnt = base.join("mnt");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    Dirs { base, share, mnt }
}

fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "script failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn real_programs_through_the_host_mount() {
    if !usable() {
        return;
    }
    let d = dirs("programs");
    let m = HostMount::mount(
        ShareFsOptions::new(&d.share, false, ShareCache::Auto),
        &d.mnt,
        4,
    )
    .unwrap();
    let mnt = m.mountpoint().to_path_buf();
    // tar round trip of a source tree (from /work/main's crates if present, else /usr/include).
    let src = d.base.join("src");
    sh(&d.base, "mkdir -p src/a/b && seq 1 20000 > src/a/big && echo hi > src/a/b/c && ln -s b/c src/a/link && ln src/a/big src/a/hard && chmod 640 src/a/b/c && touch -d @981158400 src/a/b/c");
    // Into the mount, back out of it into x/, each copy compared with the
    // source; tar keeps whole-second mtimes, checked on both copies.
    sh(&mnt, &format!(
        "tar -C {src} -cf - . | tar -xpf - && diff -r {src} . && tar -cf ../t.tar . && mkdir x && tar -C x -xf ../t.tar && diff -r {src} x && \
         [ \"$(stat -c %Y a/b/c)\" = 981158400 ] && [ \"$(stat -c %Y x/a/b/c)\" = 981158400 ] && [ \"$(stat -c %h x/a/big)\" = 2 ]",
        src = src.display()
    ));
    // Same tree seen on the host: names, sizes, modes, mtimes, link targets.
    let listing = "find . -path ./x -prune -o -printf '%p %s %m %T@ %l %y\\n' | sort";
    let host = sh(&d.share, listing);
    let fuse = sh(&mnt, listing);
    assert_eq!(host, fuse);
    // cp -a and a comparison of the copies (metadata included).
    // The mtime set through the mount, to the nanosecond, and cp -a's copy
    // of it (compared at nanosecond resolution, not whole seconds).
    sh(&mnt, "touch -d @981173106.123456789 a/b/c && [ \"$(stat -c %.9Y a/b/c)\" = 981173106.123456789 ] && \
        cp -a a a2 && diff -r a a2 && [ \"$(stat -c %.9Y a2/b/c)\" = 981173106.123456789 ] && [ \"$(stat -c %a a2/b/c)\" = 640 ]");
    let host_c = std::fs::metadata(d.share.join("a2/b/c")).unwrap();
    assert_eq!(
        (host_c.mtime(), host_c.mtime_nsec()),
        (981_173_106, 123_456_789)
    );
    // git
    sh(&mnt, "mkdir repo && cd repo && git init -q && git config user.email t@t && git config user.name t && cp -a ../a . && git add -A && git commit -qm one && echo more >> a/b/c && git status --porcelain | grep -q 'M a/b/c' && git commit -qam two && [ -z \"$(git status --porcelain)\" ] && git log --oneline | wc -l | grep -q 2");
    // Parallel C build.
    sh(&mnt, "mkdir cproj && cd cproj && for i in 1 2 3 4 5 6 7 8; do printf 'int f%d(void){return %d;}\\n' $i $i > f$i.c; done && \
        printf '#include <stdio.h>\\n' > main.c && for i in 1 2 3 4 5 6 7 8; do printf 'int f%d(void);\\n' $i >> main.c; done && \
        printf 'int main(void){printf(\"%%d\\\\n\", f1()+f2()+f3()+f4()+f5()+f6()+f7()+f8());return 0;}\\n' >> main.c && \
        printf 'OBJS=$(patsubst %%.c,%%.o,$(wildcard *.c))\\nprog: $(OBJS)\\n\\t$(CC) -o $@ $^\\n' > Makefile && make -s -j8 && ./prog | grep -qx 36");
    // POSIX bits: rename flags, links, xattrs, fallocate, sparse, append, trunc, mmap, flock.
    sh(
        &mnt,
        "echo a > r1 && echo b > r2 && python3 - <<'PY'
import ctypes, os, mmap, fcntl
libc = ctypes.CDLL(None, use_errno=True)
AT = -100
def r2(a, b, f):
    return libc.renameat2(AT, a.encode(), AT, b.encode(), f)
assert r2('r1', 'r2', 1) == -1 and ctypes.get_errno() == 17  # NOREPLACE -> EEXIST
assert r2('r1', 'r2', 2) == 0  # EXCHANGE
assert open('r1').read() == 'b\\n' and open('r2').read() == 'a\\n'
os.link('r1', 'r1h'); assert os.stat('r1').st_nlink == 2
os.symlink('r1', 'r1s'); assert os.readlink('r1s') == 'r1'
os.setxattr('r1', 'user.k', b'v'); assert os.getxattr('r1', 'user.k') == b'v'
with open('big', 'wb') as f:
    os.posix_fallocate(f.fileno(), 0, 1 << 20)
assert os.stat('big').st_size == 1 << 20
with open('sparse', 'wb') as f:
    f.seek(1 << 30); f.write(b'x')
st = os.stat('sparse'); assert st.st_size == (1 << 30) + 1 and st.st_blocks * 512 < (1 << 20)
with open('ap', 'w') as f: f.write('1')
with open('ap', 'a') as f: f.write('2')
assert open('ap').read() == '12'
with open('ap', 'w') as f: pass
assert os.stat('ap').st_size == 0
with open('mm', 'wb') as f: f.write(b'\\0' * 4096)
with open('mm', 'r+b') as f:
    m = mmap.mmap(f.fileno(), 4096); m[0:5] = b'hello'; m.flush(); m.close()
assert open('mm', 'rb').read(5) == b'hello'
with open('lk', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX); fcntl.lockf(f, fcntl.LOCK_EX); fcntl.flock(f, fcntl.LOCK_UN)
fd = os.open('sy', os.O_CREAT | os.O_WRONLY); os.write(fd, b'x'); os.fsync(fd); os.close(fd)
PY",
    );
    assert_eq!(std::fs::read(d.share.join("mm")).unwrap()[..5], *b"hello");
    assert_eq!(std::fs::metadata(d.share.join("r1h")).unwrap().nlink(), 2);
    // A host edit is seen at the next open.
    std::fs::write(d.share.join("edit"), b"one").unwrap();
    assert_eq!(std::fs::read(mnt.join("edit")).unwrap(), b"one");
    std::fs::write(d.share.join("edit"), b"two!").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(std::fs::read(mnt.join("edit")).unwrap(), b"two!");
    drop(m);
}

#[test]
fn large_directory_and_fd_bound() {
    if !usable() {
        return;
    }
    let d = dirs("large");
    let big = d.share.join("big");
    std::fs::create_dir(&big).unwrap();
    for i in 0..100_000 {
        std::fs::File::create(big.join(format!("f{i:06}"))).unwrap();
    }
    let mut o = ShareFsOptions::new(&d.share, false, ShareCache::Auto);
    o.max_inodes = 1000;
    let m = HostMount::mount(o, &d.mnt, 2).unwrap();
    let n = std::fs::read_dir(d.mnt.join("big")).unwrap().count();
    assert_eq!(n, 100_000);
    // stat every entry: never more than 1000 inodes (fds) held; past the
    // bound, stats fail with ENFILE until the kernel forgets some.
    let mut enfile = 0;
    for i in 0..5000 {
        if let Err(e) = std::fs::metadata(d.mnt.join(format!("big/f{i:06}"))) {
            assert_eq!(e.raw_os_error(), Some(libc::ENFILE), "{e}");
            enfile += 1;
        }
        assert!(m.fs().inode_count() <= 1000);
    }
    eprintln!("stat of 5000 files with a 1000-inode bound: {enfile} ENFILE");
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
    drop(m);

    // Default options: `ls -l` of all 100 000 entries. Inodes are fds when
    // the fd limit allows enough of them, file handles (no fd each) when it
    // does not and the VMM holds CAP_DAC_READ_SEARCH.
    let o = ShareFsOptions::new(&d.share, false, ShareCache::Auto);
    if o.max_inodes < 110_000 {
        eprintln!(
            "large_directory_and_fd_bound: fd limit too small and no \
             CAP_DAC_READ_SEARCH (inode bound {})",
            o.max_inodes
        );
        skip(Why::NotRoot(
            "CAP_DAC_READ_SEARCH for the 100 000-entry ls -l",
        ));
        return;
    }
    let handles = o.inode_handles;
    let fds_before = open_fds();
    let m = HostMount::mount(o, &d.mnt, 2).unwrap();
    let out = std::process::Command::new("ls")
        .args(["-l", "--time-style=+%s"])
        .arg(d.mnt.join("big"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ls -l failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout);
    let files = lines.lines().filter(|l| l.starts_with('-')).count();
    assert_eq!(files, 100_000, "ls -l lists every file with its attributes");
    assert!(
        m.fs().inode_count() > 100_000 / 2,
        "the kernel kept the inodes"
    );
    let grown = open_fds().saturating_sub(fds_before);
    if handles {
        assert!(
            grown < 1000,
            "server fds grew by {grown} for 100 000 inodes"
        );
    }
    eprintln!(
        "ls -l of 100 000 entries: {} inodes held, fds +{grown} (file handles: {handles})",
        m.fs().inode_count()
    );
    drop(m);
}

/// Open fds of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn escapes_through_the_mount() {
    if !usable() {
        return;
    }
    let d = dirs("escape");
    std::fs::write(d.base.join("outside"), b"secret").unwrap();
    std::fs::create_dir(d.share.join("bind")).unwrap();
    let other = d.base.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("x"), b"x").unwrap();
    sh(
        &d.base,
        &format!(
            "mount --bind {} {}",
            other.display(),
            d.share.join("bind").display()
        ),
    );
    let m = HostMount::mount(
        ShareFsOptions::new(&d.share, false, ShareCache::Never),
        &d.mnt,
        1,
    )
    .unwrap();
    // A mount point under the share is not crossed.
    let e = std::fs::read_dir(d.mnt.join("bind")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{e}");
    // Opening a symlink with O_NOFOLLOW: the server hands back the link.
    std::os::unix::fs::symlink("../outside", d.share.join("up")).unwrap();
    use std::os::unix::fs::OpenOptionsExt;
    let e = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(d.mnt.join("up"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    assert_eq!(
        std::fs::read_link(d.mnt.join("up")).unwrap(),
        PathBuf::from("../outside")
    );
    // Device nodes cannot be made.
    let e = Command::new("mknod")
        .arg(d.mnt.join("null"))
        .args(["c", "1", "3"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(!d.share.join("null").exists());
    drop(m);
    sh(
        &d.base,
        &format!("umount {}", d.share.join("bind").display()),
    );
    // Read-only share, enforced by the server (the kernel mount is rw).
    let m = HostMount::mount(
        ShareFsOptions::new(&d.share, true, ShareCache::Auto),
        &d.mnt,
        1,
    )
    .unwrap();
    for script in [
        "echo x > new",
        "echo x >> up2 ",
        "mkdir dd",
        "rm -f bind/..x || false; rmdir bind",
        "touch -d 2000-01-01 bind",
        "ln -s a b",
    ] {
        let o = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&d.mnt)
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "{script} succeeded on a read-only share"
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("Read-only"),
            "{script}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    drop(m);
}

/// The server threads of a root VMM keep only the capabilities serving a
/// share needs; the rest of the process keeps its own.
#[test]
fn server_threads_drop_unneeded_capabilities() {
    if !usable() {
        return;
    }
    use locald_vmm::devices::virtio::fs::caps::{cap, KEPT};
    let d = dirs("caps");
    let m = HostMount::mount(
        ShareFsOptions::new(&d.share, false, ShareCache::Never),
        &d.mnt,
        2,
    )
    .unwrap();
    // A request served means the threads are past their start.
    std::fs::write(m.mountpoint().join("f"), b"x").unwrap();
    let mut servers = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with("fuse-host-") {
            continue;
        }
        servers += 1;
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        for key in ["CapEff:", "CapPrm:", "CapInh:"] {
            let v = status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            assert_eq!(v & !KEPT, 0, "{} {key} {v:#x}", comm.trim());
        }
    }
    // (Other tests in this binary may have mounts of their own.)
    assert!(servers >= 2, "{servers} server threads");
    // This (test) thread still has what root has.
    let own = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let eff = own
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(eff & (1 << cap::SETFCAP), 0, "test thread lost CAP_SETFCAP");
}

/// xattrs through the mount, as a guest program would use them: file
/// capabilities and trusted.* refused, user.* kept, checked on the host.
#[test]
fn xattr_policy_through_the_mount() {
    if !usable() {
        return;
    }
    let d = dirs("xattr");
    let m = HostMount::mount(
        ShareFsOptions::new(&d.share, false, ShareCache::Never),
        &d.mnt,
        2,
    )
    .unwrap();
    std::fs::copy("/bin/true", m.mountpoint().join("t")).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import os, errno, sys\n\
             p = sys.argv[1]\n\
             cap = bytes.fromhex('010000028000000000000000000000000000000000')[:20]\n\
             for name, val in (('security.capability', cap), ('trusted.x', b'1'), ('security.evil', b'1')):\n\
             \x20   try:\n\
             \x20       os.setxattr(p, name, val); print('set', name)\n\
             \x20   except OSError as e:\n\
             \x20       print('refused', name, errno.errorcode[e.errno])\n\
             os.setxattr(p, 'user.k', b'v'); print('user', os.getxattr(p, 'user.k'))\n",
        )
        .arg(m.mountpoint().join("t"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("refused security.capability EPERM"), "{text}");
    assert!(text.contains("refused trusted.x EPERM"), "{text}");
    assert!(text.contains("refused security.evil EPERM"), "{text}");
    assert!(text.contains("user b'v'"), "{text}");
    let host = d.share.join("t");
    let names = Command::new("getfattr")
        .args(["-d", "-m", "-", "--absolute-names"])
        .arg(&host)
        .output();
    if let Ok(n) = names {
        let n = String::from_utf8_lossy(&n.stdout);
        assert!(
            !n.contains("security.capability") && !n.contains("trusted."),
            "{n}"
        );
    }
    let cap = Command::new("getcap").arg(&host).output();
    if let Ok(c) = cap {
        assert!(String::from_utf8_lossy(&c.stdout).trim().is_empty());
    }
    // The direct oracle: no such xattr on the host file.
    for name in ["security.capability", "trusted.x", "security.evil"] {
        let p = std::ffi::CString::new(host.to_str().unwrap()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid NUL-terminated strings; a size-0 query writes nothing.
        let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        assert_eq!(r, -1, "{name} is on the host file");
    }
}

/// pjdfstest's tests that fail against this server by policy, each with
/// its reason (docs/virtio-fs.md, "Conformance"). Any other failure fails
/// the test, and so does an entry here that passes (a stale allow-list).
/// A name starting with `*` matches by suffix.
const PJDFSTEST_ALLOWED: &[(&str, &str)] = &[
    (
        "*::char",
        "device nodes are refused (EPERM): a guest-made device node on the host would give \
         whoever can open it the device (docs/virtio-fs.md, no device nodes)",
    ),
    (
        "*::block",
        "device nodes are refused (EPERM), as for `*::char`",
    ),
    (
        "chmod::clear_isgid_bit",
        "set-group-id is dropped from every non-directory: the guest picks its gids freely, so a \
         setgid file of a guest gid would run as that host group (e.g. disk, shadow) for a host \
         user (docs/virtio-fs.md, set-id policy)",
    ),
];

fn pjdfstest_allowed(name: &str) -> bool {
    PJDFSTEST_ALLOWED
        .iter()
        .any(|(a, _)| allowed_match(a, name))
}

fn allowed_match(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => name.ends_with(suffix),
        None => pattern == name,
    }
}

/// The third-party POSIX file-system suite pjdfstest (the Rust rewrite,
/// crates.io `pjdfstest`, installed by scripts/install-fs-conformance.sh)
/// run as root against the server mounted on the host.
#[test]
fn pjdfstest_conformance() {
    if !usable() {
        return;
    }
    let bin = std::env::var_os("PJDFSTEST")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/local/bin/pjdfstest", "/root/.cargo/bin/pjdfstest"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        });
    let Some(bin) = bin else {
        skip(Why::Missing(
            "pjdfstest (scripts/install-fs-conformance.sh)",
        ));
        return;
    };
    let d = dirs("pjdfstest");
    // Two existing users with their own groups for the tests that switch
    // users (no need to create the suite's default `tests` user).
    let conf = d.base.join("pjdfstest.toml");
    std::fs::write(
        &conf,
        "[features]\nposix_fallocate = {}\nutime_now = {}\nutimensat = {}\n\n\
         [settings]\nnaptime = 0.01\n\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
    )
    .unwrap();
    // The work directory must be searchable by those users.
    std::fs::set_permissions(&d.base, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        &d.share,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    for handles in [false, true] {
        if handles && !locald_vmm::devices::virtio::fs::share::can_open_by_handle() {
            skip(Why::NotRoot(
                "CAP_DAC_READ_SEARCH: pjdfstest with file-handle inodes",
            ));
            continue;
        }
        for e in std::fs::read_dir(&d.share).unwrap() {
            let p = e.unwrap().path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
        let mut o = ShareFsOptions::new(&d.share, false, ShareCache::Never);
        o.inode_handles = handles;
        if !handles {
            o.max_inodes = o.max_inodes.min(100_000);
        }
        run_pjdfstest(
            &bin,
            &conf,
            HostMount::mount(o, &d.mnt, 4).unwrap(),
            handles,
        );
    }
}

fn run_pjdfstest(bin: &Path, conf: &Path, m: HostMount, handles: bool) {
    let t0 = std::time::Instant::now();
    let out = Command::new(bin)
        .env("RUST_BACKTRACE", "0")
        .arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(m.mountpoint())
        .current_dir(m.mountpoint())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = std::env::temp_dir().join(format!("locald-pjdfstest-handles-{handles}.log"));
    let _ = std::fs::write(&log, &text);
    eprintln!("pjdfstest output: {}", log.display());
    eprintln!(
        "pjdfstest (file-handle inodes: {handles}): {:.1} s, {}",
        t0.elapsed().as_secs_f64(),
        text.lines()
            .rev()
            .find(|l| l.starts_with("Summary"))
            .unwrap_or("no summary")
    );
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| {
            panic!(
                "no summary line:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let passed: usize = summary
        .split(',')
        .find_map(|p| p.trim().strip_suffix(" passed"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(passed >= 290, "only {passed} tests passed: {summary}");
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_end().ends_with("FAILED"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let n_failed: usize = summary
        .split(',')
        .find_map(|p| p.trim().strip_suffix(" failed"))
        .and_then(|n| n.trim().trim_start_matches("Summary:").trim().parse().ok())
        .unwrap_or(usize::MAX);
    assert_eq!(
        failed.len(),
        n_failed,
        "failure lines vs summary: {summary}"
    );
    let unexpected: Vec<&&str> = failed.iter().filter(|f| !pjdfstest_allowed(f)).collect();
    let stale: Vec<&str> = PJDFSTEST_ALLOWED
        .iter()
        .map(|(a, _)| *a)
        .filter(|a| !failed.iter().any(|f| allowed_match(a, f)))
        .collect();
    assert!(
        unexpected.is_empty() && stale.is_empty(),
        "unexpected failures: {unexpected:?}\nallowed but passing: {stale:?}\nfull output: {}",
        log.display()
    );
    drop(m);
}
