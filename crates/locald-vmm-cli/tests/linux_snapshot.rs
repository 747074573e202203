//! Real-Linux tier: snapshots of the default guest. One boot: a named VM
//! writes a file in tmpfs and is snapshotted while it runs on (and still
//! answers), then snapshotted again and stopped. Two VMs restored at once
//! from that snapshot each see the file, draw different random bytes, tell
//! the host's time and carry their own hostname. Damaged snapshots and bad
//! arguments get one error line, a non-zero exit and no VM left behind.
//! Skips only when /dev/kvm is absent, and says so loudly.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_locald-vmm"));
    c.env("LOCALD_VMM_LOG", "info")
        .env_remove("LOCALD_VMM_SECCOMP_SELFTEST");
    c
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exec(name: &str, script: &str) -> String {
    let out = vmm()
        .args(["exec", name, "--", "sh", "-c", script])
        .output()
        .expect("exec");
    ok(&out, &format!("exec in {name}: {script}"))
}

/// Stops the named VMs when the test ends, whatever happened.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = vmm().args(["stop", n, "--timeout", "5"]).output();
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn one_error_line(out: &Output, what: &str, contains: &str) {
    assert!(!out.status.success(), "{what} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: want one error line, got:\n{err}");
    assert!(lines[0].contains(contains), "{what}: {err}");
}

fn no_vm(name: &str) {
    let ps = String::from_utf8_lossy(&vmm().arg("ps").output().unwrap().stdout).into_owned();
    assert!(
        !ps.lines()
            .any(|l| l.split_whitespace().next() == Some(name)),
        "{name} left behind: {ps}"
    );
    assert!(!runtime_base().join("vms").join(name).exists());
}

#[test]
fn named_vm_snapshot_and_two_concurrent_restores() {
    if !kvm_present() {
        return;
    }
    let pid = std::process::id();
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("linux-snapshot-{pid}"));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let src = format!("snap-src-{pid}");
    let clones = [format!("snap-c1-{pid}"), format!("snap-c2-{pid}")];
    let _cleanup = Cleanup(vec![src.clone(), clones[0].clone(), clones[1].clone()]);

    let out = vmm()
        .args(["start", "--name", &src, "--agent-timeout", "600"])
        .output()
        .unwrap();
    ok(&out, "start");
    let token = format!("written-before-snapshot-{pid}");
    exec(&src, &format!("echo {token} > /tmp/f"));

    // A snapshot that lets the VM run on: it still answers afterwards.
    let live = base.join("live");
    let out = vmm().args(["snapshot", &src]).arg(&live).output().unwrap();
    let said = ok(&out, "snapshot (resume)");
    assert!(
        said.contains("paused") && !said.contains("stopped"),
        "{said}"
    );
    assert_eq!(exec(&src, "cat /tmp/f").trim(), token);
    // The same directory twice: refused, nothing changed.
    let out = vmm().args(["snapshot", &src]).arg(&live).output().unwrap();
    one_error_line(&out, "a second snapshot into one directory", "not empty");
    assert_eq!(exec(&src, "echo alive").trim(), "alive");

    // Snapshot and stop.
    let dir = base.join("stopped");
    let out = vmm()
        .args(["snapshot", &src])
        .arg(&dir)
        .arg("--stop")
        .output()
        .unwrap();
    assert!(ok(&out, "snapshot --stop").contains("VM stopped"));
    no_vm(&src);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for f in ["state", "memory"] {
        let m = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(m & 0o777, 0o600, "{f}");
    }

    // Two restores at once.
    let starts: Vec<_> = clones
        .iter()
        .map(|n| {
            let (n, dir) = (n.clone(), dir.clone());
            std::thread::spawn(move || {
                vmm()
                    .args(["start", "--name", &n, "--agent-timeout", "600", "--restore"])
                    .arg(&dir)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for (s, n) in starts.into_iter().zip(&clones) {
        ok(&s.join().unwrap(), &format!("start --restore {n}"));
    }
    let mut randoms = Vec::new();
    for n in &clones {
        let before = now();
        let out = exec(
            n,
            "cat /tmp/f; hostname; date +%s; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo",
        );
        let after = now();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(lines[0], token, "the tmpfs file did not survive in {n}");
        assert_eq!(lines[1], n, "hostname of {n}");
        let t: u64 = lines[2].parse().unwrap();
        assert!(
            t + 2 >= before && t <= after + 2,
            "{n} says {t}, the host {before}..{after}"
        );
        assert_eq!(lines[3].len(), 64, "{out}");
        randoms.push(lines[3].to_string());
    }
    assert_ne!(
        randoms[0], randoms[1],
        "two clones drew the same random bytes"
    );
    for n in &clones {
        let out = vmm().args(["stop", n]).output().unwrap();
        ok(&out, "stop");
        no_vm(n);
    }

    // Bad snapshots and arguments: one line, non-zero, nothing left.
    let bad = format!("snap-bad-{pid}");
    let out = vmm()
        .args(["start", "--name", &bad, "--restore"])
        .arg(base.join("missing"))
        .output()
        .unwrap();
    one_error_line(&out, "restore from a missing directory", "missing");
    no_vm(&bad);
    let state = dir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::remove_file(&state).unwrap();
    std::fs::write(&state, &bytes).unwrap();
    std::fs::set_permissions(&state, PermissionsExt::from_mode(0o600)).unwrap();
    let out = vmm()
        .args(["start", "--name", &bad, "--restore"])
        .arg(&dir)
        .output()
        .unwrap();
    one_error_line(&out, "restore of a tampered state file", "checksum");
    no_vm(&bad);
    let out = vmm()
        .args(["snapshot", &format!("no-such-vm-{pid}")])
        .arg(base.join("x"))
        .output()
        .unwrap();
    one_error_line(&out, "snapshot of a missing VM", "no VM named");
    assert!(!base.join("x").exists());
    let _ = std::fs::remove_dir_all(&base);
    let _: PathBuf = base;
}

/// `run` on the default guest restores its warm snapshot: made by
/// `prepare --snapshot` (or on first use), restored by every later run
/// with the run's own share bound after the restore, fresh randomness and
/// the host's clock; exit codes pass through; `--cold` boots; a damaged
/// cached snapshot is replaced by a cold boot, not an error.
#[test]
fn warm_runs_with_a_share_and_cold_runs() {
    if !kvm_present() {
        return;
    }
    let pid = std::process::id();
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("linux-warm-{pid}"));
    let _ = std::fs::remove_dir_all(&base);
    let share = base.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("in.txt"), b"from the host\n").unwrap();
    // A warm-snapshot cache of this test's own: it damages a snapshot on
    // purpose, which must not reach other users of the shared cache.
    let cache = base.join("snapshots");
    let vmm = || {
        let mut c = vmm();
        c.env("LOCALD_VMM_SNAPSHOT_CACHE", &cache);
        c
    };

    let out = vmm().args(["prepare", "--snapshot"]).output().unwrap();
    let said = ok(&out, "prepare --snapshot");
    let dir = said
        .lines()
        .find_map(|l| l.strip_prefix("snapshot:"))
        .map(|d| PathBuf::from(d.trim()))
        .unwrap_or_else(|| panic!("no snapshot line: {said}"));
    use std::os::unix::fs::PermissionsExt;
    for f in ["state", "memory"] {
        let m = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(m & 0o777, 0o600, "{f}");
    }

    // Twice with the share: the first may make the one-share snapshot,
    // the second restores it.
    let run_share = |tag: &str| {
        let out = vmm()
            .args(["run", "--share"])
            .arg(format!("{}:/mnt/s", share.display()))
            .args([
                "--",
                "sh",
                "-c",
                &format!(
                    "cat /mnt/s/in.txt; echo {tag} > /mnt/s/{tag}.txt; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; exit 7"
                ),
            ])
            .env("LOCALD_VMM_LOG", "info")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(7),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (stdout, stderr)
    };
    let (first, _) = run_share("one");
    let before = now();
    let (second, log) = run_share("two");
    let after = now();
    assert!(
        log.contains("start: Restore"),
        "the second run did not restore:\n{log}"
    );
    let mut randoms = Vec::new();
    for (out, tag) in [(&first, "one"), (&second, "two")] {
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[0], "from the host");
        assert_eq!(
            std::fs::read_to_string(share.join(format!("{tag}.txt"))).unwrap(),
            format!("{tag}\n")
        );
        randoms.push(lines[2].to_string());
    }
    let t: u64 = second.lines().nth(1).unwrap().parse().unwrap();
    assert!(
        t + 2 >= before && t <= after + 2,
        "guest {t}, host {before}..{after}"
    );
    assert_ne!(
        randoms[0], randoms[1],
        "two warm runs drew the same random bytes"
    );

    // The default warm snapshot, then --cold.
    let out = vmm()
        .args(["run", "--", "sh", "-c", "echo warm"])
        .env("LOCALD_VMM_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(ok(&out, "warm run").trim(), "warm");
    assert!(String::from_utf8_lossy(&out.stderr).contains("start: Restore"));
    let out = vmm()
        .args(["run", "--cold", "--", "sh", "-c", "echo cold"])
        .env("LOCALD_VMM_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(ok(&out, "cold run").trim(), "cold");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cold(Asked)"));

    // A damaged cached snapshot: removed, the run boots cold and stores a
    // new one.
    let state = dir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x11;
    std::fs::remove_file(&state).unwrap();
    std::fs::write(&state, &bytes).unwrap();
    std::fs::set_permissions(&state, PermissionsExt::from_mode(0o600)).unwrap();
    let out = vmm()
        .args(["run", "--", "sh", "-c", "echo rebuilt"])
        .env("LOCALD_VMM_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(ok(&out, "run over a damaged snapshot").trim(), "rebuilt");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = std::fs::read(&state).expect("a new snapshot stored");
    assert_ne!(fresh, bytes);
    let _ = std::fs::remove_dir_all(&base);
}
