//! Fast KVM tier, QEMU as the oracle: runs the same tiny guests on QEMU
//! microvm and on locald-vmm and compares the output lines that must agree.
//!
//! Lines that legitimately differ are left out: the command line (ours
//! starts with the VMM's base command line), the memory map (QEMU's
//! firmware adds its own reserved ranges), the loader type. Needs
//! `/dev/kvm` and `qemu-system-x86_64`; skips loudly without either.

#[macro_use]
mod kvm_common;

use kvm_common::{qemu_present, run, run_qemu, Spec};
use locald_vmm::ExitStatus;

/// Skips unless both KVM and QEMU are there.
macro_rules! require_kvm_and_qemu {
    () => {
        require_kvm!();
        if !qemu_present() {
            return;
        }
    };
}

/// The lines of `out` that start with one of `prefixes`.
fn select<'a>(out: &'a str, prefixes: &[&str]) -> Vec<&'a str> {
    out.lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .collect()
}

#[test]
fn pvh_hello_matches_qemu() {
    require_kvm_and_qemu!();
    let spec = Spec {
        cmdline: Some("oracle=1".into()),
        ..Spec::new("pvh_hello")
    };
    let ours = run(&spec);
    let qemu = run_qemu(&spec);
    assert_eq!(qemu.guest_status(), Some(0), "qemu output:\n{}", qemu.out);
    assert_eq!(ours.status, ExitStatus::Exited(0), "ours:\n{}", ours.out);
    assert_eq!(ours.lines()[0], qemu.out.lines().next().unwrap_or(""));
    // Both pass the command line through, and both end it with our text.
    for out in [&ours.out, &qemu.out] {
        let line = select(out, &["cmdline: "]);
        assert_eq!(line.len(), 1, "{out}");
        assert!(line[0].ends_with("oracle=1"), "{out}");
    }
    // Both describe RAM from 0 below 640 KiB and from 1 MiB to the end.
    for (who, out) in [("ours", &ours.out), ("qemu", &qemu.out)] {
        let lines: Vec<&str> = out.lines().collect();
        let map = kvm_common::parse_map(&lines, "memmap: ");
        let ram: Vec<_> = map
            .into_iter()
            .filter(|e| e.kind == 1 && e.size > 0)
            .collect();
        assert!(
            ram.iter().any(|e| e.addr == 0 && e.size <= 0xa0000),
            "{who}: {ram:x?}"
        );
        assert!(
            ram.iter()
                .any(|e| e.addr == 0x10_0000 && e.addr + e.size == 64 << 20),
            "{who}: {ram:x?}"
        );
    }
}

/// smp on `vcpus`: identical output and status on both.
fn smp_matches_qemu(vcpus: u8) {
    let spec = Spec {
        vcpus,
        ..Spec::new("smp")
    };
    let ours = run(&spec);
    let qemu = run_qemu(&spec);
    assert_eq!(ours.out, qemu.out, "ours vs qemu on {vcpus} vCPUs");
    assert_eq!(qemu.guest_status(), Some(vcpus), "qemu:\n{}", qemu.out);
    assert_eq!(ours.status, ExitStatus::Exited(vcpus));
}

#[test]
fn smp_2_matches_qemu() {
    require_kvm_and_qemu!();
    smp_matches_qemu(2);
}

#[test]
fn smp_3_matches_qemu() {
    require_kvm_and_qemu!();
    smp_matches_qemu(3);
}

#[test]
fn cpuid_matches_qemu() {
    require_kvm_and_qemu!();
    let spec = Spec::new("cpuid");
    let ours = run(&spec);
    let qemu = run_qemu(&spec);
    assert_eq!(ours.out, qemu.out);
    assert_eq!(qemu.guest_status(), Some(0));
    assert_eq!(ours.status, ExitStatus::Exited(0));
}

#[test]
fn serial_echo_matches_qemu() {
    require_kvm_and_qemu!();
    let spec = Spec {
        input: b"Oracle Echo\n".to_vec(),
        ..Spec::new("serial_echo")
    };
    let ours = run(&spec);
    let qemu = run_qemu(&spec);
    assert_eq!(ours.out, qemu.out);
    assert_eq!(qemu.out, "ORACLE ECHO\n");
    assert_eq!(qemu.guest_status(), Some(0));
    assert_eq!(ours.status, ExitStatus::Exited(0));
}

#[test]
fn triple_fault_ud2_matches_qemu() {
    require_kvm_and_qemu!();
    // QEMU with -no-reboot exits with code 0 on the shutdown; ours reports it.
    let spec = Spec::new("triple_fault_ud2");
    let ours = run(&spec);
    let qemu = run_qemu(&spec);
    assert_eq!(ours.out, qemu.out);
    assert_eq!(qemu.code, Some(0), "qemu:\n{}", qemu.out);
    assert_eq!(ours.status, ExitStatus::TripleFault);
}

#[test]
fn bzimage_banner_matches_qemu() {
    require_kvm_and_qemu!();
    // QEMU enters the bzImage through its firmware and the guest's own
    // real-mode setup and 32-bit entry; ours through the 64-bit entry. The
    // report after the banner differs (no e820 on QEMU's path), the banner
    // and the exit status must not.
    let spec = Spec {
        cmdline: Some("oracle=bz".into()),
        ..Spec::new("bzimage")
    };
    let ours = run(&spec);
    let qemu = run_qemu(&spec);
    assert_eq!(qemu.guest_status(), Some(0), "qemu:\n{}", qemu.out);
    assert_eq!(ours.status, ExitStatus::Exited(0), "ours:\n{}", ours.out);
    assert_eq!(
        select(&ours.out, &["bzimage ok"]),
        select(&qemu.out, &["bzimage ok"])
    );
    for out in [&ours.out, &qemu.out] {
        let line = select(out, &["cmdline: "]);
        assert!(line.len() == 1 && line[0].ends_with("oracle=bz"), "{out}");
        assert_eq!(select(out, &["loader type: 0x"]).len(), 1, "{out}");
    }
}
