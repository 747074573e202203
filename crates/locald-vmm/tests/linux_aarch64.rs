//! Real-Linux tier, arm64: one boot of the aarch64 default guest (the
//! cross-built kernel `Image`, the aarch64 init and Debian's arm64 busybox)
//! under `qemu-system-aarch64 -M virt -cpu max` (TCG, Debian's
//! `qemu-system-arm`), with virtio-pci block, net and rng devices.
//!
//! locald-vmm cannot run an arm64 guest on this x86_64 host, so QEMU stands
//! in for the Virtualization.framework backend: the same kernel and
//! initramfs, a command archive appended as `VirtualMachine::new` does, and
//! the serial path (PL011, `console=ttyAMA0`). There is no exit port on
//! arm64: the init prints `locald-init: exit status N` and powers off
//! through PSCI, which ends QEMU. The command reads a file from an ext4
//! image on the virtio-pci disk and exits 42; the test checks the output,
//! the status line, the file contents and the three PCI devices, and prints
//! the boot time (QEMU start → first line of the command's output).
//!
//! Needs `qemu-system-aarch64`, `mkfs.ext4`, the aarch64 init embedded at
//! build time (cross toolchain, see docs/guest-init.md) and the aarch64
//! kernel, which the first run builds (~10 min on 2 cores; `locald-vmm
//! prepare --arch aarch64` does it ahead). Skips loudly without the tools;
//! in strict mode those skips fail (`scripts/setup-host.sh` installs them).

#[path = "../src/test_support.rs"]
mod skips;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use locald_vmm::assets::{self, AssetError, GuestCommand};
use locald_vmm::config::GuestArch;
use skips::{skip, Why};

const QEMU: &str = "qemu-system-aarch64";
/// The whole boot + command must finish within this (TCG on 2 cores).
const TIMEOUT: Duration = Duration::from_secs(240);
/// Contents of the file the guest reads from the disk.
const DISK_FILE: &str = "read from the virtio-pci disk: 4f1c9e\n";
/// The command's exit code.
const EXIT_CODE: u8 = 42;

fn tool_present(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A private scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("locald-vmm-aarch64-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An 8 MiB ext4 image holding `hello.txt` (mkfs.ext4 -d, no root needed).
fn ext4_image(dir: &Path) -> PathBuf {
    let src = dir.join("disk-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), DISK_FILE).unwrap();
    let img = dir.join("disk.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "armtest", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("8M")
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

/// The guest command: mount the disk, print the file and what the PCI bus,
/// the network and the entropy device look like, exit [`EXIT_CODE`].
const SCRIPT: &str = r#"
echo "arm64 guest: $(uname -m) $(uname -r)"
mount -t ext4 -o ro /dev/vda /mnt || echo "mount failed"
echo "file: $(cat /mnt/hello.txt)"
for d in /sys/bus/pci/devices/*; do
    echo "pci $(cat $d/vendor):$(cat $d/device)"
done
echo "net: $(ls /sys/class/net | tr '\n' ' ')"
echo "rng: $(cat /sys/class/misc/hw_random/rng_current)"
echo "console: $(cat /proc/consoles | cut -d' ' -f1)"
exit 42
"#;

/// Boots the aarch64 default guest under QEMU and checks the command ran.
#[test]
fn aarch64_default_guest_boots_under_qemu_virt() {
    if !tool_present(QEMU, "--version") {
        skip(Why::Missing(
            "qemu-system-aarch64 (apt-get install qemu-system-arm)",
        ));
        return;
    }
    if !tool_present("mkfs.ext4", "-V") {
        skip(Why::Missing("mkfs.ext4 (apt-get install e2fsprogs)"));
        return;
    }
    let arch = GuestArch::Aarch64;
    let initramfs = match assets::default_initramfs_for(arch) {
        Ok(p) => p,
        Err(e @ AssetError::NoGuestInit { .. }) => {
            let why = e.to_string();
            skip(Why::Missing(&why));
            return;
        }
        Err(e) => panic!("aarch64 initramfs: {e}"),
    };
    let kernel = assets::default_kernel_for(arch).expect("aarch64 kernel");
    let scratch = Scratch::new();
    let disk = ext4_image(&scratch.0);

    // The base initramfs, padded to 4 bytes, then the command spec.
    let mut initrd = std::fs::read(&initramfs).unwrap();
    while initrd.len() % 4 != 0 {
        initrd.push(0);
    }
    initrd.extend_from_slice(&assets::command_archive(&GuestCommand {
        argv: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
        ..GuestCommand::default()
    }));
    let initrd_path = scratch.0.join("initrd.cpio");
    std::fs::write(&initrd_path, &initrd).unwrap();

    let mut cmd = Command::new(QEMU);
    cmd.args(["-M", "virt", "-cpu", "max,pauth-impdef=on", "-smp", "1"])
        .args(["-m", "256", "-nodefaults", "-no-user-config", "-display"])
        .args(["none", "-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(&initrd_path)
        .args(["-append", "console=ttyAMA0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw,readonly=on",
            disk.display()
        ))
        // Modern-only virtio-pci (virtio 1.x, no legacy I/O BAR), as VZ has.
        .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"])
        .args(["-netdev", "user,id=n0"])
        .args(["-device", "virtio-net-pci,netdev=n0,disable-legacy=on"])
        .args(["-device", "virtio-rng-pci,disable-legacy=on"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn qemu-system-aarch64");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<(Duration, String)> = Vec::new();
    let mut timed_out = false;
    loop {
        let left = TIMEOUT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().expect("wait for qemu");
    let total = start.elapsed();
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let text: String = lines
        .iter()
        .map(|(t, l)| format!("[{:7.3}] {l}\n", t.as_secs_f64()))
        .collect();
    eprintln!("--- serial console ---\n{text}--- qemu stderr ---\n{stderr}");
    assert!(!timed_out, "QEMU did not finish within {TIMEOUT:?}");
    assert!(status.success(), "qemu exited with {status}");

    let find = |prefix: &str| {
        lines
            .iter()
            .find(|(_, l)| l.trim_end_matches('\r').starts_with(prefix))
            .map(|(t, l)| (*t, l.trim_end_matches('\r').to_owned()))
    };
    let (boot, first) = find("arm64 guest: ").expect("the command's first line");
    assert!(
        first.contains("aarch64") && first.contains("-locald-vmm"),
        "{first}"
    );
    let (_, file) = find("file: ").expect("file line");
    assert_eq!(file, format!("file: {}", DISK_FILE.trim_end()));
    // virtio 1.0 PCI ids: 0x1af4 with device 0x1040 + virtio id
    // (net 1, block 2, rng 4).
    for dev in ["0x1af4:0x1041", "0x1af4:0x1042", "0x1af4:0x1044"] {
        assert!(
            find(&format!("pci {dev}")).is_some(),
            "virtio-pci device {dev} missing"
        );
    }
    let (_, net) = find("net: ").expect("net line");
    assert!(net.contains("eth0"), "{net}");
    let (_, rng) = find("rng: ").expect("rng line");
    assert!(rng.contains("virtio_rng"), "{rng}");
    let (_, console) = find("console: ").expect("console line");
    assert!(console.contains("ttyAMA0"), "{console}");
    let (_, exit) = find("locald-init: exit status").expect("exit status line");
    assert_eq!(exit, format!("locald-init: exit status {EXIT_CODE}"));
    eprintln!(
        "aarch64 boot (QEMU TCG, -M virt -cpu max): QEMU start -> command output {:.2} s, \
         -> QEMU exit {:.2} s",
        boot.as_secs_f64(),
        total.as_secs_f64()
    );
}
