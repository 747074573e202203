//! Real-Linux tier: boots the default guest (our kernel + initramfs, built
//! and cached on first use) through the CLI and checks what the guest did.
//! Boots are expensive under software KVM (~10–20 s), so one boot checks
//! many things. Skips only when /dev/kvm is absent, and says so loudly.

use std::process::Command;
use std::time::Instant;

fn kvm_present() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("=================================================================");
    eprintln!("SKIPPED: /dev/kvm not present — real-Linux tier NOT run");
    eprintln!("=================================================================");
    false
}

/// The CLI, logging guest markers (info level) without the kernel log.
fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_locald-vmm"));
    c.env("LOCALD_VMM_LOG", "info");
    c
}

/// One boot: output, exit status propagation, vCPU count, memory size,
/// PID 1, the kernel we built, and the command-line arguments arriving
/// intact (spaces, quotes, empty strings, non-ASCII).
#[test]
fn default_guest_runs_commands() {
    if !kvm_present() {
        return;
    }
    let script = r#"
        echo "hello from the guest"
        echo "nproc=$(nproc)"
        grep MemTotal /proc/meminfo
        echo "pid1=$(cat /proc/1/comm)"
        echo "kernel=$(uname -r)"
        printf 'arg:[%s]\n' "$@"
        echo "stderr line" >&2
        exit 7
    "#;
    let start = Instant::now();
    let out = vmm()
        .args([
            "run",
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--timeout",
            "300",
            "--",
        ])
        .args([
            "sh",
            "-c",
            script,
            "sh",
            "two words",
            "",
            "quote'\"",
            "ünïcode",
        ])
        .output()
        .expect("run locald-vmm");
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- boot+run took {elapsed:?}");
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit 7 must become the CLI's status"
    );
    assert!(stdout.contains("hello from the guest"), "echo output");
    assert!(stdout.contains("nproc=2"), "nproc must equal --cpus");
    let mem_kib: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("MemTotal line");
    assert!(
        (96 * 1024..=128 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB should be a little under 128 MiB"
    );
    assert!(stdout.contains("pid1=init"), "our init is PID 1");
    assert!(
        stdout.contains("kernel=6.1"),
        "the default 6.1 kernel booted"
    );
    for arg in [
        "arg:[two words]",
        "arg:[]",
        "arg:[quote'\"]",
        "arg:[ünïcode]",
    ] {
        assert!(stdout.contains(arg), "argument {arg} must arrive intact");
    }
    assert!(stdout.contains("stderr line") || stderr.contains("stderr line"));
    assert!(
        stderr.contains("guest marker 1"),
        "init reported userspace reached"
    );
}

/// The same default guest with a command that does not exist: 127.
#[test]
fn missing_command_is_127() {
    if !kvm_present() {
        return;
    }
    let out = vmm()
        .args([
            "run",
            "--memory",
            "64M",
            "--timeout",
            "300",
            "--",
            "/no/such/program",
        ])
        .output()
        .expect("run locald-vmm");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(127), "{text}");
    assert!(
        text.contains("/no/such/program"),
        "the error names the program"
    );
}

/// Interactive mode: no command gives a shell on the serial console. Host
/// stdin reaches it through the UART (typed only once the prompt is up, as
/// a user would), and the shell's exit status becomes the CLI's.
#[test]
fn interactive_shell_over_the_serial_console() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;

    if !kvm_present() {
        return;
    }
    let mut child = vmm()
        .args(["run", "--memory", "64M", "--timeout", "300"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run locald-vmm");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(280);
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => seen.extend_from_slice(&chunk),
                Err(_) => panic!(
                    "no {needle:?} from the guest; output so far:\n{}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
    };
    wait_for("# ");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"echo typed-$((6 * 7))\n")
        .expect("type into the guest");
    wait_for("typed-42");
    stdin.write_all(b"exit 5\n").expect("type exit");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(5), "the shell's exit status");
}
