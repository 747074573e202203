//! Seccomp and signals through the CLI, on the tiny guests (fast KVM tier).
//!
//! - A forbidden call from each kind of thread (main, vCPU, a device
//!   worker, console input, the signal thread) ends the process with exit
//!   status 159 and one line naming the thread and the call. The call is
//!   made by the `LOCALD_VMM_SECCOMP_SELFTEST` hook right after the thread
//!   installs its filter; with `--no-seccomp` the same run succeeds.
//! - The `virtio` guest (block, entropy) passes under the filters.
//! - Every thread of a running VMM, the seccomp spawner included, shows
//!   seccomp mode 2 (filter) in `/proc/PID/task/TID/status`.
//! - SIGTERM / SIGINT stop a running VM within the grace period with exit
//!   status 143 / 130, releasing its disk (a second VM can open it).
//!
//! Needs `/dev/kvm`; skips (loudly) only without it.

mod common;

use common::*;

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Exit status after a seccomp violation (128 + SIGSYS).
const SECCOMP_EXIT: i32 = 159;

/// A fresh 1 MiB disk image for test `tag`.
fn disk(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seccomp-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{tag}.img"));
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_locald-vmm"));
    // Stdin is an empty pipe rather than /dev/null: the VMM starts no
    // console input thread for /dev/null, and its filter is tested here.
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("LOCALD_VMM_SECCOMP_SELFTEST");
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("spawning locald-vmm");
    drop(child.stdin.take());
    child
}

struct Done {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// A child's stdout, read line by line on a thread, so a test can wait
/// for a line and still collect the rest.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: String,
}

impl Lines {
    fn take(child: &mut Child) -> Lines {
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: String::new(),
        }
    }

    /// Waits (at most `limit`) for a line containing `want`.
    fn wait_for(&mut self, want: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.seen.contains(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push_str(&l);
                    self.seen.push('\n');
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Everything read, up to EOF.
    fn rest(mut self) -> String {
        for l in self.rx.iter() {
            self.seen.push_str(&l);
            self.seen.push('\n');
        }
        self.seen
    }
}

/// Waits for `child` (killing it after `limit`) and collects its output
/// (stdout only if nobody took it).
fn finish(mut child: Child, limit: Duration) -> Done {
    let start = Instant::now();
    let out = child.stdout.take();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut out) = out {
            let _ = out.read_to_string(&mut s);
        }
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Done {
        code: status.code(),
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
        took: start.elapsed(),
    }
}

/// Runs the virtio guest with a disk and the entropy device.
fn virtio_run(tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Done {
    let img = disk(tag);
    let g = guest("virtio");
    let mut args = vec![
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--memory",
        "128M",
        "--disk",
        img.to_str().unwrap(),
        "--timeout",
        "60",
    ];
    args.extend_from_slice(extra);
    finish(spawn(&args, env), Duration::from_secs(90))
}

fn assert_violation(selftest: &str, thread: &str) {
    let d = virtio_run(
        &format!("violation-{}", selftest.replace(' ', "-")),
        &[],
        &[("LOCALD_VMM_SECCOMP_SELFTEST", selftest)],
    );
    let want = format!("seccomp: thread '{thread}' made forbidden syscall 101 (ptrace)");
    assert_eq!(
        d.code,
        Some(SECCOMP_EXIT),
        "selftest {selftest}: stderr {}",
        d.stderr
    );
    let lines: Vec<&str> = d.stderr.lines().filter(|l| l.contains("seccomp")).collect();
    assert_eq!(lines.len(), 1, "one seccomp line: {}", d.stderr);
    assert!(lines[0].starts_with(&want), "{want:?} in {:?}", d.stderr);
    assert!(!d.stderr.contains("panicked"), "{}", d.stderr);
}

#[test]
fn forbidden_call_on_the_main_thread_ends_the_vmm() {
    if kvm_present() {
        assert_violation("main", "main");
    }
}

#[test]
fn forbidden_call_on_a_vcpu_thread_ends_the_vmm() {
    if kvm_present() {
        assert_violation("vcpu", "vcpu 0");
    }
}

#[test]
fn forbidden_call_on_a_worker_thread_ends_the_vmm() {
    if kvm_present() {
        assert_violation("virtio-blk vda", "virtio-blk vda");
        assert_violation("virtio-rng", "virtio-rng");
    }
}

#[test]
fn forbidden_call_on_a_control_thread_ends_the_vmm() {
    if kvm_present() {
        assert_violation("console input", "console input");
        assert_violation("signals", "signals");
    }
}

#[test]
fn forbidden_call_on_the_spawner_thread_ends_the_vmm() {
    if kvm_present() {
        assert_violation("seccomp spawner", "seccomp spawner");
    }
}

/// `(thread name, Seccomp mode)` of every thread of process `pid`.
fn thread_seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for t in tasks.filter_map(Result::ok) {
        let (Ok(status), Ok(comm)) = (
            std::fs::read_to_string(t.path().join("status")),
            std::fs::read_to_string(t.path().join("comm")),
        ) else {
            continue; // the thread just ended
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(|m| m.trim().to_string())
            .unwrap_or_default();
        v.push((comm.trim().to_string(), mode));
    }
    v.sort();
    v
}

/// Every thread the VMM keeps while a guest runs is filtered (mode 2),
/// including the seccomp spawner that starts the vCPUs.
#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    if !kvm_present() {
        return;
    }
    let img = disk("threads");
    let g = guest("spin");
    let args = [
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--cpus",
        "2",
        "--disk",
        img.to_str().unwrap(),
        "--timeout",
        "120",
    ];
    let mut child = spawn(&args, &[]);
    let mut lines = Lines::take(&mut child);
    assert!(
        lines.wait_for("spinning", Duration::from_secs(60)),
        "the guest never printed 'spinning'"
    );
    // The main thread keeps the program's name; KVM may add a kernel
    // worker thread (kvm-nx-lpage-recovery) to the process, which inherits
    // the filter of the thread that started it (a vCPU).
    let expected = [
        "locald-vmm",
        "seccomp spawner",
        "signals",
        "vcpu 0",
        "vcpu 1",
    ];
    // vcpu 1 may still be starting when vcpu 0 prints, and a starting
    // thread may be a moment away from its filter: look again for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    let threads = loop {
        let t = thread_seccomp_modes(child.id());
        let all_there = expected.iter().all(|w| t.iter().any(|(n, _)| n == w));
        let all_filtered = t.iter().all(|(_, mode)| mode == "2");
        if (all_there && all_filtered) || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let d = finish(child, Duration::from_secs(30));
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for want in expected {
        assert!(names.contains(&want), "no thread {want}: {threads:?}");
    }
    let unfiltered: Vec<_> = threads.iter().filter(|(_, m)| m != "2").collect();
    assert!(
        unfiltered.is_empty(),
        "threads without a seccomp filter: {unfiltered:?} (all: {threads:?}); stderr {}",
        d.stderr
    );
}

#[test]
fn virtio_guest_passes_under_the_filters_and_without_them() {
    if !kvm_present() {
        return;
    }
    let d = virtio_run("filtered", &[], &[]);
    assert_eq!(d.code, Some(0), "{}\n{}", d.stdout, d.stderr);
    assert!(d.stdout.contains("virtio: all ok"), "{}", d.stdout);
    // --no-seccomp: no filter, so the self-test's call is harmless.
    let d = virtio_run(
        "unfiltered",
        &["--no-seccomp"],
        &[("LOCALD_VMM_SECCOMP_SELFTEST", "vcpu")],
    );
    assert_eq!(d.code, Some(0), "{}\n{}", d.stdout, d.stderr);
    assert!(d.stdout.contains("virtio: all ok"), "{}", d.stdout);
}

/// Boots `spin` with a writable disk, sends `sig` once it runs, and
/// checks the exit status, the time it took and that the disk is free.
fn signal_stops_vm(sig: i32, want: i32) {
    let img = disk(&format!("signal-{sig}"));
    let g = guest("spin");
    let args = [
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
        "--timeout",
        "120",
    ];
    let mut child = spawn(&args, &[]);
    let pid = child.id() as libc::pid_t;
    // Signal once the guest runs (it prints "spinning" and loops).
    let mut lines = Lines::take(&mut child);
    assert!(
        lines.wait_for("spinning", Duration::from_secs(60)),
        "the guest never printed 'spinning'"
    );
    // SAFETY: signalling our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    let sent = Instant::now();
    let d = finish(child, Duration::from_secs(60));
    let took = sent.elapsed();
    let stdout = lines.rest();
    assert_eq!(d.code, Some(want), "{}", d.stderr);
    assert!(took < Duration::from_secs(12), "took {took:?}");
    assert!(stdout.contains("spinning"), "{stdout}");
    assert!(d.stderr.contains("stopping the VM"), "{}", d.stderr);
    // The image's lock went with the VMM: a new VM may open it.
    let d2 = finish(
        spawn(
            &[
                "run",
                "--kernel",
                guest("pvh_exit0").to_str().unwrap(),
                "--disk",
                img.to_str().unwrap(),
            ],
            &[],
        ),
        Duration::from_secs(60),
    );
    assert_eq!(d2.code, Some(0), "{}", d2.stderr);
    let _ = d.took;
}

#[test]
fn sigterm_stops_a_running_vm() {
    if kvm_present() {
        signal_stops_vm(libc::SIGTERM, 143);
    }
}

#[test]
fn sigint_stops_a_running_vm() {
    if kvm_present() {
        signal_stops_vm(libc::SIGINT, 130);
    }
}
