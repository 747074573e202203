//! The KVM backend's build stage: from a resolved [`GuestImage`] and the
//! configuration to a [`KvmVm`] with its devices attached, and the run
//! step that wires the console around it. Runs on the caller's thread
//! (build) and on the thread in `VirtualMachine::run` (run).

use std::collections::HashMap;
use std::sync::Arc;

use super::{devices, BootSpec, KvmVm};
use crate::builder::GuestImage;
use crate::config::{ConsoleConfig, CpuCompat, VmConfig};
use crate::devices::serial::ConsoleSink;
use crate::devices::{Outcome, VmControl};
use crate::error::{ConfigError, Error};
use crate::GuestArch;

/// A built KVM VM and what the caller reports about it.
pub(crate) struct KvmBackend {
    vm: KvmVm,
    /// Whether the software-KVM compatibility path is on.
    pub(crate) compat: bool,
}

impl KvmBackend {
    /// The options this backend cannot honour: checked before the guest
    /// image is resolved (which may mean building a kernel).
    pub(crate) fn check(config: &VmConfig) -> Result<(), Error> {
        if config.arch != GuestArch::host() {
            return Err(ConfigError::ArchNotRunnable {
                arch: config.arch,
                backend: "KVM",
                host: GuestArch::host(),
            }
            .into());
        }
        if config.rosetta {
            return Err(ConfigError::NotOnBackend {
                option: "--rosetta",
                backend: "KVM",
                hint: "Rosetta is Apple's, for Virtualization.framework on Apple Silicon",
            }
            .into());
        }
        Ok(())
    }

    /// Plans the devices, loads the kernel and creates the vCPUs (after
    /// [`KvmBackend::check`]).
    pub(crate) fn build(
        config: &VmConfig,
        image: &mut GuestImage,
        control: Arc<VmControl>,
    ) -> Result<Self, Error> {
        if config.seccomp {
            crate::seccomp::check()?;
        }
        let compat_reason = match config.cpu_compat {
            CpuCompat::On => Some("forced with --cpu-compat on"),
            CpuCompat::Off => None,
            CpuCompat::Auto => super::host::software_kvm_reason(),
        };
        let compat = compat_reason.is_some();
        if let Some(reason) = compat_reason {
            tracing::info!("software KVM host ({reason}): applying the CPU compatibility path");
        }
        // Debug aid: features to leave visible on the compatibility path.
        let compat_keep = std::env::var("LOCALD_VMM_COMPAT_KEEP").unwrap_or_default();
        let cmdline =
            crate::guest_cmdline(image.default_kernel, compat.then_some(compat_keep.as_str()));
        let spec = BootSpec {
            kernel: image.kernel.clone(),
            initrd: image.initrd.take(),
            cmdline,
            user_cmdline: config.cmdline.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            masked: if compat {
                super::cpuid::compat_mask(&compat_keep)
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
        let restore = match &config.restore {
            Some(dir) => Some(super::snapshotter::load(dir)?),
            None => None,
        };
        let virtio = devices::virtio_devices(config)?;
        let vm = KvmVm::new(&spec, virtio, control, sink, restore)?;
        if let ConsoleConfig::Buffer { input, .. } = &config.console {
            vm.serial()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(input);
        }
        Ok(KvmBackend { vm, compat })
    }

    /// Runs the guest to its end. With a stdio console, stdin goes to the
    /// UART through an input thread (raw mode is the caller's job).
    pub(crate) fn run(&mut self, opts: &crate::backend::RunOptions) -> Result<Outcome, Error> {
        // Stdin on /dev/null (services, CI, benchmarks) has nothing to
        // forward: no thread for it.
        let _input = match opts.console {
            ConsoleConfig::Stdio if !super::console_input::stdin_is_dev_null() => Some(
                super::console_input::InputThread::spawn(self.vm.serial(), opts.seccomp)?,
            ),
            _ => None,
        };
        let outcome = self.vm.run(opts.timeout, opts.profile_hz, opts.seccomp)?;
        if opts.profile_hz > 0 {
            crate::profile::report(&self.vm.samples(), opts.system_map.as_deref());
        }
        Ok(outcome)
    }

    /// A handle that snapshots the VM while it runs.
    pub(crate) fn snapshotter(&self) -> super::Snapshotter {
        self.vm.snapshotter()
    }

    /// Instructions completed for KVM's emulator, by kind.
    pub(crate) fn emulated(&self) -> HashMap<&'static str, u64> {
        self.vm.emulated()
    }
}
