//! `locald-restore-bench`: the cost of a snapshot restore inside the VMM,
//! for a small and a large guest. For each memory size it boots the
//! `count` test guest, snapshots it mid-run (stopping it), then restores
//! it N times, timing `VirtualMachine::new` (state file read and checked,
//! memory mapped `MAP_PRIVATE`, interrupt controllers, devices and vCPUs
//! set) and reading the process's RSS growth once the restored guest has
//! run to its end: only the pages the guest touched are read in.
//!
//! A measurement tool, not a test: it prints a table and fails only when
//! a VM cannot be run or ends with the wrong status.
//! Usage: `locald-restore-bench [--runs N] [--sizes MIB,MIB...]`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use locald_vmm::snapshot::AfterSnapshot;
use locald_vmm::{ConsoleConfig, ExitStatus, SharedBuffer, VirtualMachine, VmConfig};

fn config(mib: u64, out: &SharedBuffer, restore: Option<&Path>) -> VmConfig {
    VmConfig {
        kernel: Some(test_guests::path("count")),
        vcpus: 1,
        memory_mib: mib,
        console: ConsoleConfig::Buffer {
            input: Vec::new(),
            output: out.clone(),
        },
        rng: false,
        timeout: Some(Duration::from_secs(120)),
        restore: restore.map(Path::to_path_buf),
        ..VmConfig::default()
    }
}

/// Resident set size of this process, KiB (from /proc/self/statm).
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn snapshot(mib: u64, dir: &Path) -> Result<(), String> {
    let out = SharedBuffer::default();
    let vm = VirtualMachine::new(config(mib, &out, None))
        .map_err(|e| format!("{mib} MiB: new: {e}"))?
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.text().contains("count 3\n") {
        if Instant::now() > deadline {
            return Err(format!("{mib} MiB: no count 3: {}", out.text()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    vm.snapshot(dir, AfterSnapshot::Stop)
        .map_err(|e| format!("{mib} MiB: snapshot: {e}"))?;
    vm.wait().map_err(|e| format!("wait: {e}"))?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = 5usize;
    let mut sizes = vec![128u64, 2048];
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--runs" => {
                runs = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(5);
                i += 1;
            }
            "--sizes" => {
                sizes = args
                    .get(i + 1)
                    .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
                    .unwrap_or_default();
                i += 1;
            }
            other => {
                eprintln!("locald-restore-bench: unknown argument {other}");
                return ExitCode::from(2);
            }
        }
        i += 1;
    }
    let base: PathBuf =
        std::env::temp_dir().join(format!("locald-restore-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    println!("restore of the `count` guest, {runs} runs per size (medians)");
    println!(
        "{:>10} {:>14} {:>16} {:>18}",
        "memory", "restore (ms)", "snapshot file", "RSS growth (KiB)"
    );
    let mut rows = Vec::new();
    for &mib in &sizes {
        let dir = base.join(format!("{mib}"));
        if let Err(e) = snapshot(mib, &dir) {
            eprintln!("locald-restore-bench: {e}");
            return ExitCode::FAILURE;
        }
        let on_disk = std::fs::metadata(dir.join("memory")).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        let mut times = Vec::new();
        let mut growth = Vec::new();
        for _ in 0..runs {
            let out = SharedBuffer::default();
            let before = rss_kib();
            let t = Instant::now();
            let vm = VirtualMachine::new(config(mib, &out, Some(&dir)));
            let took = t.elapsed();
            let mut vm = match vm {
                Ok(vm) => vm,
                Err(e) => {
                    eprintln!("locald-restore-bench: restore {mib} MiB: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match vm.run() {
                Ok(ExitStatus::Exited(0)) => {}
                other => {
                    eprintln!("locald-restore-bench: restored guest ended {other:?}");
                    return ExitCode::FAILURE;
                }
            }
            growth.push((rss_kib().saturating_sub(before)) as f64);
            drop(vm);
            times.push(took.as_secs_f64() * 1000.0);
        }
        let (t, g) = (median(times), median(growth));
        println!(
            "{:>7} MiB {:>14.2} {:>12} KiB {:>18.0}",
            mib,
            t,
            on_disk / 1024,
            g
        );
        rows.push((mib, t));
    }
    if rows.len() >= 2 {
        let (a, b) = (rows[0], rows[rows.len() - 1]);
        println!(
            "restore {} MiB / {} MiB: {:.2}x (goal: <= 10 ms each, the same for both)",
            b.0,
            a.0,
            b.1 / a.1
        );
    }
    let _ = std::fs::remove_dir_all(&base);
    ExitCode::SUCCESS
}
