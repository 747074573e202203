//! The macOS backend, on Apple's Virtualization.framework (VZ).

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
pub use backend::{host_limits, VzVm};
pub use error::VzError;
pub use lifecycle::StopPolicy;
pub use plan::{BootImage, PlanError, PlanOptions, VzLimits, VzPlan};
