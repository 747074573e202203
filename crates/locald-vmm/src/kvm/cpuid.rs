//! CPUID for each vCPU: KVM's supported set, with the APIC id and topology
//! filled in per vCPU, the hypervisor bit set, the PMU hidden, and — on a
//! software-KVM host — the features whose instructions KVM's emulator
//! cannot run removed. Pure functions over the entry list; the vCPU setup
//! on the setup thread applies the result.

use kvm_bindings::kvm_cpuid_entry2;

/// Register of a CPUID output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX
    Eax,
    /// EBX
    Ebx,
    /// ECX
    Ecx,
    /// EDX
    Edx,
}

/// A feature hidden from the guest on software-KVM hosts, and why.
#[derive(Clone, Copy, Debug)]
pub struct Masked {
    /// CPUID leaf.
    pub leaf: u32,
    /// Output register.
    pub reg: Reg,
    /// Bit number.
    pub bit: u8,
    /// Feature name as in /proc/cpuinfo.
    pub name: &'static str,
    /// Why the guest must not see it there.
    pub reason: &'static str,
}

/// Features hidden on software-KVM hosts (see docs/software-kvm.md).
pub const COMPAT_MASKED: &[Masked] = &[
    Masked {
        leaf: 1,
        reg: Reg::Ecx,
        bit: 13,
        name: "cx16",
        reason: "lock cmpxchg16b (SLUB) is not emulated",
    },
    Masked {
        leaf: 1,
        reg: Reg::Ecx,
        bit: 23,
        name: "popcnt",
        reason: "popcnt is not emulated",
    },
    Masked {
        leaf: 1,
        reg: Reg::Ecx,
        bit: 26,
        name: "xsave",
        reason: "xsave/xrstor (FPU init) are not emulated",
    },
    Masked {
        leaf: 1,
        reg: Reg::Ecx,
        bit: 27,
        name: "osxsave",
        reason: "follows xsave",
    },
    Masked {
        leaf: 1,
        reg: Reg::Ecx,
        bit: 28,
        name: "avx",
        reason: "needs xsave",
    },
    Masked {
        leaf: 1,
        reg: Reg::Ecx,
        bit: 29,
        name: "f16c",
        reason: "VEX-encoded, needs xsave",
    },
    Masked {
        leaf: 1,
        reg: Reg::Ecx,
        bit: 12,
        name: "fma",
        reason: "VEX-encoded, needs xsave",
    },
    Masked {
        leaf: 7,
        reg: Reg::Ebx,
        bit: 0,
        name: "fsgsbase",
        reason: "rd/wrfsbase are not emulated",
    },
    Masked {
        leaf: 7,
        reg: Reg::Ebx,
        bit: 5,
        name: "avx2",
        reason: "needs xsave",
    },
    Masked {
        leaf: 7,
        reg: Reg::Ebx,
        bit: 7,
        name: "smep",
        reason: "kept off with the command line too",
    },
    Masked {
        leaf: 7,
        reg: Reg::Ebx,
        bit: 9,
        name: "erms",
        reason: "rep movsb fast path; also cleared on the command line",
    },
    Masked {
        leaf: 7,
        reg: Reg::Ebx,
        bit: 10,
        name: "invpcid",
        reason: "invpcid is not emulated",
    },
    Masked {
        leaf: 7,
        reg: Reg::Ebx,
        bit: 16,
        name: "avx512f",
        reason: "needs xsave",
    },
    Masked {
        leaf: 7,
        reg: Reg::Ebx,
        bit: 18,
        name: "rdseed",
        reason: "rdseed is not emulated",
    },
    Masked {
        leaf: 7,
        reg: Reg::Ebx,
        bit: 20,
        name: "smap",
        reason: "clac/stac; also off on the command line",
    },
];

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Bits needed to number `n` things (ceil(log2 n)).
fn id_bits(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (u32::from(n) - 1).leading_zeros()
    }
}

/// The compatibility mask: [`COMPAT_MASKED`] minus the features named in
/// `keep` (comma-separated; from `LOCALD_VMM_COMPAT_KEEP`, a debug aid to
/// re-verify each entry by booting without it).
pub fn compat_mask(keep: &str) -> Vec<Masked> {
    let keep: Vec<&str> = keep.split(',').map(str::trim).collect();
    COMPAT_MASKED
        .iter()
        .filter(|m| !keep.contains(&m.name))
        .copied()
        .collect()
}

/// Adjusts `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu` of
/// `cpus`, and hides the features in `masked` (empty unless the
/// software-KVM compatibility path is on).
pub fn configure(entries: &mut [kvm_cpuid_entry2], cpu: u8, cpus: u8, masked: &[Masked]) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(cpu) << 24) | (u32::from(cpus) << 16);
                e.ebx = (e.ebx & !0xff00) | (8 << 8); // clflush line: 64 bytes
                e.ecx |= 1 << 31; // hypervisor present
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count field is valid
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // Cores per package; caches below L3 are per core.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { u32::from(cpus) - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((u32::from(cpus) - 1) << 26);
            }
            6 => {
                e.ecx &= !(1 << 3); // no energy/performance bias MSR
            }
            0xa => {
                // No virtual PMU: the guest skips perf counter setup.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // One thread per core, `cpus` cores per package.
                e.edx = u32::from(cpu);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = id_bits(cpus);
                        e.ebx = u32::from(cpus);
                        e.ecx = 1 | (2 << 8);
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            _ => {}
        }
        if !masked.is_empty() {
            let function = e.function;
            for m in masked.iter().filter(|m| m.leaf == function) {
                if m.leaf != 7 || e.index == 0 {
                    *reg_mut(e, m.reg) &= !(1u32 << m.bit);
                }
            }
            if e.function == 0xd {
                // XSAVE state enumeration goes with XSAVE.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, v: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: v,
            ebx: v,
            ecx: v,
            edx: v,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let mut e = vec![
            entry(1, 0, 0),
            entry(0xb, 0, 0),
            entry(0xb, 1, 0),
            entry(4, 0, 0x63),
        ];
        configure(&mut e, 3, 4, &[]);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(e[0].edx & (1 << 28), 0, "HTT");
        assert_eq!(e[1].edx, 3);
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
        assert_eq!(e[3].eax >> 26, 3);
        assert_eq!((e[3].eax >> 14) & 0xfff, 3, "L3 shared by all cores");
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = vec![entry(1, 0, u32::MAX), entry(0xb, 1, 0)];
        configure(&mut e, 0, 1, &[]);
        assert_eq!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[0].ebx >> 24, 0);
        assert_eq!(e[1].eax, 0);
    }

    #[test]
    fn compat_hides_exactly_the_listed_features() {
        let mut on = vec![
            entry(1, 0, u32::MAX),
            entry(7, 0, u32::MAX),
            entry(7, 1, u32::MAX),
            entry(0xd, 0, 7),
        ];
        let mut off = on.clone();
        configure(&mut on, 0, 1, COMPAT_MASKED);
        configure(&mut off, 0, 1, &[]);
        for m in COMPAT_MASKED {
            let i = if m.leaf == 1 { 0 } else { 1 };
            let get = |e: &mut kvm_cpuid_entry2| *reg_mut(e, m.reg) & (1 << m.bit);
            assert_eq!(get(&mut on[i]), 0, "{} hidden", m.name);
            assert_ne!(get(&mut off[i]), 0, "{} kept without compat", m.name);
        }
        assert_eq!(on[2].ebx, u32::MAX, "leaf 7 subleaf 1 untouched");
        assert_eq!(on[3].eax, 0, "xsave leaf cleared");
        assert_eq!(off[3].eax, 7);
    }

    #[test]
    fn keep_list_unmasks_by_name() {
        let m = compat_mask("popcnt, cx16");
        assert_eq!(m.len(), COMPAT_MASKED.len() - 2);
        assert!(m.iter().all(|x| x.name != "popcnt" && x.name != "cx16"));
        assert_eq!(compat_mask("").len(), COMPAT_MASKED.len());
    }
}
