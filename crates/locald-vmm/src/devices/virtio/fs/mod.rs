//! virtio-fs (virtio 1.2, section 5.11): a host directory shared with the
//! guest, served by an in-process FUSE server (no external `virtiofsd`).
//!
//! Queues: 0 is the high-priority queue (FORGET, INTERRUPT), 1 the only
//! request queue (`num_request_queues` = 1). Config space: the mount tag
//! (36 bytes, NUL-padded) and `num_request_queues`. Each request is a
//! device-readable FUSE message followed by device-writable buffers for the
//! reply; `fuse-backend-rs`'s `Server` decodes it and calls [`ShareFs`], our
//! confined passthrough file system (`share.rs`, policy in
//! `docs/virtio-fs.md`). DAX is not offered.
//!
//! Shape shared by every device: [`Fs`] holds the device state and runs on
//! the vCPU thread that touched the transport; [`process_queue`] is the
//! queue work as a plain function; [`FsHandler`] runs it on the device's
//! one worker thread (both queues), so requests are served one at a time
//! in order.

pub mod caps;
/// Share configuration (moved to [`crate::config::share`]).
pub use crate::config::share as config;
pub mod host;
pub mod share;
pub mod xattr;

use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::worker::{QueueHandler, Worker};
pub use super::Pass;
use super::{
    device_type, drain_queue, read_config_bytes, ActivateError, Activation, QueueWorker,
    VirtioDevice, Warned, COMMON_FEATURES,
};
pub use share::{ShareCache, ShareFs, ShareFsOptions};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Number of queues: high-priority + one request queue.
pub const NUM_QUEUES: usize = 2;
/// Length of the tag field in config space.
pub const TAG_LEN: usize = 36;

/// The FUSE server of one share.
pub type FsServer = Server<Arc<ShareFs>>;

/// Serves every available request on `queue`. A request the server cannot
/// decode (or whose buffers are outside guest memory) is completed with
/// no reply bytes; the guest's driver then fails it.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    server: &FsServer,
    warned: &mut Warned,
) -> Pass {
    drain_queue("virtio-fs", queue, mem, warned, |chain, warned| {
        serve(mem, chain, server, warned)
    })
}

/// One request: returns the reply length written to guest memory.
fn serve(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    server: &FsServer,
    warned: &mut Warned,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            warned.warn("virtio-fs", "bad request buffers", e);
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            warned.warn("virtio-fs", "bad reply buffers", e);
            return 0;
        }
    };
    match server.handle_message(reader, writer.into(), None, None) {
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(e) => {
            warned.warn("virtio-fs", "undecodable request", e);
            0
        }
    }
}

/// Worker-thread glue: both queues on one thread.
pub struct FsHandler {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    server: Arc<FsServer>,
    /// The served file system, for the reset in [`QueueHandler::on_stop`].
    fs: Arc<ShareFs>,
    worker: QueueWorker,
    warned: Warned,
}

impl QueueHandler for FsHandler {
    /// On the worker thread, before the first request: a root VMM keeps
    /// only the capabilities serving a share needs (`caps.rs`).
    fn init(&mut self, _ops: &mut event_manager::EventOps) {
        caps::drop_for_server_thread("virtio-fs worker");
    }

    fn process_queue(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        let (mem, server, warned) = (&self.mem, &self.server, &mut self.warned);
        self.worker
            .serve(|| process_queue(queue, mem, server, warned));
    }

    /// Device reset or teardown, on this worker thread (its filter has the
    /// `openat` this needs): a new driver starts a new FUSE session, so
    /// drop every inode and handle the old one held and reopen the root.
    fn on_stop(&mut self) {
        fuse_backend_rs::api::filesystem::FileSystem::destroy(&*self.fs);
    }
}

/// The virtio-fs device of one share.
pub struct Fs {
    config: Vec<u8>,
    fs: Arc<ShareFs>,
    server: Arc<FsServer>,
    worker: Option<Worker<FsHandler>>,
}

impl Fs {
    /// A device exporting `fs` under mount tag `tag` (at most 36 bytes,
    /// checked by the config layer; longer tags are cut).
    pub fn new(tag: &str, fs: ShareFs) -> Self {
        let mut config = vec![0u8; TAG_LEN + 4];
        let t = tag.as_bytes();
        let n = t.len().min(TAG_LEN);
        config[..n].copy_from_slice(&t[..n]);
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let fs = Arc::new(fs);
        Fs {
            config,
            server: Arc::new(Server::new(fs.clone())),
            fs,
            worker: None,
        }
    }

    /// The file system served.
    pub fn share(&self) -> &Arc<ShareFs> {
        &self.fs
    }
}

impl VirtioDevice for Fs {
    fn snapshot_blocker(&self) -> Option<String> {
        self.fs.in_session().then(|| {
            format!(
                "the share {} is mounted in the guest: its FUSE session (inode numbers the guest holds) cannot be saved; unmount it first",
                self.fs.options().root.display()
            )
        })
    }

    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != NUM_QUEUES || a.queue_events.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: a.queues.len(),
            });
        }
        let handler = FsHandler {
            mem: a.mem,
            queues: a.queues,
            server: self.server.clone(),
            fs: self.fs.clone(),
            worker: QueueWorker::new(a.interrupt),
            warned: Warned::default(),
        };
        let worker = Worker::spawn("virtio-fs", a.queue_events, handler)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // The worker forgets the session's inodes and handles on its own
        // thread before it ends (`FsHandler::on_stop`); this (vCPU) thread
        // may not open files.
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests;
