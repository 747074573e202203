//! Host-side tests of the virtio-fs server: the same `ShareFs` + FUSE
//! `Server` the device uses, mounted on the host through `/dev/fuse`
//! (`HostMount`), with real programs run against it. Needs root and
//! `/dev/fuse`; skips loudly without them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use locald_vmm::devices::virtio::fs::host::HostMount;
use locald_vmm::devices::virtio::fs::{ShareCache, ShareFsOptions};

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !Path::new("/dev/fuse").exists() || !root {
        eprintln!(
            "SKIP virtio_fs_host: needs /dev/fuse and root (have /dev/fuse: {}, root: {root})",
            Path::new("/dev/fuse").exists()
        );
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
    sh(&d.base, "mkdir -p src/a/b && seq 1 20000 > src/a/big && echo hi > src/a/b/c && ln -s b/c src/a/link && ln src/a/big src/a/hard && chmod 640 src/a/b/c && touch -d 2001-02-03 src/a/b/c");
    sh(&mnt, &format!("tar -C {} -cf - . | tar -xpf - && diff -r {} . && tar -cf ../t.tar . && mkdir x && tar -C x -xf ../t.tar && diff -r . x >/dev/null || true; diff -r {} x", src.display(), src.display(), src.display()));
    // Same tree seen on the host: names, sizes, modes, mtimes, link targets.
    let listing = "find . -path ./x -prune -o -printf '%p %s %m %T@ %l %y\\n' | sort";
    let host = sh(&d.share, listing);
    let fuse = sh(&mnt, listing);
    assert_eq!(host, fuse);
    // cp -a and a comparison of the copies (metadata included).
    sh(&mnt, "cp -a a a2 && diff -r a a2 && [ \"$(stat -c %Y a/b/c)\" = \"$(stat -c %Y a2/b/c)\" ] && [ \"$(stat -c %a a2/b/c)\" = 640 ]");
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
            "NOTE large_directory_and_fd_bound: fd limit too small and no \
             CAP_DAC_READ_SEARCH (inode bound {}): skipping the 100 000-entry ls -l",
            o.max_inodes
        );
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
