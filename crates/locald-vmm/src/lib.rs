//! locald-vmm: a single-binary microVM monitor.
//!
//! Public API: [`VmConfig`] → [`VirtualMachine::new`] → [`VirtualMachine::run`],
//! which returns the guest's [`ExitStatus`]. `new` and `run` run on the
//! caller's thread; the VM spawns one thread per vCPU plus, with a stdio
//! console, a console input thread. With [`VmConfig::seccomp`] (the
//! default) every thread the VM creates runs under a seccomp filter of its
//! kind ([`seccomp`]); the caller's thread is left alone.
//!
//! The platform seam is the whole VM ([`backend`]): on Linux it drives
//! `/dev/kvm` through the [`kvm`] backend and its emulated devices; on
//! macOS the Virtualization.framework backend (`vz`) brings the
//! framework's devices. Configuration, guest assets, the agent protocol,
//! publishing over vsock and named VMs are shared.

pub mod agent;
pub mod assets;
mod backend;
pub mod builder;
pub mod cmdline;
pub mod config;
pub mod console;
pub mod cpio;
pub mod devices;
pub mod error;
pub mod hostdir;
pub mod hybrid;
pub mod image;
pub mod instance;
#[cfg(target_os = "linux")]
pub mod kvm;
#[cfg(target_os = "linux")]
pub mod profile;
pub mod publish;
pub mod runtime;
#[cfg(target_os = "linux")]
pub mod seccomp;
/// Thread spawning without seccomp, where the platform has none.
#[cfg(not(target_os = "linux"))]
#[path = "seccomp_none.rs"]
pub mod seccomp;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod test_support;
mod vm;
pub mod vz;
pub mod warm;

pub use cmdline::{
    compat_cmdline, guest_cmdline, BASE_CMDLINE, COMPAT_CLEARCPUID, COMPAT_CMDLINE,
    COMPAT_DEFAULT_KERNEL_CMDLINE, DEFAULT_GUEST_CMDLINE,
};
pub use config::{
    disk_name, CacheMode, ConsoleConfig, CpuCompat, DiskConfig, GuestArch, ImageRun, RootfsConfig,
    SharedBuffer, VmConfig,
};
pub use devices::control::Marker;
pub use devices::ExitStatus;
pub use error::{BootError, ConfigError, Error};
pub use runtime::runtime_base;
pub use vm::{RunningVm, VirtualMachine, VmStopper};
