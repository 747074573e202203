//! Real-Linux tier: SIGTERM to a named VM's VMM process (`serve`), with
//! seccomp on (the default). One boot checks that the guest is powered off
//! cleanly through its agent (a file written, not synced, on a mounted
//! ext4 disk is on the host image afterwards), that the process exits
//! within the grace period, and that its state directory and sockets are
//! gone. A second boot checks that a second signal ends `run` at once
//! while a command's output is being relayed. Skips only when /dev/kvm is
//! absent, and says so loudly.

mod common;

use common::*;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_locald-vmm"));
    c.env("LOCALD_VMM_LOG", "info")
        .env_remove("LOCALD_VMM_SECCOMP_SELFTEST");
    c
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn sigterm_powers_a_named_vm_off_cleanly() {
    if !kvm_present() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-signals");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.ext4");
    host("mkfs.ext4", &["-q", "-F", data.to_str().unwrap(), "16M"]);
    let name = format!("sig{}", std::process::id());
    let started = vmm()
        .args([
            "start",
            "--name",
            &name,
            "--timeout",
            "900",
            "--agent-timeout",
            "600",
        ])
        .arg("--disk")
        .arg(&data)
        .output()
        .expect("start");
    assert!(
        started.status.success(),
        "start failed: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    // Written and left mounted, never synced by the command: only a clean
    // poweroff (the guest flushes and unmounts) puts it on the image.
    let out = vmm()
        .args(["exec", &name, "--", "sh", "-c"])
        .arg("mount /dev/vda /mnt && echo 'written before SIGTERM' > /mnt/sig.txt && echo ok")
        .output()
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ps = String::from_utf8_lossy(&vmm().arg("ps").output().unwrap().stdout).into_owned();
    let pid: i32 = ps
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for {name} in ps: {ps}"));
    let state = runtime_base().join("vms").join(&name);
    assert!(state.join("control.sock").exists());

    // SAFETY: signals the VMM process we started (its pid from `ps`).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let sent = Instant::now();
    // Grace period 10 s, plus teardown; generous for a loaded host.
    while !gone(pid) || state.exists() {
        assert!(
            sent.elapsed() < Duration::from_secs(30),
            "VMM {pid} still there after SIGTERM (state dir exists: {})",
            state.exists()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("VMM ended {:?} after SIGTERM", sent.elapsed());
    assert!(!state.exists(), "state directory left behind");
    assert_eq!(
        host("debugfs", &["-R", "cat /sig.txt", data.to_str().unwrap()]).trim(),
        "written before SIGTERM"
    );
    // A clean unmount leaves the file system clean.
    host("e2fsck", &["-n", "-f", data.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second signal stops `run` at once, even while the command's streams
/// are being relayed: the VM is stopped by force (no clean poweroff), and
/// the relay must not keep the process alive. (It once did: the stopped
/// VM's vsock device kept the agent connection open and the relay read
/// from it forever.)
#[test]
fn second_sigterm_ends_run_at_once_mid_command() {
    if !kvm_present() {
        return;
    }
    let mut child = vmm()
        .args(["run", "--agent-timeout", "600", "--timeout", "900", "--"])
        .args(["sh", "-c", "echo started; exec sleep 1000"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn run");
    let pid = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The command runs and its output is being relayed.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l == "started" => break,
            _ if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("the command never started");
            }
            _ => {}
        }
    }
    // SAFETY: signals the VMM process we spawned, twice.
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGTERM), 0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(libc::kill(pid, libc::SIGTERM), 0);
    }
    let sent = Instant::now();
    // Under the signals thread's 10 s safety net (which exits the process
    // whatever it waits on): the relay itself must end.
    while !gone(pid) {
        if sent.elapsed() > Duration::from_secs(8) {
            let _ = child.kill();
            panic!("VMM {pid} still running 8 s after the second SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("VMM ended {:?} after the second SIGTERM", sent.elapsed());
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("stopping the VM now"), "{stderr}");
}
