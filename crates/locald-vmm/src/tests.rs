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

#[test]
fn disk_names_follow_linux() {
    let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
        .into_iter()
        .map(disk_name)
        .collect();
    assert_eq!(
        names,
        ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa"]
    );
}

#[test]
fn stale_runtime_dirs_of_dead_processes_are_swept() {
    let base = std::env::temp_dir().join(format!("locald-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // A process that has certainly ended: a child we reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let ours = std::process::id();
    for name in [
        format!("vm-{dead}-0"),
        format!("vm-{ours}-7"),
        "vm-1-0".to_string(), // pid 1 is alive
        "other".to_string(),
    ] {
        std::fs::create_dir(base.join(&name)).unwrap();
        std::fs::write(base.join(&name).join("vsock.sock"), b"").unwrap();
    }
    sweep_stale_runtime_dirs(&base);
    let mut left: Vec<String> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "other".to_string(),
            "vm-1-0".to_string(),
            format!("vm-{ours}-7")
        ]
    );
    std::fs::remove_dir_all(&base).unwrap();
}
