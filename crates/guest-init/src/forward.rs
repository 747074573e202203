//! Port forwarding: a connection that opens with `Forward(port)` instead of
//! `Exec` is connected to TCP `127.0.0.1:port` in the guest. The agent
//! answers `Started(0)` (or `Error` with code 125 and closes), then copies
//! raw bytes both ways until both directions ended; an EOF on one side
//! becomes a `shutdown(SHUT_WR)` of the other (half-closes pass through),
//! a reset or error on either side closes both.
//!
//! Runs in the connection's handler process (or a test thread), one `poll`
//! loop, one 64 KiB buffer per direction: a side that does not read stops
//! the other side's reading (backpressure), never this process.

use std::io;
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use locald_agent_proto::{Frame, MAX_DATA};

use crate::console;
use crate::session::{self, CODE_OTHER};
use crate::sys;

/// One direction of the copy.
struct Direction {
    from: RawFd,
    to: RawFd,
    /// Bytes read from `from`, not yet written to `to` (read only when empty).
    buf: Vec<u8>,
    pos: usize,
    /// `from` reached EOF.
    eof: bool,
    /// EOF passed on to `to`.
    done: bool,
}

impl Direction {
    fn new(from: RawFd, to: RawFd) -> Self {
        Direction {
            from,
            to,
            buf: Vec::new(),
            pos: 0,
            eof: false,
            done: false,
        }
    }

    fn pending(&self) -> bool {
        self.pos < self.buf.len()
    }
}

/// Serves a `Forward(port)` connection on `sock`.
pub fn serve(sock: RawFd, port: u16) {
    let tcp = match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("127.0.0.1:{port}: {}", console::describe(&e));
            return session::refuse(sock, (CODE_OTHER, msg));
        }
    };
    let started = Frame::Started(0).encode();
    if sys::send_all_until(sock, &started, Instant::now() + session::LINGER).is_err() {
        return;
    }
    let _ = splice(sock, tcp.as_raw_fd());
}

/// Copies `a` → `b` and `b` → `a` until both directions ended. Errors
/// (reset, broken pipe) end both.
pub fn splice(a: RawFd, b: RawFd) -> io::Result<()> {
    let mut dirs = [Direction::new(a, b), Direction::new(b, a)];
    loop {
        if dirs.iter().all(|d| d.done) {
            return Ok(());
        }
        let mut p = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; 4];
        for (i, d) in dirs.iter().enumerate() {
            if d.pending() {
                p[2 * i] = pollfd(d.to, libc::POLLOUT);
            } else if !d.eof {
                p[2 * i + 1] = pollfd(d.from, libc::POLLIN);
            }
        }
        // SAFETY: `p` is a valid array of pollfds; fd -1 entries are ignored.
        if unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) } < 0 {
            continue; // EINTR
        }
        for (i, d) in dirs.iter_mut().enumerate() {
            if p[2 * i + 1].revents != 0 {
                d.buf.resize(MAX_DATA, 0);
                d.pos = 0;
                match sys::recv(d.from, &mut d.buf, libc::MSG_DONTWAIT) {
                    Ok(0) => {
                        d.buf.clear();
                        d.eof = true;
                    }
                    Ok(n) => d.buf.truncate(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => d.buf.clear(),
                    Err(e) => return Err(e),
                }
            }
            if d.pending() {
                match sys::send_nonblocking(d.to, &d.buf[d.pos..]) {
                    Ok(n) => d.pos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if d.eof && !d.pending() && !d.done {
                // SAFETY: shutdown on a descriptor we hold.
                unsafe { libc::shutdown(d.to, libc::SHUT_WR) };
                d.done = true;
            }
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{serve as serve_conn, Context};
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn connect(port: u16) -> (UnixStream, std::thread::JoinHandle<()>) {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let ctx = Context {
            env: Vec::new(),
            power_pid: None,
            user: None,
        };
        let t = std::thread::spawn(move || serve_conn(OwnedFd::from(agent), &ctx));
        let mut host = host;
        Frame::Forward(port).write_to(&mut host).unwrap();
        (host, t)
    }

    #[test]
    fn forwards_both_ways_with_half_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // Guest service: reads everything, then answers with its size and
        // a large reply, then closes.
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            let reply: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
            c.write_all(format!("{}\n", got.len()).as_bytes()).unwrap();
            c.write_all(&reply).unwrap();
            got
        });
        let (mut host, t) = connect(port);
        assert_eq!(
            Frame::read_from(&mut host).unwrap(),
            Some(Frame::Started(0))
        );
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i * 13) as u8).collect();
        host.write_all(&sent).unwrap();
        host.shutdown(Shutdown::Write).unwrap(); // half-close reaches the service
        let mut back = Vec::new();
        host.read_to_end(&mut back).unwrap();
        assert!(server.join().unwrap() == sent);
        let expected: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        assert!(back.starts_with(b"300000\n"));
        assert!(
            back[7..] == expected[..],
            "reply differs ({} bytes)",
            back.len()
        );
        t.join().unwrap();
    }

    #[test]
    fn refused_port_is_an_error() {
        // Bind then drop to find a port that nothing listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (mut host, t) = connect(port);
        match Frame::read_from(&mut host).unwrap() {
            Some(Frame::Error { code, message }) => {
                assert_eq!(code, 125);
                assert_eq!(message, format!("127.0.0.1:{port}: Connection refused"));
            }
            other => panic!("{other:?}"),
        }
        drop(host);
        t.join().unwrap();
    }

    #[test]
    fn host_close_ends_the_forward() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (mut host, t) = connect(port);
        let (mut c, _) = l.accept().unwrap();
        assert_eq!(
            Frame::read_from(&mut host).unwrap(),
            Some(Frame::Started(0))
        );
        host.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        drop(host); // EOF from the host: passed on as a half-close
        let mut rest = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(c); // service closes too: both directions done
        t.join().unwrap();
    }
}
