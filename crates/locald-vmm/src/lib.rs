//! locald-vmm: a single-binary microVM monitor.
//!
//! Public API: [`VmConfig`] → [`VirtualMachine::new`] → [`VirtualMachine::run`],
//! which returns the guest's [`ExitStatus`]. `new` and `run` run on the
//! caller's thread; the VM spawns one thread per vCPU plus, with a stdio
//! console, a console input thread. With [`VmConfig::seccomp`] (the
//! default) every thread the VM creates runs under a seccomp filter of its
//! kind ([`seccomp`]); the caller's thread is left alone.
//!
//! The platform seam is this whole-VM type: on Linux it drives `/dev/kvm`
//! through the [`kvm`] backend; a macOS backend will bring its own devices.

pub mod agent;
pub mod assets;
pub mod config;
pub mod console;
pub mod cpio;
pub mod devices;
pub mod error;
pub mod hostdir;
pub mod instance;
#[cfg(target_os = "linux")]
pub mod kvm;
pub mod profile;
pub mod publish;
#[cfg(target_os = "linux")]
pub mod seccomp;
pub mod vz;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use config::{
    CacheMode, ConsoleConfig, CpuCompat, DiskConfig, GuestArch, RootfsConfig, SharedBuffer,
    VmConfig,
};
pub use devices::control::Marker;
pub use devices::ExitStatus;
pub use error::{BootError, ConfigError, Error};

use devices::serial::ConsoleSink;
use devices::{Outcome, VmControl};

/// Kernel command line every guest gets: serial console, reboot through the
/// i8042 reset line, reboot at once on panic, and no probing of hardware we
/// do not emulate.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Extra command line for the default guest: quiet boot, no delay-loop
/// calibration work beyond what kvm-clock gives.
pub const DEFAULT_GUEST_CMDLINE: &str = "quiet";

/// CPU features the guest kernel is told to ignore (`clearcpuid=`) on a
/// software KVM: instructions the emulator lacks (`xrstor`, `cmpxchg16b`,
/// `popcnt`, `stac`/`clac`, `invpcid`) or runs byte by byte (`rep movsb`).
/// Needed on the command line because such a host ignores CPUID leaf-7
/// values the VMM sets. See docs/software-kvm.md.
pub const COMPAT_CLEARCPUID: &[&str] = &["erms", "fsrm", "smap", "smep", "popcnt", "xsave", "cx16"];

/// The rest of the software-KVM command line: upstream switches, for any
/// kernel (see docs/software-kvm.md).
pub const COMPAT_CMDLINE: &str =
    "tsc=reliable no_timer_check noreplace-smp random.trust_cpu=on rodata=off percpu_alloc=page";

/// Software-KVM switches that exist only in the default kernel (boot
/// options added by our patches in guest/kernel/patches). Not given to
/// other kernels, which would pass unknown `key=value` words to their init
/// as environment variables.
pub const COMPAT_DEFAULT_KERNEL_CMDLINE: &str = "slab_sysfs=off fault_around_bytes=4096 lean_sysfs=on alt_nop_opt=off init_poison=off initramfs_early=on boot_page_checks=off";

/// The software-KVM command line, leaving visible the features named in
/// `keep` (comma-separated; `LOCALD_VMM_COMPAT_KEEP`, a debug aid that
/// also unmasks them in CPUID, to re-verify each entry by booting).
pub fn compat_cmdline(keep: &str) -> String {
    let keep: Vec<&str> = keep.split(',').map(str::trim).collect();
    let clear: Vec<&str> = COMPAT_CLEARCPUID
        .iter()
        .copied()
        .filter(|f| !keep.contains(f))
        .collect();
    if clear.is_empty() {
        COMPAT_CMDLINE.to_string()
    } else {
        format!("clearcpuid={} {COMPAT_CMDLINE}", clear.join(","))
    }
}

/// The VMM's part of the kernel command line (before device entries and
/// the user's `--cmdline`): [`BASE_CMDLINE`], [`DEFAULT_GUEST_CMDLINE`] for
/// the default kernel, and on a software KVM the compatibility switches
/// (`compat_keep` as for [`compat_cmdline`]; plus
/// [`COMPAT_DEFAULT_KERNEL_CMDLINE`] for the default kernel).
pub fn guest_cmdline(default_kernel: bool, compat_keep: Option<&str>) -> String {
    let mut cmdline = BASE_CMDLINE.to_string();
    if default_kernel {
        cmdline.push(' ');
        cmdline.push_str(DEFAULT_GUEST_CMDLINE);
    }
    if let Some(keep) = compat_keep {
        cmdline.push(' ');
        cmdline.push_str(&compat_cmdline(keep));
        if default_kernel {
            cmdline.push(' ');
            cmdline.push_str(COMPAT_DEFAULT_KERNEL_CMDLINE);
        }
    }
    cmdline
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

/// The virtio devices `config` asks for, in guest order: disks (root
/// first), then the entropy device. Opening a disk takes its lock, so a
/// disk another VM uses fails here.
#[cfg(target_os = "linux")]
fn virtio_devices(config: &VmConfig) -> Result<Vec<kvm::VirtioSpec>, Error> {
    let mut out = Vec::new();
    for (i, disk) in config.all_disks().enumerate() {
        let name = disk_name(i);
        let dev = devices::virtio::block::Block::new(disk, &name)
            .map_err(|e| Error::Device(e.to_string()))?;
        out.push(kvm::VirtioSpec {
            name: format!("virtio-blk {name}"),
            device: Box::new(dev),
        });
    }
    if let Some(v) = &config.vsock {
        let dev = devices::virtio::vsock::Vsock::new(v.guest_cid, v.uds_path.clone())
            .map_err(|e| Error::Device(e.to_string()))?;
        out.push(kvm::VirtioSpec {
            name: "virtio-vsock".into(),
            device: Box::new(dev),
        });
    }
    if let Some(n) = &config.net {
        let dev =
            devices::virtio::net::Net::from_config(n).map_err(|e| Error::Device(e.to_string()))?;
        out.push(kvm::VirtioSpec {
            name: "virtio-net".into(),
            device: Box::new(dev),
        });
    }
    for (i, share) in config.shares.iter().enumerate() {
        let mut opts =
            devices::virtio::fs::ShareFsOptions::new(&share.host_dir, share.read_only, share.cache);
        opts.read_only = share.read_only;
        let fs = devices::virtio::fs::ShareFs::new(opts)
            .map_err(|e| Error::Device(format!("share {}: {e}", share.host_dir.display())))?;
        let tag = config::ShareConfig::tag(i);
        out.push(kvm::VirtioSpec {
            name: format!("virtio-fs {tag}"),
            device: Box::new(devices::virtio::fs::Fs::new(&tag, fs)),
        });
    }
    if config.rng {
        out.push(kvm::VirtioSpec {
            name: "virtio-rng".into(),
            device: Box::new(devices::virtio::rng::Rng::new()),
        });
    }
    Ok(out)
}

/// A configured virtual machine, ready to run once.
pub struct VirtualMachine {
    control: Arc<VmControl>,
    #[cfg(target_os = "linux")]
    backend: kvm::KvmVm,
    console: ConsoleConfig,
    timeout: Option<Duration>,
    profile_hz: u32,
    system_map: Option<std::path::PathBuf>,
    compat: bool,
    ran: bool,
    vsock_path: Option<PathBuf>,
    ready: Option<agent::ReadyListener>,
    agent_timeout: Duration,
    seccomp: bool,
    // Dropped last: the sockets inside it go first.
    _runtime_dir: Option<RuntimeDir>,
}

/// A private directory for a VM's sockets, removed when the VM is dropped:
/// `$XDG_RUNTIME_DIR/locald-vmm/vm-<pid>-<n>` or
/// `/tmp/locald-vmm-<uid>/vm-<pid>-<n>` (mode 0700).
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn new() -> Result<Self, Error> {
        use std::os::unix::fs::DirBuilderExt;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let base = hostdir::ensure_private_dir(&runtime_base())?;
        sweep_stale_runtime_dirs(&base);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("vm-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(RuntimeDir(dir))
    }
}

/// Removes `vm-<pid>-<n>` directories under `base` whose process is gone
/// (a VMM killed with SIGKILL cannot remove its own). A reused pid keeps
/// its directory until that process ends too, which is harmless.
fn sweep_stale_runtime_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vm-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid <= 0 || pid as u32 == std::process::id() {
            continue;
        }
        // SAFETY: signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where per-VM sockets live: `$XDG_RUNTIME_DIR/locald-vmm`, else
/// `<tmp>/locald-vmm-<euid>` (`<tmp>` is `$TMPDIR` or `/tmp`). Kept short:
/// Unix socket paths are limited to 107 bytes. Only the path: use it
/// through [`hostdir::runtime_dir`], which checks every level of it.
pub fn runtime_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("locald-vmm"),
        _ => std::env::temp_dir().join(format!("locald-vmm-{}", hostdir::euid())),
    }
}

impl VirtualMachine {
    /// Validates `config`, resolves the default guest if needed, and builds
    /// the VM (memory, devices, vCPUs, kernel loaded). Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        config.validate()?;
        if config.seccomp {
            seccomp::check().map_err(|e| Error::Device(e.to_string()))?;
        }
        let compat_reason = match config.cpu_compat {
            CpuCompat::On => Some("forced with --cpu-compat on"),
            CpuCompat::Off => None,
            CpuCompat::Auto => kvm::host::software_kvm_reason(),
        };
        let compat = compat_reason.is_some();
        if let Some(reason) = compat_reason {
            tracing::info!("software KVM host ({reason}): applying the CPU compatibility path");
        }
        // Debug aid: features to leave visible on the compatibility path.
        let compat_keep = std::env::var("LOCALD_VMM_COMPAT_KEEP").unwrap_or_default();
        let default_kernel = config.kernel.is_none();
        let (kernel, system_map) = match &config.kernel {
            Some(k) => (k.clone(), config.system_map.clone()),
            None => {
                let k = assets::default_kernel()?;
                (k.vmlinux, config.system_map.clone().or(Some(k.system_map)))
            }
        };
        let initrd_path = match (&config.initrd, default_kernel) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => Some(assets::default_initramfs()?),
            (None, false) => None,
        };
        let mut initrd = match initrd_path {
            Some(path) => {
                let bytes = std::fs::read(&path).map_err(|err| ConfigError::File {
                    path: path.clone(),
                    err,
                })?;
                Some((path.display().to_string(), bytes))
            }
            None => None,
        };
        let root = config.rootfs.as_ref().map(|r| assets::GuestRoot {
            device: "/dev/vda".into(),
            fstype: r.fstype.clone(),
            read_only: r.disk.read_only,
        });
        // A network card on the default guest needs its `/.locald/net`.
        let net_spec = config
            .net
            .as_ref()
            .filter(|_| default_kernel && config.initrd.is_none())
            .map(|n| n.guest_spec());
        // Shares on the default guest: `/.locald/shares` tells init where to mount them.
        let guest_shares: Vec<assets::GuestShare> = if default_kernel && config.initrd.is_none() {
            config
                .shares
                .iter()
                .enumerate()
                .map(|(i, s)| assets::GuestShare {
                    tag: config::ShareConfig::tag(i),
                    path: s.guest_path.clone(),
                    read_only: s.read_only,
                })
                .collect()
        } else {
            Vec::new()
        };
        if config.command.is_some()
            || root.is_some()
            || config.agent
            || net_spec.is_some()
            || !guest_shares.is_empty()
        {
            let Some((_, bytes)) = initrd.as_mut() else {
                return Err(ConfigError::NeedsGuestInit.into());
            };
            // newc archives concatenate: the command spec rides after the base image.
            while bytes.len() % 4 != 0 {
                bytes.push(0);
            }
            bytes.extend_from_slice(&assets::command_archive(&assets::GuestCommand {
                argv: config.command.clone().unwrap_or_default(),
                env: config.env.clone(),
                workdir: config.workdir.clone(),
                root,
                agent: config.agent,
                net: net_spec,
                shares: guest_shares,
            }));
        }
        let cmdline = guest_cmdline(default_kernel, compat.then_some(compat_keep.as_str()));
        let spec = kvm::BootSpec {
            kernel,
            initrd,
            cmdline,
            user_cmdline: config.cmdline.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            masked: if compat {
                kvm::cpuid::compat_mask(&compat_keep)
            } else {
                Vec::new()
            },
        };
        let sink = match &config.console {
            ConsoleConfig::Stdio => ConsoleSink::Stdout,
            ConsoleConfig::Buffer { output, .. } => ConsoleSink::Buffer(output.clone()),
            ConsoleConfig::Stderr => ConsoleSink::Stderr,
            ConsoleConfig::Null => ConsoleSink::Null,
        };
        // Agent mode needs a vsock device; without an explicit socket the
        // VM gets a private one in a runtime directory removed with it.
        let mut runtime_dir = None;
        let mut config = config;
        if config.agent && config.vsock.is_none() {
            let dir = RuntimeDir::new()?;
            config.vsock = Some(config::VsockConfig {
                guest_cid: 3,
                uds_path: dir.0.join("vsock.sock"),
            });
            runtime_dir = Some(dir);
        }
        let ready = match (&config.vsock, config.agent) {
            (Some(v), true) => Some(agent::ReadyListener::bind(&v.uds_path)?),
            _ => None,
        };
        let virtio = virtio_devices(&config)?;
        let control = Arc::new(VmControl::new());
        let backend = kvm::KvmVm::new(&spec, virtio, control.clone(), sink)?;
        if let ConsoleConfig::Buffer { input, .. } = &config.console {
            backend
                .serial()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(input);
        }
        Ok(VirtualMachine {
            control,
            backend,
            console: config.console,
            timeout: config.timeout,
            profile_hz: config.profile_hz,
            system_map,
            compat,
            ran: false,
            vsock_path: config.vsock.as_ref().map(|v| v.uds_path.clone()),
            ready,
            agent_timeout: config.agent_timeout,
            seccomp: config.seccomp,
            _runtime_dir: runtime_dir,
        })
    }

    /// The host socket of the VM's vsock device, if it has one.
    pub fn vsock_path(&self) -> Option<&Path> {
        self.vsock_path.as_deref()
    }

    /// Starts the VM on a background thread ("vm"), for agent mode: the
    /// caller then waits for the agent, runs commands and stops the VM.
    pub fn spawn(mut self) -> Result<RunningVm, Error> {
        let ready = self.ready.take();
        let vsock = self.vsock_path.clone();
        let control = self.control.clone();
        let agent_timeout = self.agent_timeout;
        let kind = self.seccomp.then_some(seccomp::ThreadKind::Main);
        let thread = seccomp::spawn("vm".into(), kind, move || {
            let r = self.run();
            // Tear the devices down as soon as the guest is gone: the vsock
            // device's host connections close, so a client still reading
            // from one (an `exec` relay, a published port) sees the end
            // instead of waiting forever; disks are flushed.
            drop(self);
            r
        })?;
        Ok(RunningVm {
            thread: Some(thread),
            control,
            ready,
            vsock,
            agent_timeout,
            agent_failed: false,
        })
    }

    /// Runs the guest to its end and returns how it ended. A VM runs once.
    pub fn run(&mut self) -> Result<ExitStatus, Error> {
        if self.ran {
            return Err(Error::Device("this VM has already run".into()));
        }
        self.ran = true;
        let (_raw, _input) = match self.console {
            ConsoleConfig::Stdio => (
                console::RawTerminal::enable(),
                Some(console::InputThread::spawn(
                    self.backend.serial(),
                    self.seccomp,
                )?),
            ),
            _ => (None, None),
        };
        let outcome = self
            .backend
            .run(self.timeout, self.profile_hz, self.seccomp)?;
        if self.profile_hz > 0 {
            profile::report(&self.backend.samples(), self.system_map.as_deref());
        }
        match outcome {
            Outcome::Status(s) => Ok(s),
            Outcome::Failed(msg) => Err(Error::Run(msg)),
        }
    }

    /// A handle that stops this VM from another thread (a signal handler
    /// thread, say), before or while it runs.
    pub fn stopper(&self) -> VmStopper {
        VmStopper {
            control: self.control.clone(),
            vsock: self.ready.as_ref().and(self.vsock_path.clone()),
        }
    }

    /// Markers the guest reported (userspace reached, command started…).
    pub fn markers(&self) -> Vec<Marker> {
        self.control.markers()
    }

    /// Instructions the VMM completed because KVM's emulator could not, by
    /// kind (software-KVM hosts only; empty on hardware KVM).
    pub fn emulated_instructions(&self) -> std::collections::HashMap<&'static str, u64> {
        self.backend.emulated()
    }

    /// Whether the software-KVM compatibility path is on for this VM.
    pub fn cpu_compat(&self) -> bool {
        self.compat
    }
}

type VmThread = std::thread::JoinHandle<Result<ExitStatus, Error>>;

/// A VM running on a background thread (see [`VirtualMachine::spawn`]).
/// Dropping it stops the VM at once.
pub struct RunningVm {
    thread: Option<VmThread>,
    control: Arc<VmControl>,
    ready: Option<agent::ReadyListener>,
    vsock: Option<PathBuf>,
    agent_timeout: Duration,
    /// `wait_ready` failed: there is no agent to ask for a clean poweroff.
    agent_failed: bool,
}

impl RunningVm {
    /// Waits until the guest agent is ready to run commands (agent mode).
    pub fn wait_ready(&mut self) -> Result<(), Error> {
        let Some(ready) = self.ready.take() else {
            return Ok(());
        };
        let control = self.control.clone();
        let r = ready.wait(self.agent_timeout, || control.status().is_none());
        self.agent_failed = r.is_err();
        r.map_err(|e| match self.control.status() {
            Some(status) => Error::Run(format!(
                "the VM ended ({status:?}) before its agent was ready"
            )),
            None => e.into(),
        })
    }

    /// The vsock device's host socket.
    pub fn vsock_path(&self) -> Option<&Path> {
        self.vsock.as_deref()
    }

    /// Runs a command through the guest agent and relays its streams.
    pub fn exec(
        &self,
        req: agent::ExecRequest,
        io: agent::ExecIo<'_>,
        on_start: impl FnOnce(agent::ExecHandle),
    ) -> Result<agent::ExecOutcome, Error> {
        let uds = self
            .vsock
            .as_deref()
            .ok_or_else(|| Error::Device("this VM has no vsock device".into()))?;
        Ok(agent::exec(uds, req, io, on_start)?)
    }

    /// A handle that stops this VM from another thread.
    pub fn stopper(&self) -> VmStopper {
        VmStopper {
            control: self.control.clone(),
            vsock: self.vsock.clone(),
        }
    }

    /// Whether the VM is still running.
    pub fn is_running(&self) -> bool {
        self.control.status().is_none()
    }

    /// Stops the guest: asks the agent for a clean poweroff (disks synced
    /// and unmounted), waits up to `grace`, then stops the vCPUs. A VM
    /// whose agent never became ready is stopped at once.
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus, Error> {
        if self.agent_failed && self.is_running() {
            self.control.request_stop(ExitStatus::PowerOff);
        }
        if self.is_running() {
            if let Some(uds) = &self.vsock {
                if let Err(e) = agent::request_shutdown(uds) {
                    tracing::warn!("clean shutdown request failed ({e}); stopping the VM");
                }
            }
            if self.control.wait(Some(grace)).is_none() {
                tracing::warn!("the guest did not power off within {grace:?}; stopping it");
                self.control.request_stop(ExitStatus::PowerOff);
            }
        }
        self.join()
    }

    /// Waits for the VM to end on its own.
    pub fn wait(mut self) -> Result<ExitStatus, Error> {
        self.join()
    }

    fn join(&mut self) -> Result<ExitStatus, Error> {
        let Some(t) = self.thread.take() else {
            return Err(Error::Run("the VM thread is gone".into()));
        };
        match t.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Run("the VM thread panicked".into())),
        }
    }
}

/// Stops a VM from any thread; cheap to clone. See
/// [`VirtualMachine::stopper`] and [`RunningVm::stopper`].
#[derive(Clone)]
pub struct VmStopper {
    control: Arc<VmControl>,
    /// The agent's socket, for a clean poweroff (agent-mode VMs only).
    vsock: Option<PathBuf>,
}

impl VmStopper {
    /// Whether the VM is still running.
    pub fn is_running(&self) -> bool {
        self.control.status().is_none()
    }

    /// Asks for a clean poweroff: the agent's Shutdown (the guest syncs
    /// and unmounts its disks) when the VM has an agent, else — or if the
    /// agent cannot be reached — stops the vCPUs at once. Returns whether
    /// the clean path was taken. Either way the VM's disks are flushed on
    /// the host when it is dropped.
    pub fn request_shutdown(&self) -> bool {
        if let Some(uds) = &self.vsock {
            match agent::request_shutdown(uds) {
                Ok(()) => return true,
                Err(e) => tracing::warn!("clean shutdown request failed ({e}); stopping the VM"),
            }
        }
        self.force_stop();
        false
    }

    /// Stops the vCPUs now (the guest sees a power cut).
    pub fn force_stop(&self) {
        self.control.request_stop(ExitStatus::PowerOff);
    }

    /// Waits until the VM ended or `timeout` passed; returns whether it ended.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.control.wait(Some(timeout)).is_some()
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.control.request_stop(ExitStatus::PowerOff);
            let _ = self.join();
        }
    }
}
