//! Errors of the VZ backend. Compiled everywhere (so the lead's error type
//! can wrap it unconditionally); only macOS produces most variants.

use std::path::PathBuf;

use super::plan::PlanError;

/// Why the VZ backend could not create or run a VM.
#[derive(Debug, thiserror::Error)]
pub enum VzError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("Virtualization.framework is not available on this Mac (VZVirtualMachine.isSupported is false: no hardware virtualization, or inside a VM without nested support)")]
    Unsupported,
    #[error("the macOS backend needs macOS 12.3 or later (disk caching and sync modes, block device serials, the generic platform)")]
    MacOsTooOld,
    #[error("Rosetta for Linux is {0} on this Mac (install it with `softwareupdate --install-rosetta`, or leave out --rosetta)")]
    Rosetta(&'static str),
    #[error("disk {}: {msg}", .path.display())]
    Disk { path: PathBuf, msg: String },
    #[error("{what} {}: not a valid path for a file URL", .path.display())]
    Url { what: &'static str, path: PathBuf },
    #[error("network MAC {0} was refused by VZMACAddress")]
    Mac(String),
    #[error("Virtualization.framework rejected the configuration: {0} (is the binary signed with the com.apple.security.virtualization entitlement? see docs/macos.md)")]
    Invalid(String),
    #[error("the VM did not start: {0}")]
    Start(String),
    #[error("the VM failed: {0}")]
    Failed(String),
    #[error("vsock bridge: {0}")]
    Bridge(std::io::Error),
    #[error("console: {0}")]
    Console(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let e = VzError::Invalid("invalid memory size".into()).to_string();
        assert!(e.contains("entitlement"), "{e}");
        let e = VzError::Rosetta("not installed").to_string();
        assert!(e.contains("softwareupdate"), "{e}");
        let e: VzError = PlanError::Profile.into();
        assert!(e.to_string().contains("--profile-guest"), "{e}");
    }
}
