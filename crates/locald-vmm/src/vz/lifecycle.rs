//! How a VZ virtual machine ends, as plain Rust: what the delegate's
//! callbacks mean in our [`ExitStatus`] terms, and the sequence that stops
//! a VM we want stopped (`requestStop`, a grace period, then a forced
//! `stop`). `backend.rs` supplies a [`VmHandle`] over the real
//! `VZVirtualMachine`; the tests supply a fake one.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::devices::control::{ExitStatus, Outcome, VmControl};

/// What the framework told us, through the delegate or a completion
/// handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// `guestDidStopVirtualMachine:`: the guest powered off or rebooted
    /// (VZ stops the VM for both).
    GuestStopped,
    /// `virtualMachine:didStopWithError:`.
    StoppedWithError(String),
    /// Our forced `stopWithCompletionHandler:` completed (error or not).
    ForceStopped(Option<String>),
}

/// Records `event` in `control` (the first outcome wins). A guest stop after a kernel panic
/// message (`panicked`, from the console) is [`ExitStatus::Panic`] (the
/// guest boots with `panic=-1`, and VZ turns the reboot into a stop); a
/// guest stop after the init's exit status line (`exit`, the last one the
/// console showed) is [`ExitStatus::Exited`]; any other guest stop is
/// [`ExitStatus::PowerOff`].
pub fn record(control: &VmControl, event: &VmEvent, panicked: bool, exit: Option<u8>) {
    match event {
        VmEvent::GuestStopped if panicked => control.request_stop(ExitStatus::Panic),
        VmEvent::GuestStopped => control.request_stop(match exit {
            Some(code) => ExitStatus::Exited(code),
            None => ExitStatus::PowerOff,
        }),
        VmEvent::StoppedWithError(e) => {
            control.fail(format!("Virtualization.framework stopped the VM: {e}"))
        }
        // We only force a stop once an outcome exists; this is a backstop.
        VmEvent::ForceStopped(_) => control.request_stop(ExitStatus::PowerOff),
    }
}

/// Whether the VM has stopped, with a wait. Set from the VM's queue.
#[derive(Default)]
pub struct Stopped {
    flag: Mutex<bool>,
    cond: Condvar,
}

impl Stopped {
    /// Marks the VM stopped and wakes waiters.
    pub fn set(&self) {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cond.notify_all();
    }

    /// Whether the VM has stopped.
    pub fn get(&self) -> bool {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the VM stopped or `deadline`; returns whether it stopped.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut f = self.flag.lock().unwrap_or_else(|e| e.into_inner());
        while !*f {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            f = self
                .cond
                .wait_timeout(f, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// The two ways to stop a VM.
pub trait VmHandle {
    /// `requestStopWithError:` (the guest is asked to power off). Returns
    /// whether the request was made.
    fn request_stop(&self) -> Result<(), String>;
    /// `stopWithCompletionHandler:` (a power cut); the completion handler
    /// sets [`Stopped`].
    fn force_stop(&self);
}

/// Timing of a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopPolicy {
    /// How long the guest may take to power off after `requestStop`.
    pub grace: Duration,
    /// How long a forced stop may take before we give up waiting.
    pub force_wait: Duration,
}

impl Default for StopPolicy {
    fn default() -> Self {
        StopPolicy {
            grace: Duration::from_secs(3),
            force_wait: Duration::from_secs(10),
        }
    }
}

/// The next thing [`StopSequence`] wants done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopStep {
    /// Call `requestStopWithError:`, then report with
    /// [`StopSequence::request_result`].
    RequestStop,
    /// Wait for the VM to stop, at most until then.
    WaitUntil(Instant),
    /// Call `stopWithCompletionHandler:`.
    ForceStop,
    /// The VM has stopped.
    Done,
    /// A forced stop did not complete in time; stop waiting.
    GiveUp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Requested(Instant),
    Force,
    Forced(Instant),
}

/// Stop sequence: request, grace, force, bounded wait.
#[derive(Debug)]
pub struct StopSequence {
    policy: StopPolicy,
    phase: Phase,
}

impl StopSequence {
    /// A sequence that has not started.
    pub fn new(policy: StopPolicy) -> Self {
        StopSequence {
            policy,
            phase: Phase::Start,
        }
    }

    /// The next step at `now`, given whether the VM has stopped.
    pub fn next(&mut self, now: Instant, stopped: bool) -> StopStep {
        if stopped {
            return StopStep::Done;
        }
        match self.phase {
            Phase::Start => StopStep::RequestStop,
            Phase::Requested(d) if now < d => StopStep::WaitUntil(d),
            Phase::Requested(_) | Phase::Force => {
                self.phase = Phase::Forced(now + self.policy.force_wait);
                StopStep::ForceStop
            }
            Phase::Forced(d) if now < d => StopStep::WaitUntil(d),
            Phase::Forced(_) => StopStep::GiveUp,
        }
    }

    /// Reports how `requestStopWithError:` went: success starts the grace
    /// period, failure (say, the guest cannot take the request) forces.
    pub fn request_result(&mut self, now: Instant, ok: bool) {
        self.phase = if ok && !self.policy.grace.is_zero() {
            Phase::Requested(now + self.policy.grace)
        } else {
            Phase::Force
        };
    }
}

/// Stops `vm` following `policy`; returns whether it stopped.
pub fn stop_vm(vm: &dyn VmHandle, stopped: &Stopped, policy: StopPolicy) -> bool {
    let mut seq = StopSequence::new(policy);
    loop {
        match seq.next(Instant::now(), stopped.get()) {
            StopStep::RequestStop => {
                let r = vm.request_stop();
                if let Err(e) = &r {
                    tracing::debug!("requestStop failed ({e}); stopping the VM");
                }
                seq.request_result(Instant::now(), r.is_ok());
            }
            StopStep::WaitUntil(d) => {
                stopped.wait_until(d);
            }
            StopStep::ForceStop => vm.force_stop(),
            StopStep::Done => return true,
            StopStep::GiveUp => {
                tracing::warn!(
                    "the VM did not stop within {:?} of a forced stop",
                    policy.force_wait
                );
                return false;
            }
        }
    }
}

/// Runs a started VM to its end: waits for an outcome in `control` (set
/// by the delegate, by another thread's `request_stop`, or here when
/// `timeout` passes, as [`ExitStatus::TimedOut`]), then stops the VM if it
/// still runs, and returns the outcome.
pub fn run_to_end(
    control: &VmControl,
    timeout: Option<Duration>,
    vm: &dyn VmHandle,
    stopped: &Stopped,
    policy: StopPolicy,
) -> Outcome {
    if control.wait(timeout).is_none() {
        control.request_stop(ExitStatus::TimedOut);
    }
    if !stopped.get() {
        stop_vm(vm, stopped, policy);
    }
    // Set above or before; `wait(None)` returns at once.
    control
        .wait(None)
        .unwrap_or(Outcome::Status(ExitStatus::PowerOff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A VM that obeys a request after `obey_after` (or never), and a
    /// forced stop at once (or never).
    struct FakeVm {
        stopped: Arc<Stopped>,
        control: Arc<VmControl>,
        request_ok: bool,
        obey_request: Option<Duration>,
        obey_force: bool,
        requests: AtomicUsize,
        forces: AtomicUsize,
    }

    impl FakeVm {
        fn new(request_ok: bool, obey_request: Option<Duration>, obey_force: bool) -> Self {
            FakeVm {
                stopped: Arc::new(Stopped::default()),
                control: Arc::new(VmControl::new()),
                request_ok,
                obey_request,
                obey_force,
                requests: AtomicUsize::new(0),
                forces: AtomicUsize::new(0),
            }
        }
    }

    impl VmHandle for FakeVm {
        fn request_stop(&self) -> Result<(), String> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            if !self.request_ok {
                return Err("cannot request".into());
            }
            if let Some(after) = self.obey_request {
                let (s, c) = (self.stopped.clone(), self.control.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(after);
                    // The guest powers off: the delegate fires.
                    record(&c, &VmEvent::GuestStopped, false, None);
                    s.set();
                });
            }
            Ok(())
        }
        fn force_stop(&self) {
            self.forces.fetch_add(1, Ordering::SeqCst);
            if self.obey_force {
                self.stopped.set();
            }
        }
    }

    fn policy(grace_ms: u64) -> StopPolicy {
        StopPolicy {
            grace: Duration::from_millis(grace_ms),
            force_wait: Duration::from_millis(100),
        }
    }

    #[test]
    fn delegate_events_become_statuses() {
        let c = VmControl::new();
        record(&c, &VmEvent::GuestStopped, false, None);
        assert_eq!(c.status(), Some(ExitStatus::PowerOff));
        let c = VmControl::new();
        record(&c, &VmEvent::GuestStopped, true, None);
        assert_eq!(c.status(), Some(ExitStatus::Panic));
        // The init's exit status line makes a guest stop an exit…
        let c = VmControl::new();
        record(&c, &VmEvent::GuestStopped, false, Some(7));
        assert_eq!(c.status(), Some(ExitStatus::Exited(7)));
        // …unless the kernel panicked after it.
        let c = VmControl::new();
        record(&c, &VmEvent::GuestStopped, true, Some(0));
        assert_eq!(c.status(), Some(ExitStatus::Panic));
        let c = VmControl::new();
        record(
            &c,
            &VmEvent::StoppedWithError("internal error".into()),
            false,
            None,
        );
        match c.wait(None) {
            Some(Outcome::Failed(m)) => assert!(m.contains("internal error"), "{m}"),
            o => panic!("{o:?}"),
        }
        // First outcome wins: a later guest stop does not replace it.
        let c = VmControl::new();
        c.request_stop(ExitStatus::TimedOut);
        record(&c, &VmEvent::GuestStopped, false, None);
        record(&c, &VmEvent::ForceStopped(None), false, None);
        assert_eq!(c.status(), Some(ExitStatus::TimedOut));
    }

    #[test]
    fn sequence_steps() {
        let p = policy(1000);
        let t0 = Instant::now();
        let mut s = StopSequence::new(p);
        assert_eq!(s.next(t0, false), StopStep::RequestStop);
        s.request_result(t0, true);
        assert_eq!(s.next(t0, false), StopStep::WaitUntil(t0 + p.grace));
        let late = t0 + p.grace;
        assert_eq!(s.next(late, false), StopStep::ForceStop);
        assert_eq!(
            s.next(late, false),
            StopStep::WaitUntil(late + p.force_wait)
        );
        assert_eq!(s.next(late + p.force_wait, false), StopStep::GiveUp);
        assert_eq!(s.next(late + p.force_wait, true), StopStep::Done);
        // A refused request forces at once.
        let mut s = StopSequence::new(p);
        s.next(t0, false);
        s.request_result(t0, false);
        assert_eq!(s.next(t0, false), StopStep::ForceStop);
        // So does a zero grace.
        let mut s = StopSequence::new(policy(0));
        s.next(t0, false);
        s.request_result(t0, true);
        assert_eq!(s.next(t0, false), StopStep::ForceStop);
        // Stopped is done whatever the phase.
        assert_eq!(StopSequence::new(p).next(t0, true), StopStep::Done);
    }

    #[test]
    fn clean_stop_within_grace_does_not_force() {
        let vm = FakeVm::new(true, Some(Duration::from_millis(20)), true);
        assert!(stop_vm(&vm, &vm.stopped, policy(2000)));
        assert_eq!(vm.requests.load(Ordering::SeqCst), 1);
        assert_eq!(vm.forces.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn guest_ignoring_request_is_forced_after_grace() {
        let vm = FakeVm::new(true, None, true);
        let t0 = Instant::now();
        assert!(stop_vm(&vm, &vm.stopped, policy(50)));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(vm.forces.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn refused_request_forces_at_once_and_stuck_vm_gives_up() {
        let vm = FakeVm::new(false, None, true);
        assert!(stop_vm(&vm, &vm.stopped, policy(5000)));
        assert_eq!(vm.forces.load(Ordering::SeqCst), 1);
        let vm = FakeVm::new(false, None, false);
        let t0 = Instant::now();
        assert!(!stop_vm(&vm, &vm.stopped, policy(5000)));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn run_to_end_cases() {
        // The guest powers off by itself: no stop calls.
        let vm = FakeVm::new(true, None, true);
        {
            let (c, s) = (vm.control.clone(), vm.stopped.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                record(&c, &VmEvent::GuestStopped, false, None);
                s.set();
            });
        }
        let o = run_to_end(&vm.control, None, &vm, &vm.stopped, policy(100));
        assert_eq!(o, Outcome::Status(ExitStatus::PowerOff));
        assert_eq!(vm.requests.load(Ordering::SeqCst), 0);
        // A timeout: TimedOut, and the VM is asked to stop (it obeys).
        let vm = FakeVm::new(true, Some(Duration::from_millis(5)), true);
        let o = run_to_end(
            &vm.control,
            Some(Duration::from_millis(20)),
            &vm,
            &vm.stopped,
            policy(2000),
        );
        assert_eq!(o, Outcome::Status(ExitStatus::TimedOut));
        assert_eq!(vm.requests.load(Ordering::SeqCst), 1);
        assert_eq!(vm.forces.load(Ordering::SeqCst), 0);
        // Another thread's stop request (VmStopper::force_stop).
        let vm = FakeVm::new(true, None, true);
        {
            let c = vm.control.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                c.request_stop(ExitStatus::PowerOff);
            });
        }
        let o = run_to_end(&vm.control, None, &vm, &vm.stopped, policy(20));
        assert_eq!(o, Outcome::Status(ExitStatus::PowerOff));
        assert_eq!(vm.forces.load(Ordering::SeqCst), 1);
        // The framework stopped the VM with an error.
        let vm = FakeVm::new(true, None, true);
        record(
            &vm.control,
            &VmEvent::StoppedWithError("boom".into()),
            false,
            None,
        );
        vm.stopped.set();
        let o = run_to_end(&vm.control, None, &vm, &vm.stopped, policy(20));
        assert!(matches!(o, Outcome::Failed(m) if m.contains("boom")));
    }
}
