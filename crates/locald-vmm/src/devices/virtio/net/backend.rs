//! The seam between the virtio-net device and the host network: a
//! [`NetBackend`] moves whole Ethernet frames, each preceded by a 12-byte
//! `virtio_net_hdr_v1` (see [`super::header`]). Backends run on the
//! device's worker thread ("virtio-net"); they are non-blocking and are
//! polled edge-triggered through [`NetBackend::fd`].

use std::io;
use std::os::fd::RawFd;

/// Whether a backend carries offload metadata (checksum/TSO) in the
/// virtio-net header, and so which offload features the device may offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    /// Guest → host: frames with partial checksums and TSO4/TSO6/ECN
    /// segments are accepted (`VIRTIO_NET_F_CSUM`, `HOST_TSO4/6/ECN`).
    pub host: bool,
    /// Host → guest: the backend can hand us unchecksummed or
    /// unsegmented frames if the guest accepts them (`GUEST_CSUM`,
    /// `GUEST_TSO4/6/ECN`).
    pub guest: bool,
}

/// One host-side network attachment.
pub trait NetBackend: Send {
    /// Short description for logs ("tap locald0", "passt pid 1234").
    fn describe(&self) -> String;

    /// Descriptor the worker waits on (readable: frames to receive;
    /// writable: queued output can be flushed). Watched edge-triggered.
    fn fd(&self) -> RawFd;

    /// Offload support of this backend.
    fn offloads(&self) -> Offloads;

    /// Tells the backend which guest-receive offloads the driver accepted
    /// (virtio feature bits), so it only produces frames the guest can
    /// take. Called at activation.
    fn set_guest_features(&mut self, _features: u64) -> io::Result<()> {
        Ok(())
    }

    /// Sends one packet: a 12-byte virtio-net header (already validated by
    /// the device) then the frame. A backend that cannot take it now
    /// either drops it (TAP, as a NIC would) or queues it and reports
    /// [`NetBackend::tx_blocked`] until [`NetBackend::flush`] drains it.
    fn send(&mut self, packet: &[u8]) -> io::Result<()>;

    /// Whether queued output must be flushed before more can be sent.
    fn tx_blocked(&self) -> bool {
        false
    }

    /// Writes queued output, if any.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Receives one packet into `buf` (12-byte header then the frame; the
    /// header's `num_buffers` is the device's to fill). `Ok(None)`: nothing
    /// now. An error means the backend is gone (link down).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
}
