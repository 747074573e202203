//! Fast KVM tier: boots the tiny freestanding guests of `guests/` through
//! the library API and checks their exact console output and exit status.
//! Each guest runs in well under a second; the whole file needs `/dev/kvm`
//! and skips (loudly) only when it is absent.

#[macro_use]
mod kvm_common;

use std::time::Duration;

use kvm_common::{check_map, parse_map, run, Spec};
use locald_vmm::ExitStatus;

/// Asserts the `cmdline: ` line carries the VMM's console and our extra text.
fn check_cmdline(line: &str, extra: &str) {
    let cmdline = line
        .strip_prefix("cmdline: ")
        .unwrap_or_else(|| panic!("not a cmdline line: {line:?}"));
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    assert!(words.contains(&"console=ttyS0"), "cmdline: {cmdline:?}");
    assert!(
        cmdline.ends_with(extra),
        "extra text must be appended: {cmdline:?}"
    );
}

/// Runs pvh_hello with `memory_mib` and checks every line it prints.
fn pvh_hello_with(memory_mib: u64) {
    let extra = "extra=1 locald.test=pvh";
    let o = run(&Spec {
        memory_mib,
        cmdline: Some(extra.into()),
        ..Spec::new("pvh_hello")
    });
    assert_eq!(o.status, ExitStatus::Exited(0), "output:\n{}", o.out);
    let lines = o.lines();
    assert_eq!(lines.first(), Some(&"pvh ok"), "output:\n{}", o.out);
    check_cmdline(lines[1], extra);
    let n: usize = lines[2]
        .strip_prefix("memmap entries: ")
        .unwrap_or_else(|| panic!("line 3: {:?}", lines[2]))
        .parse()
        .expect("entry count");
    assert!((2..=64).contains(&n), "memmap entries: {n}");
    assert_eq!(lines.len(), 3 + n, "unexpected lines:\n{}", o.out);
    let map = parse_map(&lines[3..], "memmap: ");
    assert_eq!(map.len(), n, "every entry line parses:\n{}", o.out);
    check_map(&map, memory_mib, "PVH memmap");
}

#[test]
fn pvh_hello_64m() {
    require_kvm!();
    pvh_hello_with(64);
}

#[test]
fn pvh_hello_200m() {
    require_kvm!();
    pvh_hello_with(200);
}

/// boot64 and bzimage print the same report after their banner.
fn boot64_report(guest: &'static str, banner: &str) {
    let extra = "extra=1 locald.test=boot64";
    let memory_mib = 64;
    let o = run(&Spec {
        cmdline: Some(extra.into()),
        ..Spec::new(guest)
    });
    assert_eq!(o.status, ExitStatus::Exited(0), "output:\n{}", o.out);
    let lines = o.lines();
    assert_eq!(lines.first(), Some(&banner), "output:\n{}", o.out);
    check_cmdline(lines[1], extra);
    let n: usize = lines[2]
        .strip_prefix("e820 entries: ")
        .unwrap_or_else(|| panic!("line 3: {:?}", lines[2]))
        .parse()
        .expect("entry count");
    assert!((2..=128).contains(&n), "e820 entries: {n}");
    assert_eq!(lines.len(), 4 + n, "unexpected lines:\n{}", o.out);
    let map = parse_map(&lines[3..3 + n], "e820: ");
    assert_eq!(map.len(), n, "every entry line parses:\n{}", o.out);
    check_map(&map, memory_mib, "e820");
    let loader = lines[3 + n]
        .strip_prefix("loader type: 0x")
        .unwrap_or_else(|| panic!("last line: {:?}", lines[3 + n]));
    let loader = u8::from_str_radix(loader, 16).expect("loader type");
    // Linux ignores an initrd when type_of_loader is 0.
    assert_ne!(loader, 0, "boot_params.hdr.type_of_loader must be set");
}

#[test]
fn boot64_linux_boot_protocol() {
    require_kvm!();
    boot64_report("boot64", "boot64 ok");
}

#[test]
fn bzimage_64bit_entry() {
    require_kvm!();
    boot64_report("bzimage", "bzimage ok");
}

#[test]
fn serial_echo_reads_console_input() {
    require_kvm!();
    let o = run(&Spec {
        input: b"hello World 42\n".to_vec(),
        ..Spec::new("serial_echo")
    });
    assert_eq!(o.status, ExitStatus::Exited(0), "output:\n{}", o.out);
    assert_eq!(o.out, "HELLO WORLD 42\n");
}

#[test]
fn serial_echo_long_line() {
    require_kvm!();
    let mut input: Vec<u8> = (0..200).map(|i| b'a' + (i % 26) as u8).collect();
    input.push(b'\n');
    let o = run(&Spec {
        input: input.clone(),
        ..Spec::new("serial_echo")
    });
    assert_eq!(o.status, ExitStatus::Exited(0), "output:\n{}", o.out);
    assert_eq!(o.out.as_bytes(), input.to_ascii_uppercase().as_slice());
}

/// smp with `vcpus`: the MP table lists every vCPU and every AP starts.
fn smp_with(vcpus: u8) {
    let o = run(&Spec {
        vcpus,
        ..Spec::new("smp")
    });
    assert_eq!(
        o.out,
        format!(
            "mp checksums: ok\ncpus in mp table: {vcpus}\naps started: {}\n",
            vcpus - 1
        )
    );
    assert_eq!(o.status, ExitStatus::Exited(vcpus), "output:\n{}", o.out);
}

#[test]
fn smp_1_vcpu() {
    require_kvm!();
    smp_with(1);
}

#[test]
fn smp_2_vcpus() {
    require_kvm!();
    smp_with(2);
}

#[test]
fn smp_4_vcpus() {
    require_kvm!();
    smp_with(4);
}

#[test]
fn triple_fault_int3_is_reported() {
    require_kvm!();
    let o = run(&Spec::new("triple_fault"));
    assert_eq!(o.status, ExitStatus::TripleFault, "output:\n{}", o.out);
    assert_eq!(o.out, "triple fault next\n");
}

#[test]
fn triple_fault_ud2_is_reported() {
    require_kvm!();
    let o = run(&Spec::new("triple_fault_ud2"));
    assert_eq!(o.status, ExitStatus::TripleFault, "output:\n{}", o.out);
    assert_eq!(o.out, "triple fault next\n");
}

#[test]
fn i8042_reset_is_reported() {
    require_kvm!();
    let o = run(&Spec::new("i8042_reset"));
    assert_eq!(o.status, ExitStatus::Reset, "output:\n{}", o.out);
    assert_eq!(o.out, "resetting\n");
}

#[test]
fn kernel_panic_then_reset_is_a_panic() {
    require_kvm!();
    let o = run(&Spec::new("panic"));
    assert_eq!(o.status, ExitStatus::Panic, "output:\n{}", o.out);
    assert!(o.out.contains("Kernel panic - not syncing"));
}

#[test]
fn cpuid_shows_kvm() {
    require_kvm!();
    let o = run(&Spec::new("cpuid"));
    assert_eq!(o.status, ExitStatus::Exited(0), "output:\n{}", o.out);
    assert_eq!(
        o.out,
        "hypervisor bit: 1\napic id: 0\nhypervisor signature: KVMKVMKVM\n"
    );
}

#[test]
fn timeout_stops_a_spinning_guest_promptly() {
    require_kvm!();
    let timeout = Duration::from_secs(2);
    let o = kvm_common::run_bounded(&Spec {
        timeout,
        ..Spec::new("spin")
    });
    assert_eq!(o.status, ExitStatus::TimedOut, "output:\n{}", o.out);
    assert_eq!(o.out, "spinning\n");
    assert!(o.elapsed >= timeout, "returned after {:?}", o.elapsed);
    assert!(
        o.elapsed < timeout + kvm_common::TIMEOUT_SLACK,
        "run() took {:?} to honour a {timeout:?} timeout",
        o.elapsed
    );
}

#[test]
fn timeout_stops_all_vcpus() {
    require_kvm!();
    // Two vCPUs: the BSP spins, the AP waits for a SIPI that never comes.
    let timeout = Duration::from_secs(2);
    let o = kvm_common::run_bounded(&Spec {
        timeout,
        vcpus: 2,
        ..Spec::new("spin")
    });
    assert_eq!(o.status, ExitStatus::TimedOut, "output:\n{}", o.out);
    assert!(o.elapsed >= timeout, "returned after {:?}", o.elapsed);
    assert!(
        o.elapsed < timeout + kvm_common::TIMEOUT_SLACK,
        "run() took {:?}",
        o.elapsed
    );
}

#[test]
fn exit_port_status_without_output() {
    require_kvm!();
    let o = run(&Spec::new("pvh_exit0"));
    assert_eq!(o.status, ExitStatus::Exited(0));
    assert_eq!(o.out, "");
}

#[test]
fn two_lines_then_exit_status() {
    require_kvm!();
    let o = run(&Spec::new("pvh_two_lines"));
    assert_eq!(o.status, ExitStatus::Exited(0), "output:\n{}", o.out);
    assert_eq!(o.out, "hello from pvh\nbye\n");
}

#[test]
fn port_loop_ignored_port_100k_exits() {
    require_kvm!();
    let o = run(&Spec::new("port_loop"));
    assert_eq!(o.status, ExitStatus::Exited(0), "output:\n{}", o.out);
    assert_eq!(o.out, "");
}

#[test]
fn a_vm_runs_only_once() {
    require_kvm!();
    let cfg = locald_vmm::VmConfig {
        kernel: Some(kvm_common::guest("pvh_exit0")),
        memory_mib: 64,
        console: locald_vmm::ConsoleConfig::Null,
        timeout: Some(Duration::from_secs(30)),
        ..locald_vmm::VmConfig::default()
    };
    let mut vm = locald_vmm::VirtualMachine::new(cfg).expect("new");
    assert_eq!(vm.run().expect("first run"), ExitStatus::Exited(0));
    assert!(vm.run().is_err(), "a second run() must be refused");
}

#[test]
fn concurrent_vms_in_one_process() {
    require_kvm!();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                let extra = format!("vm={i}");
                let o = run(&Spec {
                    cmdline: Some(extra.clone()),
                    ..Spec::new("pvh_hello")
                });
                assert_eq!(o.status, ExitStatus::Exited(0), "output:\n{}", o.out);
                check_cmdline(o.lines()[1], &extra);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("VM thread");
    }
}
