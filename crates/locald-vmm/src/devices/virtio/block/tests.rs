//! Unit tests of virtio-blk without KVM: requests are placed in a
//! `MockSplitQueue` over a `GuestMemoryMmap` and processed with
//! [`process_queue`] (on the test thread), against an in-memory disk, a
//! failing disk, or a real temporary image; one test runs the device's
//! worker thread through `activate`/`reset`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

use super::disk::{BlockBackend, BlockError, DiskFile, SECTOR_SIZE};
use super::request::*;
use super::*;
use crate::config::{CacheMode, DiskConfig};
use crate::devices::virtio::{Activation, Interrupt, VirtioDevice, COMMON_FEATURES};

const W: u16 = VRING_DESC_F_WRITE as u16;
const QSIZE: u16 = 64;
const MEM_SIZE: u64 = 0x100_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// The driver side: writes descriptor chains and buffers into guest memory.
struct Driver<'a> {
    m: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    next_buf: u64,
}

impl<'a> Driver<'a> {
    fn new(m: &'a GuestMemoryMmap) -> Self {
        Driver {
            m,
            vq: MockSplitQueue::new(m, QSIZE),
            next_desc: 0,
            next_buf: 0x10_0000,
        }
    }

    fn queue(&self) -> Queue {
        self.vq.create_queue().unwrap()
    }

    /// A fresh, 512-aligned guest buffer, filled with 0xee.
    fn alloc(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf = (a + u64::from(len)).next_multiple_of(512) + 512;
        assert!(self.next_buf < MEM_SIZE);
        self.m
            .write_slice(&vec![0xee; len as usize], GuestAddress(a))
            .unwrap();
        a
    }

    /// Writes `descs` (addr, len, flags) as one chain and makes it available.
    fn add(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(a, l, f)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (f, 0)
            } else {
                (f | VRING_DESC_F_NEXT as u16, idx + 1)
            };
            self.vq
                .desc_table()
                .store(
                    idx,
                    RawDescriptor::from(SplitDescriptor::new(a, l, flags, next)),
                )
                .unwrap();
        }
        self.next_desc += descs.len() as u16;
        self.publish(head);
        head
    }

    fn publish(&self, head: u16) {
        let ai = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(ai % QSIZE))
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(ai.wrapping_add(1));
    }

    /// Writes an indirect table of `descs` at a fresh buffer and makes a
    /// one-descriptor chain pointing at it available.
    fn add_indirect(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let table = self.alloc((descs.len() * 16) as u32);
        for (i, &(a, l, f)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (f, 0)
            } else {
                (f | VRING_DESC_F_NEXT as u16, i as u16 + 1)
            };
            let d = RawDescriptor::from(SplitDescriptor::new(a, l, flags, next));
            self.m
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        self.add(&[(
            table,
            (descs.len() * 16) as u32,
            VRING_DESC_F_INDIRECT as u16,
        )])
    }

    fn header(&mut self, typ: u32, sector: u64) -> u64 {
        let a = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&typ.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.m.write_slice(&h, GuestAddress(a)).unwrap();
        a
    }

    /// header, one descriptor per entry of `data` (all with `flags`), status.
    fn request(&mut self, typ: u32, sector: u64, data: &[u32], flags: u16) -> Req {
        let hdr = self.header(typ, sector);
        let mut descs = vec![(hdr, 16, 0)];
        let mut addrs = Vec::new();
        for &l in data {
            let a = self.alloc(l);
            descs.push((a, l, flags));
            addrs.push(a);
        }
        let status = self.alloc(1);
        descs.push((status, 1, W));
        let head = self.add(&descs);
        Req {
            head,
            status,
            data: addrs,
        }
    }

    fn used(&self, i: u16) -> (u32, u32) {
        let e = self.vq.used().ring().ref_at(usize::from(i)).unwrap().load();
        (e.id(), e.len())
    }

    fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    fn status(&self, r: &Req) -> u8 {
        self.m.read_obj(GuestAddress(r.status)).unwrap()
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.m.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn put(&self, at: u64, bytes: &[u8]) {
        self.m.write_slice(bytes, GuestAddress(at)).unwrap();
    }

    /// Used ring entry for `r` (asserting it is the `i`th completion).
    fn used_len(&self, i: u16, r: &Req) -> u32 {
        let (id, len) = self.used(i);
        assert_eq!(
            id,
            u32::from(r.head),
            "completion {i} is not request {}",
            r.head
        );
        len
    }
}

struct Req {
    head: u16,
    status: u64,
    data: Vec<u64>,
}

/// An in-memory backend that records what it was asked and can fail.
#[derive(Default)]
struct MemDisk {
    data: Vec<u8>,
    flushes: usize,
    fail: Option<i32>,
    discards: Vec<(u64, u64)>,
    zeroes: Vec<(u64, u64, bool)>,
}

impl MemDisk {
    fn new(sectors: u64) -> Self {
        MemDisk {
            data: pattern(sectors * SECTOR_SIZE),
            ..Default::default()
        }
    }

    fn check(&self) -> io::Result<()> {
        match self.fail {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }
}

impl BlockBackend for MemDisk {
    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.check()?;
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_from(&self.data[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.check()?;
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_to(&mut self.data[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        self.discards.push((offset, len));
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check()?;
        self.zeroes.push((offset, len, may_unmap));
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// Recognisable bytes: each 512-byte sector starts with its number.
fn pattern(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i % 512 < 8 {
                ((i / 512) >> (8 * (i % 512))) as u8
            } else {
                (i.wrapping_mul(31) ^ 0x5a) as u8
            }
        })
        .collect()
}

fn info(capacity: u64) -> DiskInfo {
    DiskInfo {
        capacity,
        read_only: false,
        discard: true,
        write_zeroes: true,
        write_zeroes_may_unmap: true,
        serial: *b"serial-number-123\0\0\0",
    }
}

fn mem_engine(sectors: u64) -> BlockEngine<MemDisk> {
    BlockEngine::new(MemDisk::new(sectors), info(sectors), "virtio-blk test")
}

fn run<D: BlockBackend>(e: &mut BlockEngine<D>, d: &Driver, q: &mut Queue) -> Pass {
    process_queue(e, q, d.m)
}

/// A temporary directory holding one image, removed on drop.
struct TempImage {
    dir: PathBuf,
    path: PathBuf,
}

impl TempImage {
    fn new(tag: &str, len: u64) -> Self {
        Self::with_bytes(tag, &pattern(len))
    }

    fn with_bytes(tag: &str, bytes: &[u8]) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("locald-blk-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{tag}.img"));
        std::fs::write(&path, bytes).unwrap();
        TempImage { dir, path }
    }

    fn config(&self) -> DiskConfig {
        DiskConfig::new(&self.path)
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn file_engine(cfg: &DiskConfig) -> BlockEngine<DiskFile> {
    let f = DiskFile::open(cfg).unwrap();
    let i = disk_info(&f, cfg);
    BlockEngine::new(f, i, "virtio-blk test")
}

fn dwz(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// A DISCARD or WRITE_ZEROES request with the given segments.
fn dwz_request(d: &mut Driver, typ: u32, segs: &[[u8; 16]]) -> Req {
    let r = d.request(typ, 0, &[16 * segs.len() as u32], 0);
    d.put(r.data[0], &segs.concat());
    r
}

// ---------------------------------------------------------------------------
// Reads, writes, flush, GET_ID

#[test]
fn read_fills_guest_buffers_from_the_disk() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(64);
    let r = d.request(T_IN, 3, &[1024], W);
    let mut q = d.queue();
    let pass = run(&mut e, &d, &mut q);
    assert_eq!((pass.completed, pass.notify, pass.broken), (1, true, false));
    assert_eq!(d.status(&r), S_OK);
    assert_eq!(d.used_len(0, &r), 1024 + 1);
    assert_eq!(
        d.bytes(r.data[0], 1024),
        pattern(64 * 512)[3 * 512..5 * 512]
    );
}

#[test]
fn write_stores_guest_buffers() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(64);
    let r = d.request(T_OUT, 10, &[512, 1024], 0);
    d.put(r.data[0], &[1; 512]);
    d.put(r.data[1], &[2; 1024]);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_OK);
    assert_eq!(d.used_len(0, &r), 1);
    let disk = &e.disk().data;
    assert!(disk[10 * 512..11 * 512].iter().all(|&b| b == 1));
    assert!(disk[11 * 512..13 * 512].iter().all(|&b| b == 2));
    assert_eq!(disk[13 * 512..], pattern(64 * 512)[13 * 512..]);
}

#[test]
fn read_and_write_round_trip_through_a_real_image() {
    let img = TempImage::new("rw", 128 * 512);
    let cfg = img.config();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = file_engine(&cfg);
    let w = d.request(T_OUT, 100, &[512, 4096], 0);
    d.put(w.data[0], &[0xa1; 512]);
    d.put(w.data[1], &[0xb2; 4096]);
    let r = d.request(T_IN, 99, &[3 * 512, 512 * 8], W);
    let mut q = d.queue();
    let pass = run(&mut e, &d, &mut q);
    assert_eq!(pass.completed, 2);
    assert_eq!((d.status(&w), d.status(&r)), (S_OK, S_OK));
    assert_eq!(d.used_len(1, &r), 11 * 512 + 1);
    let got = [d.bytes(r.data[0], 3 * 512), d.bytes(r.data[1], 8 * 512)].concat();
    let mut want = pattern(128 * 512)[99 * 512..110 * 512].to_vec();
    want[512..1024].fill(0xa1);
    want[1024..1024 + 4096].fill(0xb2);
    assert_eq!(got, want);
    // The host file has the data (page cache, seen through a fresh fd).
    assert_eq!(img.contents()[100 * 512..101 * 512], [0xa1; 512]);
}

#[test]
fn header_data_and_status_may_share_descriptors() {
    // One readable descriptor with header + data; for a read, one writable
    // descriptor with data + status.
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let w = d.alloc(16 + 512);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&2u64.to_le_bytes());
    d.put(w, &h);
    d.put(w + 16, &[7; 512]);
    let ws = d.alloc(1);
    let wreq = Req {
        head: d.add(&[(w, 16 + 512, 0), (ws, 1, W)]),
        status: ws,
        data: vec![],
    };
    let hdr = d.header(T_IN, 2);
    let buf = d.alloc(513);
    let rreq = Req {
        head: d.add(&[(hdr, 16, 0), (buf, 513, W)]),
        status: buf + 512,
        data: vec![buf],
    };
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&wreq), S_OK);
    assert_eq!(d.status(&rreq), S_OK);
    assert_eq!(d.used_len(1, &rreq), 513);
    assert_eq!(d.bytes(buf, 512), vec![7; 512]);
}

#[test]
fn header_split_across_descriptors_is_accepted() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let hdr = d.header(T_IN, 1);
    let buf = d.alloc(512);
    let st = d.alloc(1);
    let r = Req {
        head: d.add(&[(hdr, 4, 0), (hdr + 4, 12, 0), (buf, 512, W), (st, 1, W)]),
        status: st,
        data: vec![buf],
    };
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_OK);
    assert_eq!(d.bytes(buf, 512), pattern(16 * 512)[512..1024]);
}

#[test]
fn flush_reaches_the_backend() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(8);
    let r = d.request(T_FLUSH, 0, &[], 0);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_OK);
    assert_eq!(d.used_len(0, &r), 1);
    assert_eq!(e.disk().flushes, 1);
}

#[test]
fn flush_makes_writes_visible_through_a_fresh_descriptor() {
    for cache in [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Unsafe,
    ] {
        let img = TempImage::new("flush", 16 * 512);
        let mut cfg = img.config();
        cfg.cache = cache;
        let m = mem();
        let mut d = Driver::new(&m);
        let mut e = file_engine(&cfg);
        let w = d.request(T_OUT, 4, &[512], 0);
        d.put(w.data[0], &[0x42; 512]);
        let f = d.request(T_FLUSH, 0, &[], 0);
        let mut q = d.queue();
        run(&mut e, &d, &mut q);
        assert_eq!((d.status(&w), d.status(&f)), (S_OK, S_OK), "{cache:?}");
        let fresh = std::fs::read(&img.path).unwrap();
        assert_eq!(fresh[4 * 512..5 * 512], [0x42; 512], "{cache:?}");
    }
}

#[test]
fn flush_failure_is_ioerr() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(8);
    e.disk_mut().fail = Some(libc::EIO);
    let r = d.request(T_FLUSH, 0, &[], 0);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_IOERR);
    assert!(e.warned().seen("flush failed"));
}

#[test]
fn get_id_returns_the_serial() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(8);
    let r = d.request(T_GET_ID, 0, &[20], W);
    // A short buffer gets what fits; a long one gets 20 bytes.
    let short = d.request(T_GET_ID, 0, &[5], W);
    let long = d.request(T_GET_ID, 0, &[64], W);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_OK);
    assert_eq!(d.used_len(0, &r), 21);
    assert_eq!(d.bytes(r.data[0], 20), b"serial-number-123\0\0\0");
    assert_eq!(d.used_len(1, &short), 6);
    assert_eq!(d.bytes(short.data[0], 5), b"seria");
    assert_eq!(d.used_len(2, &long), 21);
    assert_eq!(d.bytes(long.data[0] + 20, 4), [0xee; 4]);
}

#[test]
fn serial_is_the_id_or_the_file_name() {
    let mut cfg = DiskConfig::new("/images/a-rather-long-image-name.img");
    assert_eq!(&disk_serial(&cfg), b"a-rather-long-image-");
    cfg.id = Some("data".into());
    assert_eq!(&disk_serial(&cfg), b"data\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    cfg.id = Some("x".repeat(30));
    assert_eq!(disk_serial(&cfg), [b'x'; 20]);
}

// ---------------------------------------------------------------------------
// DISCARD and WRITE_ZEROES

#[test]
fn discard_punches_holes_in_a_real_image() {
    let img = TempImage::new("discard", 256 * 512);
    let cfg = img.config();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = file_engine(&cfg);
    if !e.info().discard {
        crate::test_support::skip(crate::test_support::Why::HostLacks(
            "hole punching in the temp dir's file system",
        ));
        return;
    }
    let r = dwz_request(&mut d, T_DISCARD, &[dwz(8, 16, 0), dwz(100, 8, 0)]);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_OK);
    let got = img.contents();
    let want = pattern(256 * 512);
    assert_eq!(got.len(), want.len(), "size kept");
    assert!(got[8 * 512..24 * 512].iter().all(|&b| b == 0));
    assert!(got[100 * 512..108 * 512].iter().all(|&b| b == 0));
    assert_eq!(got[..8 * 512], want[..8 * 512]);
    assert_eq!(got[24 * 512..100 * 512], want[24 * 512..100 * 512]);
    assert_eq!(got[108 * 512..], want[108 * 512..]);
}

#[test]
fn write_zeroes_zeroes_a_real_image_with_and_without_unmap() {
    let img = TempImage::new("wz", 256 * 512);
    let cfg = img.config();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = file_engine(&cfg);
    assert!(e.info().write_zeroes);
    let a = dwz_request(&mut d, T_WRITE_ZEROES, &[dwz(1, 3, 0)]);
    let b = dwz_request(
        &mut d,
        T_WRITE_ZEROES,
        &[dwz(50, 20, FLAG_UNMAP), dwz(200, 56, 0)],
    );
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!((d.status(&a), d.status(&b)), (S_OK, S_OK));
    let got = img.contents();
    let want = pattern(256 * 512);
    assert_eq!(got.len(), want.len());
    for (lo, hi) in [(1, 4), (50, 70), (200, 256)] {
        assert!(
            got[lo * 512..hi * 512].iter().all(|&x| x == 0),
            "{lo}..{hi}"
        );
    }
    assert_eq!(got[..512], want[..512]);
    assert_eq!(got[4 * 512..50 * 512], want[4 * 512..50 * 512]);
    assert_eq!(got[70 * 512..200 * 512], want[70 * 512..200 * 512]);
}

#[test]
fn write_zeroes_passes_unmap_only_when_allowed() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(64);
    dwz_request(
        &mut d,
        T_WRITE_ZEROES,
        &[dwz(0, 1, FLAG_UNMAP), dwz(1, 1, 0)],
    );
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    e.info_mut().write_zeroes_may_unmap = false;
    dwz_request(&mut d, T_WRITE_ZEROES, &[dwz(2, 1, FLAG_UNMAP)]);
    run(&mut e, &d, &mut q);
    assert_eq!(
        e.disk().zeroes,
        [(0, 512, true), (512, 512, false), (1024, 512, false)]
    );
}

#[test]
fn discard_and_write_zeroes_are_validated() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(64);
    let cases = [
        // Unmap is not a DISCARD flag; unknown flags are unsupported.
        (
            dwz_request(&mut d, T_DISCARD, &[dwz(0, 1, FLAG_UNMAP)]),
            S_UNSUPP,
        ),
        (
            dwz_request(&mut d, T_WRITE_ZEROES, &[dwz(0, 1, 2)]),
            S_UNSUPP,
        ),
        // Past the end, or wrapping.
        (dwz_request(&mut d, T_DISCARD, &[dwz(60, 8, 0)]), S_IOERR),
        (
            dwz_request(&mut d, T_WRITE_ZEROES, &[dwz(u64::MAX, 1, 0)]),
            S_IOERR,
        ),
        // Too many sectors in a segment, too many segments.
        (
            dwz_request(
                &mut d,
                T_WRITE_ZEROES,
                &[dwz(0, MAX_WRITE_ZEROES_SECTORS + 1, 0)],
            ),
            S_IOERR,
        ),
        (
            dwz_request(
                &mut d,
                T_DISCARD,
                &vec![dwz(0, 1, 0); MAX_DISCARD_SEG as usize + 1],
            ),
            S_IOERR,
        ),
        // One valid segment and one invalid: nothing is done.
        (
            dwz_request(&mut d, T_DISCARD, &[dwz(0, 1, 0), dwz(64, 1, 0)]),
            S_IOERR,
        ),
        // The largest valid request.
        (
            dwz_request(
                &mut d,
                T_DISCARD,
                &vec![dwz(0, 64, 0); MAX_DISCARD_SEG as usize],
            ),
            S_OK,
        ),
    ];
    // Segment data not a multiple of 16 bytes.
    let odd = d.request(T_DISCARD, 0, &[20], 0);
    d.put(odd.data[0], &dwz(0, 1, 0));
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    for (i, (r, want)) in cases.iter().enumerate() {
        assert_eq!(d.status(r), *want, "case {i}");
    }
    assert_eq!(d.status(&odd), S_IOERR);
    assert_eq!(e.disk().discards.len(), MAX_DISCARD_SEG as usize);
    assert!(e.disk().zeroes.is_empty());
}

#[test]
fn discard_not_offered_or_unsupported_by_the_host_is_unsupp() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(64);
    e.info_mut().discard = false;
    let a = dwz_request(&mut d, T_DISCARD, &[dwz(0, 1, 0)]);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&a), S_UNSUPP);
    e.info_mut().discard = true;
    e.disk_mut().fail = Some(libc::EOPNOTSUPP);
    let b = dwz_request(&mut d, T_DISCARD, &[dwz(0, 1, 0)]);
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&b), S_UNSUPP);
    e.disk_mut().fail = Some(libc::EIO);
    let c = dwz_request(&mut d, T_WRITE_ZEROES, &[dwz(0, 1, 0)]);
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&c), S_IOERR);
}

// ---------------------------------------------------------------------------
// Read-only disks

#[test]
fn read_only_disk_rejects_writes() {
    let img = TempImage::new("ro", 32 * 512);
    let mut cfg = img.config();
    cfg.read_only = true;
    let blk = Block::new(&cfg, "vdr").unwrap();
    let f = blk.features();
    assert_ne!(f & feature::RO, 0);
    assert_eq!(f & (feature::DISCARD | feature::WRITE_ZEROES), 0);
    drop(blk);

    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = file_engine(&cfg);
    let w = d.request(T_OUT, 0, &[512], 0);
    d.put(w.data[0], &[9; 512]);
    let disc = dwz_request(&mut d, T_DISCARD, &[dwz(0, 1, 0)]);
    let wz = dwz_request(&mut d, T_WRITE_ZEROES, &[dwz(0, 1, 0)]);
    let r = d.request(T_IN, 0, &[512], W);
    let f = d.request(T_FLUSH, 0, &[], 0);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&w), S_IOERR);
    assert_eq!(d.status(&disc), S_IOERR);
    assert_eq!(d.status(&wz), S_IOERR);
    assert_eq!(d.status(&r), S_OK);
    assert_eq!(d.status(&f), S_OK);
    assert_eq!(img.contents(), pattern(32 * 512));
    assert!(e.warned().seen("write to a read-only disk"));
}

// ---------------------------------------------------------------------------
// Hostile requests

#[test]
fn requests_past_the_end_fail() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let at_end = d.request(T_IN, 16, &[512], W);
    let straddle = d.request(T_OUT, 15, &[1024], 0);
    let last = d.request(T_IN, 15, &[512], W);
    let empty_at_end = d.request(T_IN, 16, &[], W);
    let empty_past_end = d.request(T_IN, 17, &[], W);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&at_end), S_IOERR);
    assert_eq!(d.used_len(0, &at_end), 1);
    assert_eq!(d.bytes(at_end.data[0], 512), [0xee; 512], "nothing written");
    assert_eq!(d.status(&straddle), S_IOERR);
    assert_eq!(d.status(&last), S_OK);
    assert_eq!(d.status(&empty_at_end), S_OK);
    assert_eq!(d.status(&empty_past_end), S_IOERR);
    assert_eq!(e.disk().data, pattern(16 * 512), "disk untouched");
    assert!(e.warned().seen("request beyond the end of the disk"));
}

#[test]
fn sector_overflow_fails() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let reqs = [
        d.request(T_IN, u64::MAX, &[512], W),
        d.request(T_OUT, u64::MAX / 512, &[512], 0),
        d.request(T_IN, (u64::MAX / 512) + 1, &[512], W),
        d.request(T_OUT, 1 << 55, &[1024], 0),
    ];
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    for r in &reqs {
        assert_eq!(d.status(r), S_IOERR);
    }
}

#[test]
fn data_length_must_be_whole_sectors() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let r = d.request(T_IN, 0, &[100], W);
    let w = d.request(T_OUT, 0, &[512, 1], 0);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!((d.status(&r), d.status(&w)), (S_IOERR, S_IOERR));
    assert!(e.warned().seen("data length not a multiple of 512"));
}

#[test]
fn data_outside_guest_memory_fails() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let cases = [
        (T_IN, MEM_SIZE, W),
        (T_OUT, MEM_SIZE - 256, 0),
        (T_IN, u64::MAX - 100, W),
        (T_GET_ID, MEM_SIZE + 4096, W),
    ];
    let mut reqs = Vec::new();
    for (typ, addr, flags) in cases {
        let hdr = d.header(typ, 0);
        let st = d.alloc(1);
        let len = if typ == T_GET_ID { 20 } else { 512 };
        reqs.push(Req {
            head: d.add(&[(hdr, 16, 0), (addr, len, flags), (st, 1, W)]),
            status: st,
            data: vec![],
        });
    }
    let mut q = d.queue();
    let pass = run(&mut e, &d, &mut q);
    assert_eq!(pass.completed, cases.len());
    for r in &reqs {
        assert_eq!(d.status(r), S_IOERR);
    }
    assert!(e.warned().seen("data buffer outside guest memory"));
}

#[test]
fn header_outside_memory_or_too_short_fails() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let st1 = d.alloc(1);
    let st2 = d.alloc(1);
    let st3 = d.alloc(1);
    let hdr = d.header(T_IN, 0);
    let outside = Req {
        head: d.add(&[(MEM_SIZE - 8, 16, 0), (st1, 1, W)]),
        status: st1,
        data: vec![],
    };
    let short = Req {
        head: d.add(&[(hdr, 8, 0), (st2, 1, W)]),
        status: st2,
        data: vec![],
    };
    let none = Req {
        head: d.add(&[(st3, 1, W)]),
        status: st3,
        data: vec![],
    };
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&outside), S_IOERR);
    assert_eq!(d.status(&short), S_IOERR);
    assert_eq!(d.status(&none), S_IOERR);
    assert_eq!(d.used_len(2, &none), 1);
    assert!(e.warned().seen("request header outside guest memory"));
    assert!(e.warned().seen("request header shorter than 16 bytes"));
}

#[test]
fn unknown_request_type_is_unsupp() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let r = d.request(99, 0, &[512], W);
    let lifetime = d.request(10, 0, &[8], W);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_UNSUPP);
    assert_eq!(d.status(&lifetime), S_UNSUPP);
    assert_eq!(d.used_len(0, &r), 1);
}

#[test]
fn wrong_direction_data_fails() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    // IN with device-readable data, OUT with device-writable data.
    let r = d.request(T_IN, 0, &[512], 0);
    let w = d.request(T_OUT, 0, &[512], W);
    // Readable after writable.
    let hdr = d.header(T_OUT, 0);
    let a = d.alloc(512);
    let b = d.alloc(512);
    let st = d.alloc(1);
    let mixed = Req {
        head: d.add(&[(hdr, 16, 0), (a, 512, W), (b, 512, 0), (st, 1, W)]),
        status: st,
        data: vec![],
    };
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_IOERR);
    assert_eq!(d.status(&w), S_IOERR);
    assert_eq!(d.status(&mixed), S_IOERR);
    assert_eq!(e.disk().data, pattern(16 * 512));
    assert!(e
        .warned()
        .seen("device-readable data buffer in a read request"));
    assert!(e
        .warned()
        .seen("device-writable data buffer in a write request"));
    assert!(e
        .warned()
        .seen("device-readable descriptor after a device-writable one"));
}

#[test]
fn zero_length_descriptors_carry_nothing() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let hdr = d.header(T_IN, 2);
    let a = d.alloc(512);
    let st = d.alloc(1);
    // A zero-length descriptor in the data is skipped (whatever its
    // direction: it carries no bytes).
    let ok = Req {
        head: d.add(&[
            (hdr, 16, 0),
            (0, 0, 0),
            (a, 512, W),
            (MEM_SIZE * 4, 0, W),
            (st, 1, W),
        ]),
        status: st,
        data: vec![a],
    };
    // A zero-length status descriptor: nowhere to put the status.
    let hdr2 = d.header(T_IN, 2);
    let b = d.alloc(512);
    let no_status = d.add(&[(hdr2, 16, 0), (b, 512, W), (0x10, 0, W)]);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&ok), S_OK);
    assert_eq!(d.bytes(a, 512), pattern(16 * 512)[1024..1536]);
    assert_eq!(d.used(1), (u32::from(no_status), 0));
    assert_eq!(d.bytes(b, 512), [0xee; 512], "not executed");
}

#[test]
fn chain_without_a_writable_status_is_completed_empty() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let hdr = d.header(T_OUT, 0);
    let a = d.alloc(512);
    let h1 = d.add(&[(hdr, 16, 0), (a, 512, 0)]);
    // Status byte outside guest memory.
    let hdr2 = d.header(T_OUT, 0);
    let h2 = d.add(&[(hdr2, 16, 0), (a, 512, 0), (MEM_SIZE, 1, W)]);
    // Status byte address that wraps.
    let h3 = d.add(&[(hdr2, 16, 0), (u64::MAX, 2, W)]);
    let mut q = d.queue();
    let pass = run(&mut e, &d, &mut q);
    assert_eq!(pass.completed, 3);
    assert_eq!(d.used(0), (u32::from(h1), 0));
    assert_eq!(d.used(1), (u32::from(h2), 0));
    assert_eq!(d.used(2), (u32::from(h3), 0));
    assert_eq!(e.disk().data, pattern(16 * 512), "nothing written");
    assert!(e
        .warned()
        .seen("last descriptor is not a device-writable status byte"));
    assert!(e.warned().seen("status byte outside guest memory"));
}

#[test]
fn too_many_descriptors_fail_with_ioerr() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(1024);
    let hdr = d.header(T_IN, 0);
    let st = d.alloc(1);
    let buf = d.alloc(512 * (SEG_MAX + 1));
    let mut descs = vec![(hdr, 16, 0)];
    for i in 0..=SEG_MAX {
        descs.push((buf + 512 * u64::from(i), 512, W));
    }
    descs.push((st, 1, W));
    // SEG_MAX + 1 data descriptors: one too many (through an indirect
    // table: the ring itself only has QSIZE entries).
    let too_long = Req {
        head: d.add_indirect(&descs),
        status: st,
        data: vec![],
    };
    // Exactly SEG_MAX is fine.
    let st2 = d.alloc(1);
    descs.remove(1);
    *descs.last_mut().unwrap() = (st2, 1, W);
    let max = Req {
        head: d.add_indirect(&descs),
        status: st2,
        data: vec![],
    };
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&too_long), S_IOERR);
    assert_eq!(d.used_len(0, &too_long), 1);
    assert_eq!(d.status(&max), S_OK);
    assert_eq!(d.used_len(1, &max), 512 * SEG_MAX + 1);
    assert!(e.warned().seen("too many descriptors in one request"));
}

#[test]
fn indirect_chains_work() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(64);
    let hdr = d.header(T_IN, 5);
    let a = d.alloc(512);
    let b = d.alloc(1024);
    let st = d.alloc(1);
    let r = Req {
        head: d.add_indirect(&[(hdr, 16, 0), (a, 512, W), (b, 1024, W), (st, 1, W)]),
        status: st,
        data: vec![a, b],
    };
    let hdr = d.header(T_OUT, 40);
    let c = d.alloc(512);
    d.put(c, &[0x77; 512]);
    let st = d.alloc(1);
    let w = Req {
        head: d.add_indirect(&[(hdr, 16, 0), (c, 512, 0), (st, 1, W)]),
        status: st,
        data: vec![c],
    };
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!((d.status(&r), d.status(&w)), (S_OK, S_OK));
    assert_eq!(d.used_len(0, &r), 1536 + 1);
    let want = pattern(64 * 512);
    assert_eq!(d.bytes(a, 512), want[5 * 512..6 * 512]);
    assert_eq!(d.bytes(b, 1024), want[6 * 512..8 * 512]);
    assert_eq!(e.disk().data[40 * 512..41 * 512], [0x77; 512]);
}

#[test]
fn broken_chains_are_completed_empty() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let hdr = d.header(T_IN, 0);
    let st = d.alloc(1);
    // A descriptor whose "next" is itself: the chain loops.
    let head = d.next_desc;
    d.vq.desc_table()
        .store(
            head,
            RawDescriptor::from(SplitDescriptor::new(
                hdr,
                16,
                VRING_DESC_F_NEXT as u16,
                head,
            )),
        )
        .unwrap();
    d.next_desc += 1;
    d.publish(head);
    // "next" past the end of the table.
    let h2 = d.add(&[(hdr, 16, VRING_DESC_F_NEXT as u16)]);
    d.vq.desc_table()
        .store(
            h2,
            RawDescriptor::from(SplitDescriptor::new(
                hdr,
                16,
                VRING_DESC_F_NEXT as u16,
                QSIZE + 3,
            )),
        )
        .unwrap();
    // An indirect table whose length is not a multiple of 16, and an
    // indirect descriptor inside an indirect table.
    let h3 = d.add(&[(hdr, 24, VRING_DESC_F_INDIRECT as u16)]);
    let table = d.alloc(32);
    d.put(
        table,
        RawDescriptor::from(SplitDescriptor::new(
            hdr,
            16,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))
        .as_slice(),
    );
    let h4 = d.add(&[(table, 16, VRING_DESC_F_INDIRECT as u16)]);
    // A valid request afterwards still works.
    let ok = d.request(T_IN, 1, &[512], W);
    let mut q = d.queue();
    let pass = run(&mut e, &d, &mut q);
    assert!(!pass.broken);
    assert_eq!(pass.completed, 5);
    for (i, h) in [head, h2, h3, h4].into_iter().enumerate() {
        assert_eq!(d.used(i as u16), (u32::from(h), 0), "chain {i}");
    }
    assert_eq!(d.status(&ok), S_OK);
    assert_eq!(d.bytes(st, 1), [0xee]);
}

#[test]
fn multi_region_buffers_use_vectored_io() {
    // Two adjacent memory regions: a buffer across the boundary becomes
    // two slices (preadv/pwritev).
    let m = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x20_0000),
        (GuestAddress(0x20_0000), 0x20_0000),
    ])
    .unwrap();
    let img = TempImage::new("regions", 64 * 512);
    let cfg = img.config();
    let mut d = Driver::new(&m);
    let mut e = file_engine(&cfg);
    let boundary = 0x20_0000u64;
    let hdr = d.header(T_OUT, 2);
    let st = d.alloc(1);
    m.write_slice(&[0x31; 4096], GuestAddress(boundary - 1024))
        .unwrap();
    let w = Req {
        head: d.add(&[(hdr, 16, 0), (boundary - 1024, 4096, 0), (st, 1, W)]),
        status: st,
        data: vec![],
    };
    let hdr = d.header(T_IN, 1);
    let st = d.alloc(1);
    let r = Req {
        head: d.add(&[(hdr, 16, 0), (boundary - 512 * 3, 512 * 10, W), (st, 1, W)]),
        status: st,
        data: vec![],
    };
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!((d.status(&w), d.status(&r)), (S_OK, S_OK));
    let mut want = pattern(64 * 512)[512..11 * 512].to_vec();
    want[512..512 + 4096].fill(0x31);
    let mut got = vec![0u8; 512 * 10];
    m.read_slice(&mut got, GuestAddress(boundary - 512 * 3))
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn many_segments_round_trip() {
    // More data descriptors than one preadv call takes.
    let img = TempImage::new("segs", 2048 * 512);
    let cfg = img.config();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = file_engine(&cfg);
    let n = SEG_MAX;
    let hdr = d.header(T_OUT, 7);
    let st = d.alloc(1);
    let mut descs = vec![(hdr, 16, 0)];
    let mut expected = Vec::new();
    for i in 0..n {
        let len = if i % 3 == 0 { 1024 } else { 512 };
        let a = d.alloc(len);
        let fill = vec![(i % 251) as u8; len as usize];
        d.put(a, &fill);
        expected.extend_from_slice(&fill);
        descs.push((a, len, 0));
    }
    descs.push((st, 1, W));
    let w = Req {
        head: d.add_indirect(&descs),
        status: st,
        data: vec![],
    };
    // Read it back into one big buffer.
    let r = d.request(T_IN, 7, &[expected.len() as u32], W);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!((d.status(&w), d.status(&r)), (S_OK, S_OK));
    assert_eq!(d.bytes(r.data[0], expected.len()), expected);
    let file = img.contents();
    assert_eq!(file[7 * 512..7 * 512 + expected.len()], expected[..]);
}

#[test]
fn host_io_errors_become_ioerr() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    e.disk_mut().fail = Some(libc::EIO);
    let r = d.request(T_IN, 0, &[512], W);
    let w = d.request(T_OUT, 0, &[512], 0);
    let mut q = d.queue();
    let pass = run(&mut e, &d, &mut q);
    assert!(!pass.broken);
    assert_eq!((d.status(&r), d.status(&w)), (S_IOERR, S_IOERR));
    assert_eq!(d.used_len(0, &r), 1);
    assert!(e.warned().seen("host read failed"));
    assert!(e.warned().seen("host write failed"));
}

#[test]
fn each_cause_is_logged_once() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    for _ in 0..5 {
        d.request(77, 0, &[], 0);
    }
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert!(e.warned().seen("unsupported request type"));
    let mut w = Warned::default();
    assert!(w.warn("x", "unsupported request type", 0));
    // The engine's record says logged; logging again is refused.
    assert!(!e.warned.warn("x", "unsupported request type", 0));
}

// ---------------------------------------------------------------------------
// Queue handling

#[test]
fn broken_avail_index_breaks_the_queue() {
    let m = mem();
    let d = Driver::new(&m);
    let mut e = mem_engine(16);
    let mut q = d.queue();
    d.vq.avail().idx().store(1000);
    let pass = run(&mut e, &d, &mut q);
    assert!(pass.broken);
    assert_eq!(pass.completed, 0);
    assert!(e.warned().seen("queue unusable"));
}

#[test]
fn head_index_out_of_range_breaks_the_queue() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let ok = d.request(T_FLUSH, 0, &[], 0);
    d.publish(QSIZE + 5);
    let mut q = d.queue();
    let pass = run(&mut e, &d, &mut q);
    assert!(pass.broken);
    assert_eq!(pass.completed, 1);
    assert!(pass.notify, "the completed request is still signalled");
    assert_eq!(d.status(&ok), S_OK);
}

#[test]
fn queue_not_ready_is_left_alone() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    d.request(T_FLUSH, 0, &[], 0);
    let mut q = d.queue();
    q.set_ready(false);
    assert_eq!(run(&mut e, &d, &mut q), Pass::default());
    assert_eq!(e.disk().flushes, 0);
}

#[test]
fn event_idx_suppresses_notifications() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let mut q = d.queue();
    q.set_event_idx(true);
    let used_event = d.vq.avail_addr().unchecked_add(4 + 2 * u64::from(QSIZE));
    let avail_event = d.vq.used_addr().unchecked_add(4 + 8 * u64::from(QSIZE));
    // The driver wants an interrupt after the 3rd completion (used_event 2).
    m.write_obj(2u16, used_event).unwrap();
    d.request(T_FLUSH, 0, &[], 0);
    let p1 = run(&mut e, &d, &mut q);
    assert_eq!((p1.completed, p1.notify), (1, false));
    // The device asked to be kicked at the next avail index.
    assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 1);
    d.request(T_FLUSH, 0, &[], 0);
    d.request(T_FLUSH, 0, &[], 0);
    let p2 = run(&mut e, &d, &mut q);
    assert_eq!((p2.completed, p2.notify), (2, true));
    assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 3);
    // Nothing new: no work, no interrupt.
    let p3 = run(&mut e, &d, &mut q);
    assert_eq!((p3.completed, p3.notify), (0, false));
    // Without EVENT_IDX every pass with completions notifies.
    q.set_event_idx(false);
    d.request(T_FLUSH, 0, &[], 0);
    assert!(run(&mut e, &d, &mut q).notify);
    assert_eq!(d.used_idx(), 4);
}

// ---------------------------------------------------------------------------
// Opening images

#[test]
fn image_size_not_a_multiple_of_512_hides_the_tail() {
    let img = TempImage::with_bytes("tail", &pattern(1000));
    let cfg = img.config();
    let f = DiskFile::open(&cfg).unwrap();
    assert_eq!(f.size(), 1000);
    assert_eq!(f.capacity_sectors(), 1);
    drop(f);
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = file_engine(&cfg);
    let ok = d.request(T_IN, 0, &[512], W);
    let tail = d.request(T_IN, 1, &[512], W);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!((d.status(&ok), d.status(&tail)), (S_OK, S_IOERR));
    assert_eq!(d.bytes(ok.data[0], 512), pattern(512));
}

#[test]
fn tiny_missing_and_odd_images_are_refused() {
    let img = TempImage::with_bytes("tiny", &[1; 511]);
    let e = DiskFile::open(&img.config()).unwrap_err();
    assert!(matches!(e, BlockError::TooSmall { size: 511, .. }), "{e}");
    assert!(e.to_string().contains("tiny.img"), "{e}");
    let missing = DiskConfig::new(img.dir.join("missing.img"));
    let e = DiskFile::open(&missing).unwrap_err();
    assert!(matches!(e, BlockError::Open { .. }));
    assert!(e.to_string().contains("missing.img"), "{e}");
    let e = DiskFile::open(&DiskConfig::new(&img.dir)).unwrap_err();
    assert!(e.to_string().contains(img.dir.to_str().unwrap()), "{e}");
}

#[test]
fn writable_images_are_locked_against_a_second_open() {
    let img = TempImage::new("lock", 8 * 512);
    let cfg = img.config();
    let mut ro = cfg.clone();
    ro.read_only = true;
    let first = DiskFile::open(&cfg).unwrap();
    for other in [&cfg, &ro] {
        let e = DiskFile::open(other).unwrap_err();
        assert!(matches!(e, BlockError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("in use by another VM"), "{e}");
        assert!(e.to_string().contains("lock.img"), "{e}");
    }
    drop(first);
    // Read-only opens share; a writer is kept out while they last.
    let r1 = DiskFile::open(&ro).unwrap();
    let r2 = DiskFile::open(&ro).unwrap();
    assert!(matches!(
        DiskFile::open(&cfg),
        Err(BlockError::Locked { .. })
    ));
    drop((r1, r2));
    DiskFile::open(&cfg).unwrap();
}

#[test]
fn reads_past_end_of_file_are_zero_filled() {
    // The file shrinks under us (another process truncates it): reads
    // beyond the new end see zeroes rather than stale guest memory.
    let img = TempImage::new("shrink", 16 * 512);
    let cfg = img.config();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = file_engine(&cfg);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .unwrap()
        .set_len(8 * 512 + 100)
        .unwrap();
    let r = d.request(T_IN, 7, &[512, 1024], W);
    let mut q = d.queue();
    run(&mut e, &d, &mut q);
    assert_eq!(d.status(&r), S_OK);
    let want = pattern(16 * 512);
    assert_eq!(d.bytes(r.data[0], 512), want[7 * 512..8 * 512]);
    let mut tail = want[8 * 512..8 * 512 + 100].to_vec();
    tail.resize(1024, 0);
    assert_eq!(d.bytes(r.data[1], 1024), tail);
}

// ---------------------------------------------------------------------------
// The device

#[test]
fn config_space_and_features() {
    let img = TempImage::new("cfg", 100 * 512 + 7);
    let blk = Block::new(&img.config(), "vdc").unwrap();
    assert_eq!(blk.device_type(), device_type::BLOCK);
    assert_eq!(blk.queue_max_sizes(), &[QUEUE_SIZE]);
    let f = blk.features();
    for bit in [
        feature::SEG_MAX,
        feature::BLK_SIZE,
        feature::FLUSH,
        feature::WRITE_ZEROES,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x}");
    }
    assert_eq!(f & COMMON_FEATURES, COMMON_FEATURES);
    assert_eq!(f & feature::RO, 0);
    let rd = |off: u64, n: usize| {
        let mut b = vec![0u8; n];
        blk.read_config(off, &mut b);
        b
    };
    let u32at = |off| u32::from_le_bytes(rd(off, 4).try_into().unwrap());
    assert_eq!(rd(0, 8), 100u64.to_le_bytes());
    assert_eq!(u32at(12), SEG_MAX);
    assert_eq!(u32at(20), 512);
    assert_eq!(rd(32, 1), [1], "writeback");
    assert_eq!(u32at(48), MAX_WRITE_ZEROES_SECTORS);
    assert_eq!(u32at(52), MAX_WRITE_ZEROES_SEG);
    let discard = f & feature::DISCARD != 0;
    assert_eq!(discard, blk.info.discard);
    if discard {
        assert_eq!(u32at(36), MAX_DISCARD_SECTORS);
        assert_eq!(u32at(40), MAX_DISCARD_SEG);
        assert_eq!(u32at(44), DISCARD_SECTOR_ALIGNMENT);
        assert_eq!(rd(56, 1), [1]);
    }
    // Partial and out-of-range reads.
    assert_eq!(rd(1, 2), [0, 0]);
    assert_eq!(rd(0, 1), [100]);
    assert_eq!(rd(CONFIG_LEN as u64, 4), [0; 4]);
    assert_eq!(blk.capacity_sectors(), 100);
}

fn wait_for_irq(irq: &EventFd) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while irq.read().is_err() {
        assert!(Instant::now() < deadline, "no interrupt from the worker");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn device_worker_processes_requests_and_reset_keeps_the_image() {
    let img = TempImage::new("dev", 64 * 512);
    let cfg = img.config();
    let mut blk = Block::new(&cfg, "vdq").unwrap();
    let m = mem();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    let qevt = EventFd::new(libc::EFD_NONBLOCK).unwrap();

    let activate = |blk: &mut Block, q: Queue| {
        blk.activate(Activation {
            mem: m.clone(),
            queues: vec![q],
            queue_events: vec![qevt.try_clone().unwrap()],
            interrupt: interrupt.clone(),
            features: blk.features(),
            restored: false,
        })
        .unwrap();
    };

    // Wrong queue count.
    let err = blk.activate(Activation {
        mem: m.clone(),
        queues: vec![],
        queue_events: vec![],
        interrupt: interrupt.clone(),
        features: 0,
        restored: false,
    });
    assert!(err.is_err());

    let mut d = Driver::new(&m);
    let r = d.request(T_IN, 2, &[512], W);
    activate(&mut blk, d.queue());
    assert!(blk.is_active());
    qevt.write(1).unwrap();
    wait_for_irq(&irq);
    assert!(thread_names().iter().any(|n| n == "virtio-blk vdq"));
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.status(&r), S_OK);
    assert_eq!(d.bytes(r.data[0], 512), pattern(64 * 512)[1024..1536]);
    assert_eq!(
        interrupt.status() & crate::devices::virtio::INT_USED_RING,
        1
    );

    blk.reset();
    assert!(!blk.is_active());
    // The image stays open (and locked) across the reset.
    assert!(matches!(
        DiskFile::open(&cfg),
        Err(BlockError::Locked { .. })
    ));

    // Re-activate on a fresh ring; a broken ring then asks for a reset.
    interrupt.clear();
    let m2 = &m;
    let mut d2 = Driver::new(m2);
    d2.next_buf = 0x80_0000;
    let w = d2.request(T_OUT, 0, &[512], 0);
    d2.put(w.data[0], &[0x5e; 512]);
    activate(&mut blk, d2.queue());
    qevt.write(1).unwrap();
    wait_for_irq(&irq);
    assert_eq!(d2.status(&w), S_OK);
    d2.vq.avail().idx().store(1000);
    qevt.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !interrupt.needs_reset() {
        assert!(Instant::now() < deadline, "no DEVICE_NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(2));
    }
    blk.reset();
    drop(blk);
    // Dropping the device syncs and closes the image.
    assert_eq!(img.contents()[..512], [0x5e; 512]);
    DiskFile::open(&cfg).unwrap();
}

#[test]
fn features_the_driver_refused_are_unsupp() {
    let img = TempImage::new("neg", 64 * 512);
    let cfg = img.config();
    let mut blk = Block::new(&cfg, "vdn").unwrap();
    let m = mem();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    let qevt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut d = Driver::new(&m);
    let r = dwz_request(&mut d, T_WRITE_ZEROES, &[dwz(0, 1, 0)]);
    blk.activate(Activation {
        mem: m.clone(),
        queues: vec![d.queue()],
        queue_events: vec![qevt.try_clone().unwrap()],
        interrupt,
        features: blk.features() & !(feature::WRITE_ZEROES | feature::DISCARD),
        restored: false,
    })
    .unwrap();
    qevt.write(1).unwrap();
    wait_for_irq(&irq);
    assert_eq!(d.status(&r), S_UNSUPP);
    assert_eq!(img.contents()[..512], pattern(512)[..]);
}

// ---------------------------------------------------------------------------
// The chain walker against virtio-queue's DescriptorChain

/// xorshift64: reproducible random descriptor tables.
struct Xs(u64);

impl Xs {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

fn random_descriptor(x: &mut Xs, tables: &[u64]) -> RawDescriptor {
    let f = VRING_DESC_F_NEXT as u16;
    let flags = x.pick(&[0, f, f, f, W, W | f, VRING_DESC_F_INDIRECT as u16, 7]);
    let (addr, len) = if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
        let len = x.pick(&[16, 32, 48, 64, 24, 0, 16 * 300]);
        (x.pick(tables), len)
    } else {
        let addr = x.pick(&[0x10_0000, 0x10_0010, MEM_SIZE - 8, u64::MAX - 3]);
        (addr, x.pick(&[0, 1, 16, 512, 0xffff_fff0]))
    };
    let next = (x.next() % 20) as u16;
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

#[test]
fn chain_walker_matches_descriptor_chain() {
    let m = mem();
    let tables: Vec<u64> = (0..8).map(|i| 0x20_0000 + i * 0x2000).collect();
    let key = |d: &SplitDescriptor| (d.addr().raw_value(), d.len(), d.flags(), d.next());
    let (mut empty, mut long, mut cut) = (0, 0, 0);
    for seed in 1..300u64 {
        let mut x = Xs(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let vq = MockSplitQueue::new(&m, 16);
        for i in 0..16 {
            vq.desc_table()
                .store(i, random_descriptor(&mut x, &tables))
                .unwrap();
        }
        for &t in &tables {
            for i in 0..24u64 {
                m.write_obj(random_descriptor(&mut x, &tables), GuestAddress(t + 16 * i))
                    .unwrap();
            }
        }
        for h in 0..16u16 {
            vq.avail().ring().ref_at(usize::from(h)).unwrap().store(h);
        }
        vq.avail().idx().store(16);
        let mut q: Queue = vq.create_queue().unwrap();
        let table_addr = vq.desc_table_addr();
        let mapped = ChainWalker::map_table(&m, table_addr, 16);
        assert!(mapped.is_some());
        for chain in virtio_queue::QueueOwnedT::iter(&mut q, &m).unwrap() {
            let head = chain.head_index();
            let want: Vec<_> = chain.map(|d| key(&d)).collect();
            empty += usize::from(want.is_empty());
            long += usize::from(want.len() >= 4);
            cut += usize::from(
                want.last()
                    .is_some_and(|d| d.2 & VRING_DESC_F_NEXT as u16 != 0),
            );
            for table in [mapped, None] {
                let got: Vec<_> = ChainWalker::new(&m, table_addr, table, 16, head)
                    .map(|d| key(&d))
                    .collect();
                assert_eq!(got, want, "seed {seed}, head {head}");
            }
        }
    }
    // The random tables cover empty, long and cut-short chains.
    assert!(
        empty > 100 && long > 100 && cut > 100,
        "{empty} {long} {cut}"
    );
}

#[test]
fn requests_in_one_pass_run_in_ring_order() {
    let m = mem();
    let mut d = Driver::new(&m);
    let mut e = mem_engine(16);
    let before = d.request(T_IN, 3, &[512], W);
    let w = d.request(T_OUT, 3, &[512], 0);
    d.put(w.data[0], &[0x99; 512]);
    let after = d.request(T_IN, 3, &[512], W);
    let mut q = d.queue();
    let pass = run(&mut e, &d, &mut q);
    assert_eq!(pass.completed, 3);
    assert_eq!(
        d.bytes(before.data[0], 512),
        pattern(16 * 512)[3 * 512..4 * 512]
    );
    assert_eq!(d.bytes(after.data[0], 512), [0x99; 512]);
    for (i, r) in [&before, &w, &after].into_iter().enumerate() {
        assert_eq!(d.status(r), S_OK);
        d.used_len(i as u16, r);
    }
}
