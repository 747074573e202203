//! Clean shutdown: make every write the guest made durable before the VM
//! ends. Runs on PID 1's only thread, right before the exit code is written
//! to the exit port (which ends the VM at once) and before `reboot(2)`.
//!
//! A guest write is durable only once the filesystem has pushed it through a
//! virtio-blk FLUSH (which the host turns into `fdatasync`); ext4 does that on
//! `sync()` and on unmount / read-only remount, which also leave a clean
//! journal. Sequence:
//!
//! 1. `SIGKILL` every other process and reap them (at most [`REAP_WAIT`]), so
//!    no file is left open for writing (a busy filesystem cannot be
//!    unmounted or remounted read-only). Leftover processes would die with
//!    the VM anyway, a few milliseconds later;
//! 2. `sync()`;
//! 3. from `/proc/self/mounts`, in reverse mount order, every filesystem
//!    whose source starts with [`BLOCK_SOURCE_PREFIX`] (a block device —
//!    `/dev/vda`, `/dev/root`, loop devices...): `umount`, falling back to a
//!    read-only remount (`MS_REMOUNT|MS_RDONLY`) if that fails (`EBUSY`);
//!    such a filesystem mounted on `/` (the switched root) is remounted
//!    read-only, never unmounted;
//! 4. `sync()` again.
//!
//! Failures are printed (one line each) and otherwise ignored: they never
//! change the exit code.

use std::ffi::{CStr, CString};
use std::io;
use std::time::{Duration, Instant};

use crate::console;

/// Mount sources treated as block devices.
pub const BLOCK_SOURCE_PREFIX: &[u8] = b"/dev/";
/// Mount table of init's mount namespace.
pub const MOUNTS_FILE: &str = "/proc/self/mounts";
/// How long to wait for killed processes to be reaped.
pub const REAP_WAIT: Duration = Duration::from_secs(1);

/// One line of `/proc/self/mounts` (fields unescaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount source (`/dev/vda`, `proc`, ...).
    pub source: Vec<u8>,
    /// Mount point.
    pub target: Vec<u8>,
    /// Mounted read-only (`ro` among the options).
    pub read_only: bool,
}

/// What to do with one filesystem at shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `umount`; if that fails, remount read-only.
    Unmount(Vec<u8>),
    /// Remount `/` read-only.
    RemountRootReadOnly,
}

/// Undoes the octal escapes (`\040` space, `\011` tab, `\012` newline,
/// `\134` backslash) the kernel writes in `/proc/*/mounts` fields.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let digits = field.get(i + 1..i + 4);
        let octal = digits.filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (field[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                // Three octal digits can exceed 255 only in malformed input.
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Parses `/proc/self/mounts` (`source target fstype options dump pass` per
/// line). Lines with fewer than four fields are skipped.
pub fn parse_mounts(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let mut f = line.split(|&b| b == b' ');
            let (source, target, _fstype, options) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some(MountEntry {
                source: unescape(source),
                target: unescape(target),
                read_only: options.split(|&b| b == b',').any(|o| o == b"ro"),
            })
        })
        .collect()
}

/// Chooses what to do, in order: block-device filesystems are unmounted in
/// reverse mount order (children before parents, a stacked mount before the
/// one it hides); if the visible `/` is a writable block-device filesystem it
/// is remounted read-only last.
pub fn plan(mounts: &[MountEntry]) -> Vec<Step> {
    let is_block = |m: &MountEntry| m.source.starts_with(BLOCK_SOURCE_PREFIX);
    let mut steps: Vec<Step> = mounts
        .iter()
        .rev()
        .filter(|m| is_block(m) && m.target != b"/")
        .map(|m| Step::Unmount(m.target.clone()))
        .collect();
    // The last "/" entry is the one on top, i.e. the root we run in.
    if let Some(root) = mounts.iter().rev().find(|m| m.target == b"/") {
        if is_block(root) && !root.read_only {
            steps.push(Step::RemountRootReadOnly);
        }
    }
    steps
}

fn errno_result(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn remount_read_only(target: &CStr) -> io::Result<()> {
    // SAFETY: valid NUL-terminated target; a remount ignores the source and
    // fstype arguments, and there are no data options.
    errno_result(unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    })
}

/// Carries out one [`Step`], printing a line if it fails.
fn execute(step: &Step) {
    match step {
        Step::Unmount(target) => {
            let shown = String::from_utf8_lossy(target);
            let Ok(target) = CString::new(target.as_slice()) else {
                return; // A NUL in a mount point: malformed line, nothing to do.
            };
            // SAFETY: valid NUL-terminated path, no flags.
            let Err(e) = errno_result(unsafe { libc::umount2(target.as_ptr(), 0) }) else {
                return;
            };
            if let Err(e2) = remount_read_only(&target) {
                console::error(
                    format_args!("unmounting {shown}"),
                    format_args!(
                        "{}; remounting it read-only: {}",
                        console::describe(&e),
                        console::describe(&e2)
                    ),
                );
            }
        }
        Step::RemountRootReadOnly => {
            if let Err(e) = remount_read_only(c"/") {
                console::error("remounting / read-only", e);
            }
        }
    }
}

/// Kills every other process and reaps them, for at most [`REAP_WAIT`].
fn kill_remaining() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        return; // kill(-1) outside PID 1 would hit unrelated processes.
    }
    // SAFETY: kill(2) from PID 1 with pid -1 signals every process except
    // init itself (and kernel threads); ESRCH means there was none.
    if unsafe { libc::kill(-1, libc::SIGKILL) } != 0 {
        return;
    }
    let deadline = Instant::now() + REAP_WAIT;
    loop {
        // SAFETY: null status pointer is allowed; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r > 0 {
            continue;
        }
        if r < 0 {
            return; // ECHILD: everyone is gone.
        }
        if Instant::now() >= deadline {
            console::error("stopping remaining processes", "still running after 1 s");
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The whole shutdown sequence (see the module documentation). Never fails.
pub fn shutdown() {
    kill_remaining();
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    match std::fs::read(MOUNTS_FILE) {
        Ok(text) => plan(&parse_mounts(&text)).iter().for_each(execute),
        Err(e) => console::error(format_args!("reading {MOUNTS_FILE}"), e),
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(source: &str, target: &str, read_only: bool) -> MountEntry {
        MountEntry {
            source: source.into(),
            target: target.into(),
            read_only,
        }
    }

    fn unmount(t: &str) -> Step {
        Step::Unmount(t.into())
    }

    /// /proc/self/mounts of a switched guest, with extra disks mounted by
    /// the command (one of them on a path with a space, one stacked).
    const SWITCHED: &[u8] = b"\
/dev/vda / ext4 rw,relatime 0 0
devtmpfs /dev devtmpfs rw,nosuid,size=4096k,nr_inodes=1024,mode=755 0 0
devpts /dev/pts devpts rw,nosuid,noexec,relatime,gid=5,mode=620,ptmxmode=666 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
tmpfs /run tmpfs rw,nosuid,nodev,mode=755 0 0
/dev/vdb /mnt/my\\040data ext4 ro,relatime 0 0
/dev/vdc /srv xfs rw,relatime 0 0
/dev/vdb /srv/sub ext4 rw 0 0
/dev/vdd /srv xfs rw 0 0
";

    #[test]
    fn parses_proc_mounts() {
        let m = parse_mounts(SWITCHED);
        assert_eq!(m.len(), 11);
        assert_eq!(m[0], entry("/dev/vda", "/", false));
        assert_eq!(m[2], entry("devpts", "/dev/pts", false));
        assert_eq!(m[7], entry("/dev/vdb", "/mnt/my data", true));
        // "ro" must be a whole option, not a prefix or substring.
        let m = parse_mounts(b"a /x t rw,errors=remount-ro 0 0\nb /y t ro 0 0\n");
        assert_eq!(m, [entry("a", "/x", false), entry("b", "/y", true)]);
        // Short or empty lines are skipped.
        assert!(parse_mounts(b"\n\nshort line\n").is_empty());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(b"/a\\040b\\011c\\012d\\134e"), b"/a b\tc\nd\\e");
        // Not an escape: kept as is.
        assert_eq!(unescape(b"/a\\b\\04"), b"/a\\b\\04");
        assert_eq!(unescape(b"/x\\0401"), b"/x 1");
        assert_eq!(unescape(b"\\777"), b"?");
        assert_eq!(unescape(b""), b"");
    }

    #[test]
    fn plan_for_switched_root() {
        assert_eq!(
            plan(&parse_mounts(SWITCHED)),
            [
                unmount("/srv"), // vdd, stacked on vdc
                unmount("/srv/sub"),
                unmount("/srv"), // vdc
                unmount("/mnt/my data"),
                Step::RemountRootReadOnly,
            ]
        );
    }

    #[test]
    fn plan_for_initramfs_root() {
        // Not switched: "/" is the initramfs, only the command's disk goes.
        let text = b"\
rootfs / rootfs rw,size=1000k 0 0
proc /proc proc rw 0 0
devtmpfs /dev devtmpfs rw 0 0
/dev/vda /mnt ext4 rw,relatime 0 0
";
        assert_eq!(plan(&parse_mounts(text)), [unmount("/mnt")]);
        // A root mounted at /newroot but never switched to (failed switch).
        let text = b"rootfs / rootfs rw 0 0\n/dev/vda /newroot ext4 rw 0 0\n";
        assert_eq!(plan(&parse_mounts(text)), [unmount("/newroot")]);
        // Nothing on a block device: nothing to do.
        assert!(plan(&parse_mounts(b"rootfs / rootfs rw 0 0\n")).is_empty());
    }

    #[test]
    fn read_only_root_is_left_alone() {
        let text = b"/dev/vda / ext4 ro,relatime 0 0\n/dev/vdb /data ext4 rw 0 0\n";
        assert_eq!(plan(&parse_mounts(text)), [unmount("/data")]);
    }

    #[test]
    fn only_the_visible_root_counts() {
        let text = b"rootfs / rootfs rw 0 0\n/dev/vda / ext4 rw 0 0\n";
        assert_eq!(plan(&parse_mounts(text)), [Step::RemountRootReadOnly]);
        let text = b"/dev/vda / ext4 rw 0 0\ntmpfs / tmpfs rw 0 0\n";
        assert!(plan(&parse_mounts(text)).is_empty());
    }

    #[test]
    fn not_pid_1_kills_nothing() {
        // The test runner is not PID 1: this must return at once, signalling
        // nobody (otherwise the test process itself would be killed).
        kill_remaining();
    }
}
