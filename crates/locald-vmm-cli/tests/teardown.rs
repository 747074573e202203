//! The VM teardown hand-off through the CLI (kvm/teardown.rs), on the tiny
//! guests: the VMM exits with the guest's status, under its seccomp filters
//! the helper process takes the VM, and that helper ends (the host has
//! destroyed the VM) within seconds, reaped — no zombie, no leaked VM.
//!
//! This test process makes itself a child subreaper, so the orphaned
//! helper comes back to it and can be waited for. Needs `/dev/kvm`.

mod common;

use common::*;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const HANDED: &str = "VM teardown handed to a helper process";

fn run(guest_name: &str, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_locald-vmm"));
    c.args(["run", "--memory", "16M", "--cpus", "1", "--kernel"])
        .arg(guest(guest_name))
        .env("LOCALD_VMM_LOG", "locald_vmm::kvm::teardown=debug")
        .env_remove("LOCALD_VMM_SECCOMP_SELFTEST")
        .env_remove("LOCALD_VMM_INLINE_TEARDOWN");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running locald-vmm")
}

fn become_subreaper() {
    // SAFETY: sets a flag of this process; no pointers.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Waits (up to `limit`) for every remaining child of this process, and
/// returns their exit statuses.
fn reap_all(limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    let mut statuses = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: non-blocking wait for any child; `status` is a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
        if pid > 0 {
            assert!(libc::WIFEXITED(status), "helper status {status:#x}");
            statuses.push(libc::WEXITSTATUS(status));
            continue;
        }
        if pid < 0 {
            return statuses; // ECHILD: none left
        }
        assert!(
            Instant::now() < deadline,
            "a child (teardown helper) still runs after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

// One test: the subreaper's `waitpid(-1)` must not race another test's
// `Command::output()`.
#[test]
fn helper_takes_the_vm_and_ends_promptly() {
    if !kvm_present() {
        return;
    }
    // The inline path (the hand-off turned off) still works.
    let o = run("pvh_hello", &[("LOCALD_VMM_INLINE_TEARDOWN", "1")]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("pvh ok"));
    assert!(!stderr.contains(HANDED), "{stderr}");

    become_subreaper();
    for (guest_name, code, out) in [("pvh_hello", 0, "pvh ok"), ("triple_fault", VMM_ERROR, "")] {
        let o = run(guest_name, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{guest_name}: {stderr}");
        assert!(String::from_utf8_lossy(&o.stdout).contains(out));
        assert!(stderr.contains(HANDED), "{guest_name}: {stderr}");
        assert!(!stderr.contains("seccomp"), "{guest_name}: {stderr}");
        // The helper B (A was reaped by the VMM) ends once the VM is gone.
        assert_eq!(reap_all(Duration::from_secs(5)), vec![0], "{guest_name}");
    }
}
