//! Fast KVM tier for instruction completion: the `emulate` guest executes
//! every instruction the VMM completes for KVM's emulator (stac, clac,
//! popcnt, fwait, int3) and checks its architectural result. On a
//! software-KVM host each must also show up in the VMM's per-kind counts,
//! proving the VMM (not the CPU) ran it; on hardware KVM the counts stay
//! empty and the output is the same.

#[macro_use]
mod kvm_common;

use std::time::Duration;

use kvm_common::guest;
use locald_vmm::{ConsoleConfig, CpuCompat, ExitStatus, SharedBuffer, VirtualMachine, VmConfig};

type Counts = std::collections::HashMap<&'static str, u64>;

fn run(
    name: &str,
    compat: CpuCompat,
) -> (Result<ExitStatus, locald_vmm::Error>, String, Counts, bool) {
    let out = SharedBuffer::default();
    let mut vm = VirtualMachine::new(VmConfig {
        kernel: Some(guest(name)),
        memory_mib: 32,
        console: ConsoleConfig::Buffer {
            input: Vec::new(),
            output: out.clone(),
        },
        cpu_compat: compat,
        timeout: Some(Duration::from_secs(20)),
        ..VmConfig::default()
    })
    .expect("create VM");
    let status = vm.run();
    (
        status,
        out.text(),
        vm.emulated_instructions(),
        vm.cpu_compat(),
    )
}

#[test]
fn each_completed_instruction_has_its_architectural_effect() {
    require_kvm!();
    let (status, out, counts, compat) = run("emulate", CpuCompat::Auto);
    let status = status.expect("run VM");
    assert_eq!(
        out, "stac ok\nclac ok\npopcnt 17\npopcnt flags ok\nrdrand ok\nfwait ok\nint3 ok\n",
        "guest output"
    );
    assert_eq!(status, ExitStatus::Exited(0));
    if compat {
        for kind in ["stac", "clac", "popcnt", "rdrand", "fwait", "int3"] {
            assert!(
                counts.get(kind).copied().unwrap_or(0) >= 1,
                "{kind} should have been completed by the VMM: {counts:?}"
            );
        }
        assert_eq!(counts["popcnt"], 2);
        assert_eq!(counts["int3"], 1);
    } else {
        assert!(
            counts.is_empty(),
            "hardware KVM runs them natively: {counts:?}"
        );
    }
}

#[test]
fn completion_does_not_depend_on_the_cpuid_compat_switch() {
    require_kvm!();
    let (status, out, counts, compat) = run("emulate", CpuCompat::Off);
    assert!(!compat);
    assert_eq!(status.expect("run"), ExitStatus::Exited(0), "{out}");
    if locald_vmm::kvm::host::software_kvm_reason().is_some() {
        assert_eq!(counts["int3"], 1, "still completed by the VMM: {counts:?}");
    }
}

#[test]
fn unhandled_instruction_names_itself() {
    require_kvm!();
    let (result, out, _, _) = run("unhandled", CpuCompat::Auto);
    assert_eq!(out, "rdseed next\n");
    if locald_vmm::kvm::host::software_kvm_reason().is_none() {
        assert_eq!(result.expect("run"), ExitStatus::Exited(0));
        return;
    }
    let err = result
        .expect_err("rdseed cannot be completed here")
        .to_string();
    assert!(err.contains("rdseed eax"), "{err}");
    assert!(err.contains("bytes 0f c7 f8"), "{err}");
    assert!(err.contains("guest RIP 0x"), "{err}");
}
