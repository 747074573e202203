//! Fast KVM tier for the virtio-mmio devices: the `virtio` guest (C,
//! `guests/virtio.c`) drives the block and entropy devices with a polled
//! driver written from the virtio 1.2 spec, including hostile requests,
//! and prints one `virtio: ...` line per step. These tests give it raw
//! disk images, check its lines, and check the images on the host
//! afterwards. They need `/dev/kvm` and skip (loudly) only when it is absent.

#[macro_use]
mod kvm_common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kvm_common::guest;
use locald_vmm::{
    ConsoleConfig, DiskConfig, Error, ExitStatus, SharedBuffer, VirtualMachine, VmConfig,
};

const SECTOR: usize = 512;
const IMAGE_BYTES: usize = 1 << 20;
const MEMORY_MIB: u64 = 128;

/// A fresh directory for one test's images (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "kvm_virtio-{test}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A recognisable sector: `tag`, then bytes that depend on their offset.
fn sector_pattern(tag: &str) -> Vec<u8> {
    let mut s: Vec<u8> = (0..SECTOR).map(|i| (i * 37 + 11) as u8).collect();
    s[..tag.len()].copy_from_slice(tag.as_bytes());
    s
}

/// What the guest writes to sector 1 (`make_pattern` in `guests/virtio.c`).
fn guest_pattern() -> Vec<u8> {
    let head = b"locald-virtio-blk sector 1\n";
    let mut s: Vec<u8> = (0..SECTOR).map(|i| b'a' + (i % 26) as u8).collect();
    s[..head.len()].copy_from_slice(head);
    s[SECTOR - 1] = b'\n';
    s
}

/// Writes a 1 MiB raw image whose sector 0 is `sector0` and sector 1 is
/// `sector1`; returns its bytes.
fn make_image(path: &Path, sector0: &[u8], sector1: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; IMAGE_BYTES];
    img[..SECTOR].copy_from_slice(sector0);
    img[SECTOR..2 * SECTOR].copy_from_slice(sector1);
    std::fs::write(path, &img).expect("write image");
    img
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The virtio guest with these devices.
fn config(disks: Vec<DiskConfig>, rng: bool, out: &SharedBuffer) -> VmConfig {
    VmConfig {
        kernel: Some(guest("virtio")),
        disks,
        rng,
        memory_mib: MEMORY_MIB,
        console: ConsoleConfig::Buffer {
            input: Vec::new(),
            output: out.clone(),
        },
        timeout: Some(Duration::from_secs(60)),
        ..VmConfig::default()
    }
}

/// Runs the virtio guest to the end; returns its status and output.
fn run(disks: Vec<DiskConfig>, rng: bool) -> (ExitStatus, String) {
    let out = SharedBuffer::default();
    let mut vm = VirtualMachine::new(config(disks, rng, &out))
        .unwrap_or_else(|e| panic!("VirtualMachine::new: {e}"));
    let status = vm
        .run()
        .unwrap_or_else(|e| panic!("run: {e}\noutput so far:\n{}", out.text()));
    let out = out.text().replace('\r', "");
    // Shown with --nocapture (and for failing tests).
    eprintln!("guest output ({status:?}):\n{out}");
    (status, out)
}

/// Asserts `out` has exactly the line `line`.
#[track_caller]
fn has_line(out: &str, line: &str) {
    assert!(
        out.lines().any(|l| l == line),
        "missing line {line:?} in output:\n{out}"
    );
}

/// The `virtio: devN ...` lines as (base, irq, id, vendor, version).
fn devices(out: &str) -> Vec<(u64, u32, u32, u32, u32)> {
    out.lines()
        .filter(|l| l.starts_with("virtio: dev"))
        .map(|l| {
            let field = |name: &str| -> &str {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {l:?}"))
            };
            let hexnum = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (
                hexnum(field("base=")),
                field("irq=").parse().unwrap(),
                field("id=").parse().unwrap(),
                hexnum(field("vendor=")) as u32,
                field("version=").parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn no_devices_boots_and_exits_0() {
    require_kvm!();
    let (status, out) = run(Vec::new(), false);
    assert_eq!(status, ExitStatus::Exited(0), "output:\n{out}");
    assert_eq!(
        out,
        "virtio: 0 devices\nvirtio: no writable disk, hostile cases skipped\nvirtio: all ok\n"
    );
}

#[test]
fn rng_only() {
    require_kvm!();
    let (status, out) = run(Vec::new(), true);
    assert_eq!(status, ExitStatus::Exited(0), "output:\n{out}");
    has_line(&out, "virtio: 1 devices");
    let ids: Vec<u32> = devices(&out).iter().map(|d| d.2).collect();
    assert_eq!(ids, [4], "output:\n{out}");
    assert_eq!(
        out.lines().filter(|l| *l == "virtio: rng ok 64").count(),
        2,
        "output:\n{out}"
    );
    has_line(&out, "virtio: rng differs");
    has_line(&out, "virtio: all ok");
}

/// A writable and a read-only image, and their contents before the run.
struct TwoDisks {
    _dir: Scratch,
    rw: PathBuf,
    ro: PathBuf,
    rw_before: Vec<u8>,
    ro_before: Vec<u8>,
}

fn two_disks(test: &str) -> TwoDisks {
    let dir = Scratch::new(test);
    let rw = dir.path("rw.img");
    let ro = dir.path("ro.img");
    let rw_before = make_image(
        &rw,
        &sector_pattern("locald rw disk sector 0"),
        &[0u8; SECTOR],
    );
    let ro_before = make_image(
        &ro,
        &sector_pattern("locald ro disk sector 0"),
        &sector_pattern("locald ro disk sector 1"),
    );
    TwoDisks {
        _dir: dir,
        rw,
        ro,
        rw_before,
        ro_before,
    }
}

impl TwoDisks {
    /// The lines any correct device gives the guest for these disks (blk0
    /// writable, blk1 read-only, then an entropy device), apart from the
    /// device list, the ids and the out-of-RAM buffer.
    fn check_lines(&self, out: &str) {
        // 2. The writable disk: capacity, sector 0, the write, FLUSH and
        // read-back, every request's status and used length.
        has_line(out, "virtio: blk0 capacity 2048 sectors ro=0 flush=1");
        has_line(out, "virtio: blk0 read sector 0 status 0 len 513");
        has_line(
            out,
            &format!("virtio: blk0 sector 0 {}", hex(&self.rw_before[..16])),
        );
        has_line(out, "virtio: blk0 write sector 1 status 0 len 1");
        has_line(out, "virtio: blk0 flush status 0");
        has_line(out, "virtio: blk0 read sector 1 status 0 matches");
        // The read-only disk offers VIRTIO_BLK_F_RO, refuses the write with
        // IOERR and keeps its data.
        // (FLUSH is optional on a disk that cannot be written.)
        assert!(
            out.lines()
                .any(|l| l.starts_with("virtio: blk1 capacity 2048 sectors ro=1 flush=")),
            "blk1: 2048 sectors and VIRTIO_BLK_F_RO offered:\n{out}"
        );
        has_line(
            out,
            &format!("virtio: blk1 sector 0 {}", hex(&self.ro_before[..16])),
        );
        has_line(out, "virtio: blk1 write sector 1 status 1 len 1");
        has_line(out, "virtio: blk1 read-only, sector 1 unchanged");

        // 3. Hostile cases on blk0.
        has_line(out, "virtio: hostile cases on blk0");
        has_line(
            out,
            "virtio: hostile setup (notify before DRIVER_OK, QueueNum 3) read status 0 ok",
        );
        has_line(out, "virtio: hostile read past end status 1");
        has_line(out, "virtio: hostile unknown type status 2");
        assert!(
            out.lines()
                .any(|l| l == "virtio: hostile loop chain completed len 0"
                    || l == "virtio: hostile loop chain needs reset"),
            "the looping chain must complete with length 0 or set NEEDS_RESET:\n{out}"
        );
        has_line(out, "virtio: hostile reset, read status 0 recovered");

        // 4. Entropy.
        assert_eq!(
            out.lines().filter(|l| *l == "virtio: rng ok 64").count(),
            2,
            "two 64-byte rng requests:\n{out}"
        );
        has_line(out, "virtio: rng differs");
    }

    /// On the host: sector 1 of the writable image holds the guest's
    /// pattern, everything else is as before; the read-only image is
    /// untouched.
    fn check_images(&self) {
        let rw_after = std::fs::read(&self.rw).expect("read rw image");
        assert_eq!(rw_after.len(), IMAGE_BYTES);
        assert_eq!(&rw_after[SECTOR..2 * SECTOR], guest_pattern().as_slice());
        assert_eq!(&rw_after[..SECTOR], &self.rw_before[..SECTOR]);
        assert!(
            rw_after[2 * SECTOR..] == self.rw_before[2 * SECTOR..],
            "the guest wrote only sector 1"
        );
        assert!(
            std::fs::read(&self.ro).expect("read ro image") == self.ro_before,
            "the read-only image changed"
        );
    }
}

#[test]
fn block_and_rng_devices() {
    require_kvm!();
    let disks = two_disks("blk");
    let (status, out) = run(
        vec![
            DiskConfig::new(&disks.rw),
            DiskConfig {
                read_only: true,
                ..DiskConfig::new(&disks.ro)
            },
        ],
        true,
    );
    assert_eq!(status, ExitStatus::Exited(0), "output:\n{out}");

    // 1. Disks first, in configuration order, then the entropy device; one
    // 4 KiB window and one interrupt line each, in the MMIO hole.
    has_line(&out, "virtio: 3 devices");
    let devs = devices(&out);
    let ids: Vec<u32> = devs.iter().map(|d| d.2).collect();
    assert_eq!(ids, [2, 2, 4], "device ids:\n{out}");
    for (i, d) in devs.iter().enumerate() {
        assert_eq!(d.4, 2, "dev{i} must be a modern (version 2) device:\n{out}");
        assert!(
            (0xc000_0000..0x1_0000_0000).contains(&d.0),
            "dev{i} base {:#x} outside the MMIO hole",
            d.0
        );
        for e in &devs[..i] {
            assert!(
                e.0 + 0x1000 <= d.0 || d.0 + 0x1000 <= e.0,
                "windows overlap:\n{out}"
            );
            assert_ne!(e.1, d.1, "two devices share irq {}:\n{out}", d.1);
        }
    }
    disks.check_lines(&out);
    // Without DiskConfig.id, GET_ID gives the image's file name.
    has_line(&out, "virtio: blk0 id \"rw.img\" status 0");
    has_line(&out, "virtio: blk1 id \"ro.img\" status 0");
    // A data buffer outside guest RAM (128 MiB) is an I/O error.
    has_line(&out, "virtio: hostile bad address 0xb0000000 status 1");
    has_line(&out, "virtio: all ok");
    assert!(!out.contains("FAIL"), "output:\n{out}");
    disks.check_images();
}

/// The same guest and disks on QEMU microvm (the reference device model),
/// which proves the guest's driver right independently of ours. QEMU places
/// its first device in the highest of its 512-byte virtio-mmio windows at
/// 0xfeb00000 and does not announce them to a PVH guest, so the windows
/// are put on the command line by hand, highest first (windows without a
/// device read DeviceID 0).
#[test]
fn qemu_oracle_agrees() {
    require_kvm!();
    if !kvm_common::qemu_present() {
        return;
    }
    use std::process::{Command, Stdio};
    let disks = two_disks("qemu");
    let mut append = String::new();
    for i in 0..8u64 {
        let base = 0xfeb0_0000 + (23 - i) * 0x200;
        append.push_str(&format!(" virtio_mmio.device=512@{base:#x}:{}", 5 + i));
    }
    let drive = |id: &str, path: &Path, ro: bool| {
        format!(
            "id={id},file={},format=raw,if=none{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-m",
            "128",
            "-global",
            "virtio-mmio.force-legacy=false",
        ])
        .arg("-kernel")
        .arg(guest("virtio"))
        .arg("-append")
        .arg(append.trim())
        .arg("-drive")
        .arg(drive("d0", &disks.rw, false))
        .args(["-device", "virtio-blk-device,drive=d0,serial=rw.img"])
        .arg("-drive")
        .arg(drive("d1", &disks.ro, true))
        .args(["-device", "virtio-blk-device,drive=d1,serial=ro.img"])
        .args(["-device", "virtio-rng-device"])
        // Keep stdin open: EOF would hang up QEMU's serial backend.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning qemu-system-x86_64");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for qemu") {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    let _ = child.stdout.take().unwrap().read_to_string(&mut out);
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let out = out.replace('\r', "");
    eprintln!("QEMU guest output ({status:?}):\n{out}\nQEMU stderr:\n{err}");
    let ids: Vec<u32> = devices(&out)
        .iter()
        .map(|d| d.2)
        .filter(|&id| id != 0)
        .collect();
    assert_eq!(ids, [2, 2, 4], "device ids on QEMU:\n{out}");
    disks.check_lines(&out);
    has_line(&out, "virtio: blk0 id \"rw.img\" status 0");
    has_line(&out, "virtio: blk1 id \"ro.img\" status 0");
    // Where QEMU is not an oracle: it completes a read into memory that is
    // not guest RAM with status OK (the DMA write goes nowhere), so the
    // guest reports that check, and only that one, as failed (code 32).
    assert!(
        out.lines()
            .any(|l| l.starts_with("virtio: hostile bad address 0xb0000000 status ")),
        "output:\n{out}"
    );
    has_line(&out, "virtio: FAILED code 32");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(32 << 1 | 1),
        "isa-debug-exit code for guest status 32; output:\n{out}"
    );
    disks.check_images();
}

#[test]
fn get_id_returns_the_configured_disk_id() {
    require_kvm!();
    let dir = Scratch::new("id");
    let a = dir.path("a.img");
    let b = dir.path("b.img");
    make_image(&a, &sector_pattern("a"), &[0u8; SECTOR]);
    make_image(&b, &sector_pattern("b"), &[0u8; SECTOR]);
    let (status, out) = run(
        vec![
            DiskConfig {
                id: Some("locald-serial-42".into()),
                ..DiskConfig::new(&a)
            },
            // Exactly 20 bytes: no NUL terminator in the reply.
            DiskConfig {
                id: Some("abcdefghijklmnopqrst".into()),
                read_only: true,
                ..DiskConfig::new(&b)
            },
        ],
        false,
    );
    assert_eq!(status, ExitStatus::Exited(0), "output:\n{out}");
    has_line(&out, "virtio: 2 devices");
    has_line(&out, "virtio: blk0 id \"locald-serial-42\" status 0");
    has_line(&out, "virtio: blk1 id \"abcdefghijklmnopqrst\" status 0");
}

#[test]
fn second_vm_on_the_same_writable_image_is_refused() {
    require_kvm!();
    let dir = Scratch::new("lock");
    let img = dir.path("shared.img");
    make_image(&img, &sector_pattern("shared"), &[0u8; SECTOR]);
    let out1 = SharedBuffer::default();
    let out2 = SharedBuffer::default();
    let first = VirtualMachine::new(config(vec![DiskConfig::new(&img)], false, &out1))
        .unwrap_or_else(|e| panic!("first VM: {e}"));
    let second = VirtualMachine::new(config(vec![DiskConfig::new(&img)], false, &out2));
    let err: Error = match second {
        Ok(_) => panic!("a second VM on a writable image in use must be refused"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.contains("lock"),
        "the error must say the image is locked: {msg}"
    );
    assert!(
        msg.contains("shared.img"),
        "the error must name the image: {msg}"
    );
    // Also read-only: a writer holds it.
    let third = VirtualMachine::new(config(
        vec![DiskConfig {
            read_only: true,
            ..DiskConfig::new(&img)
        }],
        false,
        &out2,
    ));
    assert!(
        third.is_err(),
        "a read-only VM on an image another VM writes must be refused"
    );
    // Once the first VM is gone, the image is free again.
    drop(first);
    let mut again = VirtualMachine::new(config(vec![DiskConfig::new(&img)], false, &out2))
        .unwrap_or_else(|e| panic!("after the first VM is dropped: {e}"));
    let status = again.run().expect("run");
    assert_eq!(status, ExitStatus::Exited(0), "output:\n{}", out2.text());
}
