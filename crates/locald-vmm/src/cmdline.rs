//! The KVM backend's part of the guest kernel command line: the base
//! switches for our x86 machine model (8250 console, i8042 reset), the
//! default guest's extras, and the software-KVM compatibility switches.
//! Pure functions, compiled on every OS (the CLI prints them); used on the
//! caller's thread while a VM is built.

/// Kernel command line every guest gets: serial console, reboot through the
/// i8042 reset line, reboot at once on panic, and no probing of hardware we
/// do not emulate.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Extra command line for the default guest: quiet boot, no delay-loop
/// calibration work beyond what kvm-clock gives.
pub const DEFAULT_GUEST_CMDLINE: &str = "quiet";

/// CPU features the guest kernel is told to ignore (`clearcpuid=`) on a
/// software KVM: instructions the emulator lacks (`xrstor`, `cmpxchg16b`,
/// `popcnt`, `stac`/`clac`, `invpcid`) or runs byte by byte (`rep movsb`).
/// Needed on the command line because such a host ignores CPUID leaf-7
/// values the VMM sets. See docs/software-kvm.md.
pub const COMPAT_CLEARCPUID: &[&str] = &["erms", "fsrm", "smap", "smep", "popcnt", "xsave", "cx16"];

/// The rest of the software-KVM command line: upstream switches, for any
/// kernel (see docs/software-kvm.md).
pub const COMPAT_CMDLINE: &str =
    "tsc=reliable no_timer_check noreplace-smp random.trust_cpu=on rodata=off percpu_alloc=page";

/// Software-KVM switches that exist only in the default kernel (boot
/// options added by our patches in guest/kernel/patches). Not given to
/// other kernels, which would pass unknown `key=value` words to their init
/// as environment variables.
pub const COMPAT_DEFAULT_KERNEL_CMDLINE: &str = "slab_sysfs=off fault_around_bytes=4096 lean_sysfs=on alt_nop_opt=off init_poison=off initramfs_early=on boot_page_checks=off";

/// The software-KVM command line, leaving visible the features named in
/// `keep` (comma-separated; `LOCALD_VMM_COMPAT_KEEP`, a debug aid that
/// also unmasks them in CPUID, to re-verify each entry by booting).
pub fn compat_cmdline(keep: &str) -> String {
    let keep: Vec<&str> = keep.split(',').map(str::trim).collect();
    let clear: Vec<&str> = COMPAT_CLEARCPUID
        .iter()
        .copied()
        .filter(|f| !keep.contains(f))
        .collect();
    if clear.is_empty() {
        COMPAT_CMDLINE.to_string()
    } else {
        format!("clearcpuid={} {COMPAT_CMDLINE}", clear.join(","))
    }
}

/// The VMM's part of the kernel command line (before device entries and
/// the user's `--cmdline`): [`BASE_CMDLINE`], [`DEFAULT_GUEST_CMDLINE`] for
/// the default kernel, and on a software KVM the compatibility switches
/// (`compat_keep` as for [`compat_cmdline`]; plus
/// [`COMPAT_DEFAULT_KERNEL_CMDLINE`] for the default kernel).
pub fn guest_cmdline(default_kernel: bool, compat_keep: Option<&str>) -> String {
    let mut cmdline = BASE_CMDLINE.to_string();
    if default_kernel {
        cmdline.push(' ');
        cmdline.push_str(DEFAULT_GUEST_CMDLINE);
    }
    if let Some(keep) = compat_keep {
        cmdline.push(' ');
        cmdline.push_str(&compat_cmdline(keep));
        if default_kernel {
            cmdline.push(' ');
            cmdline.push_str(COMPAT_DEFAULT_KERNEL_CMDLINE);
        }
    }
    cmdline
}

#[cfg(test)]
mod tests;
