//! virtio-rng (virtio 1.2, section 5.4): an entropy source fed from the
//! host's `getrandom`, so the guest kernel's RNG is ready at once. One
//! queue of device-writable buffers, each filled completely.
//!
//! Shape shared by every device: [`Rng`] holds the device state and runs on
//! the vCPU thread that touched the transport; [`process_queue`] is the
//! queue work as a plain function (unit-tested with a mock queue); the
//! [`RngHandler`] glue runs it on the device's worker thread.

use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::worker::{QueueHandler, Worker};
pub use super::Pass;
use super::{
    device_type, drain_queue, ActivateError, Activation, QueueWorker, VirtioDevice, Warned,
    COMMON_FEATURES,
};

/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given for one buffer chain: a guest cannot make one request
/// cost unbounded host work.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// Fills every available chain with random bytes.
pub fn process_queue(queue: &mut Queue, mem: &GuestMemoryMmap, warned: &mut Warned) -> Pass {
    let mut buf = vec![0u8; 4096];
    drain_queue("virtio-rng", queue, mem, warned, |chain, warned| {
        let mut written: u32 = 0;
        for desc in chain {
            if !desc.is_write_only() {
                warned.warn("virtio-rng", "device-readable descriptor", desc.addr().0);
                continue;
            }
            let mut left = desc.len().min(MAX_BYTES_PER_REQUEST - written);
            let mut addr = desc.addr();
            while left > 0 {
                let n = (left as usize).min(buf.len());
                fill_random(&mut buf[..n]);
                if let Err(e) = mem.write_slice(&buf[..n], addr) {
                    warned.warn("virtio-rng", "buffer outside guest memory", e);
                    break;
                }
                written += n as u32;
                left -= n as u32;
                addr = addr.unchecked_add(n as u64);
            }
            if written >= MAX_BYTES_PER_REQUEST {
                break;
            }
        }
        written
    })
}

/// Fills `buf` from the host's getrandom (blocking only before the host
/// RNG is initialised, which a running host is past).
fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`,
        // which getrandom writes at most `len` bytes into.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // Cannot happen on Linux ≥ 3.17 with a valid buffer; never hand
            // out predictable bytes silently.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// Worker-thread glue.
pub struct RngHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    worker: QueueWorker,
    warned: Warned,
}

impl QueueHandler for RngHandler {
    fn process_queue(&mut self, _index: usize) {
        let (queue, mem, warned) = (&mut self.queue, &self.mem, &mut self.warned);
        self.worker.serve(|| process_queue(queue, mem, warned));
    }
}

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<Worker<RngHandler>>,
}

impl Rng {
    /// A new, inactive entropy device.
    pub fn new() -> Self {
        Rng::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No config space.
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let got = a.queues.len();
        let (Some(queue), Some(_)) = (a.queues.into_iter().next(), a.queue_events.first()) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        let handler = RngHandler {
            mem: a.mem,
            queue,
            worker: QueueWorker::new(a.interrupt),
            warned: Warned::default(),
        };
        let worker = Worker::spawn("virtio-rng", a.queue_events, handler)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn chain(vq: &MockSplitQueue<GuestMemoryMmap>, descs: &[(u64, u32, u16)]) {
        let d: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        vq.build_desc_chain(&d).unwrap();
    }

    #[test]
    fn fills_writable_buffers() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        chain(&vq, &[(0x10_0000, 64, VRING_DESC_F_WRITE as u16)]);
        let mut w = Warned::default();
        let pass = process_queue(&mut q, &m, &mut w);
        assert_eq!(pass.completed, 1);
        assert!(pass.notify && !pass.broken);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 64);
        let mut b = [0u8; 64];
        m.read_slice(&mut b, GuestAddress(0x10_0000)).unwrap();
        assert!(b.iter().any(|&x| x != 0));
    }

    #[test]
    fn readable_and_outside_buffers_get_nothing() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // A device-readable buffer, then a writable one outside guest memory.
        chain(
            &vq,
            &[
                (0x10_0000, 64, 0),
                (0x100_0000, 64, VRING_DESC_F_WRITE as u16),
            ],
        );
        let mut w = Warned::default();
        let pass = process_queue(&mut q, &m, &mut w);
        assert_eq!(pass.completed, 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert!(w.seen("device-readable descriptor"));
        assert!(w.seen("buffer outside guest memory"));
    }

    #[test]
    fn huge_buffer_is_capped() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        chain(&vq, &[(0x10_0000, 0x20_0000, VRING_DESC_F_WRITE as u16)]);
        let pass = process_queue(&mut q, &m, &mut Warned::default());
        assert_eq!(pass.completed, 1);
        assert_eq!(
            vq.used().ring().ref_at(0).unwrap().load().len(),
            MAX_BYTES_PER_REQUEST
        );
    }

    #[test]
    fn runaway_avail_index_breaks_the_queue() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // avail.idx claims 1000 new chains in a 16-entry ring.
        vq.avail().idx().store(1000);
        let pass = process_queue(&mut q, &m, &mut Warned::default());
        assert!(pass.broken);
    }
}
