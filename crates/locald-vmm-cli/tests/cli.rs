//! CLI tests of `locald-vmm run`: bad input must end with exit code 125
//! and exactly one clear error line on stderr (naming the file or flag),
//! never a panic; good input boots the tiny guests of `guests/` and the
//! process exit code is the guest's exit-port status.
//!
//! Tests that start a VM need `/dev/kvm` and skip (loudly) only without it.

mod common;

use common::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

macro_rules! require_kvm {
    () => {
        if !kvm_present() {
            return;
        }
    };
}

/// A scratch file under the cargo target dir, unique to this test.
fn scratch(name: &str, contents: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-inputs");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("scratch file");
    path
}

struct CliOutcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `locald-vmm` with `args`, stdin closed, killing it after 60 s.
fn cli(args: &[&str]) -> CliOutcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_locald-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning locald-vmm");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("locald-vmm {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    CliOutcome {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned(),
    }
}

/// Bad input: exit 125, one stderr line mentioning `mention`, no panic.
fn assert_clean_error(args: &[&str], mention: &str) {
    let o = cli(args);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !o.stderr.contains("panicked"),
        "locald-vmm {args:?} panicked:\n{}",
        o.stderr
    );
    assert_eq!(
        o.code,
        Some(VMM_ERROR),
        "locald-vmm {args:?}: exit code; stderr:\n{}",
        o.stderr
    );
    assert_eq!(
        lines.len(),
        1,
        "locald-vmm {args:?}: want exactly one error line, got:\n{}",
        o.stderr
    );
    assert!(
        lines[0].contains(mention),
        "locald-vmm {args:?}: error line should mention {mention:?}: {:?}",
        lines[0]
    );
    // The cause is said once (not repeated by an error chain).
    if let Some(i) = lines[0].find("(os error") {
        let cause = &lines[0][i..];
        let cause = &cause[..=cause.find(')').unwrap_or(cause.len() - 1)];
        assert_eq!(
            lines[0].matches(cause).count(),
            1,
            "locald-vmm {args:?}: the cause is repeated: {:?}",
            lines[0]
        );
    }
}

#[test]
fn missing_kernel_file() {
    let path = "/nonexistent/locald-test/vmlinux";
    assert_clean_error(&["run", "--kernel", path, "--memory", "64M"], path);
}

#[test]
fn kernel_is_a_directory() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let d = dir.to_str().expect("utf-8 path");
    assert_clean_error(&["run", "--kernel", d, "--memory", "64M"], d);
}

#[test]
fn empty_kernel_file() {
    require_kvm!();
    let p = scratch("empty-kernel", b"");
    let s = p.to_str().expect("utf-8 path");
    assert_clean_error(&["run", "--kernel", s, "--memory", "64M"], s);
}

#[test]
fn random_bytes_kernel() {
    require_kvm!();
    // Deterministic pseudo-random bytes (xorshift), 64 KiB.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let p = scratch("random-kernel", &bytes);
    let s = p.to_str().expect("utf-8 path");
    assert_clean_error(&["run", "--kernel", s, "--memory", "64M"], s);
}

#[test]
fn truncated_elf_kernel() {
    require_kvm!();
    let full = std::fs::read(guest("pvh_hello")).expect("pvh_hello");
    // The ELF header and part of the first program header.
    let p = scratch("truncated-elf", &full[..100]);
    let s = p.to_str().expect("utf-8 path");
    assert_clean_error(&["run", "--kernel", s, "--memory", "64M"], s);
}

#[test]
fn truncated_elf_segments_kernel() {
    require_kvm!();
    let full = std::fs::read(guest("pvh_hello")).expect("pvh_hello");
    // Headers intact, the loadable segment (at file offset 0x1000) cut.
    let p = scratch("truncated-elf-segments", &full[..0x1010]);
    let s = p.to_str().expect("utf-8 path");
    assert_clean_error(&["run", "--kernel", s, "--memory", "64M"], s);
}

#[test]
fn memory_zero() {
    let k = guest("pvh_exit0");
    let k = k.to_str().expect("utf-8 path");
    assert_clean_error(&["run", "--kernel", k, "--memory", "0"], "--memory");
}

#[test]
fn memory_100t() {
    let k = guest("pvh_exit0");
    let k = k.to_str().expect("utf-8 path");
    assert_clean_error(&["run", "--kernel", k, "--memory", "100T"], "--memory");
}

#[test]
fn memory_garbage() {
    let k = guest("pvh_exit0");
    let k = k.to_str().expect("utf-8 path");
    assert_clean_error(&["run", "--kernel", k, "--memory", "lots"], "lots");
}

#[test]
fn cpus_zero() {
    let k = guest("pvh_exit0");
    let k = k.to_str().expect("utf-8 path");
    assert_clean_error(
        &["run", "--kernel", k, "--memory", "64M", "--cpus", "0"],
        "--cpus",
    );
}

#[test]
fn cpus_1000() {
    let k = guest("pvh_exit0");
    let k = k.to_str().expect("utf-8 path");
    assert_clean_error(
        &["run", "--kernel", k, "--memory", "64M", "--cpus", "1000"],
        "--cpus",
    );
}

#[test]
fn missing_initrd_file() {
    let k = guest("pvh_exit0");
    let k = k.to_str().expect("utf-8 path");
    let initrd = "/nonexistent/locald-test/initrd.cpio";
    assert_clean_error(
        &["run", "--kernel", k, "--initrd", initrd, "--memory", "64M"],
        initrd,
    );
}

#[test]
fn runs_pvh_guest_and_passes_cmdline() {
    require_kvm!();
    let k = guest("pvh_hello");
    let o = cli(&[
        "run",
        "--kernel",
        k.to_str().expect("utf-8 path"),
        "--memory",
        "64M",
        "--cmdline",
        "cli.test=1",
    ]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    let out = o.stdout.replace('\r', "");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"pvh ok"), "stdout:\n{out}");
    assert!(
        lines[1].starts_with("cmdline: ") && lines[1].ends_with("cli.test=1"),
        "stdout:\n{out}"
    );
}

#[test]
fn exit_code_is_the_guest_status() {
    require_kvm!();
    let k = guest("smp");
    let o = cli(&[
        "run",
        "--kernel",
        k.to_str().expect("utf-8 path"),
        "--memory",
        "64M",
        "--cpus",
        "2",
    ]);
    assert_eq!(
        o.code,
        Some(2),
        "stdout:\n{}\nstderr:\n{}",
        o.stdout,
        o.stderr
    );
    assert!(o.stdout.contains("aps started: 1"), "stdout:\n{}", o.stdout);
}

#[test]
fn triple_fault_exits_125_with_a_message() {
    require_kvm!();
    let k = guest("triple_fault_ud2");
    let o = cli(&[
        "run",
        "--kernel",
        k.to_str().expect("utf-8 path"),
        "--memory",
        "64M",
    ]);
    assert_eq!(o.code, Some(VMM_ERROR), "stderr:\n{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "stderr:\n{}", o.stderr);
    assert!(
        o.stderr.to_lowercase().contains("triple fault"),
        "stderr should say what happened:\n{}",
        o.stderr
    );
}

#[test]
fn i8042_reset_exits_0() {
    require_kvm!();
    let k = guest("i8042_reset");
    let o = cli(&[
        "run",
        "--kernel",
        k.to_str().expect("utf-8 path"),
        "--memory",
        "64M",
    ]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert_eq!(o.stdout.replace('\r', ""), "resetting\n");
}

#[test]
fn bzimage_via_cli() {
    require_kvm!();
    let k = guest("bzimage");
    let o = cli(&[
        "run",
        "--kernel",
        k.to_str().expect("utf-8 path"),
        "--memory",
        "64M",
    ]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    assert!(o.stdout.starts_with("bzimage ok"), "stdout:\n{}", o.stdout);
}

#[test]
fn missing_disk_image() {
    let k = guest("pvh_exit0");
    let path = "/nonexistent/locald-test/disk.img";
    assert_clean_error(
        &["run", "--kernel", k.to_str().unwrap(), "--disk", path],
        path,
    );
}

#[test]
fn disk_bad_option() {
    let k = guest("pvh_exit0");
    let img = scratch("bad-option.img", &[0u8; 4096]);
    let spec = format!("{},cache=bogus", img.display());
    assert_clean_error(
        &["run", "--kernel", k.to_str().unwrap(), "--disk", &spec],
        "cache mode",
    );
    let spec = format!("{},frobnicate", img.display());
    assert_clean_error(
        &["run", "--kernel", k.to_str().unwrap(), "--disk", &spec],
        "frobnicate",
    );
}

#[test]
fn disk_is_a_directory() {
    let k = guest("pvh_exit0");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    assert_clean_error(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--disk",
            dir.to_str().unwrap(),
        ],
        "not a regular file",
    );
}

#[test]
fn rootfs_needs_the_guest_init() {
    let k = guest("pvh_exit0");
    let img = scratch("rootfs-no-init.img", &[0u8; 4096]);
    assert_clean_error(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--rootfs",
            img.to_str().unwrap(),
        ],
        "guest init",
    );
}

#[test]
fn mkrootfs_bad_input() {
    assert_clean_error(
        &[
            "mkrootfs",
            "--from",
            "/nonexistent/locald-src",
            "/tmp/never-written.img",
        ],
        "/nonexistent/locald-src",
    );
    assert!(!Path::new("/tmp/never-written.img").exists());
    assert_clean_error(&["mkrootfs", "--size", "lots", "/tmp/x.img"], "--size");
}

#[test]
fn named_vm_bad_input() {
    assert_clean_error(
        &["exec", "no-such-vm-x1", "--", "true"],
        "no VM named 'no-such-vm-x1'",
    );
    assert_clean_error(&["stop", "no-such-vm-x1"], "no VM named 'no-such-vm-x1'");
    assert_clean_error(&["exec", "../etc", "--", "true"], "invalid VM name");
    assert_clean_error(&["start", "--name", "a/b"], "invalid VM name");
    assert_clean_error(
        &["start", "--name", "ok", "--", "true"],
        "start takes no command",
    );
}

#[test]
fn stale_named_vm_is_reported_and_cleaned_up() {
    // What a crashed VMM leaves: its directory and a control socket that
    // nobody serves.
    let dir = runtime_base()
        .join("vms")
        .join(format!("stale{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    drop(std::os::unix::net::UnixListener::bind(dir.join("control.sock")).unwrap());
    let name = dir.file_name().unwrap().to_str().unwrap().to_string();
    assert_clean_error(&["exec", &name, "--", "true"], "is not running");
    assert!(!dir.exists(), "stale state removed");
    // ps lists nothing for it afterwards.
    let ps = cli(&["ps"]);
    assert_eq!(ps.code, Some(0));
    assert!(!ps.stdout.contains(&name));
}

#[test]
fn publish_needs_a_valid_mapping() {
    assert_clean_error(&["run", "-p", "80", "--", "true"], "HOST_PORT:GUEST_PORT");
    assert_clean_error(&["run", "-p", "0:80", "--", "true"], "HOST_PORT:GUEST_PORT");
    let k = guest("pvh_exit0");
    assert_clean_error(
        &["run", "--kernel", k.to_str().unwrap(), "-p", "8080:80"],
        "need the guest agent",
    );
}

#[test]
fn out_of_file_descriptors_is_one_clear_line() {
    if !kvm_present() {
        return;
    }
    let kernel = guest("pvh_hello");
    let mut failures = 0;
    // Every limit from "fails at once" to "enough": setup steps before and
    // after the main thread's seccomp filter each get their turn to fail.
    for limit in 5u64..=24 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_locald-vmm"));
        cmd.args(["run", "--kernel"])
            .arg(&kernel)
            .stdin(Stdio::null());
        // SAFETY: setrlimit is async-signal-safe; the closure touches no
        // state shared with the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().expect("spawning locald-vmm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!stderr.contains("panicked"), "limit {limit}: {stderr}");
        if out.status.code() == Some(0) {
            continue;
        }
        failures += 1;
        assert_eq!(
            out.status.code(),
            Some(VMM_ERROR),
            "limit {limit}: {stderr}"
        );
        assert_eq!(lines.len(), 1, "limit {limit}: one line, got:\n{stderr}");
        assert!(
            lines[0].contains("out of file descriptors"),
            "limit {limit}: {:?}",
            lines[0]
        );
        assert_eq!(
            lines[0].matches("(os error 24)").count(),
            1,
            "limit {limit}: cause repeated: {:?}",
            lines[0]
        );
    }
    assert!(failures > 0, "even 5 fds were enough?");
}

#[test]
fn absurd_timeout_is_one_clear_line() {
    assert_clean_error(&["run", "--timeout", "1e300", "--", "true"], "--timeout");
}

/// A VMM killed with SIGKILL (no cleanup runs) leaves nothing that blocks
/// the next VM: its disk lock goes with the process, and a new VM on the
/// same writable image starts and finishes normally.
#[test]
fn sigkilled_vmm_leaves_no_lock_behind() {
    if !kvm_present() {
        return;
    }
    let img = scratch("sigkill.img", &vec![0u8; 1 << 20]);
    let spin = guest("spin");
    let mut child = Command::new(env!("CARGO_BIN_EXE_locald-vmm"))
        .args(["run", "--kernel"])
        .arg(&spin)
        .arg("--disk")
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning locald-vmm");
    // The guest prints before it spins: by then the VM holds the lock.
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("spinning") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "the spinning VM ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // While it runs, the image is locked: a second VM is refused.
    let mut refused = None;
    let mut last = String::new();
    for _ in 0..100 {
        let o = cli(&[
            "run",
            "--kernel",
            guest("pvh_hello").to_str().unwrap(),
            "--disk",
            img.to_str().unwrap(),
        ]);
        if o.code == Some(VMM_ERROR) && o.stderr.contains("in use") {
            refused = Some(o.stderr);
            break;
        }
        last = format!("{:?}: {}", o.code, o.stderr);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        refused.is_some(),
        "the running VM holds the disk lock; last: {last}; spinning VM: {:?}",
        child.try_wait()
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let o = cli(&[
        "run",
        "--kernel",
        guest("pvh_hello").to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
    ]);
    assert_eq!(o.code, Some(0), "after SIGKILL: {}", o.stderr);
}
