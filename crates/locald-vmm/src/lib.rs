//! locald-vmm: a single-binary microVM monitor.
//!
//! Public API: [`VmConfig`] → [`VirtualMachine::new`] → [`VirtualMachine::run`],
//! which returns the guest's [`ExitStatus`]. `new` and `run` run on the
//! caller's thread; the VM spawns one thread per vCPU plus, with a stdio
//! console, a console input thread.
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
#[cfg(target_os = "linux")]
pub mod kvm;
pub mod profile;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

pub use config::{
    CacheMode, ConsoleConfig, CpuCompat, DiskConfig, RootfsConfig, SharedBuffer, VmConfig,
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

/// The rest of the software-KVM command line (see docs/software-kvm.md).
pub const COMPAT_CMDLINE: &str =
    "tsc=reliable no_timer_check noreplace-smp random.trust_cpu=on rodata=off percpu_alloc=page slab_sysfs=off";

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
    if config.all_disks().next().is_some() {
        return Err(Error::Device("virtio-blk is not available yet".into()));
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
}

impl VirtualMachine {
    /// Validates `config`, resolves the default guest if needed, and builds
    /// the VM (memory, devices, vCPUs, kernel loaded). Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        config.validate()?;
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
        if config.command.is_some() || root.is_some() {
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
            }));
        }
        let mut cmdline = BASE_CMDLINE.to_string();
        if default_kernel {
            cmdline.push(' ');
            cmdline.push_str(DEFAULT_GUEST_CMDLINE);
        }
        if compat {
            cmdline.push(' ');
            cmdline.push_str(&compat_cmdline(&compat_keep));
        }
        if let Some(extra) = &config.cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let spec = kvm::BootSpec {
            kernel,
            initrd,
            cmdline,
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
            ConsoleConfig::Null => ConsoleSink::Null,
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
                Some(console::InputThread::spawn(self.backend.serial())?),
            ),
            _ => (None, None),
        };
        let outcome = self.backend.run(self.timeout, self.profile_hz)?;
        if self.profile_hz > 0 {
            profile::report(&self.backend.samples(), self.system_map.as_deref());
        }
        match outcome {
            Outcome::Status(s) => Ok(s),
            Outcome::Failed(msg) => Err(Error::Run(msg)),
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
