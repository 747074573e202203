//! Per-VM runtime directories: a private directory for a VM's sockets
//! (the vsock socket, the agent's readiness socket, the per-run initrd on
//! backends that take one as a file), removed when the VM is dropped, and
//! the sweep of those left by VMMs that were killed. Runs on the caller's
//! thread while a VM is built, and wherever the VM is dropped.

use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::hostdir;

/// Where per-VM sockets live: `$XDG_RUNTIME_DIR/locald-vmm`, else
/// `<tmp>/locald-vmm-<euid>` (`<tmp>` is `$TMPDIR` or `/tmp`). Kept short:
/// Unix socket paths are limited to 107 bytes. Only the path: use it
/// through [`hostdir::runtime_dir`], which checks every level of it.
pub fn runtime_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("locald-vmm"),
        _ => std::env::temp_dir().join(format!("locald-vmm-{}", hostdir::euid())),
    }
}

/// A private directory for a VM's sockets, removed when the VM is dropped:
/// `$XDG_RUNTIME_DIR/locald-vmm/vm-<pid>-<n>` or
/// `/tmp/locald-vmm-<uid>/vm-<pid>-<n>` (mode 0700).
pub(crate) struct RuntimeDir(pub(crate) PathBuf);

impl RuntimeDir {
    pub(crate) fn new() -> Result<Self, Error> {
        use std::os::unix::fs::DirBuilderExt;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let base = hostdir::ensure_private_dir(&runtime_base())?;
        sweep_stale_runtime_dirs(&base);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("vm-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(RuntimeDir(dir))
    }
}

/// Removes `vm-<pid>-<n>` directories under `base` whose process is gone
/// (a VMM killed with SIGKILL cannot remove its own). A reused pid keeps
/// its directory until that process ends too, which is harmless.
fn sweep_stale_runtime_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vm-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid <= 0 || pid as u32 == std::process::id() {
            continue;
        }
        // SAFETY: signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
