//! Fast tier: snapshots of a tiny guest on the real KVM API. The `count`
//! guest counts to 40 about 25 ms apart, keeping the count in memory and
//! (times 3) in a register; it is snapshotted mid-run and stopped, then
//! restored twice at once: each copy must go on from the saved count to
//! the end with the right registers and memory. Damaged, foreign and
//! mismatched snapshots must each get their own error.

#[macro_use]
mod kvm_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_common::guest;
use locald_vmm::snapshot::{AfterSnapshot, SnapshotError, STATE_FILE};
use locald_vmm::{ConsoleConfig, Error, ExitStatus, SharedBuffer, VirtualMachine, VmConfig};

fn config(out: &SharedBuffer, restore: Option<&Path>) -> VmConfig {
    VmConfig {
        kernel: Some(guest("count")),
        vcpus: 2,
        memory_mib: 64,
        console: ConsoleConfig::Buffer {
            input: Vec::new(),
            output: out.clone(),
        },
        timeout: Some(Duration::from_secs(60)),
        restore: restore.map(Path::to_path_buf),
        ..VmConfig::default()
    }
}

fn tmp(name: &str) -> PathBuf {
    let p =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// The numbers of the complete `count N` lines of `text`.
fn counts(text: &str) -> Vec<u32> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("count "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Boots `count`, snapshots it into `dir` once it has counted to 5 and
/// stops it; returns its output.
fn snapshot_mid_run(dir: &Path) -> String {
    let out = SharedBuffer::default();
    let vm = VirtualMachine::new(config(&out, None)).expect("new");
    let vm = vm.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.text().contains("count 5\n") {
        assert!(Instant::now() < deadline, "no count 5: {}", out.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = vm.snapshot(dir, AfterSnapshot::Stop).expect("snapshot");
    assert!(info.state_bytes > 1000, "{info:?}");
    assert!(info.memory_written > 0, "{info:?}");
    let status = vm.wait().expect("wait");
    assert_eq!(status, ExitStatus::Snapshotted, "{}", out.text());
    let text = out.text().replace('\r', "");
    assert!(
        !text.contains("done"),
        "the guest finished before its snapshot: {text}"
    );
    text
}

#[test]
fn a_counting_guest_restored_twice_goes_on_from_its_count() {
    require_kvm!();
    let dir = tmp("count");
    let before = snapshot_mid_run(&dir);
    let saved = *counts(&before).last().expect("counts before the snapshot");
    assert!(saved >= 5, "{before}");
    // Private files in a private directory.
    use std::os::unix::fs::PermissionsExt;
    for f in ["state", "memory"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let out = SharedBuffer::default();
                let mut vm = VirtualMachine::new(config(&out, Some(&dir))).expect("restore");
                let status = vm.run().expect("run");
                (status, out.text().replace('\r', ""))
            })
        })
        .collect();
    // A restored VM that is dropped without running goes away at once.
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.clone();
    std::thread::spawn(move || {
        let out = SharedBuffer::default();
        let vm = VirtualMachine::new(config(&out, Some(&d))).expect("restore");
        drop(vm);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("dropping a restored VM that never ran hung");
    for r in runs {
        let (status, after) = r.join().expect("restore thread");
        assert_eq!(status, ExitStatus::Exited(0), "restored output:\n{after}");
        assert!(!after.contains("mismatch"), "{after}");
        assert!(
            !after.contains("counting"),
            "the restored guest booted anew: {after}"
        );
        assert!(after.ends_with("count 40\ndone\n"), "{after}");
        let c = counts(&after);
        // The first complete line is the saved count + 1, or (if the
        // snapshot caught a line half printed) the rest of that line.
        let first = c[0];
        assert!(
            first == saved + 1 || (!before.ends_with('\n') && first == saved + 2),
            "saved at {saved}, restored copy printed {first} first:\n{before}\n---\n{after}"
        );
        assert_eq!(c, (first..=40).collect::<Vec<_>>(), "{after}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn restore_error(dir: &Path, mut cfg: VmConfig) -> SnapshotError {
    cfg.restore = Some(dir.to_path_buf());
    match VirtualMachine::new(cfg) {
        Ok(_) => panic!("restoring {} succeeded", dir.display()),
        Err(Error::Snapshot(e)) => e,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn damaged_and_mismatched_snapshots_are_refused() {
    require_kvm!();
    let dir = tmp("bad");
    snapshot_mid_run(&dir);
    let out = SharedBuffer::default();
    // Another machine shape.
    let e = restore_error(
        &dir,
        VmConfig {
            memory_mib: 128,
            ..config(&out, None)
        },
    );
    assert!(matches!(e, SnapshotError::Mismatch(_)), "{e}");
    let e = restore_error(
        &dir,
        VmConfig {
            vcpus: 1,
            ..config(&out, None)
        },
    );
    assert!(matches!(e, SnapshotError::Mismatch(_)), "{e}");
    let e = restore_error(
        &dir,
        VmConfig {
            rng: !VmConfig::default().rng,
            ..config(&out, None)
        },
    );
    assert!(e.to_string().contains("devices"), "{e}");
    // A snapshot into a directory that holds one is refused.
    let vm = VirtualMachine::new(config(&out, None))
        .unwrap()
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    match vm.snapshot(&dir, AfterSnapshot::Resume) {
        Err(Error::Snapshot(SnapshotError::NotEmpty(_))) => {}
        other => panic!("snapshot into a used directory: {other:?}"),
    }
    drop(vm);
    // Damaged state files.
    let state = dir.join(STATE_FILE);
    let good = std::fs::read(&state).unwrap();
    let rewrite = |bytes: &[u8]| {
        std::fs::remove_file(&state).unwrap();
        std::fs::write(&state, bytes).unwrap();
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    rewrite(&flipped);
    let e = restore_error(&dir, config(&out, None));
    assert!(e.to_string().contains("checksum"), "{e}");
    rewrite(&good[..good.len() - 10]);
    let e = restore_error(&dir, config(&out, None));
    assert!(e.to_string().contains("truncated"), "{e}");
    rewrite(b"GIF89a not a snapshot at all, but long enough to have a header");
    let e = restore_error(&dir, config(&out, None));
    assert!(e.to_string().contains("not a locald-vmm snapshot"), "{e}");
    // A memory file shorter than the saved RAM.
    rewrite(&good);
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    mem.set_len(4096).unwrap();
    let e = restore_error(&dir, config(&out, None));
    assert!(matches!(e, SnapshotError::Memory(_)), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
