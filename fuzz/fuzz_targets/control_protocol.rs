//! Fuzzes the named-VM control protocol (JSON lines on the VM's control
//! socket, `instance.rs`): request lines through `parse_request`, response
//! lines through the client's decoding, and whole exchanges through the
//! real server loop `serve_control` on a Unix socket, against a target that
//! stops like the CLI's (`RunningVm::stop` waits on the VM's control block
//! with the client's `timeout_secs`).
//!
//! Oracles, besides "no panic":
//! - any accepted request round-trips: serialising it and parsing that
//!   gives the same request; same for responses the client accepts;
//! - the server answers every connection with exactly one line that the
//!   client decodes: `error` when (and only when) the line is unterminated,
//!   too long or not a request, `info` with the target's description for
//!   `info`, `stopped` (after which the server returns) for `stop`, and
//!   the stop grace is the requested `timeout_secs`.

#![no_main]

#[path = "common.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::Input;
use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::{ExitStatus, VmControl};
use locald_vmm::instance::{
    parse_request, serve_control, ControlTarget, Info, Request, Response, MAX_REQUEST,
    PROTOCOL_VERSION,
};

fn info() -> Info {
    Info {
        version: PROTOCOL_VERSION,
        name: "fuzz".into(),
        pid: 42,
        cpus: 2,
        memory_mib: 128,
        started_at: 1,
        vsock: "/run/x/vsock.sock".into(),
        publish: vec![(8080, 80)],
    }
}

/// Stops like the CLI's target: `RunningVm::stop` asks the guest to power
/// off, then waits on the VM's control block for at most the grace period.
/// The guest here has already powered off, so the wait returns at once.
struct Target {
    control: Arc<VmControl>,
    stopped_with: Option<Duration>,
    running: bool,
}

impl ControlTarget for Target {
    fn info(&self) -> Info {
        info()
    }
    fn stop(&mut self, timeout: Duration) -> String {
        self.stopped_with = Some(timeout);
        self.running = false;
        match self.control.wait(Some(timeout)) {
            Some(o) => format!("{o:?}").to_lowercase(),
            None => "timed out".into(),
        }
    }
    fn running(&self) -> bool {
        self.running
    }
}

fn listener() -> &'static UnixListener {
    static L: OnceLock<UnixListener> = OnceLock::new();
    L.get_or_init(|| {
        // An abstract socket: nothing to clean up on disk.
        let name = format!("locald-fuzz-ctl-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        UnixListener::bind_addr(&addr).unwrap()
    })
}

fn check_request(line: &str) -> Option<Request> {
    let r = parse_request(line).ok()?;
    let text = serde_json::to_string(&r).unwrap();
    assert!(!text.contains('\n'));
    assert_eq!(parse_request(&text), Ok(r.clone()), "{line:?} -> {text:?}");
    Some(r)
}

fn check_response(line: &str) {
    if let Ok(r) = serde_json::from_str::<Response>(line) {
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains('\n'));
        let again: Response = serde_json::from_str(&text).unwrap();
        assert_eq!(again, r, "{line:?} -> {text:?}");
    }
}

/// What the server should make of the wire bytes: the first line, if it
/// is terminated, short enough and UTF-8, parsed.
fn expected_request(wire: &[u8]) -> Option<Request> {
    let n = wire.iter().position(|&b| b == b'\n')? + 1;
    if n > MAX_REQUEST {
        return None;
    }
    let line = std::str::from_utf8(&wire[..n]).ok()?;
    parse_request(line.trim_end()).ok()
}

fn connect() -> UnixStream {
    UnixStream::connect_addr(&listener().local_addr().unwrap()).unwrap()
}

/// One connection to the real server loop.
fn exchange(wire: &[u8]) {
    let l = listener();
    let mut client = connect();
    // Requests are small; the socket buffer holds them before the server reads.
    client.write_all(wire).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let control = Arc::new(VmControl::new());
    control.request_stop(ExitStatus::PowerOff);
    let mut t = Target {
        control,
        stopped_with: None,
        running: true,
    };
    let req = expected_request(wire);
    // The server returns after a stop; otherwise it answers and loops, so
    // a second client that asks to stop ends it.
    let mut closer = None;
    if !matches!(req, Some(Request::Stop { .. })) {
        let mut c = connect();
        c.write_all(b"{\"op\":\"stop\",\"timeout_secs\":0}\n")
            .unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        closer = Some(c);
    }
    serve_control(l, &mut t).unwrap();
    let mut answer = String::new();
    let mut r = BufReader::new(&client);
    r.read_line(&mut answer).unwrap();
    let mut rest = String::new();
    r.read_line(&mut rest).unwrap();
    assert!(rest.is_empty(), "more than one answer: {rest:?}");
    assert!(answer.ends_with('\n'), "{answer:?}");
    let resp: Response = serde_json::from_str(answer.trim_end()).expect("server answer decodes");
    match (req, resp) {
        (Some(Request::Info), Response::Info(i)) => assert_eq!(i, info()),
        (Some(Request::Stop { timeout_secs }), Response::Stopped { .. }) => {
            assert_eq!(t.stopped_with, Some(Duration::from_secs(timeout_secs)));
        }
        (None, Response::Error { .. }) => {}
        (req, resp) => panic!("request {req:?} answered {resp:?}"),
    }
    if let Some(c) = closer {
        let mut a = String::new();
        BufReader::new(c).read_line(&mut a).unwrap();
        assert!(a.contains("\"stopped\""), "{a:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let rest = inp.rest();
    match mode % 4 {
        0 | 1 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                check_request(s);
            }
        }
        2 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                check_response(s);
            }
        }
        _ => exchange(&rest[..rest.len().min(MAX_REQUEST + 64)]),
    }
});
