//! [`HostMount`]: the same FUSE server as the virtio-fs device
//! ([`ShareFs`] behind `fuse-backend-rs`'s `Server`), mounted on the host
//! through `/dev/fuse` instead of a virtqueue. Used by the host-side tests
//! (real programs against the server, no guest) and the benchmark. Needs
//! root (it mounts directly, without `fusermount`).
//!
//! Threads: `threads` server threads, each reading requests from its own
//! clone of the `/dev/fuse` fd; dropping the mount unmounts it, wakes them
//! and joins them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::FuseSession;

use super::share::{ShareFs, ShareFsOptions};

/// A share mounted on the host.
pub struct HostMount {
    session: FuseSession,
    fs: Arc<ShareFs>,
    threads: Vec<JoinHandle<()>>,
    mountpoint: PathBuf,
}

impl HostMount {
    /// Serves `opts` at `mountpoint` (an existing empty directory).
    pub fn mount(opts: ShareFsOptions, mountpoint: &Path, threads: usize) -> io::Result<Self> {
        let read_only = opts.read_only;
        let fs = Arc::new(ShareFs::new(opts)?);
        let mut session = FuseSession::new(mountpoint, "locald-share", "", read_only)
            .map_err(|e| io::Error::other(e.to_string()))?;
        session
            .mount()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let server = Arc::new(Server::new(fs.clone()));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let mut ch = session
                .new_channel()
                .map_err(|e| io::Error::other(e.to_string()))?;
            let server = server.clone();
            let h = std::thread::Builder::new()
                .name(format!("fuse-host-{i}"))
                .spawn(move || {
                    // The same capabilities as the device's worker thread.
                    super::caps::drop_for_server_thread("host fuse server");
                    loop {
                        match ch.get_request() {
                            Ok(Some((reader, writer))) => {
                                if let Err(e) =
                                    server.handle_message(reader, writer.into(), None, None)
                                {
                                    if let fuse_backend_rs::Error::EncodeMessage(_) = e {
                                        // The kernel went away (unmounted).
                                        break;
                                    }
                                    tracing::debug!("host fuse: {e}");
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!("host fuse channel: {e}");
                                break;
                            }
                        }
                    }
                })?;
            handles.push(h);
        }
        Ok(HostMount {
            session,
            fs,
            threads: handles,
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// The file system being served (for fd/handle counts).
    pub fn fs(&self) -> &Arc<ShareFs> {
        &self.fs
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = self.session.umount();
        let _ = self.session.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
