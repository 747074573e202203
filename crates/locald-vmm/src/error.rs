//! Error types of the library. Every variant says what was wrong and, where a
//! file is involved, which one. Used on every thread.

use std::path::PathBuf;

/// Bad configuration, found before any VM resource exists.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown architecture '{0}' (use x86_64 or aarch64)")]
    Arch(String),
    #[error("the {backend} backend cannot run a {arch} guest on this {host} host")]
    ArchNotRunnable {
        arch: crate::config::GuestArch,
        backend: &'static str,
        host: crate::config::GuestArch,
    },
    #[error("{option} is not available with the {backend} backend{}", if hint.is_empty() { String::new() } else { format!(" ({hint})") })]
    NotOnBackend {
        option: &'static str,
        backend: &'static str,
        hint: &'static str,
    },
    #[error("image {image} is for {platform}, not linux/{guest} (pick the platform with --arch)")]
    ImagePlatform {
        image: String,
        platform: String,
        guest: crate::config::GuestArch,
    },
    #[error("--image and --rootfs both give the root filesystem: use one")]
    ImageWithRootfs,
    #[error("image {0} has no Entrypoint or Cmd: give a command after --")]
    ImageNoCommand(String),
    #[error("--user and --hostname apply to --image only")]
    ImageOnly,
    #[error("this platform has no VM backend (KVM on Linux, Virtualization.framework on macOS)")]
    NoBackend,
    #[error("--cpus {0} is out of range: must be between 1 and {1}")]
    Vcpus(u32, u32),
    #[error("--memory {0} MiB is too small: at least {1} MiB is needed")]
    MemoryTooSmall(u64, u64),
    #[error("--memory {0} MiB is too large: at most {1} MiB (host memory) is allowed")]
    MemoryTooLarge(u64, u64),
    #[error(
        "invalid memory size '{0}': use a number of MiB or a suffix M, G or T (e.g. 512M, 2G)"
    )]
    MemorySyntax(String),
    #[error("the command to run is empty")]
    EmptyCommand,
    #[error("cannot read {}: {err}", .path.display())]
    File { path: PathBuf, err: std::io::Error },
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error(
        "a command or --rootfs needs the guest init: use the default initramfs or give no --kernel"
    )]
    NeedsGuestInit,
    #[error("vsock guest CID {0} is invalid: it must be between 3 and 4294967294")]
    VsockCid(u64),
    #[error("invalid disk '{0}': {1}")]
    DiskSpec(String, String),
    /// A `--share` that cannot be used.
    #[error("invalid share '{0}': {1}")]
    ShareSpec(String, String),
    #[error("too many virtio devices ({0}); at most {1} fit")]
    TooManyDevices(usize, usize),
    #[error("{0} {1:?} is too long (at most 100 years)")]
    Timeout(&'static str, std::time::Duration),
}

/// Problems loading the kernel, initrd and boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {}: {err}", .path.display())]
    KernelRead { path: PathBuf, err: std::io::Error },
    #[error("kernel {} is empty", .0.display())]
    KernelEmpty(PathBuf),
    #[error("kernel {} is neither an x86-64 ELF vmlinux nor a bzImage ({})", .0.display(), .1)]
    KernelFormat(PathBuf, String),
    #[error("kernel {} does not fit in guest memory ({})", .0.display(), .1)]
    KernelLoad(PathBuf, String),
    #[error("initrd {0} ({1} bytes) does not fit in guest memory; give the VM more memory")]
    InitrdTooBig(String, u64),
    #[error("kernel command line is invalid or too long: {0}")]
    Cmdline(String),
    #[error("cannot write boot structures into guest memory: {0}")]
    Setup(String),
}

/// Device setup failures: building, wiring and attaching the emulated
/// devices and the vCPUs' device-like state (KVM backend).
#[cfg(target_os = "linux")]
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A device's address range could not be placed on its bus.
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::BusError),
    /// No interrupt line is left for another virtio device.
    #[error("too many virtio devices: no interrupt line left for {name}")]
    TooManyDevices { name: String },
    /// A disk could not be opened.
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// The network device (its backend) could not be created.
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    /// A shared directory could not be opened.
    #[error("share {}: {err}", .path.display())]
    Share { path: PathBuf, err: std::io::Error },
    /// The vCPU's CPUID table could not be built.
    #[error("cpuid: {0}")]
    Cpuid(vmm_sys_util::fam::Error),
    /// The vCPU's boot MSR list could not be built.
    #[error("msrs: {0}")]
    Msrs(vmm_sys_util::fam::Error),
    /// The test code window (a test hook, off by default) could not be
    /// placed.
    #[error("test code window: {0}")]
    CodeWindow(String),
}

// Causes are part of each message (not `#[source]`), so printing an error
// with its chain never repeats them.

/// Errors of the whole library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Asset(#[from] crate::assets::AssetError),
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and do you have permission on /dev/kvm?)")]
    KvmOpen(std::io::Error),
    #[cfg(target_os = "linux")]
    #[error("KVM: {what} failed: {err}")]
    Kvm {
        what: &'static str,
        err: vmm_sys_util::errno::Error,
    },
    #[error("--cpus {0} exceeds what this host's KVM allows ({1})")]
    TooManyVcpus(u8, usize),
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    /// `run` was called a second time.
    #[error("this VM has already run")]
    AlreadyRan,
    /// `exec` on a VM without a vsock device (no agent).
    #[error("this VM has no vsock device")]
    NoVsock,
    /// The Virtualization.framework backend got no runtime directory.
    #[error("the VZ backend needs the VM's runtime directory")]
    NoRuntimeDir,
    #[cfg(target_os = "linux")]
    #[error("device setup failed: {0}")]
    DeviceSetup(#[from] DeviceError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("the VM failed: {0}")]
    Run(String),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Image(#[from] locald_image::ImageError),
    #[error("{0}")]
    ImageRootfs(#[from] locald_image::rootfs::CachedError<locald_image::unpack::UnpackError>),
    /// The Virtualization.framework backend refused or failed.
    #[error(transparent)]
    Vz(#[from] crate::vz::VzError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(target_os = "linux")]
impl Error {
    /// Wraps a KVM ioctl failure with what we were doing.
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
        move |err| Error::Kvm { what, err }
    }
}
