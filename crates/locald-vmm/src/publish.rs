//! Port publishing: a TCP listener on host loopback whose connections are
//! carried over vsock to the guest agent, which connects them to the
//! guest's own loopback port (`Forward` frame). Each connection is spliced
//! in both directions with half-closes passed through.
//!
//! Threads: one accept thread per published port, two copy threads per
//! connection; started from a seccomp-filtered thread, each installs the
//! `control` filter first (see [`crate::seccomp::spawn_inherit`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use locald_agent_proto::{Frame, AGENT_PORT};

use crate::seccomp::{spawn_inherit, ThreadKind::Control};

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
pub fn publish(uds: PathBuf, map: PortMap) -> Result<Publisher, PublishError> {
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
    let thread = spawn_inherit(format!("publish {}", map.host), Control, move || {
        while !stop2.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((tcp, _)) => {
                    let uds = uds.clone();
                    let _ =
                        spawn_inherit(format!("publish {} conn", map.host), Control, move || {
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
