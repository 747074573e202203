//! The default guest's static busybox: the host's `/bin/busybox` when it
//! is static and of the guest's architecture, else Debian's
//! `busybox-static` package for that architecture, downloaded and unpacked
//! into the cache. Runs on the caller's thread.

use super::*;

/// Returns a static busybox: [`HOST_BUSYBOX`] if it is a static ELF, else a
/// cached `busybox-<version>/busybox`, else Debian's `busybox-static`
/// fetched with `apt-get download` + `dpkg -x` (needs `apt-get update` to
/// have run once). The x86_64 guest's; see [`busybox_for`].
pub fn busybox() -> Result<PathBuf, AssetError> {
    busybox_for(GuestArch::X86_64)
}

/// [`busybox`] for the guest architecture `arch`: [`HOST_BUSYBOX`] if it is
/// a static ELF for that machine, else the cached copy, else Debian's
/// `busybox-static` for that architecture (`busybox-static:arm64` for
/// aarch64, which needs `dpkg --add-architecture arm64` and `apt-get
/// update` once; `scripts/setup-host.sh` does both), cached in
/// `busybox-aarch64-<version>/`.
pub fn busybox_for(arch: GuestArch) -> Result<PathBuf, AssetError> {
    busybox_in(&trusted_cache_dir()?, Path::new(HOST_BUSYBOX), arch)
}

pub(super) fn is_static_file(arch: GuestArch, p: &Path) -> bool {
    fs::read(p).is_ok_and(|b| check_static_elf_for(arch, &b).is_ok())
}

/// Prefix of the cached busybox directories of `arch` (before the version).
pub(super) fn busybox_dir_prefix(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "busybox-",
        GuestArch::Aarch64 => "busybox-aarch64-",
    }
}

/// Debian's architecture name (`dpkg --print-architecture`) of `arch`.
pub const fn debian_arch(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "amd64",
        GuestArch::Aarch64 => "arm64",
    }
}

pub(super) fn busybox_in(
    cache: &Path,
    host: &Path,
    arch: GuestArch,
) -> Result<PathBuf, AssetError> {
    if is_static_file(arch, host) {
        return Ok(host.to_owned());
    }
    let prefix = busybox_dir_prefix(arch);
    if let Ok(rd) = fs::read_dir(cache) {
        let mut cached: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path().join("busybox"))
            .filter(|p| is_static_file(arch, p))
            .collect();
        cached.sort();
        if let Some(p) = cached.pop() {
            return Ok(p);
        }
    }

    // x86_64 keeps the plain package name (the host's architecture on the
    // x86_64 hosts this has always run on).
    let package = match arch {
        GuestArch::X86_64 => "busybox-static".to_owned(),
        _ => format!("busybox-static:{}", debian_arch(arch)),
    };
    let work = TempDir::new_in(cache, "busybox")?;
    let hint = match arch {
        GuestArch::X86_64 => "a Debian-based host with apt-get; run `apt-get update` first",
        GuestArch::Aarch64 => {
            "a Debian-based host with apt-get and the arm64 architecture: \
             `dpkg --add-architecture arm64 && apt-get update` (scripts/setup-host.sh does it)"
        }
    };
    let mut download = Command::new("apt-get");
    download.args(["download", &package]).current_dir(&work.0);
    // apt drops privileges to _apt, which cannot write into root's cache.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        download.args(["-o", "APT::Sandbox::User=root"]);
    }
    run_captured(&mut download, hint)?;
    let deb = fs::read_dir(&work.0)
        .map_err(io_err("listing", &work.0))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| AssetError::Missing {
            path: work.0.join("busybox-static_*.deb"),
            step: format!("apt-get download {package}"),
        })?;
    let version = deb_version(&deb.file_name().unwrap_or_default().to_string_lossy());
    let root = work.0.join("root");
    run_captured(
        Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        "dpkg (Debian-based host)",
    )?;
    let found = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| AssetError::Missing {
            path: root.join("bin/busybox"),
            step: format!("dpkg -x {}", deb.display()),
        })?;
    let bytes = read_static_elf(arch, &found)?;
    let dest_dir = cache.join(format!("{prefix}{version}"));
    create_dir_all(&dest_dir)?;
    let dest = dest_dir.join("busybox");
    write_atomic(&dest, &bytes, 0o755)?;
    Ok(dest)
}

/// Version part of a `.deb` file name (`busybox-static_1%3a1.35.0-4_amd64.deb`
/// → `1.35.0-4` with the epoch dropped), made safe for a directory name.
pub(super) fn deb_version(file_name: &str) -> String {
    let v = file_name.split('_').nth(1).unwrap_or("unknown");
    let v = v.rsplit_once("%3a").map_or(v, |(_, rest)| rest);
    let v = v.rsplit_once(':').map_or(v, |(_, rest)| rest);
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+.-~".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
