//! The KVM backend's console input: a thread that forwards our stdin to
//! the guest's UART (bounded; waits while the guest is not reading), not
//! started when stdin is `/dev/null`. It
//! waits on stdin and on a stop eventfd, so it ends as soon as the VM
//! stops, and runs under the `control` seccomp filter when the VM has
//! seccomp on.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialDevice;

/// Whether this process's stdin is `/dev/null` (the character device 1:3),
/// which never has input for the guest.
pub fn stdin_is_dev_null() -> bool {
    // SAFETY: fstat on descriptor 0 writes only into the local `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; a closed descriptor 0 makes fstat fail (false).
    if unsafe { libc::fstat(0, &mut st) } != 0 {
        return false;
    }
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

/// The stdin → UART forwarding thread.
pub struct InputThread {
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
}

impl InputThread {
    /// Starts forwarding stdin to `serial`, on a thread filtered with the
    /// `control` seccomp list when `seccomp` is set.
    pub fn spawn(serial: Arc<Mutex<SerialDevice>>, seccomp: bool) -> std::io::Result<InputThread> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let flag = stop.clone();
        let kind = seccomp.then_some(crate::seccomp::ThreadKind::Control);
        let handle =
            crate::seccomp::spawn("console input".into(), kind, move || forward(serial, flag))?;
        Ok(InputThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for InputThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn forward(serial: Arc<Mutex<SerialDevice>>, stop: Arc<EventFd>) {
    let stopped = || {
        let mut p = libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) > 0 }
    };
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; waits until stdin or the stop event.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        // SAFETY: reads into our own buffer of the given length.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return; // EOF or error: nothing more to forward.
        }
        let mut rest = &buf[..n as usize];
        while !rest.is_empty() && !stopped() {
            let taken = serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(rest);
            rest = &rest[taken..];
            if !rest.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
