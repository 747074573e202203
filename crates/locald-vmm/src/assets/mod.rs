//! Default guest assets: the kernel (`kernel`: built once from embedded
//! build inputs), the initramfs (`initramfs`: embedded `locald-init` + a
//! static busybox from `busybox`), the small per-run command archive
//! (`command`) and ext4 root images (`rootfs`). This file holds what they
//! share: errors, the cache directory, atomic writes, the ELF check and
//! running host tools.
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

mod busybox;
mod command;
mod initramfs;
mod kernel;
mod rootfs;
pub use busybox::*;
pub use command::{command_archive, GuestCommand, GuestImageRun, GuestRoot, GuestShare};
pub use initramfs::*;
pub use kernel::*;
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

#[cfg(test)]
mod tests;
