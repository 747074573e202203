//! Unit tests of named-VM state and the control protocol (no KVM).

use super::*;

#[test]
fn names() {
    for ok in ["a", "web-1", "svc_2.test", &"x".repeat(32)] {
        assert!(check_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", ".hidden", "a/b", "..", "sp ace", &"x".repeat(33), "ü"] {
        assert!(check_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn request_wire_format() {
    assert_eq!(parse_request(r#"{"op":"info"}"#), Ok(Request::Info));
    assert_eq!(
        parse_request(r#"{"op":"stop"}"#),
        Ok(Request::Stop { timeout_secs: 10 })
    );
    assert_eq!(
        parse_request(r#"{"op":"stop","timeout_secs":3}"#),
        Ok(Request::Stop { timeout_secs: 3 })
    );
    assert_eq!(
        parse_request(r#"{"op":"snapshot","dir":"/s"}"#),
        Ok(Request::Snapshot {
            dir: "/s".into(),
            stop: false
        })
    );
    for bad in [
        r#"{"op":"snapshot"}"#,
        r#"{"op":"snapshot","dir":"/s","stop":1}"#,
        "",
        "{}",
        "[1]",
        r#"{"op":"format_disk"}"#,
        "\u{0}",
        r#"{"op":"stop","timeout_secs":-1}"#,
    ] {
        assert!(parse_request(bad).is_err(), "{bad:?}");
    }
    let s = serde_json::to_string(&Response::Stopped {
        how: "poweroff".into(),
    })
    .unwrap();
    assert_eq!(s, r#"{"status":"stopped","how":"poweroff"}"#);
}

struct Fake {
    stopped: bool,
}

impl ControlTarget for Fake {
    fn info(&self) -> Info {
        Info {
            version: PROTOCOL_VERSION,
            name: "t".into(),
            pid: 1,
            cpus: 2,
            memory_mib: 128,
            started_at: 0,
            vsock: "/x".into(),
            publish: vec![(8080, 80)],
            exposed: vec!["80/tcp".into()],
        }
    }
    fn stop(&mut self, _timeout: Duration) -> String {
        self.stopped = true;
        "poweroff".into()
    }
    fn running(&self) -> bool {
        !self.stopped
    }
    fn snapshot(&mut self, dir: &Path, stop: bool) -> Response {
        self.stopped |= stop;
        Response::Snapshotted {
            dir: dir.to_path_buf(),
            paused_ms: 3,
            memory_bytes: 4096,
            stopped: stop,
        }
    }
}

#[test]
fn control_server_answers_and_survives_bad_clients() {
    let d = std::env::temp_dir().join(format!("locald-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("c.sock");
    let l = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let mut f = Fake { stopped: false };
        serve_control(&l, &mut f).unwrap();
        f.stopped
    });
    let ask = |text: &[u8]| -> String {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(text).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = BufReader::new(s).read_line(&mut out);
        out
    };
    assert!(ask(b"{\"op\":\"info\"}\n").contains("\"publish\":[[8080,80]]"));
    assert!(ask(b"garbage\n").contains("\"status\":\"error\""));
    assert!(ask(b"{\"op\":\"info\"}").contains("unterminated"));
    assert!(ask(&vec![b'x'; MAX_REQUEST + 10]).contains("error"));
    assert!(
        ask(format!("{{\"op\":\"stop\",\"timeout_secs\":{}}}\n", u64::MAX).as_bytes())
            .contains("too large")
    );
    // Snapshots: relative directories are refused; a resumed VM serves on.
    assert!(ask(b"{\"op\":\"snapshot\",\"dir\":\"rel/dir\"}\n").contains("not absolute"));
    let r = ask(b"{\"op\":\"snapshot\",\"dir\":\"/s/1\"}\n");
    assert!(
        r.contains("\"status\":\"snapshotted\"") && r.contains("\"stopped\":false"),
        "{r}"
    );
    assert!(ask(b"{\"op\":\"stop\",\"timeout_secs\":1}\n").contains("poweroff"));
    assert!(server.join().unwrap());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn huge_stop_timeouts_are_refused_before_anything_happens() {
    let e = stop("no-such-vm-t1", Duration::from_secs(u64::MAX)).unwrap_err();
    assert!(matches!(e, InstanceError::Timeout(u64::MAX)), "{e}");
    assert!(e.to_string().contains("too large"), "{e}");
    let e = stop(
        "no-such-vm-t1",
        Duration::from_secs(MAX_STOP_TIMEOUT_SECS + 1),
    )
    .unwrap_err();
    assert!(matches!(e, InstanceError::Timeout(_)), "{e}");
}

/// What `ps`, `info`, `exec` and `stop` do when nobody answers on a VM's
/// control socket: a VM still starting holds its lock and is left alone;
/// one whose VMM is gone is removed.
#[test]
fn only_unlocked_state_is_stale() {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir().join(format!("locald-stale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&base)
        .unwrap();
    let d = base.join("web");
    std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
    std::fs::write(d.join("console.log"), b"booting").unwrap();
    // A starting VM: its lock is held (flock locks belong to the open
    // file, so another open of ours contends like another process).
    let starting = hostdir::open_nofollow(&d.join("lock"), Create::New).unwrap();
    assert!(try_lock(&starting));
    for _ in 0..3 {
        let e = remove_if_stale("web", &d);
        assert!(matches!(e, InstanceError::Busy(_)), "{e}");
        assert!(e.to_string().contains("still starting"), "{e}");
        assert!(
            d.join("console.log").exists(),
            "a starting VM's state survives"
        );
    }
    // Its VMM died: the lock is free, the directory goes.
    drop(starting);
    let e = remove_if_stale("web", &d);
    assert!(matches!(e, InstanceError::Stale(_)), "{e}");
    assert!(!d.exists());
    // A directory without a lock file at all is stale too.
    std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
    assert!(matches!(
        remove_if_stale("web", &d),
        InstanceError::Stale(_)
    ));
    assert!(!d.exists());
    // Gone meanwhile: not found.
    assert!(matches!(
        remove_if_stale("web", &d),
        InstanceError::NotFound(_)
    ));
    // A symlinked lock is refused, not followed.
    std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
    std::fs::write(base.join("target"), b"").unwrap();
    std::os::unix::fs::symlink(base.join("target"), d.join("lock")).unwrap();
    let e = remove_if_stale("web", &d);
    assert!(e.to_string().contains("symlink"), "{e}");
    assert!(d.exists());
    // Nothing but what we made is left (no .stale-* leftovers).
    let left: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    std::fs::remove_dir_all(&base).unwrap();
}
