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
