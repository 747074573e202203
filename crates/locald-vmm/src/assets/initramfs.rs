//! The default initramfs: the embedded guest init and busybox as an
//! uncompressed newc archive, cached by a hash over both. Runs on the
//! caller's thread.

use super::*;

/// Base directories of the initramfs and their modes.
pub(super) const BASE_DIRS: &[(&str, u32)] = &[
    (".locald", 0o755),
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
];

pub(super) const ETC_PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n";
pub(super) const ETC_GROUP: &[u8] = b"root:x:0:\ntty:x:5:\n";

/// Content hash naming `initramfs-<hash>.cpio`: first 16 hex digits of
/// sha256(layout tag ‖ len(init) as u64 LE ‖ init ‖ busybox).
pub fn initramfs_hash(init: &[u8], busybox: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(INITRAMFS_LAYOUT);
    h.update((init.len() as u64).to_le_bytes());
    h.update(init);
    h.update(busybox);
    hex16(&h.finalize())
}

/// Returns the default initramfs (uncompressed newc), assembling it on first
/// use: `/init` (the embedded locald-init), `/bin/busybox`, symlinks for
/// [`CORE_APPLETS`], the list of all applets in [`APPLET_LIST`], the base
/// directories, `/dev/console`, `/dev/null` and a
/// minimal `/etc/passwd` and `/etc/group`.
pub fn default_initramfs() -> Result<PathBuf, AssetError> {
    default_initramfs_for(GuestArch::X86_64)
}

/// [`default_initramfs`] of the guest architecture `arch`: its embedded
/// init ([`init_binary_for`]) and busybox ([`busybox_for`]). The applet
/// list of a busybox this host cannot run (another architecture) is read
/// from the binary itself ([`applets_from_binary`]).
pub fn default_initramfs_for(arch: GuestArch) -> Result<PathBuf, AssetError> {
    let init = init_binary_for(arch)?;
    let cache = trusted_cache_dir()?;
    let bb = busybox_in(&cache, Path::new(HOST_BUSYBOX), arch)?;
    initramfs_in_for(&cache, arch, init, &bb)
}

/// [`default_initramfs`] for an explicit cache, init and busybox path.
#[cfg(test)]
pub(super) fn initramfs_in(
    cache: &Path,
    init: &[u8],
    busybox: &Path,
) -> Result<PathBuf, AssetError> {
    initramfs_in_for(cache, GuestArch::X86_64, init, busybox)
}

/// [`default_initramfs_for`] for an explicit cache, init and busybox path.
pub(super) fn initramfs_in_for(
    cache: &Path,
    arch: GuestArch,
    init: &[u8],
    busybox: &Path,
) -> Result<PathBuf, AssetError> {
    let bb = read_static_elf(arch, busybox)?;
    let path = cache.join(format!("initramfs-{}.cpio", initramfs_hash(init, &bb)));
    if path.is_file() {
        return Ok(path);
    }
    let applets = if arch == GuestArch::host() {
        applet_list(busybox)?
    } else {
        applets_from_binary(&bb).ok_or_else(|| AssetError::BadOutput {
            command: format!("reading the applet names of {}", busybox.display()),
            detail: "no busybox applet name table (\"[\\0[[\\0…\") found".into(),
        })?
    };
    write_initramfs(&path, init, &bb, &applets)?;
    Ok(path)
}

/// The applets of a busybox binary, read from its `applet_names` table (the
/// NUL-separated, sorted names starting `"[\0[[\0"` and ending with an
/// empty name), for a busybox this host cannot run. Returned as install
/// paths like [`applet_list`]'s, which only the names matter of:
/// [`CORE_APPLETS`] get their real path, every other name `bin/<name>`.
/// `None` if the table is not found or does not contain `sh`.
pub fn applets_from_binary(bin: &[u8]) -> Option<Vec<String>> {
    const START: &[u8] = b"\0[\0[[\0";
    let at = bin.windows(START.len()).position(|w| w == START)? + 1;
    let mut names: Vec<&str> = Vec::new();
    for raw in bin[at..].split(|&b| b == 0) {
        if raw.is_empty() {
            break;
        }
        let name = std::str::from_utf8(raw).ok()?;
        let plausible = name.len() <= 64
            && name.bytes().all(|c| c.is_ascii_graphic() && c != b'/')
            && names.last().is_none_or(|prev| *prev < name);
        if !plausible || names.len() >= 4096 {
            return None;
        }
        names.push(name);
    }
    if !names.contains(&"sh") {
        return None;
    }
    Some(
        names
            .iter()
            .map(|n| {
                CORE_APPLETS
                    .iter()
                    .find(|c| c.rsplit('/').next() == Some(*n))
                    .map_or_else(|| format!("bin/{n}"), |c| (*c).to_owned())
            })
            .collect(),
    )
}

pub(super) fn write_initramfs(
    path: &Path,
    init: &[u8],
    busybox: &[u8],
    applets: &[String],
) -> Result<(), AssetError> {
    let archive = assemble_initramfs(init, busybox, applets)?;
    if let Some(parent) = path.parent() {
        create_dir_all(parent)?;
    }
    write_atomic(path, &archive, 0o644)
}

/// Runs `busybox --list-full` and returns the applet paths (relative, e.g.
/// `bin/sh`, `usr/bin/[`).
pub(super) fn applet_list(busybox: &Path) -> Result<Vec<String>, AssetError> {
    let mut cmd = Command::new(busybox);
    cmd.arg("--list-full");
    let out = run_captured(&mut cmd, "a static busybox")?;
    let text = String::from_utf8(out).map_err(|_| AssetError::BadOutput {
        command: describe(&cmd),
        detail: "not UTF-8".into(),
    })?;
    let applets: Vec<String> = text
        .lines()
        .map(|l| l.trim().trim_start_matches('/'))
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(bad) = applets
        .iter()
        .find(|a| a.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
    {
        return Err(AssetError::BadOutput {
            command: describe(&cmd),
            detail: format!("bad applet path {bad:?}"),
        });
    }
    if !applets.iter().any(|a| a == "bin/sh") {
        return Err(AssetError::BadOutput {
            command: describe(&cmd),
            detail: "no bin/sh applet".into(),
        });
    }
    Ok(applets)
}

/// Builds the initramfs archive (pure). Directories come first, parents
/// before children; applets that would replace `/init` or `/bin/busybox`
/// are skipped.
pub(super) fn assemble_initramfs(
    init: &[u8],
    busybox: &[u8],
    applets: &[String],
) -> Result<Vec<u8>, AssetError> {
    let cpio = |source| AssetError::Cpio {
        archive: "initramfs",
        source,
    };
    let mut dirs: BTreeSet<String> = BASE_DIRS.iter().map(|(d, _)| (*d).to_owned()).collect();
    for a in applets {
        let mut parent = Path::new(a).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
    }
    let mut b = CpioBuilder::new();
    // BTreeSet order puts "usr" before "usr/bin": parents first.
    for d in &dirs {
        let mode = BASE_DIRS
            .iter()
            .find(|(n, _)| n == d)
            .map_or(0o755, |(_, m)| *m);
        b.dir(d, mode).map_err(cpio)?;
    }
    b.char_dev("dev/console", 0o600, 5, 1).map_err(cpio)?;
    b.char_dev("dev/null", 0o666, 1, 3).map_err(cpio)?;
    b.file("etc/passwd", 0o644, ETC_PASSWD).map_err(cpio)?;
    b.file("etc/group", 0o644, ETC_GROUP).map_err(cpio)?;
    b.file("init", 0o755, init).map_err(cpio)?;
    b.file("bin/busybox", 0o755, busybox).map_err(cpio)?;
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for a in applets {
        if a == "init" || a == "bin/busybox" || dirs.contains(a) || !seen.insert(a.as_str()) {
            continue;
        }
        if let Some(name) = Path::new(a).file_name() {
            names.insert(name.to_string_lossy().into_owned());
        }
        if CORE_APPLETS.contains(&a.as_str()) {
            b.symlink(a, "/bin/busybox").map_err(cpio)?;
        }
    }
    let list: String = names.iter().map(|n| format!("{n}\n")).collect();
    b.file(APPLET_LIST, 0o644, list.as_bytes()).map_err(cpio)?;
    Ok(b.finish())
}
