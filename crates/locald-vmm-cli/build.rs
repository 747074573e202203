//! Build script of the `locald-vmm` binary: link options only (runs at
//! build time, on the build host).
//!
//! `-z pack-relative-relocs` stores the binary's relative relocations in
//! the compact DT_RELR form (glibc 2.36+, binutils 2.38+): the dynamic
//! loader then reads a few kilobytes of relocations at start instead of
//! about half a megabyte, which lowers the VMM's start-up time and peak
//! RSS. Position independence (ASLR) is kept. Only used where the linker
//! and C library support it (see `relr_supported`), in native builds.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    // The checks below look at the build host's tools: native builds only.
    if target == host && target.ends_with("-linux-gnu") && relr_supported() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the system linker accepts `-z pack-relative-relocs` and the
/// C library understands DT_RELR (glibc >= 2.36 marks its loader with
/// the GLIBC_ABI_DT_RELR version, which such binaries require).
fn relr_supported() -> bool {
    let ld_ok = std::process::Command::new("ld")
        .args(["-z", "pack-relative-relocs", "--version"])
        .output()
        .is_ok_and(|o| o.status.success() && o.stderr.is_empty());
    let libc_ok = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            let ver = v.trim().strip_prefix("glibc ")?.to_string();
            let mut it = ver.split('.').map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .is_some_and(|(maj, min)| (maj, min) >= (2, 36));
    ld_ok && libc_ok
}
