//! The macOS backend, on Apple's Virtualization.framework (VZ).
//!
//! Plain Rust, compiled and tested everywhere: [`plan`] (what VZ will
//! create, from `VmConfig`, with one [`PlanError`] per option VZ cannot
//! honour), [`kernel`] (kernel format sniffing), [`lifecycle`] (delegate
//! events → `ExitStatus`, the requestStop/grace/force sequence),
//! [`console`] (output pump, panic detection) and, on Unix, [`bridge`]
//! (Firecracker's hybrid vsock on `uds_path`, so `agent.rs`,
//! `publish.rs` and named VMs work unchanged). macOS only: `backend`
//! (the Objective-C glue, [`VzVm`]).
//!
//! The seam (call sequence on macOS):
//!
//! ```text
//! let limits = vz::host_limits();                       // VZ's CPU/memory range on this Mac
//! let plan = VzPlan::new(&config, boot, &opts, &limits)?;   // BootImage from the guest-image stage
//! let mut vm = VzVm::new(&plan, control.clone())?;      // validated config, VM on its own queue,
//!                                                       // vsock bridge bound on plan.vsock.uds_path
//! let status = vm.run(plan.timeout)?;                   // blocks; another thread may call
//!                                                       // control.request_stop(..) to stop it
//! ```
//!
//! `config.vsock` must already be set when `config.agent` is (the agent
//! stage picks the socket path; the guest CID must be 3). Raw TTY mode for
//! `ConsoleConfig::Stdio` is the caller's job, as on Linux. See
//! docs/macos.md for what was type-checked, tested and never run.

#[cfg(target_os = "macos")]
mod backend;
#[cfg(unix)]
pub mod bridge;
pub mod console;
pub mod error;
pub mod kernel;
pub mod lifecycle;
pub mod plan;
#[cfg(target_os = "macos")]
mod seam;

#[cfg(target_os = "macos")]
pub use backend::{host_limits, VzVm};
pub use error::VzError;
pub use lifecycle::StopPolicy;
pub use plan::{BootImage, PlanError, PlanOptions, VzLimits, VzPlan};
#[cfg(target_os = "macos")]
pub(crate) use seam::VzBackend;
