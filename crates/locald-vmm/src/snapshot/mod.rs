//! Snapshots of a running VM: the directory they live in, the state
//! file's envelope ([`format`]), and the errors of saving and restoring.
//! The backend saves and restores the machine itself (KVM:
//! [`crate::kvm::snapshot`]). Runs on the thread that asks for the
//! snapshot or builds the restored VM.
//!
//! A snapshot directory holds two files, both created mode 0600 with
//! `O_EXCL | O_NOFOLLOW` in a directory of ours (mode 0700, created if
//! missing, refused if another user owns it or could write to it):
//! - `state`: the envelope of [`format`] around the saved vCPUs, interrupt
//!   controllers, clock and devices;
//! - `memory`: guest RAM, regions back to back (sparse: all-zero pages are
//!   holes), mapped `MAP_PRIVATE` at restore so pages are read lazily and
//!   copied on write.

pub mod format;

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use format::FormatError;

use crate::hostdir::{self, HostDirError};

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// What happens to the VM once its snapshot is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// It runs on.
    Resume,
    /// It stops (the guest is not told).
    Stop,
}

/// What a snapshot took.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    /// The directory.
    pub dir: PathBuf,
    /// How long the vCPUs were paused.
    pub paused: std::time::Duration,
    /// Bytes of guest memory written (all-zero pages are skipped).
    pub memory_written: u64,
    /// Size of the state file.
    pub state_bytes: u64,
}

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Dir(#[from] HostDirError),
    #[error("snapshot {what} {}: {err}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("snapshot directory {} is not empty: give a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("refusing snapshot file {}: {problem}", .path.display())]
    Untrusted { path: PathBuf, problem: String },
    #[error("the VM is not running")]
    NotRunning,
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(std::time::Duration),
    #[error("cannot snapshot: {0}")]
    Unsupported(String),
    #[cfg(target_os = "linux")]
    #[error("KVM: {what} failed: {err}")]
    Kvm {
        what: &'static str,
        err: vmm_sys_util::errno::Error,
    },
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Workers(#[from] crate::devices::virtio::worker::PauseTimeout),
    #[cfg(target_os = "linux")]
    #[error("snapshot device state: {0}")]
    Device(#[from] crate::devices::virtio::persist::PersistError),
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Serial(#[from] crate::devices::serial::SerialRestoreError),
    #[error(
        "the snapshot was taken on another host: {0}; snapshots restore only where the CPU features, TSC rate and KVM capabilities match"
    )]
    ForeignHost(String),
    #[error("the snapshot does not match this VM: {0}")]
    Mismatch(String),
    #[error("guest memory of the snapshot: {0}")]
    Memory(String),
}

#[cfg(target_os = "linux")]
impl SnapshotError {
    /// Wraps a KVM ioctl failure with what we were doing.
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Self {
        move |err| SnapshotError::Kvm { what, err }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |err| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        err,
    }
}

/// The vCPU count and memory size (MiB) of the snapshot in `dir`, for a
/// restore that takes its machine from the snapshot.
pub fn machine_of(dir: &Path) -> Result<(u8, u64), SnapshotError> {
    #[cfg(target_os = "linux")]
    return crate::kvm::machine_of(dir);
    #[cfg(not(target_os = "linux"))]
    Err(SnapshotError::Unsupported(format!(
        "{}: snapshots are restored by the KVM backend only",
        dir.display()
    )))
}

/// Makes `dir` a private directory of ours (created 0700 where missing,
/// see [`hostdir`]) and checks that it holds no snapshot yet. Returns the
/// resolved path.
pub fn prepare_dir(dir: &Path) -> Result<PathBuf, SnapshotError> {
    let dir = hostdir::ensure_private_dir(dir)?;
    let mut entries = std::fs::read_dir(&dir).map_err(io_err("reading directory", &dir))?;
    if entries.next().is_some() {
        return Err(SnapshotError::NotEmpty(dir));
    }
    Ok(dir)
}

/// Creates `dir/name` for writing: mode 0600, `O_EXCL | O_NOFOLLOW`.
pub fn create_file(dir: &Path, name: &str) -> Result<File, SnapshotError> {
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err("creating", &path))
}

/// Opens the snapshot file `dir/name` for reading, after checking that
/// `dir` is a private directory of ours and the file is a regular file of
/// ours (no symlink) that nobody else can write.
pub fn open_file(dir: &Path, name: &str) -> Result<File, SnapshotError> {
    let dir = hostdir::check_private_dir(dir)?.ok_or_else(|| SnapshotError::Io {
        what: "opening",
        path: dir.to_path_buf(),
        err: io::Error::from(io::ErrorKind::NotFound),
    })?;
    let path = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => SnapshotError::Untrusted {
                path: path.clone(),
                problem: "a symlink".into(),
            },
            _ => SnapshotError::Io {
                what: "opening",
                path: path.clone(),
                err,
            },
        })?;
    let m = f.metadata().map_err(io_err("examining", &path))?;
    let problem = if !m.is_file() {
        Some("not a regular file".to_string())
    } else if m.uid() != hostdir::euid() {
        Some(format!("owned by uid {}, not by you", m.uid()))
    } else if m.permissions().mode() & 0o022 != 0 {
        Some(format!(
            "writable by others (mode {:o})",
            m.permissions().mode() & 0o777
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(SnapshotError::Untrusted { path, problem }),
        None => Ok(f),
    }
}

/// Reads the state file of the snapshot in `dir` (checked as in
/// [`open_file`]), at most the format's limit.
pub fn read_state(dir: &Path) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read;
    let f = open_file(dir, STATE_FILE)?;
    let mut bytes = Vec::new();
    f.take(format::MAX_BODY + format::HEADER as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", &dir.join(STATE_FILE)))?;
    Ok(bytes)
}

/// Writes `bytes` as the state file of `dir` and syncs it and the
/// directory.
pub fn write_state(dir: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    let path = dir.join(STATE_FILE);
    let mut f = create_file(dir, STATE_FILE)?;
    f.write_all(bytes).map_err(io_err("writing", &path))?;
    f.sync_all().map_err(io_err("syncing", &path))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "locald-snap-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn files_are_private_and_never_reused() {
        let d = tmp("files");
        let dir = prepare_dir(&d).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        write_state(&dir, b"x").unwrap();
        let m = std::fs::metadata(dir.join(STATE_FILE)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // A second snapshot into the same directory is refused.
        assert!(matches!(prepare_dir(&dir), Err(SnapshotError::NotEmpty(_))));
        assert!(create_file(&dir, STATE_FILE).is_err());
        assert_eq!(read_state(&dir).unwrap(), b"x");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn symlinks_and_loose_modes_are_refused() {
        let d = tmp("links");
        let dir = prepare_dir(&d).unwrap();
        let target = dir.join("elsewhere");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, dir.join(STATE_FILE)).unwrap();
        assert!(matches!(
            read_state(&dir),
            Err(SnapshotError::Untrusted { .. })
        ));
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        std::fs::write(dir.join(STATE_FILE), b"x").unwrap();
        std::fs::set_permissions(dir.join(STATE_FILE), PermissionsExt::from_mode(0o666)).unwrap();
        assert!(matches!(
            read_state(&dir),
            Err(SnapshotError::Untrusted { .. })
        ));
        // A directory others can write to is refused before any file.
        std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o777)).unwrap();
        assert!(matches!(read_state(&dir), Err(SnapshotError::Dir(_))));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
