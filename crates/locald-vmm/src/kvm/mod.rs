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
mod teardown;
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
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, ExitStatus, Outcome, VmControl};
use crate::error::{BootError, Error};
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
) -> Result<String, Error> {
    let mut cmdline = String::new();
    for (i, spec) in devices.into_iter().enumerate() {
        let base = layout::VIRTIO_MMIO_BASE + i as u64 * mmio::MMIO_WINDOW;
        let gsi = layout::VIRTIO_GSI_BASE + i as u32;
        if gsi > layout::IOAPIC_MAX_GSI {
            return Err(Error::Device(format!(
                "too many virtio devices: no interrupt line left for {}",
                spec.name
            )));
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&irq, gsi)
            .map_err(Error::kvm("KVM_IRQFD (virtio)"))?;
        let transport = MmioTransport::new(spec.device, spec.name, mem.clone(), irq)?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + mmio::reg::QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(Error::kvm("KVM_IOEVENTFD (virtio queue notify)"))?;
        }
        mmio_bus
            .insert(Arc::new(Mutex::new(transport)), base, mmio::MMIO_WINDOW)
            .map_err(|e| Error::Device(e.to_string()))?;
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    Ok(cmdline)
}

/// A created, not yet running, KVM virtual machine.
pub struct KvmVm {
    _kvm: Kvm,
    _vm: VmFd,
    vcpus: Vec<VcpuFd>,
    shared: Arc<VcpuShared>,
    serial: Arc<Mutex<SerialDevice>>,
}

// Teardown hook (issue 17): the host's destruction of the VM goes to a
// helper process (see `teardown`); the fields then drop as before.
impl Drop for KvmVm {
    fn drop(&mut self) {
        // vCPU descriptors hold the VM too: close them first (they are
        // already gone once the VM has run).
        self.vcpus.clear();
        teardown::hand_off(&self._vm, &self.shared.mem);
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
    /// Opens KVM, builds the VM and loads the guest.
    pub fn new(
        spec: &BootSpec,
        virtio: Vec<VirtioSpec>,
        control: Arc<VmControl>,
        sink: ConsoleSink,
    ) -> Result<Self, Error> {
        let kvm =
            Kvm::new().map_err(|e| Error::KvmOpen(std::io::Error::from_raw_os_error(e.errno())))?;
        let max = kvm.get_max_vcpus();
        if usize::from(spec.vcpus) > max {
            return Err(Error::TooManyVcpus(spec.vcpus, max));
        }
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        let mem = guest_memory(spec.memory_mib)?;
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

        // Devices on the port bus.
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&irq, COM1_GSI)
            .map_err(Error::kvm("KVM_IRQFD (COM1)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            ConsoleWriter::new(sink, control.clone()),
        )));
        let mut pio = Bus::new();
        let dev_err = |e: crate::devices::BusError| Error::Device(e.to_string());
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
        let mut mmio_bus = Bus::new();
        let mut cmdline = spec.cmdline.clone() + &attach_virtio(&vm, &mem, &mut mmio_bus, virtio)?;
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

        // Guest image and boot structures.
        let mem_bytes = spec.memory_mib << 20;
        let kernel = boot::load_kernel(&mem, &spec.kernel)?;
        let initrd = match &spec.initrd {
            Some((name, data)) => Some(boot::load_initrd(&mem, mem_bytes, &kernel, name, data)?),
            None => None,
        };
        boot::write_boot_info(&mem, mem_bytes, &kernel, &cmdline, initrd)?;
        regs::write_boot_tables(&mem, kernel.entry.mode)
            .map_err(|e| BootError::Setup(format!("page tables: {e}")))?;
        mptable::write(&mem, spec.vcpus).map_err(|e| BootError::Setup(format!("MP table: {e}")))?;

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
                    kernel.entry,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        vcpu::install_kick_handler()?;
        Ok(KvmVm {
            _kvm: kvm,
            _vm: vm,
            vcpus,
            shared: Arc::new(VcpuShared {
                pio,
                mmio: mmio_bus,
                control,
                mem: fetch_mem,
                samples: Mutex::new(Vec::new()),
                emulated: Mutex::new(HashMap::new()),
            }),
            serial,
        })
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
