//! The macOS backend, on Apple's Virtualization.framework (VZ).

pub mod bridge;
pub mod console;
pub mod error;
pub mod kernel;
pub mod lifecycle;
pub mod plan;
