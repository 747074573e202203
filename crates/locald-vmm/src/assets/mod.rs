//! Default guest assets: the kernel (built once from embedded build inputs),
//! the initramfs (embedded `locald-init` + a static busybox) and the small
//! per-run command archive (`command`).
//!
//! Runs on the caller's thread, before the VM is created. Everything lands in
//! [`cache_dir()`] and is keyed by a content hash, so a cache entry is never
//! stale: a changed input gives a new file name. Files are written atomically
//! (temporary name + `rename`); the kernel build, which takes minutes, runs
//! under an exclusive lock file so concurrent processes build it once.
//!
//! Every asset exists per guest architecture ([`GuestArch`]): the
//! `*_for(arch)` functions take it, the older ones without the suffix are
//! the x86_64 guest.
//!
//! Cache layout:
//! - x86_64: `kernel-<key>/{vmlinux,System.map,.config}` with `<key>` = first
//!   16 hex digits of sha256(build-kernel.sh ‖ microvm.config ‖
//!   patches/*.patch sorted by name); `kernel-<key>.lock` next to it;
//! - aarch64: `kernel-aarch64-<key>/{Image,System.map,.config}` with `<key>`
//!   over build-kernel.sh ‖ microvm-aarch64.config ‖ the patches without
//!   `-x86-` in their name; `kernel-aarch64-<key>.lock` next to it (see
//!   [`kernel_key_for`]);
//! - `initramfs-<hash>.cpio` (uncompressed newc), `<hash>` over the init and
//!   busybox bytes (see [`initramfs_hash`]; the two arches' inits differ, so
//!   their hashes do);
//! - `busybox-<debian-version>/busybox` when the host has no static x86-64
//!   busybox, `busybox-aarch64-<debian-version>/busybox` for the arm64 guest
//!   (Debian's `busybox-static:arm64`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::config::GuestArch;
use crate::cpio::{CpioBuilder, CpioError};

mod command;
mod rootfs;
pub use command::{command_archive, GuestCommand, GuestImageRun, GuestRoot, GuestShare};
pub use rootfs::{build_rootfs, RootfsImage};

include!(concat!(env!("OUT_DIR"), "/kernel_inputs.rs"));

/// The guest init (`crates/guest-init`), statically linked, built by build.rs.
static INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/locald-init"));

/// The aarch64 guest init, cross-built by build.rs (or copied from
/// `LOCALD_VMM_GUEST_INIT_AARCH64`); empty when neither was possible.
static INIT_BINARY_AARCH64: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/locald-init-aarch64"));

/// Why build.rs embedded no aarch64 init (empty when it did).
static INIT_AARCH64_MISSING: &str =
    include_str!(concat!(env!("OUT_DIR"), "/locald-init-aarch64.missing"));

/// Host path checked first for a usable static busybox.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Version tag of the initramfs layout; bump when [`assemble_initramfs`]
/// changes so cached images are rebuilt.
const INITRAMFS_LAYOUT: &[u8] = b"locald-vmm initramfs layout 2\0";

/// Applets that get a real symlink in the initramfs. Every other applet is
/// listed in `/.locald/applets` instead: busybox's shell runs applets
/// without a PATH lookup, and the init runs `/bin/busybox` under the
/// applet's name when a command is not on PATH. Each cpio symlink costs the
/// guest kernel ~25 ms of emulated work on a software-KVM host (path walk
/// per entry), so 270 of them cost seconds of boot there.
pub const CORE_APPLETS: &[&str] = &["bin/sh", "usr/bin/env"];

/// Where the full applet list goes (one name per line).
pub const APPLET_LIST: &str = ".locald/applets";

/// Errors while preparing guest assets. Each variant names the file or
/// command involved.
#[derive(Debug, Error)]
pub enum AssetError {
    /// A filesystem operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("writing", "creating directory", ...).
        action: &'static str,
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A required host program is not installed.
    #[error("`{command}` is not installed or not in PATH ({hint})")]
    CommandNotFound {
        /// Program name.
        command: String,
        /// What to install.
        hint: &'static str,
    },
    /// A host program could not be started.
    #[error("cannot run `{command}`: {source}")]
    CommandSpawn {
        /// Command line.
        command: String,
        /// Underlying error.
        source: io::Error,
    },
    /// A host program exited unsuccessfully.
    #[error("`{command}` failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    CommandFailed {
        /// Command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Tail of its stderr, if captured.
        stderr: String,
    },
    /// A binary that must be static is not a static ELF of the guest's
    /// architecture.
    #[error("{} is not a statically linked {arch} ELF executable: {reason}", path.display())]
    NotStatic {
        /// The architecture it had to be for.
        arch: GuestArch,
        /// The file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// An expected output file is missing.
    #[error("{} is missing after {step}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// The step that should have produced it.
        step: String,
    },
    /// A command produced output we cannot use.
    #[error("unexpected output from `{command}`: {detail}")]
    BadOutput {
        /// Command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// The cache directory could be controlled by another user.
    #[error("asset cache: {0}")]
    Untrusted(#[from] crate::hostdir::HostDirError),
    /// This build of locald-vmm embeds no guest init for `arch`.
    #[error("no {arch} guest init is embedded in this locald-vmm build: {why}")]
    NoGuestInit {
        /// The guest architecture asked for.
        arch: GuestArch,
        /// What build.rs found missing and what to install or set.
        why: String,
    },
    /// An archive entry was rejected.
    #[error("building {archive}: {source}")]
    Cpio {
        /// Archive being built.
        archive: &'static str,
        /// Underlying error.
        source: CpioError,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AssetError + 'a {
    move |source| AssetError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The embedded guest init binary (static x86-64 ELF).
pub fn init_binary() -> &'static [u8] {
    INIT_BINARY
}

/// The embedded guest init for `arch` (a static ELF for that machine), or
/// [`AssetError::NoGuestInit`] saying what to install when this build has
/// none (the aarch64 init needs the cross toolchain at build time, or
/// `LOCALD_VMM_GUEST_INIT_AARCH64`; see docs/guest-init.md).
pub fn init_binary_for(arch: GuestArch) -> Result<&'static [u8], AssetError> {
    match arch {
        GuestArch::X86_64 => Ok(INIT_BINARY),
        GuestArch::Aarch64 if !INIT_BINARY_AARCH64.is_empty() => Ok(INIT_BINARY_AARCH64),
        GuestArch::Aarch64 => Err(AssetError::NoGuestInit {
            arch,
            why: INIT_AARCH64_MISSING.trim().to_owned(),
        }),
    }
}

/// The embedded kernel build inputs: `(relative name, contents)`.
pub fn kernel_inputs() -> &'static [(&'static str, &'static [u8])] {
    KERNEL_INPUTS
}

// ---------------------------------------------------------------------------
// Cache directory
// ---------------------------------------------------------------------------

/// Cache root: `$LOCALD_VMM_CACHE`, else `$XDG_CACHE_HOME/locald-vmm`, else
/// `$HOME/.cache/locald-vmm`, else `<tmp>/locald-vmm-cache`. Empty variables
/// are ignored, as is a relative `XDG_CACHE_HOME` (per the XDG spec).
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|k| std::env::var_os(k))
}

/// [`cache_dir`], checked and created: every level `lstat`ed, the
/// directory itself owned by us and not writable by others, missing levels
/// made one at a time with mode 0700 (see [`crate::hostdir`]). The kernel
/// build script runs from it and the kernel boots from it, so another user
/// must not be able to plant either (the `<tmp>` fallback especially).
pub fn trusted_cache_dir() -> Result<PathBuf, AssetError> {
    Ok(crate::hostdir::ensure_private_dir(&cache_dir())?)
}

/// [`cache_dir`] with an injectable environment lookup.
fn cache_dir_from(get: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let get = |k: &str| get(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = get("LOCALD_VMM_CACHE") {
        return d;
    }
    if let Some(d) = get("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return d.join("locald-vmm");
    }
    if let Some(h) = get("HOME") {
        return h.join(".cache/locald-vmm");
    }
    std::env::temp_dir().join("locald-vmm-cache")
}

fn create_dir_all(dir: &Path) -> Result<(), AssetError> {
    fs::create_dir_all(dir).map_err(io_err("creating directory", dir))
}

// ---------------------------------------------------------------------------
// Small helpers: hashing, temp dirs, atomic writes, ELF check, commands
// ---------------------------------------------------------------------------

fn hex16(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Directory removed (recursively) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new_in(parent: &Path, tag: &str) -> Result<Self, AssetError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        create_dir_all(parent)?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = parent.join(format!(".tmp-{tag}-{}-{n}", std::process::id()));
        match fs::remove_dir_all(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing stale", &p)(e)),
        }
        fs::create_dir(&p).map_err(io_err("creating directory", &p))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes `data` to `dest` via a temporary file in the same directory and
/// `rename`, so readers never see a partial file.
fn write_atomic(dest: &Path, data: &[u8], mode: u32) -> Result<(), AssetError> {
    use std::os::unix::fs::PermissionsExt;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = dest.as_os_str().to_owned();
    tmp_name.push(format!(".tmp.{}.{n}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let res = (|| {
        let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(data).map_err(io_err("writing", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("setting permissions of", &tmp))?;
        f.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, dest).map_err(io_err("renaming into place", dest))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// ELF `e_machine` of a guest architecture (`EM_X86_64` = 62,
/// `EM_AARCH64` = 183).
pub const fn elf_machine(arch: GuestArch) -> u16 {
    match arch {
        GuestArch::X86_64 => 62,
        GuestArch::Aarch64 => 183,
    }
}

/// Checks that `b` is a 64-bit little-endian x86-64 ELF executable without a
/// `PT_INTERP` program header (no dynamic loader needed). Returns why not.
pub fn check_static_elf(b: &[u8]) -> Result<(), String> {
    check_static_elf_for(GuestArch::X86_64, b)
}

/// [`check_static_elf`] for the machine of `arch` (x86-64 or AArch64).
pub fn check_static_elf_for(arch: GuestArch, b: &[u8]) -> Result<(), String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if b[4] != 2 || b[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let machine = u16_at(18);
    if machine != elf_machine(arch) {
        return Err(format!(
            "ELF machine {machine} is not {arch} ({})",
            elf_machine(arch)
        ));
    }
    let e_type = u16_at(16);
    if e_type != 2 && e_type != 3 {
        return Err(format!("ELF type {e_type} is not an executable"));
    }
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&b[32..40]);
    let phoff = usize::try_from(u64::from_le_bytes(phoff)).map_err(|_| "bad e_phoff")?;
    let (phentsize, phnum) = (usize::from(u16_at(54)), usize::from(u16_at(56)));
    for i in 0..phnum {
        let off = phoff.saturating_add(i.saturating_mul(phentsize));
        let Some(ph) = b.get(off..off.saturating_add(4)) else {
            return Err("truncated program headers".into());
        };
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == 3 {
            return Err("it has a PT_INTERP header (dynamically linked)".into());
        }
    }
    Ok(())
}

fn read_static_elf(arch: GuestArch, path: &Path) -> Result<Vec<u8>, AssetError> {
    let bytes = fs::read(path).map_err(io_err("reading", path))?;
    check_static_elf_for(arch, &bytes).map_err(|reason| AssetError::NotStatic {
        arch,
        path: path.to_owned(),
        reason,
    })?;
    Ok(bytes)
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn spawn_error(cmd: &Command, hint: &'static str, source: io::Error) -> AssetError {
    if source.kind() == io::ErrorKind::NotFound {
        AssetError::CommandNotFound {
            command: cmd.get_program().to_string_lossy().into_owned(),
            hint,
        }
    } else {
        AssetError::CommandSpawn {
            command: describe(cmd),
            source,
        }
    }
}

/// Runs `cmd` capturing stdout/stderr; errors on a non-zero exit.
fn run_captured(cmd: &mut Command, hint: &'static str) -> Result<Vec<u8>, AssetError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, hint, e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(AssetError::CommandFailed {
            command: describe(cmd),
            status: out.status,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(out.stdout)
}

// ---------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------

/// Paths of the default guest kernel in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultKernel {
    /// The kernel to boot. x86_64: the uncompressed ELF `vmlinux` (PVH
    /// entry). aarch64: the uncompressed arm64 `Image` (the format
    /// VZLinuxBootLoader and `qemu -kernel` take); the field keeps its
    /// historical name.
    pub vmlinux: PathBuf,
    /// Its symbol map (for RIP sampling / diagnostics).
    pub system_map: PathBuf,
}

/// Config fragment of `arch` among the kernel inputs.
pub const fn kernel_fragment(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "microvm.config",
        GuestArch::Aarch64 => "microvm-aarch64.config",
    }
}

/// File name of the bootable kernel in a kernel cache directory.
pub const fn kernel_image_name(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "vmlinux",
        GuestArch::Aarch64 => "Image",
    }
}

/// Whether `arch`'s kernel build applies patch `name` (`patches/….patch`):
/// x86_64 applies all, aarch64 those without `-x86-` in the name (the others
/// change only `arch/x86`). The rule of `build-kernel.sh` and `hash.sh`.
pub fn kernel_patch_applies(arch: GuestArch, name: &str) -> bool {
    name.starts_with("patches/")
        && name.ends_with(".patch")
        && (arch == GuestArch::X86_64 || !name.contains("-x86-"))
}

/// Name of `arch`'s kernel cache directory for `key` (`kernel-<key>` for
/// x86_64, `kernel-aarch64-<key>`); the lock file adds `.lock`.
pub fn kernel_dir_name(arch: GuestArch, key: &str) -> String {
    match arch {
        GuestArch::X86_64 => format!("kernel-{key}"),
        GuestArch::Aarch64 => format!("kernel-aarch64-{key}"),
    }
}

/// Cache key of a set of kernel build inputs: first 16 hex digits of the
/// sha256 of `build-kernel.sh`, `microvm.config`, then the `patches/*.patch`
/// sorted by name, concatenated (the rule of `guest/kernel/hash.sh`). Other
/// inputs (helper scripts) are not hashed. The x86_64 key; see
/// [`kernel_key_for`].
pub fn kernel_key(inputs: &[(&str, &[u8])]) -> String {
    kernel_key_for(GuestArch::X86_64, inputs)
}

/// [`kernel_key`] of `arch`: over `build-kernel.sh`, the arch's fragment
/// ([`kernel_fragment`]) and the patches it applies
/// ([`kernel_patch_applies`]); `hash.sh ARCH` prints the same.
pub fn kernel_key_for(arch: GuestArch, inputs: &[(&str, &[u8])]) -> String {
    let fragment = kernel_fragment(arch);
    let rank = |name: &str| match name {
        "build-kernel.sh" => Some(0),
        n if n == fragment => Some(1),
        n if kernel_patch_applies(arch, n) => Some(2),
        _ => None,
    };
    let mut hashed: Vec<(u8, &str, &[u8])> = inputs
        .iter()
        .filter_map(|&(n, d)| rank(n).map(|r| (r, n, d)))
        .collect();
    hashed.sort();
    let mut h = Sha256::new();
    for (_, _, data) in hashed {
        h.update(data);
    }
    hex16(&h.finalize())
}

/// Cache key of the embedded kernel inputs (names `kernel-<key>/`).
pub fn default_kernel_key() -> String {
    kernel_key(KERNEL_INPUTS)
}

/// Cache key of the embedded kernel inputs for `arch` (names
/// [`kernel_dir_name`]).
pub fn default_kernel_key_for(arch: GuestArch) -> String {
    kernel_key_for(arch, KERNEL_INPUTS)
}

/// Returns the default x86_64 guest kernel, building it on first use
/// (several minutes; the build script's output is shown on stderr). See
/// the module docs for the cache layout.
pub fn default_kernel() -> Result<DefaultKernel, AssetError> {
    default_kernel_for(GuestArch::X86_64)
}

/// Returns the default guest kernel of `arch`, building it on first use
/// (the aarch64 one is cross-built with Debian's `gcc-aarch64-linux-gnu`,
/// which the build script installs when run as root; ~10 min on 2 cores).
/// Builds of the same key are serialised by a lock file, so concurrent
/// processes build it once.
pub fn default_kernel_for(arch: GuestArch) -> Result<DefaultKernel, AssetError> {
    kernel_in_for(&trusted_cache_dir()?, arch, KERNEL_INPUTS)
}

fn kernel_paths(arch: GuestArch, dir: &Path) -> DefaultKernel {
    DefaultKernel {
        vmlinux: dir.join(kernel_image_name(arch)),
        system_map: dir.join("System.map"),
    }
}

fn kernel_complete(k: &DefaultKernel) -> bool {
    k.vmlinux.is_file() && k.system_map.is_file()
}

/// [`default_kernel`] for an explicit cache directory and input set.
#[cfg(test)]
fn kernel_in(cache: &Path, inputs: &[(&str, &[u8])]) -> Result<DefaultKernel, AssetError> {
    kernel_in_for(cache, GuestArch::X86_64, inputs)
}

/// [`default_kernel_for`] for an explicit cache directory and input set.
/// The script is run as `build-kernel.sh OUT_DIR` for x86_64 (as before
/// arches existed) and `build-kernel.sh --arch aarch64 OUT_DIR`.
fn kernel_in_for(
    cache: &Path,
    arch: GuestArch,
    inputs: &[(&str, &[u8])],
) -> Result<DefaultKernel, AssetError> {
    let key = kernel_key_for(arch, inputs);
    let dir_name = kernel_dir_name(arch, &key);
    let dir = cache.join(&dir_name);
    let kernel = kernel_paths(arch, &dir);
    if kernel_complete(&kernel) {
        return Ok(kernel);
    }
    create_dir_all(cache)?;
    let lock_path = cache.join(format!("{dir_name}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("opening lock file", &lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "locald-vmm: waiting for another process building the guest kernel (lock {})",
                lock_path.display()
            );
            lock.lock().map_err(io_err("locking", &lock_path))?;
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("locking", &lock_path)(e)),
    }
    // Someone else may have finished while we waited.
    if kernel_complete(&kernel) {
        return Ok(kernel);
    }

    let work = TempDir::new_in(cache, &format!("{dir_name}-inputs"))?;
    for (name, data) in inputs {
        let p = work.0.join(name);
        if let Some(parent) = p.parent() {
            create_dir_all(parent)?;
        }
        let mode = if name.ends_with(".sh") { 0o755 } else { 0o644 };
        write_atomic(&p, data, mode)?;
    }
    eprintln!(
        "locald-vmm: building the default {arch} guest kernel into {} (one time, takes minutes)",
        dir.display()
    );
    let mut cmd = Command::new("bash");
    cmd.arg("build-kernel.sh");
    if arch != GuestArch::X86_64 {
        cmd.args(["--arch", arch.name()]);
    }
    cmd.arg(&dir)
        .current_dir(&work.0)
        // The script keeps its downloads and work trees under the same root.
        .env("LOCALD_VMM_CACHE", cache)
        .stdin(Stdio::null());
    // Progress goes to our stderr: stdout may carry the guest console.
    if let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    }
    let status = cmd
        .status()
        .map_err(|e| spawn_error(&cmd, "apt-get install bash", e))?;
    if !status.success() {
        return Err(AssetError::CommandFailed {
            command: format!("{} (in {})", describe(&cmd), work.0.display()),
            status,
            stderr: String::new(),
        });
    }
    for p in [&kernel.vmlinux, &kernel.system_map] {
        if !p.is_file() {
            return Err(AssetError::Missing {
                path: p.clone(),
                step: "build-kernel.sh".into(),
            });
        }
    }
    drop(lock);
    Ok(kernel)
}

// ---------------------------------------------------------------------------
// Busybox
// ---------------------------------------------------------------------------

/// Returns a static busybox: [`HOST_BUSYBOX`] if it is a static ELF, else a
/// cached `busybox-<version>/busybox`, else Debian's `busybox-static`
/// fetched with `apt-get download` + `dpkg -x` (needs `apt-get update` to
/// have run once). The x86_64 guest's; see [`busybox_for`].
pub fn busybox() -> Result<PathBuf, AssetError> {
    busybox_for(GuestArch::X86_64)
}

/// [`busybox`] for the guest architecture `arch`: [`HOST_BUSYBOX`] if it is
/// a static ELF for that machine, else the cached copy, else Debian's
/// `busybox-static` for that architecture (`busybox-static:arm64` for
/// aarch64, which needs `dpkg --add-architecture arm64` and `apt-get
/// update` once; `scripts/setup-host.sh` does both), cached in
/// `busybox-aarch64-<version>/`.
pub fn busybox_for(arch: GuestArch) -> Result<PathBuf, AssetError> {
    busybox_in(&trusted_cache_dir()?, Path::new(HOST_BUSYBOX), arch)
}

fn is_static_file(arch: GuestArch, p: &Path) -> bool {
    fs::read(p).is_ok_and(|b| check_static_elf_for(arch, &b).is_ok())
}

/// Prefix of the cached busybox directories of `arch` (before the version).
fn busybox_dir_prefix(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "busybox-",
        GuestArch::Aarch64 => "busybox-aarch64-",
    }
}

/// Debian's architecture name (`dpkg --print-architecture`) of `arch`.
pub const fn debian_arch(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "amd64",
        GuestArch::Aarch64 => "arm64",
    }
}

fn busybox_in(cache: &Path, host: &Path, arch: GuestArch) -> Result<PathBuf, AssetError> {
    if is_static_file(arch, host) {
        return Ok(host.to_owned());
    }
    let prefix = busybox_dir_prefix(arch);
    if let Ok(rd) = fs::read_dir(cache) {
        let mut cached: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path().join("busybox"))
            .filter(|p| is_static_file(arch, p))
            .collect();
        cached.sort();
        if let Some(p) = cached.pop() {
            return Ok(p);
        }
    }

    // x86_64 keeps the plain package name (the host's architecture on the
    // x86_64 hosts this has always run on).
    let package = match arch {
        GuestArch::X86_64 => "busybox-static".to_owned(),
        _ => format!("busybox-static:{}", debian_arch(arch)),
    };
    let work = TempDir::new_in(cache, "busybox")?;
    let hint = match arch {
        GuestArch::X86_64 => "a Debian-based host with apt-get; run `apt-get update` first",
        GuestArch::Aarch64 => {
            "a Debian-based host with apt-get and the arm64 architecture: \
             `dpkg --add-architecture arm64 && apt-get update` (scripts/setup-host.sh does it)"
        }
    };
    let mut download = Command::new("apt-get");
    download.args(["download", &package]).current_dir(&work.0);
    // apt drops privileges to _apt, which cannot write into root's cache.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        download.args(["-o", "APT::Sandbox::User=root"]);
    }
    run_captured(&mut download, hint)?;
    let deb = fs::read_dir(&work.0)
        .map_err(io_err("listing", &work.0))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| AssetError::Missing {
            path: work.0.join("busybox-static_*.deb"),
            step: format!("apt-get download {package}"),
        })?;
    let version = deb_version(&deb.file_name().unwrap_or_default().to_string_lossy());
    let root = work.0.join("root");
    run_captured(
        Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        "dpkg (Debian-based host)",
    )?;
    let found = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| AssetError::Missing {
            path: root.join("bin/busybox"),
            step: format!("dpkg -x {}", deb.display()),
        })?;
    let bytes = read_static_elf(arch, &found)?;
    let dest_dir = cache.join(format!("{prefix}{version}"));
    create_dir_all(&dest_dir)?;
    let dest = dest_dir.join("busybox");
    write_atomic(&dest, &bytes, 0o755)?;
    Ok(dest)
}

/// Version part of a `.deb` file name (`busybox-static_1%3a1.35.0-4_amd64.deb`
/// → `1.35.0-4` with the epoch dropped), made safe for a directory name.
fn deb_version(file_name: &str) -> String {
    let v = file_name.split('_').nth(1).unwrap_or("unknown");
    let v = v.rsplit_once("%3a").map_or(v, |(_, rest)| rest);
    let v = v.rsplit_once(':').map_or(v, |(_, rest)| rest);
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+.-~".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Initramfs
// ---------------------------------------------------------------------------

/// Base directories of the initramfs and their modes.
const BASE_DIRS: &[(&str, u32)] = &[
    (".locald", 0o755),
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
];

const ETC_PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n";
const ETC_GROUP: &[u8] = b"root:x:0:\ntty:x:5:\n";

/// Content hash naming `initramfs-<hash>.cpio`: first 16 hex digits of
/// sha256(layout tag ‖ len(init) as u64 LE ‖ init ‖ busybox).
pub fn initramfs_hash(init: &[u8], busybox: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(INITRAMFS_LAYOUT);
    h.update((init.len() as u64).to_le_bytes());
    h.update(init);
    h.update(busybox);
    hex16(&h.finalize())
}

/// Returns the default initramfs (uncompressed newc), assembling it on first
/// use: `/init` (the embedded locald-init), `/bin/busybox`, symlinks for
/// [`CORE_APPLETS`], the list of all applets in [`APPLET_LIST`], the base
/// directories, `/dev/console`, `/dev/null` and a
/// minimal `/etc/passwd` and `/etc/group`.
pub fn default_initramfs() -> Result<PathBuf, AssetError> {
    default_initramfs_for(GuestArch::X86_64)
}

/// [`default_initramfs`] of the guest architecture `arch`: its embedded
/// init ([`init_binary_for`]) and busybox ([`busybox_for`]). The applet
/// list of a busybox this host cannot run (another architecture) is read
/// from the binary itself ([`applets_from_binary`]).
pub fn default_initramfs_for(arch: GuestArch) -> Result<PathBuf, AssetError> {
    let init = init_binary_for(arch)?;
    let cache = trusted_cache_dir()?;
    let bb = busybox_in(&cache, Path::new(HOST_BUSYBOX), arch)?;
    initramfs_in_for(&cache, arch, init, &bb)
}

/// [`default_initramfs`] for an explicit cache, init and busybox path.
#[cfg(test)]
fn initramfs_in(cache: &Path, init: &[u8], busybox: &Path) -> Result<PathBuf, AssetError> {
    initramfs_in_for(cache, GuestArch::X86_64, init, busybox)
}

/// [`default_initramfs_for`] for an explicit cache, init and busybox path.
fn initramfs_in_for(
    cache: &Path,
    arch: GuestArch,
    init: &[u8],
    busybox: &Path,
) -> Result<PathBuf, AssetError> {
    let bb = read_static_elf(arch, busybox)?;
    let path = cache.join(format!("initramfs-{}.cpio", initramfs_hash(init, &bb)));
    if path.is_file() {
        return Ok(path);
    }
    let applets = if arch == GuestArch::host() {
        applet_list(busybox)?
    } else {
        applets_from_binary(&bb).ok_or_else(|| AssetError::BadOutput {
            command: format!("reading the applet names of {}", busybox.display()),
            detail: "no busybox applet name table (\"[\\0[[\\0…\") found".into(),
        })?
    };
    write_initramfs(&path, init, &bb, &applets)?;
    Ok(path)
}

/// The applets of a busybox binary, read from its `applet_names` table (the
/// NUL-separated, sorted names starting `"[\0[[\0"` and ending with an
/// empty name), for a busybox this host cannot run. Returned as install
/// paths like [`applet_list`]'s, which only the names matter of:
/// [`CORE_APPLETS`] get their real path, every other name `bin/<name>`.
/// `None` if the table is not found or does not contain `sh`.
pub fn applets_from_binary(bin: &[u8]) -> Option<Vec<String>> {
    const START: &[u8] = b"\0[\0[[\0";
    let at = bin.windows(START.len()).position(|w| w == START)? + 1;
    let mut names: Vec<&str> = Vec::new();
    for raw in bin[at..].split(|&b| b == 0) {
        if raw.is_empty() {
            break;
        }
        let name = std::str::from_utf8(raw).ok()?;
        let plausible = name.len() <= 64
            && name.bytes().all(|c| c.is_ascii_graphic() && c != b'/')
            && names.last().is_none_or(|prev| *prev < name);
        if !plausible || names.len() >= 4096 {
            return None;
        }
        names.push(name);
    }
    if !names.contains(&"sh") {
        return None;
    }
    Some(
        names
            .iter()
            .map(|n| {
                CORE_APPLETS
                    .iter()
                    .find(|c| c.rsplit('/').next() == Some(*n))
                    .map_or_else(|| format!("bin/{n}"), |c| (*c).to_owned())
            })
            .collect(),
    )
}

fn write_initramfs(
    path: &Path,
    init: &[u8],
    busybox: &[u8],
    applets: &[String],
) -> Result<(), AssetError> {
    let archive = assemble_initramfs(init, busybox, applets)?;
    if let Some(parent) = path.parent() {
        create_dir_all(parent)?;
    }
    write_atomic(path, &archive, 0o644)
}

/// Runs `busybox --list-full` and returns the applet paths (relative, e.g.
/// `bin/sh`, `usr/bin/[`).
fn applet_list(busybox: &Path) -> Result<Vec<String>, AssetError> {
    let mut cmd = Command::new(busybox);
    cmd.arg("--list-full");
    let out = run_captured(&mut cmd, "a static busybox")?;
    let text = String::from_utf8(out).map_err(|_| AssetError::BadOutput {
        command: describe(&cmd),
        detail: "not UTF-8".into(),
    })?;
    let applets: Vec<String> = text
        .lines()
        .map(|l| l.trim().trim_start_matches('/'))
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(bad) = applets
        .iter()
        .find(|a| a.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
    {
        return Err(AssetError::BadOutput {
            command: describe(&cmd),
            detail: format!("bad applet path {bad:?}"),
        });
    }
    if !applets.iter().any(|a| a == "bin/sh") {
        return Err(AssetError::BadOutput {
            command: describe(&cmd),
            detail: "no bin/sh applet".into(),
        });
    }
    Ok(applets)
}

/// Builds the initramfs archive (pure). Directories come first, parents
/// before children; applets that would replace `/init` or `/bin/busybox`
/// are skipped.
fn assemble_initramfs(
    init: &[u8],
    busybox: &[u8],
    applets: &[String],
) -> Result<Vec<u8>, AssetError> {
    let cpio = |source| AssetError::Cpio {
        archive: "initramfs",
        source,
    };
    let mut dirs: BTreeSet<String> = BASE_DIRS.iter().map(|(d, _)| (*d).to_owned()).collect();
    for a in applets {
        let mut parent = Path::new(a).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
    }
    let mut b = CpioBuilder::new();
    // BTreeSet order puts "usr" before "usr/bin": parents first.
    for d in &dirs {
        let mode = BASE_DIRS
            .iter()
            .find(|(n, _)| n == d)
            .map_or(0o755, |(_, m)| *m);
        b.dir(d, mode).map_err(cpio)?;
    }
    b.char_dev("dev/console", 0o600, 5, 1).map_err(cpio)?;
    b.char_dev("dev/null", 0o666, 1, 3).map_err(cpio)?;
    b.file("etc/passwd", 0o644, ETC_PASSWD).map_err(cpio)?;
    b.file("etc/group", 0o644, ETC_GROUP).map_err(cpio)?;
    b.file("init", 0o755, init).map_err(cpio)?;
    b.file("bin/busybox", 0o755, busybox).map_err(cpio)?;
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for a in applets {
        if a == "init" || a == "bin/busybox" || dirs.contains(a) || !seen.insert(a.as_str()) {
            continue;
        }
        if let Some(name) = Path::new(a).file_name() {
            names.insert(name.to_string_lossy().into_owned());
        }
        if CORE_APPLETS.contains(&a.as_str()) {
            b.symlink(a, "/bin/busybox").map_err(cpio)?;
        }
    }
    let list: String = names.iter().map(|n| format!("{n}\n")).collect();
    b.file(APPLET_LIST, 0o644, list.as_bytes()).map_err(cpio)?;
    Ok(b.finish())
}

#[cfg(test)]
mod tests;
