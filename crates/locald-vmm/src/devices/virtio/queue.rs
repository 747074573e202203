//! The queue-processing contract every virtio device goes through. Runs on
//! the device's worker thread (and, for tests, benchmarks and fuzzers, on
//! whatever thread calls a device's `process_*` function).
//!
//! Two layers:
//! - [`run_pass`] (or [`Ring::run`] + [`Ring::finish`]) is one pass over
//!   one queue. It owns notification suppression: before each *round* of
//!   the device's work it disables notifications, after it re-enables them
//!   as the round asks ([`Rearm`]) and, if the driver added buffers in
//!   between, runs another round — the EVENT_IDX-safe re-check, so a
//!   buffer added while the device worked is never left without a kick.
//!   The round completes chains through [`Ring::complete`]; any ring error
//!   ends the pass as broken. At the end the pass decides whether the guest
//!   wants an interrupt ([`Pass::notify`]).
//! - [`QueueWorker`] is the device-wide state the worker keeps between
//!   passes: once a pass broke a ring, nothing touches any queue of the
//!   device until it is reset, and DEVICE_NEEDS_RESET is set through
//!   [`Interrupt::set_needs_reset`]. [`QueueWorker::finish`] applies the
//!   one interrupt rule.
//!
//! **The interrupt rule.** After a clean pass, the guest is interrupted if
//! it completed something and `needs_notification` says the driver wants
//! it (EVENT_IDX `used_event`, or the no-interrupt flag); if that check
//! itself fails, it is interrupted. After a pass that broke the ring, the
//! chains completed before the break are signalled unconditionally: their
//! used entries are already written, and the ring that would say whether
//! the driver wants them may be what broke. DEVICE_NEEDS_RESET follows
//! (a configuration interrupt).
//!
//! [`drain_queue`] is the whole contract for simple devices: take every
//! available chain, serve it, complete it. Block's batching (parse every
//! available chain, execute them, then complete them) is a fast path
//! inside its round, kept because it measurably pays (numbers at
//! `block::process_queue`).

use std::sync::Arc;

use virtio_queue::{AvailIter, DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, Warned};

/// Outcome of one pass over a queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Chains completed.
    pub completed: usize,
    /// The guest should be interrupted.
    pub notify: bool,
    /// The queue is broken; the device needs a reset.
    pub broken: bool,
}

impl Pass {
    /// Two passes (over different queues) as one, for a device that
    /// interrupts once for both.
    pub fn merge(self, other: Pass) -> Pass {
        Pass {
            completed: self.completed + other.completed,
            notify: self.notify || other.notify,
            broken: self.broken || other.broken,
        }
    }
}

/// Why a ring can no longer be used: logged once per cause, then the
/// device needs a reset.
#[derive(Debug)]
pub struct Broken {
    /// The cause, the key of [`Warned`].
    pub cause: &'static str,
    /// What exactly happened.
    pub detail: String,
}

impl Broken {
    /// A break for `cause`.
    pub fn new(cause: &'static str, detail: impl std::fmt::Display) -> Self {
        Broken {
            cause,
            detail: detail.to_string(),
        }
    }
}

impl From<virtio_queue::Error> for Broken {
    fn from(e: virtio_queue::Error) -> Self {
        Broken::new(CAUSE_UNUSABLE, e)
    }
}

/// Cause of a ring that cannot be read or whose indices are impossible.
pub const CAUSE_UNUSABLE: &str = "queue unusable";
/// Cause of a used entry that cannot be written.
pub const CAUSE_USED_WRITE: &str = "used ring write failed";

/// What the contract does after a round: how notifications are re-armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rearm {
    /// The round served what it wanted. Enable notifications at the
    /// current position; if the driver added buffers meanwhile and `again`
    /// (the device still has work for them), run another round.
    Enable {
        /// Whether newly added buffers are worth another round.
        again: bool,
    },
    /// The round ran out of buffers after looking at (and rewinding from)
    /// those up to avail index `seen`: enable notifications so the driver's
    /// next buffer *past* `seen` kicks (EVENT_IDX takes the next avail
    /// position as `avail_event`); another round if it is already there.
    EnablePast {
        /// The avail index the round had seen.
        seen: u16,
    },
    /// End the pass with notifications as they are (still disabled): the
    /// device resumes on a host event, e.g. a blocked backend that became
    /// writable.
    Leave,
}

/// One queue as a round of a pass sees it: the queue, guest memory and the
/// count of completed chains.
pub struct Ring<'q, 'm> {
    queue: &'q mut Queue,
    mem: &'m GuestMemoryMmap,
    completed: usize,
}

impl<'q, 'm> Ring<'q, 'm> {
    /// A pass over `queue` starts.
    pub fn new(queue: &'q mut Queue, mem: &'m GuestMemoryMmap) -> Self {
        Ring {
            queue,
            mem,
            completed: 0,
        }
    }

    /// Guest memory.
    pub fn mem(&self) -> &'m GuestMemoryMmap {
        self.mem
    }

    /// The queue itself, for peeking and rewinding (`next_avail`,
    /// `set_next_avail`). Completions go through [`Ring::complete`].
    pub fn queue(&mut self) -> &mut Queue {
        self.queue
    }

    /// The available chains (up to the avail index read now).
    pub fn iter(&mut self) -> Result<AvailIter<'_, &'m GuestMemoryMmap>, Broken> {
        Ok(self.queue.iter(self.mem)?)
    }

    /// Takes the next available chain, if any.
    pub fn pop(&mut self) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, Broken> {
        Ok(self.iter()?.next())
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), Broken> {
        self.queue
            .add_used(self.mem, head, len)
            .map_err(|e| Broken::new(CAUSE_USED_WRITE, e))?;
        self.completed += 1;
        Ok(())
    }

    /// Chains completed so far in this pass.
    pub fn completed(&self) -> usize {
        self.completed
    }

    /// Runs rounds of `round` with notifications disabled, re-arming them
    /// after each as it asks, until nothing new arrived (see the module
    /// documentation). Stops at the first error.
    pub fn run(
        &mut self,
        mut round: impl FnMut(&mut Ring<'q, 'm>) -> Result<Rearm, Broken>,
    ) -> Result<(), Broken> {
        if !self.queue.ready() {
            return Ok(());
        }
        loop {
            self.queue.disable_notification(self.mem)?;
            let again = match round(self)? {
                Rearm::Leave => return Ok(()),
                Rearm::Enable { again } => self.queue.enable_notification(self.mem)? && again,
                Rearm::EnablePast { seen } => {
                    let start = self.queue.next_avail();
                    self.queue.set_next_avail(seen);
                    let r = self.queue.enable_notification(self.mem);
                    self.queue.set_next_avail(start);
                    r?
                }
            };
            if !again {
                return Ok(());
            }
        }
    }

    /// Ends the pass after [`Ring::run`]: logs a break once under `device`
    /// and decides on the interrupt (the rule in the module documentation).
    pub fn finish(self, device: &str, run: Result<(), Broken>, warned: &mut Warned) -> Pass {
        let mut pass = Pass {
            completed: self.completed,
            ..Pass::default()
        };
        match run {
            Ok(()) if pass.completed > 0 => {
                pass.notify = self.queue.needs_notification(self.mem).unwrap_or_else(|e| {
                    warned.warn(device, CAUSE_UNUSABLE, e);
                    true
                });
            }
            Ok(()) => {}
            Err(b) => {
                warned.warn(device, b.cause, b.detail);
                pass.broken = true;
                pass.notify = pass.completed > 0;
            }
        }
        pass
    }
}

/// One pass over `queue`: [`Ring::run`] with `round`, then
/// [`Ring::finish`]. Breaks are logged under `device`.
pub fn run_pass(
    device: &str,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    warned: &mut Warned,
    mut round: impl FnMut(&mut Ring<'_, '_>, &mut Warned) -> Result<Rearm, Broken>,
) -> Pass {
    let mut ring = Ring::new(queue, mem);
    let run = ring.run(|r| round(r, warned));
    ring.finish(device, run, warned)
}

/// The pass of simple devices: hands each available chain to `serve`
/// (which returns the bytes it wrote into the chain) and completes it,
/// until nothing new arrived.
pub fn drain_queue(
    device: &str,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    warned: &mut Warned,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>, &mut Warned) -> u32,
) -> Pass {
    run_pass(device, queue, mem, warned, |ring, warned| {
        let chains: Vec<_> = ring.iter()?.collect();
        for chain in chains {
            let head = chain.head_index();
            let written = serve(chain, warned);
            ring.complete(head, written)?;
        }
        Ok(Rearm::Enable { again: true })
    })
}

/// The worker side of the contract for one activated device: the
/// device-wide broken state and the interrupt. A break in any queue stops
/// them all (DEVICE_NEEDS_RESET is device-wide) until the device is reset,
/// which builds a new `QueueWorker`.
pub struct QueueWorker {
    interrupt: Arc<Interrupt>,
    broken: bool,
}

impl QueueWorker {
    /// The worker state of a freshly activated device.
    pub fn new(interrupt: Arc<Interrupt>) -> Self {
        QueueWorker {
            interrupt,
            broken: false,
        }
    }

    /// Whether a ring broke: no queue may be touched any more.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The device's interrupt (e.g. for configuration changes).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// Runs `pass` unless the device is broken, then [`QueueWorker::finish`].
    /// Returns what the pass did (an empty pass when it did not run).
    pub fn serve(&mut self, pass: impl FnOnce() -> Pass) -> Pass {
        if self.broken {
            return Pass::default();
        }
        let p = pass();
        self.finish(&p);
        p
    }

    /// Applies the interrupt rule to a finished pass: signals used buffers
    /// if it says so (completions before a break included), then, if it
    /// broke a ring, marks the device broken and sets DEVICE_NEEDS_RESET.
    pub fn finish(&mut self, pass: &Pass) {
        if pass.notify {
            self.interrupt.signal_used();
        }
        if pass.broken && !self.broken {
            self.broken = true;
            self.interrupt.set_needs_reset();
        }
    }
}

#[cfg(test)]
mod tests;
