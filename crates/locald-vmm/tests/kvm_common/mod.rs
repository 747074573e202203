//! Shared helpers of the fast KVM tier (`tests/kvm_*.rs`): building the
//! tiny guests of `guests/`, skipping (the one `skip` function), running a guest
//! through the library, running the same guest on QEMU microvm, and
//! parsing the guests' memory-map lines.
//!
//! The guests are built at run time with GNU `as`/`ld` by the builder of
//! the `test-guests` crate, included by path: this crate has no dependency
//! on `test-guests`.

#![allow(dead_code)] // each test binary uses its own subset

#[path = "../../../test-guests/src/builder.rs"]
pub mod builder;

/// The one skip function (`skip(Why::..)`): prints, logs to
/// `LOCALD_VMM_SKIP_LOG`, panics in strict mode; see docs/testing.md.
#[path = "../../src/test_support.rs"]
pub mod skips;
#[allow(unused_imports)] // each test binary uses its own subset
pub use skips::{is_root, skip, Why};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use locald_vmm::{ConsoleConfig, ExitStatus, SharedBuffer, VirtualMachine, VmConfig};

/// Path of the built guest `name`; builds all guests on first use.
pub fn guest(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-guests");
        builder::build_all(&guests, &out).unwrap_or_else(|e| panic!("building test guests: {e}"));
        out
    });
    assert!(builder::spec(name).is_some(), "unknown guest {name}");
    dir.join(name)
}

/// True if `/dev/kvm` exists; otherwise records the skip ([`skip`]; a
/// failure in strict mode).
pub fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        skip(Why::NoKvm);
        false
    }
}

/// Returns from the test early (skipping it) when `/dev/kvm` is absent.
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_common::kvm_present() {
            return;
        }
    };
}

/// How to run one guest.
#[derive(Clone, Debug)]
pub struct Spec {
    pub guest: &'static str,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cmdline: Option<String>,
    pub input: Vec<u8>,
    pub timeout: Duration,
}

impl Spec {
    /// One vCPU, 64 MiB, no extra command line, no input, 60 s timeout.
    pub fn new(guest: &'static str) -> Spec {
        Spec {
            guest,
            vcpus: 1,
            memory_mib: 64,
            cmdline: None,
            input: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Slack for "run() returns promptly after its timeout": thread teardown
/// only, but on a loaded 2-core host with other tests' VMs running a
/// thread may wait seconds for a CPU. A lost kick shows as a hang, which
/// [`run_bounded`] turns into a failure.
pub const TIMEOUT_SLACK: Duration = Duration::from_secs(10);

/// [`run`] on another thread; fails if it does not return within
/// `spec.timeout + TIMEOUT_SLACK` (instead of hanging the test).
pub fn run_bounded(spec: &Spec) -> Outcome {
    let (tx, rx) = std::sync::mpsc::channel();
    let s = spec.clone();
    std::thread::spawn(move || {
        let _ = tx.send(run(&s));
    });
    let limit = spec.timeout + TIMEOUT_SLACK;
    match rx.recv_timeout(limit) {
        Ok(o) => o,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{}: run() did not return within {limit:?}", spec.guest)
        }
        Err(e) => panic!("{}: run() panicked ({e})", spec.guest),
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    /// Console output, `\r` removed.
    pub out: String,
    /// How long `run()` took (VM creation not included).
    pub elapsed: Duration,
}

impl Outcome {
    /// The console output as lines.
    pub fn lines(&self) -> Vec<&str> {
        self.out.lines().collect()
    }
}

/// Runs a guest through the library API and returns how it ended.
pub fn run(spec: &Spec) -> Outcome {
    let out = SharedBuffer::default();
    let cfg = VmConfig {
        kernel: Some(guest(spec.guest)),
        initrd: None,
        cmdline: spec.cmdline.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        console: ConsoleConfig::Buffer {
            input: spec.input.clone(),
            output: out.clone(),
        },
        timeout: Some(spec.timeout),
        ..VmConfig::default()
    };
    let mut vm = VirtualMachine::new(cfg)
        .unwrap_or_else(|e| panic!("{}: VirtualMachine::new: {e}", spec.guest));
    let start = Instant::now();
    let status = vm
        .run()
        .unwrap_or_else(|e| panic!("{}: run: {e}\noutput so far:\n{}", spec.guest, out.text()));
    Outcome {
        status,
        out: out.text().replace('\r', ""),
        elapsed: start.elapsed(),
    }
}

/// What QEMU produced: its stdout (`\r` removed) and exit code.
#[derive(Debug)]
pub struct QemuOutcome {
    pub out: String,
    pub code: Option<i32>,
}

impl QemuOutcome {
    /// The guest's exit-port status, decoded from isa-debug-exit's
    /// `(status << 1) | 1` process exit code.
    pub fn guest_status(&self) -> Option<u8> {
        match self.code {
            Some(c) if c & 1 == 1 => Some((c >> 1) as u8),
            _ => None,
        }
    }
}

/// True if `qemu-system-x86_64` can be run; otherwise records the skip of
/// the oracle comparison ([`skip`]; a failure in strict mode: CI installs
/// QEMU).
pub fn qemu_present() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        skip(Why::Missing(
            "qemu-system-x86_64 (QEMU oracle; apt-get install qemu-system-x86)",
        ));
    }
    ok
}

/// Runs `spec` on QEMU microvm (the reference the guests were written
/// against), killing it after `spec.timeout`.
pub fn run_qemu(spec: &Spec) -> QemuOutcome {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
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
    ])
    .arg("-m")
    .arg(spec.memory_mib.to_string())
    .arg("-smp")
    .arg(spec.vcpus.to_string())
    .arg("-kernel")
    .arg(guest(spec.guest));
    if let Some(c) = &spec.cmdline {
        cmd.arg("-append").arg(c);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning qemu-system-x86_64");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = spec.input.clone();
    // Keep stdin open until QEMU ends: EOF on stdio makes QEMU's serial
    // backend hang up, which some guests would see as no input.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
        stdin
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut v = String::new();
        let _ = stderr.read_to_string(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for qemu") {
            break Some(s);
        }
        if start.elapsed() > spec.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    drop(writer.join());
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let code = status.and_then(|s| s.code());
    if code.is_none() {
        eprintln!("qemu timed out or was killed; stderr:\n{err}");
    }
    QemuOutcome {
        out: String::from_utf8_lossy(&out).replace('\r', ""),
        code,
    }
}

/// One memory-map entry as printed by the guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Parses `<prefix> addr=0x.. size=0x.. type=0x..` lines.
pub fn parse_map(lines: &[&str], prefix: &str) -> Vec<MapEntry> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|rest| {
            let field = |name: &str| -> u64 {
                let v = rest
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {rest:?}"));
                u64::from_str_radix(v.trim_start_matches("0x"), 16)
                    .unwrap_or_else(|e| panic!("bad {name} in {rest:?}: {e}"))
            };
            MapEntry {
                addr: field("addr="),
                size: field("size="),
                kind: field("type=") as u32,
            }
        })
        .collect()
}

/// Checks a memory map against `memory_mib` of guest RAM: RAM (type 1)
/// from 0 to below 640 KiB, RAM from 1 MiB to the end of memory (below the
/// 32-bit hole, which these sizes never reach), nothing overlapping, no RAM
/// past the end, and all RAM adding up to at most `memory_mib`.
pub fn check_map(map: &[MapEntry], memory_mib: u64, what: &str) {
    let end = memory_mib << 20;
    let mut sorted = map.to_vec();
    sorted.sort_by_key(|e| e.addr);
    for w in sorted.windows(2) {
        assert!(
            w[0].addr + w[0].size <= w[1].addr,
            "{what}: overlapping entries {:x?} and {:x?}",
            w[0],
            w[1]
        );
    }
    let ram: Vec<&MapEntry> = sorted.iter().filter(|e| e.kind == 1).collect();
    assert!(
        ram.iter()
            .any(|e| e.addr == 0 && e.size > 0 && e.size <= 0xa0000),
        "{what}: no RAM entry from 0 below 640 KiB in {sorted:x?}"
    );
    assert!(
        ram.iter()
            .any(|e| e.addr == 0x10_0000 && e.addr + e.size == end),
        "{what}: no RAM entry from 1 MiB to {end:#x} in {sorted:x?}"
    );
    for e in &ram {
        assert!(
            e.addr + e.size <= end,
            "{what}: RAM past the end of memory: {e:x?}"
        );
        assert!(
            e.addr + e.size <= 0xa0000 || e.addr >= 0x10_0000,
            "{what}: RAM in the 640 KiB-1 MiB hole: {e:x?}"
        );
    }
    let total: u64 = ram.iter().map(|e| e.size).sum();
    assert!(total <= end, "{what}: {total:#x} bytes of RAM > {end:#x}");
}
