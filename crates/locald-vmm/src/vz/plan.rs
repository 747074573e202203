//! The VZ plan: exactly what the Virtualization.framework backend will
//! create for one VM, translated from [`VmConfig`] and checked against
//! VZ's limits. Pure data and pure logic (it only reads the kernel's first
//! bytes), compiled and tested on every OS; `backend.rs` turns a plan into
//! Objective-C objects without making any decision of its own.
//!
//! Every option VZ cannot honour is refused with one [`PlanError`]; options
//! that do not apply to VZ at all (`seccomp`, a `system_map` without
//! profiling, `cpu_compat = Auto`) are ignored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::kernel::KernelFormat;
use crate::config::{
    CacheMode, ConsoleConfig, CpuCompat, DiskConfig, GuestArch, NetBackendConfig, ShareCache,
    ShareConfig, SharedBuffer, VmConfig,
};

/// The guest's vsock context id under VZ. `VZVirtioSocketDevice` does not
/// let the host choose it; the framework gives the guest CID 3 (seen with
/// a debugger, Code-Hex/vz issue #61).
pub const VZ_GUEST_CID: u64 = 3;

/// The kernel command line the VMM puts before the user's text: the
/// virtio console (`hvc0`, VZ has no 8250 UART), and an immediate reboot
/// on panic, which under VZ stops the VM (the backend then reports
/// [`crate::ExitStatus::Panic`] if the console showed a panic message).
pub const VZ_BASE_CMDLINE: &str = "console=hvc0 panic=-1";

/// Extra command line for the default guest kernel.
pub const VZ_DEFAULT_GUEST_CMDLINE: &str = "quiet";

/// The virtio-fs tag of the Rosetta share (the name Apple's sample and
/// the guest init's binfmt_misc registration use).
pub const ROSETTA_TAG: &str = "rosetta";

/// Longest virtio-blk serial VZ accepts (`blockDeviceIdentifier`: ASCII,
/// at most 20 bytes, as in the virtio spec).
pub const BLOCK_ID_MAX: usize = 20;

/// The kernel and initrd to boot: paths the guest-image stage made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootImage {
    /// Kernel file (arm64 `Image` on Apple Silicon, `bzImage` on Intel).
    pub kernel: PathBuf,
    /// Initial ramdisk (the per-run initrd of the default guest).
    pub initrd: Option<PathBuf>,
    /// The user's command-line text, appended to the VMM's own.
    pub user_cmdline: Option<String>,
}

/// Inputs of the plan that [`VmConfig`] does not carry (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Attach Rosetta (`--rosetta`; will become `VmConfig::rosetta`).
    pub rosetta: bool,
    /// The kernel is the default guest kernel: add
    /// [`VZ_DEFAULT_GUEST_CMDLINE`].
    pub default_kernel: bool,
    /// The host's architecture (a parameter so tests can play both Macs).
    pub host_arch: GuestArch,
    /// Guest→host vsock ports the backend listens on. VZ needs one
    /// `VZVirtioSocketListener` per port (the KVM muxer routes any port),
    /// so only these reach `<uds_path>_<port>`. Default: the agent's
    /// readiness port.
    pub guest_to_host_ports: Vec<u32>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            rosetta: false,
            default_kernel: true,
            host_arch: GuestArch::host(),
            guest_to_host_ports: vec![crate::agent::READY_PORT],
        }
    }
}

/// VZ's CPU and memory limits (`VZVirtualMachineConfiguration`'s class
/// properties). The backend reads the real values at run time
/// (`VzLimits::query` in backend.rs); [`VzLimits::DOCUMENTED`] holds
/// the lower bounds public code reports, for planning without a Mac.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VzLimits {
    /// `minimumAllowedCPUCount` (1).
    pub min_cpus: u64,
    /// `maximumAllowedCPUCount` (the host's CPU count, capped by VZ).
    pub max_cpus: u64,
    /// `minimumAllowedMemorySize` in bytes (128 MiB).
    pub min_memory: u64,
    /// `maximumAllowedMemorySize` in bytes (about the host's memory).
    pub max_memory: u64,
}

impl VzLimits {
    /// Lower bounds as reported by public code (1 CPU, 128 MiB) and no
    /// upper bounds beyond our own ([`crate::config::MAX_VCPUS`] and
    /// [`crate::config::MAX_MEMORY_MIB`]).
    pub const DOCUMENTED: VzLimits = VzLimits {
        min_cpus: 1,
        max_cpus: crate::config::MAX_VCPUS as u64,
        min_memory: 128 << 20,
        max_memory: crate::config::MAX_MEMORY_MIB << 20,
    };
}

/// `VZLinuxBootLoader`'s three properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootLoaderPlan {
    /// `kernelURL`.
    pub kernel: PathBuf,
    /// `initialRamdiskURL`.
    pub initrd: Option<PathBuf>,
    /// `commandLine`.
    pub cmdline: String,
}

/// The serial console (`VZVirtioConsoleDeviceSerialPortConfiguration`
/// with a `VZFileHandleSerialPortAttachment`). Guest output always goes
/// through a pipe the backend reads, so that it can see a kernel panic.
#[derive(Clone, Debug)]
pub enum ConsolePlan {
    /// Our stdin to the guest, the guest's output to our stdout.
    Stdio,
    /// `input` to the guest, its output into `output`.
    Buffer {
        input: Vec<u8>,
        output: SharedBuffer,
    },
    /// Output to our stderr, no input.
    Stderr,
    /// Output read and dropped, no input.
    Null,
}

/// `VZDiskImageCachingMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskCaching {
    /// `VZDiskImageCachingModeAutomatic`.
    Automatic,
    /// `VZDiskImageCachingModeCached`: through the host's cache.
    Cached,
    /// `VZDiskImageCachingModeUncached`: around it.
    Uncached,
}

/// `VZDiskImageSynchronizationMode`: what a guest flush does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskSync {
    /// `…Full`: to permanent storage (`F_FULLFSYNC`).
    Full,
    /// `…Fsync`: `fsync(2)` (the drive may still cache).
    Fsync,
    /// `…None`: nothing.
    None,
}

/// One `VZVirtioBlockDeviceConfiguration` over a
/// `VZDiskImageStorageDeviceAttachment`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskPlan {
    /// The raw image.
    pub path: PathBuf,
    /// `readOnly:`.
    pub read_only: bool,
    /// `cachingMode:`.
    pub caching: DiskCaching,
    /// `synchronizationMode:`.
    pub sync: DiskSync,
    /// `blockDeviceIdentifier` (the guest's GET_ID serial), if any.
    pub block_id: Option<String>,
}

/// One host directory (`VZSharedDirectory`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedDirPlan {
    /// `initWithURL:` (a directory).
    pub host_dir: PathBuf,
    /// `readOnly:`.
    pub read_only: bool,
}

/// What a virtio-fs device exposes under its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShareKind {
    /// `VZSingleDirectoryShare`.
    Single(SharedDirPlan),
    /// `VZMultipleDirectoryShare`: each directory appears in the guest as
    /// a subdirectory of the mount, by name.
    Multiple(Vec<(String, SharedDirPlan)>),
}

/// One `VZVirtioFileSystemDeviceConfiguration`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharePlan {
    /// `initWithTag:` (what the guest mounts).
    pub tag: String,
    /// `share`.
    pub kind: ShareKind,
}

/// The `VZVirtioSocketDeviceConfiguration` and its host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockPlan {
    /// The hybrid socket the bridge serves (`CONNECT <port>\n`).
    pub uds_path: PathBuf,
    /// Host ports the guest may connect to (one listener each).
    pub guest_to_host_ports: Vec<u32>,
}

/// A `VZVirtioNetworkDeviceConfiguration` on `VZNATNetworkDeviceAttachment`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPlan {
    /// `MACAddress`.
    pub mac: [u8; 6],
}

impl NetPlan {
    /// The MAC as `VZMACAddress initWithString:` takes it.
    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Everything the VZ backend creates for one VM.
#[derive(Clone, Debug)]
pub struct VzPlan {
    /// `VZLinuxBootLoader`.
    pub boot: BootLoaderPlan,
    /// `CPUCount`.
    pub cpus: u64,
    /// `memorySize`, bytes (a multiple of 1 MiB).
    pub memory_bytes: u64,
    /// The serial console.
    pub console: ConsolePlan,
    /// Block devices in guest order (root disk first).
    pub disks: Vec<DiskPlan>,
    /// virtio-fs devices, in `ShareConfig::tag` order.
    pub shares: Vec<SharePlan>,
    /// The vsock device, if any.
    pub vsock: Option<VsockPlan>,
    /// The NAT network card, if any.
    pub net: Option<NetPlan>,
    /// A `VZVirtioEntropyDeviceConfiguration`.
    pub entropy: bool,
    /// The Rosetta share's tag, when Rosetta is attached.
    pub rosetta: Option<String>,
    /// Stop the VM (as [`crate::ExitStatus::TimedOut`]) after this long.
    pub timeout: Option<Duration>,
}

/// Why a configuration cannot run under Virtualization.framework.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the {guest} guest cannot run on this {host} Mac: Virtualization.framework runs only guests of the host's architecture (on Apple Silicon, x86_64 binaries run through --rosetta)")]
    Arch { guest: GuestArch, host: GuestArch },
    #[error("cannot read kernel {}: {err}", .path.display())]
    KernelRead { path: PathBuf, err: std::io::Error },
    #[error("kernel {} is {found}; Virtualization.framework on {host} boots {wanted}", .path.display())]
    KernelFormat {
        path: PathBuf,
        found: String,
        host: GuestArch,
        wanted: &'static str,
    },
    #[error("--cpus {cpus} is outside Virtualization.framework's range {min}-{max}")]
    Cpus { cpus: u64, min: u64, max: u64 },
    #[error(
        "--memory {mib} MiB is outside Virtualization.framework's range {min_mib}-{max_mib} MiB"
    )]
    Memory {
        mib: u64,
        min_mib: u64,
        max_mib: u64,
    },
    #[error(
        "--cpu-compat on is for software KVM; the macOS backend has no such path (use auto or off)"
    )]
    CpuCompat,
    #[error("--profile-guest needs the KVM backend (Virtualization.framework exposes no guest registers)")]
    Profile,
    #[error(
        "--net tap needs Linux; on macOS use --net user (NAT through Virtualization.framework)"
    )]
    Tap,
    #[error("--net user,{0} is a passt option; on macOS the network is Virtualization.framework's NAT (publish ports with -p, which goes over vsock)")]
    NetOption(&'static str),
    #[error("vsock guest CID {0} cannot be chosen on macOS: Virtualization.framework always gives the guest CID 3")]
    VsockCid(u64),
    #[error("agent mode needs a vsock socket: the agent-link stage must set VmConfig::vsock before planning")]
    MissingVsock,
    #[error("--share {}: the cache mode {cache:?} cannot be set on macOS (Virtualization.framework's virtio-fs decides its own caching; use the default)", .host_dir.display())]
    ShareCache {
        host_dir: PathBuf,
        cache: ShareCache,
    },
    #[error("invalid disk '{}': the id '{id}' must be ASCII of at most 20 bytes for Virtualization.framework", .path.display())]
    DiskId { path: PathBuf, id: String },
    #[error("--rosetta needs an aarch64 guest on an Apple Silicon Mac (this is a {guest} guest on {host})")]
    Rosetta { guest: GuestArch, host: GuestArch },
}

impl VzPlan {
    /// Plans the VM for `config` booting `boot`. Reads the kernel's first
    /// bytes to check its format; everything else is pure.
    pub fn new(
        config: &VmConfig,
        boot: BootImage,
        opts: &PlanOptions,
        limits: &VzLimits,
    ) -> Result<VzPlan, PlanError> {
        check_unsupported(config, opts)?;
        let format = KernelFormat::of_file(&boot.kernel).map_err(|err| PlanError::KernelRead {
            path: boot.kernel.clone(),
            err,
        })?;
        check_kernel(&boot.kernel, format, opts.host_arch)?;
        let (cpus, memory_bytes) = cpus_and_memory(config, limits)?;
        let disks = config
            .all_disks()
            .map(disk_plan)
            .collect::<Result<Vec<_>, _>>()?;
        let shares = config
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| share_plan(i, s))
            .collect::<Result<Vec<_>, _>>()?;
        let vsock = match (&config.vsock, config.agent) {
            (Some(v), _) if v.guest_cid != VZ_GUEST_CID => {
                return Err(PlanError::VsockCid(v.guest_cid))
            }
            (Some(v), _) => Some(VsockPlan {
                uds_path: v.uds_path.clone(),
                guest_to_host_ports: opts.guest_to_host_ports.clone(),
            }),
            (None, true) => return Err(PlanError::MissingVsock),
            (None, false) => None,
        };
        let net = match &config.net {
            None => None,
            Some(n) => {
                match &n.backend {
                    NetBackendConfig::Tap { .. } => return Err(PlanError::Tap),
                    NetBackendConfig::User {
                        publish,
                        offload,
                        host_loopback,
                    } => {
                        if !publish.is_empty() {
                            return Err(PlanError::NetOption("publish="));
                        }
                        if *offload {
                            return Err(PlanError::NetOption("offload=on"));
                        }
                        if *host_loopback {
                            return Err(PlanError::NetOption("host-loopback=on"));
                        }
                    }
                }
                Some(NetPlan { mac: n.mac })
            }
        };
        let rosetta = if opts.rosetta {
            if config.arch != GuestArch::Aarch64 || opts.host_arch != GuestArch::Aarch64 {
                return Err(PlanError::Rosetta {
                    guest: config.arch,
                    host: opts.host_arch,
                });
            }
            Some(ROSETTA_TAG.to_string())
        } else {
            None
        };
        Ok(VzPlan {
            boot: BootLoaderPlan {
                cmdline: vz_cmdline(opts.default_kernel, boot.user_cmdline.as_deref()),
                kernel: boot.kernel,
                initrd: boot.initrd,
            },
            cpus,
            memory_bytes,
            console: console_plan(&config.console),
            disks,
            shares,
            vsock,
            net,
            entropy: config.rng,
            rosetta,
            timeout: config.timeout,
        })
    }
}

/// The options VZ cannot honour whatever the rest says (cheap: checked
/// before the guest image is resolved, and again by [`VzPlan::new`]).
pub(crate) fn check_unsupported(config: &VmConfig, opts: &PlanOptions) -> Result<(), PlanError> {
    if config.arch != opts.host_arch {
        return Err(PlanError::Arch {
            guest: config.arch,
            host: opts.host_arch,
        });
    }
    if config.cpu_compat == CpuCompat::On {
        return Err(PlanError::CpuCompat);
    }
    if config.profile_hz > 0 {
        return Err(PlanError::Profile);
    }
    Ok(())
}

/// The kernel must be the one format VZ boots on this host.
fn check_kernel(path: &Path, found: KernelFormat, host: GuestArch) -> Result<(), PlanError> {
    let (ok, wanted) = match host {
        GuestArch::Aarch64 => (
            found == KernelFormat::Arm64Image,
            "an uncompressed arm64 Image (arch/arm64/boot/Image)",
        ),
        GuestArch::X86_64 => (
            found == KernelFormat::X86BzImage,
            "an x86 bzImage (arch/x86/boot/bzImage)",
        ),
    };
    let found = found.describe();
    if ok {
        Ok(())
    } else {
        Err(PlanError::KernelFormat {
            path: path.to_path_buf(),
            found,
            host,
            wanted,
        })
    }
}

/// CPU count and memory size in bytes, within VZ's limits.
fn cpus_and_memory(config: &VmConfig, l: &VzLimits) -> Result<(u64, u64), PlanError> {
    let cpus = u64::from(config.vcpus);
    if cpus < l.min_cpus || cpus > l.max_cpus {
        return Err(PlanError::Cpus {
            cpus,
            min: l.min_cpus,
            max: l.max_cpus,
        });
    }
    // Our size is in MiB, so always a multiple of 1 MiB as VZ requires;
    // the limits are rounded inwards to whole MiB.
    let min_mib = l.min_memory.div_ceil(1 << 20);
    let max_mib = l.max_memory >> 20;
    let mib = config.memory_mib;
    if mib < min_mib || mib > max_mib {
        return Err(PlanError::Memory {
            mib,
            min_mib,
            max_mib,
        });
    }
    Ok((cpus, mib << 20))
}

/// `console=hvc0 panic=-1 [quiet] [user text]`.
pub fn vz_cmdline(default_kernel: bool, user: Option<&str>) -> String {
    let mut c = VZ_BASE_CMDLINE.to_string();
    if default_kernel {
        c.push(' ');
        c.push_str(VZ_DEFAULT_GUEST_CMDLINE);
    }
    if let Some(u) = user.map(str::trim).filter(|u| !u.is_empty()) {
        c.push(' ');
        c.push_str(u);
    }
    c
}

fn console_plan(c: &ConsoleConfig) -> ConsolePlan {
    match c {
        ConsoleConfig::Stdio => ConsolePlan::Stdio,
        ConsoleConfig::Buffer { input, output } => ConsolePlan::Buffer {
            input: input.clone(),
            output: output.clone(),
        },
        ConsoleConfig::Stderr => ConsolePlan::Stderr,
        ConsoleConfig::Null => ConsolePlan::Null,
    }
}

/// Our cache mode in VZ's two knobs.
///
/// - `writeback` (host page cache, a guest flush is durable): cached,
///   full sync. `F_FULLFSYNC` is what makes a macOS flush reach the
///   medium, as `fdatasync` does on Linux.
/// - `writethrough` (nothing waits in the host's cache): uncached, full
///   sync. VZ has no per-write `O_DSYNC`: each write bypasses the host
///   cache, and the guest's flushes (which it still sends) are full syncs.
/// - `unsafe` (flushes ignored): cached, no sync.
pub fn cache_modes(c: CacheMode) -> (DiskCaching, DiskSync) {
    match c {
        CacheMode::Writeback => (DiskCaching::Cached, DiskSync::Full),
        CacheMode::Writethrough => (DiskCaching::Uncached, DiskSync::Full),
        CacheMode::Unsafe => (DiskCaching::Cached, DiskSync::None),
    }
}

fn disk_plan(d: &DiskConfig) -> Result<DiskPlan, PlanError> {
    let (caching, sync) = cache_modes(d.cache);
    let block_id = match &d.id {
        Some(id) if id.is_ascii() && id.len() <= BLOCK_ID_MAX => Some(id.clone()),
        Some(id) => {
            return Err(PlanError::DiskId {
                path: d.path.clone(),
                id: id.clone(),
            })
        }
        // As on KVM, the default serial is the image's file name (cut to
        // 20 bytes); a non-ASCII name gets none.
        None => d
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.is_ascii() && !n.is_empty())
            .map(|n| n[..n.len().min(BLOCK_ID_MAX)].to_string()),
    };
    Ok(DiskPlan {
        path: d.path.clone(),
        read_only: d.read_only,
        caching,
        sync,
        block_id,
    })
}

/// One share per [`ShareConfig`]: our configuration gives every host
/// directory its own guest path and so its own tag, hence a single
/// directory share each ([`ShareKind::Multiple`] is for callers that
/// group directories under one tag, see [`multiple_share`]).
fn share_plan(index: usize, s: &ShareConfig) -> Result<SharePlan, PlanError> {
    if s.cache != ShareCache::Auto {
        return Err(PlanError::ShareCache {
            host_dir: s.host_dir.clone(),
            cache: s.cache,
        });
    }
    Ok(SharePlan {
        tag: ShareConfig::tag(index),
        kind: ShareKind::Single(SharedDirPlan {
            host_dir: s.host_dir.clone(),
            read_only: s.read_only,
        }),
    })
}

/// A [`ShareKind::Multiple`] naming each directory after its last path
/// component, made unique with `-2`, `-3`… (VZ raises an exception on
/// names that are empty, `.`, `..` or contain `/`; those get `dir`).
pub fn multiple_share(dirs: &[SharedDirPlan]) -> ShareKind {
    let mut used = std::collections::HashSet::new();
    let named = dirs
        .iter()
        .map(|d| {
            let base = d
                .host_dir
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| !n.is_empty() && *n != "." && *n != ".." && !n.contains('/'))
                .unwrap_or("dir")
                .to_string();
            let mut name = base.clone();
            let mut k = 2;
            while !used.insert(name.clone()) {
                name = format!("{base}-{k}");
                k += 1;
            }
            (name, d.clone())
        })
        .collect();
    ShareKind::Multiple(named)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GuestNet, NetConfig, RootfsConfig, VsockConfig};
    use crate::vz::kernel::tests::{arm64_image, bzimage, elf};
    use crate::vz::kernel::EM_AARCH64;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p = std::env::temp_dir()
                .join(format!("locald-vzplan-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn arm() -> PlanOptions {
        PlanOptions {
            host_arch: GuestArch::Aarch64,
            ..PlanOptions::default()
        }
    }

    fn arm_cfg() -> VmConfig {
        VmConfig {
            arch: GuestArch::Aarch64,
            ..VmConfig::default()
        }
    }

    fn boot(kernel: PathBuf) -> BootImage {
        BootImage {
            kernel,
            initrd: None,
            user_cmdline: None,
        }
    }

    /// Plans `cfg` on an arm64 host with an arm64 Image.
    fn plan(cfg: &VmConfig, opts: &PlanOptions) -> Result<VzPlan, PlanError> {
        let t = Tmp::new("k");
        let k = t.file("Image", &arm64_image());
        VzPlan::new(cfg, boot(k), opts, &VzLimits::DOCUMENTED)
    }

    #[test]
    fn minimal_plan() {
        let t = Tmp::new("min");
        let k = t.file("Image", &arm64_image());
        let i = t.file("initrd", b"x");
        let b = BootImage {
            kernel: k.clone(),
            initrd: Some(i.clone()),
            user_cmdline: Some(" loglevel=7 ".into()),
        };
        let p = VzPlan::new(&arm_cfg(), b, &arm(), &VzLimits::DOCUMENTED).unwrap();
        assert_eq!(p.boot.kernel, k);
        assert_eq!(p.boot.initrd, Some(i));
        assert_eq!(p.boot.cmdline, "console=hvc0 panic=-1 quiet loglevel=7");
        assert_eq!(p.cpus, 2);
        assert_eq!(p.memory_bytes, 128 << 20);
        assert!(matches!(p.console, ConsolePlan::Stdio));
        assert!(p.disks.is_empty() && p.shares.is_empty());
        assert!(p.vsock.is_none() && p.net.is_none() && p.rosetta.is_none());
        assert!(p.entropy);
        assert_eq!(p.timeout, None);
    }

    #[test]
    fn cmdline_forms() {
        assert_eq!(vz_cmdline(false, None), "console=hvc0 panic=-1");
        assert_eq!(vz_cmdline(false, Some("  ")), "console=hvc0 panic=-1");
        assert_eq!(
            vz_cmdline(true, Some("a=b")),
            "console=hvc0 panic=-1 quiet a=b"
        );
    }

    #[test]
    fn intel_mac_takes_bzimage() {
        let t = Tmp::new("x86");
        let k = t.file("bzImage", &bzimage());
        let opts = PlanOptions {
            host_arch: GuestArch::X86_64,
            ..PlanOptions::default()
        };
        let cfg = VmConfig {
            arch: GuestArch::X86_64,
            ..VmConfig::default()
        };
        assert!(VzPlan::new(&cfg, boot(k), &opts, &VzLimits::DOCUMENTED).is_ok());
        // An arm64 Image on an Intel Mac is refused.
        let k = t.file("Image", &arm64_image());
        let e = VzPlan::new(&cfg, boot(k), &opts, &VzLimits::DOCUMENTED).unwrap_err();
        assert!(
            matches!(
                e,
                PlanError::KernelFormat {
                    host: GuestArch::X86_64,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn refuses_wrong_kernels_on_arm() {
        let t = Tmp::new("kern");
        for (name, bytes, needle) in [
            ("bz", bzimage(), "x86 bzImage"),
            ("elf", elf(EM_AARCH64), "aarch64 ELF"),
            ("gz", vec![0x1f, 0x8b, 8, 0], "compressed"),
            ("junk", vec![0u8; 8], "not a kernel"),
        ] {
            let k = t.file(name, &bytes);
            let e = VzPlan::new(&arm_cfg(), boot(k), &arm(), &VzLimits::DOCUMENTED).unwrap_err();
            assert!(matches!(e, PlanError::KernelFormat { .. }), "{name}: {e}");
            assert!(e.to_string().contains(needle), "{name}: {e}");
            assert!(e.to_string().contains("arm64 Image"), "{e}");
        }
        let e = VzPlan::new(
            &arm_cfg(),
            boot(t.0.join("none")),
            &arm(),
            &VzLimits::DOCUMENTED,
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::KernelRead { .. }), "{e}");
    }

    #[test]
    fn refuses_foreign_arch() {
        let cfg = VmConfig {
            arch: GuestArch::X86_64,
            ..VmConfig::default()
        };
        let e = plan(&cfg, &arm()).unwrap_err();
        assert!(
            matches!(
                e,
                PlanError::Arch {
                    guest: GuestArch::X86_64,
                    host: GuestArch::Aarch64
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("--rosetta"), "{e}");
    }

    #[test]
    fn cpu_and_memory_limits() {
        let limits = VzLimits {
            min_cpus: 1,
            max_cpus: 8,
            min_memory: 128 << 20,
            // Not a whole MiB: rounded down.
            max_memory: (4096 << 20) + 12345,
        };
        let t = Tmp::new("lim");
        let k = t.file("Image", &arm64_image());
        let run = |vcpus: u8, memory_mib: u64| {
            let cfg = VmConfig {
                vcpus,
                memory_mib,
                ..arm_cfg()
            };
            VzPlan::new(&cfg, boot(k.clone()), &arm(), &limits)
        };
        let p = run(8, 4096).unwrap();
        assert_eq!((p.cpus, p.memory_bytes), (8, 4096 << 20));
        assert_eq!(p.memory_bytes % (1 << 20), 0);
        assert!(matches!(
            run(9, 512),
            Err(PlanError::Cpus {
                cpus: 9,
                min: 1,
                max: 8
            })
        ));
        assert!(matches!(run(0, 512), Err(PlanError::Cpus { cpus: 0, .. })));
        assert!(matches!(
            run(1, 127),
            Err(PlanError::Memory {
                mib: 127,
                min_mib: 128,
                max_mib: 4096
            })
        ));
        assert!(matches!(run(1, 4097), Err(PlanError::Memory { .. })));
        assert!(run(1, 128).is_ok());
        // A minimum that is not a whole MiB rounds up.
        let odd = VzLimits {
            min_memory: (128 << 20) + 1,
            ..limits
        };
        let cfg = VmConfig {
            memory_mib: 128,
            ..arm_cfg()
        };
        assert!(matches!(
            VzPlan::new(&cfg, boot(k.clone()), &arm(), &odd),
            Err(PlanError::Memory { min_mib: 129, .. })
        ));
    }

    #[test]
    fn refuses_kvm_only_options() {
        let cfg = VmConfig {
            cpu_compat: CpuCompat::On,
            ..arm_cfg()
        };
        assert!(matches!(plan(&cfg, &arm()), Err(PlanError::CpuCompat)));
        for c in [CpuCompat::Auto, CpuCompat::Off] {
            let cfg = VmConfig {
                cpu_compat: c,
                ..arm_cfg()
            };
            assert!(plan(&cfg, &arm()).is_ok());
        }
        let cfg = VmConfig {
            profile_hz: 100,
            ..arm_cfg()
        };
        assert!(matches!(plan(&cfg, &arm()), Err(PlanError::Profile)));
        // Seccomp does not apply: ignored either way.
        for seccomp in [true, false] {
            let cfg = VmConfig {
                seccomp,
                ..arm_cfg()
            };
            assert!(plan(&cfg, &arm()).is_ok());
        }
    }

    #[test]
    fn disks_in_guest_order_with_modes() {
        let t = Tmp::new("disks");
        let root = t.file("root.img", b"");
        let data = t.file("a-very-long-image-file-name.img", b"");
        let cfg = VmConfig {
            rootfs: Some(RootfsConfig {
                overlay: false,
                disk: DiskConfig {
                    read_only: true,
                    ..DiskConfig::new(&root)
                },
                fstype: "ext4".into(),
            }),
            disks: vec![
                DiskConfig {
                    cache: CacheMode::Unsafe,
                    id: Some("data".into()),
                    ..DiskConfig::new(&data)
                },
                DiskConfig {
                    cache: CacheMode::Writethrough,
                    ..DiskConfig::new(&data)
                },
            ],
            ..arm_cfg()
        };
        let p = plan(&cfg, &arm()).unwrap();
        assert_eq!(p.disks.len(), 3);
        assert_eq!(p.disks[0].path, root);
        assert!(p.disks[0].read_only);
        assert_eq!(p.disks[0].block_id.as_deref(), Some("root.img"));
        assert_eq!(
            (p.disks[0].caching, p.disks[0].sync),
            (DiskCaching::Cached, DiskSync::Full)
        );
        assert!(!p.disks[1].read_only);
        assert_eq!(p.disks[1].block_id.as_deref(), Some("data"));
        assert_eq!(
            (p.disks[1].caching, p.disks[1].sync),
            (DiskCaching::Cached, DiskSync::None)
        );
        assert_eq!(p.disks[2].block_id.as_deref(), Some("a-very-long-image-fi"));
        assert_eq!(
            (p.disks[2].caching, p.disks[2].sync),
            (DiskCaching::Uncached, DiskSync::Full)
        );
    }

    #[test]
    fn cache_mode_table() {
        assert_eq!(
            cache_modes(CacheMode::Writeback),
            (DiskCaching::Cached, DiskSync::Full)
        );
        assert_eq!(
            cache_modes(CacheMode::Writethrough),
            (DiskCaching::Uncached, DiskSync::Full)
        );
        assert_eq!(
            cache_modes(CacheMode::Unsafe),
            (DiskCaching::Cached, DiskSync::None)
        );
    }

    #[test]
    fn refuses_bad_disk_ids() {
        for id in ["é", "123456789012345678901"] {
            let cfg = VmConfig {
                disks: vec![DiskConfig {
                    id: Some(id.into()),
                    ..DiskConfig::new("/tmp/x.img")
                }],
                ..arm_cfg()
            };
            assert!(
                matches!(plan(&cfg, &arm()), Err(PlanError::DiskId { .. })),
                "{id}"
            );
        }
        // A non-ASCII file name just gets no serial.
        let cfg = VmConfig {
            disks: vec![DiskConfig::new("/tmp/é.img")],
            ..arm_cfg()
        };
        assert_eq!(plan(&cfg, &arm()).unwrap().disks[0].block_id, None);
    }

    #[test]
    fn shares_get_tags_and_modes() {
        let s = |host: &str, guest: &str, ro: bool| ShareConfig {
            host_dir: host.into(),
            guest_path: guest.into(),
            read_only: ro,
            cache: ShareCache::Auto,
        };
        let cfg = VmConfig {
            shares: vec![s("/src", "/src", false), s("/data", "/mnt/d", true)],
            ..arm_cfg()
        };
        let p = plan(&cfg, &arm()).unwrap();
        assert_eq!(
            p.shares,
            vec![
                SharePlan {
                    tag: "locald-share0".into(),
                    kind: ShareKind::Single(SharedDirPlan {
                        host_dir: "/src".into(),
                        read_only: false
                    }),
                },
                SharePlan {
                    tag: "locald-share1".into(),
                    kind: ShareKind::Single(SharedDirPlan {
                        host_dir: "/data".into(),
                        read_only: true
                    }),
                },
            ]
        );
        for cache in [ShareCache::Never, ShareCache::Always] {
            let cfg = VmConfig {
                shares: vec![ShareConfig {
                    cache,
                    ..s("/src", "/src", false)
                }],
                ..arm_cfg()
            };
            assert!(matches!(
                plan(&cfg, &arm()),
                Err(PlanError::ShareCache { .. })
            ));
        }
    }

    #[test]
    fn multiple_share_names_are_unique_and_valid() {
        let d = |p: &str| SharedDirPlan {
            host_dir: p.into(),
            read_only: false,
        };
        let ShareKind::Multiple(named) =
            multiple_share(&[d("/a/src"), d("/b/src"), d("/"), d("/x/src")])
        else {
            panic!("not multiple");
        };
        let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["src", "src-2", "dir", "src-3"]);
        assert_eq!(named[1].1.host_dir, PathBuf::from("/b/src"));
    }

    #[test]
    fn vsock_plans_and_refusals() {
        let v = |cid| VsockConfig {
            guest_cid: cid,
            uds_path: "/run/v.sock".into(),
        };
        let cfg = VmConfig {
            vsock: Some(v(3)),
            agent: true,
            ..arm_cfg()
        };
        let opts = PlanOptions {
            guest_to_host_ports: vec![1023, 5000],
            ..arm()
        };
        let p = plan(&cfg, &opts).unwrap();
        assert_eq!(
            p.vsock,
            Some(VsockPlan {
                uds_path: "/run/v.sock".into(),
                guest_to_host_ports: vec![1023, 5000],
            })
        );
        assert_eq!(
            PlanOptions::default().guest_to_host_ports,
            [crate::agent::READY_PORT]
        );
        let cfg = VmConfig {
            vsock: Some(v(7)),
            ..arm_cfg()
        };
        assert!(matches!(plan(&cfg, &arm()), Err(PlanError::VsockCid(7))));
        let cfg = VmConfig {
            agent: true,
            ..arm_cfg()
        };
        assert!(matches!(plan(&cfg, &arm()), Err(PlanError::MissingVsock)));
    }

    #[test]
    fn nat_network_with_mac() {
        let mut net = NetConfig::parse("user,mac=02:ab:00:00:00:0f,ip=dhcp").unwrap();
        let cfg = VmConfig {
            net: Some(net.clone()),
            ..arm_cfg()
        };
        let p = plan(&cfg, &arm()).unwrap();
        let n = p.net.unwrap();
        assert_eq!(n.mac, [2, 0xab, 0, 0, 0, 0xf]);
        assert_eq!(n.mac_string(), "02:ab:00:00:00:0f");
        // Guest-side addressing is the guest init's business: accepted.
        net.guest = GuestNet::Manual;
        let cfg = VmConfig {
            net: Some(net),
            ..arm_cfg()
        };
        assert!(plan(&cfg, &arm()).is_ok());
    }

    #[test]
    fn refuses_tap_and_passt_options() {
        for (spec, want) in [
            ("tap", None),
            ("tap=tap0", None),
            ("user,publish=8080:80", Some("publish=")),
            ("user,offload=on", Some("offload=on")),
            ("user,host-loopback=on", Some("host-loopback=on")),
        ] {
            let cfg = VmConfig {
                net: Some(NetConfig::parse(spec).unwrap()),
                ..arm_cfg()
            };
            let e = plan(&cfg, &arm()).unwrap_err();
            match want {
                None => assert!(matches!(e, PlanError::Tap), "{spec}: {e}"),
                Some(w) => assert!(
                    matches!(e, PlanError::NetOption(o) if o == w),
                    "{spec}: {e}"
                ),
            }
        }
        // offload=off and host-loopback=off are the defaults: fine.
        let cfg = VmConfig {
            net: Some(NetConfig::parse("user,offload=off,host-loopback=off").unwrap()),
            ..arm_cfg()
        };
        assert!(plan(&cfg, &arm()).is_ok());
    }

    #[test]
    fn console_and_entropy_and_timeout() {
        let out = SharedBuffer::default();
        let cfg = VmConfig {
            console: ConsoleConfig::Buffer {
                input: b"ls\n".to_vec(),
                output: out.clone(),
            },
            rng: false,
            timeout: Some(Duration::from_secs(9)),
            ..arm_cfg()
        };
        let p = plan(&cfg, &arm()).unwrap();
        let ConsolePlan::Buffer { input, output } = p.console else {
            panic!("not a buffer");
        };
        assert_eq!(input, b"ls\n");
        let mut w = output;
        std::io::Write::write_all(&mut w, b"hi").unwrap();
        assert_eq!(out.text(), "hi");
        assert!(!p.entropy);
        assert_eq!(p.timeout, Some(Duration::from_secs(9)));
        for (c, want) in [
            (ConsoleConfig::Stderr, "Stderr"),
            (ConsoleConfig::Null, "Null"),
        ] {
            let cfg = VmConfig {
                console: c,
                ..arm_cfg()
            };
            assert_eq!(format!("{:?}", plan(&cfg, &arm()).unwrap().console), want);
        }
    }

    #[test]
    fn rosetta_only_for_arm_on_arm() {
        let opts = PlanOptions {
            rosetta: true,
            ..arm()
        };
        assert_eq!(
            plan(&arm_cfg(), &opts).unwrap().rosetta.as_deref(),
            Some("rosetta")
        );
        let t = Tmp::new("ros");
        let k = t.file("bzImage", &bzimage());
        let intel = PlanOptions {
            rosetta: true,
            host_arch: GuestArch::X86_64,
            ..PlanOptions::default()
        };
        let cfg = VmConfig {
            arch: GuestArch::X86_64,
            ..VmConfig::default()
        };
        let e = VzPlan::new(&cfg, boot(k), &intel, &VzLimits::DOCUMENTED).unwrap_err();
        assert!(matches!(e, PlanError::Rosetta { .. }), "{e}");
    }
}
