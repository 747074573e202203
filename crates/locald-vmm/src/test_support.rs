//! The one way a test skips (see docs/testing.md, "Skips and strict
//! mode"). libtest hides the output of passing tests, so a skipped test
//! would just say `ok`; [`skip`] makes every skip visible and countable:
//! - it prints `SKIPPED: <test>: <reason>` to stderr (with
//!   ` [allowed in strict mode]` after a [`Why::HostLacks`] reason);
//! - it appends that line to the file named by `LOCALD_VMM_SKIP_LOG`
//!   (`scripts/test.sh` sets it and prints the count at the end);
//! - in strict mode (`LOCALD_VMM_TEST_STRICT=1`, set by `scripts/test.sh
//!   --strict` and in CI) it panics unless the reason is one CI cannot
//!   provide ([`Why::HostLacks`]): there a missing `/dev/kvm`, root or tool
//!   is a broken CI machine, not a reason to pass.
//!
//! Used by the library's unit tests (`crate::test_support`) and included
//! with `#[path]` by the integration-test helpers of `locald-vmm`
//! (`tests/kvm_common`) and `locald-vmm-cli` (`tests/common`), so all
//! three behave the same. Needs only `std`.

#![allow(dead_code)] // each includer uses its own subset

use std::io::Write;

/// Why a test could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why<'a> {
    /// `/dev/kvm` is absent. Not allowed in strict mode (CI has KVM).
    NoKvm,
    /// The test needs root (or a capability only root has, named here).
    /// Not allowed in strict mode (CI runs as root).
    NotRoot(&'a str),
    /// A host tool or device that `scripts/setup-host.sh` installs is
    /// missing (named here). Not allowed in strict mode.
    Missing(&'a str),
    /// A property of the host that no package provides (for example a
    /// file system that cannot punch holes). Allowed in strict mode, still
    /// printed and counted.
    HostLacks(&'a str),
}

impl Why<'_> {
    /// True if strict mode accepts this reason.
    pub fn allowed_in_strict_mode(&self) -> bool {
        matches!(self, Why::HostLacks(_))
    }

    fn text(&self) -> String {
        match self {
            Why::NoKvm => "/dev/kvm not present".to_string(),
            Why::NotRoot(what) => format!("needs root ({what})"),
            Why::Missing(what) => format!("{what} not present"),
            Why::HostLacks(what) => format!("host lacks {what}"),
        }
    }
}

/// True if `LOCALD_VMM_TEST_STRICT` is set to anything but empty or `0`.
pub fn strict() -> bool {
    std::env::var("LOCALD_VMM_TEST_STRICT").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The running test as `<test binary>::<test name>` (libtest names each
/// test's thread after the test).
fn test_name() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // Cargo names test binaries `<name>-<16 hex digits>`.
    let bin = match exe.rsplit_once('-') {
        Some((b, h)) if h.len() == 16 && h.bytes().all(|c| c.is_ascii_hexdigit()) => b,
        _ => exe.as_str(),
    };
    let thread = std::thread::current();
    format!("{bin}::{}", thread.name().unwrap_or("?"))
}

/// Records that the current test is skipped for `why` (see the module
/// docs). The caller returns right after; in strict mode this panics for a
/// reason CI must not have.
pub fn skip(why: Why<'_>) {
    let tag = if why.allowed_in_strict_mode() {
        " [allowed in strict mode]"
    } else {
        ""
    };
    let line = format!("SKIPPED: {}: {}{tag}", test_name(), why.text());
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("LOCALD_VMM_SKIP_LOG").filter(|l| !l.is_empty()) {
        // One short O_APPEND write per line: lines from parallel tests and
        // test binaries do not interleave.
        let written = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            panic!("cannot append to LOCALD_VMM_SKIP_LOG {log:?}: {e}");
        }
    }
    if strict() && !why.allowed_in_strict_mode() {
        panic!(
            "{line}: not allowed in strict mode (LOCALD_VMM_TEST_STRICT is set; \
             CI must provide this)"
        );
    }
}

/// True if the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    (unsafe { geteuid() }) == 0
}

extern "C" {
    fn geteuid() -> u32;
}
