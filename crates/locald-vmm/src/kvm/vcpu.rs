//! vCPU creation, setup and the run loop. Each vCPU runs on its own thread
//! (named `vcpu N`); the thread that called `run()` stops them by setting
//! the stop flag and kicking them with a real-time signal, which makes
//! `KVM_RUN` return `EINTR`. The same kick, with the profiling flag set,
//! takes a guest-RIP sample.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{kvm_run, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::KernelEntry;
use super::exits::{self, Action, Exit};
use super::{cpuid, emulate, regs};
use crate::devices::{Bus, VmControl};
use crate::error::Error;

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process.
pub fn install_kick_handler() -> Result<(), Error> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(Error::kvm("installing the vCPU kick signal handler"));
    });
    result
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Stop flag and outcome.
    pub control: Arc<VmControl>,
    /// Guest memory (for decoding failed instructions).
    pub mem: GuestMemoryMmap,
    /// Guest RIP samples when profiling.
    pub samples: Mutex<Vec<crate::profile::Sample>>,
    /// Instructions completed by [`emulate`], by kind.
    pub emulated: Mutex<HashMap<&'static str, u64>>,
    /// Parking the vCPUs for a snapshot.
    pub pause: Pause,
}

/// What the parked vCPUs hand back to the snapshotting thread.
#[derive(Default)]
struct PauseState {
    /// A pause was asked for.
    requested: bool,
    /// Parked vCPUs read their state for the snapshot, with these MSRs.
    capture: Option<Arc<Vec<u32>>>,
    /// vCPUs parked now.
    parked: usize,
    /// Saved states by vCPU id (or why saving failed).
    saved: Vec<Option<Result<super::snapshot::VcpuState, crate::snapshot::SnapshotError>>>,
    /// The threads to kick, while the VM runs.
    threads: Vec<libc::pthread_t>,
}

/// Parks the vCPU threads between two `KVM_RUN`s (snapshots). The
/// snapshotting thread calls [`Pause::park_all`] and [`Pause::release`];
/// each vCPU thread, kicked out of `KVM_RUN`, completes any pending I/O
/// with an `immediate_exit` run, reads its own state when asked, and waits.
#[derive(Default)]
pub struct Pause {
    state: Mutex<PauseState>,
    cv: Condvar,
}

impl Pause {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the running vCPU threads (kick targets).
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        let mut st = self.lock();
        st.saved = threads.iter().map(|_| None).collect();
        st.threads = threads;
    }

    /// Forgets the threads: they are about to be joined.
    pub fn clear_threads(&self) {
        self.lock().threads.clear();
    }

    fn requested(&self) -> bool {
        self.lock().requested
    }

    /// Parks every vCPU (saving each one's state when `capture`) and
    /// returns the states, or `None` if the VM is not running or they did
    /// not all park within `limit`.
    pub fn park_all(
        &self,
        capture: Option<Vec<u32>>,
        limit: std::time::Duration,
        control: &VmControl,
    ) -> Result<Vec<super::snapshot::VcpuState>, crate::snapshot::SnapshotError> {
        use crate::snapshot::SnapshotError;
        let deadline = std::time::Instant::now() + limit;
        let mut st = self.lock();
        if st.threads.is_empty() || control.should_stop() {
            return Err(SnapshotError::NotRunning);
        }
        st.requested = true;
        let capture = capture.map(Arc::new);
        st.capture = capture.clone();
        for s in st.saved.iter_mut() {
            *s = None;
        }
        let n = st.threads.len();
        while st.parked < n {
            if control.should_stop() {
                st.requested = false;
                self.cv.notify_all();
                return Err(SnapshotError::NotRunning);
            }
            if std::time::Instant::now() >= deadline {
                st.requested = false;
                self.cv.notify_all();
                return Err(SnapshotError::PauseTimeout(limit));
            }
            for &t in &st.threads {
                // SAFETY: `t` is a vCPU thread that has not been joined
                // (threads are cleared under this lock before joining);
                // the kick signal has an empty handler.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            st = self
                .cv
                .wait_timeout(st, std::time::Duration::from_micros(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if capture.is_none() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(n);
        for s in st.saved.iter_mut() {
            match s.take() {
                Some(Ok(v)) => out.push(v),
                Some(Err(e)) => return Err(e),
                None => return Err(SnapshotError::NotRunning),
            }
        }
        Ok(out)
    }

    /// Lets parked vCPUs run on (or, if the VM is stopping, end).
    pub fn release(&self) {
        self.lock().requested = false;
        self.cv.notify_all();
    }

    /// Called by a vCPU thread between runs: parks while a pause is
    /// requested.
    fn park(&self, vcpu: &mut VcpuFd, id: u8, control: &VmControl) {
        // Complete any I/O KVM has half done (a string PIO, an MMIO read)
        // without entering the guest.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        let capture = self.lock().capture.clone();
        let saved = capture.map(|msrs| super::snapshot::save_vcpu(vcpu, &msrs));
        let mut st = self.lock();
        if let Some(slot) = st.saved.get_mut(usize::from(id)) {
            *slot = saved;
        }
        st.parked += 1;
        self.cv.notify_all();
        while st.requested && !control.should_stop() {
            st = self
                .cv
                .wait_timeout(st, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.parked -= 1;
    }
}

/// Per-vCPU flag: the next kick is a profiling sample.
#[derive(Default)]
pub struct SampleFlag(pub AtomicBool);

/// Creates vCPU `id` with its CPUID; `entry` (a cold boot) also gives it
/// boot MSRs, LAPIC LINT pins, FPU and, for the boot vCPU, the entry
/// register state. A restored vCPU gets its saved state instead
/// ([`super::snapshot::restore_vcpu`]).
/// `supported` is KVM's supported CPUID list, fetched once per VM.
pub fn create(
    vm: &VmFd,
    supported: &[kvm_bindings::kvm_cpuid_entry2],
    id: u8,
    cpus: u8,
    masked: &[cpuid::Masked],
    entry: Option<KernelEntry>,
) -> Result<VcpuFd, Error> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
    let mut entries = supported.to_vec();
    cpuid::configure(&mut entries, id, cpus, masked);
    let cpuid = CpuId::from_entries(&entries).map_err(crate::error::DeviceError::Cpuid)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("KVM_SET_CPUID2"))?;
    let Some(entry) = entry else {
        return Ok(vcpu);
    };
    let msrs = Msrs::from_entries(&regs::boot_msrs()).map_err(crate::error::DeviceError::Msrs)?;
    vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
    let lapic = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    vcpu.set_lapic(&regs::set_lint(lapic))
        .map_err(Error::kvm("KVM_SET_LAPIC"))?;
    vcpu.set_fpu(&regs::boot_fpu())
        .map_err(Error::kvm("KVM_SET_FPU"))?;
    if id == 0 {
        let sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&regs::boot_sregs(sregs, entry.mode))
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs::boot_regs(entry))
            .map_err(Error::kvm("KVM_SET_REGS"))?;
    }
    Ok(vcpu)
}

/// Maps KVM's exit to ours. `InternalError` carries 0 here: its suberror
/// lives in the run structure, read by [`internal_suberror`].
fn convert(exit: VcpuExit<'_>) -> Exit<'_> {
    match exit {
        VcpuExit::IoIn(p, d) => Exit::IoIn(p, d),
        VcpuExit::IoOut(p, d) => Exit::IoOut(p, d),
        VcpuExit::MmioRead(a, d) => Exit::MmioRead(a, d),
        VcpuExit::MmioWrite(a, d) => Exit::MmioWrite(a, d),
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::SystemEvent(t, _) => Exit::SystemEvent(t),
        VcpuExit::InternalError => Exit::InternalError(0),
        VcpuExit::FailEntry(reason, _) => Exit::FailEntry(reason),
        VcpuExit::Unknown => Exit::Other("Unknown"),
        VcpuExit::Exception => Exit::Other("Exception"),
        VcpuExit::Debug(_) => Exit::Other("Debug"),
        VcpuExit::IrqWindowOpen => Exit::Other("IrqWindowOpen"),
        VcpuExit::Intr => Exit::Other("Intr"),
        _ => Exit::Other("unsupported"),
    }
}

/// The suberror of the `KVM_EXIT_INTERNAL_ERROR` the vCPU just took.
fn internal_suberror(run: &kvm_run) -> u32 {
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel has filled the
    // `internal` member of the exit union.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// Reads guest-virtual memory page by page through the vCPU's page tables.
fn read_guest_virt(vcpu: &VcpuFd, mem: &GuestMemoryMmap, linear: u64, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let addr = linear.wrapping_add(done as u64);
        let in_page = (0x1000 - (addr & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        let Ok(t) = vcpu.translate_gva(addr) else {
            return false;
        };
        if t.valid == 0
            || mem
                .read_slice(&mut buf[done..done + n], GuestAddress(t.physical_address))
                .is_err()
        {
            return false;
        }
        done += n;
    }
    true
}

/// The registers, the instruction bytes at the guest's RIP, and the CPU
/// mode's bitness.
fn fetch_instruction(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
) -> Option<(kvm_bindings::kvm_regs, [u8; 15], u32)> {
    let r = vcpu.get_regs().ok()?;
    let s = vcpu.get_sregs().ok()?;
    let bitness = if s.efer & (1 << 10) != 0 && s.cs.l == 1 {
        64
    } else if s.cs.db == 1 {
        32
    } else {
        16
    };
    let linear = if bitness == 64 {
        r.rip
    } else {
        s.cs.base.wrapping_add(r.rip)
    };
    let mut b = [0u8; 15];
    // An instruction at the end of a mapping may have fewer readable bytes.
    let mut len = 15;
    while len > 0 && !read_guest_virt(vcpu, mem, linear, &mut b[..len]) {
        len -= 1;
    }
    (len > 0).then_some((r, b, bitness))
}

/// Completes an instruction KVM could not emulate, or says why not.
fn complete_instruction(vcpu: &VcpuFd, shared: &VcpuShared) -> Result<(), String> {
    let (mut regs, bytes, bitness) =
        fetch_instruction(vcpu, &shared.mem).ok_or_else(|| describe_rip(vcpu, &shared.mem))?;
    let (effect, kind) = emulate::emulate(&bytes, bitness, &mut regs).map_err(|e| e.to_string())?;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    if let emulate::Effect::InjectException(vector) = effect {
        let mut ev = vcpu
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        ev.exception.injected = 1;
        ev.exception.nr = vector;
        ev.exception.has_error_code = 0;
        ev.exception.error_code = 0;
        vcpu.set_vcpu_events(&ev)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
    }
    *shared
        .emulated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(kind)
        .or_default() += 1;
    Ok(())
}

/// Describes the instruction at the guest's RIP for error messages.
pub fn describe_rip(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let Ok(r) = vcpu.get_regs() else {
        return "RIP unknown".into();
    };
    let bytes = fetch_instruction(vcpu, mem).map(|(_, b, _)| b);
    match bytes {
        Some(b) => format!(
            "RIP {:#x}, instruction bytes {}",
            r.rip,
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        None => format!("RIP {:#x} (not mapped)", r.rip),
    }
}

/// The vCPU thread body: runs until the VM stops, reporting failures to
/// the control block.
pub fn run_loop(mut vcpu: VcpuFd, id: u8, shared: Arc<VcpuShared>, sample: Arc<SampleFlag>) {
    let control = &shared.control;
    loop {
        if control.should_stop() {
            return;
        }
        if shared.pause.requested() {
            shared.pause.park(&mut vcpu, id, control);
            continue;
        }
        let action = match vcpu.run() {
            Ok(exit) => match convert(exit) {
                Exit::InternalError(_) => {
                    let sub = internal_suberror(vcpu.get_kvm_run());
                    exits::handle(Exit::InternalError(sub), &shared.pio, &shared.mmio)
                }
                exit => exits::handle(exit, &shared.pio, &shared.mmio),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if sample.0.swap(false, Ordering::Relaxed) {
                    if let Ok(r) = vcpu.get_regs() {
                        let at = control.elapsed();
                        shared
                            .samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(crate::profile::Sample {
                                at,
                                cpu: id,
                                rip: r.rip,
                            });
                    }
                }
                Action::Continue
            }
            Err(e) => Action::Fatal(format!("KVM_RUN failed: {e}")),
        };
        match action {
            Action::Continue => {}
            Action::Stop(status) => {
                control.request_stop(status);
                return;
            }
            Action::EmulationFailure => {
                if let Err(msg) = complete_instruction(&vcpu, &shared) {
                    control.fail(format!(
                        "vCPU {id}: KVM could not emulate an instruction: {msg}"
                    ));
                    return;
                }
            }
            Action::Fatal(msg) => {
                control.fail(format!(
                    "vCPU {id}: {msg} ({})",
                    describe_rip(&vcpu, &shared.mem)
                ));
                return;
            }
        }
    }
}
