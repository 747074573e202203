//! virtio-vsock packets (virtio 1.2, section 5.10.6): the 44-byte header,
//! reading a guest TX packet out of a descriptor chain, writing an RX
//! packet into one, and the addressing/type/op checks every guest packet
//! passes before the muxer routes it. Pure functions over guest memory;
//! they run on the device's worker thread (and in the fuzz target).
//!
//! The header and payload may be laid out any way over the chain's
//! descriptors (header alone, header and payload together, header split
//! across descriptors): readers and writers treat the chain as one byte
//! stream.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;
/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// Largest payload we accept from, or put in, one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// Socket type: stream (the only one we support).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flags: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `struct virtio_vsock_hdr`, decoded (all fields little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the wire format.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// One descriptor of a chain, as the packet code needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// Why a TX chain is not a usable packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The chain holds fewer bytes than a header.
    #[error("header too short ({0} bytes)")]
    ShortHeader(usize),
    /// A device-writable descriptor in a TX chain.
    #[error("device-writable descriptor in a TX chain")]
    WritableDescriptor,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory at {0:#x}")]
    Unreadable(u64),
    /// `len` is larger than [`MAX_PKT_PAYLOAD`].
    #[error("payload length {} over the limit", .0.len)]
    TooLong(Header),
    /// `len` is larger than the bytes after the header.
    #[error("payload length {} but only {avail} bytes follow the header", .hdr.len)]
    Truncated { hdr: Header, avail: usize },
}

impl TxError {
    /// The header, when it was read before the packet was found bad.
    pub fn header(&self) -> Option<&Header> {
        match self {
            TxError::TooLong(h) | TxError::Truncated { hdr: h, .. } => Some(h),
            _ => None,
        }
    }

    /// Short name of the cause, for [`super::super::Warned`].
    pub fn cause(&self) -> &'static str {
        match self {
            TxError::ShortHeader(_) => "TX header too short",
            TxError::WritableDescriptor => "device-writable TX descriptor",
            TxError::Unreadable(_) => "TX descriptor outside guest memory",
            TxError::TooLong(_) => "TX payload over the limit",
            TxError::Truncated { .. } => "TX payload longer than its descriptors",
        }
    }
}

/// Reads a guest TX packet from `descs` (the chain, in order): returns the
/// header and leaves exactly `len` payload bytes in `payload`.
pub fn read_tx_packet<M: GuestMemory>(
    mem: &M,
    descs: impl IntoIterator<Item = Desc>,
    payload: &mut Vec<u8>,
) -> Result<Header, TxError> {
    payload.clear();
    let mut hdr_buf = [0u8; HDR_SIZE];
    let mut hdr_got = 0usize;
    let mut hdr: Option<Header> = None;
    let mut want = 0usize;
    for d in descs {
        if d.write_only {
            return Err(TxError::WritableDescriptor);
        }
        let mut addr = d.addr;
        let mut left = d.len as usize;
        if hdr.is_none() {
            let n = left.min(HDR_SIZE - hdr_got);
            mem.read_slice(&mut hdr_buf[hdr_got..hdr_got + n], addr)
                .map_err(|_| TxError::Unreadable(addr.raw_value()))?;
            hdr_got += n;
            left -= n;
            addr = addr
                .checked_add(n as u64)
                .ok_or(TxError::Unreadable(addr.raw_value()))?;
            if hdr_got < HDR_SIZE {
                continue;
            }
            let h = Header::from_bytes(&hdr_buf);
            if h.len as usize > MAX_PKT_PAYLOAD {
                return Err(TxError::TooLong(h));
            }
            want = h.len as usize;
            payload.reserve_exact(want);
            hdr = Some(h);
        }
        let n = left.min(want - payload.len());
        if n > 0 {
            let start = payload.len();
            payload.resize(start + n, 0);
            mem.read_slice(&mut payload[start..], addr)
                .map_err(|_| TxError::Unreadable(addr.raw_value()))?;
        }
        if payload.len() == want {
            break;
        }
    }
    let Some(h) = hdr else {
        return Err(TxError::ShortHeader(hdr_got));
    };
    if payload.len() < want {
        let avail = payload.len();
        payload.clear();
        return Err(TxError::Truncated { hdr: h, avail });
    }
    Ok(h)
}

/// Why an RX chain cannot take a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxError {
    /// A device-readable descriptor in an RX chain.
    #[error("device-readable descriptor in an RX chain")]
    ReadableDescriptor,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory at {0:#x}")]
    Unwritable(u64),
    /// The chain cannot hold a header.
    #[error("RX buffer of {0} bytes cannot hold a header")]
    TooSmall(usize),
}

impl RxError {
    /// Short name of the cause, for [`super::super::Warned`].
    pub fn cause(&self) -> &'static str {
        match self {
            RxError::ReadableDescriptor => "device-readable RX descriptor",
            RxError::Unwritable(_) => "RX descriptor outside guest memory",
            RxError::TooSmall(_) => "RX buffer smaller than a header",
        }
    }
}

/// Checks an RX chain and returns how many payload bytes it can take after
/// the header (capped at [`MAX_PKT_PAYLOAD`]).
pub fn rx_payload_room<M: GuestMemory>(mem: &M, descs: &[Desc]) -> Result<usize, RxError> {
    let mut total = 0usize;
    for d in descs {
        if !d.write_only {
            return Err(RxError::ReadableDescriptor);
        }
        if !mem.check_range(d.addr, d.len as usize) {
            return Err(RxError::Unwritable(d.addr.raw_value()));
        }
        total = total.saturating_add(d.len as usize);
    }
    if total < HDR_SIZE {
        return Err(RxError::TooSmall(total));
    }
    Ok((total - HDR_SIZE).min(MAX_PKT_PAYLOAD))
}

/// Writes `hdr` (with `len` set to the payload length) and `payload` into
/// an RX chain checked by [`rx_payload_room`]; returns the bytes written.
pub fn write_rx_packet<M: GuestMemory>(
    mem: &M,
    descs: &[Desc],
    hdr: &Header,
    payload: &[u8],
) -> Result<u32, RxError> {
    let mut h = *hdr;
    h.len = payload.len() as u32;
    let hb = h.to_bytes();
    let mut parts: [&[u8]; 2] = [&hb, payload];
    let mut written = 0usize;
    for d in descs {
        let mut addr = d.addr;
        let mut room = d.len as usize;
        for part in parts.iter_mut() {
            if room == 0 {
                break;
            }
            let n = room.min(part.len());
            if n == 0 {
                continue;
            }
            mem.write_slice(&part[..n], addr)
                .map_err(|_| RxError::Unwritable(addr.raw_value()))?;
            *part = &part[n..];
            room -= n;
            written += n;
            addr = addr.unchecked_add(n as u64);
        }
        if parts.iter().all(|p| p.is_empty()) {
            break;
        }
    }
    if parts.iter().any(|p| !p.is_empty()) {
        return Err(RxError::TooSmall(written));
    }
    Ok(written as u32)
}

/// What to do with a guest packet before routing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Route it.
    Accept,
    /// Drop it silently (logged once per cause).
    Drop(&'static str),
    /// Answer with an RST (logged once per cause).
    Rst(&'static str),
}

/// Checks a guest packet's addressing, type, op and length.
pub fn validate(hdr: &Header, guest_cid: u64) -> Verdict {
    if hdr.src_cid != guest_cid {
        return Verdict::Drop("packet with a wrong source CID");
    }
    if hdr.dst_cid != HOST_CID {
        return Verdict::Drop("packet not addressed to the host");
    }
    // Never answer an RST with an RST.
    if hdr.op == op::RST {
        return Verdict::Accept;
    }
    if hdr.type_ != TYPE_STREAM {
        return Verdict::Rst("unsupported socket type");
    }
    if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
        return Verdict::Rst("unknown op");
    }
    if hdr.op != op::RW && hdr.len != 0 {
        return Verdict::Rst("payload on a control packet");
    }
    Verdict::Accept
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn hdr(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    fn rd(addr: u64, len: u32) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            write_only: false,
        }
    }

    fn wr(addr: u64, len: u32) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            write_only: true,
        }
    }

    #[test]
    fn header_round_trips_and_is_little_endian() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 5,
            len: 6,
            type_: 1,
            op: op::CREDIT_REQUEST,
            flags: 3,
            buf_alloc: 9,
            fwd_cnt: 10,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[30..32], &[7, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn reads_header_and_payload_in_separate_descriptors() {
        let m = mem();
        m.write_slice(&hdr(5).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        m.write_slice(b"hello", GuestAddress(0x2000)).unwrap();
        let mut p = Vec::new();
        let h = read_tx_packet(&m, [rd(0x1000, 44), rd(0x2000, 5)], &mut p).unwrap();
        assert_eq!(h, hdr(5));
        assert_eq!(p, b"hello");
    }

    #[test]
    fn reads_header_and_payload_in_one_descriptor() {
        let m = mem();
        m.write_slice(&hdr(3).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        m.write_slice(b"abcXYZ", GuestAddress(0x1000 + 44)).unwrap();
        let mut p = Vec::new();
        // The descriptor is longer than the packet: the rest is ignored.
        let h = read_tx_packet(&m, [rd(0x1000, 100)], &mut p).unwrap();
        assert_eq!(h.len, 3);
        assert_eq!(p, b"abc");
    }

    #[test]
    fn reads_header_split_across_descriptors() {
        let m = mem();
        let b = hdr(4).to_bytes();
        m.write_slice(&b[..10], GuestAddress(0x1000)).unwrap();
        m.write_slice(&b[10..], GuestAddress(0x3000)).unwrap();
        m.write_slice(b"wxyz", GuestAddress(0x3000 + 34)).unwrap();
        let mut p = Vec::new();
        let h = read_tx_packet(&m, [rd(0x1000, 10), rd(0x3000, 38)], &mut p).unwrap();
        assert_eq!(h, hdr(4));
        assert_eq!(p, b"wxyz");
        // Payload spread over many one-byte descriptors.
        m.write_slice(&hdr(3).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let descs = [rd(0x1000, 44), rd(0x5000, 1), rd(0x6000, 0), rd(0x7000, 2)];
        m.write_slice(b"a", GuestAddress(0x5000)).unwrap();
        m.write_slice(b"bc", GuestAddress(0x7000)).unwrap();
        read_tx_packet(&m, descs, &mut p).unwrap();
        assert_eq!(p, b"abc");
    }

    #[test]
    fn short_header_is_rejected() {
        let m = mem();
        let mut p = Vec::new();
        assert_eq!(
            read_tx_packet(&m, [rd(0x1000, 20), rd(0x2000, 23)], &mut p),
            Err(TxError::ShortHeader(43))
        );
        assert_eq!(read_tx_packet(&m, [], &mut p), Err(TxError::ShortHeader(0)));
    }

    #[test]
    fn oversized_and_truncated_payloads_are_rejected() {
        let m = mem();
        let mut p = Vec::new();
        m.write_slice(
            &hdr(MAX_PKT_PAYLOAD as u32 + 1).to_bytes(),
            GuestAddress(0x1000),
        )
        .unwrap();
        let e = read_tx_packet(&m, [rd(0x1000, 0x2_0000)], &mut p).unwrap_err();
        assert!(matches!(e, TxError::TooLong(_)));
        assert_eq!(e.header().unwrap().dst_port, 52);
        m.write_slice(&hdr(u32::MAX).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert!(matches!(
            read_tx_packet(&m, [rd(0x1000, 44)], &mut p),
            Err(TxError::TooLong(_))
        ));
        m.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let e = read_tx_packet(&m, [rd(0x1000, 44), rd(0x2000, 60)], &mut p).unwrap_err();
        assert!(matches!(e, TxError::Truncated { avail: 60, .. }));
        assert!(p.is_empty());
    }

    #[test]
    fn bad_descriptors_are_rejected() {
        let m = mem();
        let mut p = Vec::new();
        assert_eq!(
            read_tx_packet(&m, [wr(0x1000, 44)], &mut p),
            Err(TxError::WritableDescriptor)
        );
        assert!(matches!(
            read_tx_packet(&m, [rd(0x10_0000 - 10, 44)], &mut p),
            Err(TxError::Unreadable(_))
        ));
        m.write_slice(&hdr(8).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert!(matches!(
            read_tx_packet(&m, [rd(0x1000, 44), rd(u64::MAX - 2, 8)], &mut p),
            Err(TxError::Unreadable(_))
        ));
    }

    #[test]
    fn writes_rx_packets_over_any_layout() {
        let m = mem();
        let h = hdr(0);
        // Header and payload in one buffer.
        let one = [wr(0x1000, 4096)];
        assert_eq!(rx_payload_room(&m, &one), Ok(4096 - 44));
        assert_eq!(write_rx_packet(&m, &one, &h, b"data"), Ok(48));
        let mut b = [0u8; 48];
        m.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        let got = Header::from_bytes(b[..44].try_into().unwrap());
        assert_eq!(got.len, 4);
        assert_eq!(&b[44..], b"data");
        // Header buffer, then a payload buffer; header split too.
        let two = [
            wr(0x2000, 30),
            wr(0x3000, 14),
            wr(0x4000, 2),
            wr(0x5000, 10),
        ];
        assert_eq!(rx_payload_room(&m, &two), Ok(12));
        assert_eq!(write_rx_packet(&m, &two, &h, b"abcde"), Ok(49));
        let mut hb = [0u8; 44];
        m.read_slice(&mut hb[..30], GuestAddress(0x2000)).unwrap();
        m.read_slice(&mut hb[30..], GuestAddress(0x3000)).unwrap();
        assert_eq!(Header::from_bytes(&hb).len, 5);
        let mut pb = [0u8; 5];
        m.read_slice(&mut pb[..2], GuestAddress(0x4000)).unwrap();
        m.read_slice(&mut pb[2..], GuestAddress(0x5000)).unwrap();
        assert_eq!(&pb, b"abcde");
        // Payload too large for the chain.
        assert_eq!(
            write_rx_packet(&m, &[wr(0x1000, 50)], &h, &[0; 10]),
            Err(RxError::TooSmall(50))
        );
    }

    #[test]
    fn bad_rx_chains_are_rejected() {
        let m = mem();
        assert_eq!(
            rx_payload_room(&m, &[wr(0x1000, 43)]),
            Err(RxError::TooSmall(43))
        );
        assert_eq!(
            rx_payload_room(&m, &[rd(0x1000, 4096)]),
            Err(RxError::ReadableDescriptor)
        );
        assert!(matches!(
            rx_payload_room(&m, &[wr(0xf_f000, 0x2000)]),
            Err(RxError::Unwritable(_))
        ));
        // Room is capped at the largest packet.
        assert_eq!(
            rx_payload_room(&m, &[wr(0x1000, 0x8_0000)]),
            Ok(MAX_PKT_PAYLOAD)
        );
    }

    #[test]
    fn validation_covers_every_hostile_header() {
        let ok = hdr(0);
        assert_eq!(validate(&ok, 3), Verdict::Accept);
        let with = |f: &dyn Fn(&mut Header)| {
            let mut h = ok;
            f(&mut h);
            validate(&h, 3)
        };
        assert!(matches!(with(&|h| h.src_cid = 4), Verdict::Drop(_)));
        assert!(matches!(with(&|h| h.src_cid = HOST_CID), Verdict::Drop(_)));
        assert!(matches!(with(&|h| h.dst_cid = 3), Verdict::Drop(_)));
        assert!(matches!(with(&|h| h.dst_cid = 1 << 40), Verdict::Drop(_)));
        assert_eq!(
            with(&|h| h.type_ = 2),
            Verdict::Rst("unsupported socket type")
        );
        assert_eq!(with(&|h| h.op = 0), Verdict::Rst("unknown op"));
        assert_eq!(with(&|h| h.op = 8), Verdict::Rst("unknown op"));
        assert_eq!(with(&|h| h.op = u16::MAX), Verdict::Rst("unknown op"));
        assert_eq!(
            with(&|h| {
                h.op = op::REQUEST;
                h.len = 1;
            }),
            Verdict::Rst("payload on a control packet")
        );
        // An RST is accepted whatever its type: it is never answered.
        assert_eq!(
            with(&|h| {
                h.op = op::RST;
                h.type_ = 9;
            }),
            Verdict::Accept
        );
    }
}
