//! x86-64 guest physical memory layout: where RAM is, where the boot
//! structures go, and the e820 map that tells the guest. Pure functions,
//! used on the setup thread.

/// GDT for the boot vCPU.
pub const BOOT_GDT: u64 = 0x500;
/// Empty IDT for the boot vCPU.
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO: u64 = 0x6000;
/// PVH memory map (right after `hvm_start_info`).
pub const PVH_MEMMAP: u64 = 0x6040;
/// PVH module list (the initrd).
pub const PVH_MODLIST: u64 = 0x6800;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-map page tables: PML4, then PDPT, then 4 page directories.
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// First of four page directories (2 MiB pages, 4 GiB mapped).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Longest command line we pass (x86 Linux's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// MP floating pointer and table: the last KiB of base memory (639 KiB),
/// which Linux scans before the BIOS ROM area.
pub const MPTABLE: u64 = 0x9fc00;
/// End of conventional ("base") memory.
pub const BASE_MEM_END: u64 = 0xa0000;
/// Start of high memory, where kernels are loaded.
pub const HIMEM: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (devices, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; one window of
/// [`crate::devices::virtio::mmio::MMIO_WINDOW`] bytes per device follows.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSI (IOAPIC pin) of the first virtio device; COM1 has 4, pins up to 23
/// exist.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// Highest GSI the in-kernel IOAPIC has (24 pins).
pub const IOAPIC_MAX_GSI: u32 = 23;
/// IOAPIC base.
pub const IOAPIC: u64 = 0xfec0_0000;
/// Local APIC base.
pub const LAPIC: u64 = 0xfee0_0000;
/// KVM's TSS (three pages just below the BIOS area in the hole).
pub const KVM_TSS: u64 = 0xfffb_d000;
/// Linux's default ceiling for the initrd when the kernel does not say.
pub const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;

/// e820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// Guest RAM as `(start, size)` ranges for `mem_bytes` of memory, skipping
/// the MMIO hole below 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// End of the RAM range that starts at 0 (everything the 32-bit world sees).
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The e820 map for `mem_bytes` of RAM.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE,
            size: BASE_MEM_END - MPTABLE,
            kind: E820_RESERVED,
        },
    ];
    let low_end = low_ram_end(mem_bytes);
    if low_end > HIMEM {
        map.push(E820Entry {
            addr: HIMEM,
            size: low_end - HIMEM,
            kind: E820_RAM,
        });
    }
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Where to put an initrd of `size` bytes: page-aligned, as high as possible
/// below `min(low RAM end, addr_max + 1)`, and not below `kernel_end`.
pub fn initrd_address(mem_bytes: u64, size: u64, kernel_end: u64, addr_max: u64) -> Option<u64> {
    let ceiling = low_ram_end(mem_bytes).min(addr_max.saturating_add(1));
    let start = ceiling.checked_sub(size)? & !0xfff;
    if start >= kernel_end.max(HIMEM) {
        Some(start)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        let map = e820_map(64 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM,
                size: (64 << 20) - HIMEM,
                kind: E820_RAM
            }
        );
        // Entries never overlap and are sorted.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let mem = 4u64 << 30;
        let r = ram_ranges(mem);
        assert_eq!(
            r,
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
        );
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), mem);
        let map = e820_map(mem);
        assert_eq!(map.last().unwrap().addr, MMIO_GAP_END);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, mem - (HIMEM - MPTABLE));
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let mem = 64u64 << 20;
        let a = initrd_address(mem, 1000, 0x20_0000, INITRD_ADDR_MAX_DEFAULT).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 1000 <= mem);
        assert!(a >= mem - 8192);
        // Too big: it would overlap the kernel.
        assert_eq!(
            initrd_address(mem, mem, 0x20_0000, INITRD_ADDR_MAX_DEFAULT),
            None
        );
        assert_eq!(
            initrd_address(mem, 62 << 20, 4 << 20, INITRD_ADDR_MAX_DEFAULT),
            None
        );
        // Respects the kernel's ceiling.
        let a = initrd_address(2 << 30, 4096, HIMEM, 0x0fff_ffff).unwrap();
        assert_eq!(a, 0x1000_0000 - 4096);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut spans = [
            (BOOT_GDT, 0x20),
            (BOOT_IDT, 0x8),
            (PVH_INFO, 0x40),
            (PVH_MEMMAP, 0x7c0),
            (PVH_MODLIST, 0x20),
            (ZERO_PAGE, 0x1000),
            (PML4, 0x1000),
            (PDPT, 0x1000),
            (PD, 0x4000),
            (CMDLINE, CMDLINE_MAX as u64),
            (MPTABLE, 0x400),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:x?}", w);
        }
        const { assert!(BOOT_STACK < PML4 && BOOT_STACK > ZERO_PAGE + 0x1000) };
    }
}
