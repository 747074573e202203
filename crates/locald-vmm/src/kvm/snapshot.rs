//! The KVM machine state of a snapshot: what is read from and written to
//! KVM for each vCPU and for the VM, the host fingerprint a restore must
//! match, and guest memory in and out of the snapshot's memory file.
//!
//! Threads: a vCPU's state is read on its own thread while it is parked
//! ([`save_vcpu`], see `vcpu::run_loop`) and written on the thread that
//! builds the restored VM before any vCPU runs ([`restore_vcpu`]); the
//! VM-wide state and memory are handled on the snapshotting thread.
//!
//! What is saved, per vCPU: general registers, special registers, the
//! XSAVE area (which holds the x87/SSE state: `KVM_GET_FPU` adds nothing),
//! XCRs, debug registers, the local APIC, pending events, the MP state
//! and every MSR in `KVM_GET_MSR_INDEX_LIST` that KVM lets us read. Per
//! VM: both PICs, the IOAPIC, the PIT and kvmclock.

use std::fs::File;
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::persist::TransportSnapshot;
use crate::snapshot::SnapshotError;

/// The saved state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// `(index, value)` of every MSR saved.
    pub msrs: Vec<(u32, u64)>,
}

/// The saved state of the VM-wide devices KVM emulates.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// What a restore's host must share with the snapshot's host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFingerprint {
    /// KVM's supported CPUID: `[function, index, eax, ebx, ecx, edx]`.
    pub cpuid: Vec<[u32; 6]>,
    /// The TSC rate in kHz (no TSC scaling here: it must match).
    pub tsc_khz: u32,
    /// The KVM capabilities a snapshot relies on, with their values.
    pub caps: Vec<(String, i32)>,
}

/// One guest RAM region and where it lives in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// The shape of the machine: what the restored VM is built with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub ram: Vec<RamRegion>,
    /// The software-KVM compatibility path was on (CPUID masked).
    pub compat: bool,
    /// The virtio devices in bus order, by name.
    pub devices: Vec<String>,
}

/// The whole saved machine: the body of the state file.
#[derive(Serialize, Deserialize)]
pub struct SavedMachine {
    pub arch: String,
    pub host: HostFingerprint,
    pub shape: MachineShape,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub virtio: Vec<TransportSnapshot>,
}

type R<T> = Result<T, SnapshotError>;

/// Most vCPUs and devices a state file may describe.
const MAX_ITEMS: usize = 256;

impl SavedMachine {
    /// Checks what a state file says about itself before anything is
    /// built from it: counts that agree, RAM regions that are page-aligned,
    /// ordered and small enough, queues that are valid virtio queues, a
    /// UART FIFO within bounds. The state file is hostile input until then.
    pub fn validate(&self) -> R<()> {
        let bad = |what: String| Err(SnapshotError::Mismatch(what));
        let s = &self.shape;
        if s.vcpus == 0 || self.vcpus.len() != usize::from(s.vcpus) {
            return bad(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                s.vcpus
            ));
        }
        if s.devices.len() > MAX_ITEMS || self.virtio.len() != s.devices.len() {
            return bad(format!(
                "{} device states for {} devices",
                self.virtio.len(),
                s.devices.len()
            ));
        }
        if s.ram.is_empty() || s.ram.len() > 8 {
            return bad(format!("{} RAM regions", s.ram.len()));
        }
        let mut end_gpa = 0u64;
        let mut end_file = 0u64;
        let mut total = 0u64;
        for r in &s.ram {
            let aligned = |v: u64| v.is_multiple_of(4096);
            if !aligned(r.guest_addr) || !aligned(r.size) || !aligned(r.file_offset) || r.size == 0
            {
                return bad(format!("RAM region {r:x?} is not page-aligned"));
            }
            if r.guest_addr < end_gpa || r.file_offset < end_file {
                return bad(format!("RAM region {r:x?} overlaps the one before"));
            }
            end_gpa = r
                .guest_addr
                .checked_add(r.size)
                .ok_or_else(|| SnapshotError::Mismatch(format!("RAM region {r:x?} wraps")))?;
            end_file = r
                .file_offset
                .checked_add(r.size)
                .ok_or_else(|| SnapshotError::Mismatch(format!("RAM region {r:x?} wraps")))?;
            total = total.saturating_add(r.size);
        }
        if total != s.memory_mib.saturating_mul(1 << 20) {
            return bad(format!(
                "RAM regions of {total} bytes for {} MiB",
                s.memory_mib
            ));
        }
        for t in &self.virtio {
            if t.queues.len() > 16 {
                return bad(format!("{}: {} queues", t.name, t.queues.len()));
            }
            for (i, q) in t.queues.iter().enumerate() {
                if let Err(why) = q.to_queue(q.max_size) {
                    return bad(format!("{} queue {i}: {why}", t.name));
                }
            }
        }
        if self.serial.in_buffer.len() > 64 || self.serial.pending.len() > 1 << 16 {
            return bad("the UART's buffers are over their bounds".into());
        }
        Ok(())
    }
}

/// Largest XSAVE area we save (`kvm_xsave`, 4 KiB). Hosts whose guests
/// may use more (AMX) are refused rather than saved in part.
pub const XSAVE_LIMIT: i32 = 4096;

/// The capabilities a snapshot needs, checked before anything is paused.
pub fn check_host(kvm: &Kvm) -> R<()> {
    for (cap, name) in [
        (Cap::Xsave, "KVM_CAP_XSAVE"),
        (Cap::Xcrs, "KVM_CAP_XCRS"),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(SnapshotError::Unsupported(format!(
                "this host's KVM lacks {name}"
            )));
        }
    }
    let xsave2 = kvm.check_extension_int(Cap::Xsave2);
    if xsave2 > XSAVE_LIMIT {
        return Err(SnapshotError::Unsupported(format!(
            "the XSAVE area is {xsave2} bytes here (AMX); only {XSAVE_LIMIT} are saved"
        )));
    }
    Ok(())
}

/// This host's fingerprint from KVM's supported CPUID; `vcpu` gives the
/// TSC rate.
pub fn fingerprint(
    supported: &[kvm_bindings::kvm_cpuid_entry2],
    kvm: &Kvm,
    vcpu: &VcpuFd,
) -> R<HostFingerprint> {
    let mut leaves: Vec<[u32; 6]> = supported
        .iter()
        .filter_map(|e| feature_leaf([e.function, e.index, e.eax, e.ebx, e.ecx, e.edx]))
        .collect();
    leaves.sort_unstable();
    let tsc_khz = vcpu
        .get_tsc_khz()
        .map_err(SnapshotError::kvm("KVM_GET_TSC_KHZ"))?;
    let caps = [
        ("XSAVE2", Cap::Xsave2),
        ("TSC_CONTROL", Cap::TscControl),
        ("ADJUST_CLOCK", Cap::AdjustClock),
    ]
    .iter()
    .map(|(n, c)| (n.to_string(), kvm.check_extension_int(*c)))
    .collect();
    Ok(HostFingerprint {
        cpuid: leaves,
        tsc_khz,
        caps,
    })
}

/// The CPUID leaves that make the CPU feature set: vendor and family
/// (0, 1), feature flags (1, 7, 0x80000001), XSAVE layout (0xd) and
/// address sizes (0x80000008). Other leaves and fields differ between the
/// host CPUs the ioctl happens to run on (leaf 1's EBX holds the APIC id)
/// or describe caches and topology, which a restore does not depend on.
fn feature_leaf(mut l: [u32; 6]) -> Option<[u32; 6]> {
    match l[0] {
        0 | 7 | 0xd | 0x8000_0000 | 0x8000_0001 | 0x8000_0008 => Some(l),
        1 => {
            l[3] = 0;
            Some(l)
        }
        _ => None,
    }
}

/// Why `now` cannot restore a snapshot taken on `saved`, if it cannot.
pub fn host_difference(saved: &HostFingerprint, now: &HostFingerprint) -> Option<String> {
    if saved.tsc_khz != now.tsc_khz {
        return Some(format!(
            "its TSC ran at {} kHz, this host's at {} kHz",
            saved.tsc_khz, now.tsc_khz
        ));
    }
    for (name, v) in &saved.caps {
        let here = now.caps.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        if here != Some(*v) {
            return Some(format!(
                "KVM capability {name} was {v} there, {} here",
                here.map_or("absent".into(), |h| h.to_string())
            ));
        }
    }
    if saved.cpuid != now.cpuid {
        let differs = saved
            .cpuid
            .iter()
            .zip(&now.cpuid)
            .find(|(a, b)| a != b)
            .map(|(a, _)| a)
            .or_else(|| saved.cpuid.get(now.cpuid.len()))
            .or_else(|| now.cpuid.get(saved.cpuid.len()));
        return Some(match differs {
            Some(l) => format!(
                "its CPU features differ (CPUID leaf {:#x} subleaf {})",
                l[0], l[1]
            ),
            None => "its CPU features differ".into(),
        });
    }
    None
}

/// The MSR indices KVM lists for saving.
pub fn msr_indices(kvm: &Kvm) -> R<Vec<u32>> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(SnapshotError::kvm("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Reads the MSRs in `indices`; those KVM refuses to read are left out
/// (KVM stops at the first it cannot read: that one is dropped and the
/// rest read again).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> R<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| SnapshotError::Unsupported(format!("MSR list: {e:?}")))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(SnapshotError::kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Reads one parked vCPU's state.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> R<VcpuState> {
    let k = SnapshotError::kvm;
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(k("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(k("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(k("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
        debugregs: vcpu.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, msr_indices)?,
        events: vcpu.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Writes a saved state into a new vCPU that already has its CPUID. The
/// order follows KVM's dependencies: the MP state and registers, then the
/// extended state, the APIC, the MSRs (the TSC among them), the events.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> R<()> {
    let k = SnapshotError::kvm;
    vcpu.set_mp_state(s.mp_state)
        .map_err(k("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(k("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(k("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a complete `kvm_xsave` (4 KiB) and this host's
    // XSAVE area is no larger (checked by `check_host` before restoring).
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(k("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(k("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(k("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(k("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| SnapshotError::Mismatch(format!("{} MSRs: {e:?}", entries.len())))?;
    let n = vcpu.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(SnapshotError::ForeignHost(format!(
            "KVM refused MSR {:#x}",
            entries[n].index
        )));
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(k("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> R<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(SnapshotError::kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Reads the PICs, IOAPIC, PIT and clock (vCPUs parked).
pub fn save_vm(vm: &VmFd) -> R<VmState> {
    let mut clock = vm
        .get_clock()
        .map_err(SnapshotError::kvm("KVM_GET_CLOCK"))?;
    // Only the value is restored (flags are KVM's reply).
    clock.flags = 0;
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(SnapshotError::kvm("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Writes the saved PICs, IOAPIC, PIT and clock into a new VM (after
/// `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2`, before its vCPUs run).
pub fn restore_vm(vm: &VmFd, s: &VmState) -> R<()> {
    let k = SnapshotError::kvm;
    for (chip, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(SnapshotError::Mismatch(format!(
                "interrupt controller {id} saved as {}",
                chip.chip_id
            )));
        }
        vm.set_irqchip(chip).map_err(k("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(k("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(k("KVM_SET_CLOCK"))?;
    Ok(())
}

/// Size of the blocks checked for zeros when memory is written.
const ZERO_BLOCK: usize = 64 << 10;

/// Writes guest RAM into `file` (regions back to back from offset 0;
/// all-zero blocks stay holes) and returns the layout and the bytes
/// written. Every vCPU and device worker must be parked.
pub fn write_memory(mem: &GuestMemoryMmap, file: &File) -> std::io::Result<(Vec<RamRegion>, u64)> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem`, which outlives this call; nothing writes it meanwhile
        // (vCPUs and device workers are parked).
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        for (i, block) in bytes.chunks(ZERO_BLOCK).enumerate() {
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            file.write_all_at(block, offset + (i * ZERO_BLOCK) as u64)?;
            written += block.len() as u64;
        }
        regions.push(RamRegion {
            guest_addr: region.start_addr().0,
            size: len as u64,
            file_offset: offset,
        });
        offset += len as u64;
    }
    file.set_len(offset)?;
    file.sync_all()?;
    Ok((regions, written))
}

/// Guest memory mapped `MAP_PRIVATE` from the snapshot's memory file:
/// pages are read when first touched and copied when first written, so
/// the file never changes and the cost does not grow with memory size.
pub fn map_memory(file: &File, regions: &[RamRegion], expect: &[(u64, u64)]) -> R<GuestMemoryMmap> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    if layout != expect {
        return Err(SnapshotError::Mismatch(format!(
            "guest RAM layout {layout:x?}, expected {expect:x?}"
        )));
    }
    let file_len = file
        .metadata()
        .map_err(|e| SnapshotError::Memory(e.to_string()))?
        .len();
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        if r.file_offset
            .checked_add(r.size)
            .is_none_or(|end| end > file_len)
        {
            return Err(SnapshotError::Memory(format!(
                "the memory file has {file_len} bytes, region at {:#x} needs {} from offset {}",
                r.guest_addr, r.size, r.file_offset
            )));
        }
        let fd = file
            .try_clone()
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        let size = usize::try_from(r.size).map_err(|e| SnapshotError::Memory(e.to_string()))?;
        let mapping = MmapRegionBuilder::<()>::new(size)
            .with_file_offset(FileOffset::new(fd, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| SnapshotError::Memory("region wraps the address space".into()))?;
        out.push(region);
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| SnapshotError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> HostFingerprint {
        HostFingerprint {
            cpuid: vec![[0, 0, 0xd, 1, 2, 3], [7, 0, 0, 0x1234, 0, 0]],
            tsc_khz: 2_400_000,
            caps: vec![("XSAVE2".into(), 4096)],
        }
    }

    #[test]
    fn another_hosts_fingerprint_is_named() {
        assert_eq!(host_difference(&fp(), &fp()), None);
        let mut t = fp();
        t.tsc_khz += 1;
        assert!(host_difference(&fp(), &t).unwrap().contains("TSC"));
        let mut c = fp();
        c.cpuid[1][3] = 0;
        let why = host_difference(&fp(), &c).unwrap();
        assert!(why.contains("leaf 0x7"), "{why}");
        let mut k = fp();
        k.caps[0].1 = 8192;
        assert!(host_difference(&fp(), &k).unwrap().contains("XSAVE2"));
        let mut shorter = fp();
        shorter.cpuid.pop();
        assert!(host_difference(&fp(), &shorter).is_some());
    }

    #[test]
    fn memory_is_written_sparse_and_mapped_back_private() {
        use vm_memory::Bytes;
        let ranges = [
            (GuestAddress(0), 0x40000usize),
            (GuestAddress(0x100000), 0x20000),
        ];
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x1234u16, GuestAddress(0x110000)).unwrap();
        let path = std::env::temp_dir().join(format!("locald-mem-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let (regions, written) = write_memory(&mem, &f).unwrap();
        // Two non-zero 64 KiB blocks out of 384 KiB.
        assert_eq!(written, 2 * ZERO_BLOCK as u64);
        assert_eq!(f.metadata().unwrap().len(), 0x60000);
        let expect = [(0, 0x40000), (0x100000, 0x20000)];
        let back = map_memory(&f, &regions, &expect).unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            back.read_obj::<u16>(GuestAddress(0x110000)).unwrap(),
            0x1234
        );
        // Copy on write: the file does not change.
        back.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        let again = map_memory(&f, &regions, &expect).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        // Another layout, or a file too short for it, is refused.
        assert!(map_memory(&f, &regions, &[(0, 0x40000)]).is_err());
        f.set_len(0x50000).unwrap();
        assert!(map_memory(&f, &regions, &expect).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
