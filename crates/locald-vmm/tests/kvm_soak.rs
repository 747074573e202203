//! Soak and resource tests on the real KVM API with the `virtio` tiny guest
//! (`guests/virtio.c`, which drives a disk and the entropy device): many VMs
//! in a row and at once in one process must not leave fds, threads or
//! memory behind; a full host file system under a disk image is an I/O
//! error to the guest, never a write reported as done. They need
//! `/dev/kvm` (and root for the full-disk case) and skip through
//! `kvm_common::skip` otherwise, which fails in strict mode.

#[macro_use]
mod kvm_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvm_common::guest;
use locald_vmm::{
    CacheMode, ConsoleConfig, DiskConfig, ExitStatus, SharedBuffer, VirtualMachine, VmConfig,
};

/// A fresh directory (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("kvm_soak-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk(path: &Path) -> DiskConfig {
    DiskConfig {
        path: path.to_path_buf(),
        read_only: false,
        cache: CacheMode::Writeback,
        id: None,
    }
}

/// Runs the virtio guest with one writable disk and the entropy device;
/// returns its status and output.
fn run_virtio(image: &Path) -> (ExitStatus, String) {
    let out = SharedBuffer::default();
    let config = VmConfig {
        kernel: Some(guest("virtio")),
        disks: vec![disk(image)],
        rng: true,
        memory_mib: 64,
        console: ConsoleConfig::Buffer {
            input: Vec::new(),
            output: out.clone(),
        },
        timeout: Some(Duration::from_secs(120)),
        ..VmConfig::default()
    };
    let mut vm = VirtualMachine::new(config).unwrap_or_else(|e| panic!("new: {e}"));
    let status = vm.run().unwrap_or_else(|e| panic!("run: {e}"));
    drop(vm);
    (status, out.text().replace('\r', ""))
}

/// A 1 MiB zeroed image.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

#[track_caller]
fn assert_ok(status: ExitStatus, out: &str) {
    assert_eq!(status, ExitStatus::Exited(0), "guest output:\n{out}");
    assert!(out.lines().any(|l| l == "virtio: all ok"), "{out}");
    assert!(
        out.lines()
            .any(|l| l == "virtio: blk0 read sector 1 status 0 matches"),
        "{out}"
    );
}

/// fds, threads and resident KiB of this process.
fn usage() -> (usize, usize, u64) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (fds, field("Threads:") as usize, field("VmRSS:"))
}

/// Waits (briefly) for threads of finished VMs to be gone from /proc.
fn settle(threads: usize) -> (usize, usize, u64) {
    for _ in 0..100 {
        let u = usage();
        if u.1 <= threads {
            return u;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    usage()
}

/// The leak tests measure the whole process (fds, threads, RSS): every
/// test of this binary holds this lock for its whole run, so no other
/// test's VM is counted.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn hundred_sequential_vms_leak_nothing() {
    require_kvm!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("seq");
    let img = image(&s.0, "seq.img");
    // Warm up (guest build, lazy statics, allocator arenas).
    for _ in 0..5 {
        let (status, out) = run_virtio(&img);
        assert_ok(status, &out);
    }
    let before = settle(usize::MAX);
    let t = std::time::Instant::now();
    for i in 0..100 {
        let (status, out) = run_virtio(&img);
        assert_ok(status, &out);
        if i == 49 {
            eprintln!("after 50 VMs: {:?}", usage());
        }
    }
    let elapsed = t.elapsed();
    let after = settle(before.1);
    eprintln!(
        "100 sequential VMs in {elapsed:?}: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
        before.0, after.0, before.1, after.1, before.2, after.2
    );
    // Fewer is no leak: the thread of the test that ran before this one
    // may still have been ending when `before` was taken.
    assert!(
        after.0 <= before.0,
        "open fds grew: {before:?} -> {after:?}"
    );
    assert!(after.1 <= before.1, "threads grew: {before:?} -> {after:?}");
    assert!(
        after.2 < before.2 + 16 * 1024,
        "RSS grew by {} KiB",
        after.2 - before.2
    );
}

#[test]
fn ten_concurrent_vms_leak_nothing() {
    require_kvm!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("conc");
    let images: Vec<PathBuf> = (0..10).map(|i| image(&s.0, &format!("c{i}.img"))).collect();
    let round = |images: &[PathBuf]| {
        let handles: Vec<_> = images
            .iter()
            .cloned()
            .map(|img| std::thread::spawn(move || run_virtio(&img)))
            .collect();
        for h in handles {
            let (status, out) = h.join().expect("VM thread panicked");
            assert_ok(status, &out);
        }
    };
    round(&images);
    let before = settle(usize::MAX);
    for _ in 0..3 {
        round(&images);
    }
    let after = settle(before.1);
    eprintln!(
        "3 x 10 concurrent VMs: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
        before.0, after.0, before.1, after.1, before.2, after.2
    );
    // Fewer is no leak: the thread of the test that ran before this one
    // may still have been ending when `before` was taken.
    assert!(
        after.0 <= before.0,
        "open fds grew: {before:?} -> {after:?}"
    );
    assert!(after.1 <= before.1, "threads grew: {before:?} -> {after:?}");
    assert!(
        after.2 < before.2 + 32 * 1024,
        "RSS grew by {} KiB",
        after.2 - before.2
    );
}

/// A disk image on a full file system: the guest's write is an I/O error,
/// the sector it read before is what it reads after, and nothing of the
/// write reached the image.
#[test]
fn full_host_file_system_is_an_io_error_not_a_lost_write() {
    require_kvm!();
    if !kvm_common::is_root() {
        kvm_common::skip(kvm_common::Why::NotRoot("mounting a tmpfs"));
        return;
    }
    // Its VM's fds and threads would show up in the other tests' counts.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("enospc");
    let mnt = s.0.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "locald-enospc"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    // A sparse 1 MiB image (every sector a hole), then fill the tmpfs.
    let img = mnt.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut filler = std::fs::File::create(mnt.join("filler")).unwrap();
    let chunk = vec![0xa5u8; 4096];
    loop {
        use std::io::Write;
        match filler.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
    let (_status, out) = run_virtio(&img);
    eprintln!("guest output:\n{out}");
    assert!(
        out.lines()
            .any(|l| l == "virtio: blk0 write sector 1 status 1 len 1"),
        "the write must fail with IOERR:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l == "virtio: blk0 read-only, sector 1 unchanged"),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| l.starts_with("virtio: blk0 flush status 0")),
        "no flush may report success after a failed write:\n{out}"
    );
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len(), 1 << 20);
    assert!(data.iter().all(|&b| b == 0), "nothing reached the image");
}
