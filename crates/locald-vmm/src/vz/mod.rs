//! The macOS backend, on Apple's Virtualization.framework (VZ).

pub mod bridge;
pub mod error;
pub mod kernel;
pub mod plan;
