//! Host detection: is `/dev/kvm` backed by hardware virtualization, or by a
//! software KVM (PVM) that runs unmodified guest kernels through KVM's
//! instruction emulator? Read once on the setup thread.
//!
//! Signal: the `kvm_pvm` module is loaded (`/sys/module/kvm_pvm`), or the
//! host CPU advertises neither `vmx` nor `svm` in `/proc/cpuinfo` while KVM
//! works. On hardware KVM the CPU has `vmx`/`svm` and `kvm_intel`/`kvm_amd`
//! is loaded instead, so the answer is false there.

use std::path::Path;

/// Why the host was judged a software KVM, or `None` for hardware KVM.
pub fn software_kvm_reason() -> Option<&'static str> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("kvm_pvm module loaded");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    decide(&cpuinfo)
}

fn decide(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    if has("vmx") || has("svm") {
        None
    } else {
        Some("host CPU has no vmx/svm")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_flags_mean_hardware_kvm() {
        assert_eq!(decide("flags\t: fpu vme de pse vmx sse2\n"), None);
        assert_eq!(decide("flags\t: fpu svm\n"), None);
        assert!(decide("flags\t: fpu vme de pse sse2 hypervisor\n").is_some());
        assert_eq!(decide("processor : 0\n"), None);
    }
}
