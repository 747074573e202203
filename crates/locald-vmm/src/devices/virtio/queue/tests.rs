//! Tests of the queue contract itself ([`super`]), over `virtio-queue`'s
//! mock split queue, on the test thread.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::{INT_CONFIG, INT_USED_RING};

const SIZE: u16 = 16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

/// Makes one single-descriptor chain available, at descriptor `slot`.
fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, slot: u16) {
    let d = SplitDescriptor::new(
        0x10_0000 + u64::from(slot) * 0x100,
        0x100,
        VRING_DESC_F_WRITE as u16,
        0,
    );
    vq.add_desc_chains(&[RawDescriptor::from(d)], slot).unwrap();
}

fn interrupt() -> (Arc<Interrupt>, EventFd) {
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let i = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    (i, irq)
}

/// The driver's `used_event` (after the avail ring).
fn set_used_event(m: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, v: u16) {
    let addr = vq.avail_addr().0 + 4 + 2 * u64::from(SIZE);
    m.write_obj(v, GuestAddress(addr)).unwrap();
}

/// The device's `avail_event` (after the used ring).
fn avail_event(m: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    let addr = vq.used_addr().0 + 4 + 8 * u64::from(SIZE);
    m.read_obj(GuestAddress(addr)).unwrap()
}

#[test]
fn broken_ring_needs_reset_and_is_not_touched_again() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, SIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let (int, _irq) = interrupt();
    let mut worker = QueueWorker::new(int.clone());
    let mut w = Warned::default();
    // avail.idx claims 1000 new chains in a 16-entry ring.
    vq.avail().idx().store(1000);
    let served = std::cell::Cell::new(0);
    let pass = worker.serve(|| {
        drain_queue("test", &mut q, &m, &mut w, |_, _| {
            served.set(served.get() + 1);
            0
        })
    });
    assert!(pass.broken && !pass.notify);
    assert!(worker.is_broken() && int.needs_reset());
    assert_eq!(int.status(), INT_CONFIG);
    assert!(w.seen(CAUSE_UNUSABLE));
    // The driver "fixes" the ring: the device still does not touch it.
    vq.avail().idx().store(0);
    add_chain(&vq, 0);
    let mut ran = false;
    let pass = worker.serve(|| {
        ran = true;
        Pass::default()
    });
    assert!(!ran);
    assert_eq!(pass, Pass::default());
    assert_eq!(served.get(), 0);
    assert_eq!(vq.used().idx().load(), 0);
}

#[test]
fn event_idx_recheck_sees_buffers_added_during_a_round() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, SIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    add_chain(&vq, 0);
    let mut rounds = 0;
    let pass = run_pass("test", &mut q, &m, &mut Warned::default(), |ring, _| {
        rounds += 1;
        let chains: Vec<_> = ring.iter()?.collect();
        for c in chains {
            ring.complete(c.head_index(), 0)?;
        }
        if rounds == 1 {
            // The driver adds a buffer after the device looked, before it
            // re-enabled notifications: no kick will come for it.
            add_chain(&vq, 1);
        }
        Ok(Rearm::Enable { again: true })
    });
    assert_eq!(rounds, 2);
    assert_eq!(pass.completed, 2);
    assert!(!pass.broken);
    assert_eq!(vq.used().idx().load(), 2);
    // Armed for the next buffer: avail_event is where the device stopped.
    assert_eq!(avail_event(&m, &vq), 2);
}

#[test]
fn recheck_runs_no_round_the_device_has_no_work_for() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, SIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chain(&vq, 0);
    let mut rounds = 0;
    let pass = run_pass("test", &mut q, &m, &mut Warned::default(), |_, _| {
        rounds += 1;
        // Leaves the buffer where it is (nothing to put in it).
        Ok(Rearm::Enable { again: false })
    });
    assert_eq!(rounds, 1);
    assert_eq!(pass, Pass::default());
}

#[test]
fn interrupt_suppressed_when_the_driver_asked_for_none() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, SIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    // The driver wants an interrupt only after the 6th completion.
    set_used_event(&m, &vq, 5);
    add_chain(&vq, 0);
    let (int, irq) = interrupt();
    let mut worker = QueueWorker::new(int.clone());
    let mut w = Warned::default();
    let pass = worker.serve(|| drain_queue("test", &mut q, &m, &mut w, |_, _| 1));
    assert_eq!(pass.completed, 1);
    assert!(!pass.notify && !pass.broken);
    assert_eq!(int.status(), 0);
    assert!(irq.read().is_err(), "no interrupt was raised");
    // Once it asks for one, it gets it.
    set_used_event(&m, &vq, 1);
    add_chain(&vq, 1);
    let pass = worker.serve(|| drain_queue("test", &mut q, &m, &mut w, |_, _| 1));
    assert!(pass.notify);
    assert_eq!(int.status(), INT_USED_RING);
    assert_eq!(irq.read().unwrap(), 1);
}

#[test]
fn completions_before_a_break_are_signalled() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, SIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    // Even a driver that asked for no interrupt yet gets one: the ring
    // that says so is what broke.
    set_used_event(&m, &vq, 5);
    add_chain(&vq, 0);
    // A second entry whose head is outside the descriptor table.
    vq.avail().ring().ref_at(1).unwrap().store(SIZE + 3);
    vq.avail().idx().store(2);
    let (int, irq) = interrupt();
    let mut worker = QueueWorker::new(int.clone());
    let mut w = Warned::default();
    let pass = worker.serve(|| drain_queue("test", &mut q, &m, &mut w, |_, _| 7));
    assert_eq!(pass.completed, 1);
    assert!(pass.broken && pass.notify);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 7);
    assert_eq!(int.status(), INT_USED_RING | INT_CONFIG);
    assert!(int.needs_reset());
    assert!(irq.read().unwrap() >= 1);
    assert!(w.seen(CAUSE_USED_WRITE));
}

#[test]
fn leave_keeps_notifications_off_and_enable_past_arms_beyond_seen() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, SIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chain(&vq, 0);
    // Leave: the no-notify flag the round started with stays set.
    run_pass("test", &mut q, &m, &mut Warned::default(), |_, _| {
        Ok(Rearm::Leave)
    });
    assert_eq!(m.read_obj::<u16>(vq.used_addr()).unwrap(), 1);
    // EnablePast: a round that looked at the one buffer and put it back
    // (too small) waits for a buffer past it, not for that one.
    q.set_event_idx(true);
    let mut rounds = 0;
    let pass = run_pass("test", &mut q, &m, &mut Warned::default(), |ring, _| {
        rounds += 1;
        let start = ring.queue().next_avail();
        let _ = ring.pop()?;
        let seen = ring.queue().next_avail();
        ring.queue().set_next_avail(start);
        Ok(Rearm::EnablePast { seen })
    });
    assert_eq!(rounds, 1);
    assert_eq!(pass, Pass::default());
    assert_eq!(avail_event(&m, &vq), 1);
    assert_eq!(q.next_avail(), 0);
}
