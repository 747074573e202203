//! The default guest kernel: its cache key over the embedded build inputs
//! (per architecture), and the build itself (`build-kernel.sh`, minutes,
//! under an exclusive lock so concurrent processes build it once). Runs on
//! the caller's thread.

use super::*;

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

pub(super) fn kernel_paths(arch: GuestArch, dir: &Path) -> DefaultKernel {
    DefaultKernel {
        vmlinux: dir.join(kernel_image_name(arch)),
        system_map: dir.join("System.map"),
    }
}

pub(super) fn kernel_complete(k: &DefaultKernel) -> bool {
    k.vmlinux.is_file() && k.system_map.is_file()
}

/// [`default_kernel`] for an explicit cache directory and input set.
#[cfg(test)]
pub(super) fn kernel_in(
    cache: &Path,
    inputs: &[(&str, &[u8])],
) -> Result<DefaultKernel, AssetError> {
    kernel_in_for(cache, GuestArch::X86_64, inputs)
}

/// [`default_kernel_for`] for an explicit cache directory and input set.
/// The script is run as `build-kernel.sh OUT_DIR` for x86_64 (as before
/// arches existed) and `build-kernel.sh --arch aarch64 OUT_DIR`.
pub(super) fn kernel_in_for(
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
