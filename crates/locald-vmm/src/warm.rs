//! Warm starts: `run` and `start` on the default guest restore a cached
//! snapshot of it, taken when its agent first became ready, instead of
//! booting. Runs on the caller's thread ([`plan`]) and on the thread that
//! waits for the agent ([`store`], from `RunningVm::wait_ready`).
//!
//! The cache: `<asset cache>/snapshots/<key>/` (or
//! `$LOCALD_VMM_SNAPSHOT_CACHE/<key>/`), private directories (see
//! [`crate::hostdir`]). The key covers everything that shapes the booted
//! guest: the architecture, the kernel and initramfs files (path, size,
//! modification time), the kernel command line and the software-KVM
//! compatibility path, vCPUs, memory, the device set (vsock, entropy, the
//! number of shares), the guest init's spec (agent mode, environment,
//! working directory) and this VMM's version.
//!
//! The first use boots the guest cold as the snapshot's *template*: its
//! shares are not mounted at boot ([`VmConfig::late_shares`]); once its
//! agent is ready the VM is snapshotted (it runs on), the snapshot is
//! renamed into place, and the agent mounts the shares, exactly as after a
//! restore. Later uses restore it: memory mapped `MAP_PRIVATE`, the shares
//! bound to this run's directories, the guest refreshed (entropy, clock)
//! before any command. A snapshot that no longer restores (another host
//! CPU, a damaged file) is removed and the run boots cold.
//!
//! Options that force a cold boot, and why ([`ColdReason`]): a custom
//! kernel, initrd or command line (not the default guest); disks, a root
//! file system or an OCI image (the guest mounts its root and disks at
//! boot); a network card (the init configures it at boot, and clones
//! would share its MAC); guest profiling; `--cold`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::VmConfig;
use crate::error::Error;
use crate::snapshot::{self, AfterSnapshot, SnapshotError};

/// Why a VM boots cold instead of restoring a warm snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdReason {
    /// `--cold`.
    Asked,
    /// A kernel, initrd or extra command line of the user's.
    CustomGuest,
    /// Disks or a root file system.
    Disks,
    /// An OCI image.
    Image,
    /// A network card.
    Network,
    /// Guest profiling.
    Profiling,
    /// Not the agent's default guest (a command over the serial console).
    NoAgent,
    /// The snapshot cannot be used on this platform.
    Platform,
}

impl std::fmt::Display for ColdReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ColdReason::Asked => "--cold",
            ColdReason::CustomGuest => "a custom kernel, initrd or command line",
            ColdReason::Disks => "disks or a root file system are mounted at boot",
            ColdReason::Image => "an OCI image's root is mounted at boot",
            ColdReason::Network => "the network card is configured at boot",
            ColdReason::Profiling => "guest profiling",
            ColdReason::NoAgent => "no guest agent",
            ColdReason::Platform => "no snapshots on this platform",
        })
    }
}

/// Whether `config` can start warm.
pub fn cold_reason(config: &VmConfig) -> Option<ColdReason> {
    if !cfg!(target_os = "linux") {
        return Some(ColdReason::Platform);
    }
    if config.kernel.is_some() || config.initrd.is_some() || config.cmdline.is_some() {
        return Some(ColdReason::CustomGuest);
    }
    if !config.agent || config.command.is_some() {
        return Some(ColdReason::NoAgent);
    }
    if config.image.is_some() {
        return Some(ColdReason::Image);
    }
    if !config.disks.is_empty() || config.rootfs.is_some() {
        return Some(ColdReason::Disks);
    }
    if config.net.is_some() {
        return Some(ColdReason::Network);
    }
    if config.profile_hz > 0 {
        return Some(ColdReason::Profiling);
    }
    None
}

/// Environment variable naming another directory for warm snapshots
/// (absolute; checked like the default one).
pub const CACHE_ENV: &str = "LOCALD_VMM_SNAPSHOT_CACHE";

/// The directory holding every warm snapshot: `$LOCALD_VMM_SNAPSHOT_CACHE`
/// if set to an absolute path, else `snapshots/` in the asset cache.
pub fn cache_root() -> PathBuf {
    match std::env::var_os(CACHE_ENV).map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => crate::assets::cache_dir().join("snapshots"),
    }
}

fn file_identity(h: &mut Sha256, path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|err| crate::ConfigError::File {
        path: path.to_path_buf(),
        err,
    })?;
    h.update(path.as_os_str().as_encoded_bytes());
    h.update(m.len().to_le_bytes());
    h.update(m.mtime().to_le_bytes());
    h.update(m.mtime_nsec().to_le_bytes());
    Ok(())
}

/// The cache key of `config`'s guest (see the module docs).
pub fn key(config: &VmConfig) -> Result<String, Error> {
    let mut h = Sha256::new();
    h.update(b"locald-vmm warm snapshot\0");
    h.update(env!("CARGO_PKG_VERSION"));
    h.update(snapshot::format::VERSION.to_le_bytes());
    h.update(config.arch.to_string());
    let kernel = crate::assets::default_kernel_for(config.arch)?;
    file_identity(&mut h, &kernel.vmlinux)?;
    file_identity(&mut h, &crate::assets::default_initramfs_for(config.arch)?)?;
    #[cfg(target_os = "linux")]
    let compat = match config.cpu_compat {
        crate::config::CpuCompat::On => true,
        crate::config::CpuCompat::Off => false,
        crate::config::CpuCompat::Auto => crate::kvm::host::software_kvm_reason().is_some(),
    };
    #[cfg(not(target_os = "linux"))]
    let compat = false;
    let keep = std::env::var("LOCALD_VMM_COMPAT_KEEP").unwrap_or_default();
    h.update(crate::guest_cmdline(true, compat.then_some(keep.as_str())));
    h.update([u8::from(compat)]);
    h.update([config.vcpus]);
    h.update(config.memory_mib.to_le_bytes());
    h.update([
        u8::from(config.vsock.is_some() || config.agent),
        u8::from(config.rng),
    ]);
    h.update((config.shares.len() as u64).to_le_bytes());
    let mut template = config.clone();
    template.late_shares = true;
    if let Some(spec) = crate::builder::command_spec(&template, true) {
        h.update(crate::assets::command_archive(&spec));
    }
    let digest = h.finalize();
    Ok(digest[..12].iter().map(|b| format!("{b:02x}")).collect())
}

/// How a VM will start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Restore the warm snapshot in this directory.
    Restore(PathBuf),
    /// Boot cold as the template of the warm snapshot to store here.
    Template(PathBuf),
    /// Boot cold, for this reason.
    Cold(ColdReason),
}

/// Decides how `config` starts and adjusts it for that (a restore, or a
/// template that saves its snapshot at agent-ready).
pub fn plan(config: &mut VmConfig, cold: bool) -> Result<Plan, Error> {
    if cold {
        return Ok(Plan::Cold(ColdReason::Asked));
    }
    if let Some(why) = cold_reason(config) {
        return Ok(Plan::Cold(why));
    }
    let root = crate::hostdir::ensure_private_dir(&cache_root())?;
    let dir = root.join(key(config)?);
    config.late_shares = true;
    if dir.join(snapshot::STATE_FILE).exists() {
        config.restore = Some(dir.clone());
        return Ok(Plan::Restore(dir));
    }
    config.snapshot_at_ready = Some(dir.clone());
    Ok(Plan::Template(dir))
}

/// After a failed restore of a warm snapshot: whether the snapshot itself
/// is at fault (then it is removed and the caller boots cold).
pub fn discard_if_stale(dir: &Path, err: &Error) -> bool {
    let stale = matches!(
        err,
        Error::Snapshot(
            SnapshotError::Format(_)
                | SnapshotError::ForeignHost(_)
                | SnapshotError::Mismatch(_)
                | SnapshotError::Memory(_)
        )
    );
    if stale {
        tracing::warn!(
            "the warm snapshot {} cannot be used ({err}); removing it and booting cold",
            dir.display()
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    stale
}

/// Takes the template's snapshot into a temporary directory next to
/// `dir` (the VM runs on) and renames it into place; when another process
/// stored the same key first, ours is dropped.
pub fn store(vm: &crate::RunningVm, dir: &Path) -> Result<(), Error> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let info = vm.snapshot(&tmp, AfterSnapshot::Resume)?;
    tracing::info!(
        "warm snapshot stored: {} (paused {:?}, {} KiB of memory)",
        dir.display(),
        info.paused,
        info.memory_written >> 10
    );
    if std::fs::rename(&tmp, dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> VmConfig {
        VmConfig {
            agent: true,
            ..VmConfig::default()
        }
    }

    #[test]
    fn options_that_force_a_cold_boot() {
        assert_eq!(cold_reason(&agent()), None);
        let cases: Vec<(VmConfig, ColdReason)> = vec![
            (
                VmConfig {
                    kernel: Some("/k".into()),
                    ..agent()
                },
                ColdReason::CustomGuest,
            ),
            (
                VmConfig {
                    cmdline: Some("x".into()),
                    ..agent()
                },
                ColdReason::CustomGuest,
            ),
            (VmConfig::default(), ColdReason::NoAgent),
            (
                VmConfig {
                    command: Some(vec!["true".into()]),
                    ..agent()
                },
                ColdReason::NoAgent,
            ),
            (
                VmConfig {
                    profile_hz: 10,
                    ..agent()
                },
                ColdReason::Profiling,
            ),
        ];
        for (c, want) in cases {
            assert_eq!(cold_reason(&c), Some(want));
        }
        let mut c = agent();
        assert_eq!(plan(&mut c, true).unwrap(), Plan::Cold(ColdReason::Asked));
        assert!(c.restore.is_none() && c.snapshot_at_ready.is_none());
    }

    #[test]
    fn only_a_snapshots_own_faults_discard_it() {
        let d = std::env::temp_dir().join(format!("locald-warm-discard-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let busy = Error::Snapshot(SnapshotError::NotRunning);
        assert!(!discard_if_stale(&d, &busy));
        assert!(d.exists());
        let bad = Error::Snapshot(SnapshotError::Format(snapshot::FormatError::Checksum));
        assert!(discard_if_stale(&d, &bad));
        assert!(!d.exists());
    }
}
