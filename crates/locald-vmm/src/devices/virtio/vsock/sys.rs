//! The few socket calls std does not offer, used by the vsock muxer on the
//! device's worker thread: a connect that never blocks (a host listener
//! with a full backlog must not stall the device), a send that never
//! raises SIGPIPE, and a zero-timeout check for a peer that closed both
//! directions.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects a non-blocking stream socket to the Unix socket at `path`.
/// Fails with `WouldBlock` when the listener's backlog is full and with
/// `InvalidInput` when the path does not fit in `sockaddr_un`.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path empty, too long or with a NUL byte",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len`
    // covers the family and the NUL-terminated path inside it.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

/// Sends `buf` without blocking and without SIGPIPE (a closed peer gives
/// `BrokenPipe`).
pub fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call;
        // send(2) does not keep the pointer.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether the peer of a connected socket has shut down both directions
/// (or closed it): POLLHUP, checked without waiting.
pub fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout; the kernel writes `revents` only.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLHUP != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_sends_and_sees_hangup() {
        let dir = super::super::tests::TempDir::new("sys");
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        let c = connect_nonblocking(&path).unwrap();
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(send_nosignal(c.as_raw_fd(), b"hi").unwrap(), 2);
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        assert!(!peer_hung_up(c.as_raw_fd()));
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(!peer_hung_up(c.as_raw_fd()));
        drop(s);
        assert!(peer_hung_up(c.as_raw_fd()));
        let e = send_nosignal(c.as_raw_fd(), b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn connect_errors() {
        let dir = super::super::tests::TempDir::new("sys2");
        assert!(connect_nonblocking(&dir.path().join("none")).is_err());
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn full_backlog_does_not_block() {
        let dir = super::super::tests::TempDir::new("sys3");
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        // Never accept: the backlog fills and connect must fail, not block.
        let mut held = Vec::new();
        let err = loop {
            match connect_nonblocking(&path) {
                Ok(c) => held.push(c),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "backlog never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(l);
    }
}
