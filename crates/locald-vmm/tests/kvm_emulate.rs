//! Fast KVM tier for instruction completion: the `emulate` guest executes
//! every instruction the VMM completes for KVM's emulator (stac, clac,
//! popcnt, rdrand, fwait, int3) and checks its architectural result. On a
//! software-KVM host each must also show up in the VMM's per-kind counts,
//! proving the VMM (not the CPU) ran it; on hardware KVM the counts stay
//! empty and the output is the same. So that the completion path is
//! checked on every host, `emulate_window` runs the same instructions from
//! the VMM's test code window (`LOCALD_VMM_TEST_CODE_WINDOW=1`, see
//! `locald_vmm::kvm::emulate::code_window`), where KVM can never run them
//! itself: there the counts are exact on Intel, AMD and software KVM.

#[macro_use]
mod kvm_common;

use std::process::Command;
use std::time::Duration;

use kvm_common::guest;
use locald_vmm::kvm::emulate::code_window;
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
    // rdrand runs only if the guest's CPUID has it.
    let rdrand = !out.contains("rdrand not present\n");
    let rdrand_line = if rdrand {
        "rdrand ok"
    } else {
        "rdrand not present"
    };
    assert_eq!(
        out,
        format!("stac ok\nclac ok\npopcnt 17\npopcnt flags ok\n{rdrand_line}\nfwait ok\nint3 ok\n"),
        "guest output"
    );
    assert_eq!(status, ExitStatus::Exited(0));
    if compat {
        for kind in ["stac", "clac", "popcnt", "fwait", "int3"]
            .into_iter()
            .chain(rdrand.then_some("rdrand"))
        {
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

/// `rdseed` run natively where the CPU (and the guest's CPUID, compat off
/// so nothing is masked) has it; refused by name where KVM must emulate it.
/// The refusal on every host is checked by the code-window test below.
#[test]
fn unhandled_instruction_names_itself() {
    require_kvm!();
    let (result, out, _, _) = run("unhandled", CpuCompat::Off);
    if out == "rdseed not present\n" {
        assert_eq!(result.expect("run"), ExitStatus::Exited(0));
        return;
    }
    if locald_vmm::kvm::host::software_kvm_reason().is_none() {
        assert_eq!(out, "rdseed next\nrdseed ok\n");
        assert_eq!(result.expect("run"), ExitStatus::Exited(0));
        return;
    }
    assert_eq!(out, "rdseed next\n");
    let err = result
        .expect_err("rdseed cannot be completed here")
        .to_string();
    assert!(err.contains("rdseed eax"), "{err}");
    assert!(err.contains("bytes 0f c7 f8"), "{err}");
    assert!(err.contains("guest RIP 0x"), "{err}");
}

/// Runs test `name` of this binary alone in a child process, with the code
/// window hook on or off: the hook is read from the environment, which a
/// test must not change inside this multi-threaded process.
fn in_child(name: &str, hook: bool) {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([name, "--exact", "--nocapture", "--test-threads", "1"]);
    if hook {
        cmd.env(code_window::ENV, "1");
    } else {
        cmd.env_remove(code_window::ENV);
    }
    let out = cmd.output().expect("run the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} in a child failed:\n{text}");
    assert!(
        text.contains("test result: ok. 1 passed"),
        "{name} did not run in the child:\n{text}"
    );
}

#[test]
fn code_window_forces_completion_on_any_host() {
    require_kvm!();
    if !code_window::enabled() {
        return in_child("code_window_forces_completion_on_any_host", true);
    }
    let (result, out, counts, _) = run("emulate_window", CpuCompat::Auto);
    assert_eq!(
        out,
        "window ok\nstac ok\nclac ok\npopcnt 17\npopcnt flags ok\nrdrand ok\nfwait ok\n\
         int3 ok\nsequence ok\nrdseed next\n",
        "guest output (result {result:?})"
    );
    let err = result
        .expect_err("rdseed in the window must end the VM")
        .to_string();
    assert!(
        err.contains("cannot emulate `rdseed eax` (bytes 0f c7 f8) at guest RIP 0xc0000000"),
        "{err}"
    );
    // Exactly the instructions the guest put in the window (see the
    // guest's header): the VMM, not the CPU, ran every one of them.
    let want: Counts = [
        ("stac", 2),
        ("clac", 2),
        ("popcnt", 3),
        ("rdrand", 2),
        ("fwait", 2),
        ("int3", 9),
    ]
    .into_iter()
    .collect();
    // On software KVM too: the guest's own code in RAM needs none of them.
    assert_eq!(counts, want, "completed by the VMM");
}

#[test]
fn code_window_is_off_by_default() {
    require_kvm!();
    if code_window::enabled() {
        return in_child("code_window_is_off_by_default", false);
    }
    let (result, out, counts, _) = run("emulate_window", CpuCompat::Auto);
    assert_eq!(out, "window not present\n");
    assert_eq!(result.expect("run"), ExitStatus::Exited(3));
    assert!(counts.is_empty(), "{counts:?}");
}
