//! Emulated devices (the KVM backend's; Linux only, except [`control`],
//! which every backend uses): the I/O buses, the legacy PC devices (8250 UART,
//! i8042 reset line), and the paravirtual exit port.
//!
//! Nothing here imports `kvm_ioctls`: devices see only byte accesses and
//! raise interrupts through [`vm_superio::Trigger`]s, so they are tested
//! without KVM and reused by any backend. Device code runs on the vCPU
//! thread that performed the access (and the console input thread for the
//! UART's receive side).

#[cfg(target_os = "linux")]
pub mod bus;
pub mod control;
#[cfg(target_os = "linux")]
pub mod exit_port;
#[cfg(target_os = "linux")]
pub mod legacy;
#[cfg(target_os = "linux")]
pub mod serial;
#[cfg(target_os = "linux")]
pub mod virtio;

#[cfg(target_os = "linux")]
pub use bus::{Bus, BusDevice, BusError};
pub use control::{ExitStatus, Outcome, VmControl};
