//! Emulated devices: the I/O buses, the legacy PC devices (8250 UART,
//! i8042 reset line), and the paravirtual exit port.
//!
//! Nothing here imports `kvm_ioctls`: devices see only byte accesses and
//! raise interrupts through [`vm_superio::Trigger`]s, so they are tested
//! without KVM and reused by any backend. Device code runs on the vCPU
//! thread that performed the access (and the console input thread for the
//! UART's receive side).

pub mod bus;
pub mod control;
pub mod exit_port;
pub mod legacy;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use control::{ExitStatus, Outcome, VmControl};
