//! Real-Linux tier, hostile guest: a program run as root inside the default
//! guest (`guests/linux/hostile.c`, built here with `gcc -static` and
//! shipped through a read-only share) pokes virtio-mmio registers through
//! `/dev/mem` with lying rings, floods the serial port and vsock. The VMM
//! must survive, log what it refused, and the rest of the VM must keep
//! working: the agent, a disk the program did not touch, the share, and a
//! guest→host vsock stream whose every byte the test checks. One boot.
//! Skips only when /dev/kvm is absent, and says so loudly.

mod common;

use common::*;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The CLI with its runtime dir under `run`.
fn vmm(run: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_locald-vmm"));
    c.env("LOCALD_VMM_LOG", "info").env("XDG_RUNTIME_DIR", run);
    c
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The byte at stream offset `i` of what the program sends.
fn pattern(i: usize) -> u8 {
    ((i * 7 + 3) & 0xff) as u8
}

#[test]
fn hostile_guest_program_leaves_the_vmm_and_the_vm_working() {
    if !kvm_present() {
        return;
    }
    // Short: Unix socket paths are limited to 107 bytes.
    let dir = PathBuf::from(format!("/tmp/lh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _scratch = Scratch(dir.clone());
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    let share = dir.join("bin");
    std::fs::create_dir(&share).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/linux/hostile.c");
    let cc = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(share.join("hostile"))
        .arg(&src)
        .output()
        .expect("run gcc (scripts/setup-host.sh installs it)");
    assert!(
        cc.status.success(),
        "gcc -static hostile.c: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    // vda: a disk the program leaves alone; vdb: its victim.
    let data = dir.join("data.img");
    let victim = dir.join("victim.img");
    std::fs::write(&data, vec![0u8; 4 << 20]).unwrap();
    std::fs::write(&victim, vec![0u8; 1 << 20]).unwrap();
    let name = format!("h{}", std::process::id());
    let started = vmm(&run)
        .args([
            "start",
            "--name",
            &name,
            "--timeout",
            "900",
            "--agent-timeout",
            "300",
            "--disk",
        ])
        .arg(&data)
        .arg("--disk")
        .arg(&victim)
        .arg("--share")
        .arg(format!("{}:/opt/hostile:ro", share.display()))
        .output()
        .expect("start");
    assert!(
        started.status.success(),
        "start failed: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let state = run.join("locald-vmm/vms").join(&name);
    // Whatever happens below, the VM does not outlive the test.
    struct StopOnDrop(PathBuf, String);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = vmm(&self.0).args(["stop", &self.1]).output();
        }
    }
    let _stop = StopOnDrop(run.clone(), name.clone());
    // The host side of the guest's stream: `<vsock uds>_5000`.
    let listener = UnixListener::bind(state.join("vsock.sock_5000")).unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let exec = |args: &[&str]| {
        let out = vmm(&run)
            .args(["exec", &name, "--"])
            .args(args)
            .output()
            .expect("exec");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = exec(&[
        "/opt/hostile/hostile",
        "mmio",
        "rng",
        "blk1",
        "serial",
        "vsock",
        "5000",
    ]);
    eprintln!("hostile program ({code:?}):\n{out}{err}");
    // Lossy: the guest's serial flood lands in the same file.
    let log =
        String::from_utf8_lossy(&std::fs::read(state.join("console.log")).unwrap_or_default())
            .into_owned();
    if code != Some(0) {
        panic!("hostile program failed ({code:?}):\n{out}\n{err}\nVMM log:\n{log}");
    }
    assert!(out.contains("hostile: done"), "{out}");
    assert!(
        state.join("control.sock").exists(),
        "the VMM is gone after the attack"
    );
    // It found and attacked both targets (blk1 and the entropy device).
    let attacked = out
        .lines()
        .filter(|l| l.starts_with("hostile: attacking"))
        .count();
    assert_eq!(attacked, 2, "{out}");
    // Rings outside guest RAM: the device refuses DRIVER_OK with NEEDS_RESET.
    let refused = out
        .lines()
        .filter(|l| l.contains("rings outside RAM") && l.contains("needs_reset=1"))
        .count();
    assert_eq!(refused, 2, "{out}");
    assert!(out.contains("hostile: serial random register writes 20000"));
    assert!(out.contains("hostile: vsock 300 connects to closed ports: 300 refused"));

    // The rest of the VM still works: agent, the untouched disk (written
    // with fsync and read back on the host below), the share.
    assert!(
        state.join("control.sock").exists(),
        "the VMM is gone after the vsock stream"
    );
    let (code, out, err) = exec(&[
        "sh",
        "-c",
        "printf 'still-alive-7f3a' | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null \
         && dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 16; echo; \
         ls /opt/hostile",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "still-alive-7f3a\nhostile\n");
    // Every byte of the guest's stream arrived, in order.
    let got = sink.join().unwrap();
    assert!(
        state.join("control.sock").exists(),
        "the VMM is gone after the checks"
    );
    assert_eq!(got.len(), 1 << 20, "stream length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != pattern(i)) {
        panic!("stream differs at byte {i}");
    }
    // The VMM logged what it refused (read while the VM still runs).
    eprintln!("VMM log:\n{log}");
    for want in [
        "virtio-blk vdb: queue layout invalid at DRIVER_OK",
        "virtio-rng: queue layout invalid at DRIVER_OK",
        "virtio-blk vdb: descriptor chain cut short",
    ] {
        assert!(log.contains(want), "VMM log lacks {want:?}:\n{log}");
    }
    let stopped = vmm(&run).args(["stop", &name]).output().unwrap();
    assert!(
        stopped.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert!(!state.exists(), "state dir left behind");
    let disk = std::fs::read(&data).unwrap();
    assert_eq!(&disk[8 * 512..8 * 512 + 16], b"still-alive-7f3a");
}
