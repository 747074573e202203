//! Build script of `locald-vmm` (runs on the host, at build time).
//!
//! 1. Builds the guest init (`crates/guest-init`, package `locald-init`) with
//!    a nested `cargo build --release` as a static x86-64 glibc binary
//!    (`-C target-feature=+crt-static`), in its own target directory under
//!    `OUT_DIR`, with the outer build's flags removed from the environment so
//!    they cannot leak in. The binary is checked to have no `PT_INTERP` and is
//!    copied to `$OUT_DIR/locald-init` for `include_bytes!`.
//! 2. Generates `$OUT_DIR/kernel_inputs.rs`: a table of the default guest
//!    kernel's build inputs (`guest/kernel/build-kernel.sh`, `microvm.config`,
//!    `patches/*.patch` sorted by name, then helper `*.sh` scripts such as
//!    `hash.sh`) embedded with `include_bytes!`.
//!    `LOCALD_VMM_KERNEL_DIR` overrides the directory (for testing).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The only target installed; `--target` also keeps host RUSTFLAGS out.
const INIT_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let root = manifest_dir.join("../..");
    build_init(&root, &out_dir);
    kernel_inputs(&root, &out_dir);
}

fn build_init(root: &Path, out_dir: &Path) {
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

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("guest-init-target");
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        INIT_TARGET,
        "--manifest-path",
    ])
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
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: cannot run {cmd:?}: {e}"));
    if !status.success() {
        panic!("locald-vmm build.rs: building the guest init failed ({status}): {cmd:?}");
    }

    let built = target_dir.join(INIT_TARGET).join("release/locald-init");
    let bytes = fs::read(&built)
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: reading {}: {e}", built.display()));
    if let Err(why) = check_static_elf(&bytes) {
        panic!(
            "locald-vmm build.rs: the guest init {} is not a static x86-64 executable: {why}. \
             It must be linked with -C target-feature=+crt-static (glibc static libraries: \
             package libc6-dev).",
            built.display()
        );
    }
    let dest = out_dir.join("locald-init");
    fs::write(&dest, &bytes)
        .unwrap_or_else(|e| panic!("locald-vmm build.rs: writing {}: {e}", dest.display()));
}

/// Checks for a 64-bit little-endian x86-64 ELF executable without a
/// `PT_INTERP` program header (i.e. no dynamic loader needed).
fn check_static_elf(b: &[u8]) -> Result<(), String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if b[4] != 2 || b[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let e_type = u16_at(16);
    if u16_at(18) != 62 {
        return Err("not x86-64".into());
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
         /// patches/*.patch sorted by name, then helper *.sh sorted by name.\n\
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
