//! The in-process half of `locald-fs-bench`: FUSE requests written into a
//! virtio queue in guest memory the way a Linux guest's virtio-fs driver
//! writes them (device-readable request, then device-writable reply
//! buffers; bulk data in its own descriptor), one request per queue pass,
//! served by `devices::virtio::fs::process_queue` — the function the
//! device's worker thread runs — with the real `ShareFs` over a scratch
//! directory. No KVM, single-threaded; only the `process_queue` calls are
//! timed (encoding requests and reading replies is the guest's work).
//! Each workload is compared with the same operations done with plain
//! syscalls on the shared host directory ("direct"), in the same run,
//! alternating which goes first; each figure is the median of `--runs`
//! runs after one untimed warm-up run.
//!
//! Every reply is checked (unique, `error == 0`, length), every listing's
//! entry count and every read's byte count too, and the inode and handle
//! tables must be back to where they were after each workload; before the
//! runs, [`self_check`] does each operation once and compares what the
//! guest got (or the host file got) with the host directory, byte for
//! byte. `--check` runs only that.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, BatchForgetIn, CreateIn, Dirent, EntryOut, FlushIn, ForgetIn, ForgetOne, FsOptions,
    GetattrIn, InHeader, InitIn, InitOut, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn,
    WriteIn, WriteOut, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use locald_vmm::devices::virtio::fs::share::fd_limit;
use locald_vmm::devices::virtio::fs::{
    process_queue, FsServer, ShareCache, ShareFs, ShareFsOptions, QUEUE_SIZE,
};
use locald_vmm::devices::virtio::Warned;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Request: in header and arguments (names included).
const REQ: u64 = 0x1_0000;
/// Reply: out header and out arguments.
const REPLY: u64 = 0x2_0000;
const REPLY_LEN: u32 = 0x1000;
/// Bulk data (READ/READDIR reply data, WRITE/BATCH_FORGET payload).
const DATA: u64 = 0x10_0000;
/// Largest bulk transfer: the server's `MAX_BUFFER_SIZE`.
pub const MAX_DATA: u32 = 1 << 20;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

const ROOT: u64 = 1;
const HDR: usize = std::mem::size_of::<InHeader>();
const OUT: u64 = std::mem::size_of::<OutHeader>() as u64;

/// The FUSE readdir buffer: what a recent Linux guest asks for with
/// glibc's 32 KiB `getdents64` buffer.
const READDIR_BUF: u32 = 32 << 10;

/// Amounts of work per run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub stats: usize,
    pub reads: usize,
    pub creates: usize,
    pub dir_entries: usize,
    /// Listings of the large directory per run.
    pub listings: usize,
    pub small: usize,
    pub seq: u64,
}

/// The guest side of the request queue and the device behind it.
pub struct Device {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: u16,
    server: FsServer,
    fs: Arc<ShareFs>,
    warned: Warned,
    unique: u64,
    /// Time spent in `process_queue` since the last [`Device::take_busy`].
    busy: Duration,
    init_out: InitOut,
    req: Vec<u8>,
}

fn os_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Device {
    /// A device over `share` with the VMM's default options, but inodes
    /// kept as fds (`Some(false)`) or file handles (`Some(true)`) if asked.
    pub fn new(share: &Path, inode_handles: Option<bool>) -> Result<Self, String> {
        let mut opts = ShareFsOptions::new(share, false, ShareCache::Auto);
        match inode_handles {
            Some(true) if !opts.inode_handles => {
                opts.inode_handles = true;
                opts.max_inodes = 1 << 20;
            }
            Some(false) if opts.inode_handles => {
                opts.inode_handles = false;
                opts.max_inodes = fd_limit().saturating_sub(opts.max_handles + 256).max(64);
            }
            _ => {}
        }
        let fs = Arc::new(ShareFs::new(opts).map_err(os_err)?);
        let mem = GuestMemoryMmap::from_ranges(&[(
            GuestAddress(0),
            (DATA + u64::from(MAX_DATA)) as usize,
        )])
        .map_err(os_err)?;
        let mut queue = Queue::new(QUEUE_SIZE).map_err(os_err)?;
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_event_idx(true);
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return Err("queue layout invalid".into());
        }
        let mut d = Device {
            mem,
            queue,
            avail_idx: 0,
            server: FsServer::new(fs.clone()),
            fs,
            warned: Warned::default(),
            unique: 0,
            busy: Duration::ZERO,
            init_out: InitOut::default(),
            req: Vec::with_capacity(4096),
        };
        d.init()?;
        Ok(d)
    }

    /// Returns and resets the time spent serving requests.
    pub fn take_busy(&mut self) -> Duration {
        std::mem::take(&mut self.busy)
    }

    /// Whether the server keeps inodes as file handles (else one fd each).
    pub fn inode_handles(&self) -> bool {
        self.fs.options().inode_handles
    }

    /// (inodes, handles) the server holds.
    pub fn tables(&self) -> (usize, usize) {
        (self.fs.inode_count(), self.fs.handle_count())
    }

    fn put_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(DESC_TABLE + 16 * u64::from(i)))
            .unwrap();
    }

    /// Sends one request and serves it: `args` follow the in header,
    /// `data_in` bytes at `DATA` follow them (WRITE); the reply gets
    /// `reply` bytes at `REPLY` (0: no reply, as for FORGET) and then
    /// `data_out` bytes at `DATA` (READ, READDIR). Returns the reply length.
    fn call(
        &mut self,
        op: Opcode,
        nodeid: u64,
        args: &[&[u8]],
        data_in: u32,
        reply: u32,
        data_out: u32,
    ) -> Result<u32, String> {
        self.unique += 1;
        let unique = self.unique;
        let args_len: usize = args.iter().map(|a| a.len()).sum();
        let h = InHeader {
            len: (HDR + args_len) as u32 + data_in,
            opcode: op as u32,
            unique,
            nodeid,
            ..Default::default()
        };
        self.req.clear();
        self.req.extend_from_slice(h.as_slice());
        for a in args {
            self.req.extend_from_slice(a);
        }
        self.mem
            .write_slice(&self.req, GuestAddress(REQ))
            .map_err(os_err)?;
        let mut descs: Vec<(u64, u32, u16)> = vec![(REQ, self.req.len() as u32, 0)];
        if data_in > 0 {
            descs.push((DATA, data_in, 0));
        }
        if reply > 0 {
            descs.push((REPLY, reply, F_WRITE));
        }
        if data_out > 0 {
            descs.push((DATA, data_out, F_WRITE));
        }
        let n = descs.len() as u16;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let next = if i + 1 < n { F_NEXT } else { 0 };
            self.put_desc(
                i,
                addr,
                len,
                flags | next,
                if i + 1 < n { i + 1 } else { 0 },
            );
        }
        if reply > 0 {
            // A stale header must not pass for a reply.
            self.mem
                .write_obj(OutHeader::default(), GuestAddress(REPLY))
                .map_err(os_err)?;
        }
        let entry = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(0u16, GuestAddress(entry))
            .map_err(os_err)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .map_err(os_err)?;

        let t = Instant::now();
        let pass = process_queue(&mut self.queue, &self.mem, &self.server, &mut self.warned);
        self.busy += t.elapsed();

        if pass.broken || pass.completed != 1 {
            return Err(format!(
                "{op:?}: queue pass completed {} (broken: {})",
                pass.completed, pass.broken
            ));
        }
        let used_idx: u16 = self
            .mem
            .read_obj(GuestAddress(USED_RING + 2))
            .map_err(os_err)?;
        if used_idx != self.avail_idx {
            return Err(format!(
                "{op:?}: used idx {used_idx}, expected {}",
                self.avail_idx
            ));
        }
        let elem = USED_RING + 4 + 8 * u64::from(used_idx.wrapping_sub(1) % QUEUE_SIZE);
        let used_len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).map_err(os_err)?;
        if reply == 0 {
            return if used_len == 0 {
                Ok(0)
            } else {
                Err(format!("{op:?}: unexpected {used_len}-byte reply"))
            };
        }
        let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY)).map_err(os_err)?;
        if out.unique != unique {
            return Err(format!("{op:?}: no reply (used length {used_len})"));
        }
        if out.error != 0 {
            return Err(format!(
                "{op:?}: {}",
                std::io::Error::from_raw_os_error(-out.error)
            ));
        }
        if out.len != used_len {
            return Err(format!(
                "{op:?}: reply header says {} bytes, used ring {used_len}",
                out.len
            ));
        }
        Ok(out.len)
    }

    fn reply_obj<T: ByteValued>(&self) -> T {
        self.mem.read_obj(GuestAddress(REPLY + OUT)).unwrap()
    }

    fn init(&mut self) -> Result<(), String> {
        let flags = FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::ATOMIC_O_TRUNC;
        let a = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 128 << 10,
            flags: flags.bits() as u32,
        };
        self.call(Opcode::Init, 0, &[a.as_slice()], 0, REPLY_LEN, 0)?;
        self.init_out = self.reply_obj();
        Ok(())
    }

    /// What the server answered to INIT.
    pub fn init_out(&self) -> InitOut {
        self.init_out
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, String> {
        let name = cname(name);
        self.call(Opcode::Lookup, parent, &[&name], 0, REPLY_LEN, 0)?;
        Ok(self.reply_obj())
    }

    pub fn forget(&mut self, nodeid: u64, nlookup: u64) -> Result<(), String> {
        let a = ForgetIn { nlookup };
        self.call(Opcode::Forget, nodeid, &[a.as_slice()], 0, 0, 0)
            .map(drop)
    }

    /// BATCH_FORGET with the list as bulk data.
    pub fn batch_forget(&mut self, nodes: &[(u64, u64)]) -> Result<(), String> {
        for chunk in nodes.chunks(MAX_DATA as usize / 16) {
            let mut list = Vec::with_capacity(chunk.len() * 16);
            for &(nodeid, nlookup) in chunk {
                list.extend_from_slice(ForgetOne { nodeid, nlookup }.as_slice());
            }
            self.mem
                .write_slice(&list, GuestAddress(DATA))
                .map_err(os_err)?;
            let a = BatchForgetIn {
                count: chunk.len() as u32,
                dummy: 0,
            };
            self.call(
                Opcode::BatchForget,
                0,
                &[a.as_slice()],
                list.len() as u32,
                0,
                0,
            )?;
        }
        Ok(())
    }

    pub fn getattr(&mut self, nodeid: u64) -> Result<AttrOut, String> {
        let a = GetattrIn::default();
        self.call(Opcode::Getattr, nodeid, &[a.as_slice()], 0, REPLY_LEN, 0)?;
        Ok(self.reply_obj())
    }

    fn open_op(&mut self, op: Opcode, nodeid: u64, flags: i32) -> Result<u64, String> {
        let a = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.call(op, nodeid, &[a.as_slice()], 0, REPLY_LEN, 0)?;
        Ok(self.reply_obj::<OpenOut>().fh)
    }

    pub fn open(&mut self, nodeid: u64, flags: i32) -> Result<u64, String> {
        self.open_op(Opcode::Open, nodeid, flags)
    }

    pub fn opendir(&mut self, nodeid: u64) -> Result<u64, String> {
        self.open_op(Opcode::Opendir, nodeid, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    /// READ into `DATA`; returns the bytes read.
    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<u32, String> {
        let a = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let n = self.call(Opcode::Read, nodeid, &[a.as_slice()], 0, OUT as u32, size)?;
        Ok(n - OUT as u32)
    }

    /// WRITE of the `size` bytes at `DATA`; returns the bytes written.
    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<u32, String> {
        let a = WriteIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        self.call(Opcode::Write, nodeid, &[a.as_slice()], size, REPLY_LEN, 0)?;
        Ok(self.reply_obj::<WriteOut>().size)
    }

    /// What a Linux guest sends at `close`: FLUSH, then RELEASE.
    pub fn close(&mut self, nodeid: u64, fh: u64, flags: i32) -> Result<(), String> {
        let f = FlushIn {
            fh,
            ..Default::default()
        };
        self.call(Opcode::Flush, nodeid, &[f.as_slice()], 0, REPLY_LEN, 0)?;
        let r = ReleaseIn {
            fh,
            flags: flags as u32,
            ..Default::default()
        };
        self.call(Opcode::Release, nodeid, &[r.as_slice()], 0, REPLY_LEN, 0)
            .map(drop)
    }

    pub fn releasedir(&mut self, nodeid: u64, fh: u64) -> Result<(), String> {
        let r = ReleaseIn {
            fh,
            flags: (libc::O_RDONLY | libc::O_DIRECTORY) as u32,
            ..Default::default()
        };
        self.call(Opcode::Releasedir, nodeid, &[r.as_slice()], 0, REPLY_LEN, 0)
            .map(drop)
    }

    /// CREATE (write-only, truncating, mode 0644): the new entry and handle.
    pub fn create(&mut self, parent: u64, name: &str) -> Result<(EntryOut, u64), String> {
        let a = CreateIn {
            flags: (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0o022,
            fuse_flags: 0,
        };
        let name = cname(name);
        self.call(
            Opcode::Create,
            parent,
            &[a.as_slice(), &name],
            0,
            REPLY_LEN,
            0,
        )?;
        let e: EntryOut = self.reply_obj();
        let o: OpenOut = self
            .mem
            .read_obj(GuestAddress(
                REPLY + OUT + std::mem::size_of::<EntryOut>() as u64,
            ))
            .map_err(os_err)?;
        Ok((e, o.fh))
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> Result<(), String> {
        let name = cname(name);
        self.call(Opcode::Unlink, parent, &[&name], 0, REPLY_LEN, 0)
            .map(drop)
    }

    /// One READDIR(PLUS) of up to `size` bytes from `offset` into `DATA`;
    /// returns the reply data length.
    fn readdir_chunk(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        plus: bool,
    ) -> Result<u32, String> {
        let a = ReadIn {
            fh,
            offset,
            size: READDIR_BUF,
            ..Default::default()
        };
        let op = if plus {
            Opcode::Readdirplus
        } else {
            Opcode::Readdir
        };
        let n = self.call(op, nodeid, &[a.as_slice()], 0, OUT as u32, READDIR_BUF)?;
        Ok(n - OUT as u32)
    }

    /// OPENDIR, READDIR(PLUS) until the end, RELEASEDIR: the names (without
    /// `.` and `..`) and, for READDIRPLUS, the (nodeid, ino) of every entry
    /// that carries a lookup reference.
    pub fn list(&mut self, nodeid: u64, plus: bool) -> Result<Listing, String> {
        let fh = self.opendir(nodeid)?;
        let mut l = Listing::default();
        let mut offset = 0;
        loop {
            let n = self.readdir_chunk(nodeid, fh, offset, plus)?;
            if n == 0 {
                break;
            }
            let mut buf = vec![0u8; n as usize];
            self.mem
                .read_slice(&mut buf, GuestAddress(DATA))
                .map_err(os_err)?;
            offset = parse_dirents(&buf, plus, &mut l)?;
        }
        self.releasedir(nodeid, fh)?;
        Ok(l)
    }
}

/// What a listing returned.
#[derive(Default)]
pub struct Listing {
    pub names: Vec<Vec<u8>>,
    /// READDIRPLUS: (nodeid, host ino) of every entry with a reference.
    pub nodes: Vec<(u64, u64)>,
}

/// Parses one READDIR(PLUS) reply; returns the offset to continue from.
fn parse_dirents(buf: &[u8], plus: bool, l: &mut Listing) -> Result<u64, String> {
    let entry_len = std::mem::size_of::<EntryOut>();
    let dirent_len = std::mem::size_of::<Dirent>();
    let mut at = 0;
    let mut next = 0;
    while at < buf.len() {
        let mut entry = EntryOut::default();
        if plus {
            let b = buf.get(at..at + entry_len).ok_or("short direntplus")?;
            entry.as_mut_slice().copy_from_slice(b);
            at += entry_len;
        }
        let mut d = Dirent::default();
        let b = buf.get(at..at + dirent_len).ok_or("short dirent")?;
        d.as_mut_slice().copy_from_slice(b);
        let name_at = at + dirent_len;
        let name = buf
            .get(name_at..name_at + d.namelen as usize)
            .ok_or("short dirent name")?;
        if plus && entry.nodeid != 0 {
            l.nodes.push((entry.nodeid, entry.attr.ino));
        }
        if name != b"." && name != b".." {
            l.names.push(name.to_vec());
        }
        next = d.off;
        at = (name_at + d.namelen as usize).next_multiple_of(8);
    }
    Ok(next)
}

fn cname(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// xorshift64*: file contents.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

/// A page-aligned buffer for the direct side (the guest's is aligned too).
struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let mem = vec![0u8; len + 4096];
        let start = mem.as_ptr().align_offset(4096);
        AlignedBuf { mem, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

/// The scratch share and the nodeids the benchmark holds in it.
pub struct Tree {
    pub share: PathBuf,
    small: u64,
    big: u64,
    new: u64,
    seq: u64,
    wdev: u64,
}

/// Creates the share's contents: `small` (random bytes), `big/` (empty
/// files), `new/` (where files are created), `seq` (random bytes), and
/// `wdev`/`wdirect` (overwritten by the write workloads).
pub fn populate(share: &Path, s: &Sizes) -> std::io::Result<()> {
    fs::create_dir_all(share.join("big"))?;
    fs::create_dir_all(share.join("new"))?;
    for i in 0..s.dir_entries {
        File::create(share.join("big").join(format!("f{i:05}")))?;
    }
    let mut rng = Rng(42);
    let mut small = vec![0u8; s.small];
    rng.fill(&mut small);
    fs::write(share.join("small"), &small)?;
    let mut chunk = vec![0u8; 1 << 20];
    let f = File::create(share.join("seq"))?;
    let mut at = 0;
    while at < s.seq {
        rng.fill(&mut chunk);
        let n = (s.seq - at).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    for name in ["wdev", "wdirect"] {
        File::create(share.join(name))?;
    }
    Ok(())
}

impl Tree {
    /// Looks up the nodes every workload uses (held for the whole run).
    pub fn open(dev: &mut Device, share: &Path) -> Result<Tree, String> {
        Ok(Tree {
            share: share.to_path_buf(),
            small: dev.lookup(ROOT, "small")?.nodeid,
            big: dev.lookup(ROOT, "big")?.nodeid,
            new: dev.lookup(ROOT, "new")?.nodeid,
            seq: dev.lookup(ROOT, "seq")?.nodeid,
            wdev: dev.lookup(ROOT, "wdev")?.nodeid,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// LOOKUP of a name in the share root (a `stat` whose dentry is not
    /// cached in the guest).
    StatLookup,
    /// GETATTR of a known inode (a `stat` revalidating attributes).
    StatGetattr,
    /// OPEN, READ 4 KiB, FLUSH+RELEASE.
    OpenRead,
    /// CREATE, WRITE 4 KiB, FLUSH+RELEASE, in a fresh directory per run
    /// (everything removed after the workload, untimed).
    CreateWrite,
    /// OPENDIR, READDIR until the end, RELEASEDIR.
    Readdir,
    /// OPENDIR, READDIRPLUS until the end, RELEASEDIR (direct: readdir and
    /// an `fstatat` per entry, as `ls -l`); the references are forgotten
    /// after each listing, untimed.
    Readdirplus,
    /// OPEN, READ in chunks of the given size, FLUSH+RELEASE.
    SeqRead(u32),
    /// OPEN, WRITE in chunks of the given size, FLUSH+RELEASE.
    SeqWrite(u32),
}

pub struct Workload {
    pub name: String,
    pub kind: Kind,
    pub unit: &'static str,
}

/// The workloads; `max_write` is the WRITE size the server's INIT reply
/// allows a Linux guest (a write workload of that chunk size is added when
/// it is below 128 KiB).
pub fn workloads(s: &Sizes, max_write: u32) -> Vec<Workload> {
    let w = |name: String, kind, unit| Workload { name, kind, unit };
    let kib = |n: u32| n >> 10;
    let mut v = vec![
        w("stat (LOOKUP)".into(), Kind::StatLookup, "ops/s"),
        w("stat (GETATTR)".into(), Kind::StatGetattr, "ops/s"),
        w(
            format!("open+read {} KiB+close", s.small >> 10),
            Kind::OpenRead,
            "ops/s",
        ),
        w(
            format!("create+write {} KiB+close", s.small >> 10),
            Kind::CreateWrite,
            "ops/s",
        ),
        w(
            format!("readdir {} entries", s.dir_entries),
            Kind::Readdir,
            "entries/s",
        ),
        w(
            format!("readdirplus {} entries", s.dir_entries),
            Kind::Readdirplus,
            "entries/s",
        ),
    ];
    for chunk in [128u32 << 10, MAX_DATA] {
        v.push(w(
            format!("seq read {} MiB, {} KiB", s.seq >> 20, kib(chunk)),
            Kind::SeqRead(chunk),
            "MiB/s",
        ));
    }
    let small_write = (max_write < 128 << 10).then_some(max_write.max(4096));
    for chunk in small_write.into_iter().chain([128u32 << 10, MAX_DATA]) {
        v.push(w(
            format!("seq write {} MiB, {} KiB", s.seq >> 20, kib(chunk)),
            Kind::SeqWrite(chunk),
            "MiB/s",
        ));
    }
    v
}

/// Units of work per run (for the rate).
fn units(k: Kind, s: &Sizes) -> f64 {
    match k {
        Kind::StatLookup | Kind::StatGetattr => s.stats as f64,
        Kind::OpenRead => s.reads as f64,
        Kind::CreateWrite => s.creates as f64,
        Kind::Readdir | Kind::Readdirplus => (s.dir_entries * s.listings) as f64,
        Kind::SeqRead(_) | Kind::SeqWrite(_) => s.seq as f64 / f64::from(1 << 20),
    }
}

/// Fills `DATA` (and the direct side's buffer) with the bytes the write
/// workloads write.
fn write_pattern(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(7).fill(&mut v);
    v
}

/// One run of `k` through the device; returns the time in `process_queue`.
fn dev_run(dev: &mut Device, t: &Tree, k: Kind, s: &Sizes, run: usize) -> Result<Duration, String> {
    let before = dev.tables();
    dev.take_busy();
    let mut busy = Duration::ZERO;
    match k {
        Kind::StatLookup => {
            for _ in 0..s.stats {
                let e = dev.lookup(ROOT, "small")?;
                if e.nodeid != t.small {
                    return Err("LOOKUP returned another node".into());
                }
            }
            busy = dev.take_busy();
            dev.forget(t.small, s.stats as u64)?;
        }
        Kind::StatGetattr => {
            for _ in 0..s.stats {
                dev.getattr(t.small)?;
            }
        }
        Kind::OpenRead => {
            for _ in 0..s.reads {
                let fh = dev.open(t.small, libc::O_RDONLY)?;
                let n = dev.read(t.small, fh, 0, s.small as u32)?;
                if n as usize != s.small {
                    return Err(format!("READ returned {n} bytes"));
                }
                dev.close(t.small, fh, libc::O_RDONLY)?;
            }
        }
        Kind::CreateWrite => {
            // A fresh directory per run (files are removed after the
            // workload): ext4 makes creates slow right after many unlinks.
            let dname = format!("d{run}");
            fs::create_dir(t.share.join("new").join(&dname)).map_err(os_err)?;
            let dir = dev.lookup(t.new, &dname)?.nodeid;
            dev.take_busy();
            let mut made = Vec::with_capacity(s.creates);
            for i in 0..s.creates {
                let (e, fh) = dev.create(dir, &format!("v{i}"))?;
                let n = dev.write(e.nodeid, fh, 0, s.small as u32)?;
                if n as usize != s.small {
                    return Err(format!("WRITE wrote {n} bytes"));
                }
                dev.close(e.nodeid, fh, libc::O_WRONLY)?;
                made.push((e.nodeid, 1));
            }
            busy = dev.take_busy();
            made.push((dir, 1));
            dev.batch_forget(&made)?;
        }
        Kind::Readdir | Kind::Readdirplus => {
            let plus = k == Kind::Readdirplus;
            for _ in 0..s.listings {
                let l = dev.list(t.big, plus)?;
                if l.names.len() != s.dir_entries {
                    return Err(format!("listing returned {} entries", l.names.len()));
                }
                busy += dev.take_busy();
                let refs: Vec<(u64, u64)> = l.nodes.iter().map(|&(n, _)| (n, 1)).collect();
                dev.batch_forget(&refs)?;
                dev.take_busy();
            }
        }
        Kind::SeqRead(chunk) => {
            let fh = dev.open(t.seq, libc::O_RDONLY)?;
            let mut at = 0;
            while at < s.seq {
                let n = dev.read(t.seq, fh, at, chunk)?;
                if n == 0 {
                    return Err("READ: early end of file".into());
                }
                at += u64::from(n);
            }
            dev.close(t.seq, fh, libc::O_RDONLY)?;
        }
        Kind::SeqWrite(chunk) => {
            let fh = dev.open(t.wdev, libc::O_WRONLY)?;
            let mut at = 0;
            while at < s.seq {
                let len = (s.seq - at).min(u64::from(chunk)) as u32;
                let n = dev.write(t.wdev, fh, at, len)?;
                if n != len {
                    return Err(format!("WRITE wrote {n} of {len} bytes"));
                }
                at += u64::from(n);
            }
            dev.close(t.wdev, fh, libc::O_WRONLY)?;
        }
    }
    if busy == Duration::ZERO {
        busy = dev.take_busy();
    }
    let after = dev.tables();
    if after != before {
        return Err(format!(
            "server tables (inodes, handles) {before:?} before, {after:?} after"
        ));
    }
    Ok(busy)
}

/// The same work with plain syscalls on the host directory.
fn direct_run(
    t: &Tree,
    k: Kind,
    s: &Sizes,
    run: usize,
    buf: &mut AlignedBuf,
) -> Result<Duration, String> {
    let small = t.share.join("small");
    let start = Instant::now();
    let mut elapsed = None;
    match k {
        Kind::StatLookup | Kind::StatGetattr => {
            for _ in 0..s.stats {
                fs::metadata(&small).map_err(os_err)?;
            }
        }
        Kind::OpenRead => {
            for _ in 0..s.reads {
                let mut f = File::open(&small).map_err(os_err)?;
                f.read_exact(&mut buf.get()[..s.small]).map_err(os_err)?;
            }
        }
        Kind::CreateWrite => {
            let dir = t.share.join("new").join(format!("h{run}"));
            fs::create_dir(&dir).map_err(os_err)?;
            let names: Vec<PathBuf> = (0..s.creates).map(|i| dir.join(format!("h{i}"))).collect();
            let start = Instant::now();
            for p in &names {
                let mut f = File::create(p).map_err(os_err)?;
                f.write_all(&buf.get()[..s.small]).map_err(os_err)?;
            }
            elapsed = Some(start.elapsed());
        }
        Kind::Readdir => {
            for _ in 0..s.listings {
                let n = fs::read_dir(t.share.join("big")).map_err(os_err)?.count();
                if n != s.dir_entries {
                    return Err(format!("read_dir returned {n} entries"));
                }
            }
        }
        Kind::Readdirplus => {
            for _ in 0..s.listings {
                let mut n = 0;
                for e in fs::read_dir(t.share.join("big")).map_err(os_err)? {
                    e.map_err(os_err)?.metadata().map_err(os_err)?;
                    n += 1;
                }
                if n != s.dir_entries {
                    return Err(format!("read_dir returned {n} entries"));
                }
            }
        }
        Kind::SeqRead(chunk) => {
            let mut f = File::open(t.share.join("seq")).map_err(os_err)?;
            let b = &mut buf.get()[..chunk as usize];
            let mut total = 0u64;
            loop {
                let n = f.read(b).map_err(os_err)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            if total != s.seq {
                return Err(format!("read {total} bytes"));
            }
        }
        Kind::SeqWrite(chunk) => {
            let mut f = OpenOptions::new()
                .write(true)
                .open(t.share.join("wdirect"))
                .map_err(os_err)?;
            let mut at = 0;
            while at < s.seq {
                let len = (s.seq - at).min(u64::from(chunk)) as usize;
                f.write_all(&buf.get()[..len]).map_err(os_err)?;
                at += len as u64;
            }
        }
    }
    Ok(elapsed.unwrap_or_else(|| start.elapsed()))
}

/// Does each operation once through the device and checks what it did
/// against the host directory: the bytes a READ returned, the bytes a
/// WRITE left in the host file, the names a listing returned, the inode
/// numbers in LOOKUP/GETATTR/READDIRPLUS replies, that an error reply is
/// seen as one, and that the server's tables are back where they were.
pub fn self_check(dev: &mut Device, t: &Tree, s: &Sizes) -> Result<(), String> {
    let before = dev.tables();
    let host_small = fs::read(t.share.join("small")).map_err(os_err)?;
    let ino = |p: &Path| fs::symlink_metadata(p).map(|m| m.ino()).map_err(os_err);
    let fail = |what: &str| Err(format!("self-check: {what}"));

    // LOOKUP and GETATTR describe the host file.
    let e = dev.lookup(ROOT, "small")?;
    dev.forget(e.nodeid, 1)?;
    if e.nodeid != t.small
        || e.attr.ino != ino(&t.share.join("small"))?
        || e.attr.size != host_small.len() as u64
        || e.attr.mode & libc::S_IFMT != libc::S_IFREG
    {
        return fail("LOOKUP reply does not describe the host file");
    }
    let a = dev.getattr(t.small)?;
    if a.attr.ino != e.attr.ino || a.attr.size != e.attr.size {
        return fail("GETATTR reply does not describe the host file");
    }
    // An error is an error.
    match dev.lookup(ROOT, "does-not-exist") {
        Err(m) if m.contains("No such file") => {}
        other => {
            return fail(&format!(
                "LOOKUP of a missing name gave {:?}",
                other.map(|_| ())
            ))
        }
    }

    // READ returns the host file's bytes.
    mem_fill(dev, 0xee, s.small.max(MAX_DATA as usize))?;
    let fh = dev.open(t.small, libc::O_RDONLY)?;
    let n = dev.read(t.small, fh, 0, s.small as u32)?;
    dev.close(t.small, fh, libc::O_RDONLY)?;
    if mem_read(dev, n as usize)? != host_small {
        return fail("READ did not return the host file's bytes");
    }

    // CREATE+WRITE leaves the bytes in a new host file; UNLINK removes it.
    let pattern = write_pattern(s.small);
    dev.mem
        .write_slice(&pattern, GuestAddress(DATA))
        .map_err(os_err)?;
    let (ce, fh) = dev.create(t.new, "check")?;
    let n = dev.write(ce.nodeid, fh, 0, s.small as u32)?;
    dev.close(ce.nodeid, fh, libc::O_WRONLY)?;
    let host_path = t.share.join("new/check");
    if n as usize != s.small || fs::read(&host_path).map_err(os_err)? != pattern {
        return fail("CREATE+WRITE did not put the bytes in the host file");
    }
    if ce.attr.ino != ino(&host_path)? {
        return fail("CREATE reply does not describe the host file");
    }
    dev.unlink(t.new, "check")?;
    dev.forget(ce.nodeid, 1)?;
    if host_path.exists() {
        return fail("UNLINK left the host file");
    }

    // Listings return the host directory's names (and inode numbers).
    let mut host: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut host_inos = BTreeSet::new();
    for e in fs::read_dir(t.share.join("big")).map_err(os_err)? {
        let e = e.map_err(os_err)?;
        host.insert(e.file_name().into_encoded_bytes());
        host_inos.insert(e.ino());
    }
    for plus in [false, true] {
        let l = dev.list(t.big, plus)?;
        let got: BTreeSet<Vec<u8>> = l.names.iter().cloned().collect();
        if got != host || l.names.len() != host.len() {
            return fail(&format!(
                "{} returned {} names, the host directory has {}",
                if plus { "READDIRPLUS" } else { "READDIR" },
                l.names.len(),
                host.len()
            ));
        }
        if plus {
            // Every entry but `.` and `..` is a host file of the directory.
            let files = l
                .nodes
                .iter()
                .filter(|&&(_, i)| host_inos.contains(&i))
                .count();
            if files != host.len() {
                return fail("READDIRPLUS entries do not carry the host inodes");
            }
            let refs: Vec<(u64, u64)> = l.nodes.iter().map(|&(n, _)| (n, 1)).collect();
            dev.batch_forget(&refs)?;
        }
    }

    // Large READ returns the host bytes at the offset; large WRITE lands.
    let chunk = (MAX_DATA as u64).min(s.seq) as u32;
    let off = s.seq - u64::from(chunk);
    let fh = dev.open(t.seq, libc::O_RDONLY)?;
    let n = dev.read(t.seq, fh, off, chunk)?;
    dev.close(t.seq, fh, libc::O_RDONLY)?;
    let mut want = vec![0u8; chunk as usize];
    File::open(t.share.join("seq"))
        .and_then(|f| f.read_exact_at(&mut want, off))
        .map_err(os_err)?;
    if n != chunk || mem_read(dev, chunk as usize)? != want {
        return fail("large READ did not return the host file's bytes");
    }
    let pattern = write_pattern(chunk as usize);
    dev.mem
        .write_slice(&pattern, GuestAddress(DATA))
        .map_err(os_err)?;
    let fh = dev.open(t.wdev, libc::O_WRONLY)?;
    let n = dev.write(t.wdev, fh, off, chunk)?;
    dev.close(t.wdev, fh, libc::O_WRONLY)?;
    let mut got = vec![0u8; chunk as usize];
    File::open(t.share.join("wdev"))
        .and_then(|f| f.read_exact_at(&mut got, off))
        .map_err(os_err)?;
    if n != chunk || got != pattern {
        return fail("large WRITE did not reach the host file");
    }

    dev.take_busy();
    let after = dev.tables();
    if after != before {
        return fail(&format!(
            "server tables (inodes, handles) {before:?} before, {after:?} after"
        ));
    }
    Ok(())
}

fn mem_fill(dev: &Device, byte: u8, len: usize) -> Result<(), String> {
    dev.mem
        .write_slice(&vec![byte; len], GuestAddress(DATA))
        .map_err(os_err)
}

fn mem_read(dev: &Device, len: usize) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; len];
    dev.mem
        .read_slice(&mut v, GuestAddress(DATA))
        .map_err(os_err)?;
    Ok(v)
}

pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub direct: f64,
    pub inproc: f64,
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

/// Runs every selected workload: one untimed warm-up run, then `runs`
/// runs each doing the work through the device and directly, alternating
/// which goes first. Rates are medians.
pub fn bench(
    dev: &mut Device,
    t: &Tree,
    s: &Sizes,
    runs: usize,
    only: Option<&str>,
) -> Result<Vec<Row>, String> {
    let mut buf = AlignedBuf::new(MAX_DATA.max(s.small as u32) as usize);
    let pattern = write_pattern(MAX_DATA as usize);
    let mut rows = Vec::new();
    for w in workloads(s, dev.init_out.max_write) {
        if only.is_some_and(|o| !w.name.contains(o)) {
            continue;
        }
        // The write workloads write the same bytes on both sides.
        dev.mem
            .write_slice(&pattern, GuestAddress(DATA))
            .map_err(os_err)?;
        let n = buf.len;
        buf.get().copy_from_slice(&pattern[..n]);
        let u = units(w.kind, s);
        dev_run(dev, t, w.kind, s, 0).map_err(|e| format!("{}: {e}", w.name))?;
        direct_run(t, w.kind, s, 0, &mut buf).map_err(|e| format!("{}: {e}", w.name))?;
        let (mut d, mut i) = (Vec::new(), Vec::new());
        for r in 1..=runs {
            let (dt, it) = if r % 2 == 1 {
                let it = dev_run(dev, t, w.kind, s, r);
                (direct_run(t, w.kind, s, r, &mut buf), it)
            } else {
                let dt = direct_run(t, w.kind, s, r, &mut buf);
                (dt, dev_run(dev, t, w.kind, s, r))
            };
            let err = |e| format!("{}: {e}", w.name);
            d.push(u / dt.map_err(err)?.as_secs_f64());
            i.push(u / it.map_err(err)?.as_secs_f64());
        }
        if w.kind == Kind::CreateWrite {
            // Untimed: what the runs created (no inode is held any more).
            for e in fs::read_dir(t.share.join("new")).map_err(os_err)? {
                fs::remove_dir_all(e.map_err(os_err)?.path()).map_err(os_err)?;
            }
        }
        rows.push(Row {
            name: w.name,
            unit: w.unit,
            direct: median(d),
            inproc: median(i),
        });
    }
    Ok(rows)
}

pub fn print_rows(rows: &[Row]) {
    println!(
        "{:<30} {:>12} {:>12} {:>7} {:>9} {:>9}  unit",
        "operation", "direct", "in-process", "ratio", "direct", "in-proc"
    );
    println!(
        "{:<30} {:>12} {:>12} {:>7} {:>9} {:>9}",
        "", "", "", "", "us/op", "us/op"
    );
    for r in rows {
        // Per operation: one op, one entry, or one MiB.
        let us = |rate: f64| 1e6 / rate;
        println!(
            "{:<30} {:>12.0} {:>12.0} {:>7.2} {:>9.2} {:>9.2}  {}",
            r.name,
            r.direct,
            r.inproc,
            r.inproc / r.direct,
            us(r.direct),
            us(r.inproc),
            r.unit
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_path_moves_the_right_bytes() {
        let base =
            std::env::temp_dir().join(format!("locald-fs-inproc-test-{}", std::process::id()));
        let share = base.join("share");
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&share).unwrap();
        let s = Sizes {
            stats: 10,
            reads: 10,
            creates: 10,
            dir_entries: 300,
            listings: 2,
            small: 4096,
            seq: 3 << 20,
        };
        populate(&share, &s).unwrap();
        let mut dev = Device::new(&share, None).unwrap();
        let t = Tree::open(&mut dev, &share).unwrap();
        self_check(&mut dev, &t, &s).unwrap();
        // A failing request is reported, not measured.
        assert!(dev.read(t.small, 0xdead, 0, 4096).is_err());
        assert!(dev.lookup(ROOT, "missing").is_err());
        let rows = bench(&mut dev, &t, &s, 1, None).unwrap();
        assert_eq!(rows.len(), workloads(&s, dev.init_out().max_write).len());
        assert!(rows.iter().all(|r| r.direct > 0.0 && r.inproc > 0.0));
        // The sequential write left the pattern in the host file.
        let got = fs::read(share.join("wdev")).unwrap();
        assert_eq!(got.len() as u64, s.seq);
        assert_eq!(
            &got[..MAX_DATA as usize],
            &write_pattern(MAX_DATA as usize)[..]
        );
        drop(dev);
        let _ = fs::remove_dir_all(&base);
    }
}
