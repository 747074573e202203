//! Unit tests of the library's top level (command-line assembly).

use super::*;

#[test]
fn compat_cmdline_clears_features_unless_kept() {
    let all = compat_cmdline("");
    assert!(all.starts_with("clearcpuid=erms,fsrm,smap,smep,popcnt,xsave,cx16 "));
    assert!(all.ends_with(COMPAT_CMDLINE));
    let some = compat_cmdline("popcnt, smap");
    assert!(
        some.starts_with("clearcpuid=erms,fsrm,smep,xsave,cx16 "),
        "{some}"
    );
    let none = compat_cmdline(&COMPAT_CLEARCPUID.join(","));
    assert_eq!(none, COMPAT_CMDLINE);
}

#[test]
fn guest_cmdline_adds_default_guest_and_compat_parts() {
    assert_eq!(guest_cmdline(false, None), BASE_CMDLINE);
    assert_eq!(
        guest_cmdline(true, None),
        format!("{BASE_CMDLINE} {DEFAULT_GUEST_CMDLINE}")
    );
    // Another kernel gets only the upstream switches.
    assert_eq!(
        guest_cmdline(false, Some("popcnt")),
        format!("{BASE_CMDLINE} {}", compat_cmdline("popcnt"))
    );
    assert!(!guest_cmdline(false, Some("")).contains("lean_sysfs"));
    // The default kernel also gets its patches' boot options.
    assert_eq!(
        guest_cmdline(true, Some("")),
        format!(
            "{BASE_CMDLINE} {DEFAULT_GUEST_CMDLINE} {} {COMPAT_DEFAULT_KERNEL_CMDLINE}",
            compat_cmdline("")
        )
    );
    assert!(COMPAT_DEFAULT_KERNEL_CMDLINE.contains("initramfs_early=on"));
}
