//! The host directories locald-vmm trusts (issue 14, items 7, 9, 14): a
//! runtime or cache directory another user could control is refused with
//! one line and nothing touched; status commands leave a starting VM's
//! state alone; `stop --timeout` cannot overflow.
//!
//! Each test works in its own directory under the cargo target dir and
//! points `XDG_RUNTIME_DIR`, `TMPDIR` and `HOME` there, so tests neither
//! collide nor touch the real user's state. Tests that plant a directory
//! owned by another user `chown` it to uid 4242 and need root; without it
//! they skip loudly. None needs /dev/kvm.

mod common;

use common::VMM_ERROR;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const ATTACKER: u32 = 4242;

/// A fresh directory for one test (owned by us, 0755, trusted ancestors).
fn scratch(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("host-trust")
        .join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mkdir(p: &Path, mode: u32) {
    std::fs::DirBuilder::new().mode(mode).create(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn root_or_skip() -> bool {
    if common::is_root() {
        return true;
    }
    common::skip(common::Why::NotRoot("chown to another uid"));
    false
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
}

/// Everything under `dir`: path -> (type, mode, owner, size), not
/// following symlinks.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, u32, u64, Option<PathBuf>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let link = m
            .file_type()
            .is_symlink()
            .then(|| std::fs::read_link(&p).unwrap());
        out.insert(p.clone(), (m.mode(), m.uid(), m.len(), link));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    out
}

/// `locald-vmm args` with the runtime and cache variables set by `env`
/// (`None` removes one), stdin closed.
fn vmm(args: &[&str], env: &[(&str, Option<&Path>)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_locald-vmm"));
    cmd.args(args).stdin(Stdio::null());
    for k in [
        "XDG_RUNTIME_DIR",
        "TMPDIR",
        "LOCALD_VMM_CACHE",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.output().expect("spawning locald-vmm")
}

/// Exit 125 and exactly one stderr line containing every `mention`.
fn one_line_error(o: &Output, args: &[&str], mention: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert_eq!(
        o.status.code(),
        Some(VMM_ERROR),
        "{args:?}: exit; stderr:\n{stderr}"
    );
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: want one error line, got:\n{stderr}"
    );
    for m in mention {
        assert!(
            lines[0].contains(m),
            "{args:?}: {:?} should mention {m:?}",
            lines[0]
        );
    }
    lines[0].to_string()
}

/// What the attacker planted: a VM "evil" whose sockets they serve.
struct Planted {
    control: UnixListener,
    vsock: UnixListener,
}

fn plant_vm(runtime: &Path) -> Planted {
    let vm = runtime.join("vms/evil");
    std::fs::create_dir_all(&vm).unwrap();
    let control = UnixListener::bind(vm.join("control.sock")).unwrap();
    let vsock = UnixListener::bind(vm.join("vsock.sock")).unwrap();
    control.set_nonblocking(true).unwrap();
    vsock.set_nonblocking(true).unwrap();
    Planted { control, vsock }
}

impl Planted {
    fn assert_untouched(&self) {
        for (what, l) in [("control", &self.control), ("vsock", &self.vsock)] {
            match l.accept() {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => panic!("the planted {what} socket was connected to: {other:?}"),
            }
        }
    }
}

/// `ps`, `exec` (with a secret in its environment), `stop` and `start`
/// against a planted runtime directory: each refuses with one line naming
/// `bad` and `problem`, connects to nothing and changes nothing.
fn assert_all_refused(t: &Path, env: &[(&str, Option<&Path>)], bad: &Path, problem: &str) {
    let planted = plant_vm(bad);
    let before = snapshot(t);
    let kernel = common::guest("pvh_exit0");
    let cmds: [&[&str]; 5] = [
        &["ps"],
        &["exec", "evil", "-e", "TOKEN=s3cret", "--", "true"],
        &["stop", "evil"],
        &["exec", "web", "--", "true"],
        &[
            "start",
            "--name",
            "web",
            "--kernel",
            kernel.to_str().unwrap(),
        ],
    ];
    for args in cmds {
        let o = vmm(args, env);
        let line = one_line_error(&o, args, &["refusing", &bad.display().to_string(), problem]);
        assert!(!line.contains("s3cret"), "{line}");
        planted.assert_untouched();
        assert_eq!(snapshot(t), before, "{args:?} changed the planted tree");
    }
}

#[test]
fn attacker_owned_0777_runtime_dir_is_refused() {
    if !root_or_skip() {
        return;
    }
    let t = scratch("attacker_xdg");
    let bad = t.join("locald-vmm");
    mkdir(&bad, 0o777);
    chown(&bad, ATTACKER);
    let env = [("XDG_RUNTIME_DIR", Some(t.as_path()))];
    assert_all_refused(&t, &env, &bad, "owned by uid 4242");
}

/// The usual `sudo` case: no XDG_RUNTIME_DIR, state under `<tmp>`.
#[test]
fn attacker_owned_tmp_fallback_is_refused() {
    if !root_or_skip() {
        return;
    }
    let t = scratch("attacker_tmp");
    let bad = t.join("locald-vmm-0");
    mkdir(&bad, 0o777);
    chown(&bad, ATTACKER);
    let env = [("TMPDIR", Some(t.as_path())), ("XDG_RUNTIME_DIR", None)];
    assert_all_refused(&t, &env, &bad, "owned by uid 4242");
}

#[test]
fn world_writable_runtime_dir_is_refused() {
    let t = scratch("world_writable");
    let bad = t.join("locald-vmm");
    mkdir(&bad, 0o777);
    let env = [("XDG_RUNTIME_DIR", Some(t.as_path()))];
    assert_all_refused(&t, &env, &bad, "writable by group or others (mode 0777)");
}

#[test]
fn symlinked_runtime_dir_is_refused() {
    let t = scratch("symlinked_runtime");
    let real = t.join("elsewhere");
    mkdir(&real, 0o700);
    let link = t.join("locald-vmm");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let env = [("XDG_RUNTIME_DIR", Some(t.as_path()))];
    assert_all_refused(&t, &env, &link, "a symlink");
}

/// A runtime directory under an ancestor anyone may write to (not sticky).
#[test]
fn untrusted_ancestor_is_refused() {
    let t = scratch("open_ancestor");
    let open = t.join("open");
    mkdir(&open, 0o777);
    mkdir(&open.join("locald-vmm"), 0o700);
    let env = [("XDG_RUNTIME_DIR", Some(open.as_path()))];
    assert_all_refused(&t, &env, &open, "not sticky (mode 0777)");
}

/// A VM directory whose `lock` is a symlink: status commands and `start`
/// refuse it rather than open (or create) the file it points to.
#[test]
fn symlinked_lock_is_refused() {
    let t = scratch("symlinked_lock");
    let vm = t.join("locald-vmm/vms/web");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&vm)
        .unwrap();
    let victim = t.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, vm.join("lock")).unwrap();
    let env = [("XDG_RUNTIME_DIR", Some(t.as_path()))];
    let before = snapshot(&t);
    let kernel = common::guest("pvh_exit0");
    let cmds: [&[&str]; 4] = [
        &["exec", "web", "--", "true"],
        &["stop", "web"],
        &[
            "start",
            "--name",
            "web",
            "--kernel",
            kernel.to_str().unwrap(),
        ],
        &["ps"],
    ];
    let lock = vm.join("lock").display().to_string();
    for args in cmds {
        let o = vmm(args, &env);
        if args == ["ps"] {
            // ps reports the VM's problem and goes on (exit 0).
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(0), "{stderr}");
            assert!(
                stderr.contains(&lock) && stderr.contains("a symlink"),
                "{stderr}"
            );
        } else {
            one_line_error(&o, args, &["refusing", &lock, "a symlink"]);
        }
        assert_eq!(snapshot(&t), before, "{args:?} changed something");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// With `HOME` unset the cache falls back to `<tmp>/locald-vmm-cache`: one
/// planted there (with a kernel ready to boot) is refused.
#[test]
fn planted_cache_fallback_is_refused() {
    let t = scratch("planted_cache");
    let cache = t.join("locald-vmm-cache");
    let key = locald_vmm::assets::default_kernel_key();
    let kdir = cache.join(format!("kernel-{key}"));
    std::fs::create_dir_all(&kdir).unwrap();
    std::fs::write(kdir.join("vmlinux"), b"evil kernel").unwrap();
    std::fs::write(kdir.join("System.map"), b"").unwrap();
    let env = [("TMPDIR", Some(t.as_path())), ("HOME", None)];
    let mut cases = vec![("0777, ours", 0o777, None)];
    if root_or_skip() {
        cases.push(("0755, the attacker's", 0o755, Some(ATTACKER)));
    }
    for (what, mode, owner) in cases {
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some(uid) = owner {
            chown(&cache, uid);
        }
        let before = snapshot(&t);
        let problem = if owner.is_some() {
            "owned by uid 4242"
        } else {
            "writable by group or others"
        };
        for args in [&["prepare"][..], &["run", "--", "true"]] {
            let o = vmm(args, &env);
            one_line_error(
                &o,
                args,
                &["refusing", &cache.display().to_string(), problem],
            );
            assert_eq!(snapshot(&t), before, "{what}: {args:?} changed the cache");
        }
    }
}

/// A normal user's `$HOME/.cache/locald-vmm` keeps working.
#[test]
fn home_cache_still_works() {
    let t = scratch("home_cache");
    let home = t.join("home");
    mkdir(&home, 0o755);
    let key = locald_vmm::assets::default_kernel_key();
    let kdir = home.join(format!(".cache/locald-vmm/kernel-{key}"));
    std::fs::create_dir_all(&kdir).unwrap();
    std::fs::write(kdir.join("vmlinux"), b"a kernel").unwrap();
    std::fs::write(kdir.join("System.map"), b"").unwrap();
    let o = vmm(&["prepare"], &[("HOME", Some(home.as_path()))]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains(&kdir.join("vmlinux").display().to_string()),
        "{stdout}"
    );
}

/// A fake VM `web` in `runtime` that answers one control request; the
/// request line comes back through the join handle.
fn fake_vm(runtime: &Path) -> std::thread::JoinHandle<Option<String>> {
    let vm = runtime.join("locald-vmm/vms/web");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&vm)
        .unwrap();
    let l = UnixListener::bind(vm.join("control.sock")).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(_) => return None,
            }
        };
        s.set_nonblocking(false).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let _ = std::fs::remove_dir_all(&vm);
        let _ = (&s).write_all(b"{\"status\":\"stopped\",\"how\":\"poweroff\"}\n");
        Some(line)
    })
}

#[test]
fn stop_timeout_overflow_is_one_clear_line() {
    let t = scratch("stop_timeout");
    let env = [("XDG_RUNTIME_DIR", Some(t.as_path()))];
    let server = fake_vm(&t);
    for secs in ["18446744073709551615", "3153600001"] {
        let args = ["stop", "web", "--timeout", secs];
        one_line_error(&vmm(&args, &env), &args, &["--timeout", secs]);
    }
    // The largest accepted value reaches the VM as is.
    let o = vmm(&["stop", "web", "--timeout", "3153600000"], &env);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let req = server.join().unwrap().expect("the stop request");
    assert!(req.contains("\"timeout_secs\":3153600000"), "{req}");
}

/// A VM still starting holds its lock and has no control socket yet:
/// `ps`, `exec`, `stop` and `start` of the same name leave it alone.
#[test]
fn status_commands_leave_a_starting_vm_alone() {
    let t = scratch("starting_vm");
    let vm = t.join("locald-vmm/vms/web");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&vm)
        .unwrap();
    std::fs::write(vm.join("console.log"), b"booting\n").unwrap();
    let lock = std::fs::File::create(vm.join("lock")).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let env = [("XDG_RUNTIME_DIR", Some(t.as_path()))];
    let kernel = common::guest("pvh_exit0");
    for _ in 0..3 {
        let o = vmm(&["ps"], &env);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("web ") && l.contains("starting")),
            "{stdout}"
        );
        let args = ["exec", "web", "--", "true"];
        one_line_error(&vmm(&args, &env), &args, &["'web'", "still starting"]);
        let args = ["stop", "web"];
        one_line_error(&vmm(&args, &env), &args, &["'web'", "still starting"]);
        let args = [
            "start",
            "--name",
            "web",
            "--kernel",
            kernel.to_str().unwrap(),
        ];
        one_line_error(&vmm(&args, &env), &args, &["'web' is already running"]);
        assert_eq!(std::fs::read(vm.join("console.log")).unwrap(), b"booting\n");
    }
    // Its process died: the next command cleans up.
    drop(lock);
    let args = ["exec", "web", "--", "true"];
    one_line_error(&vmm(&args, &env), &args, &["'web' is not running"]);
    assert!(!vm.exists());
    assert!(std::fs::read_dir(t.join("locald-vmm/vms"))
        .unwrap()
        .next()
        .is_none());
}

/// A real `start` (default guest) while `ps` and `exec` run in a loop:
/// the starting VM's state survives them and it comes up. Needs /dev/kvm
/// (and builds the default kernel if it is not cached yet).
#[test]
fn start_racing_with_status_commands() {
    if !common::kvm_present() {
        return;
    }
    let t = scratch("start_race");
    let env = [("XDG_RUNTIME_DIR", Some(t.as_path()))];
    let mut start = Command::new(env!("CARGO_BIN_EXE_locald-vmm"))
        .args(["start", "--name", "race", "--cpus", "1"])
        .env("XDG_RUNTIME_DIR", &t)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let (mut polls, mut seen_starting) = (0, false);
    let status = loop {
        if let Some(s) = start.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "start took over 300 s"
        );
        let ps = vmm(&["ps"], &env);
        let err = String::from_utf8_lossy(&ps.stderr);
        assert_eq!(ps.status.code(), Some(0), "{err}");
        assert!(
            !err.contains("not running"),
            "ps called the starting VM stale: {err}"
        );
        seen_starting |= String::from_utf8_lossy(&ps.stdout).contains("(starting)");
        let ex = vmm(&["exec", "race", "--", "true"], &env);
        let err = String::from_utf8_lossy(&ex.stderr);
        assert!(
            !err.contains("not running"),
            "exec called the starting VM stale: {err}"
        );
        polls += 1;
    };
    let out = start.wait_with_output().unwrap();
    assert!(
        status.success(),
        "start failed after {polls} polls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        seen_starting,
        "ps never saw the VM starting ({polls} polls)"
    );
    let ex = vmm(&["exec", "race", "--", "echo", "up"], &env);
    assert_eq!(String::from_utf8_lossy(&ex.stdout), "up\n");
    let stop = vmm(&["stop", "race"], &env);
    assert_eq!(
        stop.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert!(!t.join("locald-vmm/vms/race").exists());
}
