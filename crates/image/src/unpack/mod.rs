//! Applies OCI image layers, in order, onto a staging directory on the
//! host, and records in a [`MetadataTable`] what the host tree cannot hold
//! (ownership, special mode bits, device nodes, non-`user.*` xattrs) for
//! the ext4 builder. Layer data is hostile input: nothing is ever written,
//! created, chmod-ed or deleted outside the staging root, and no symlink is
//! followed out of it. `docs/oci-images.md` ("Unpacking and hostile
//! layers") states every policy; in short:
//!
//! - compression by media type (gzip, zstd, plain), checked against the
//!   data's magic; [`Unpacker::apply_layer_sniffed`] detects it instead;
//! - entries are read with the `tar` crate's iterator and written one by
//!   one with descriptor-relative calls (see [`fs`]); parents are resolved
//!   from the root descriptor with chroot-like symlink semantics;
//! - names: absolute, `..`, NUL, empty, too long or too deep → the layer is
//!   aborted with [`UnpackError::Entry`]; non-UTF-8 bytes are allowed;
//! - whiteouts and opaque directories remove lower layers' content only:
//!   what the same layer adds survives, whatever the order of entries;
//! - device nodes and fifos become empty placeholder files on the host and
//!   [`NodeKind`] records in the table; ownership is never applied on the
//!   host; setuid/setgid/sticky only in the table;
//! - [`Limits`] bound the uncompressed bytes (disk use and decompression
//!   bombs), the entries, the PAX/long-name data per entry (memory), path
//!   length and depth, and symlink hops.
//!
//! Runs on the caller's thread, synchronously; an [`Unpacker`] is not
//! shared between threads.

mod error;
mod fs;
mod meta;

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

pub use error::{LimitKind, PathRole, Rejection, UnpackError};
pub use meta::{MetadataTable, NodeKind, Record};

use fs::{cstring, Dir, HostKind, ResolveError, Root};

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// A plain tar stream.
    None,
    Gzip,
    Zstd,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl Compression {
    /// The compression a layer media type declares:
    /// `application/vnd.oci.image.layer.v1.tar[+gzip|+zstd]` (and the
    /// deprecated `…nondistributable…` forms), docker's
    /// `application/vnd.docker.image.rootfs.diff.tar.gzip` and
    /// `…rootfs.foreign.diff.tar.gzip`. Anything else is an error.
    pub fn from_media_type(media_type: &str) -> Result<Compression, UnpackError> {
        Ok(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
            other => return Err(UnpackError::UnknownMediaType(other.to_string())),
        })
    }

    /// The compression the first bytes of a blob show (anything without a
    /// gzip or zstd magic is taken as plain tar).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&GZIP_MAGIC) {
            Compression::Gzip
        } else if head.starts_with(&ZSTD_MAGIC) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Resource limits, over all layers applied by one [`Unpacker`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Uncompressed tar bytes read (headers, data, padding). Bounds the
    /// bytes written to disk (always fewer) and decompression bombs; an
    /// entry whose declared size exceeds what is left is refused before
    /// anything is written. Set it from the space the caller can spare.
    pub max_bytes: u64,
    /// Tar entries (including whiteouts and extension headers' owners).
    pub max_entries: u64,
    /// PAX extension and GNU long-name/long-link data read for one entry
    /// (the `tar` crate holds it in memory).
    pub max_metadata_bytes: u64,
    /// Bytes of an entry name or link target.
    pub max_path_len: usize,
    /// Components of an entry name, link target, or resolved path.
    pub max_depth: usize,
    /// Symlinks followed while resolving one parent directory.
    pub max_symlink_hops: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 16 << 30,
            max_entries: 1_000_000,
            max_metadata_bytes: 1 << 20,
            max_path_len: 4096,
            max_depth: 256,
            max_symlink_hops: 40,
        }
    }
}

impl Limits {
    /// The defaults with `max_bytes` set to `bytes`.
    pub fn with_budget(bytes: u64) -> Limits {
        Limits {
            max_bytes: bytes,
            ..Limits::default()
        }
    }
}

/// Counters for a progress line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackStats {
    /// Layers applied completely.
    pub layers: u64,
    /// Tar entries processed.
    pub entries: u64,
    /// Regular files written (not hard links).
    pub files: u64,
    /// File data bytes written to the host.
    pub bytes_written: u64,
    /// Uncompressed tar bytes read.
    pub bytes_read: u64,
}

impl UnpackStats {
    fn add(&mut self, o: &UnpackStats) {
        self.layers += o.layers;
        self.entries += o.entries;
        self.files += o.files;
        self.bytes_written += o.bytes_written;
        self.bytes_read += o.bytes_read;
    }
}

/// Applies layers onto one staging root; see the module docs.
pub struct Unpacker {
    root: Root,
    limits: Limits,
    table: MetadataTable,
    stats: UnpackStats,
    buf: Vec<u8>,
}

/// Shared between the layer loop and the byte-counting reader under the
/// tar parser.
struct GuardState {
    /// Uncompressed bytes read in this layer.
    pos: Cell<u64>,
    /// Reads past this position (in this layer) fail: the byte budget.
    budget_end: u64,
    /// Reads past this position fail: the metadata allowance while the
    /// tar crate looks for the next entry (u64::MAX while an entry's data
    /// is ours to read).
    meta_end: Cell<u64>,
    tripped: Cell<Option<LimitKind>>,
}

/// Counts uncompressed bytes and enforces [`GuardState`]'s ends.
struct Guard<R> {
    inner: R,
    state: Rc<GuardState>,
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let s = &self.state;
        let pos = s.pos.get();
        let (end, kind) = if s.meta_end.get() < s.budget_end {
            (s.meta_end.get(), LimitKind::Metadata)
        } else {
            (s.budget_end, LimitKind::Bytes)
        };
        let room = end.saturating_sub(pos);
        if room == 0 {
            s.tripped.set(Some(kind));
            return Err(io::Error::other("locald-image unpack limit"));
        }
        let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..n])?;
        s.pos.set(pos + got as u64);
        Ok(got)
    }
}

/// Per-layer bookkeeping.
#[derive(Default)]
struct LayerState {
    /// Canonical paths this layer wrote, and their ancestors: whiteouts and
    /// opaque markers of the same layer leave them alone.
    added: HashSet<Vec<u8>>,
    stats: UnpackStats,
}

impl LayerState {
    fn mark_added(&mut self, canon: &[u8]) {
        let mut p = canon;
        loop {
            if !self.added.insert(p.to_vec()) {
                return;
            }
            match p.iter().rposition(|&b| b == b'/') {
                Some(i) => p = &p[..i],
                None => {
                    self.added.insert(Vec::new());
                    return;
                }
            }
        }
    }
}

/// Entry metadata gathered from the header and PAX records.
struct EntryMeta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EntryMeta {
    fn record(&self, kind: NodeKind) -> Record {
        Record {
            kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            xattrs: self.xattrs.clone(),
        }
    }
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

fn io_rej(op: &'static str) -> impl FnOnce(io::Error) -> Rejection {
    move |source| Rejection::Io { op, source }
}

fn resolve_rej(e: ResolveError, limits: &Limits) -> Rejection {
    match e {
        ResolveError::Loop => Rejection::SymlinkLoop {
            max: limits.max_symlink_hops,
        },
        ResolveError::NotDir(p) => Rejection::NotADirectory(p),
        ResolveError::TooDeep => Rejection::TooDeep {
            role: PathRole::Name,
            depth: limits.max_depth + 1,
            max: limits.max_depth,
        },
        ResolveError::EmptyLink(p) => Rejection::EmptySymlink(p),
        ResolveError::Io(op, source) => Rejection::Io { op, source },
    }
}

/// Splits a name into its normalized components: `.` and empty components
/// dropped; absolute, `..`, NUL, empty, too long, too deep refused.
fn normalize<'a>(
    raw: &'a [u8],
    role: PathRole,
    limits: &Limits,
) -> Result<Vec<&'a [u8]>, Rejection> {
    if raw.is_empty() {
        return Err(Rejection::Empty(role));
    }
    if raw.contains(&0) {
        return Err(Rejection::Nul(role));
    }
    if raw.len() > limits.max_path_len {
        return Err(Rejection::PathTooLong {
            role,
            len: raw.len(),
            max: limits.max_path_len,
        });
    }
    if raw[0] == b'/' {
        return Err(Rejection::Absolute(role));
    }
    let mut comps = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Rejection::DotDot(role)),
            c => comps.push(c),
        }
    }
    if comps.len() > limits.max_depth {
        return Err(Rejection::TooDeep {
            role,
            depth: comps.len(),
            max: limits.max_depth,
        });
    }
    Ok(comps)
}

/// Host permission bits: no setuid/setgid/sticky, and always accessible to
/// the owner (the builder must read files and enter directories).
fn host_mode(mode: u32, dir: bool) -> u32 {
    (mode & 0o777) | if dir { 0o700 } else { 0o600 }
}

impl Unpacker {
    /// An unpacker writing into `staging`, an existing directory (usually
    /// empty). `staging` itself is trusted; nothing outside it is touched.
    pub fn new(staging: &Path, limits: Limits) -> Result<Unpacker, UnpackError> {
        let root =
            Root::open(staging, limits.max_symlink_hops, limits.max_depth).map_err(|source| {
                UnpackError::Root {
                    path: staging.to_path_buf(),
                    source,
                }
            })?;
        // The root exists before any layer: root-owned 0755, as docker
        // makes it, until a layer's `./` entry says otherwise.
        let mut table = MetadataTable::default();
        table.insert(
            Vec::new(),
            Record {
                kind: NodeKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                xattrs: Vec::new(),
            },
        );
        Ok(Unpacker {
            root,
            limits,
            table,
            stats: UnpackStats::default(),
            buf: vec![0; 256 << 10],
        })
    }

    /// Applies one layer whose compression `media_type` declares (see
    /// [`Compression::from_media_type`]); data whose magic disagrees is
    /// refused.
    pub fn apply_layer<R: Read>(
        &mut self,
        layer: R,
        media_type: &str,
    ) -> Result<UnpackStats, UnpackError> {
        let declared = Compression::from_media_type(media_type)?;
        self.apply(layer, Some(declared))
    }

    /// Applies one layer whose compression is detected from its magic
    /// (`docker save` archives carry no media type).
    pub fn apply_layer_sniffed<R: Read>(&mut self, layer: R) -> Result<UnpackStats, UnpackError> {
        self.apply(layer, None)
    }

    /// The table so far.
    pub fn metadata(&self) -> &MetadataTable {
        &self.table
    }

    /// Totals over the layers applied so far.
    pub fn stats(&self) -> UnpackStats {
        self.stats
    }

    /// Sets the directories' times on the host (writing into a directory
    /// changes its mtime, so this is done once, after the last layer) and
    /// returns the table and the totals.
    pub fn finish(mut self) -> Result<(MetadataTable, UnpackStats), UnpackError> {
        let dirs: Vec<(Vec<u8>, u64)> = self
            .table
            .iter()
            .filter(|(_, r)| r.kind == NodeKind::Dir)
            .map(|(p, r)| (p.to_vec(), r.mtime))
            .collect();
        let mut created = Vec::new();
        for (path, mtime) in dirs {
            // Canonical paths: no symlinks on the way, but resolve safely
            // anyway.
            let dir = match self.root.resolve_dir(&path, false, &mut created) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(ResolveError::Io(_, e)) => return Err(UnpackError::Finish(e)),
                Err(_) => continue,
            };
            fs::futimens(dir.raw(), mtime).map_err(UnpackError::Finish)?;
        }
        Ok((self.table, self.stats))
    }

    fn apply<R: Read>(
        &mut self,
        layer: R,
        declared: Option<Compression>,
    ) -> Result<UnpackStats, UnpackError> {
        let mut layer = BufReader::with_capacity(128 << 10, layer);
        let mut head = [0u8; 4];
        let mut n = 0;
        while n < head.len() {
            match layer.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(UnpackError::Read(e)),
            }
        }
        let found = Compression::sniff(&head[..n]);
        let compression = match declared {
            Some(d) if d != found => {
                return Err(UnpackError::CompressionMismatch { declared: d, found });
            }
            _ => found,
        };
        let raw = io::Cursor::new(head[..n].to_vec()).chain(layer);
        let decoded: Box<dyn Read> = match compression {
            Compression::None => Box::new(raw),
            Compression::Gzip => Box::new(BufReader::with_capacity(
                128 << 10,
                flate2::read::MultiGzDecoder::new(raw),
            )),
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::new(raw).map_err(UnpackError::Read)?;
                // 128 MiB windows at most (zstd's own default limit).
                d.window_log_max(27).map_err(UnpackError::Read)?;
                Box::new(BufReader::with_capacity(128 << 10, d))
            }
        };
        let state = Rc::new(GuardState {
            pos: Cell::new(0),
            budget_end: self.limits.max_bytes.saturating_sub(self.stats.bytes_read),
            meta_end: Cell::new(self.limits.max_metadata_bytes),
            tripped: Cell::new(None),
        });
        let guard = Guard {
            inner: decoded,
            state: state.clone(),
        };
        let mut archive = tar::Archive::new(guard);
        let mut ls = LayerState::default();
        let result = self.apply_entries(&mut archive, &state, &mut ls);
        ls.stats.bytes_read = state.pos.get();
        if result.is_ok() {
            ls.stats.layers = 1;
        }
        self.stats.add(&ls.stats);
        result.map(|()| ls.stats)
    }

    fn apply_entries<R: Read>(
        &mut self,
        archive: &mut tar::Archive<Guard<R>>,
        state: &GuardState,
        ls: &mut LayerState,
    ) -> Result<(), UnpackError> {
        let limit_err =
            |state: &GuardState, e: io::Error, limits: &Limits| match state.tripped.get() {
                Some(kind) => UnpackError::Limit {
                    kind,
                    max: match kind {
                        LimitKind::Bytes => limits.max_bytes,
                        LimitKind::Metadata => limits.max_metadata_bytes,
                        LimitKind::Entries => limits.max_entries,
                    },
                },
                None => UnpackError::Read(e),
            };
        let mut entries = archive
            .entries()
            .map_err(|e| limit_err(state, e, &self.limits))?;
        let mut index = 0u64;
        loop {
            let mut entry = match entries.next() {
                None => return Ok(()),
                Some(Ok(e)) => e,
                Some(Err(e)) => return Err(limit_err(state, e, &self.limits)),
            };
            state.meta_end.set(u64::MAX);
            let size = entry.size();
            let data_end = entry
                .raw_file_position()
                .saturating_add(size.saturating_add(511) & !511);
            if self.stats.entries + ls.stats.entries >= self.limits.max_entries {
                return Err(UnpackError::Limit {
                    kind: LimitKind::Entries,
                    max: self.limits.max_entries,
                });
            }
            ls.stats.entries += 1;
            let remaining = state.budget_end.saturating_sub(state.pos.get());
            let result = if size > remaining {
                Err(Rejection::TooLarge { size, remaining })
            } else {
                self.apply_entry(&mut entry, ls)
            };
            if let Err(reason) = result {
                if let Some(kind) = state.tripped.get() {
                    return Err(limit_err(
                        state,
                        io::Error::other(format!("{kind:?}")),
                        &self.limits,
                    ));
                }
                return Err(UnpackError::Entry {
                    index,
                    path: entry.path_bytes().into_owned(),
                    reason,
                });
            }
            // What the tar crate may read before yielding the next entry:
            // the rest of this entry's data, then headers and at most
            // `max_metadata_bytes` of extension data.
            state
                .meta_end
                .set(data_end.saturating_add(self.limits.max_metadata_bytes));
            index += 1;
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        ls: &mut LayerState,
    ) -> Result<(), Rejection> {
        use tar::EntryType as T;
        let etype = entry.header().entry_type();
        let raw_path = entry.path_bytes().into_owned();
        let comps = normalize(&raw_path, PathRole::Name, &self.limits)?;
        let meta = self.entry_meta(entry)?;
        if etype.is_gnu_sparse() {
            return Err(Rejection::Sparse);
        }
        if etype.is_pax_global_extensions() {
            return Ok(());
        }
        let Some((&name, parents)) = comps.split_last() else {
            // `.` or `./`: the root directory itself.
            if !etype.is_dir() {
                return Err(Rejection::RootNotDirectory);
            }
            let root = self.root.root();
            fs::fchmod(root.raw(), host_mode(meta.mode, true)).map_err(io_rej("fchmod"))?;
            self.set_user_xattrs(root.raw(), &meta);
            self.table.insert(Vec::new(), meta.record(NodeKind::Dir));
            ls.mark_added(b"");
            return Ok(());
        };
        let parent_lit = parents.join(&b'/');

        if let Some(rest) = name.strip_prefix(WHITEOUT) {
            return self.whiteout(&parent_lit, name, rest, ls);
        }

        let kind = match etype {
            T::Regular | T::Continuous => NodeKind::File,
            T::Directory => NodeKind::Dir,
            T::Symlink => NodeKind::Symlink,
            T::Link => return self.hard_link(entry, &parent_lit, name, ls),
            T::Char | T::Block => {
                let (Ok(Some(major)), Ok(Some(minor))) =
                    (entry.header().device_major(), entry.header().device_minor())
                else {
                    return Err(Rejection::BadDevice);
                };
                if etype == T::Char {
                    NodeKind::CharDevice { major, minor }
                } else {
                    NodeKind::BlockDevice { major, minor }
                }
            }
            T::Fifo => NodeKind::Fifo,
            other => return Err(Rejection::UnsupportedType(other.as_byte())),
        };

        let parent = self.parent(&parent_lit, ls)?;
        let cname = cstring(name).map_err(|_| Rejection::Nul(PathRole::Name))?;
        let canon = parent.child(name);
        ls.mark_added(&canon);
        match kind {
            NodeKind::Dir => {
                match fs::lstat_at(parent.raw(), &cname).map_err(io_rej("fstatat"))? {
                    HostKind::Dir => {}
                    HostKind::Missing => {
                        fs::mkdir_at(parent.raw(), &cname, 0o700).map_err(io_rej("mkdirat"))?
                    }
                    _ => {
                        self.clear(&parent, &cname, &canon)?;
                        fs::mkdir_at(parent.raw(), &cname, 0o700).map_err(io_rej("mkdirat"))?;
                    }
                }
                let fd = fs::open_dir_at(parent.raw(), &cname).map_err(io_rej("openat"))?;
                fs::fchmod(fd.as_raw_fd(), host_mode(meta.mode, true)).map_err(io_rej("fchmod"))?;
                self.set_user_xattrs(fd.as_raw_fd(), &meta);
                self.table.insert(canon, meta.record(kind));
            }
            NodeKind::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(Rejection::MissingLinkName {
                        kind: "symlink",
                        role: PathRole::SymlinkTarget,
                    })?
                    .into_owned();
                if target.is_empty() {
                    return Err(Rejection::Empty(PathRole::SymlinkTarget));
                }
                if target.len() > self.limits.max_path_len {
                    return Err(Rejection::PathTooLong {
                        role: PathRole::SymlinkTarget,
                        len: target.len(),
                        max: self.limits.max_path_len,
                    });
                }
                let ctarget =
                    cstring(&target).map_err(|_| Rejection::Nul(PathRole::SymlinkTarget))?;
                self.clear(&parent, &cname, &canon)?;
                fs::symlink_at(&ctarget, parent.raw(), &cname).map_err(io_rej("symlinkat"))?;
                fs::utimens_nofollow(parent.raw(), &cname, meta.mtime)
                    .map_err(io_rej("utimensat"))?;
                self.table.insert(canon, meta.record(kind));
            }
            _ => {
                // Regular files, and placeholders for devices and fifos.
                self.clear(&parent, &cname, &canon)?;
                let mut f = fs::create_file_at(parent.raw(), &cname, 0o600)
                    .map_err(io_rej("openat(O_CREAT|O_EXCL)"))?;
                if kind == NodeKind::File {
                    let size = entry.size();
                    let got = self.copy_data(entry, &mut f)?;
                    if got != size {
                        return Err(Rejection::Truncated { got, size });
                    }
                    ls.stats.files += 1;
                    ls.stats.bytes_written += got;
                    let fd = f.as_raw_fd();
                    fs::fchmod(fd, host_mode(meta.mode, false)).map_err(io_rej("fchmod"))?;
                    self.set_user_xattrs(fd, &meta);
                }
                let fd = f.as_raw_fd();
                fs::futimens(fd, meta.mtime).map_err(io_rej("futimens"))?;
                self.table.insert(canon, meta.record(kind));
            }
        }
        Ok(())
    }

    /// Copies an entry's data into `f`; returns the bytes copied.
    fn copy_data<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        f: &mut std::fs::File,
    ) -> Result<u64, Rejection> {
        let mut total = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Rejection::Io {
                        op: "reading entry data",
                        source: e,
                    })
                }
            };
            f.write_all(&self.buf[..n]).map_err(io_rej("write"))?;
            total += n as u64;
        }
    }

    /// Resolves (creating missing directories, recorded as root-owned 0755
    /// like docker's implicit parents) the parent directory of an entry.
    fn parent(&mut self, literal: &[u8], ls: &mut LayerState) -> Result<Rc<Dir>, Rejection> {
        let mut created = Vec::new();
        let r = self.root.resolve_dir(literal, true, &mut created);
        for c in created {
            ls.mark_added(&c);
            self.table.insert(
                c,
                Record {
                    kind: NodeKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                    xattrs: Vec::new(),
                },
            );
        }
        match r {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err(Rejection::Io {
                op: "resolving parent",
                source: io::Error::from(io::ErrorKind::NotFound),
            }),
            Err(e) => Err(resolve_rej(e, &self.limits)),
        }
    }

    /// Removes whatever is at `name` in `parent` (a directory with its
    /// contents) and its records.
    fn clear(
        &mut self,
        parent: &Dir,
        cname: &std::ffi::CStr,
        canon: &[u8],
    ) -> Result<(), Rejection> {
        let kind = fs::remove_all_at(parent.raw(), cname, self.limits.max_depth + 1)
            .map_err(io_rej("removing"))?;
        if matches!(kind, HostKind::Dir | HostKind::Symlink) {
            self.root.invalidate();
        }
        if kind != HostKind::Missing {
            self.table.remove_tree(canon);
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        parent_lit: &[u8],
        name: &[u8],
        rest: &[u8],
        ls: &mut LayerState,
    ) -> Result<(), Rejection> {
        if name == OPAQUE {
            let dir = self.parent(parent_lit, ls)?;
            ls.mark_added(&dir.canon);
            self.prune(&dir, ls, self.limits.max_depth + 1)?;
            self.root.invalidate();
            return Ok(());
        }
        if rest.starts_with(WHITEOUT) {
            // Other `.wh..wh.*` names are aufs bookkeeping (`.wh..wh.plnk`,
            // `.wh..wh.aufs`): ignored, as docker does.
            return Ok(());
        }
        if rest.is_empty() || rest == b"." || rest == b".." {
            return Err(Rejection::BadWhiteout);
        }
        let mut created = Vec::new();
        let dir = match self.root.resolve_dir(parent_lit, false, &mut created) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(e) => return Err(resolve_rej(e, &self.limits)),
        };
        let canon = dir.child(rest);
        if ls.added.contains(&canon) {
            return Ok(());
        }
        let cname = cstring(rest).map_err(|_| Rejection::Nul(PathRole::Name))?;
        self.clear(&dir, &cname, &canon)
    }

    /// Opaque directory: removes everything under `dir` that this layer
    /// did not add.
    fn prune(&mut self, dir: &Dir, ls: &LayerState, depth_left: usize) -> Result<(), Rejection> {
        if depth_left == 0 {
            return Err(Rejection::TooDeep {
                role: PathRole::Name,
                depth: self.limits.max_depth + 1,
                max: self.limits.max_depth,
            });
        }
        for child in fs::list_dir(dir.raw()).map_err(io_rej("readdir"))? {
            let canon = dir.child(&child);
            let cname = cstring(&child).map_err(io_rej("readdir"))?;
            if !ls.added.contains(&canon) {
                self.clear(dir, &cname, &canon)?;
            } else if fs::lstat_at(dir.raw(), &cname).map_err(io_rej("fstatat"))? == HostKind::Dir {
                let fd = fs::open_dir_at(dir.raw(), &cname).map_err(io_rej("openat"))?;
                self.prune(&Dir { fd, canon }, ls, depth_left - 1)?;
            }
        }
        Ok(())
    }

    fn hard_link<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        parent_lit: &[u8],
        name: &[u8],
        ls: &mut LayerState,
    ) -> Result<(), Rejection> {
        let target = entry
            .link_name_bytes()
            .ok_or(Rejection::MissingLinkName {
                kind: "hard link",
                role: PathRole::LinkTarget,
            })?
            .into_owned();
        let tcomps = normalize(&target, PathRole::LinkTarget, &self.limits)?;
        let Some((&tname, tparents)) = tcomps.split_last() else {
            return Err(Rejection::LinkTargetIsDirectory(target));
        };
        let mut created = Vec::new();
        let tdir = match self
            .root
            .resolve_dir(&tparents.join(&b'/'), false, &mut created)
        {
            Ok(Some(d)) => d,
            Ok(None) => return Err(Rejection::LinkTargetMissing(target)),
            Err(e) => return Err(resolve_rej(e, &self.limits)),
        };
        let ctname = cstring(tname).map_err(|_| Rejection::Nul(PathRole::LinkTarget))?;
        match fs::lstat_at(tdir.raw(), &ctname).map_err(io_rej("fstatat"))? {
            HostKind::Missing => return Err(Rejection::LinkTargetMissing(target)),
            HostKind::Dir => return Err(Rejection::LinkTargetIsDirectory(target)),
            HostKind::Symlink | HostKind::Other => {}
        }
        let tcanon = tdir.child(tname);
        let parent = self.parent(parent_lit, ls)?;
        let cname = cstring(name).map_err(|_| Rejection::Nul(PathRole::Name))?;
        let canon = parent.child(name);
        ls.mark_added(&canon);
        if canon == tcanon {
            return Ok(());
        }
        if canon.len() < tcanon.len() && tcanon.starts_with(&canon) && tcanon[canon.len()] == b'/' {
            // Replacing the link's path would remove its own target.
            return Err(Rejection::LinkTargetMissing(target));
        }
        self.clear(&parent, &cname, &canon)?;
        fs::link_at(tdir.raw(), &ctname, parent.raw(), &cname).map_err(io_rej("linkat"))?;
        let meta = self.entry_meta(entry)?;
        let rec = self
            .table
            .get(&tcanon)
            .cloned()
            .unwrap_or_else(|| meta.record(NodeKind::File));
        self.table.insert(canon, rec);
        Ok(())
    }

    /// Mode, ownership, mtime and xattrs from the header and PAX records.
    fn entry_meta<R: Read>(&self, entry: &mut tar::Entry<R>) -> Result<EntryMeta, Rejection> {
        let h = entry.header();
        let bad = |what: &'static str| {
            move |e: io::Error| Rejection::Io {
                op: what,
                source: e,
            }
        };
        // An all-blank numeric field (some writers leave uid/gid/mtime
        // empty) reads as 0; any other unparsable field is an error.
        let old = h.as_old();
        let num = |v: io::Result<u64>, raw: &[u8], what: &'static str| match v {
            Ok(v) => Ok(v),
            Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
            Err(e) => Err(bad(what)(e)),
        };
        let mut meta = EntryMeta {
            mode: h.mode().map_err(bad("header mode"))? & 0o7777,
            uid: num(h.uid(), &old.uid, "header uid")?,
            gid: num(h.gid(), &old.gid, "header gid")?,
            mtime: num(h.mtime(), &old.mtime, "header mtime")?,
            xattrs: Vec::new(),
        };
        if let Some(pax) = entry.pax_extensions().map_err(bad("PAX records"))? {
            for ext in pax {
                let ext = ext.map_err(bad("PAX records"))?;
                let key = ext.key_bytes();
                if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                    meta.xattrs.push((x.to_vec(), ext.value_bytes().to_vec()));
                } else if key.starts_with(b"GNU.sparse.") {
                    return Err(Rejection::Sparse);
                } else if key == b"mtime" {
                    // Seconds with an optional fraction; negative → 0.
                    let v = ext.value_bytes();
                    let int = v.split(|&b| b == b'.').next().unwrap_or(b"");
                    if let Some(s) = std::str::from_utf8(int)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                    {
                        meta.mtime = u64::try_from(s).unwrap_or(0);
                    }
                }
            }
        }
        meta.xattrs.sort();
        meta.xattrs.dedup_by(|a, b| a.0 == b.0);
        Ok(meta)
    }

    /// Sets the `user.*` xattrs on the host file; failures (a host file
    /// system without user xattrs, a value too big for it) are ignored:
    /// the table has them.
    fn set_user_xattrs(&self, fd: RawFd, meta: &EntryMeta) {
        for (k, v) in &meta.xattrs {
            if k.starts_with(b"user.") {
                if let Ok(ck) = cstring(k) {
                    let _ = fs::fsetxattr(fd, &ck, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
