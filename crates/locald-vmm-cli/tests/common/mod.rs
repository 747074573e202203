//! Helpers shared by the CLI's integration tests (each test binary
//! includes this with `mod common;` and uses what it needs): the tiny
//! guests of `guests/`, the one skip function and the `/dev/kvm` check,
//! host tools, and the runtime directory rule. Runs on the test's own thread.

#![allow(dead_code)] // each test binary uses its own subset

#[allow(dead_code)] // only build_all/spec are used
#[path = "../../../test-guests/src/builder.rs"]
mod builder;

/// The one skip function (`skip(Why::..)`): prints, logs to
/// `LOCALD_VMM_SKIP_LOG`, panics in strict mode; see docs/testing.md.
#[path = "../../../locald-vmm/src/test_support.rs"]
pub mod skips;
#[allow(unused_imports)] // each test binary uses its own subset
pub use skips::{is_root, skip, Why};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Exit code for a VMM-side failure.
pub const VMM_ERROR: i32 = 125;

/// Path of the tiny guest `name`, building all of them on first use.
pub fn guest(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-guests");
        builder::build_all(&guests, &out).unwrap_or_else(|e| panic!("building test guests: {e}"));
        out
    });
    assert!(builder::spec(name).is_some(), "unknown guest {name}");
    dir.join(name)
}

/// True if `/dev/kvm` exists; otherwise records the skip ([`skip`]; a
/// failure in strict mode).
pub fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    skip(Why::NoKvm);
    false
}

/// Runs a host tool and returns its stdout; panics with its stderr.
pub fn host(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The runtime directory named VMs live in (same rule as the library).
pub fn runtime_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("locald-vmm"),
        _ => PathBuf::from(format!(
            "/tmp/locald-vmm-{}",
            String::from_utf8_lossy(&Command::new("id").arg("-u").output().unwrap().stdout).trim()
        )),
    }
}
