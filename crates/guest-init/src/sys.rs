//! Thin, allocation-free wrappers over the system calls the agent uses
//! (file descriptors, sockets, `poll`). Every function retries `EINTR`
//! where that is the right thing to do and reports failures as
//! `io::Error` (from `errno`). Safe to call from any process or thread.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// `rc` as a result: `-1` becomes the current `errno`.
pub fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Same as [`cvt`] for the `ssize_t` results of `read`/`send`...
fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

/// Takes ownership of a freshly returned descriptor.
///
/// # Safety
/// `fd` must be an open descriptor owned by nobody else.
pub unsafe fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: upheld by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded: both are new descriptors we own.
    Ok(unsafe { (owned(fds[0]), owned(fds[1])) })
}

/// Sets `O_NONBLOCK` on `fd` (affects the open file description).
pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we hold.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// `read(2)`, retrying `EINTR`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
        match cvt_size(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }) {
            Err(e) if interrupted(&e) => {}
            other => return other,
        }
    }
}

/// `write(2)`, retrying `EINTR`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes of reads.
        match cvt_size(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }) {
            Err(e) if interrupted(&e) => {}
            other => return other,
        }
    }
}

/// `recv(2)` with `flags`, retrying `EINTR`.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
        match cvt_size(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) }) {
            Err(e) if interrupted(&e) => {}
            other => return other,
        }
    }
}

/// Non-blocking `send(2)` that never raises `SIGPIPE` (a closed peer is
/// `EPIPE`), retrying `EINTR`.
pub fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes of reads.
        match cvt_size(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) }) {
            Err(e) if interrupted(&e) => {}
            other => return other,
        }
    }
}

/// `poll(2)` on one descriptor for at most `timeout`; returns `revents`
/// (0 on timeout).
pub fn poll_one(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    match cvt(unsafe { libc::poll(&mut p, 1, ms) }) {
        Ok(_) => Ok(p.revents),
        Err(e) if interrupted(&e) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Time left until `deadline` (zero once passed).
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Sends all of `data` on a stream socket, waiting for writability with
/// `poll`, but never past `deadline` (`TimedOut`). Works on blocking and
/// non-blocking sockets alike.
pub fn send_all_until(fd: RawFd, mut data: &[u8], deadline: Instant) -> io::Result<()> {
    while !data.is_empty() {
        match send_nonblocking(fd, data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = remaining(deadline);
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                poll_one(fd, libc::POLLOUT, left)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Graceful close of a stream socket: `shutdown(SHUT_WR)` (the peer reads
/// EOF after everything sent), then discard what the peer still sends until
/// it closes too, at most until `deadline`. Closing with unread input would
/// make the peer see a reset instead of an orderly end.
pub fn linger(fd: RawFd, deadline: Instant) {
    // SAFETY: shutdown on a descriptor we hold; failure (peer gone) is fine.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let mut sink = [0u8; 4096];
    loop {
        let left = remaining(deadline);
        if left.is_zero() {
            return;
        }
        match poll_one(fd, libc::POLLIN, left) {
            Ok(0) => {}
            Ok(_) => match recv(fd, &mut sink, libc::MSG_DONTWAIT) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            },
            Err(_) => return,
        }
    }
}

/// Blocking reader over a stream socket (for the first frame).
pub struct SocketReader(pub RawFd);

impl io::Read for SocketReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.0, buf, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn send_all_until_times_out_on_a_full_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let big = vec![7u8; 8 << 20];
        let deadline = Instant::now() + Duration::from_millis(100);
        let err = send_all_until(a.as_raw_fd(), &big, deadline).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn send_to_closed_peer_is_epipe_not_sigpipe() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let err = send_nonblocking(a.as_raw_fd(), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }

    #[test]
    fn linger_gives_the_peer_eof_and_returns_when_it_closes() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = b;
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"hi");
            // b dropped here: linger sees EOF.
        });
        send_all_until(
            a.as_raw_fd(),
            b"hi",
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        let start = Instant::now();
        linger(a.as_raw_fd(), Instant::now() + Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }

    #[test]
    fn pipe_is_cloexec_and_nonblocking_on_request() {
        let (r, _w) = pipe().unwrap();
        // SAFETY: F_GETFD on our own descriptor.
        let fdflags = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fdflags & libc::FD_CLOEXEC, 0);
        set_nonblocking(&r).unwrap();
        let err = read(r.as_raw_fd(), &mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
