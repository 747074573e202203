//! locald-vmm: a single-binary microVM monitor.
//!
//! Public API: [`VmConfig`] → [`VirtualMachine::new`] → [`VirtualMachine::run`],
//! which returns the guest's [`ExitStatus`]. Runs on the caller's thread; the
//! VM spawns one thread per vCPU plus a console input thread.

pub mod assets;
pub mod cpio;
