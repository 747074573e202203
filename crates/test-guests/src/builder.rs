//! Assembles and links the test guests in `guests/` with GNU `as` and `ld`,
//! compiling the C ones with `gcc -m32` first.
//!
//! C guests (`guests/<name>.c`, [`Lang::C`]) are freestanding 32-bit code
//! entered through the PVH entry. `gcc -m32 -S` turns each C file (the
//! guest and the runtime `guests/c_rt.c`) into 32-bit assembly, which is
//! assembled like the assembly guests with `as --64` after a `.code32`
//! line: the object is ELF64 holding 32-bit code, so the same linker script
//! (`pvh.ld`) gives the ELF64 + PVH note layout the loader reads. The entry
//! (`guests/c_entry.S`: PVH note, stack, `c_main(start_info)`, exit with
//! its return value, `memset`/`memcpy`/`memmove`) is linked first. Only
//! compiler-provided headers (`<stdint.h>`, `<stddef.h>`, `<stdarg.h>`,
//! `<stdbool.h>`) are available: no 32-bit libc is needed.
//!
//! Std only, so that it can be compiled three ways: by this crate's
//! `build.rs`, as the public `test_guests::builder` module, and by test
//! crates that cannot depend on `test-guests` (they include this file with
//! `#[path]` and build the guests at run time).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The language a guest is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// `guests/<name>.S`: GNU `as`, assembled with `--64`.
    Asm,
    /// `guests/<name>.c`: freestanding C compiled with `gcc -m32` (see the
    /// module docs), linked after `c_entry.S` and with `c_rt.c`.
    C,
}

/// One guest: `guests/<name>.S` or `guests/<name>.c`, linked with
/// `guests/<script>`.
#[derive(Debug, Clone, Copy)]
pub struct GuestSpec {
    /// File name of the built guest, and of its source without `.S`/`.c`.
    pub name: &'static str,
    /// Linker script in `guests/`.
    pub script: &'static str,
    /// What the guest is and how it boots (one line).
    pub about: &'static str,
    /// Source language.
    pub lang: Lang,
}

impl GuestSpec {
    /// File name of the guest's own source in `guests/`.
    pub fn source(&self) -> String {
        match self.lang {
            Lang::Asm => format!("{}.S", self.name),
            Lang::C => format!("{}.c", self.name),
        }
    }
}

/// `gcc` flags for C guests: freestanding 32-bit code, no PIC, no stack
/// protector, no FPU/SSE registers (nothing saves them), no unwind tables.
pub const C_FLAGS: &[&str] = &[
    "-m32",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-nostdlib",
    "-O2",
    "-Wall",
    "-Werror",
    "-fno-asynchronous-unwind-tables",
    "-mno-sse",
    "-mno-mmx",
    "-mgeneral-regs-only",
];

/// The C entry (assembly) and runtime linked into every C guest.
pub const C_ENTRY: &str = "c_entry.S";
/// The C runtime compiled into every C guest (its header is `c_rt.h`).
pub const C_RUNTIME: &str = "c_rt.c";

/// Every guest, in build order.
pub const GUESTS: &[GuestSpec] = &[
    GuestSpec {
        name: "pvh_hello",
        script: "pvh.ld",
        about: "PVH: prints pvh ok, the command line and the memory map; exits 0",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "pvh_exit0",
        script: "pvh.ld",
        about: "PVH: exits 0 at once",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "pvh_two_lines",
        script: "pvh.ld",
        about: "PVH: prints two short lines, exits 0 (locald-bench's start/exit guest)",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "boot64",
        script: "boot64.ld",
        about: "64-bit ELF, no PVH note: prints boot64 ok, cmdline, e820, loader type",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "bzimage",
        script: "bzimage.ld",
        about: "synthetic bzImage: prints bzimage ok and the boot64 report",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "serial_echo",
        script: "pvh.ld",
        about: "PVH: echoes one COM1 input line upper-cased; exits 0",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "smp",
        script: "pvh.ld",
        about: "PVH: counts CPUs in the MP table, starts the APs; exits APs + 1",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "triple_fault",
        script: "pvh.ld",
        about: "PVH: int3 with a zero-limit IDT (triple fault)",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "triple_fault_ud2",
        script: "pvh.ld",
        about: "PVH: ud2 with a zero-limit IDT (triple fault)",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "i8042_reset",
        script: "pvh.ld",
        about: "PVH: prints resetting, writes 0xFE to port 0x64",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "port_loop",
        script: "pvh.ld",
        about: "PVH: 100,000 OUTs to port 0x80; exits 0",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "cpuid",
        script: "pvh.ld",
        about: "PVH: prints the hypervisor bit, APIC id and hypervisor signature",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "emulate",
        script: "pvh.ld",
        about: "PVH: stac, clac, popcnt, rdrand (if in CPUID, retried), fwait, int3 with their results checked; exits 0",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "unhandled",
        script: "pvh.ld",
        about: "PVH: rdseed if CPUID has it, retried on CF=0; software KVM cannot emulate it (error names it); exits 0 elsewhere",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "emulate_window",
        script: "pvh.ld",
        about: "PVH: stac, clac, popcnt, rdrand, fwait, int3 from the VMM's test code window (LOCALD_VMM_TEST_CODE_WINDOW=1), completed by the VMM on any host; then rdseed there, which it must refuse",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "panic",
        script: "pvh.ld",
        about: "PVH: prints a Linux panic line, then resets through the i8042",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "spin",
        script: "pvh.ld",
        about: "PVH: prints spinning and loops forever",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "count",
        script: "pvh.ld",
        about: "PVH: prints count 1..40 about 25 ms apart (RDTSC), checking memory against a register; exits 0 (2 on a mismatch)",
        lang: Lang::Asm,
    },
    GuestSpec {
        name: "virtio",
        script: "pvh.ld",
        about: "PVH, C: polled virtio-mmio driver for the block and entropy devices on the command line; exits 0",
        lang: Lang::C,
    },
];

/// Files in `guests/` that are not guests but are read while building.
pub const SHARED_SOURCES: &[&str] = &[
    "lib32.inc",
    "lib64.inc",
    "pvh_note.inc",
    "boot64_body.inc",
    "c_entry.S",
    "c_rt.c",
    "c_rt.h",
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
    let tmp = out_dir.join(format!("{tag}.tmp"));
    let script = guests_dir.join(guest.script);
    // Every intermediate file, removed at the end whatever happens.
    let mut temps: Vec<PathBuf> = Vec::new();

    let result = (|| {
        let objs = match guest.lang {
            Lang::Asm => {
                let obj = out_dir.join(format!("{tag}.o"));
                temps.push(obj.clone());
                assemble(guests_dir, &guests_dir.join(guest.source()), &obj)?;
                vec![obj]
            }
            Lang::C => {
                // The entry first: its .text.entry must be at the load address.
                let entry = out_dir.join(format!("{tag}.entry.o"));
                temps.push(entry.clone());
                assemble(guests_dir, &guests_dir.join(C_ENTRY), &entry)?;
                let mut objs = vec![entry];
                for (i, src) in [guest.source(), C_RUNTIME.to_string()].iter().enumerate() {
                    let asm = out_dir.join(format!("{tag}.c{i}.s"));
                    let obj = out_dir.join(format!("{tag}.c{i}.o"));
                    temps.push(asm.clone());
                    temps.push(obj.clone());
                    compile_c(guests_dir, &guests_dir.join(src), &asm)?;
                    assemble(guests_dir, &asm, &obj)?;
                    objs.push(obj);
                }
                objs
            }
        };
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
            .args(&objs);
        run(&mut ld_cmd)?;
        let dest = out_dir.join(guest.name);
        std::fs::rename(&tmp, &dest)
            .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), dest.display()))?;
        Ok(dest)
    })();
    for t in temps.iter().chain([&tmp]) {
        let _ = std::fs::remove_file(t);
    }
    result
}

/// Assembles `src` (ELF64 object; 32-bit code where the source says
/// `.code32`) into `obj`.
fn assemble(guests_dir: &Path, src: &Path, obj: &Path) -> Result<(), String> {
    let mut as_cmd = Command::new("as");
    as_cmd
        .arg("--64")
        .arg("-I")
        .arg(guests_dir)
        .arg("-o")
        .arg(obj)
        .arg(src);
    run(&mut as_cmd)
}

/// Compiles the C file `src` to 32-bit assembly in `asm`, which starts with
/// `.code32` so that `as --64` keeps it 32-bit code in an ELF64 object.
fn compile_c(guests_dir: &Path, src: &Path, asm: &Path) -> Result<(), String> {
    let mut cc = Command::new("gcc");
    cc.args(C_FLAGS)
        .arg("-I")
        .arg(guests_dir)
        .arg("-S")
        .arg("-o")
        .arg(asm)
        .arg(src);
    run(&mut cc)?;
    let text =
        std::fs::read_to_string(asm).map_err(|e| format!("reading {}: {e}", asm.display()))?;
    std::fs::write(asm, format!("\t.code32\n{text}"))
        .map_err(|e| format!("writing {}: {e}", asm.display()))
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
            "running `{}`: {e} (GNU binutils `as` and `ld`, and `gcc` for C guests, are needed)",
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
