//! Assembles and links the test guests in `guests/` with GNU `as` and `ld`.
//!
//! Std only, so that it can be compiled three ways: by this crate's
//! `build.rs`, as the public `test_guests::builder` module, and by test
//! crates that cannot depend on `test-guests` (they include this file with
//! `#[path]` and build the guests at run time).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// One guest: `guests/<name>.S`, linked with `guests/<script>`.
#[derive(Debug, Clone, Copy)]
pub struct GuestSpec {
    /// File name of the built guest, and of its source without `.S`.
    pub name: &'static str,
    /// Linker script in `guests/`.
    pub script: &'static str,
    /// What the guest is and how it boots (one line).
    pub about: &'static str,
}

/// Every guest, in build order.
pub const GUESTS: &[GuestSpec] = &[
    GuestSpec {
        name: "pvh_hello",
        script: "pvh.ld",
        about: "PVH: prints pvh ok, the command line and the memory map; exits 0",
    },
    GuestSpec {
        name: "pvh_exit0",
        script: "pvh.ld",
        about: "PVH: exits 0 at once",
    },
    GuestSpec {
        name: "boot64",
        script: "boot64.ld",
        about: "64-bit ELF, no PVH note: prints boot64 ok, cmdline, e820, loader type",
    },
    GuestSpec {
        name: "bzimage",
        script: "bzimage.ld",
        about: "synthetic bzImage: prints bzimage ok and the boot64 report",
    },
    GuestSpec {
        name: "serial_echo",
        script: "pvh.ld",
        about: "PVH: echoes one COM1 input line upper-cased; exits 0",
    },
    GuestSpec {
        name: "smp",
        script: "pvh.ld",
        about: "PVH: counts CPUs in the MP table, starts the APs; exits APs + 1",
    },
    GuestSpec {
        name: "triple_fault",
        script: "pvh.ld",
        about: "PVH: int3 with a zero-limit IDT (triple fault)",
    },
    GuestSpec {
        name: "triple_fault_ud2",
        script: "pvh.ld",
        about: "PVH: ud2 with a zero-limit IDT (triple fault)",
    },
    GuestSpec {
        name: "i8042_reset",
        script: "pvh.ld",
        about: "PVH: prints resetting, writes 0xFE to port 0x64",
    },
    GuestSpec {
        name: "port_loop",
        script: "pvh.ld",
        about: "PVH: 100,000 OUTs to port 0x80; exits 0",
    },
    GuestSpec {
        name: "cpuid",
        script: "pvh.ld",
        about: "PVH: prints the hypervisor bit, APIC id and hypervisor signature",
    },
    GuestSpec {
        name: "emulate",
        script: "pvh.ld",
        about: "PVH: stac, clac, popcnt, fwait, int3 with their results checked; exits 0",
    },
    GuestSpec {
        name: "unhandled",
        script: "pvh.ld",
        about: "PVH: rdseed, which software KVM cannot emulate (error names it); exits 0 elsewhere",
    },
    GuestSpec {
        name: "panic",
        script: "pvh.ld",
        about: "PVH: prints a Linux panic line, then resets through the i8042",
    },
    GuestSpec {
        name: "spin",
        script: "pvh.ld",
        about: "PVH: prints spinning and loops forever",
    },
];

/// Files in `guests/` that are not guests but are read while building.
pub const SHARED_SOURCES: &[&str] = &[
    "lib32.inc",
    "lib64.inc",
    "pvh_note.inc",
    "boot64_body.inc",
    "pvh.ld",
    "boot64.ld",
    "bzimage.ld",
];

/// Looks a guest up by name.
pub fn spec(name: &str) -> Option<&'static GuestSpec> {
    GUESTS.iter().find(|g| g.name == name)
}

/// Builds every guest into `out_dir` (created if needed).
pub fn build_all(guests_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, String> {
    GUESTS
        .iter()
        .map(|g| build(g, guests_dir, out_dir))
        .collect()
}

/// Builds one guest into `out_dir/<name>` and returns that path.
///
/// The result is written under a unique temporary name and renamed into
/// place, so concurrent builders (parallel test processes) never see a
/// partial file.
pub fn build(guest: &GuestSpec, guests_dir: &Path, out_dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tag = format!("{}.{}.{nanos}", guest.name, std::process::id());
    let obj = out_dir.join(format!("{tag}.o"));
    let tmp = out_dir.join(format!("{tag}.tmp"));
    let src = guests_dir.join(format!("{}.S", guest.name));
    let script = guests_dir.join(guest.script);

    let result = (|| {
        let mut as_cmd = Command::new("as");
        as_cmd
            .arg("--64")
            .arg("-I")
            .arg(guests_dir)
            .arg("-o")
            .arg(&obj)
            .arg(&src);
        run(&mut as_cmd)?;
        let mut ld_cmd = Command::new("ld");
        ld_cmd
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-static",
                "--build-id=none",
            ])
            .args(["-z", "noexecstack", "-z", "max-page-size=0x1000"])
            .arg("-T")
            .arg(&script)
            .arg("-o")
            .arg(&tmp)
            .arg(&obj);
        run(&mut ld_cmd)?;
        let dest = out_dir.join(guest.name);
        std::fs::rename(&tmp, &dest)
            .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), dest.display()))?;
        Ok(dest)
    })();
    let _ = std::fs::remove_file(&obj);
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Runs a tool; on failure returns its command line and stderr.
fn run(cmd: &mut Command) -> Result<(), String> {
    let describe = |cmd: &Command| {
        let mut s = cmd.get_program().to_string_lossy().into_owned();
        for a in cmd.get_args() {
            let _ = write!(s, " {}", a.to_string_lossy());
        }
        s
    };
    let out = cmd.output().map_err(|e| {
        format!(
            "running `{}`: {e} (GNU binutils `as` and `ld` are needed)",
            describe(cmd)
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed ({}):\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
