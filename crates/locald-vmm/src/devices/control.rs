//! VM-wide control block: how a running VM comes to an end, and the
//! timestamps the guest reports. Shared by all threads (vCPUs request a
//! stop; the thread in `run()` waits for one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest wrote this status to the exit port (the command's exit code).
    Exited(u8),
    /// The guest asked for a reset (i8042 reset line, `reboot`).
    Reset,
    /// The guest's kernel panicked (then rebooted).
    Panic,
    /// The vCPU triple-faulted (KVM shutdown exit).
    TripleFault,
    /// The guest powered off through a hypervisor system event.
    PowerOff,
    /// The configured timeout elapsed first.
    TimedOut,
    /// The VM was stopped after a snapshot (`snapshot --stop`).
    Snapshotted,
}

impl ExitStatus {
    /// The process exit code a CLI should use for this status:
    /// the guest's own code, 0 for a reset or power-off the guest asked for,
    /// and 125 (VMM-side failure, as docker and libkrun do) otherwise.
    pub fn code(&self) -> i32 {
        match self {
            ExitStatus::Exited(c) => *c as i32,
            ExitStatus::Reset | ExitStatus::PowerOff | ExitStatus::Snapshotted => 0,
            ExitStatus::Panic | ExitStatus::TripleFault | ExitStatus::TimedOut => 125,
        }
    }
}

/// A guest-reported progress marker (written to the marker port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The value the guest wrote (1 = userspace reached, 2 = command started,
    /// 3 = command finished).
    pub value: u8,
    /// Time since the VM object was created.
    pub at: Duration,
}

/// How a VM ended: a guest-visible status, or a VMM-side failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest ended (or was ended) with this status.
    Status(ExitStatus),
    /// A vCPU or device failed fatally; the message says where and why.
    Failed(String),
}

/// Stop requests and guest markers, shared by every thread of one VM.
pub struct VmControl {
    start: Instant,
    stopping: AtomicBool,
    panicked: AtomicBool,
    status: Mutex<Option<Outcome>>,
    cond: Condvar,
    markers: Mutex<Vec<Marker>>,
}

impl Default for VmControl {
    fn default() -> Self {
        Self::new()
    }
}

impl VmControl {
    /// A control block whose clock starts now.
    pub fn new() -> Self {
        VmControl {
            start: Instant::now(),
            stopping: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            status: Mutex::new(None),
            cond: Condvar::new(),
            markers: Mutex::new(Vec::new()),
        }
    }

    /// Asks the VM to stop with `status`. The first request wins. A reset
    /// after a kernel panic is reported as [`ExitStatus::Panic`].
    pub fn request_stop(&self, status: ExitStatus) {
        let status = match status {
            ExitStatus::Reset | ExitStatus::TripleFault if self.panicked.load(Ordering::SeqCst) => {
                ExitStatus::Panic
            }
            s => s,
        };
        self.finish(Outcome::Status(status));
    }

    /// Stops the VM because of a VMM-side failure (first request wins).
    pub fn fail(&self, message: String) {
        self.finish(Outcome::Failed(message));
    }

    fn finish(&self, outcome: Outcome) {
        let mut slot = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
            self.stopping.store(true, Ordering::SeqCst);
            self.cond.notify_all();
        }
    }

    /// True once any stop was requested; vCPU threads poll this after each exit.
    pub fn should_stop(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Records that the guest kernel printed a panic message.
    pub fn note_panic(&self) {
        self.panicked.store(true, Ordering::SeqCst);
    }

    /// Waits for a stop request, at most `timeout` (forever if `None`).
    /// Returns `None` on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Outcome> {
        // A timeout too long to be a deadline (e.g. a control request's
        // `timeout_secs` near u64::MAX) is as good as none.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut slot = self.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = slot.as_ref() {
                return Some(s.clone());
            }
            slot = match deadline {
                None => self.cond.wait(slot).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.cond
                        .wait_timeout(slot, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// The stop status, if one was requested.
    pub fn status(&self) -> Option<ExitStatus> {
        match *self.status.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Outcome::Status(s)) => Some(s),
            _ => None,
        }
    }

    /// Records a guest marker with the current time.
    pub fn mark(&self, value: u8) {
        let m = Marker {
            value,
            at: self.start.elapsed(),
        };
        tracing::info!(
            "guest marker {} ({}) at {:.3} s",
            value,
            marker_name(value),
            m.at.as_secs_f64()
        );
        self.markers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(m);
    }

    /// All markers so far.
    pub fn markers(&self) -> Vec<Marker> {
        self.markers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Time since this control block was created.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Human name of a marker value.
pub fn marker_name(value: u8) -> &'static str {
    match value {
        1 => "userspace reached",
        2 => "command started",
        3 => "command finished",
        _ => "guest marker",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_stop_wins() {
        let c = VmControl::new();
        assert!(!c.should_stop());
        c.request_stop(ExitStatus::Exited(7));
        c.request_stop(ExitStatus::Reset);
        assert!(c.should_stop());
        assert_eq!(c.wait(None), Some(Outcome::Status(ExitStatus::Exited(7))));
        let f = VmControl::new();
        f.fail("vcpu 0: boom".into());
        f.request_stop(ExitStatus::Reset);
        assert_eq!(f.wait(None), Some(Outcome::Failed("vcpu 0: boom".into())));
        assert_eq!(f.status(), None);
    }

    #[test]
    fn reset_after_panic_is_panic() {
        let c = VmControl::new();
        c.note_panic();
        c.request_stop(ExitStatus::Reset);
        assert_eq!(c.status(), Some(ExitStatus::Panic));
    }

    #[test]
    fn wait_times_out_and_wakes() {
        let c = Arc::new(VmControl::new());
        assert_eq!(c.wait(Some(Duration::from_millis(20))), None);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait(Some(Duration::from_secs(10))));
        std::thread::sleep(Duration::from_millis(20));
        c.request_stop(ExitStatus::TripleFault);
        assert_eq!(
            t.join().unwrap(),
            Some(Outcome::Status(ExitStatus::TripleFault))
        );
    }

    /// Found by the `exit_port` fuzz target: a huge timeout (a control
    /// `stop` request's `timeout_secs` reaches this wait) overflowed
    /// `Instant + Duration` and panicked.
    #[test]
    fn wait_accepts_huge_timeouts() {
        let c = VmControl::new();
        c.request_stop(ExitStatus::Exited(3));
        let done = Some(Outcome::Status(ExitStatus::Exited(3)));
        assert_eq!(c.wait(Some(Duration::MAX)), done);
        assert_eq!(c.wait(Some(Duration::from_secs(u64::MAX))), done);
    }

    #[test]
    fn codes() {
        assert_eq!(ExitStatus::Exited(42).code(), 42);
        assert_eq!(ExitStatus::Reset.code(), 0);
        assert_eq!(ExitStatus::TimedOut.code(), 125);
    }
}
