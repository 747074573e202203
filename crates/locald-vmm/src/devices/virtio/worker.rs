//! The per-device worker thread: an `event-manager` loop that waits on the
//! device's queue eventfds (signalled by KVM ioeventfds, or by the
//! transport on a QueueNotify write) and calls the device's
//! [`QueueHandler`]. One thread per activated device, named after it.
//!
//! Why a worker per device rather than one loop for all: devices never
//! wait on each other (a slow disk flush does not delay entropy or, later,
//! network), two host cores serve two busy devices, and a device's reset
//! only has to stop its own thread. Idle workers cost one blocked thread.
//!
//! [`Worker::stop`] signals a stop eventfd and joins the thread, so once it
//! returns the device touches guest memory no more; it hands the handler
//! back so the device can keep state across resets if it wants.
//!
//! **Teardown runs on the worker thread.** Before the thread ends (on
//! [`Worker::stop`], on drop, or after its event loop failed) it calls
//! [`QueueHandler::on_stop`], so a device's reset work (virtio-fs forgets
//! its inodes and reopens the share root, vsock drops its host connections
//! and their epoll registrations) runs under the worker's own seccomp
//! filter, which allows those calls. The vCPU thread that wrote status 0
//! only signals the stop eventfd and joins: its filter has no file-system
//! or socket calls, and a guest that unbinds a driver must not end the VMM.
//!
//! A device that also waits on host file descriptors (sockets, timers)
//! registers them from [`QueueHandler::init`] with data tokens in
//! [`HANDLER_TOKENS`]; their events reach [`QueueHandler::process_event`].
//! Both methods have no-op defaults, so queue-only devices ignore them.
//!
//! **Pausing (snapshots).** A worker spawned while a [`Gate`] is current
//! on the spawning thread (see [`Gate::scope`]; the MMIO transport sets
//! its VM's gate around `activate`) joins that gate: [`Gate::pause`]
//! parks every joined worker between two events, so no request is half
//! done and no queue is touched until [`Gate::resume`]. Devices need no
//! code for it.
//!
//! Seccomp: a worker started from a filtered thread (a vCPU of a VM with
//! seccomp on) installs its device's filter (chosen by the worker's name,
//! see [`crate::seccomp::Device::from_worker_name`]) before its loop
//! starts, so before it reads any queue; it is started through the
//! seccomp spawner and does not inherit the vCPU's filter.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// What a device does when the guest notifies one of its queues.
pub trait QueueHandler: Send + 'static {
    /// Queue `index` was notified (possibly several times): process it.
    fn process_queue(&mut self, index: usize);

    /// Called once on the worker thread before the loop starts, after the
    /// queue and stop eventfds are registered: register extra file
    /// descriptors here, with data tokens in [`HANDLER_TOKENS`].
    fn init(&mut self, _ops: &mut EventOps) {}

    /// An event on a descriptor the handler registered (its token is in
    /// [`HANDLER_TOKENS`]). `ops` may add, modify or remove registrations.
    fn process_event(&mut self, _events: Events, _ops: &mut EventOps) {}

    /// Called once on the worker thread after its loop ended (the device
    /// is being reset or dropped), before the handler is handed back: the
    /// device's teardown (closing host connections, forgetting a session's
    /// state). Runs under the worker's seccomp filter, never the vCPU's.
    fn on_stop(&mut self) {}
}

/// Data tokens a handler may use for its own registrations: above every
/// queue index, below the worker's stop token.
pub const HANDLER_TOKENS: std::ops::Range<u32> = (1 << 16)..STOP_TOKEN;

const STOP_TOKEN: u32 = u32::MAX;
const PAUSE_TOKEN: u32 = u32::MAX - 1;

/// How long [`Gate::pause`] waits for the workers to park.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct GateState {
    paused: bool,
    /// Pause eventfds of the live workers, by worker id.
    workers: Vec<(u64, EventFd)>,
    parked: usize,
    next_id: u64,
}

/// Parks the device workers of one VM for a snapshot (see the module
/// docs). Shared by the VM's transports; cheap to clone.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<GateState>, Condvar)>);

/// The workers did not all park within [`PAUSE_LIMIT`].
#[derive(Debug, thiserror::Error)]
#[error("{parked} of {workers} device workers paused within {PAUSE_LIMIT:?}")]
pub struct PauseTimeout {
    pub parked: usize,
    pub workers: usize,
}

thread_local! {
    static CURRENT_GATE: RefCell<Option<Gate>> = const { RefCell::new(None) };
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with this gate current on this thread: workers spawned in
    /// it join the gate.
    pub fn scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let prev = CURRENT_GATE.with(|c| c.replace(Some(self.clone())));
        let r = f();
        CURRENT_GATE.with(|c| *c.borrow_mut() = prev);
        r
    }

    fn current() -> Option<Gate> {
        CURRENT_GATE.with(|c| c.borrow().clone())
    }

    /// Parks every joined worker between two events and returns once all
    /// are parked. Workers that start while paused park before their
    /// first event.
    pub fn pause(&self) -> Result<(), PauseTimeout> {
        let mut st = self.lock();
        st.paused = true;
        for (_, evt) in &st.workers {
            let _ = evt.write(1);
        }
        let deadline = std::time::Instant::now() + PAUSE_LIMIT;
        while st.parked < st.workers.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(PauseTimeout {
                    parked: st.parked,
                    workers: st.workers.len(),
                });
            }
            st = self
                .0
                 .1
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the parked workers go on.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.0 .1.notify_all();
    }

    /// Whether the gate is paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    fn join(&self, evt: EventFd) -> u64 {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        if st.paused {
            let _ = evt.write(1);
        }
        st.workers.push((id, evt));
        id
    }

    fn leave(&self, id: u64) {
        self.lock().workers.retain(|(i, _)| *i != id);
        self.0 .1.notify_all();
    }

    /// Called by a worker thread between events: parks while paused.
    fn park_if_paused(&self) {
        let mut st = self.lock();
        if !st.paused {
            return;
        }
        st.parked += 1;
        self.0 .1.notify_all();
        while st.paused {
            st = self.0 .1.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
    }
}

struct Subscriber<H> {
    queue_events: Vec<EventFd>,
    stop: EventFd,
    stopped: bool,
    /// The gate's pause eventfd, when the worker joined a gate.
    pause: Option<EventFd>,
    handler: H,
}

impl<H: QueueHandler> MutEventSubscriber for Subscriber<H> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == STOP_TOKEN {
            let _ = self.stop.read();
            self.stopped = true;
            return;
        }
        if token == PAUSE_TOKEN {
            // Parking happens in the loop, between events.
            if let Some(p) = &self.pause {
                let _ = p.read();
            }
            return;
        }
        if HANDLER_TOKENS.contains(&token) {
            self.handler.process_event(events, ops);
            return;
        }
        let index = token as usize;
        if let Some(evt) = self.queue_events.get(index) {
            // Drain the counter first: a notification that arrives while we
            // process is then seen on the next round, never lost.
            let _ = evt.read();
            self.handler.process_queue(index);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!(
                    "worker: cannot watch queue {i} (fd {}): {e:?}",
                    evt.as_raw_fd()
                );
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.stop, STOP_TOKEN, EventSet::IN)) {
            tracing::error!("worker: cannot watch the stop event: {e:?}");
        }
        if let Some(p) = &self.pause {
            if let Err(e) = ops.add(Events::with_data(p, PAUSE_TOKEN, EventSet::IN)) {
                tracing::error!("worker: cannot watch the pause event: {e:?}");
            }
        }
        self.handler.init(ops);
    }
}

/// A running worker thread.
pub struct Worker<H> {
    stop: EventFd,
    thread: Option<JoinHandle<Option<H>>>,
}

impl<H: QueueHandler> Worker<H> {
    /// Starts a thread named `name` that calls `handler` for each queue
    /// notification. Queues with work already pending are processed once
    /// at start.
    pub fn spawn(name: &str, queue_events: Vec<EventFd>, handler: H) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let gate = Gate::current();
        let pause = match &gate {
            Some(_) => Some(EventFd::new(libc::EFD_NONBLOCK)?),
            None => None,
        };
        let gate_id = match (&gate, &pause) {
            (Some(g), Some(p)) => Some(g.join(p.try_clone()?)),
            _ => None,
        };
        let sub = Subscriber {
            queue_events,
            stop: stop.try_clone()?,
            stopped: false,
            pause,
            handler,
        };
        let thread_gate = gate.clone();
        let mut mgr: EventManager<Box<Subscriber<H>>> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let kind =
            crate::seccomp::ThreadKind::Worker(crate::seccomp::Device::from_worker_name(name));
        let thread = crate::seccomp::spawn_inherit(name.to_string(), kind, move || {
            let id = mgr.add_subscriber(Box::new(sub));
            let leave = |mgr_gate: &Option<Gate>| {
                if let (Some(g), Some(i)) = (mgr_gate, gate_id) {
                    g.leave(i);
                }
            };
            loop {
                match mgr.subscriber_mut(id) {
                    Ok(s) if s.stopped => break,
                    Ok(_) => {}
                    Err(_) => {
                        leave(&thread_gate);
                        return None;
                    }
                }
                if let Some(g) = &thread_gate {
                    g.park_if_paused();
                }
                if let Err(e) = mgr.run() {
                    tracing::error!("device worker event loop failed: {e:?}");
                    break;
                }
            }
            leave(&thread_gate);
            let mut handler = mgr.remove_subscriber(id).ok()?.handler;
            // The device's teardown, here under this thread's filter.
            handler.on_stop();
            Some(handler)
        });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                if let (Some(g), Some(i)) = (&gate, gate_id) {
                    g.leave(i);
                }
                return Err(e);
            }
        };
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the handler (None if the thread died),
    /// after [`QueueHandler::on_stop`] ran on the worker thread. The caller
    /// only writes an eventfd and joins.
    pub fn stop(mut self) -> Option<H> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<H> {
        let t = self.thread.take()?;
        let _ = self.stop.write(1);
        t.join().ok().flatten()
    }
}

impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Record(mpsc::Sender<usize>, usize);
    impl QueueHandler for Record {
        fn process_queue(&mut self, index: usize) {
            self.1 += 1;
            self.0.send(index).unwrap();
        }
    }

    #[test]
    fn notifications_reach_the_handler_and_stop_returns_it() {
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let clones = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let (tx, rx) = mpsc::channel();
        let w = Worker::spawn("test worker", clones, Record(tx, 0)).unwrap();
        evts[1].write(1).unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(1));
        evts[0].write(3).unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(0));
        let h = w.stop().expect("handler back");
        assert_eq!(h.1, 2);
    }

    /// A handler that watches one extra eventfd through the optional hooks.
    struct Extra {
        fd: EventFd,
        tx: mpsc::Sender<&'static str>,
    }
    impl QueueHandler for Extra {
        fn process_queue(&mut self, _index: usize) {
            self.tx.send("queue").unwrap();
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::with_data(
                &self.fd,
                HANDLER_TOKENS.start + 7,
                EventSet::IN,
            ))
            .unwrap();
        }
        fn process_event(&mut self, events: Events, _ops: &mut EventOps) {
            assert_eq!(events.data(), HANDLER_TOKENS.start + 7);
            let _ = self.fd.read();
            self.tx.send("extra").unwrap();
        }
    }

    #[test]
    fn handler_registered_fds_reach_process_event() {
        let q = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let extra = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let h = Extra {
            fd: extra.try_clone().unwrap(),
            tx,
        };
        let w = Worker::spawn("test worker", vec![q.try_clone().unwrap()], h).unwrap();
        let wait = || rx.recv_timeout(std::time::Duration::from_secs(5));
        extra.write(1).unwrap();
        assert_eq!(wait(), Ok("extra"));
        q.write(1).unwrap();
        assert_eq!(wait(), Ok("queue"));
        assert!(w.stop().is_some());
    }

    /// Reports the thread `on_stop` ran on.
    struct Teardown(mpsc::Sender<Option<String>>);
    impl QueueHandler for Teardown {
        fn process_queue(&mut self, _index: usize) {}
        fn on_stop(&mut self) {
            let name = std::thread::current().name().map(str::to_string);
            self.0.send(name).unwrap();
        }
    }

    #[test]
    fn on_stop_runs_on_the_worker_thread_on_stop_and_on_drop() {
        let q = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let w = Worker::spawn(
            "virtio-test a",
            vec![q.try_clone().unwrap()],
            Teardown(tx.clone()),
        )
        .unwrap();
        assert!(w.stop().is_some());
        assert_eq!(rx.try_recv(), Ok(Some("virtio-test a".to_string())));
        let w = Worker::spawn("virtio-test b", vec![q], Teardown(tx)).unwrap();
        drop(w);
        assert_eq!(rx.try_recv(), Ok(Some("virtio-test b".to_string())));
    }

    #[test]
    fn a_paused_gate_holds_queue_work_until_resume() {
        let q = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let gate = Gate::default();
        let w = gate
            .scope(|| Worker::spawn("test worker", vec![q.try_clone().unwrap()], Record(tx, 0)))
            .unwrap();
        // Not gated: a worker spawned outside the scope.
        let (tx2, rx2) = mpsc::channel();
        let q2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let free =
            Worker::spawn("free worker", vec![q2.try_clone().unwrap()], Record(tx2, 0)).unwrap();
        gate.pause().unwrap();
        assert!(gate.is_paused());
        q.write(1).unwrap();
        q2.write(1).unwrap();
        assert_eq!(rx2.recv_timeout(std::time::Duration::from_secs(5)), Ok(0));
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        gate.resume();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(0));
        // A second pause/resume round, then a normal stop.
        gate.pause().unwrap();
        gate.resume();
        assert_eq!(w.stop().map(|h| h.1), Some(1));
        assert!(free.stop().is_some());
        // A stopped worker left the gate: pausing with none is immediate.
        gate.pause().unwrap();
        gate.resume();
    }
}
