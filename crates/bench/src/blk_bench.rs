//! `locald-blk-bench`: the cost of locald-vmm's virtio-blk request path.
//!
//! In-process, no KVM, single-threaded. For each workload it compares:
//! - **device**: requests written into a virtio queue in guest memory the
//!   way a Linux guest writes them (one indirect descriptor per request:
//!   header, data, status), `BATCH` at a time, then processed by
//!   `devices::virtio::block::process_queue`, the function the device's
//!   worker thread runs, against the real `DiskFile` backend; only the
//!   `process_queue` calls are timed (writing the ring is the guest's work);
//! - **raw**: `pread`/`pwrite` of the same sizes at the same offsets on the
//!   same file, from plain buffers.
//!
//! The image (default 256 MiB) is written just before the runs, so it is
//! in the host page cache: the numbers are the per-request CPU overhead of
//! the device over a bare syscall, not disk speed. Each run does every
//! batch both ways, alternating which goes first, so the drifts of a shared
//! machine hit both alike; each figure is the median of `--runs` runs
//! (default 5) after one untimed warm-up run, which checks that the device
//! read what the file holds or that its writes (of a fresh pattern) reached
//! the file. A third engine with a backend that moves no data gives the
//! virtio cost alone ("virtio ns").
//!
//! Usage: `locald-blk-bench [--runs N] [--size-mib N] [--dir DIR] [--only TEXT]`
//! (`--only` keeps the workloads whose name contains TEXT).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use locald_vmm::devices::virtio::block::request::{T_IN, T_OUT};
use locald_vmm::devices::virtio::block::{
    disk_info, process_queue, BlockBackend, BlockEngine, DiskFile,
};
use locald_vmm::DiskConfig;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

/// Requests made available before each queue pass.
const BATCH: usize = 64;
/// Queue size (the device's maximum).
const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Per-slot indirect tables, packed like the small kmalloc objects a Linux
/// guest uses for them.
const TABLES: u64 = 0x10_0000;
const HEADERS: u64 = 0x20_0000;
const STATUS: u64 = 0x21_0000;
const DATA: u64 = 0x40_0000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

struct Workload {
    name: &'static str,
    dir: Dir,
    /// Bytes per request.
    size: u64,
    /// Guest data descriptors per request (the data split evenly).
    segments: u32,
    random: bool,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "4 KiB random read",
        dir: Dir::Read,
        size: 4096,
        segments: 1,
        random: true,
    },
    Workload {
        name: "4 KiB random write",
        dir: Dir::Write,
        size: 4096,
        segments: 1,
        random: true,
    },
    Workload {
        name: "1 MiB sequential read",
        dir: Dir::Read,
        size: 1 << 20,
        segments: 1,
        random: false,
    },
    Workload {
        name: "1 MiB sequential write",
        dir: Dir::Write,
        size: 1 << 20,
        segments: 1,
        random: false,
    },
    // A guest whose pages are not contiguous (seg_max is 254).
    Workload {
        name: "1 MiB seq read, 128 x 8 KiB segs",
        dir: Dir::Read,
        size: 1 << 20,
        segments: 128,
        random: false,
    },
];

struct Options {
    runs: usize,
    size: u64,
    dir: PathBuf,
    only: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 5,
        size: 256 << 20,
        dir: std::env::temp_dir(),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => o.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--size-mib" => {
                let mib: u64 = value()?.parse().map_err(|e| format!("--size-mib: {e}"))?;
                o.size = mib << 20;
            }
            "--dir" => o.dir = value()?.into(),
            "--only" => o.only = Some(value()?),
            "-h" | "--help" => {
                return Err(
                    "usage: locald-blk-bench [--runs N] [--size-mib N] [--dir DIR] [--only TEXT]"
                        .into(),
                )
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    if o.runs == 0 || o.size < (16 << 20) {
        return Err("need --runs >= 1 and --size-mib >= 16".into());
    }
    Ok(o)
}

/// xorshift64*: the same offsets for raw and device runs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Byte offsets of the requests of one run.
fn offsets(w: &Workload, file_size: u64, run: usize) -> Vec<u64> {
    let slots = file_size / w.size;
    if w.random {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (run as u64 + 1));
        // As many requests as the file has 4 KiB blocks.
        (0..slots).map(|_| (rng.next() % slots) * w.size).collect()
    } else {
        (0..slots).map(|i| i * w.size).collect()
    }
}

/// The guest side of one virtio queue.
struct Guest {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: u16,
}

impl Guest {
    fn new(max_request: u64) -> Self {
        let mem_size = DATA + BATCH as u64 * max_request;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .expect("guest memory");
        let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
        queue.set_size(QUEUE_SIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(DESC_TABLE);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(AVAIL_RING);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(USED_RING);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(true);
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        Guest {
            mem,
            queue,
            avail_idx: 0,
        }
    }

    fn put_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    fn data_addr(slot: usize, w: &Workload) -> u64 {
        DATA + slot as u64 * w.size
    }

    /// Bytes between two slots' indirect tables.
    fn table_stride(w: &Workload) -> u64 {
        (u64::from(w.segments + 2) * 16).next_multiple_of(64)
    }

    /// Writes the fixed part of every slot's chain: ring descriptor `slot`
    /// points at indirect table `slot` = header, data segments, status.
    fn lay_out(&self, w: &Workload) {
        let seg_len = (w.size / u64::from(w.segments)) as u32;
        let data_flags = if w.dir == Dir::Read { F_WRITE } else { 0 };
        for slot in 0..BATCH {
            let table = TABLES + slot as u64 * Self::table_stride(w);
            let n = w.segments as u16 + 2;
            self.put_desc(table, HEADERS + 16 * slot as u64, 16, F_NEXT, 1);
            for s in 0..w.segments as u16 {
                let addr = Self::data_addr(slot, w) + u64::from(s) * u64::from(seg_len);
                self.put_desc(
                    table + 16 * u64::from(s + 1),
                    addr,
                    seg_len,
                    data_flags | F_NEXT,
                    s + 2,
                );
            }
            self.put_desc(
                table + 16 * u64::from(n - 1),
                STATUS + slot as u64,
                1,
                F_WRITE,
                0,
            );
            self.put_desc(
                DESC_TABLE + 16 * slot as u64,
                table,
                u32::from(n) * 16,
                F_INDIRECT,
                0,
            );
        }
    }

    /// Makes `offsets.len()` (≤ BATCH) requests available.
    fn submit(&mut self, w: &Workload, offsets: &[u64]) {
        let typ = if w.dir == Dir::Read { T_IN } else { T_OUT };
        for (slot, &off) in offsets.iter().enumerate() {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&typ.to_le_bytes());
            h[8..16].copy_from_slice(&(off / 512).to_le_bytes());
            self.mem
                .write_slice(&h, GuestAddress(HEADERS + 16 * slot as u64))
                .unwrap();
            self.mem
                .write_obj(0xffu8, GuestAddress(STATUS + slot as u64))
                .unwrap();
            let entry = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem
                .write_obj(slot as u16, GuestAddress(entry))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    fn check_done(&self, n: usize) -> Result<(), String> {
        let used: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        if used != self.avail_idx {
            return Err(format!("used idx {used}, expected {}", self.avail_idx));
        }
        for slot in 0..n {
            let s: u8 = self
                .mem
                .read_obj(GuestAddress(STATUS + slot as u64))
                .unwrap();
            if s != 0 {
                return Err(format!("request in slot {slot} failed with status {s}"));
            }
        }
        Ok(())
    }
}

/// A backend that moves no data: isolates the cost of the virtio path.
struct NullDisk;

impl BlockBackend for NullDisk {
    fn read_at(&mut self, _: u64, _: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        Ok(())
    }
    fn write_at(&mut self, _: u64, _: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// Submits one batch and times the queue pass that serves it.
fn device_batch<D: BlockBackend>(
    g: &mut Guest,
    engine: &mut BlockEngine<D>,
    w: &Workload,
    batch: &[u64],
) -> Result<Duration, String> {
    g.submit(w, batch);
    let t = Instant::now();
    let pass = process_queue(engine, &mut g.queue, &g.mem);
    let busy = t.elapsed();
    if pass.broken || pass.completed != batch.len() {
        return Err(format!(
            "queue pass completed {} of {} (broken: {})",
            pass.completed,
            batch.len(),
            pass.broken
        ));
    }
    g.check_done(batch.len())?;
    Ok(busy)
}

/// Plain buffers for the raw side: one per slot, page-aligned and
/// contiguous like the guest's (a misaligned heap buffer would make the
/// kernel's copies slower and flatter the device).
struct RawBufs {
    mem: Vec<u8>,
    start: usize,
    size: usize,
}

impl RawBufs {
    fn new(size: u64) -> Self {
        let size = size as usize;
        let mem = vec![0x5au8; BATCH * size + 4096];
        let start = mem.as_ptr().align_offset(4096);
        RawBufs { mem, start, size }
    }

    fn slots(&mut self) -> impl Iterator<Item = &mut [u8]> {
        self.mem[self.start..self.start + BATCH * self.size].chunks_exact_mut(self.size)
    }
}

/// Times plain pread/pwrite of one batch, from plain buffers.
fn raw_batch(file: &File, bufs: &mut RawBufs, w: &Workload, batch: &[u64]) -> Duration {
    let t = Instant::now();
    for (buf, &off) in bufs.slots().zip(batch) {
        match w.dir {
            Dir::Read => file.read_exact_at(buf, off).expect("pread"),
            Dir::Write => file.write_all_at(buf, off).expect("pwrite"),
        }
    }
    t.elapsed()
}

/// One run: every batch is done by the device and by raw syscalls, in
/// alternating order, so both see the same machine conditions. Returns
/// (device time, raw time).
fn paired_run(
    g: &mut Guest,
    engine: &mut BlockEngine<DiskFile>,
    file: &File,
    bufs: &mut RawBufs,
    w: &Workload,
    offs: &[u64],
) -> Result<(Duration, Duration), String> {
    let (mut dev, mut raw) = (Duration::ZERO, Duration::ZERO);
    for (i, batch) in offs.chunks(BATCH).enumerate() {
        if i % 2 == 0 {
            dev += device_batch(g, engine, w, batch)?;
            raw += raw_batch(file, bufs, w, batch);
        } else {
            raw += raw_batch(file, bufs, w, batch);
            dev += device_batch(g, engine, w, batch)?;
        }
    }
    Ok((dev, raw))
}

/// Checks that the device read what the file holds (outside timing).
fn verify_read(g: &Guest, file: &File, w: &Workload, last_batch: &[u64]) -> Result<(), String> {
    for (slot, &off) in last_batch.iter().enumerate().take(4) {
        let mut want = vec![0u8; w.size as usize];
        file.read_exact_at(&mut want, off)
            .map_err(|e| e.to_string())?;
        let mut got = vec![0u8; w.size as usize];
        g.mem
            .read_slice(&mut got, GuestAddress(Guest::data_addr(slot, w)))
            .map_err(|e| e.to_string())?;
        if got != want {
            return Err(format!("{}: slot {slot} read the wrong data", w.name));
        }
    }
    Ok(())
}

/// Checks that the device's writes reached the file (outside timing):
/// puts a pattern unique to this check, slot and offset in the guest's data
/// slots, has the device write `batch` (≤ BATCH offsets), and reads the
/// file back at each offset (that no later request overwrote).
fn verify_write(
    g: &mut Guest,
    engine: &mut BlockEngine<DiskFile>,
    file: &File,
    w: &Workload,
    batch: &[u64],
) -> Result<(), String> {
    let pattern = |slot: usize, off: u64| -> Vec<u8> {
        let mut rng = Rng(0x7772_6974_6500 ^ off ^ ((slot as u64) << 48));
        let mut v = vec![0u8; w.size as usize];
        for b in v.chunks_exact_mut(8) {
            b.copy_from_slice(&rng.next().to_le_bytes());
        }
        v
    };
    for (slot, &off) in batch.iter().enumerate() {
        g.mem
            .write_slice(&pattern(slot, off), GuestAddress(Guest::data_addr(slot, w)))
            .map_err(|e| e.to_string())?;
    }
    device_batch(g, engine, w, batch)?;
    for (slot, &off) in batch.iter().enumerate() {
        // Random offsets repeat: a later request over the same bytes wins.
        if batch[slot + 1..]
            .iter()
            .any(|&o| o < off + w.size && off < o + w.size)
        {
            continue;
        }
        let mut got = vec![0u8; w.size as usize];
        file.read_exact_at(&mut got, off)
            .map_err(|e| e.to_string())?;
        if got != pattern(slot, off) {
            return Err(format!(
                "{}: slot {slot}'s write did not reach the file at {off}",
                w.name
            ));
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn create_image(path: &Path, size: u64) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(path)?;
    let mut rng = Rng(42);
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        for b in chunk.chunks_exact_mut(8) {
            b.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all_at(&chunk, at)?;
        at += chunk.len() as u64;
    }
    Ok(())
}

struct Row {
    name: &'static str,
    size: u64,
    raw_rps: f64,
    dev_rps: f64,
    /// Nanoseconds per request with a backend that does nothing.
    null_ns: f64,
}

fn bench(o: &Options, path: &Path) -> Result<Vec<Row>, String> {
    let cfg = DiskConfig::new(path);
    let disk = DiskFile::open(&cfg).map_err(|e| e.to_string())?;
    let info = disk_info(&disk, &cfg);
    let mut engine = BlockEngine::new(disk, info, "virtio-blk bench");
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let max_request = WORKLOADS.iter().map(|w| w.size).max().unwrap_or(4096);
    let mut g = Guest::new(max_request);
    let mut rows = Vec::new();
    let selected = WORKLOADS
        .iter()
        .filter(|w| o.only.as_ref().is_none_or(|t| w.name.contains(t.as_str())));
    for w in selected {
        g.lay_out(w);
        let mut bufs = RawBufs::new(w.size);
        // Untimed warm-up, with a correctness check.
        let warm = offsets(w, o.size, 0);
        paired_run(&mut g, &mut engine, &raw, &mut bufs, w, &warm)?;
        let tail = warm.len() - (warm.len() - 1) % BATCH - 1;
        match w.dir {
            Dir::Read => verify_read(&g, &raw, w, &warm[tail..])?,
            Dir::Write => verify_write(&mut g, &mut engine, &raw, w, &warm[tail..])?,
        }
        let mut null = BlockEngine::new(NullDisk, engine.info().clone(), "virtio-blk null");
        let (mut raw_rps, mut dev_rps, mut null_ns) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=o.runs {
            let offs = offsets(w, o.size, run);
            let n = offs.len() as f64;
            let (dev, raw_t) = paired_run(&mut g, &mut engine, &raw, &mut bufs, w, &offs)?;
            dev_rps.push(n / dev.as_secs_f64());
            raw_rps.push(n / raw_t.as_secs_f64());
            let mut t = Duration::ZERO;
            for batch in offs.chunks(BATCH) {
                t += device_batch(&mut g, &mut null, w, batch)?;
            }
            null_ns.push(t.as_secs_f64() * 1e9 / n);
        }
        rows.push(Row {
            name: w.name,
            size: w.size,
            raw_rps: median(raw_rps),
            dev_rps: median(dev_rps),
            null_ns: median(null_ns),
        });
    }
    Ok(rows)
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("locald-blk-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let path = o
        .dir
        .join(format!("locald-blk-bench-{}.img", std::process::id()));
    if let Err(e) = create_image(&path, o.size) {
        eprintln!("locald-blk-bench: cannot create {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!(
        "locald-blk-bench: {} MiB image {} (in the host page cache), {} runs, median; \
         device = process_queue over a guest-memory queue, {BATCH} requests per pass",
        o.size >> 20,
        path.display(),
        o.runs
    );
    let result = bench(&o, &path);
    let _ = std::fs::remove_file(&path);
    let rows = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("locald-blk-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!();
    println!(
        "{:<34} {:>11} {:>11} {:>10} {:>10} {:>7} {:>9}",
        "workload", "raw req/s", "dev req/s", "raw MiB/s", "dev MiB/s", "dev/raw", "virtio ns"
    );
    for r in &rows {
        let mib = |rps: f64| rps * r.size as f64 / f64::from(1 << 20);
        println!(
            "{:<34} {:>11.0} {:>11.0} {:>10.0} {:>10.0} {:>7.3} {:>9.0}",
            r.name,
            r.raw_rps,
            r.dev_rps,
            mib(r.raw_rps),
            mib(r.dev_rps),
            r.dev_rps / r.raw_rps,
            r.null_ns
        );
    }
    println!();
    println!(
        "virtio ns: process_queue time per request with a backend that moves no data \
         (ring, descriptor and header handling, status, used ring)"
    );
    ExitCode::SUCCESS
}
