//! The root filesystem of an image: an ext4 file built from the staged
//! tree and the [`MetadataTable`] of [`crate::unpack`], without root and
//! without a loop device, and cached per image.
//!
//! [`build_rootfs_image`] runs on the caller's thread and blocks:
//!
//! 1. walk the staged tree (never following symlinks), check it against
//!    the table (every path has a record of the same kind, and every
//!    record a path), and size the image ([`size`]);
//! 2. `mkfs.ext4 -d STAGING` (e2fsprogs 1.47: `-d` takes a directory)
//!    into a temporary sparse file next to `dest`: 4 KiB blocks, 256-byte
//!    inodes, `-N` from the tree, no reserved blocks, no journal unless
//!    asked (the base is attached read-only);
//! 3. ONE `debugfs -w -f CMDFILE` batch ([`script`]) that replaces each
//!    device/fifo placeholder by its node (`rm`, `mknod`, the device
//!    number in `i_block`), sets every path's uid, gid, full `i_mode`
//!    (file type + setuid/setgid/sticky + permissions) and mtime
//!    (`set_inode_field`), its xattrs (`ea_set -f VALUEFILE`, values are
//!    binary), and adds the guest init's mount points
//!    ([`MOUNT_POINTS`]) that the image lacks;
//! 4. rename into place.
//!
//! A failed build leaves nothing behind. Our init is not put in the
//! image: the default initramfs carries it and switches root into the
//! image.
//!
//! [`cached_rootfs`] adds the cache: a lock file next to the image, so
//! that concurrent runs for the same image build it once.

pub mod script;
pub mod size;

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::unpack::{MetadataTable, NodeKind, Record};
use script::{abs, device_blocks, entry, ext4_time, split_parent, Arg, Script};
use size::{TreeCount, BLOCK, INODE_SIZE};

/// Directories the guest init moves its mounts to (or writes to), added
/// at the image's root when missing: (name, mode).
pub const MOUNT_POINTS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("root", 0o700),
    ("etc", 0o755),
];

/// How to build the image.
#[derive(Clone, Debug)]
pub struct RootfsOptions {
    /// Smallest image (bytes; rounded up to a MiB). Default 32 MiB.
    pub min_size_bytes: u64,
    /// Free space on top of the estimate (bytes). Default 16 MiB.
    pub headroom_bytes: u64,
    /// Give the file system a journal of this many MiB (0: none, the
    /// default: the base image is attached read-only).
    pub journal_mib: u64,
    /// Volume label (at most 16 bytes). Default `locald-image`.
    pub label: String,
    /// Add [`MOUNT_POINTS`] when missing. Default true.
    pub mount_points: bool,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        RootfsOptions {
            min_size_bytes: 32 << 20,
            headroom_bytes: 16 << 20,
            journal_mib: 0,
            label: "locald-image".into(),
            mount_points: true,
        }
    }
}

/// What a build did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootfsStats {
    /// The image file's (apparent) size; it is sparse.
    pub size_bytes: u64,
    /// Inodes the file system was made with.
    pub inodes: u64,
    /// Paths in the staged tree (the root included).
    pub entries: u64,
    /// Bytes of distinct regular files.
    pub data_bytes: u64,
    /// Device nodes and fifos made.
    pub special_nodes: u64,
    /// Extended attributes set.
    pub xattrs: u64,
    /// Mount points added.
    pub mount_points_added: u64,
    /// debugfs commands run.
    pub commands: u64,
    /// mkfs attempts (2 when the estimate was too small).
    pub mkfs_attempts: u32,
    /// Time in `mkfs.ext4`.
    pub mkfs_time: Duration,
    /// Time in `debugfs`.
    pub debugfs_time: Duration,
}

/// Why a path could not be put in the image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error(
        "its name holds a newline or carriage return, which a debugfs command file cannot express"
    )]
    Unexpressible,
    #[error("its debugfs command would exceed {max} bytes")]
    LineTooLong { max: usize },
    #[error("the staged tree has it but the metadata table has no record of it")]
    NoRecord,
    #[error("the metadata table has a record of it but the staged tree does not have it")]
    NotStaged,
    #[error("the metadata table says {record} but the staged tree has {staged}")]
    KindMismatch {
        record: &'static str,
        staged: &'static str,
    },
    #[error("{which} {value} does not fit ext4's 32-bit ids")]
    IdTooLarge { which: &'static str, value: u64 },
    #[error(
        "device number {major}:{minor} is out of range (major at most 4095, minor at most 1048575)"
    )]
    DeviceNumber { major: u32, minor: u32 },
    #[error("extended attribute '{name}': {why}")]
    Xattr { name: String, why: &'static str },
}

/// Why the image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {tool} (install e2fsprogs): {source}")]
    ToolMissing {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    #[error("debugfs could not apply the metadata table: {errors}")]
    Debugfs { errors: String },
    #[error("image path {path}: {problem}")]
    Entry { path: String, problem: EntryProblem },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Ext4Error + 'a {
    move |source| Ext4Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A file removed on drop unless kept.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `<dir of dest>/.<name of dest>.<tag>-<pid>-<n>`.
fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    parent_of(dest).join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// One path of the staged tree.
struct Staged {
    /// Canonical path (`""` for the root).
    path: Vec<u8>,
    kind: &'static str,
    /// What `mkfs.ext4 -d` copies from the host file into the inode.
    host: HostMeta,
}

/// The inode fields `mkfs.ext4 -d` copies from the host (`lstat`): the
/// commands for fields that already have the record's value are skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HostMeta {
    uid: u32,
    gid: u32,
    /// Full `st_mode`.
    mode: u32,
    mtime: i64,
}

impl HostMeta {
    fn of(md: &fs::Metadata) -> HostMeta {
        HostMeta {
            uid: md.uid(),
            gid: md.gid(),
            mode: md.mode(),
            mtime: md.mtime(),
        }
    }
}

fn kind_name(k: NodeKind) -> &'static str {
    match k {
        NodeKind::File => "a regular file",
        NodeKind::Dir => "a directory",
        NodeKind::Symlink => "a symlink",
        // Staged as placeholders.
        NodeKind::CharDevice { .. } | NodeKind::BlockDevice { .. } | NodeKind::Fifo => {
            "a regular file"
        }
    }
}

fn staged_kind(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symlink"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() || ft.is_socket() {
        "a special file"
    } else {
        "something unknown"
    }
}

/// Walks `root` without following symlinks: the paths (sorted, parents
/// first) and the counts for sizing.
fn walk(root: &Path) -> Result<(Vec<Staged>, TreeCount), Ext4Error> {
    let md = fs::symlink_metadata(root).map_err(io_err("reading staging directory", root))?;
    if !md.is_dir() {
        return Err(Ext4Error::Io {
            action: "reading staging directory",
            path: root.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotADirectory),
        });
    }
    let mut count = TreeCount::default();
    let mut out = vec![Staged {
        path: Vec::new(),
        kind: "a directory",
        host: HostMeta::of(&md),
    }];
    let mut seen_inodes = std::collections::HashSet::new();
    // (host dir, canonical path)
    let mut stack = vec![(root.to_path_buf(), Vec::<u8>::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err("reading directory", &dir))? {
            let e = e.map_err(io_err("reading directory", &dir))?;
            names.push(e.file_name());
        }
        names.sort();
        count.add_dir(names.iter().map(|n| n.len()));
        for name in names {
            let host = dir.join(&name);
            let md = fs::symlink_metadata(&host).map_err(io_err("reading", &host))?;
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            let ft = md.file_type();
            if ft.is_file() {
                if md.nlink() < 2 || seen_inodes.insert((md.dev(), md.ino())) {
                    count.add_file(md.len());
                }
            } else if ft.is_symlink() {
                if md.len() >= 60 {
                    count.long_symlinks += 1;
                }
            } else if ft.is_dir() {
                stack.push((host, path.clone()));
            }
            out.push(Staged {
                path,
                kind: staged_kind(ft),
                host: HostMeta::of(&md),
            });
        }
    }
    count.entries = out.len() as u64;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((out, count))
}

/// Checks the tree against the table: same paths, same kinds.
fn check_tree(tree: &[Staged], table: &MetadataTable) -> Result<(), Ext4Error> {
    let mut staged = tree.iter().peekable();
    let mut records = table.iter().peekable();
    loop {
        match (staged.peek(), records.peek()) {
            (None, None) => return Ok(()),
            (Some(s), Some((p, r))) if s.path.as_slice() == *p => {
                let want = kind_name(r.kind);
                if s.kind != want {
                    return Err(entry(
                        p,
                        EntryProblem::KindMismatch {
                            record: want,
                            staged: s.kind,
                        },
                    ));
                }
                staged.next();
                records.next();
            }
            (Some(s), Some((p, _))) if s.path.as_slice() < *p => {
                return Err(entry(&s.path, EntryProblem::NoRecord))
            }
            (Some(s), None) => return Err(entry(&s.path, EntryProblem::NoRecord)),
            (_, Some((p, _))) => return Err(entry(p, EntryProblem::NotStaged)),
        }
    }
}

/// True for the xattr namespaces ext4 stores (and debugfs can set).
fn xattr_name_ok(name: &[u8]) -> Result<(), &'static str> {
    const PREFIXES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];
    const EXACT: [&[u8]; 2] = [b"system.posix_acl_access", b"system.posix_acl_default"];
    if name.len() > 255 {
        return Err("name longer than 255 bytes");
    }
    if EXACT.contains(&name) {
        return Ok(());
    }
    match PREFIXES.iter().find(|p| name.starts_with(p)) {
        Some(p) if name.len() > p.len() => Ok(()),
        Some(_) => Err("empty name after the namespace"),
        None => Err("not in the user, trusted, security or system.posix_acl_* namespaces"),
    }
}

/// File type bits of `i_mode`.
fn type_bits(kind: NodeKind) -> u32 {
    match kind {
        NodeKind::File => 0o100000,
        NodeKind::Dir => 0o040000,
        NodeKind::Symlink => 0o120000,
        NodeKind::CharDevice { .. } => 0o020000,
        NodeKind::BlockDevice { .. } => 0o060000,
        NodeKind::Fifo => 0o010000,
    }
}

/// Builder state for the command file.
struct Plan<'a> {
    script: Script,
    /// Where xattr value files go.
    values_dir: &'a Path,
    stats: RootfsStats,
}

impl Plan<'_> {
    fn sif(&mut self, path: &[u8], field: &str, value: &str) -> Result<(), Ext4Error> {
        self.script.line(
            path,
            &[
                Arg::Word("set_inode_field"),
                Arg::Quoted(&abs(path)),
                Arg::Word(field),
                Arg::Word(value),
            ],
        )
    }

    /// uid, gid, mode, mtime of one inode; with `host` (what mkfs copied
    /// into it), only the fields that differ. A time after 2038 is always
    /// set (its epoch bits live in `mtime_extra`).
    fn fields(
        &mut self,
        path: &[u8],
        uid: u64,
        gid: u64,
        mode: u32,
        mtime: u64,
        host: Option<HostMeta>,
    ) -> Result<(), Ext4Error> {
        for (which, v) in [("uid", uid), ("gid", gid)] {
            if v >= u64::from(u32::MAX) {
                return Err(entry(path, EntryProblem::IdTooLarge { which, value: v }));
            }
        }
        let h = host.as_ref();
        if h.is_none_or(|h| u64::from(h.uid) != uid) {
            self.sif(path, "uid", &uid.to_string())?;
        }
        if h.is_none_or(|h| u64::from(h.gid) != gid) {
            self.sif(path, "gid", &gid.to_string())?;
        }
        if h.is_none_or(|h| h.mode != mode) {
            self.sif(path, "mode", &format!("0{mode:o}"))?;
        }
        let (secs, epoch) = ext4_time(mtime);
        if h.is_none_or(|h| h.mtime < 0 || h.mtime as u64 != secs) || epoch != 0 {
            self.sif(path, "mtime", &format!("@{secs}"))?;
            self.sif(path, "mtime_extra", &epoch.to_string())?;
        }
        Ok(())
    }

    /// `cd "/parent"` then `CMD "name" ARGS…`.
    fn in_parent(&mut self, path: &[u8], cmd: &str, args: &[Arg<'_>]) -> Result<(), Ext4Error> {
        let (parent, name) = split_parent(path);
        self.script
            .line(path, &[Arg::Word("cd"), Arg::Quoted(&parent)])?;
        let mut line = vec![Arg::Word(cmd), Arg::Quoted(name)];
        line.extend_from_slice(args);
        self.script.line(path, &line)
    }

    /// The commands for one record; `host`: what mkfs copied into the
    /// inode from the staged file (`None`: set every field).
    fn record(&mut self, path: &[u8], r: &Record, host: Option<HostMeta>) -> Result<(), Ext4Error> {
        // A new node (mknod) has none of the host's fields.
        let host = if r.kind.is_special() { None } else { host };
        match r.kind {
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                let (b0, b1) = device_blocks(major, minor)
                    .ok_or_else(|| entry(path, EntryProblem::DeviceNumber { major, minor }))?;
                let t = if matches!(r.kind, NodeKind::CharDevice { .. }) {
                    "c"
                } else {
                    "b"
                };
                self.in_parent(path, "rm", &[])?;
                self.script.line(
                    path,
                    &[
                        Arg::Word("mknod"),
                        Arg::Quoted(split_parent(path).1),
                        Arg::Word(t),
                        Arg::Word("0"),
                        Arg::Word("0"),
                    ],
                )?;
                if b0 != 0 {
                    self.sif(path, "block[0]", &b0.to_string())?;
                }
                if b1 != 0 {
                    self.sif(path, "block[1]", &b1.to_string())?;
                }
                self.stats.special_nodes += 1;
            }
            NodeKind::Fifo => {
                self.in_parent(path, "rm", &[])?;
                self.script.line(
                    path,
                    &[
                        Arg::Word("mknod"),
                        Arg::Quoted(split_parent(path).1),
                        Arg::Word("p"),
                    ],
                )?;
                self.stats.special_nodes += 1;
            }
            NodeKind::File | NodeKind::Dir | NodeKind::Symlink => {}
        }
        // Symlink permissions mean nothing on Linux; ext4 keeps 0777.
        let perm = if r.kind == NodeKind::Symlink {
            0o777
        } else {
            r.mode & 0o7777
        };
        self.fields(path, r.uid, r.gid, type_bits(r.kind) | perm, r.mtime, host)?;
        for (name, value) in &r.xattrs {
            xattr_name_ok(name).map_err(|why| {
                entry(
                    path,
                    EntryProblem::Xattr {
                        name: String::from_utf8_lossy(name).into_owned(),
                        why,
                    },
                )
            })?;
            let file = self.values_dir.join(format!("v{}", self.stats.xattrs));
            fs::write(&file, value).map_err(io_err("writing xattr value", &file))?;
            let file_bytes = file.as_os_str().as_bytes().to_vec();
            self.script.line(
                path,
                &[
                    Arg::Word("ea_set"),
                    Arg::Word("-f"),
                    Arg::Quoted(&file_bytes),
                    Arg::Quoted(&abs(path)),
                    Arg::Quoted(name),
                ],
            )?;
            self.stats.xattrs += 1;
        }
        Ok(())
    }

    fn mount_point(&mut self, name: &str, mode: u32, mtime: u64) -> Result<(), Ext4Error> {
        self.in_parent(name.as_bytes(), "mkdir", &[])?;
        self.fields(name.as_bytes(), 0, 0, 0o040000 | mode, mtime, None)?;
        self.stats.mount_points_added += 1;
        Ok(())
    }
}

/// Runs a tool, capturing stderr.
fn run(tool: &'static str, cmd: &mut Command) -> Result<String, Ext4Error> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| Ext4Error::ToolMissing { tool, source })?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stderr)
    } else {
        Err(Ext4Error::Tool {
            tool,
            status: out.status.to_string(),
            stderr: stderr.trim().to_string(),
        })
    }
}

/// debugfs' stderr without its version banner; empty when all went well.
fn debugfs_errors(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// True when mkfs failed for lack of space (the estimate was too small).
fn out_of_space(e: &Ext4Error) -> bool {
    match e {
        Ext4Error::Tool { stderr, .. } => {
            let s = stderr.to_ascii_lowercase();
            s.contains("no space") || s.contains("could not allocate")
        }
        _ => false,
    }
}

/// Builds the ext4 image of `staging` + `table` at `dest` (replaced if it
/// exists). See the module documentation. `staging` is only read.
pub fn build_rootfs_image(
    staging: &Path,
    table: &MetadataTable,
    dest: &Path,
    opts: &RootfsOptions,
) -> Result<RootfsStats, Ext4Error> {
    let (tree, count) = walk(staging)?;
    check_tree(&tree, table)?;
    let root_mtime = table.get(b"").map_or(0, |r| r.mtime);
    let missing: Vec<(&str, u32)> = if opts.mount_points {
        MOUNT_POINTS
            .iter()
            .copied()
            .filter(|(n, _)| table.get(n.as_bytes()).is_none())
            .collect()
    } else {
        Vec::new()
    };

    let work = TempDir(sibling(dest, "work"));
    fs::create_dir_all(&work.0).map_err(io_err("creating", &work.0))?;
    let mut plan = Plan {
        script: Script::default(),
        values_dir: &work.0,
        stats: RootfsStats::default(),
    };
    // check_tree: `tree` and `table` list the same paths in the same order.
    for (staged, (path, r)) in tree.iter().zip(table.iter()) {
        script::check_path(path)?;
        // The root: whatever mkfs did with it, set everything.
        let host = (!path.is_empty()).then_some(staged.host);
        plan.record(path, r, host)?;
    }
    for (name, mode) in &missing {
        plan.mount_point(name, *mode, root_mtime)?;
    }
    let cmd_file = work.0.join("commands");
    fs::write(&cmd_file, plan.script.text()).map_err(io_err("writing", &cmd_file))?;
    let mut stats = plan.stats;
    stats.commands = plan.script.lines();
    stats.entries = count.entries;
    stats.data_bytes = count.data_bytes;
    let mut count = count;
    count.xattr_entries = table.iter().filter(|(_, r)| !r.xattrs.is_empty()).count() as u64;

    let tmp = TempFile(Some(sibling(dest, "tmp")));
    let tmp_path = tmp.0.clone().unwrap_or_default();
    let mut sizing = size::plan(
        &count,
        missing.len() as u64,
        opts.headroom_bytes,
        opts.min_size_bytes,
        opts.journal_mib << 20,
    );
    loop {
        stats.mkfs_attempts += 1;
        let _ = fs::remove_file(&tmp_path);
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-b"])
            .arg(BLOCK.to_string())
            .arg("-I")
            .arg(INODE_SIZE.to_string())
            .arg("-N")
            .arg(sizing.inodes.to_string())
            .args(["-m", "0", "-L", &opts.label, "-E", "root_owner=0:0"]);
        if opts.journal_mib == 0 {
            mkfs.args(["-O", "^has_journal"]);
        } else {
            mkfs.arg("-J").arg(format!("size={}", opts.journal_mib));
        }
        mkfs.arg("-d")
            .arg(staging)
            .arg(&tmp_path)
            .arg(format!("{}k", sizing.size_bytes / 1024));
        let t = Instant::now();
        let res = run("mkfs.ext4", &mut mkfs);
        stats.mkfs_time += t.elapsed();
        match res {
            Ok(_) => break,
            Err(e) if stats.mkfs_attempts == 1 && out_of_space(&e) => {
                sizing.size_bytes *= 2;
                sizing.inodes *= 2;
            }
            Err(e) => return Err(e),
        }
    }
    stats.size_bytes = sizing.size_bytes;
    stats.inodes = sizing.inodes;

    let t = Instant::now();
    let mut debugfs = Command::new("debugfs");
    debugfs.arg("-w").arg("-f").arg(&cmd_file).arg(&tmp_path);
    let stderr = run("debugfs", &mut debugfs)?;
    stats.debugfs_time = t.elapsed();
    let errors = debugfs_errors(&stderr);
    if !errors.is_empty() {
        return Err(Ext4Error::Debugfs { errors });
    }
    fs::rename(&tmp_path, dest).map_err(io_err("renaming into place", dest))?;
    let mut tmp = tmp;
    tmp.0 = None;
    Ok(stats)
}

/// A cached image: where it is, and the build's stats when this call
/// built it (`None`: it was there already).
#[derive(Clone, Debug)]
pub struct CachedRootfs {
    pub path: PathBuf,
    pub built: Option<RootfsStats>,
}

/// Why [`cached_rootfs`] failed: staging (the caller's error) or the build.
#[derive(Debug, thiserror::Error)]
pub enum CachedError<E: std::error::Error + 'static> {
    #[error("staging the image: {0}")]
    Stage(#[source] E),
    #[error(transparent)]
    Build(#[from] Ext4Error),
}

/// The image at `dest` (e.g. `<cache>/images/rootfs/<digest>.ext4`),
/// built first if missing.
///
/// Takes an exclusive `flock` on `<dest>.lock` (created, and left in
/// place: removing lock files races), so concurrent callers for the same
/// `dest` build once and the others wait and reuse it. Under the lock:
/// if `dest` exists it is returned; otherwise leftovers of interrupted
/// builds of `dest` (`.<name>.{staging,work,tmp}-*` next to it) are
/// removed, `stage` is called with a fresh empty staging directory next to
/// `dest` (it unpacks the layers there and returns the table), the image
/// is built, and the staging directory is removed (also on failure).
pub fn cached_rootfs<E: std::error::Error + 'static>(
    dest: &Path,
    opts: &RootfsOptions,
    stage: impl FnOnce(&Path) -> Result<MetadataTable, E>,
) -> Result<CachedRootfs, CachedError<E>> {
    let dir = parent_of(dest);
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let mut lock_name = dest.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock_path = PathBuf::from(lock_name);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("opening lock file", &lock_path))?;
    loop {
        // SAFETY: flock on a descriptor we own; it blocks until granted.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err("locking", &lock_path)(e).into());
        }
    }
    // The lock is released when `lock` is closed, at return.
    if fs::symlink_metadata(dest).is_ok_and(|m| m.is_file()) {
        return Ok(CachedRootfs {
            path: dest.to_path_buf(),
            built: None,
        });
    }
    remove_leftovers(dest);
    let staging = TempDir(sibling(dest, "staging"));
    fs::create_dir(&staging.0).map_err(io_err("creating", &staging.0))?;
    let table = stage(&staging.0).map_err(CachedError::Stage)?;
    let stats = build_rootfs_image(&staging.0, &table, dest, opts)?;
    drop(staging);
    Ok(CachedRootfs {
        path: dest.to_path_buf(),
        built: Some(stats),
    })
}

/// Removes `.<name>.{staging,work,tmp}-*` next to `dest` (called under
/// the lock: their builders are gone).
fn remove_leftovers(dest: &Path) {
    let Some(name) = dest.file_name() else {
        return;
    };
    let dir = parent_of(dest);
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(name.as_bytes());
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.as_bytes();
        let Some(rest) = n.strip_prefix(prefix.as_slice()) else {
            continue;
        };
        if [&b".staging-"[..], b".work-", b".tmp-"]
            .iter()
            .any(|t| rest.starts_with(t))
        {
            let p = e.path();
            let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_names() {
        assert!(xattr_name_ok(b"user.a").is_ok());
        assert!(xattr_name_ok(b"security.capability").is_ok());
        assert!(xattr_name_ok(b"trusted.overlay.opaque").is_ok());
        assert!(xattr_name_ok(b"system.posix_acl_access").is_ok());
        assert!(xattr_name_ok(b"user.").is_err());
        assert!(xattr_name_ok(b"system.other").is_err());
        assert!(xattr_name_ok(b"-r").is_err());
        assert!(xattr_name_ok(b"foo").is_err());
        assert!(xattr_name_ok(&[b'u'; 300]).is_err());
    }

    #[test]
    fn debugfs_stderr() {
        assert_eq!(debugfs_errors("debugfs 1.47.0 (5-Feb-2023)\n"), "");
        assert_eq!(
            debugfs_errors("debugfs 1.47.0 (5-Feb-2023)\n/x: File not found by ext2_lookup \n"),
            "/x: File not found by ext2_lookup "
        );
    }

    fn rec(kind: NodeKind) -> Record {
        Record {
            kind,
            mode: 0o4755,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn tree_and_table_must_agree() {
        let s = |p: &str, kind| Staged {
            path: p.as_bytes().to_vec(),
            kind,
            host: HostMeta::default(),
        };
        let table: MetadataTable = vec![
            (b"".to_vec(), rec(NodeKind::Dir)),
            (b"a".to_vec(), rec(NodeKind::File)),
            (
                b"d".to_vec(),
                rec(NodeKind::CharDevice { major: 1, minor: 3 }),
            ),
        ]
        .into();
        let good = [
            s("", "a directory"),
            s("a", "a regular file"),
            s("d", "a regular file"),
        ];
        check_tree(&good, &table).unwrap();
        let e = check_tree(&good[..2], &table).unwrap_err();
        assert_eq!(e.to_string(), "image path /d: the metadata table has a record of it but the staged tree does not have it");
        let extra = [
            s("", "a directory"),
            s("a", "a regular file"),
            s("b", "a symlink"),
            s("d", "a regular file"),
        ];
        let e = check_tree(&extra, &table).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("image path /b: the staged tree has it"),
            "{e}"
        );
        let wrong = [
            s("", "a directory"),
            s("a", "a directory"),
            s("d", "a regular file"),
        ];
        let e = check_tree(&wrong, &table).unwrap_err();
        assert_eq!(e.to_string(), "image path /a: the metadata table says a regular file but the staged tree has a directory");
    }

    #[test]
    fn commands_for_records() {
        let dir = std::env::temp_dir().join(format!("locald-rootfs-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut plan = Plan {
            script: Script::default(),
            values_dir: &dir,
            stats: RootfsStats::default(),
        };
        let mut r = rec(NodeKind::CharDevice { major: 1, minor: 3 });
        r.mode = 0o666;
        r.xattrs = vec![(b"user.x".to_vec(), b"\0\xff".to_vec())];
        plan.record(b"dev/null \"x\"", &r, None).unwrap();
        let v = dir.join("v0");
        assert_eq!(fs::read(&v).unwrap(), b"\0\xff");
        let text = String::from_utf8(plan.script.text().to_vec()).unwrap();
        assert_eq!(
            text,
            format!(
                "cd \"/dev\"\n\
                 rm \"null \"\"x\"\"\"\n\
                 mknod \"null \"\"x\"\"\" c 0 0\n\
                 set_inode_field \"/dev/null \"\"x\"\"\" block[0] 259\n\
                 set_inode_field \"/dev/null \"\"x\"\"\" uid 0\n\
                 set_inode_field \"/dev/null \"\"x\"\"\" gid 0\n\
                 set_inode_field \"/dev/null \"\"x\"\"\" mode 020666\n\
                 set_inode_field \"/dev/null \"\"x\"\"\" mtime @0\n\
                 set_inode_field \"/dev/null \"\"x\"\"\" mtime_extra 0\n\
                 ea_set -f \"{}\" \"/dev/null \"\"x\"\"\" \"user.x\"\n",
                v.display()
            )
        );
        let mut big = rec(NodeKind::File);
        big.uid = u64::from(u32::MAX);
        assert!(matches!(
            plan.record(b"f", &big, None),
            Err(Ext4Error::Entry {
                problem: EntryProblem::IdTooLarge { which: "uid", .. },
                ..
            })
        ));
        let dev = rec(NodeKind::BlockDevice {
            major: 5000,
            minor: 0,
        });
        assert!(matches!(
            plan.record(b"b", &dev, None),
            Err(Ext4Error::Entry {
                problem: EntryProblem::DeviceNumber {
                    major: 5000,
                    minor: 0
                },
                ..
            })
        ));
        let mut bad_x = rec(NodeKind::File);
        bad_x.xattrs = vec![(b"system.nfs4_acl".to_vec(), b"v".to_vec())];
        assert!(plan.record(b"f", &bad_x, None).is_err());
        let e = plan
            .record(b"a\nb", &rec(NodeKind::File), None)
            .unwrap_err();
        assert!(e.to_string().contains("/a\\nb"), "{e}");
        // With what mkfs copied, only the differing fields are set; a
        // device node always gets all of them.
        let mut plan = Plan {
            script: Script::default(),
            values_dir: &dir,
            stats: RootfsStats::default(),
        };
        let mut r = rec(NodeKind::File);
        r.uid = 1000;
        r.mtime = 5;
        let host = HostMeta {
            uid: 0,
            gid: 0,
            mode: 0o104755,
            mtime: 5,
        };
        plan.record(b"f", &r, Some(host)).unwrap();
        assert_eq!(plan.script.text(), b"set_inode_field \"/f\" uid 1000\n");
        r.mtime = 4_102_444_800;
        let host = HostMeta {
            mtime: 4_102_444_800,
            uid: 1000,
            ..host
        };
        plan.record(b"g", &r, Some(host)).unwrap();
        assert_eq!(plan.script.lines(), 3, "times after 2038 are always set");
        plan.record(b"n", &rec(NodeKind::Fifo), Some(HostMeta::default()))
            .unwrap();
        assert_eq!(plan.script.lines(), 3 + 3 + 5, "cd, rm, mknod, all fields");
        fs::remove_dir_all(&dir).unwrap();
    }
}
