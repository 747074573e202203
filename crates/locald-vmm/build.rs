//! Build script of `locald-vmm` (runs on the host, at build time).
//!
//! 1. Builds the guest init (`crates/guest-init`, package `locald-init`) with
//!    a nested `cargo build --release` as a static x86-64 glibc binary
//!    (`-C target-feature=+crt-static`), in its own target directory under
//!    `OUT_DIR`, with the outer build's flags removed from the environment so
//!    they cannot leak in. The binary is checked to have no `PT_INTERP` and is
//!    copied to `$OUT_DIR/locald-init` for `include_bytes!`.
//! 2. The aarch64 guest init, for the arm64 default guest, into
//!    `$OUT_DIR/locald-init-aarch64`:
//!    - `LOCALD_VMM_GUEST_INIT_AARCH64=PATH`: a prebuilt static aarch64
//!      `locald-init` is copied (checked; for macOS hosts, which have no
//!      Linux cross toolchain); `=off` embeds none;
//!    - else, when the Rust target `aarch64-unknown-linux-gnu`, Debian's
//!      `aarch64-linux-gnu-gcc` and the arm64 glibc static libraries
//!      (`libc6-dev-arm64-cross`) are installed, the same nested build for
//!      that target, linked with `aarch64-linux-gnu-gcc`;
//!    - else the file is empty and `locald-init-aarch64.missing` says what
//!      to install (the library reports it when the aarch64 guest is asked
//!      for; the x86_64 guest is unaffected).
//! 3. Generates `$OUT_DIR/kernel_inputs.rs`: a table of the default guest
//!    kernels' build inputs (`guest/kernel/build-kernel.sh`, `microvm.config`,
//!    `patches/*.patch` sorted by name, the other arches' fragments
//!    `microvm-*.config` sorted by name, then helper `*.sh` scripts such as
//!    `hash.sh`) embedded with `include_bytes!`.
//!    `LOCALD_VMM_KERNEL_DIR` overrides the directory (for testing).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The x86_64 guest's target; `--target` also keeps host RUSTFLAGS out.
const INIT_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The aarch64 guest's target.
const INIT_TARGET_AARCH64: &str = "aarch64-unknown-linux-gnu";
/// Debian's cross linker for it (package `gcc-aarch64-linux-gnu`).
const AARCH64_LINKER: &str = "aarch64-linux-gnu-gcc";
/// The arm64 glibc static library (package `libc6-dev-arm64-cross`).
const AARCH64_LIBC_A: &str = "/usr/aarch64-linux-gnu/lib/libc.a";
/// ELF machines.
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let root = manifest_dir.join("../..");
    watch_init_inputs(&root);
    let bytes = build_init(&root, &out_dir, INIT_TARGET, None);
    install_init(&out_dir.join("locald-init"), &bytes);
    aarch64_init(&root, &out_dir);
    kernel_inputs(&root, &out_dir);
}

fn install_init(dest: &Path, bytes: &[u8]) {
    fs::write(dest, bytes)
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: writing {}: {e}", dest.display()));
}

/// The aarch64 init, or an empty file plus the reason (see the module docs).
fn aarch64_init(root: &Path, out_dir: &Path) {
    println!("cargo:rerun-if-env-changed=LOCALD_VMM_GUEST_INIT_AARCH64");
    // Only when present: a missing path would rerun this script on every
    // build. Installing the toolchain later therefore needs
    // `cargo clean -p locald-vmm` (the message says so).
    if Path::new(AARCH64_LIBC_A).is_file() {
        println!("cargo:rerun-if-changed={AARCH64_LIBC_A}");
    }
    let dest = out_dir.join("locald-init-aarch64");
    let why_path = out_dir.join("locald-init-aarch64.missing");
    let mut why = String::new();
    let bytes = match env::var_os("LOCALD_VMM_GUEST_INIT_AARCH64") {
        Some(v) if v == "off" => {
            why = "it was built with LOCALD_VMM_GUEST_INIT_AARCH64=off".into();
            Vec::new()
        }
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            println!("cargo:rerun-if-changed={}", p.display());
            let bytes = fs::read(&p).unwrap_or_else(|e| {
                panic!(
                    "locald-vmm build.rs: LOCALD_VMM_GUEST_INIT_AARCH64={}: {e}",
                    p.display()
                )
            });
            if let Err(e) = check_static_elf(&bytes, EM_AARCH64) {
                panic!(
                    "locald-vmm build.rs: LOCALD_VMM_GUEST_INIT_AARCH64={} is not a static \
                     aarch64 executable: {e}",
                    p.display()
                );
            }
            bytes
        }
        _ => {
            let missing = aarch64_toolchain_missing();
            if missing.is_empty() {
                build_init(root, out_dir, INIT_TARGET_AARCH64, Some(AARCH64_LINKER))
            } else {
                why = format!(
                    "building it needs {}; install them (scripts/setup-host.sh does) and rebuild \
                     after `cargo clean -p locald-vmm`, or set LOCALD_VMM_GUEST_INIT_AARCH64 to a prebuilt static aarch64 locald-init \
                     at build time",
                    missing.join(", ")
                );
                println!("cargo:warning=no aarch64 guest init embedded: {why}");
                Vec::new()
            }
        }
    };
    install_init(&dest, &bytes);
    install_init(&why_path, why.as_bytes());
}

/// What is missing to cross-build the aarch64 init (empty: nothing).
fn aarch64_toolchain_missing() -> Vec<String> {
    let mut missing = Vec::new();
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", INIT_TARGET_AARCH64])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let has_std = libdir
        .and_then(|d| fs::read_dir(d).ok())
        .is_some_and(|mut rd| {
            rd.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libstd-")))
        });
    if !has_std {
        missing.push(format!(
            "the Rust target (rustup target add {INIT_TARGET_AARCH64})"
        ));
    }
    let has_linker = env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|d| d.join(AARCH64_LINKER).is_file()));
    if !has_linker {
        missing.push(format!(
            "{AARCH64_LINKER} (apt-get install gcc-aarch64-linux-gnu)"
        ));
    }
    if !Path::new(AARCH64_LIBC_A).is_file() {
        missing.push(format!(
            "{AARCH64_LIBC_A} (apt-get install libc6-dev-arm64-cross)"
        ));
    }
    missing
}

fn watch_init_inputs(root: &Path) {
    let init_dir = root.join("crates/guest-init");
    for p in [
        init_dir.join("src"),
        init_dir.join("Cargo.toml"),
        root.join("crates/agent-proto/src"),
        root.join("crates/agent-proto/Cargo.toml"),
        root.join("crates/guest-spec/src"),
        root.join("crates/guest-spec/Cargo.toml"),
        root.join("Cargo.toml"),
        root.join("Cargo.lock"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_NET_OFFLINE");
}

/// Builds the guest init for `target` (linked with `linker` when given) and
/// returns the checked static binary.
fn build_init(root: &Path, out_dir: &Path, target: &str, linker: Option<&str>) -> Vec<u8> {
    let init_dir = root.join("crates/guest-init");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("guest-init-target");
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--target", target, "--manifest-path"])
        .arg(init_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    if matches!(env::var("CARGO_NET_OFFLINE").as_deref(), Ok("true" | "1")) {
        cmd.arg("--offline");
    }
    // Do not let the outer build's configuration leak into the nested one.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_ENCODED_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "RUSTC_LINKER"
            );
        if leaks {
            cmd.env_remove(key);
        }
    }
    // A small binary: the guest kernel copies every initramfs byte through
    // emulated instructions.
    // Non-PIE: no self-relocation at startup, and a little smaller.
    cmd.env(
        "RUSTFLAGS",
        "-C target-feature=+crt-static -C relocation-model=static",
    )
    .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
    .env("CARGO_PROFILE_RELEASE_LTO", "true")
    .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
    .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
    .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
    .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
    .env("CARGO_PROFILE_RELEASE_INCREMENTAL", "false")
    // Nested cargo's stdout must not be parsed as our `cargo:` directives.
    .stdout(Stdio::from(std::io::stderr()));
    if let Some(linker) = linker {
        let var = format!(
            "CARGO_TARGET_{}_LINKER",
            target.to_ascii_uppercase().replace('-', "_")
        );
        cmd.env(var, linker);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: cannot run {cmd:?}: {e}"));
    if !status.success() {
        panic!(
            "locald-vmm build.rs: building the guest init for {target} failed ({status}): {cmd:?}"
        );
    }

    let built = target_dir.join(target).join("release/locald-init");
    let bytes = fs::read(&built)
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: reading {}: {e}", built.display()));
    let machine = if target.starts_with("aarch64") {
        EM_AARCH64
    } else {
        EM_X86_64
    };
    if let Err(why) = check_static_elf(&bytes, machine) {
        panic!(
            "locald-vmm build.rs: the guest init {} is not a static {target} executable: {why}. \
             It must be linked with -C target-feature=+crt-static (glibc static libraries: \
             package libc6-dev, or libc6-dev-arm64-cross for aarch64).",
            built.display()
        );
    }
    bytes
}

/// Checks for a 64-bit little-endian ELF executable for `machine` without a
/// `PT_INTERP` program header (i.e. no dynamic loader needed).
fn check_static_elf(b: &[u8], machine: u16) -> Result<(), String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if b[4] != 2 || b[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let e_type = u16_at(16);
    if u16_at(18) != machine {
        return Err(format!("ELF machine {} is not {machine}", u16_at(18)));
    }
    if e_type != 2 && e_type != 3 {
        return Err(format!("ELF type {e_type} is not an executable"));
    }
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap_or_default()) as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let Some(ph) = b.get(off..off + 4) else {
            return Err("truncated program headers".into());
        };
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == 3 {
            return Err("it has a PT_INTERP header (dynamically linked)".into());
        }
    }
    Ok(())
}

fn kernel_inputs(root: &Path, out_dir: &Path) {
    println!("cargo:rerun-if-env-changed=LOCALD_VMM_KERNEL_DIR");
    let dir = match env::var_os("LOCALD_VMM_KERNEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => root.join("guest/kernel"),
    };
    println!("cargo:rerun-if-changed={}", dir.display());
    let dir = dir.canonicalize().unwrap_or_else(|e| {
        panic!(
            "locald-vmm build.rs: kernel input directory {}: {e}",
            dir.display()
        )
    });

    let mut files: Vec<String> = Vec::new();
    for required in ["build-kernel.sh", "microvm.config"] {
        if !dir.join(required).is_file() {
            panic!(
                "locald-vmm build.rs: missing default-kernel input {}",
                dir.join(required).display()
            );
        }
        files.push(required.to_owned());
    }
    let mut patches: Vec<String> = match fs::read_dir(dir.join("patches")) {
        Ok(rd) => rd
            .map(|e| e.unwrap_or_else(|e| panic!("locald-vmm build.rs: listing patches: {e}")))
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".patch"))
            .map(|n| format!("patches/{n}"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!(
            "locald-vmm build.rs: listing {}/patches: {e}",
            dir.display()
        ),
    };
    patches.sort();
    files.extend(patches);
    // The other arches' fragments (microvm-aarch64.config).
    let mut fragments: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: listing {}: {e}", dir.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("locald-vmm build.rs: listing kernel inputs: {e}")))
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("microvm-") && n.ends_with(".config"))
        .collect();
    fragments.sort();
    files.extend(fragments);
    // Helper scripts next to build-kernel.sh (e.g. hash.sh, which it runs).
    // They are shipped but, per the cache-key rule, not hashed.
    let mut helpers: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: listing {}: {e}", dir.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("locald-vmm build.rs: listing kernel inputs: {e}")))
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".sh") && n != "build-kernel.sh")
        .collect();
    helpers.sort();
    files.extend(helpers);

    let mut src = String::from(
        "// @generated by locald-vmm build.rs: default guest kernel build inputs.\n\
         /// `(relative name, contents)`: build-kernel.sh, microvm.config,\n\
         /// patches/*.patch sorted by name, microvm-*.config sorted by name,\n\
         /// then helper *.sh sorted by name.\n\
         pub(crate) static KERNEL_INPUTS: &[(&str, &[u8])] = &[\n",
    );
    for f in &files {
        let abs = dir.join(f);
        let abs = abs
            .to_str()
            .unwrap_or_else(|| panic!("non-UTF-8 path {}", abs.display()));
        src.push_str(&format!("    ({f:?}, include_bytes!({abs:?})),\n"));
    }
    src.push_str("];\n");
    let dest = out_dir.join("kernel_inputs.rs");
    fs::write(&dest, src)
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: writing {}: {e}", dest.display()));
}
