//! VM configuration: what the user wants, never where it goes in guest memory.
//!
//! Pure data plus validation; used on the caller's thread before any VM exists.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod net;
pub mod share;

use crate::error::ConfigError;
pub use net::{GuestNet, NetBackendConfig, NetConfig};
pub use share::{ShareCache, ShareConfig};

/// Smallest guest memory we accept: enough for boot structures and a tiny kernel.
pub const MIN_MEMORY_MIB: u64 = 8;
/// Hard upper bound on guest memory, whatever the host has.
pub const MAX_MEMORY_MIB: u64 = 1 << 20; // 1 TiB
/// Upper bound on vCPUs: APIC ids in the MP table are 8-bit and 0xff is broadcast.
pub const MAX_VCPUS: u8 = 254;
/// vCPUs when the user says nothing: two, so the guest kernel's async boot
/// work (initramfs unpacking, deferred probes) and the command's own
/// threads are not serialised on one CPU. Measured on the software-KVM
/// development host: userspace 1.6 s and `run -- true` 2.3 s sooner than
/// with one (scripts/bench-boot.sh).
pub const DEFAULT_VCPUS: u8 = 2;
/// Longest `timeout` or `agent_timeout` accepted (100 years): the VM
/// turns them into `Instant` deadlines, which must not overflow.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Whether to apply the software-KVM compatibility path (CPUID masking,
/// instruction emulation in the VMM, guest command-line switches).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuCompat {
    /// Detect the host and apply the path only on a software KVM.
    #[default]
    Auto,
    /// Always apply it.
    On,
    /// Never apply it.
    Off,
}

/// A byte buffer shared between the VM's console and the caller.
#[derive(Clone, Debug, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything written so far, lossily decoded as UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default)]
pub enum ConsoleConfig {
    /// Guest output to our stdout, our stdin to the guest (raw mode if a TTY).
    #[default]
    Stdio,
    /// Guest output into `output`; `input` is fed to the guest at boot.
    Buffer {
        /// Bytes the guest reads from its console.
        input: Vec<u8>,
        /// Everything the guest writes to its console.
        output: SharedBuffer,
    },
    /// Output to our stderr (e.g. the kernel log next to a command's
    /// output), no input.
    Stderr,
    /// Output discarded, no input.
    Null,
}

/// A virtio socket device whose host side is a Unix socket (Firecracker's
/// virtio-fs tag of the Rosetta share (Virtualization.framework), which
/// the guest init mounts at `/run/rosetta` and registers with binfmt_misc.
pub const ROSETTA_TAG: &str = "rosetta";

/// The guest's instruction set. The KVM backend runs only the host's; the
/// Virtualization.framework backend runs the host's too (Apple Silicon
/// runs x86_64 *binaries* through Rosetta, inside an aarch64 guest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GuestArch {
    /// x86-64 (`x86_64`).
    #[default]
    X86_64,
    /// 64-bit Arm (`aarch64`, `arm64`).
    Aarch64,
}

impl GuestArch {
    /// The architecture this program was built for.
    pub const fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            GuestArch::Aarch64
        } else {
            GuestArch::X86_64
        }
    }

    /// Parses `x86_64`/`amd64` or `aarch64`/`arm64`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "x86_64" | "amd64" | "x86-64" => Ok(GuestArch::X86_64),
            "aarch64" | "arm64" => Ok(GuestArch::Aarch64),
            _ => Err(ConfigError::Arch(s.to_string())),
        }
    }

    /// The name used in cache paths and messages (`x86_64`, `aarch64`).
    pub const fn name(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "x86_64",
            GuestArch::Aarch64 => "aarch64",
        }
    }
}

impl std::fmt::Display for GuestArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// hybrid vsock: guest connections to host port P reach `<uds_path>_P`;
/// host clients connect to `uds_path` and send `CONNECT <port>\n`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// Host socket path.
    pub uds_path: PathBuf,
}

/// How a disk's writes reach the host file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Writes go to the host page cache; a guest FLUSH is an `fdatasync`
    /// (the guest sees a volatile write cache and flushes when it must).
    #[default]
    Writeback,
    /// Every write is durable before it completes (`O_DSYNC`); FLUSH is
    /// still honoured.
    Writethrough,
    /// Guest FLUSH requests are acknowledged without syncing: fast, and a
    /// host crash can lose data. For throwaway disks only.
    Unsafe,
}

/// One virtio block device backed by a raw image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// Expose the disk read-only (guest writes fail with an I/O error).
    pub read_only: bool,
    /// Write caching policy.
    pub cache: CacheMode,
    /// Serial the guest reads with GET_ID (at most 20 bytes); `None` uses
    /// the image's file name.
    pub id: Option<String>,
}

impl DiskConfig {
    /// A writable, write-back disk for `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            read_only: false,
            cache: CacheMode::Writeback,
            id: None,
        }
    }

    /// Parses the CLI form `PATH[,ro][,cache=writeback|writethrough|unsafe][,id=SERIAL]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::DiskSpec(spec.to_string(), why);
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("the image path is empty".into()));
        }
        let mut disk = DiskConfig::new(path);
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => disk.read_only = true,
                None if opt == "rw" => disk.read_only = false,
                Some(("cache", v)) => {
                    disk.cache = match v {
                        "writeback" => CacheMode::Writeback,
                        "writethrough" => CacheMode::Writethrough,
                        "unsafe" => CacheMode::Unsafe,
                        _ => {
                            return Err(bad(format!(
                                "unknown cache mode '{v}' (use writeback, writethrough or unsafe)"
                            )))
                        }
                    }
                }
                Some(("id", v)) => disk.id = Some(v.to_string()),
                _ => {
                    return Err(bad(format!(
                        "unknown option '{opt}' (use ro, cache=MODE or id=SERIAL)"
                    )))
                }
            }
        }
        Ok(disk)
    }
}

/// Boot from a disk: the guest init mounts this device as `/` and runs the
/// command inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsConfig {
    /// The disk holding the root filesystem; it becomes the guest's first
    /// disk (`/dev/vda`).
    pub disk: DiskConfig,
    /// Filesystem type passed to mount(2).
    pub fstype: String,
    /// Mount the disk read-only under a tmpfs overlay, so the guest can
    /// write to `/` while the disk never changes (OCI image roots; the
    /// disk should then be read-only).
    pub overlay: bool,
}

/// What to run in the VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest kernel (ELF vmlinux or bzImage); `None` uses the default guest kernel.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk; `None` uses the default initramfs when the kernel is the
    /// default one, and no initrd otherwise.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line text, appended to the VMM's own.
    pub cmdline: Option<String>,
    /// Command (argv) for the guest init to run; `None` gives an interactive shell.
    pub command: Option<Vec<String>>,
    /// Environment for the command, as `KEY=VALUE` pairs.
    pub env: Vec<(String, String)>,
    /// Working directory for the command.
    pub workdir: Option<String>,
    /// The guest's architecture (default: the host's). Chooses the
    /// default kernel and initramfs; a backend that cannot run it refuses.
    pub arch: GuestArch,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Serial console wiring.
    pub console: ConsoleConfig,
    /// Software-KVM compatibility path.
    pub cpu_compat: CpuCompat,
    /// Give up (and report [`crate::ExitStatus::TimedOut`]) after this long.
    pub timeout: Option<Duration>,
    /// Sample the guest RIP this many times a second (debug aid; 0 = off).
    pub profile_hz: u32,
    /// `System.map` used to symbolise guest RIP samples.
    pub system_map: Option<PathBuf>,
    /// Virtio block devices, in order (`/dev/vda`, `/dev/vdb`, … after the
    /// root disk, if any).
    pub disks: Vec<DiskConfig>,
    /// Boot into a root filesystem on a disk (default guest init only).
    pub rootfs: Option<RootfsConfig>,
    /// Attach a virtio entropy device fed from the host's getrandom.
    pub rng: bool,
    /// Attach a vsock device. With `agent`, a private socket is made when
    /// this is `None`.
    pub vsock: Option<VsockConfig>,
    /// Agent mode (default guest init only): the init starts the guest
    /// agent instead of running `command`; commands then run through
    /// [`crate::RunningVm::exec`], with separate stdout/stderr and exit
    /// codes.
    pub agent: bool,
    /// How long [`crate::RunningVm::wait_ready`] waits for the agent.
    pub agent_timeout: Duration,
    /// Host directories shared over virtio-fs, mounted by the default
    /// guest init at their guest paths (one device each).
    pub shares: Vec<ShareConfig>,
    /// Attach a virtio network card (TAP or passt backend); the default
    /// guest init configures its `eth0`.
    pub net: Option<NetConfig>,
    /// Seccomp filters on the threads the VM creates (vCPUs, device
    /// workers, console input, the `spawn` thread), one allow-list per
    /// kind of thread; a forbidden call ends the process with a one-line
    /// message (see docs/seccomp.md). The caller's own thread is never
    /// filtered by the library. On by default.
    pub seccomp: bool,
    /// Run x86_64 Linux binaries in an aarch64 guest through Apple's
    /// Rosetta (Virtualization.framework on Apple Silicon only): the
    /// framework's Rosetta share is attached and the guest init registers
    /// it with binfmt_misc. Other backends refuse it.
    pub rosetta: bool,
    /// Boot an OCI image: pulled (or read from a local layout or archive)
    /// into the image cache, unpacked into a cached ext4 root disk that is
    /// attached read-only with a tmpfs overlay. Its configuration fills in
    /// what the rest of this config leaves unset: the command (Entrypoint +
    /// Cmd; a `command` replaces Cmd), environment (the image's first, then
    /// `env`), working directory and user. See [`crate::image`].
    pub image: Option<ImageRun>,
    /// The user the command runs as (docker's `User`: `uid[:gid]` or names
    /// from the root's `/etc/passwd` and `/etc/group`); with `image` only.
    pub user: Option<String>,
    /// The guest's hostname (with `image` only; default: the image's name).
    pub hostname: Option<String>,
    /// Resume the snapshot in this directory instead of booting (KVM
    /// only). The machine (vCPUs, memory, devices in order) must be the
    /// snapshot's; the kernel, initrd, command line and command are not
    /// used. See [`crate::snapshot`].
    pub restore: Option<PathBuf>,
    /// The agent mounts the shares once it is ready, rather than the init
    /// at boot: how a warm snapshot's template boots (its snapshot holds
    /// no mounted share), and what every restored guest does.
    pub late_shares: bool,
    /// Once the agent is ready, snapshot the VM into this directory (it
    /// runs on) before the shares are mounted: how a warm snapshot is made
    /// ([`crate::warm`]).
    pub snapshot_at_ready: Option<PathBuf>,
}

/// Which OCI image to boot, and how to fetch it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageRun {
    /// A registry reference (`alpine`, `host:5000/app@sha256:…`), an OCI
    /// layout directory, or a `docker save`/OCI archive tarball.
    pub source: String,
    /// Registries reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Never contact a registry: the image must be in the cache.
    pub offline: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: None,
            initrd: None,
            cmdline: None,
            command: None,
            env: Vec::new(),
            workdir: None,
            arch: GuestArch::host(),
            vcpus: DEFAULT_VCPUS,
            memory_mib: 128,
            console: ConsoleConfig::Stdio,
            cpu_compat: CpuCompat::Auto,
            timeout: None,
            profile_hz: 0,
            system_map: None,
            disks: Vec::new(),
            rootfs: None,
            rng: true,
            vsock: None,
            agent: false,
            agent_timeout: Duration::from_secs(120),
            shares: Vec::new(),
            net: None,
            seccomp: true,
            rosetta: false,
            image: None,
            user: None,
            hostname: None,
            restore: None,
            late_shares: false,
            snapshot_at_ready: None,
        }
    }
}

impl VmConfig {
    /// Checks everything that can be checked without touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus as u32, MAX_VCPUS as u32));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib, MIN_MEMORY_MIB));
        }
        let host = host_memory_mib();
        let limit = MAX_MEMORY_MIB.min(host.unwrap_or(MAX_MEMORY_MIB));
        if self.memory_mib > limit {
            return Err(ConfigError::MemoryTooLarge(self.memory_mib, limit));
        }
        if let Some(cmd) = &self.command {
            if cmd.is_empty() {
                return Err(ConfigError::EmptyCommand);
            }
        }
        for p in [&self.kernel, &self.initrd, &self.system_map]
            .into_iter()
            .flatten()
        {
            check_readable_file(p)?;
        }
        let disks: Vec<&DiskConfig> = self.all_disks().collect();
        for d in &disks {
            check_disk(d)?;
        }
        for (what, t) in [
            ("--timeout", self.timeout),
            ("--agent-timeout", Some(self.agent_timeout)),
        ] {
            if let Some(t) = t.filter(|t| *t > MAX_TIMEOUT) {
                return Err(ConfigError::Timeout(what, t));
            }
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX - 1) {
                return Err(ConfigError::VsockCid(v.guest_cid));
            }
        }
        let devices = disks.len()
            + usize::from(self.rng)
            + usize::from(self.vsock.is_some() || self.agent)
            + usize::from(self.net.is_some());
        share::check_shares(&self.shares)?;
        let devices = devices + self.shares.len();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices, MAX_VIRTIO_DEVICES));
        }
        Ok(())
    }

    /// Every disk in guest order: the root disk first, then `disks`.
    pub fn all_disks(&self) -> impl Iterator<Item = &DiskConfig> {
        self.rootfs.iter().map(|r| &r.disk).chain(&self.disks)
    }
}

/// Most virtio devices one VM can have (one interrupt line each).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest GET_ID serial, in bytes (virtio spec).
pub const DISK_ID_MAX: usize = 20;

fn check_disk(d: &DiskConfig) -> Result<(), ConfigError> {
    let spec = || d.path.display().to_string();
    if let Some(id) = &d.id {
        if id.len() > DISK_ID_MAX {
            return Err(ConfigError::DiskSpec(
                spec(),
                format!("id '{id}' is longer than {DISK_ID_MAX} bytes"),
            ));
        }
    }
    let meta = std::fs::metadata(&d.path).map_err(|err| ConfigError::File {
        path: d.path.clone(),
        err,
    })?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(ConfigError::DiskSpec(
            spec(),
            "not a regular file or block device".into(),
        ));
    }
    Ok(())
}

fn check_readable_file(path: &PathBuf) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::File {
        path: path.clone(),
        err: e,
    })?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile(path.clone()));
    }
    std::fs::File::open(path).map_err(|e| ConfigError::File {
        path: path.clone(),
        err: e,
    })?;
    Ok(())
}

/// Total physical memory of the host in MiB, if it can be read.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Parses a memory size such as `512`, `512M`, `2G` or `1g` into MiB.
/// A bare number means MiB.
pub fn parse_memory_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::MemorySyntax(s.to_string());
    let t = s.trim();
    let (num, mult): (&str, u64) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'M' => 1,
                'G' => 1024,
                'T' => 1024 * 1024,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Guest name of the `index`th virtio disk: `vda`, `vdb`, … `vdz`, `vdaa`.
pub fn disk_name(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index;
    loop {
        suffix.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_parse() {
        let d = DiskConfig::parse("/tmp/a.img").unwrap();
        assert_eq!(d, DiskConfig::new("/tmp/a.img"));
        let d = DiskConfig::parse("a.img,ro,cache=unsafe,id=data").unwrap();
        assert!(d.read_only);
        assert_eq!(d.cache, CacheMode::Unsafe);
        assert_eq!(d.id.as_deref(), Some("data"));
        assert_eq!(
            DiskConfig::parse("a,cache=writethrough").unwrap().cache,
            CacheMode::Writethrough
        );
        for bad in ["", ",ro", "a,bogus", "a,cache=none", "a,ro=1"] {
            assert!(
                matches!(DiskConfig::parse(bad), Err(ConfigError::DiskSpec(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn disk_validation() {
        let dir = std::env::temp_dir().join(format!("locald-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let mut c = VmConfig {
            disks: vec![DiskConfig::new(&img)],
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        c.disks[0].id = Some("x".repeat(21));
        assert!(matches!(c.validate(), Err(ConfigError::DiskSpec(..))));
        c.disks = vec![DiskConfig::new(dir.join("missing.img"))];
        assert!(matches!(c.validate(), Err(ConfigError::File { .. })));
        c.disks = vec![DiskConfig::new(&dir)];
        assert!(matches!(c.validate(), Err(ConfigError::DiskSpec(..))));
        c.disks = vec![DiskConfig::new(&img); MAX_VIRTIO_DEVICES];
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooManyDevices(20, MAX_VIRTIO_DEVICES))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_memory_size("512").unwrap(), 512);
        assert_eq!(parse_memory_size("512M").unwrap(), 512);
        assert_eq!(parse_memory_size("2G").unwrap(), 2048);
        assert_eq!(parse_memory_size("1t").unwrap(), 1 << 20);
        assert!(parse_memory_size("").is_err());
        assert!(parse_memory_size("12K").is_err());
        assert!(parse_memory_size("abc").is_err());
        assert!(parse_memory_size("-1G").is_err());
        assert!(parse_memory_size("99999999999999999999G").is_err());
        assert!(parse_memory_size("18446744073709551615T").is_err());
    }

    #[test]
    fn validation_rejects_bad_sizes() {
        let mut c = VmConfig::default();
        assert!(c.validate().is_ok());
        c.memory_mib = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooSmall(0, _))
        ));
        c.memory_mib = 100 << 20;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooLarge(..))));
        c.memory_mib = 64;
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(0, _))));
        c.vcpus = 255;
        assert!(c.validate().is_err());
        c.vcpus = 2;
        c.command = Some(vec![]);
        assert!(matches!(c.validate(), Err(ConfigError::EmptyCommand)));
    }

    /// Found by the `config_parse` fuzz target: a timeout too long to be
    /// an `Instant` deadline passed validation, then `run()` (`timeout`)
    /// or `wait_ready()` (`agent_timeout`) panicked computing it.
    #[test]
    fn validation_rejects_endless_timeouts() {
        let mut c = VmConfig {
            timeout: Some(MAX_TIMEOUT),
            agent_timeout: MAX_TIMEOUT,
            ..VmConfig::default()
        };
        assert!(c.validate().is_ok());
        c.timeout = Some(Duration::from_secs(u64::MAX));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Timeout("--timeout", _))
        ));
        c.timeout = None;
        c.agent_timeout = Duration::MAX;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Timeout("--agent-timeout", _))
        ));
    }

    #[test]
    fn validation_names_missing_files() {
        let c = VmConfig {
            kernel: Some("/nonexistent/vmlinux".into()),
            ..VmConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
        let c = VmConfig {
            initrd: Some("/".into()),
            ..VmConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::NotAFile(_))));
    }

    #[test]
    fn shared_buffer_collects() {
        let mut b = SharedBuffer::default();
        let c = b.clone();
        b.write_all(b"hi ").unwrap();
        b.write_all(b"there").unwrap();
        assert_eq!(c.text(), "hi there");
    }

    #[test]
    fn disk_names_follow_linux() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
            .into_iter()
            .map(disk_name)
            .collect();
        assert_eq!(
            names,
            ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa"]
        );
    }
}
