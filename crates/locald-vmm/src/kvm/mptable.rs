//! Intel MultiProcessor Specification 1.4 tables, so a guest without ACPI
//! finds every vCPU, the IOAPIC and the ISA interrupt routing. Built as
//! bytes by a pure function and copied to [`MPTABLE`] on the setup thread.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC, LAPIC, MPTABLE};

/// IOAPIC input pins described (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// The floating pointer followed by the configuration table, for `cpus`
/// vCPUs with APIC ids `0..cpus`, as placed at `base`.
pub fn build(cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(0); // processor
        entries.push(id);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]); // LINT0
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]); // LINT1
    count += 2;

    const FLOAT_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = base + FLOAT_LEN as u64;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"LOCALD  ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut float = Vec::with_capacity(FLOAT_LEN);
    float.extend_from_slice(b"_MP_");
    float.extend_from_slice(&(table_addr as u32).to_le_bytes());
    float.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4
    float[10] = checksum(&float);

    float.extend_from_slice(&table);
    float
}

/// Writes the tables for `cpus` vCPUs at [`MPTABLE`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), vm_memory::GuestMemoryError> {
    let bytes = build(cpus, MPTABLE);
    debug_assert!(bytes.len() <= 0x400, "MP table overflows the EBDA KiB");
    mem.write_slice(&bytes, GuestAddress(MPTABLE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_parse_back() {
        for cpus in [1u8, 2, 8, 16] {
            let b = build(cpus, MPTABLE);
            assert!(b.len() <= 0x400);
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
            let table_addr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
            let t = &b[(table_addr - MPTABLE) as usize..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0, "table checksum");
            let count = u16::from_le_bytes([t[34], t[35]]);
            // Walk the entries: processors are 20 bytes, the rest 8.
            let mut off = 44;
            let mut procs = Vec::new();
            let mut n = 0;
            while off < len {
                match t[off] {
                    0 => {
                        procs.push((t[off + 1], t[off + 3]));
                        off += 20
                    }
                    1..=4 => off += 8,
                    x => panic!("bad entry type {x}"),
                }
                n += 1;
            }
            assert_eq!(n, count);
            assert_eq!(procs.len(), cpus as usize);
            assert_eq!(procs[0], (0, CPU_ENABLED | CPU_BSP));
            assert!(procs[1..].iter().all(|p| p.1 == CPU_ENABLED));
        }
    }
}
