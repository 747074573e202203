//! The VZ backend's build stage, behind [`crate::backend::Backend`]: from
//! a resolved [`GuestImage`] to a [`VzVm`]. The framework takes the initrd
//! as a file, so the per-run initramfs (base image + command spec) is
//! written into the VM's private runtime directory (mode 0600). Runs on
//! the caller's thread (build) and the thread in `VirtualMachine::run`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use super::{host_limits, BootImage, PlanOptions, VzPlan, VzVm};
use crate::backend::RunOptions;
use crate::builder::GuestImage;
use crate::config::{GuestArch, VmConfig};
use crate::devices::{Outcome, VmControl};
use crate::error::Error;
use crate::runtime::RuntimeDir;

/// A built Virtualization.framework VM.
pub(crate) struct VzBackend {
    vm: VzVm,
}

impl VzBackend {
    /// Writes the initrd file, plans the devices and creates the VM.
    pub(crate) fn build(
        config: &VmConfig,
        image: &mut GuestImage,
        control: Arc<VmControl>,
        runtime_dir: Option<&RuntimeDir>,
    ) -> Result<Self, Error> {
        let dir = runtime_dir.ok_or(Error::NoRuntimeDir)?;
        let initrd = match image.initrd.take() {
            Some((_, bytes)) => {
                let path = dir.0.join("initrd.cpio");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)?;
                f.write_all(&bytes)?;
                Some(path)
            }
            None => None,
        };
        let boot = BootImage {
            kernel: image.kernel.clone(),
            initrd,
            user_cmdline: config.cmdline.clone(),
        };
        let opts = PlanOptions {
            rosetta: config.rosetta,
            default_kernel: image.default_kernel,
            host_arch: GuestArch::host(),
            ..PlanOptions::default()
        };
        let plan =
            VzPlan::new(config, boot, &opts, &host_limits()).map_err(super::VzError::from)?;
        let vm = VzVm::new(&plan, control)?;
        Ok(VzBackend { vm })
    }

    /// Runs the guest to its end (the stdio console's raw mode is the
    /// caller's; profiling does not exist here and was refused at build).
    pub(crate) fn run(&mut self, opts: &RunOptions) -> Result<Outcome, Error> {
        Ok(Outcome::Status(self.vm.run(opts.timeout)?))
    }
}
