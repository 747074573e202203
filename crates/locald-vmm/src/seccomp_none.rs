//! Thread spawning on platforms without seccomp (macOS): the same API as
//! the Linux `seccomp` module, so shared code (publishing, the agent's
//! stdin thread, the CLI's signal thread) starts threads one way. No
//! filter is ever installed; [`check`] and [`install`] succeed. Runs on
//! whichever thread calls it.

use std::thread::JoinHandle;

/// Exit status the Linux module uses for a filter violation (never
/// produced here; kept so callers compile unchanged).
pub const EXIT_CODE: i32 = 128 + 31;

/// Seccomp setup failures (none can happen here).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Never constructed on this platform.
    #[error("seccomp is not available on this platform")]
    Unsupported,
}

/// The kinds of thread the Linux module filters (see its docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The VMM's own thread.
    Main,
    /// Console input, published ports, agent stdin, signal handling.
    Control,
}

/// Always succeeds: there is nothing to check.
pub fn check() -> Result<(), SeccompError> {
    Ok(())
}

/// Whether the calling thread is filtered: never here.
pub fn is_filtered() -> bool {
    false
}

/// Does nothing: there is no filter to install.
pub fn install(_kind: ThreadKind, _name: &str) -> Result<(), SeccompError> {
    Ok(())
}

/// Starts a thread named `name` running `f` (`kind` is ignored).
pub fn spawn<F, T>(name: String, _kind: Option<ThreadKind>, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new().name(name).spawn(f)
}

/// Like [`spawn`].
pub fn spawn_inherit<F, T>(name: String, _kind: ThreadKind, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn(name, None, f)
}
