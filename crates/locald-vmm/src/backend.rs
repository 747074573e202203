//! The platform seam: one VM backend per target OS, behind
//! [`crate::VirtualMachine`]. On Linux the KVM backend ([`crate::kvm`])
//! with its emulated devices; on macOS the Virtualization.framework
//! backend ([`crate::vz`]) with the framework's devices. Everything else —
//! configuration, guest assets, the agent protocol, publishing over vsock,
//! named VMs, the CLI — is shared. Runs on the caller's thread (build) and
//! the thread in `VirtualMachine::run`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::builder::GuestImage;
use crate::config::{ConsoleConfig, VmConfig};
use crate::devices::{Outcome, VmControl};
use crate::error::Error;
use crate::runtime::RuntimeDir;

/// What `run` needs besides the backend itself.
pub(crate) struct RunOptions {
    pub(crate) console: ConsoleConfig,
    pub(crate) timeout: Option<Duration>,
    /// Guest RIP sampling (KVM only; other backends refuse it).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) profile_hz: u32,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) system_map: Option<PathBuf>,
    pub(crate) seccomp: bool,
}

/// Takes snapshots of a running VM (the KVM backend's; the
/// Virtualization.framework backend has none yet).
#[cfg(target_os = "linux")]
pub type Snapshotter = crate::kvm::Snapshotter;
/// Takes snapshots of a running VM (none on this platform).
#[cfg(not(target_os = "linux"))]
pub enum Snapshotter {}

#[cfg(not(target_os = "linux"))]
impl Snapshotter {
    pub(crate) fn take(
        &self,
        _dir: &std::path::Path,
        _after: crate::snapshot::AfterSnapshot,
    ) -> Result<crate::snapshot::SnapshotInfo, crate::snapshot::SnapshotError> {
        match *self {}
    }
}

/// The backend of one VM.
pub(crate) enum Backend {
    #[cfg(target_os = "linux")]
    Kvm(crate::kvm::builder::KvmBackend),
    #[cfg(target_os = "macos")]
    Vz(crate::vz::VzBackend),
}

impl Backend {
    /// Whether this platform's backend wants a runtime directory for files
    /// of its own (the Virtualization.framework takes the initrd as a file).
    pub(crate) const NEEDS_RUNTIME_DIR: bool = cfg!(target_os = "macos");

    /// Refuses, before any work, what this platform's backend cannot do
    /// (another guest architecture, options of the other backend).
    pub(crate) fn check(config: &VmConfig) -> Result<(), Error> {
        #[cfg(target_os = "linux")]
        return crate::kvm::builder::KvmBackend::check(config);
        #[cfg(target_os = "macos")]
        return crate::vz::plan::check_unsupported(
            config,
            &crate::vz::PlanOptions {
                rosetta: config.rosetta,
                ..crate::vz::PlanOptions::default()
            },
        )
        .map_err(|e| Error::Vz(e.into()));
        #[cfg(not(any(target_os = "linux", target_os = "macos")))]
        Err(crate::error::ConfigError::NoBackend.into())
    }

    /// Plans the devices and creates the VM on this platform's backend.
    #[allow(unused_variables)]
    pub(crate) fn build(
        config: &VmConfig,
        image: &mut GuestImage,
        control: Arc<VmControl>,
        runtime_dir: Option<&RuntimeDir>,
    ) -> Result<Self, Error> {
        #[cfg(target_os = "linux")]
        return Ok(Backend::Kvm(crate::kvm::builder::KvmBackend::build(
            config, image, control,
        )?));
        #[cfg(target_os = "macos")]
        return Ok(Backend::Vz(crate::vz::VzBackend::build(
            config,
            image,
            control,
            runtime_dir,
        )?));
        #[cfg(not(any(target_os = "linux", target_os = "macos")))]
        Err(crate::error::ConfigError::NoBackend.into())
    }

    /// Runs the guest to its end.
    pub(crate) fn run(&mut self, opts: &RunOptions) -> Result<Outcome, Error> {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Kvm(b) => b.run(opts),
            #[cfg(target_os = "macos")]
            Backend::Vz(b) => b.run(opts),
        }
    }

    /// A snapshot handle (KVM only).
    pub(crate) fn snapshotter(&self) -> Option<Snapshotter> {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Kvm(b) => Some(b.snapshotter()),
            #[cfg(target_os = "macos")]
            Backend::Vz(_) => None,
        }
    }

    /// Whether the software-KVM compatibility path is on (KVM only).
    pub(crate) fn cpu_compat(&self) -> bool {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Kvm(b) => b.compat,
            #[cfg(target_os = "macos")]
            Backend::Vz(_) => false,
        }
    }

    /// Instructions the VMM completed for KVM's emulator (KVM only).
    pub(crate) fn emulated(&self) -> HashMap<&'static str, u64> {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Kvm(b) => b.emulated(),
            #[cfg(target_os = "macos")]
            Backend::Vz(_) => HashMap::new(),
        }
    }
}
