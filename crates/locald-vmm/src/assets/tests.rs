//! Tests of the default-guest assets: cache paths, kernel keys, busybox
//! lookup, initramfs assembly and command archives (no network, no VM).

use super::*;
use crate::cpio::tests::{host_cpio, parse_all, temp_dir};
use std::collections::HashMap;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
    let m: HashMap<String, OsString> = pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    move |k| m.get(k).cloned()
}

#[test]
fn cache_dir_resolution() {
    let all = [
        ("LOCALD_VMM_CACHE", "/c"),
        ("XDG_CACHE_HOME", "/x"),
        ("HOME", "/h"),
    ];
    assert_eq!(cache_dir_from(env_of(&all)), Path::new("/c"));
    assert_eq!(
        cache_dir_from(env_of(&all[1..])),
        Path::new("/x/locald-vmm")
    );
    assert_eq!(
        cache_dir_from(env_of(&all[2..])),
        Path::new("/h/.cache/locald-vmm")
    );
    assert_eq!(
        cache_dir_from(env_of(&[
            ("LOCALD_VMM_CACHE", ""),
            ("XDG_CACHE_HOME", "rel"),
            ("HOME", "/h")
        ])),
        Path::new("/h/.cache/locald-vmm")
    );
    assert_eq!(
        cache_dir_from(env_of(&[])),
        std::env::temp_dir().join("locald-vmm-cache")
    );
}

fn sha256sum_prefix(data: &[u8], dir: &Path) -> String {
    let f = dir.join("concat");
    fs::write(&f, data).unwrap();
    let out = Command::new("sha256sum").arg(&f).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..16].to_owned()
}

#[test]
fn kernel_key_matches_sha256sum() {
    let dir = temp_dir("key");
    let inputs: &[(&str, &[u8])] = &[
        ("patches/0002-b.patch", b"second patch\n"),
        ("microvm.config", b"CONFIG_PVH=y\n"),
        ("patches/0001-a.patch", b"first patch\n"),
        ("build-kernel.sh", b"#!/bin/bash\necho hi\n"),
    ];
    let concat = b"#!/bin/bash\necho hi\nCONFIG_PVH=y\nfirst patch\nsecond patch\n";
    let key = kernel_key(inputs);
    assert_eq!(key.len(), 16);
    assert_eq!(key, sha256sum_prefix(concat, &dir));
    // Helper scripts are shipped but not hashed.
    let mut with_helper = inputs.to_vec();
    with_helper.push(("hash.sh", b"echo key\n"));
    assert_eq!(kernel_key(&with_helper), key);
    // No patches: just the two files.
    assert_eq!(
        kernel_key(&inputs[1..2]),
        sha256sum_prefix(b"CONFIG_PVH=y\n", &dir)
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn embedded_kernel_inputs_match_files() {
    let names: Vec<&str> = KERNEL_INPUTS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names[..2], ["build-kernel.sh", "microvm.config"]);
    let patches: Vec<&str> = names[2..]
        .iter()
        .copied()
        .filter(|n| n.starts_with("patches/"))
        .collect();
    assert!(patches.iter().all(|p| p.ends_with(".patch")));
    let mut sorted = patches.clone();
    sorted.sort();
    assert_eq!(patches, sorted);
    let rest = &names[2 + patches.len()..];
    let fragments = rest
        .iter()
        .take_while(|n| n.starts_with("microvm-") && n.ends_with(".config"))
        .count();
    if std::env::var_os("LOCALD_VMM_KERNEL_DIR").is_none() {
        assert!(rest[..fragments].contains(&"microvm-aarch64.config"));
    }
    assert!(rest[fragments..]
        .iter()
        .all(|n| n.ends_with(".sh") && !n.contains('/')));
    // Same key as sha256sum over the files on disk, concatenated in order.
    let dir = match std::env::var_os("LOCALD_VMM_KERNEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kernel"),
    };
    let mut concat = Vec::new();
    for n in names.iter().take(2 + patches.len()) {
        concat.extend(fs::read(dir.join(n)).unwrap());
    }
    let tmp = temp_dir("key2");
    assert_eq!(default_kernel_key(), sha256sum_prefix(&concat, &tmp));
    fs::remove_dir_all(&tmp).unwrap();
    // And the kernel engineer's own rule, when shipped.
    if dir.join("hash.sh").is_file() {
        let out = Command::new("bash")
            .arg(dir.join("hash.sh"))
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            default_kernel_key()
        );
    }
}

#[test]
fn kernel_build_runs_script_once() {
    let cache = temp_dir("kernel");
    let script = b"#!/bin/bash\nset -e\nmkdir -p \"$1\"\n\
        test -f microvm.config && test -f patches/0001-x.patch && ./helper.sh\n\
        test \"$LOCALD_VMM_CACHE\" = \"$(dirname \"$1\")\"\n\
        echo built >> \"$(dirname \"$1\")/count\"\n\
        echo vmlinux > \"$1/vmlinux\"; echo map > \"$1/System.map\"; cp microvm.config \"$1/.config\"\n";
    let inputs: &[(&str, &[u8])] = &[
        ("build-kernel.sh", script),
        ("microvm.config", b"CONFIG_X=y\n"),
        ("patches/0001-x.patch", b"p\n"),
        ("helper.sh", b"#!/bin/sh\nexit 0\n"),
    ];
    let k = kernel_in(&cache, inputs).unwrap();
    let dir = cache.join(format!("kernel-{}", kernel_key(inputs)));
    assert_eq!(k.vmlinux, dir.join("vmlinux"));
    assert_eq!(k.system_map, dir.join("System.map"));
    assert_eq!(fs::read(dir.join(".config")).unwrap(), b"CONFIG_X=y\n");
    // Second call is served from the cache.
    assert_eq!(kernel_in(&cache, inputs).unwrap(), k);
    assert_eq!(fs::read_to_string(cache.join("count")).unwrap(), "built\n");
    // Temporary input dirs are cleaned up.
    assert!(!fs::read_dir(&cache).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".tmp")));
    fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn kernel_build_failure_is_reported() {
    let cache = temp_dir("kernel-fail");
    let inputs: &[(&str, &[u8])] = &[("build-kernel.sh", b"exit 3\n"), ("microvm.config", b"")];
    let err = kernel_in(&cache, inputs).unwrap_err();
    assert!(matches!(err, AssetError::CommandFailed { .. }), "{err}");
    assert!(err.to_string().contains("build-kernel.sh"), "{err}");
    let inputs: &[(&str, &[u8])] = &[
        ("build-kernel.sh", b"mkdir -p \"$1\"\n"),
        ("microvm.config", b""),
    ];
    let err = kernel_in(&cache, inputs).unwrap_err();
    assert!(matches!(err, AssetError::Missing { .. }), "{err}");
    fs::remove_dir_all(&cache).unwrap();
}

/// A minimal 64-bit little-endian ELF executable header for `machine`
/// with the given program header types (no segments' contents).
fn fake_elf(machine: u16, ph_types: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; 64 + 56 * ph_types.len()];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    b[56..58].copy_from_slice(&(ph_types.len() as u16).to_le_bytes());
    for (i, t) in ph_types.iter().enumerate() {
        b[64 + 56 * i..68 + 56 * i].copy_from_slice(&t.to_le_bytes());
    }
    b
}

#[test]
fn elf_machine_check_is_per_arch() {
    let x86 = fake_elf(62, &[1]);
    let arm = fake_elf(183, &[1]);
    assert_eq!(check_static_elf_for(GuestArch::X86_64, &x86), Ok(()));
    assert_eq!(check_static_elf_for(GuestArch::Aarch64, &arm), Ok(()));
    assert_eq!(check_static_elf(&x86), Ok(()));
    let err = check_static_elf_for(GuestArch::X86_64, &arm).unwrap_err();
    assert!(err.contains("183") && err.contains("x86_64"), "{err}");
    let err = check_static_elf_for(GuestArch::Aarch64, &x86).unwrap_err();
    assert!(err.contains("62") && err.contains("aarch64"), "{err}");
    assert!(check_static_elf(&arm).is_err());
    // PT_INTERP (3) is rejected for either machine.
    let dynamic = fake_elf(183, &[1, 3]);
    assert!(check_static_elf_for(GuestArch::Aarch64, &dynamic)
        .unwrap_err()
        .contains("PT_INTERP"));
    assert_eq!(elf_machine(GuestArch::X86_64), 62);
    assert_eq!(elf_machine(GuestArch::Aarch64), 183);
}

#[test]
fn embedded_inits_are_static_for_their_machine() {
    assert_eq!(init_binary_for(GuestArch::X86_64).unwrap(), init_binary());
    match init_binary_for(GuestArch::Aarch64) {
        Ok(init) => assert_eq!(check_static_elf_for(GuestArch::Aarch64, init), Ok(())),
        Err(e) => {
            // A build without the cross toolchain: one clear message.
            let msg = e.to_string();
            assert!(msg.contains("aarch64") && msg.contains("install"), "{msg}");
        }
    }
}

#[test]
fn applet_names_are_read_from_the_binary() {
    let mut bin = b"junk\0[\0notsorted\0".to_vec();
    assert_eq!(applets_from_binary(&bin), None, "no table");
    bin.extend_from_slice(b"\x01\0[\0[[\0ash\0cat\0env\0sh\0true\0\0more junk");
    let got = applets_from_binary(&bin).unwrap();
    assert_eq!(
        got,
        [
            "bin/[",
            "bin/[[",
            "bin/ash",
            "bin/cat",
            "usr/bin/env",
            "bin/sh",
            "bin/true"
        ]
    );
    // Unsorted names or no `sh`: not a busybox table.
    assert_eq!(applets_from_binary(b"\0[\0[[\0cat\0ash\0sh\0\0"), None);
    assert_eq!(applets_from_binary(b"\0[\0[[\0cat\0\0"), None);
    // The host's busybox: the same names as `busybox --list`.
    let Ok(host) = fs::read(HOST_BUSYBOX) else {
        return;
    };
    let Ok(out) = Command::new(HOST_BUSYBOX).arg("--list").output() else {
        return;
    };
    let mut want: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    want.sort();
    let mut got: Vec<String> = applets_from_binary(&host)
        .expect("host busybox table")
        .iter()
        .map(|p| p.rsplit('/').next().unwrap().to_owned())
        .collect();
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn kernel_keys_are_per_arch() {
    let inputs: &[(&str, &[u8])] = &[
        ("build-kernel.sh", b"script\n"),
        ("microvm.config", b"x86\n"),
        ("patches/0001-x86-a.patch", b"x86 patch\n"),
        ("patches/0002-mm-b.patch", b"mm patch\n"),
        ("microvm-aarch64.config", b"arm\n"),
        ("hash.sh", b"helper\n"),
    ];
    let dir = temp_dir("key-arch");
    assert_eq!(
        kernel_key_for(GuestArch::X86_64, inputs),
        sha256sum_prefix(b"script\nx86\nx86 patch\nmm patch\n", &dir)
    );
    assert_eq!(
        kernel_key(inputs),
        kernel_key_for(GuestArch::X86_64, inputs)
    );
    assert_eq!(
        kernel_key_for(GuestArch::Aarch64, inputs),
        sha256sum_prefix(b"script\narm\nmm patch\n", &dir)
    );
    assert_eq!(kernel_dir_name(GuestArch::X86_64, "k"), "kernel-k");
    assert_eq!(kernel_dir_name(GuestArch::Aarch64, "k"), "kernel-aarch64-k");
    assert!(kernel_patch_applies(
        GuestArch::Aarch64,
        "patches/0003-mm-x.patch"
    ));
    assert!(!kernel_patch_applies(
        GuestArch::Aarch64,
        "patches/0001-x86-x.patch"
    ));
    assert!(kernel_patch_applies(
        GuestArch::X86_64,
        "patches/0001-x86-x.patch"
    ));
    assert!(!kernel_patch_applies(GuestArch::X86_64, "microvm.config"));
    fs::remove_dir_all(&dir).unwrap();
    // The embedded inputs: hash.sh ARCH prints the same keys.
    let kdir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kernel");
    if std::env::var_os("LOCALD_VMM_KERNEL_DIR").is_none() && kdir.join("hash.sh").is_file() {
        for arch in [GuestArch::X86_64, GuestArch::Aarch64] {
            let out = Command::new("bash")
                .arg(kdir.join("hash.sh"))
                .arg(arch.name())
                .output()
                .unwrap();
            assert!(out.status.success());
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                default_kernel_key_for(arch),
                "{arch}"
            );
        }
    }
}

#[test]
fn aarch64_kernel_build_gets_the_arch_flag() {
    let cache = temp_dir("kernel-arm");
    let script = b"#!/bin/bash\nset -e\ntest \"$1\" = --arch && test \"$2\" = aarch64\n\
        test -f microvm-aarch64.config\n\
        mkdir -p \"$3\"; echo img > \"$3/Image\"; echo map > \"$3/System.map\"\n";
    let inputs: &[(&str, &[u8])] = &[
        ("build-kernel.sh", script),
        ("microvm.config", b"CONFIG_X=y\n"),
        ("microvm-aarch64.config", b"CONFIG_A=y\n"),
    ];
    let k = kernel_in_for(&cache, GuestArch::Aarch64, inputs).unwrap();
    let dir = cache.join(format!(
        "kernel-aarch64-{}",
        kernel_key_for(GuestArch::Aarch64, inputs)
    ));
    assert_eq!(k.vmlinux, dir.join("Image"));
    assert_eq!(k.system_map, dir.join("System.map"));
    assert!(cache
        .join(format!(
            "kernel-aarch64-{}.lock",
            kernel_key_for(GuestArch::Aarch64, inputs)
        ))
        .is_file());
    fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn elf_checks() {
    assert!(
        check_static_elf(init_binary()).is_ok(),
        "embedded init must be static"
    );
    let sh = fs::read("/bin/sh").unwrap();
    assert!(check_static_elf(&sh).unwrap_err().contains("PT_INTERP"));
    assert!(check_static_elf(b"#!/bin/sh\n").is_err());
    assert!(check_static_elf(&[]).is_err());
}

#[test]
fn deb_versions() {
    assert_eq!(
        deb_version("busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"),
        "1.35.0-4+deb12u1+b1"
    );
    assert_eq!(deb_version("busybox-static_1.36.1-9_amd64.deb"), "1.36.1-9");
    assert_eq!(deb_version("weird"), "unknown");
}

#[test]
fn applet_list_from_fake_busybox() {
    let dir = temp_dir("applets");
    let fake = dir.join("busybox");
    fs::write(&fake, "#!/bin/sh\n[ \"$1\" = --list-full ] || exit 9\nprintf 'bin/sh\\nusr/bin/[\\n\\nlinuxrc\\n/sbin/init\\n'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        applet_list(&fake).unwrap(),
        ["bin/sh", "usr/bin/[", "linuxrc", "sbin/init"]
    );
    fs::write(&fake, "#!/bin/sh\necho ../etc/x\necho bin/sh\n").unwrap();
    assert!(matches!(
        applet_list(&fake),
        Err(AssetError::BadOutput { .. })
    ));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn initramfs_assembly_with_fake_busybox() {
    let applets: Vec<String> = [
        "bin/sh",
        "bin/ls",
        "usr/bin/[",
        "opt/x/tool",
        "init",
        "bin/busybox",
        "bin/ls",
    ]
    .map(String::from)
    .to_vec();
    let a = assemble_initramfs(b"INIT", b"BUSYBOX", &applets).unwrap();
    let e = &parse_all(&a)[0];
    let names: Vec<&str> = e.iter().map(|p| p.name.as_str()).collect();
    // Every entry's parent precedes it.
    for (i, n) in names.iter().enumerate() {
        if let Some((parent, _)) = n.rsplit_once('/') {
            let pi = names
                .iter()
                .position(|x| *x == parent)
                .unwrap_or_else(|| panic!("no parent for {n}"));
            assert!(pi < i, "{parent} after {n}");
        }
    }
    let find = |n: &str| {
        e.iter()
            .find(|p| p.name == n)
            .unwrap_or_else(|| panic!("missing {n}"))
    };
    assert_eq!(find("init").data, b"INIT");
    assert_eq!(find("init").mode, 0o100_755);
    assert_eq!(find("bin/busybox").data, b"BUSYBOX");
    assert_eq!(find("bin/sh").data, b"/bin/busybox");
    assert_eq!(find("bin/sh").mode, 0o120_777);
    // Only core applets are linked; all are listed by name, once.
    assert!(e
        .iter()
        .all(|p| p.name != "opt/x/tool" && p.name != "bin/ls"));
    assert_eq!(find(APPLET_LIST).data, b"[\nls\nsh\ntool\n");
    assert_eq!(find("dev/console").rdev, (5, 1));
    assert_eq!(find("dev/console").mode, 0o020_600);
    assert_eq!(find("dev/null").rdev, (1, 3));
    assert_eq!(find("tmp").mode, 0o041_777);
    assert_eq!(find("etc/passwd").data, ETC_PASSWD);
    for d in [".locald", "proc", "sys", "run", "root", "mnt", "usr/sbin"] {
        assert_eq!(find(d).mode & 0o170_000, 0o040_000, "{d}");
    }
    assert_eq!(names.iter().filter(|n| **n == "init").count(), 1);

    // Written atomically under its content hash.
    let cache = temp_dir("initramfs-fake");
    let path = cache.join(format!(
        "initramfs-{}.cpio",
        initramfs_hash(b"INIT", b"BUSYBOX")
    ));
    write_initramfs(&path, b"INIT", b"BUSYBOX", &applets).unwrap();
    assert_eq!(fs::read(&path).unwrap(), a);
    assert_eq!(
        fs::read_dir(&cache).unwrap().count(),
        1,
        "no temp files left"
    );
    fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn initramfs_hash_covers_both_inputs() {
    let h = initramfs_hash(b"a", b"b");
    assert_eq!(h.len(), 16);
    assert_ne!(h, initramfs_hash(b"a", b"c"));
    assert_ne!(h, initramfs_hash(b"c", b"b"));
    assert_ne!(initramfs_hash(b"ab", b""), initramfs_hash(b"a", b"b"));
}

#[test]
fn busybox_rejects_dynamic_host_binary() {
    // A dynamic host binary is not used; with a cached static copy present
    // that copy is returned without any download.
    let cache = temp_dir("bb");
    let cached = cache.join("busybox-1.0/busybox");
    fs::create_dir_all(cached.parent().unwrap()).unwrap();
    fs::write(&cached, init_binary()).unwrap(); // any static ELF will do
    assert_eq!(
        busybox_in(&cache, Path::new("/bin/sh"), GuestArch::X86_64).unwrap(),
        cached
    );
    fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn busybox_cache_is_per_arch() {
    // An x86-64 busybox is never the aarch64 one and the other way round,
    // even when the directory names overlap (`busybox-` is a prefix of
    // `busybox-aarch64-`).
    let cache = temp_dir("bb-arch");
    let x86 = cache.join("busybox-1.0/busybox");
    let arm = cache.join("busybox-aarch64-1.0/busybox");
    for p in [&x86, &arm] {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
    }
    fs::write(&x86, init_binary()).unwrap();
    fs::write(&arm, fake_elf(183, &[])).unwrap();
    let host = Path::new("/nonexistent");
    assert_eq!(busybox_in(&cache, host, GuestArch::X86_64).unwrap(), x86);
    assert_eq!(busybox_in(&cache, host, GuestArch::Aarch64).unwrap(), arm);
    fs::remove_dir_all(&cache).unwrap();
}

/// End to end with the real embedded init and the host's static busybox
/// (skipped when the host has none).
#[test]
fn real_initramfs() {
    if !is_static_file(GuestArch::X86_64, Path::new(HOST_BUSYBOX)) {
        crate::test_support::skip(crate::test_support::Why::Missing(
            "static busybox (busybox-static)",
        ));
        return;
    }
    let cache = temp_dir("initramfs-real");
    let bb = busybox_in(&cache, Path::new(HOST_BUSYBOX), GuestArch::X86_64).unwrap();
    let path = initramfs_in(&cache, init_binary(), &bb).unwrap();
    assert_eq!(initramfs_in(&cache, init_binary(), &bb).unwrap(), path);
    let archive = fs::read(&path).unwrap();
    assert_eq!(archive.len() % 4, 0);

    let listing = host_cpio(&cache, &["-t", "--quiet"], &archive);
    let names: Vec<&str> = listing.lines().collect();
    for n in [
        "init",
        "bin/busybox",
        "bin/sh",
        "dev/console",
        "dev/null",
        "etc/passwd",
        ".locald",
        "tmp",
    ] {
        assert!(names.contains(&n), "{n} missing from cpio -t");
    }
    let x = cache.join("root");
    fs::create_dir(&x).unwrap();
    host_cpio(
        &x,
        &[
            "-i",
            "--quiet",
            "--make-directories",
            "--no-absolute-filenames",
            "--nonmatching",
            "dev/*",
        ],
        &archive,
    );
    assert!(check_static_elf(&fs::read(x.join("init")).unwrap()).is_ok());
    assert!(check_static_elf(&fs::read(x.join("bin/busybox")).unwrap()).is_ok());
    assert_eq!(
        fs::read_link(x.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    // The extracted init refuses to run outside PID 1 (before touching
    // any I/O port) with the documented message and code.
    let out = Command::new(x.join("init")).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "locald-init: refusing to run: not PID 1\n"
    );

    // A command archive appended after it is a second valid archive.
    let mut both = archive.clone();
    both.extend(command_archive(&GuestCommand {
        argv: vec!["true".into()],
        ..Default::default()
    }));
    let archives = parse_all(&both);
    assert_eq!(archives.len(), 2);
    fs::remove_dir_all(&cache).unwrap();
}
