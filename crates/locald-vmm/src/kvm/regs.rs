//! Initial register state of the boot vCPU: GDT and segment registers,
//! identity page tables for the 64-bit entry, general registers, FPU and
//! boot MSRs, and the local APIC's LINT pins. The values are computed by
//! pure functions (unit-tested); the vCPU thread applies them.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{EntryMode, KernelEntry};
use super::layout::*;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from flags, base and limit (the classic packing).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment register equivalent of GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if present == 1 { 0 } else { 1 },
    }
}

/// The boot GDT for an entry mode: null, code, data, TSS.
pub fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x008b, 0, 0x67),    // TSS
        ],
        EntryMode::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
    }
}

/// Writes the GDT/IDT and, for the 64-bit entry, identity page tables
/// covering the first 4 GiB with 2 MiB pages.
pub fn write_boot_tables(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in boot_gdt(mode).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))?;
    if mode == EntryMode::Linux64 {
        mem.write_obj(PDPT | 0x3, GuestAddress(PML4))?;
        for i in 0..4u64 {
            mem.write_obj((PD + i * 0x1000) | 0x3, GuestAddress(PDPT + i * 8))?;
        }
        for i in 0..2048u64 {
            // present | writable | page-size (2 MiB)
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers for the boot vCPU, starting from KVM's defaults.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let gdt = boot_gdt(mode);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers for the boot vCPU.
pub fn boot_regs(entry: KernelEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        ..Default::default()
    };
    match entry.mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO,
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE;
        }
    }
    regs
}

/// FPU state: x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(IA32_SYSENTER_CS, 0),
        e(IA32_SYSENTER_ESP, 0),
        e(IA32_SYSENTER_EIP, 0),
        e(STAR, 0),
        e(CSTAR, 0),
        e(KERNEL_GS_BASE, 0),
        e(SYSCALL_MASK, 0),
        e(LSTAR, 0),
        e(IA32_TSC, 0),
        e(IA32_MISC_ENABLE, 1),          // fast strings
        e(MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC BIOS does.
pub fn set_lint(mut l: kvm_lapic_state) -> kvm_lapic_state {
    let mode = |v: u32, m: u32| (v & !0x700) | (m << 8);
    let lvt0 = lapic_reg(&l, APIC_LVT0);
    set_lapic_reg(&mut l, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&l, APIC_LVT1);
    set_lapic_reg(&mut l, APIC_LVT1, mode(lvt1, APIC_MODE_NMI));
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory;

    #[test]
    fn gdt_entries_round_trip() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let s = segment_from_gdt(e, 1);
        assert_eq!(
            (s.selector, s.type_, s.l, s.db, s.g, s.present),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let d = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((d.selector, d.type_, d.db, d.s), (16, 3, 1, 1));
        let n = segment_from_gdt(0, 0);
        assert_eq!(n.unusable, 1);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Linux64).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4, PDPT | 3);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT + 24)).unwrap();
        assert_eq!(pdpt3, (PD + 0x3000) | 3);
        let last: u64 = mem.read_obj(GuestAddress(PD + 2047 * 8)).unwrap();
        assert_eq!(last, (2047 << 21) | 0x83);
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Linux64);
        assert_eq!(s.cr3, PML4);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cs.l, 1);
        let r = boot_regs(KernelEntry {
            entry: 0x1000200,
            mode: EntryMode::Linux64,
        });
        assert_eq!((r.rip, r.rsi, r.rsp), (0x1000200, ZERO_PAGE, BOOT_STACK));
        assert!(mem.last_addr().0 > PD + 0x4000);
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode() {
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Pvh);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, 1);
        assert_eq!(
            (s.cs.db, s.cs.l, s.cs.base, s.cs.limit),
            (1, 0, 0, 0xffff_ffff)
        );
        assert_eq!(s.efer, 0);
        let r = boot_regs(KernelEntry {
            entry: 0x1000000,
            mode: EntryMode::Pvh,
        });
        assert_eq!(r.rbx, PVH_INFO);
    }

    #[test]
    fn lint_pins() {
        let l = set_lint(kvm_lapic_state::default());
        assert_eq!((lapic_reg(&l, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&l, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
