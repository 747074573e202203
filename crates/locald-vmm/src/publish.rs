//! Port publishing: a TCP listener on host loopback whose connections are
//! carried over vsock to the guest agent, which connects them to the
//! guest's own loopback port (`Forward` frame). Each connection is spliced
//! in both directions with half-closes passed through.
//!
//! Bounded: any local user can connect to a published port, and every
//! connection takes one of the vsock muxer's connection slots, the same
//! slots the owner's `exec` and `stop` need. So each port carries at most
//! [`MAX_CONNECTIONS_PER_PORT`] connections at a time and the whole process
//! at most [`MAX_PUBLISHED_CONNECTIONS`]; a connection beyond either is
//! closed as soon as it is accepted. With the muxer's 1024 slots, of which
//! the guest may take 512, at least 256 stay for the control path.
//!
//! Threads: one accept thread per published port, two copy threads per
//! connection; started from a seccomp-filtered thread, each installs the
//! `control` filter first (see [`crate::seccomp::spawn_inherit`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use locald_agent_proto::{Frame, AGENT_PORT};

use crate::seccomp::{spawn_inherit, ThreadKind::Control};

/// Most concurrent connections through one published port.
pub const MAX_CONNECTIONS_PER_PORT: usize = 64;
/// Most concurrent connections through all published ports of this
/// process (see the module header for the arithmetic).
pub const MAX_PUBLISHED_CONNECTIONS: usize = 256;

/// Published connections open in this process.
static PUBLISHED: AtomicUsize = AtomicUsize::new(0);

/// One connection's place under both limits; released on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place on a port whose open-connection count is `port`
    /// (limit `per_port`) and in the process, or None when either is full.
    fn take(port: &Arc<AtomicUsize>, per_port: usize) -> Option<Slot> {
        let up = |limit: usize| move |n: usize| (n < limit).then_some(n + 1);
        port.fetch_update(Ordering::SeqCst, Ordering::SeqCst, up(per_port))
            .ok()?;
        if PUBLISHED
            .fetch_update(
                Ordering::SeqCst,
                Ordering::SeqCst,
                up(MAX_PUBLISHED_CONNECTIONS),
            )
            .is_err()
        {
            port.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(port.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        PUBLISHED.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Bad `--publish` input or an unusable host port.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("invalid --publish '{0}': use HOST_PORT:GUEST_PORT (TCP ports 1-65535)")]
    Syntax(String),
    #[error("cannot listen on 127.0.0.1:{port}: {err}")]
    Bind { port: u16, err: io::Error },
}

/// One published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMap {
    /// Port on host loopback.
    pub host: u16,
    /// Port on guest loopback.
    pub guest: u16,
}

impl PortMap {
    /// Parses `HOST:GUEST`.
    pub fn parse(s: &str) -> Result<Self, PublishError> {
        let bad = || PublishError::Syntax(s.to_string());
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        Ok(PortMap {
            host: port(h)?,
            guest: port(g)?,
        })
    }
}

/// A running publisher; dropping it stops accepting (open connections
/// finish on their own).
pub struct Publisher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The mapping served.
    pub map: PortMap,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Listens on `127.0.0.1:map.host` and forwards each connection to guest
/// port `map.guest` through the agent behind the vsock socket `uds`.
/// At most [`MAX_CONNECTIONS_PER_PORT`] connections are open at a time.
pub fn publish(uds: PathBuf, map: PortMap) -> Result<Publisher, PublishError> {
    publish_limited(uds, map, MAX_CONNECTIONS_PER_PORT)
}

/// [`publish`] with `per_port` connections at most.
fn publish_limited(uds: PathBuf, map: PortMap, per_port: usize) -> Result<Publisher, PublishError> {
    let listener =
        TcpListener::bind(("127.0.0.1", map.host)).map_err(|err| PublishError::Bind {
            port: map.host,
            err,
        })?;
    listener
        .set_nonblocking(true)
        .map_err(|err| PublishError::Bind {
            port: map.host,
            err,
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let open = Arc::new(AtomicUsize::new(0));
    let thread = spawn_inherit(format!("publish {}", map.host), Control, move || {
        let mut warned_at: Option<Instant> = None;
        while !stop2.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((tcp, _)) => {
                    let Some(slot) = Slot::take(&open, per_port) else {
                        // Closed at once: the client sees EOF, not a hang.
                        let _ = tcp.shutdown(Shutdown::Both);
                        drop(tcp);
                        if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!(
                                "publish {}: connection limit ({per_port} on this port, \
                                 {MAX_PUBLISHED_CONNECTIONS} in all) reached; closing new \
                                 connections",
                                map.host
                            );
                            warned_at = Some(Instant::now());
                        }
                        continue;
                    };
                    let uds = uds.clone();
                    let _ =
                        spawn_inherit(format!("publish {} conn", map.host), Control, move || {
                            let _slot = slot;
                            if let Err(e) = forward(tcp, &uds, map.guest) {
                                tracing::warn!("publish {}:{}: {e}", map.host, map.guest);
                            }
                        });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    tracing::warn!("publish {}: accept failed: {e}", map.host);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })
    .map_err(|err| PublishError::Bind {
        port: map.host,
        err,
    })?;
    Ok(Publisher {
        stop,
        thread: Some(thread),
        map,
    })
}

/// Opens a stream to guest loopback port `port` through the agent.
pub fn connect_guest_port(uds: &std::path::Path, port: u16) -> io::Result<UnixStream> {
    let mut s = crate::agent::connect(uds, AGENT_PORT).map_err(io::Error::other)?;
    Frame::Forward(port).write_to(&mut s)?;
    match Frame::read_from(&mut s)? {
        Some(Frame::Started(_)) => Ok(s),
        Some(Frame::Error { message, .. }) => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("guest port {port}: {message}"),
        )),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected agent answer {other:?}"),
        )),
    }
}

fn forward(tcp: TcpStream, uds: &std::path::Path, port: u16) -> io::Result<()> {
    tcp.set_nonblocking(false)?;
    let vs = match connect_guest_port(uds, port) {
        Ok(s) => s,
        Err(e) => {
            let _ = tcp.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    let (tcp2, vs2) = (tcp.try_clone()?, vs.try_clone()?);
    let up = spawn_inherit(format!("publish {port} up"), Control, move || {
        pump(tcp2, vs2, |w| w.shutdown(Shutdown::Write));
    })?;
    pump(vs, tcp, |w| w.shutdown(Shutdown::Write));
    let _ = up.join();
    Ok(())
}

/// Copies `from` to `to` until EOF or error, then half-closes `to`.
fn pump<R: Read, W: Write>(mut from: R, mut to: W, close: impl Fn(&W) -> io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = close(&to);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_maps_parse() {
        assert_eq!(
            PortMap::parse("8080:80").unwrap(),
            PortMap {
                host: 8080,
                guest: 80
            }
        );
        for bad in [
            "", "80", "0:80", "80:0", "a:b", "70000:80", "80:80:80", ":80",
        ] {
            assert!(PortMap::parse(bad).is_err(), "{bad}");
        }
    }

    /// A stand-in for the vsock muxer and the guest agent at `uds`: answers
    /// every `CONNECT` and `Forward`, then holds the stream open until the
    /// host side closes it. Counts the streams it holds.
    fn fake_guest(uds: &std::path::Path) -> Arc<AtomicUsize> {
        let l = std::os::unix::net::UnixListener::bind(uds).unwrap();
        let held = Arc::new(AtomicUsize::new(0));
        let held2 = held.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let held = held2.clone();
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    let _ = s.write_all(b"OK 1073741824\n");
                    if !matches!(Frame::read_from(&mut s), Ok(Some(Frame::Forward(_)))) {
                        return;
                    }
                    let _ = Frame::Started(1).write_to(&mut s);
                    held.fetch_add(1, Ordering::SeqCst);
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink);
                    held.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        held
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Issue 14 item 11: a local user opening connections to a published
    /// port gets `per_port` of them; the rest are closed at once, and a
    /// freed place is usable again.
    #[test]
    fn connections_per_port_are_bounded() {
        let dir = std::env::temp_dir().join(format!("ldpub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let held = fake_guest(&uds);
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        const CAP: usize = 8;
        let _p = publish_limited(
            uds,
            PortMap {
                host: port,
                guest: 80,
            },
            CAP,
        )
        .unwrap();
        let mut open = Vec::new();
        for _ in 0..CAP {
            open.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
        wait_for("the first connections reach the guest", || {
            held.load(Ordering::SeqCst) == CAP
        });
        // Beyond the cap: closed promptly (EOF), never forwarded.
        for _ in 0..3 {
            let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
            extra
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let t0 = Instant::now();
            let mut b = [0u8; 1];
            let n = extra.read(&mut b).unwrap_or(0);
            assert_eq!(n, 0, "an extra connection must be closed");
            assert!(t0.elapsed() < Duration::from_secs(2), "closed promptly");
        }
        assert_eq!(held.load(Ordering::SeqCst), CAP);
        // Closing one frees its place.
        open.pop();
        wait_for("a closed connection leaves the guest", || {
            held.load(Ordering::SeqCst) == CAP - 1
        });
        wait_for("its place is free again", || {
            open.len() < CAP && {
                open.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
                std::thread::sleep(Duration::from_millis(50));
                if held.load(Ordering::SeqCst) == CAP {
                    true
                } else {
                    open.pop();
                    false
                }
            }
        });
        drop(open);
        wait_for("every place is released", || {
            held.load(Ordering::SeqCst) == 0
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn busy_port_is_a_clear_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let e = publish(
            "/nonexistent".into(),
            PortMap {
                host: port,
                guest: 80,
            },
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains(&port.to_string()), "{e}");
    }
}
