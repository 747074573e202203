//! Connection handler tests on the host: each test runs [`serve`] on a
//! thread against one end of a Unix socketpair and plays the host on the
//! other end with real agent-proto frames.

use super::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

/// Generous bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(30);

fn ctx() -> Context {
    Context {
        env: spec::parse_env(None),
        power_pid: None,
        user: None,
    }
}

fn argv(args: &[&str]) -> Vec<Vec<u8>> {
    args.iter().map(|a| a.as_bytes().to_vec()).collect()
}

fn req(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv(args),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    req(&["sh", "-c", script])
}

/// The host end of one connection, with the handler running on a thread.
struct Host {
    sock: UnixStream,
    handler: Option<JoinHandle<()>>,
}

impl Host {
    fn connect(ctx: Context) -> Host {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(WAIT)).unwrap();
        host.set_write_timeout(Some(WAIT)).unwrap();
        let handler = std::thread::spawn(move || serve(OwnedFd::from(agent), &ctx));
        Host {
            sock: host,
            handler: Some(handler),
        }
    }

    fn exec(r: ExecRequest) -> Host {
        let mut h = Host::connect(ctx());
        h.send(Frame::Exec(r));
        h
    }

    fn send(&mut self, f: Frame) {
        f.write_to(&mut self.sock).unwrap();
    }

    fn next(&mut self) -> Option<Frame> {
        Frame::read_from(&mut self.sock).expect("frame from the agent")
    }

    /// Reads frames to the end of the stream.
    fn outcome(mut self) -> Outcome {
        let mut o = Outcome::default();
        while let Some(f) = self.next() {
            o.absorb(f);
        }
        self.join();
        o
    }

    /// Closes our end (ending the handler's orderly close) and waits for it.
    fn join(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.handler.take() {
            h.join().unwrap();
        }
    }
}

#[derive(Debug, Default)]
struct Outcome {
    frames: Vec<&'static str>,
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitKind>,
    error: Option<(u8, String)>,
}

impl Outcome {
    fn absorb(&mut self, f: Frame) {
        self.frames.push(frame_name(&f));
        match f {
            Frame::Started(pid) => self.pid = Some(pid),
            Frame::Stdout(d) => {
                assert!(!d.is_empty() && d.len() <= MAX_DATA, "chunk of {}", d.len());
                self.stdout.extend(d);
            }
            Frame::Stderr(d) => {
                assert!(!d.is_empty() && d.len() <= MAX_DATA, "chunk of {}", d.len());
                self.stderr.extend(d);
            }
            Frame::Exit(k) => self.exit = Some(k),
            Frame::Error { code, message } => self.error = Some((code, message)),
            other => panic!("unexpected frame from the agent: {other:?}"),
        }
    }

    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Started first, Exit last, exactly once each.
    fn assert_well_formed(&self) {
        assert_eq!(self.frames.first(), Some(&"Started"), "{self:?}");
        assert_eq!(self.frames.last(), Some(&"Exit"), "{self:?}");
        assert_eq!(self.frames.iter().filter(|f| **f == "Exit").count(), 1);
        assert!(self.error.is_none());
    }
}

fn run(r: ExecRequest) -> Outcome {
    let o = Host::exec(r).outcome();
    if o.error.is_none() {
        o.assert_well_formed();
    }
    o
}

/// True once `pid` is gone or a zombie (killed, waiting for its reaper).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
            state == Some('Z')
        }
    }
}

fn wait_dead(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn echo_hello() {
    let o = run(req(&["echo", "hello"]));
    assert_eq!(o.stdout, b"hello\n");
    assert!(o.stderr.is_empty());
    assert_eq!(o.exit, Some(ExitKind::Code(0)));
    assert!(o.pid.unwrap() > 0);
}

#[test]
fn stdout_and_stderr_are_separate_and_binary_safe() {
    let o = run(sh(
        r"printf '\000\377out'; printf '\377\000err' >&2; printf 'more'",
    ));
    assert_eq!(o.stdout, b"\x00\xffoutmore");
    assert_eq!(o.stderr, b"\xff\x00err");
    assert_eq!(o.exit, Some(ExitKind::Code(0)));
}

#[test]
fn exit_codes() {
    for code in [0, 1, 42, 255] {
        let o = run(sh(&format!("exit {code}")));
        assert_eq!(o.exit, Some(ExitKind::Code(code)));
    }
    assert_eq!(run(req(&["false"])).exit, Some(ExitKind::Code(1)));
}

#[test]
fn killed_by_signal() {
    let o = run(sh("kill -9 $$"));
    assert_eq!(o.exit, Some(ExitKind::Signal(9)));
}

#[test]
fn not_found_and_not_executable() {
    let o = run(req(&["no-such-program-xyz", "arg"]));
    assert_eq!(
        o.error,
        Some((127, "no-such-program-xyz: not found".to_string()))
    );
    assert_eq!(o.frames, ["Error"]);
    let o = run(req(&["/no/such/binary"]));
    assert_eq!(
        o.error,
        Some((127, "/no/such/binary: not found".to_string()))
    );
    let o = run(req(&["/etc/passwd"]));
    assert_eq!(
        o.error,
        Some((126, "/etc/passwd: Permission denied".to_string()))
    );
    let o = run(req(&["/"]));
    assert_eq!(o.error.unwrap().0, 126);
}

#[test]
fn env_and_workdir_are_honored() {
    let dir = std::env::temp_dir().join(format!("locald-agent-wd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sub = dir.join("a/b"); // missing: created, like /.locald/workdir
    let mut r = sh("echo \"$FOO|$HOME|$TERM\"; pwd; ls");
    r.env = vec![b"FOO=bar baz".to_vec(), b"HOME=/home/x".to_vec()];
    r.workdir = Some(sub.as_os_str().as_bytes().to_vec());
    let o = run(r);
    assert_eq!(
        o.exit,
        Some(ExitKind::Code(0)),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        o.out(),
        format!("bar baz|/home/x|linux\n{}\n", sub.display())
    );

    // Relative program names resolve in the workdir (empty PATH entry).
    let tool = sub.join("tool");
    std::fs::write(&tool, "#!/bin/sh\necho from-tool\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut r = req(&["tool"]);
    r.env = vec![b"PATH=/bin:".to_vec()];
    r.workdir = Some(sub.as_os_str().as_bytes().to_vec());
    let o = run(r);
    assert_eq!(o.out(), "from-tool\n");
    let mut r = req(&["./tool"]);
    r.workdir = Some(sub.as_os_str().as_bytes().to_vec());
    assert_eq!(run(r).out(), "from-tool\n");

    // A workdir that is a file cannot be entered: 125.
    let mut r = req(&["true"]);
    r.workdir = Some(tool.as_os_str().as_bytes().to_vec());
    let (code, msg) = run(r).error.unwrap();
    assert_eq!(code, 125);
    assert!(
        msg.starts_with("workdir '") && msg.ends_with("Not a directory"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn default_path_and_env_from_context() {
    let mut c = ctx();
    spec::merge_env(&mut c.env, [&b"FROM_SPEC=1"[..]]);
    let mut h = Host::connect(c);
    let mut r = sh("echo $FROM_SPEC $PATH");
    r.env = vec![b"NOEQ".to_vec(), b"=x".to_vec()];
    h.send(Frame::Exec(r));
    let o = h.outcome();
    assert_eq!(
        o.out(),
        "1 /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
}

#[test]
fn nul_bytes_are_refused() {
    let o = run(ExecRequest {
        argv: vec![b"echo".to_vec(), b"a\0b".to_vec()],
        ..Default::default()
    });
    assert_eq!(o.error, Some((125, "argv contains a NUL byte".into())));
    let mut r = req(&["true"]);
    r.env = vec![b"A=\0".to_vec()];
    assert_eq!(run(r).error.unwrap().0, 125);
}

#[test]
fn stdin_is_relayed_with_eof() {
    let mut h = Host::exec(req(&["cat"]));
    h.send(Frame::Stdin(b"hello ".to_vec()));
    h.send(Frame::Stdin(b"\x00\xffworld\n".to_vec()));
    h.send(Frame::Stdin(Vec::new()));
    // Data after EOF is dropped.
    h.send(Frame::Stdin(b"late".to_vec()));
    let o = h.outcome();
    o.assert_well_formed();
    assert_eq!(o.stdout, b"hello \x00\xffworld\n");
    assert_eq!(o.exit, Some(ExitKind::Code(0)));
}

#[test]
fn large_stdin_and_stdout_stream_concurrently() {
    // 3 MiB through `cat`: the host must write and read at the same time.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut h = Host::exec(req(&["cat"]));
    let mut w = h.sock.try_clone().unwrap();
    let input = data.clone();
    let writer = std::thread::spawn(move || {
        for c in input.chunks(50_000) {
            Frame::Stdin(c.to_vec()).write_to(&mut w).unwrap();
        }
        Frame::Stdin(Vec::new()).write_to(&mut w).unwrap();
    });
    let mut o = Outcome::default();
    while let Some(f) = h.next() {
        o.absorb(f);
    }
    writer.join().unwrap();
    h.join();
    o.assert_well_formed();
    assert!(o.stdout == data, "got {} bytes", o.stdout.len());
}

#[test]
fn command_that_ignores_stdin() {
    // The command exits without reading: pending stdin is dropped (EPIPE).
    let mut h = Host::exec(req(&["true"]));
    for _ in 0..20 {
        h.send(Frame::Stdin(vec![b'x'; 60_000]));
    }
    let o = h.outcome();
    assert_eq!(o.exit, Some(ExitKind::Code(0)));
}

#[test]
fn large_output_arrives_complete_and_in_order() {
    let dir = std::env::temp_dir().join(format!("locald-agent-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("data");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..5 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&file, &data).unwrap();
    let mut h = Host::exec(req(&["head", "-c", "5242880", file.to_str().unwrap()]));
    // A slow host: the agent must wait, not buffer without bound or fail.
    std::thread::sleep(Duration::from_millis(300));
    let mut o = Outcome::default();
    while let Some(f) = h.next() {
        o.absorb(f);
    }
    h.join();
    o.assert_well_formed();
    assert_eq!(o.stdout.len(), data.len());
    assert!(o.stdout == data, "content differs");
    assert_eq!(o.exit, Some(ExitKind::Code(0)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn exit_waits_for_output_of_the_whole_group() {
    // The shell exits at once; a background child still holds stdout.
    let o = run(sh("echo a; (sleep 0.3; echo b) &"));
    assert_eq!(o.out(), "a\nb\n");
    assert_eq!(o.exit, Some(ExitKind::Code(0)));
}

#[test]
fn signal_frame_reaches_the_command() {
    let mut h = Host::exec(req(&["sleep", "1000"]));
    assert!(matches!(h.next(), Some(Frame::Started(_))));
    h.send(Frame::Signal(libc::SIGTERM));
    let o = h.outcome();
    assert_eq!(o.exit, Some(ExitKind::Signal(libc::SIGTERM)));
}

#[test]
fn signal_reaches_the_process_group() {
    // The shell waits for a child; the group signal kills both.
    let mut h = Host::exec(sh("sleep 1000; echo not-reached"));
    assert!(matches!(h.next(), Some(Frame::Started(_))));
    std::thread::sleep(Duration::from_millis(100));
    h.send(Frame::Signal(libc::SIGKILL));
    let o = h.outcome();
    assert_eq!(o.exit, Some(ExitKind::Signal(libc::SIGKILL)));
    assert!(o.stdout.is_empty());
}

#[test]
fn host_closing_early_kills_the_command_group() {
    let mut h = Host::exec(sh("sleep 1000 & echo $!; wait"));
    let Some(Frame::Started(pid)) = h.next() else {
        panic!("no Started");
    };
    let Some(Frame::Stdout(line)) = h.next() else {
        panic!("no Stdout");
    };
    let bg: i32 = String::from_utf8_lossy(&line).trim().parse().unwrap();
    let Host { sock, handler } = h;
    drop(sock);
    handler.unwrap().join().unwrap();
    // The handler reaped the shell; the background sleep was killed too.
    assert!(dead(pid as i32));
    assert!(wait_dead(bg), "background process {bg} survived");
}

#[test]
fn tty_request_gets_a_terminal() {
    let mut r = sh("test -t 0 && test -t 1 && test -t 2 && echo tty; stty size; echo err >&2");
    r.tty = Some((24, 80));
    let o = run(r);
    // On a terminal stderr is merged into stdout, with \r\n line ends.
    assert_eq!(o.out(), "tty\r\n24 80\r\nerr\r\n");
    assert!(o.stderr.is_empty());
    assert_eq!(o.exit, Some(ExitKind::Code(0)));
}

#[test]
fn tty_is_the_controlling_terminal_and_resize_is_seen() {
    let mut r = sh("read x; stty size; tty >/dev/null && echo ctty-ok; exit 3");
    r.tty = Some((24, 80));
    let mut h = Host::exec(r);
    h.send(Frame::Resize(50, 132));
    h.send(Frame::Stdin(b"go\n".to_vec()));
    let o = h.outcome();
    o.assert_well_formed();
    let out = o.out();
    assert!(out.contains("50 132\r\n"), "{out:?}");
    assert!(out.contains("ctty-ok"), "{out:?}");
    assert_eq!(o.exit, Some(ExitKind::Code(3)));

    // /dev/tty opens only with a controlling terminal.
    let mut r = sh("echo hi > /dev/tty && echo opened");
    r.tty = Some((10, 10));
    let out = run(r).out();
    assert_eq!(out, "hi\r\nopened\r\n");
}

#[test]
fn tty_stdin_eof_ends_input_even_after_a_partial_line() {
    let mut r = req(&["cat"]);
    r.tty = Some((24, 80));
    let mut h = Host::exec(r);
    h.send(Frame::Stdin(b"line\npartial".to_vec()));
    h.send(Frame::Stdin(Vec::new()));
    let o = h.outcome();
    o.assert_well_formed();
    assert_eq!(o.exit, Some(ExitKind::Code(0)));
    let out = o.out();
    // The terminal's echo of the input and cat's copy, interleaved.
    assert_eq!(out.matches("line\r\n").count(), 2, "{out:?}");
    assert_eq!(out.matches("partial").count(), 2, "{out:?}");
}

#[test]
fn tty_signal_and_host_close() {
    let mut r = req(&["sleep", "1000"]);
    r.tty = Some((24, 80));
    let mut h = Host::exec(r);
    let Some(Frame::Started(pid)) = h.next() else {
        panic!("no Started");
    };
    let Host { sock, handler } = h;
    drop(sock);
    handler.unwrap().join().unwrap();
    assert!(dead(pid as i32));
}

#[test]
fn the_image_user_is_the_default() {
    if !crate::test_support::is_root() {
        crate::test_support::skip(crate::test_support::Why::NotRoot("setuid/setgid"));
        return;
    }
    let c = Context {
        user: Some((1234, 5678)),
        ..ctx()
    };
    let mut h = Host::connect(c.clone());
    h.send(Frame::Exec(sh("id -u; id -g")));
    assert_eq!(h.outcome().out(), "1234\n5678\n");
    // A request's own ids win.
    let mut r = sh("id -u; id -g");
    r.uid = Some(0);
    r.gid = Some(0);
    let mut h = Host::connect(c);
    h.send(Frame::Exec(r));
    assert_eq!(h.outcome().out(), "0\n0\n");
}

#[test]
fn uid_and_gid_are_applied() {
    if !crate::test_support::is_root() {
        crate::test_support::skip(crate::test_support::Why::NotRoot("setuid/setgid"));
        return;
    }
    let mut r = sh("id -u; id -g; id -G");
    r.uid = Some(1234);
    r.gid = Some(5678);
    let o = run(r);
    assert_eq!(o.out(), "1234\n5678\n5678\n");
    // A tty is owned by the user.
    let mut r = sh("stat -c %u $(tty)");
    r.uid = Some(1234);
    r.tty = Some((24, 80));
    assert_eq!(run(r).out(), "1234\r\n");
    // A workdir the user cannot enter: 125 from the child.
    let dir = std::env::temp_dir().join(format!("locald-agent-priv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut r = req(&["true"]);
    r.uid = Some(1234);
    r.workdir = Some(dir.as_os_str().as_bytes().to_vec());
    let (code, msg) = run(r).error.unwrap();
    assert_eq!(code, 125);
    assert!(msg.ends_with("Permission denied"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shutdown_signals_the_power_process() {
    // Stand-in for PID 1: a process whose death shows the signal.
    let mut victim = std::process::Command::new("sleep")
        .arg("100")
        .spawn()
        .unwrap();
    let c = Context {
        env: spec::parse_env(None),
        power_pid: Some(victim.id() as libc::pid_t),
        user: None,
    };
    let mut h = Host::connect(c.clone());
    h.send(Frame::Shutdown);
    assert_eq!(h.next(), None, "connection closes after Shutdown");
    h.join();
    let status = victim.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(POWEROFF_SIGNAL));

    // Also in the middle of a command.
    let mut victim = std::process::Command::new("sleep")
        .arg("100")
        .spawn()
        .unwrap();
    let c = Context {
        power_pid: Some(victim.id() as libc::pid_t),
        ..c
    };
    let mut h = Host::connect(c);
    h.send(Frame::Exec(sh("read x; echo $x")));
    h.send(Frame::Shutdown);
    h.send(Frame::Stdin(b"still-running\n".to_vec()));
    assert_eq!(victim.wait().unwrap().signal(), Some(POWEROFF_SIGNAL));
    let o = h.outcome();
    assert_eq!(o.out(), "still-running\n");
}

#[test]
fn protocol_errors_are_answered_with_125() {
    // First frame not Exec.
    let mut h = Host::connect(ctx());
    h.send(Frame::Stdin(b"x".to_vec()));
    let o = h.outcome();
    assert_eq!(o.error, Some((125, "expected Exec, got Stdin".into())));

    // Garbage instead of a frame.
    let mut h = Host::connect(ctx());
    h.sock.write_all(&[0, 0, 0, 0]).unwrap();
    let o = h.outcome();
    let (code, msg) = o.error.unwrap();
    assert_eq!(code, 125);
    assert!(msg.contains("frame length 0"), "{msg}");

    // A bad frame mid-stream kills the command.
    let mut h = Host::exec(req(&["sleep", "1000"]));
    let Some(Frame::Started(pid)) = h.next() else {
        panic!("no Started");
    };
    h.send(Frame::Started(1));
    let o = h.outcome();
    assert_eq!(o.error, Some((125, "unexpected Started frame".into())));
    assert!(dead(pid as i32));

    // Host closes before sending anything: nothing happens.
    let h = Host::connect(ctx());
    let Host { sock, handler } = h;
    drop(sock);
    handler.unwrap().join().unwrap();
}

/// Kills and reaps a forked process when dropped (also when a test fails).
struct ForkedChild(libc::pid_t);

impl Drop for ForkedChild {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

#[test]
fn concurrent_connections_through_the_accept_loop() {
    use std::os::unix::net::UnixListener;
    let dir = std::env::temp_dir().join(format!("locald-agent-acc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    // SAFETY: the child closes every inherited descriptor but the listener
    // (other tests' sockets and pipes must not stay open in it), then runs
    // the accept loop until killed; glibc keeps malloc usable after fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let keep = listener.as_raw_fd();
        for fd in 3..4096 {
            if fd != keep {
                // SAFETY: closing descriptors in our own (forked) process.
                unsafe { libc::close(fd) };
            }
        }
        crate::agent::serve_peers(&OwnedFd::from(listener), &ctx(), |_, _| true);
    }
    let _guard = ForkedChild(pid);
    drop(listener);
    let connect = |r: ExecRequest| {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        Frame::Exec(r).write_to(&mut s).unwrap();
        s
    };
    let read_all = |mut s: UnixStream| {
        let mut o = Outcome::default();
        while let Some(f) = Frame::read_from(&mut s).unwrap() {
            o.absorb(f);
        }
        o
    };
    // The first command waits for input that is sent only after the second
    // one has run to completion: that needs two handlers at once.
    let mut blocked = connect(sh("read x; echo got $x"));
    let fast = connect(req(&["echo", "fast"]));
    assert_eq!(read_all(fast).out(), "fast\n");
    Frame::Stdin(b"go\n".to_vec())
        .write_to(&mut blocked)
        .unwrap();
    let o = read_all(blocked);
    o.assert_well_formed();
    assert_eq!(o.out(), "got go\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pure_helpers() {
    assert_eq!(exit_kind(0), ExitKind::Code(0));
    assert_eq!(exit_kind(42 << 8), ExitKind::Code(42));
    assert_eq!(exit_kind(libc::SIGKILL), ExitKind::Signal(9));
    assert_eq!(exit_kind(libc::SIGSEGV | 0x80), ExitKind::Signal(11));
    assert_eq!(eof_chars_needed(None), 1);
    assert_eq!(eof_chars_needed(Some(b'\n')), 1);
    assert_eq!(eof_chars_needed(Some(b'\r')), 1);
    assert_eq!(eof_chars_needed(Some(b'x')), 2);
    assert_eq!(shown(b"ab\xff"), "ab\u{fffd}");
    assert_eq!(shown(&[b'a'; 300]).len(), 259);
    assert_eq!(frame_name(&Frame::Resize(1, 2)), "Resize");
    assert_eq!(
        refusal_for(Stage::Exec, libc::ENOENT, "x", ""),
        (127, "x: not found".into())
    );
    assert_eq!(
        refusal_for(Stage::Exec, libc::ENOEXEC, "x", ""),
        (126, "x: Exec format error".into())
    );
    assert_eq!(
        refusal_for(Stage::Workdir, libc::EACCES, "x", "/w"),
        (125, "workdir '/w': Permission denied".into())
    );
    assert_eq!(refusal_for(Stage::Ids, libc::EPERM, "x", "").0, 125);
    for b in 1..=6 {
        assert_eq!(Stage::from_u8(b).map(|s| s as u8), Some(b));
    }
    assert_eq!(Stage::from_u8(0), None);
}

/// The real accept loop serves the host (vsock CID 2) only: a peer that is
/// not the host — here a Unix socket — is closed without an answer.
#[test]
fn the_accept_loop_closes_connections_not_from_the_host() {
    use std::os::unix::net::UnixListener;
    let dir = std::env::temp_dir().join(format!("locald-agent-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    // SAFETY: as in `concurrent_connections_through_the_accept_loop`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let keep = listener.as_raw_fd();
        for fd in 3..4096 {
            if fd != keep {
                // SAFETY: closing descriptors in our own (forked) process.
                unsafe { libc::close(fd) };
            }
        }
        crate::agent::accept_loop(&OwnedFd::from(listener), &ctx());
    }
    let _guard = ForkedChild(pid);
    drop(listener);
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    // The write may already fail if the loop closed the connection.
    let _ = Frame::Exec(req(&["echo", "served"])).write_to(&mut s);
    let mut got = Vec::new();
    let r = std::io::Read::read_to_end(&mut s, &mut got);
    assert!(
        got.is_empty(),
        "a non-host peer got an answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    // EOF or a reset, not a timeout: the connection was closed at once.
    if let Err(e) = r {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
