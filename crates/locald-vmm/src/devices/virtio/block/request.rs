//! virtio-blk requests (virtio 1.2, section 5.2.6): [`ChainWalker`] walks
//! a descriptor chain, [`parse`]/[`parse_into`] turn it into a request
//! without side effects, [`execute`] runs a request against a
//! [`BlockBackend`]. All of it runs on the block device's worker thread
//! (or on the caller's thread in tests and the benchmark).
//!
//! Framing follows the spec's "no assumptions about descriptor layout"
//! rule: the device-readable descriptors form one byte stream whose first
//! 16 bytes are the header (`type`, `reserved`, `sector`) and the rest is
//! OUT data or DISCARD/WRITE_ZEROES segments; the device-writable
//! descriptors form another, whose very last byte (the last byte of the
//! chain) is the status and the rest is IN or GET_ID data. Zero-length
//! descriptors carry nothing and are skipped.
//!
//! Everything in the chain is guest-controlled. Nothing here panics on it:
//! a chain with a usable status byte but a bad request is answered IOERR
//! (or UNSUPP), a chain without one is completed with used length 0
//! ([`Rejection`]).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, VolatileArrayRef, VolatileMemory,
    VolatileSlice,
};

use super::disk::{is_unsupported, BlockBackend, SECTOR_SHIFT, SECTOR_SIZE};

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush the write cache.
pub const T_FLUSH: u32 = 4;
/// Read the 20-byte serial.
pub const T_GET_ID: u32 = 8;
/// Deallocate ranges.
pub const T_DISCARD: u32 = 11;
/// Zero ranges.
pub const T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: device or driver error.
pub const S_IOERR: u8 = 1;
/// Status: request not supported.
pub const S_UNSUPP: u8 = 2;

/// Length of the request header.
pub const HEADER_LEN: usize = 16;
/// Length of the GET_ID serial.
pub const ID_BYTES: usize = 20;
/// DISCARD/WRITE_ZEROES segment flag: the range may be deallocated.
pub const FLAG_UNMAP: u32 = 1;
/// Size of one DISCARD/WRITE_ZEROES segment (`sector` u64, `num_sectors`
/// u32, `flags` u32).
pub const DWZ_SEGMENT_LEN: usize = 16;

/// Most data descriptors in one request (`seg_max`); with the header and
/// status descriptors a chain fills a 256-entry queue.
pub const SEG_MAX: u32 = 254;
/// Most segments in one DISCARD request (`max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 16;
/// Most sectors in one DISCARD segment (`max_discard_sectors`: 2 GiB;
/// hole punching costs the host little).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most segments in one WRITE_ZEROES request (`max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 16;
/// Most sectors in one WRITE_ZEROES segment (`max_write_zeroes_sectors`:
/// 16 MiB, bounding the work when the host has to write real zeroes).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 15;
/// `discard_sector_alignment`: 4 KiB, the host page and usual fs block.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Room for the segments of one DISCARD or WRITE_ZEROES request.
const MAX_DWZ_SEG: usize = 16;
const _: () = assert!(
    MAX_DISCARD_SEG as usize <= MAX_DWZ_SEG && MAX_WRITE_ZEROES_SEG as usize <= MAX_DWZ_SEG
);

/// The request type from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read.
    In,
    /// Write.
    Out,
    /// Flush.
    Flush,
    /// Read the serial.
    GetId,
    /// Deallocate.
    Discard,
    /// Zero.
    WriteZeroes,
    /// Anything else (answered UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            T_IN => RequestType::In,
            T_OUT => RequestType::Out,
            T_FLUSH => RequestType::Flush,
            T_GET_ID => RequestType::GetId,
            T_DISCARD => RequestType::Discard,
            T_WRITE_ZEROES => RequestType::WriteZeroes,
            t => RequestType::Unsupported(t),
        }
    }
}

/// A guest buffer (part of a descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Bytes.
    pub len: u32,
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'s> {
    /// What to do.
    pub request_type: RequestType,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data buffers in order: device-writable for IN and GET_ID,
    /// device-readable for OUT, DISCARD and WRITE_ZEROES, empty otherwise.
    pub data: &'s [Segment],
    /// Total bytes in `data`.
    pub data_len: u64,
    /// Where the status byte goes (checked to be in guest memory).
    pub status: GuestAddress,
}

/// A chain that cannot be executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Malformed, but the status byte is usable: answer IOERR there.
    Status {
        /// The status byte.
        status: GuestAddress,
        /// Why (for the once-per-cause log).
        cause: &'static str,
    },
    /// No usable status byte: complete the chain with used length 0.
    NoStatus {
        /// Why.
        cause: &'static str,
    },
}

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// A descriptor table mapped for direct volatile access.
pub type DescTable<'m> = VolatileArrayRef<'m, Descriptor>;

/// Walks a descriptor chain with the same rules as virtio-queue's
/// `DescriptorChain` iterator (at most one hop into an indirect table,
/// whose length must be a multiple of 16; a `next` index past the table,
/// a loop longer than the table, or more than 4 GiB in total end the walk
/// early, leaving the last descriptor with its NEXT flag set, which
/// [`parse`] rejects), but reads descriptors through one mapping of each
/// table instead of a guest-memory lookup per descriptor: the hot path of
/// every request.
pub struct ChainWalker<'m> {
    mem: &'m GuestMemoryMmap,
    table_addr: GuestAddress,
    /// The table mapped in one piece, if it lies in one memory region.
    table: Option<DescTable<'m>>,
    table_len: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'m> ChainWalker<'m> {
    /// The descriptor table of a queue, mapped once for many chains.
    pub fn map_table(
        mem: &'m GuestMemoryMmap,
        table_addr: GuestAddress,
        len: u16,
    ) -> Option<DescTable<'m>> {
        // Through the region (a `MmapRegion`), so the mapping borrows guest
        // memory rather than a temporary slice.
        let (region, offset) = mem.to_region_addr(table_addr)?;
        let region: &'m vm_memory::MmapRegion = region;
        region
            .get_array_ref::<Descriptor>(offset.raw_value() as usize, usize::from(len))
            .ok()
    }

    /// Starts at descriptor `head` of the queue's table (`table`: from
    /// [`ChainWalker::map_table`], or `None` to read descriptor by
    /// descriptor).
    pub fn new(
        mem: &'m GuestMemoryMmap,
        table_addr: GuestAddress,
        table: Option<DescTable<'m>>,
        queue_size: u16,
        head: u16,
    ) -> Self {
        ChainWalker {
            mem,
            table_addr,
            table,
            table_len: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }

    #[inline]
    fn read(&self, index: u16) -> Option<Descriptor> {
        match &self.table {
            // A bounds check and one volatile 16-byte load (`load` would
            // panic past the end, which the check rules out).
            Some(t) if usize::from(index) < t.len() => Some(t.load(usize::from(index))),
            Some(_) => None,
            None => {
                let offset = u64::from(index) * DESC_SIZE;
                self.mem.read_obj(self.table_addr.checked_add(offset)?).ok()
            }
        }
    }
}

impl Iterator for ChainWalker<'_> {
    type Item = Descriptor;

    #[inline]
    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let d = self.read(self.next)?;
            if d.refers_to_indirect_table() {
                // No nesting; whole descriptors only; at most 65535.
                if self.indirect || u64::from(d.len()) % DESC_SIZE != 0 {
                    return None;
                }
                let len = u16::try_from(u64::from(d.len()) / DESC_SIZE).ok()?;
                self.table_addr = d.addr();
                self.table = Self::map_table(self.mem, d.addr(), len);
                self.table_len = len;
                self.next = 0;
                self.ttl = len;
                self.indirect = true;
                continue;
            }
            self.bytes = self.bytes.checked_add(d.len())?;
            if d.has_next() {
                self.next = d.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d);
        }
    }
}

/// Buffers reused from request to request so parsing does not allocate.
#[derive(Debug, Default)]
pub struct Scratch {
    descs: Vec<Descriptor>,
    segs: Vec<Segment>,
}

/// Parses a descriptor chain (as yielded by `DescriptorChain` or
/// [`ChainWalker`], indirect tables already followed). `max_descriptors`
/// bounds the chain length (`seg_max` + header + status).
pub fn parse<'s>(
    chain: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    max_descriptors: usize,
    scratch: &'s mut Scratch,
) -> Result<Request<'s>, Rejection> {
    scratch.segs.clear();
    let p = parse_into(
        chain,
        mem,
        max_descriptors,
        &mut scratch.descs,
        &mut scratch.segs,
    )?;
    Ok(p.request(&scratch.segs))
}

/// A parsed request whose data segments live in a shared list (so a whole
/// batch of requests can be parsed before any is executed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// What to do.
    pub request_type: RequestType,
    /// First sector.
    pub sector: u64,
    /// Where the data segments are in the shared list.
    pub data: std::ops::Range<usize>,
    /// Total data bytes.
    pub data_len: u64,
    /// The status byte.
    pub status: GuestAddress,
}

impl Parsed {
    /// The request, with its segments taken from `segs`.
    pub fn request<'s>(&self, segs: &'s [Segment]) -> Request<'s> {
        Request {
            request_type: self.request_type,
            sector: self.sector,
            data: segs.get(self.data.clone()).unwrap_or_default(),
            data_len: self.data_len,
            status: self.status,
        }
    }
}

/// [`parse`], appending the data segments to `segs` (`descs` is scratch).
pub fn parse_into(
    chain: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    max_descriptors: usize,
    descs: &mut Vec<Descriptor>,
    segs: &mut Vec<Segment>,
) -> Result<Parsed, Rejection> {
    descs.clear();
    let mut count = 0usize;
    let mut last = None;
    for d in chain {
        count += 1;
        if count <= max_descriptors {
            descs.push(d);
        }
        last = Some(d);
    }
    let Some(last) = last else {
        return Err(Rejection::NoStatus {
            cause: "empty descriptor chain",
        });
    };
    // The chain iterator stops early, without an error, on a loop, a next
    // index past the table, a bad indirect table or a chain over 4 GiB:
    // then the last descriptor it gave still says "next".
    if last.has_next() {
        return Err(Rejection::NoStatus {
            cause: "descriptor chain cut short (loop, bad next index or indirect table)",
        });
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(Rejection::NoStatus {
            cause: "last descriptor is not a device-writable status byte",
        });
    }
    let status = match last.addr().checked_add(u64::from(last.len()) - 1) {
        Some(a) if mem.address_in_range(a) => a,
        _ => {
            return Err(Rejection::NoStatus {
                cause: "status byte outside guest memory",
            })
        }
    };
    let bad = |cause| Err(Rejection::Status { status, cause });
    if count > max_descriptors {
        return bad("too many descriptors in one request");
    }
    // `last` is writable, so there is a first writable descriptor.
    let first_writable = descs
        .iter()
        .position(Descriptor::is_write_only)
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_writable);
    if writable.iter().any(|d| !d.is_write_only()) {
        return bad("device-readable descriptor after a device-writable one");
    }

    let mut header = [0u8; HEADER_LEN];
    // Fast path: the header sits in the first descriptor (drivers do that).
    let fast = readable
        .first()
        .filter(|d| d.len() as usize >= HEADER_LEN)
        .and_then(|d| mem.get_slice(d.addr(), HEADER_LEN).ok())
        .and_then(|s| s.get_ref::<[u8; HEADER_LEN]>(0).ok().map(|r| r.load()));
    match fast {
        Some(h) => header = h,
        None => match gather(mem, readable.iter().map(desc_segment), &mut header) {
            Ok(HEADER_LEN) => {}
            Ok(_) => return bad("request header shorter than 16 bytes"),
            Err(()) => return bad("request header outside guest memory"),
        },
    }
    let request_type = RequestType::from(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);

    // Data: the readable stream after the header, the writable stream
    // before the status byte.
    let start = segs.len();
    let readable_len = push_stream(segs, readable, HEADER_LEN as u64, 0);
    let split = segs.len();
    let writable_len = push_stream(segs, writable, 0, 1);
    let end = segs.len();

    let (data, data_len) = match request_type {
        RequestType::In | RequestType::GetId => {
            if readable_len != 0 {
                return bad("device-readable data buffer in a read request");
            }
            (split..end, writable_len)
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
            if writable_len != 0 {
                return bad("device-writable data buffer in a write request");
            }
            (start..split, readable_len)
        }
        RequestType::Flush | RequestType::Unsupported(_) => (start..start, 0),
    };
    Ok(Parsed {
        request_type,
        sector,
        data,
        data_len,
        status,
    })
}

fn desc_segment(d: &Descriptor) -> Segment {
    Segment {
        addr: d.addr(),
        len: d.len(),
    }
}

/// Appends the non-empty pieces of `descs` to `segs`, leaving out the
/// first `skip_front` bytes of the stream and the last `skip_back` bytes of
/// the last descriptor (the status byte; the caller checked it is there).
/// Returns the bytes appended.
#[inline]
fn push_stream(
    segs: &mut Vec<Segment>,
    descs: &[Descriptor],
    mut skip_front: u64,
    skip_back: u64,
) -> u64 {
    let mut pushed = 0u64;
    let last = descs.len().wrapping_sub(1);
    for (i, d) in descs.iter().enumerate() {
        let mut len = u64::from(d.len());
        let mut addr = d.addr();
        if skip_front > 0 {
            let k = skip_front.min(len);
            skip_front -= k;
            len -= k;
            // A wrapping address becomes one no memory has, so the request
            // fails its memory check rather than silently shrinking.
            addr = addr.checked_add(k).unwrap_or(GuestAddress(u64::MAX));
        }
        if i == last {
            len = len.saturating_sub(skip_back);
        }
        if len == 0 {
            continue;
        }
        // `len` <= the descriptor's u32 length.
        segs.push(Segment {
            addr,
            len: len as u32,
        });
        pushed += len;
    }
    pushed
}

/// Copies the first `out.len()` bytes of the stream `segs` into `out`.
/// Returns how many there were, or `Err` if one lies outside guest memory.
fn gather(
    mem: &GuestMemoryMmap,
    segs: impl Iterator<Item = Segment>,
    out: &mut [u8],
) -> Result<usize, ()> {
    let mut got = 0;
    for s in segs {
        if got == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - got);
        if n == 0 {
            continue;
        }
        mem.read_slice(&mut out[got..got + n], s.addr)
            .map_err(|_| ())?;
        got += n;
    }
    Ok(got)
}

/// What the device knows about its disk when executing requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Reject writes.
    pub read_only: bool,
    /// DISCARD is offered (and negotiated).
    pub discard: bool,
    /// WRITE_ZEROES is offered (and negotiated).
    pub write_zeroes: bool,
    /// WRITE_ZEROES with UNMAP may deallocate.
    pub write_zeroes_may_unmap: bool,
    /// The GET_ID answer, NUL-padded.
    pub serial: [u8; ID_BYTES],
}

/// Why a request failed, for the once-per-cause log.
#[derive(Debug)]
pub struct Problem {
    /// The cause (the log key).
    pub cause: &'static str,
    /// Specifics.
    pub detail: String,
    /// The guest did something wrong (vs. the host failing).
    pub guest: bool,
}

/// The result of executing a request.
#[derive(Debug)]
pub struct Completion {
    /// The status byte.
    pub status: u8,
    /// Data bytes written into guest memory (IN and GET_ID).
    pub written: u32,
    /// What went wrong, if anything.
    pub problem: Option<Problem>,
}

impl Completion {
    fn ok(written: u32) -> Self {
        Completion {
            status: S_OK,
            written,
            problem: None,
        }
    }

    fn guest(status: u8, cause: &'static str, detail: impl std::fmt::Display) -> Self {
        Completion {
            status,
            written: 0,
            problem: Some(Problem {
                cause,
                detail: detail.to_string(),
                guest: true,
            }),
        }
    }

    fn host(status: u8, cause: &'static str, detail: impl std::fmt::Display) -> Self {
        Completion {
            status,
            written: 0,
            problem: Some(Problem {
                cause,
                detail: detail.to_string(),
                guest: false,
            }),
        }
    }
}

/// Looks up the guest memory behind `data` into `slices` (cleared first).
fn map_data<'m>(
    mem: &'m GuestMemoryMmap,
    data: &[Segment],
    slices: &mut Vec<VolatileSlice<'m>>,
) -> Result<(), Completion> {
    slices.clear();
    for s in data {
        // Fast path: the buffer lies in one memory region.
        if let Ok(one) = mem.get_slice(s.addr, s.len as usize) {
            slices.push(one);
            continue;
        }
        for piece in mem.get_slices(s.addr, s.len as usize) {
            match piece {
                Ok(p) => slices.push(p),
                Err(e) => {
                    return Err(Completion::guest(
                        S_IOERR,
                        "data buffer outside guest memory",
                        format_args!("{:#x}+{:#x}: {e}", s.addr.raw_value(), s.len),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Checks that `len` bytes at `sector` lie within the disk; returns the
/// byte offset.
fn disk_range(info: &DiskInfo, sector: u64, len: u64) -> Result<u64, Completion> {
    let offset = sector.checked_mul(SECTOR_SIZE);
    let end = offset.and_then(|o| o.checked_add(len));
    match (offset, end) {
        (Some(o), Some(e)) if e <= info.capacity << SECTOR_SHIFT => Ok(o),
        _ => Err(Completion::guest(
            S_IOERR,
            "request beyond the end of the disk",
            format_args!(
                "sector {sector} + {len} bytes, capacity {} sectors",
                info.capacity
            ),
        )),
    }
}

/// Executes `req` against `disk`. `slices` is scratch space for the guest
/// buffers (kept by the caller so a queue pass allocates once).
pub fn execute<'m, D: BlockBackend + ?Sized>(
    req: &Request<'_>,
    mem: &'m GuestMemoryMmap,
    disk: &mut D,
    info: &DiskInfo,
    slices: &mut Vec<VolatileSlice<'m>>,
) -> Completion {
    match req.request_type {
        RequestType::In | RequestType::Out => {
            read_write(req, mem, disk, info, slices).unwrap_or_else(|c| c)
        }
        RequestType::Flush => match disk.flush() {
            Ok(()) => Completion::ok(0),
            Err(e) => Completion::host(S_IOERR, "flush failed", e),
        },
        RequestType::GetId => get_id(req, mem, info, slices).unwrap_or_else(|c| c),
        RequestType::Discard | RequestType::WriteZeroes => {
            discard_write_zeroes(req, mem, disk, info).unwrap_or_else(|c| c)
        }
        RequestType::Unsupported(t) => Completion::guest(S_UNSUPP, "unsupported request type", t),
    }
}

fn read_write<'m, D: BlockBackend + ?Sized>(
    req: &Request<'_>,
    mem: &'m GuestMemoryMmap,
    disk: &mut D,
    info: &DiskInfo,
    slices: &mut Vec<VolatileSlice<'m>>,
) -> Result<Completion, Completion> {
    let write = req.request_type == RequestType::Out;
    if write && info.read_only {
        return Err(Completion::guest(
            S_IOERR,
            "write to a read-only disk",
            format_args!("sector {}", req.sector),
        ));
    }
    if !req.data_len.is_multiple_of(SECTOR_SIZE) {
        return Err(Completion::guest(
            S_IOERR,
            "data length not a multiple of 512",
            req.data_len,
        ));
    }
    let offset = disk_range(info, req.sector, req.data_len)?;
    map_data(mem, req.data, slices)?;
    if req.data_len == 0 {
        return Ok(Completion::ok(0));
    }
    let r = if write {
        disk.write_at(offset, slices)
    } else {
        disk.read_at(offset, slices)
    };
    match r {
        // data_len fits: the whole chain is at most 4 GiB - 1 bytes.
        Ok(()) if write => Ok(Completion::ok(0)),
        Ok(()) => Ok(Completion::ok(
            u32::try_from(req.data_len).unwrap_or(u32::MAX),
        )),
        Err(e) => Err(Completion::host(
            S_IOERR,
            if write {
                "host write failed"
            } else {
                "host read failed"
            },
            format_args!("offset {offset}, {} bytes: {e}", req.data_len),
        )),
    }
}

fn get_id<'m>(
    req: &Request<'_>,
    mem: &'m GuestMemoryMmap,
    info: &DiskInfo,
    slices: &mut Vec<VolatileSlice<'m>>,
) -> Result<Completion, Completion> {
    map_data(mem, req.data, slices)?;
    let mut done = 0;
    for s in slices.iter() {
        if done == ID_BYTES {
            break;
        }
        let n = s.len().min(ID_BYTES - done);
        s.copy_from(&info.serial[done..done + n]);
        done += n;
    }
    Ok(Completion::ok(done as u32))
}

fn discard_write_zeroes<D: BlockBackend + ?Sized>(
    req: &Request<'_>,
    mem: &GuestMemoryMmap,
    disk: &mut D,
    info: &DiskInfo,
) -> Result<Completion, Completion> {
    let zeroes = req.request_type == RequestType::WriteZeroes;
    let what = if zeroes { "WRITE_ZEROES" } else { "DISCARD" };
    if info.read_only {
        return Err(Completion::guest(
            S_IOERR,
            "discard or write-zeroes on a read-only disk",
            what,
        ));
    }
    let (supported, max_seg, max_sectors) = if zeroes {
        (
            info.write_zeroes,
            MAX_WRITE_ZEROES_SEG,
            MAX_WRITE_ZEROES_SECTORS,
        )
    } else {
        (info.discard, MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
    };
    if !supported {
        return Err(Completion::guest(
            S_UNSUPP,
            "discard or write-zeroes not offered",
            what,
        ));
    }
    let seg_len = DWZ_SEGMENT_LEN as u64;
    if req.data_len == 0 || !req.data_len.is_multiple_of(seg_len) {
        return Err(Completion::guest(
            S_IOERR,
            "discard or write-zeroes segments malformed",
            format_args!("{what}: {} bytes", req.data_len),
        ));
    }
    let count = req.data_len / seg_len;
    if count > u64::from(max_seg) {
        return Err(Completion::guest(
            S_IOERR,
            "too many discard or write-zeroes segments",
            format_args!("{what}: {count} > {max_seg}"),
        ));
    }
    let mut buf = [0u8; DWZ_SEGMENT_LEN * MAX_DWZ_SEG];
    let bytes = &mut buf[..req.data_len as usize];
    match gather(mem, req.data.iter().copied(), bytes) {
        Ok(n) if n == bytes.len() => {}
        _ => {
            return Err(Completion::guest(
                S_IOERR,
                "data buffer outside guest memory",
                what,
            ))
        }
    }
    // Validate every segment before touching the disk.
    let mut ranges = [(0u64, 0u64, false); MAX_DWZ_SEG];
    for (i, raw) in bytes.chunks_exact(DWZ_SEGMENT_LEN).enumerate() {
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
        let allowed = if zeroes { FLAG_UNMAP } else { 0 };
        if flags & !allowed != 0 {
            return Err(Completion::guest(
                S_UNSUPP,
                "unsupported discard or write-zeroes flags",
                format_args!("{what}: flags {flags:#x}"),
            ));
        }
        if num > max_sectors {
            return Err(Completion::guest(
                S_IOERR,
                "discard or write-zeroes segment too large",
                format_args!("{what}: {num} sectors > {max_sectors}"),
            ));
        }
        let len = u64::from(num) << SECTOR_SHIFT;
        let offset = disk_range(info, sector, len)?;
        ranges[i] = (offset, len, flags & FLAG_UNMAP != 0);
    }
    for &(offset, len, unmap) in &ranges[..count as usize] {
        let r = if zeroes {
            disk.write_zeroes(offset, len, unmap && info.write_zeroes_may_unmap)
        } else {
            disk.discard(offset, len)
        };
        match r {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => {
                return Err(Completion::host(
                    S_UNSUPP,
                    "discard or write-zeroes unsupported by the host",
                    format_args!("{what}: {e}"),
                ))
            }
            Err(e) => {
                return Err(Completion::host(
                    S_IOERR,
                    "host discard or write-zeroes failed",
                    format_args!("{what} offset {offset}, {len} bytes: {e}"),
                ))
            }
        }
    }
    Ok(Completion::ok(0))
}
