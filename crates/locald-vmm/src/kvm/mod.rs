//! The Linux/KVM backend: creates the VM (memory, in-kernel irqchip and PIT,
//! legacy devices on the port bus), loads the kernel, creates the vCPUs and
//! runs them, one thread each, until the guest ends. `KvmVm::new` and
//! `KvmVm::run` run on the caller's thread.

pub mod boot;
pub(crate) mod builder;
pub mod console_input;
pub mod cpuid;
mod devices;
pub mod emulate;
pub mod exits;
pub mod host;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod snapshot;
mod snapshotter;
pub(crate) mod teardown;
pub mod vcpu;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::devices::exit_port::{ExitPort, EXIT_PORT_BASE, EXIT_PORT_LEN};
use crate::devices::legacy::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    ConsoleSink, ConsoleWriter, SerialDevice, COM1_BASE, COM1_GSI, COM1_LEN,
};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::worker::Gate;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, ExitStatus, Outcome, VmControl};
use crate::error::{BootError, DeviceError, Error};
use snapshotter::check_shape;
pub use snapshotter::{machine_of, Snapshotter};
use vcpu::{SampleFlag, VcpuShared};

/// Everything the backend needs to boot, resolved from the user's config.
pub struct BootSpec {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd name (for messages) and bytes.
    pub initrd: Option<(String, Vec<u8>)>,
    /// Kernel command line (the VMM's part; virtio devices are announced
    /// after it).
    pub cmdline: String,
    /// The user's extra command line, placed last so it can override.
    pub user_cmdline: Option<String>,
    /// vCPU count.
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// CPU features hidden from the guest (empty unless the software-KVM
    /// compatibility path is on).
    pub masked: Vec<cpuid::Masked>,
}

/// A virtio device to place on the MMIO bus, with a name for logs.
pub struct VirtioSpec {
    /// Short name used in logs and thread names (e.g. `virtio-blk vda`).
    pub name: String,
    /// The device.
    pub device: Box<dyn VirtioDevice>,
}

/// Places the virtio devices in MMIO windows with one GSI each, wires
/// their interrupts (irqfd) and queue notifications (ioeventfd), and
/// returns the `virtio_mmio.device=` command-line text announcing them.
fn attach_virtio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    devices: Vec<VirtioSpec>,
    gate: &Gate,
    transports: &mut Vec<Arc<Mutex<MmioTransport>>>,
) -> Result<String, Error> {
    let mut cmdline = String::new();
    for (i, spec) in devices.into_iter().enumerate() {
        let base = layout::VIRTIO_MMIO_BASE + i as u64 * mmio::MMIO_WINDOW;
        let gsi = layout::VIRTIO_GSI_BASE + i as u32;
        if gsi > layout::IOAPIC_MAX_GSI {
            return Err(DeviceError::TooManyDevices { name: spec.name }.into());
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&irq, gsi)
            .map_err(Error::kvm("KVM_IRQFD (virtio)"))?;
        let mut transport = MmioTransport::new(spec.device, spec.name, mem.clone(), irq)?;
        transport.set_gate(gate.clone());
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + mmio::reg::QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(Error::kvm("KVM_IOEVENTFD (virtio queue notify)"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        transports.push(transport.clone());
        mmio_bus
            .insert(transport, base, mmio::MMIO_WINDOW)
            .map_err(DeviceError::Bus)?;
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    Ok(cmdline)
}

/// A created, not yet running, KVM virtual machine.
pub struct KvmVm {
    _kvm: Kvm,
    vcpus: Vec<VcpuFd>,
    shared: Arc<VcpuShared>,
    serial: Arc<Mutex<SerialDevice>>,
    /// What a snapshot of this VM reads.
    parts: Arc<SnapshotParts>,
}

/// Everything a snapshot reads besides the vCPUs' own state, shared with
/// [`Snapshotter`] handles.
pub struct SnapshotParts {
    pub(crate) vm: Arc<VmFd>,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) gate: Gate,
    /// Guest RAM (without the test code window).
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) shape: snapshot::MachineShape,
    pub(crate) host: snapshot::HostFingerprint,
    pub(crate) msr_indices: Vec<u32>,
    /// One snapshot at a time.
    pub(crate) busy: Mutex<()>,
}

/// A snapshot to restore: the parsed state file and the memory file.
pub struct Restore {
    /// The saved machine.
    pub saved: snapshot::SavedMachine,
    /// The memory file (mapped `MAP_PRIVATE`).
    pub memory: std::fs::File,
}

// Teardown hook (issue 17): the host's destruction of the VM goes to a
// helper process (see `teardown`); the fields then drop as before.
impl Drop for KvmVm {
    fn drop(&mut self) {
        // Device workers parked behind the gate (a restored VM that never
        // ran) must see their stop: let them go, once no snapshot is being
        // written.
        {
            let _no_snapshot = self.parts.busy.lock().unwrap_or_else(|e| e.into_inner());
            self.parts.gate.resume();
        }
        // vCPU descriptors hold the VM too: close them first (they are
        // already gone once the VM has run).
        self.vcpus.clear();
        // A snapshot handle may hold the VM descriptor longer: the helper
        // waits for the last close of it, wherever that happens.
        teardown::hand_off(&*self.parts.vm);
    }
}

fn guest_memory(mib: u64) -> Result<GuestMemoryMmap, Error> {
    let bytes = mib << 20;
    let ranges: Vec<_> = layout::ram_ranges(bytes)
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(mib, e.to_string()))
}

impl KvmVm {
    /// Opens KVM, builds the VM and loads the guest (`restore: None`), or
    /// builds it from a snapshot: memory mapped from its file, the
    /// interrupt controllers, clock, devices and vCPUs in their saved state.
    pub fn new(
        spec: &BootSpec,
        virtio: Vec<VirtioSpec>,
        control: Arc<VmControl>,
        sink: ConsoleSink,
        restore: Option<Restore>,
    ) -> Result<Self, Error> {
        let kvm =
            Kvm::new().map_err(|e| Error::KvmOpen(std::io::Error::from_raw_os_error(e.errno())))?;
        let max = kvm.get_max_vcpus();
        if usize::from(spec.vcpus) > max {
            return Err(Error::TooManyVcpus(spec.vcpus, max));
        }
        if let Some(r) = &restore {
            snapshot::check_host(&kvm)?;
            check_shape(spec, &virtio, &r.saved)?;
        }
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        let mem = match &restore {
            None => guest_memory(spec.memory_mib)?,
            Some(r) => snapshot::map_memory(
                &r.memory,
                &r.saved.shape.ram,
                &layout::ram_ranges(spec.memory_mib << 20),
            )?,
        };
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VM keeps (through `VcpuShared`) for as long as the VM exists.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm.set_tss_address(layout::KVM_TSS as usize)
            .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
        // Interrupt controllers and clock first: restored devices may
        // raise interrupts as soon as they start.
        if let Some(r) = &restore {
            snapshot::restore_vm(&vm, &r.saved.vm)?;
        }

        // Devices on the port bus.
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&irq, COM1_GSI)
            .map_err(Error::kvm("KVM_IRQFD (COM1)"))?;
        let writer = ConsoleWriter::new(sink, control.clone());
        let serial = Arc::new(Mutex::new(match &restore {
            None => SerialDevice::new(irq, writer),
            Some(r) => SerialDevice::from_snapshot(irq, writer, &r.saved.serial)
                .map_err(crate::snapshot::SnapshotError::from)?,
        }));
        let mut pio = Bus::new();
        let dev_err = |e: crate::devices::BusError| Error::from(DeviceError::Bus(e));
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)
            .map_err(dev_err)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(control.clone()))),
            I8042_BASE,
            I8042_LEN,
        )
        .map_err(dev_err)?;
        pio.insert(
            Arc::new(Mutex::new(ExitPort::new(control.clone()))),
            EXIT_PORT_BASE,
            EXIT_PORT_LEN,
        )
        .map_err(dev_err)?;

        // Virtio devices on the MMIO bus, announced on the command line.
        // Their workers stay parked until the vCPUs run.
        let gate = Gate::default();
        gate.pause().map_err(crate::snapshot::SnapshotError::from)?;
        let mut mmio_bus = Bus::new();
        let mut transports = Vec::new();
        let device_names: Vec<String> = virtio.iter().map(|v| v.name.clone()).collect();
        let mut cmdline = spec.cmdline.clone()
            + &attach_virtio(&vm, &mem, &mut mmio_bus, virtio, &gate, &mut transports)?;
        // Test hook, off by default (see emulate::code_window).
        let fetch_mem = if emulate::code_window::enabled() {
            emulate::code_window::attach(&mem, &mut mmio_bus)?
        } else {
            mem.clone()
        };
        if let Some(extra) = &spec.user_cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }

        // Guest image and boot structures (a cold boot only).
        let entry = match &restore {
            Some(_) => None,
            None => {
                let mem_bytes = spec.memory_mib << 20;
                let kernel = boot::load_kernel(&mem, &spec.kernel)?;
                let initrd = match &spec.initrd {
                    Some((name, data)) => {
                        Some(boot::load_initrd(&mem, mem_bytes, &kernel, name, data)?)
                    }
                    None => None,
                };
                boot::write_boot_info(&mem, mem_bytes, &kernel, &cmdline, initrd)?;
                regs::write_boot_tables(&mem, kernel.entry.mode)
                    .map_err(|e| BootError::Setup(format!("page tables: {e}")))?;
                mptable::write(&mem, spec.vcpus)
                    .map_err(|e| BootError::Setup(format!("MP table: {e}")))?;
                Some(kernel.entry)
            }
        };

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let vcpus = (0..spec.vcpus)
            .map(|id| {
                vcpu::create(
                    &vm,
                    supported.as_slice(),
                    id,
                    spec.vcpus,
                    &spec.masked,
                    entry,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let host = snapshot::fingerprint(supported.as_slice(), &kvm, &vcpus[0])?;
        let msr_indices = snapshot::msr_indices(&kvm)?;
        if let Some(r) = &restore {
            if let Some(why) = snapshot::host_difference(&r.saved.host, &host) {
                return Err(crate::snapshot::SnapshotError::ForeignHost(why).into());
            }
            for (v, s) in vcpus.iter().zip(&r.saved.vcpus) {
                snapshot::restore_vcpu(v, s)?;
            }
            // Nothing may fail once devices run (their workers wait
            // behind the paused gate, which only `run` or drop releases).
            vcpu::install_kick_handler()?;
            // Devices last: what they raise on start (a vsock transport
            // reset) reaches the restored local APICs. Their workers stay
            // parked behind the gate until the vCPUs run.
            for (t, saved) in transports.iter().zip(&r.saved.virtio) {
                t.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore(saved)
                    .map_err(crate::snapshot::SnapshotError::from)?;
            }
        }
        if restore.is_none() {
            vcpu::install_kick_handler()?;
        }
        let shared = Arc::new(VcpuShared {
            pio,
            mmio: mmio_bus,
            control,
            mem: fetch_mem,
            samples: Mutex::new(Vec::new()),
            emulated: Mutex::new(HashMap::new()),
            pause: vcpu::Pause::default(),
        });
        let parts = Arc::new(SnapshotParts {
            vm: Arc::new(vm),
            shared: shared.clone(),
            serial: serial.clone(),
            transports,
            gate,
            mem,
            shape: snapshot::MachineShape {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                ram: Vec::new(),
                compat: !spec.masked.is_empty(),
                devices: device_names,
            },
            host,
            msr_indices,
            busy: Mutex::new(()),
        });
        Ok(KvmVm {
            _kvm: kvm,
            vcpus,
            shared,
            serial,
            parts,
        })
    }

    /// A handle that snapshots this VM while it runs.
    pub fn snapshotter(&self) -> Snapshotter {
        Snapshotter(Arc::downgrade(&self.parts))
    }

    /// The COM1 device, for feeding console input.
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.serial.clone()
    }

    /// Runs the vCPUs until the guest ends, `timeout` passes, or a vCPU
    /// fails. With `profile_hz > 0`, samples guest RIPs at that rate. With
    /// `seccomp`, each vCPU thread installs the vCPU filter before its
    /// first `KVM_RUN` (and the device workers they start inherit the
    /// policy, see [`crate::seccomp`]).
    pub fn run(
        &mut self,
        timeout: Option<Duration>,
        profile_hz: u32,
        seccomp: bool,
    ) -> Result<Outcome, Error> {
        let control = self.shared.control.clone();
        let mut threads = Vec::new();
        let mut flags = Vec::new();
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let shared = self.shared.clone();
            let flag = Arc::new(SampleFlag::default());
            flags.push(flag.clone());
            let kind = seccomp.then_some(crate::seccomp::ThreadKind::Vcpu);
            let t = crate::seccomp::spawn(format!("vcpu {id}"), kind, move || {
                vcpu::run_loop(vcpu, id as u8, shared, flag)
            })?;
            threads.push(t);
        }
        {
            use std::os::unix::thread::JoinHandleExt;
            self.shared
                .pause
                .set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        }
        // Device workers started while the VM was built (a restore) wait
        // for the vCPUs.
        self.parts.gate.resume();
        let outcome = if profile_hz > 0 {
            let period = Duration::from_secs_f64(1.0 / f64::from(profile_hz));
            let deadline = timeout.map(|t| std::time::Instant::now() + t);
            loop {
                if let Some(o) = control.wait(Some(period)) {
                    break Some(o);
                }
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    break None;
                }
                for (t, f) in threads.iter().zip(&flags) {
                    f.0.store(true, Ordering::Relaxed);
                    let _ = t.kill(vcpu::kick_signal());
                }
            }
        } else {
            control.wait(timeout)
        };
        let outcome = outcome.unwrap_or_else(|| {
            control.request_stop(ExitStatus::TimedOut);
            control
                .wait(None)
                .unwrap_or(Outcome::Status(ExitStatus::TimedOut))
        });
        // No snapshot kicks these threads once they may be joined.
        self.shared.pause.clear_threads();
        self.shared.pause.release();
        // Kick until every vCPU thread has left KVM_RUN and seen the flag; a
        // kick that lands just before KVM_RUN is retried.
        while threads.iter().any(|t| !t.is_finished()) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(vcpu::kick_signal());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(outcome)
    }

    /// Instructions the VMM completed for KVM's emulator, by kind.
    pub fn emulated(&self) -> HashMap<&'static str, u64> {
        self.shared
            .emulated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Guest RIP samples taken while profiling.
    pub fn samples(&self) -> Vec<crate::profile::Sample> {
        self.shared
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
