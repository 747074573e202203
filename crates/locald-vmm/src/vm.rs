//! The VM handles of the public API: [`VirtualMachine`] (built by the
//! stages in [`crate::builder`], run once on the caller's thread or spawned
//! on a `vm` thread), [`RunningVm`] (a spawned VM: agent readiness, `exec`,
//! clean stop) and [`VmStopper`]. Backend-neutral: the platform's backend
//! sits behind [`crate::backend::Backend`]. Runs on the caller's thread;
//! `spawn` adds the `vm` thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, RunOptions};
use crate::builder::{AgentLink, GuestImage};
use crate::config::{ConsoleConfig, VmConfig};
use crate::devices::control::Marker;
use crate::devices::{ExitStatus, Outcome, VmControl};
use crate::error::Error;
use crate::runtime::RuntimeDir;
use crate::{agent, console, seccomp};

/// A configured virtual machine, ready to run once.
pub struct VirtualMachine {
    control: Arc<VmControl>,
    backend: Backend,
    run: RunOptions,
    ran: bool,
    vsock_path: Option<PathBuf>,
    ready: Option<agent::ReadyListener>,
    agent_timeout: Duration,
    image: Option<crate::image::PreparedImage>,
    /// What `wait_ready` sends the guest once it is ready.
    refresh: Option<RefreshPlan>,
    /// Where `wait_ready` stores a warm snapshot at agent-ready.
    snapshot_at_ready: Option<PathBuf>,
    // Dropped last: the sockets inside it go first.
    _runtime_dir: Option<RuntimeDir>,
}

impl VirtualMachine {
    /// Validates `config`, resolves the default guest if needed, and builds
    /// the VM (memory, devices, vCPUs, kernel loaded). Nothing runs yet.
    /// The stages are in [`crate::builder`].
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        config.validate()?;
        Backend::check(&config)?;
        let mut config = config;
        let image = match config.image.clone() {
            Some(run) => {
                let mut progress = crate::image::TerminalProgress::new();
                let img = crate::image::prepare(&run, config.arch, &mut progress)?;
                crate::image::apply(&mut config, &img)?;
                Some(img)
            }
            // A restored guest may get a hostname (no image needed).
            None if config.user.is_some()
                || (config.hostname.is_some() && config.restore.is_none()) =>
            {
                return Err(crate::error::ConfigError::ImageOnly.into())
            }
            None => None,
        };
        // A restore resumes a guest that booted long ago: no image to load.
        let mut guest = match config.restore {
            Some(_) => GuestImage::none(),
            None => GuestImage::resolve(&config)?,
        };
        let mut link = AgentLink::prepare(&mut config, Backend::NEEDS_RUNTIME_DIR)?;
        if config.restore.is_some() {
            // Its agent said it was ready before the snapshot; it listens.
            link.ready = None;
        }
        let refresh = RefreshPlan::of(&config);
        let control = Arc::new(VmControl::new());
        let backend = Backend::build(
            &config,
            &mut guest,
            control.clone(),
            link.runtime_dir.as_ref(),
        )?;
        Ok(VirtualMachine {
            control,
            backend,
            run: RunOptions {
                console: config.console,
                timeout: config.timeout,
                profile_hz: config.profile_hz,
                system_map: guest.system_map,
                seccomp: config.seccomp,
            },
            ran: false,
            vsock_path: link.vsock_path,
            ready: link.ready,
            agent_timeout: config.agent_timeout,
            refresh,
            snapshot_at_ready: config.snapshot_at_ready.clone(),
            image,
            _runtime_dir: link.runtime_dir,
        })
    }

    /// The OCI image this VM boots, if any (its configuration, e.g. the
    /// exposed ports, and its root disk).
    pub fn image(&self) -> Option<&crate::image::PreparedImage> {
        self.image.as_ref()
    }

    /// The host socket of the VM's vsock device, if it has one.
    pub fn vsock_path(&self) -> Option<&Path> {
        self.vsock_path.as_deref()
    }

    /// A handle that snapshots this VM while it runs (KVM only).
    pub fn snapshotter(&self) -> Option<crate::backend::Snapshotter> {
        self.backend.snapshotter()
    }

    /// Starts the VM on a background thread ("vm"), for agent mode: the
    /// caller then waits for the agent, runs commands and stops the VM.
    pub fn spawn(mut self) -> Result<RunningVm, Error> {
        let ready = self.ready.take();
        let vsock = self.vsock_path.clone();
        let control = self.control.clone();
        let agent_timeout = self.agent_timeout;
        let refresh = self.refresh.clone();
        let snapshot_at_ready = self.snapshot_at_ready.clone();
        let kind = self.run.seccomp.then_some(seccomp::ThreadKind::Main);
        let snapshotter = self.snapshotter();
        let thread = seccomp::spawn("vm".into(), kind, move || {
            let r = self.run();
            // Tear the devices down as soon as the guest is gone: the vsock
            // device's host connections close, so a client still reading
            // from one (an `exec` relay, a published port) sees the end
            // instead of waiting forever; disks are flushed.
            drop(self);
            r
        })?;
        Ok(RunningVm {
            snapshotter,
            thread: Some(thread),
            control,
            ready,
            vsock,
            agent_timeout,
            agent_failed: false,
            refresh,
            snapshot_at_ready,
        })
    }

    /// Runs the guest to its end and returns how it ended. A VM runs once.
    pub fn run(&mut self) -> Result<ExitStatus, Error> {
        if self.ran {
            return Err(Error::AlreadyRan);
        }
        self.ran = true;
        let _raw = match self.run.console {
            ConsoleConfig::Stdio => console::RawTerminal::enable(),
            _ => None,
        };
        match self.backend.run(&self.run)? {
            Outcome::Status(s) => Ok(s),
            Outcome::Failed(msg) => Err(Error::Run(msg)),
        }
    }

    /// A handle that stops this VM from another thread (a signal handler
    /// thread, say), before or while it runs.
    pub fn stopper(&self) -> VmStopper {
        VmStopper {
            control: self.control.clone(),
            vsock: self.ready.as_ref().and(self.vsock_path.clone()),
        }
    }

    /// Markers the guest reported (userspace reached, command started…).
    pub fn markers(&self) -> Vec<Marker> {
        self.control.markers()
    }

    /// Instructions the VMM completed because KVM's emulator could not, by
    /// kind (software-KVM hosts only; empty on hardware KVM).
    pub fn emulated_instructions(&self) -> std::collections::HashMap<&'static str, u64> {
        self.backend.emulated()
    }

    /// Whether the software-KVM compatibility path is on for this VM.
    pub fn cpu_compat(&self) -> bool {
        self.backend.cpu_compat()
    }
}

type VmThread = std::thread::JoinHandle<Result<ExitStatus, Error>>;

/// A VM running on a background thread (see [`VirtualMachine::spawn`]).
/// Dropping it stops the VM at once.
pub struct RunningVm {
    snapshotter: Option<crate::backend::Snapshotter>,
    thread: Option<VmThread>,
    control: Arc<VmControl>,
    ready: Option<agent::ReadyListener>,
    vsock: Option<PathBuf>,
    agent_timeout: Duration,
    /// `wait_ready` failed: there is no agent to ask for a clean poweroff.
    agent_failed: bool,
    /// What `wait_ready` sends the guest once it is ready.
    refresh: Option<RefreshPlan>,
    /// Where `wait_ready` stores a warm snapshot at agent-ready.
    snapshot_at_ready: Option<PathBuf>,
}

/// The refresh a guest gets before any command: a restored guest's clone
/// refresh (entropy, clock, hostname) and the shares the agent mounts.
#[derive(Clone, Debug)]
struct RefreshPlan {
    /// Restored: the agent listens already (no readiness call); retry
    /// until it answers.
    restored: bool,
    hostname: Option<String>,
    /// Shares to mount, in the guest spec's format.
    shares: Vec<u8>,
}

impl RefreshPlan {
    fn of(config: &VmConfig) -> Option<Self> {
        let restored = config.restore.is_some();
        if !restored && !config.late_shares {
            return None;
        }
        let shares: Vec<locald_guest_spec::ShareSpec> = config
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| locald_guest_spec::ShareSpec {
                tag: crate::config::ShareConfig::tag(i).into_bytes(),
                path: s.guest_path.as_bytes().to_vec(),
                read_only: s.read_only,
            })
            .collect();
        Some(RefreshPlan {
            restored,
            hostname: if restored {
                config.hostname.clone()
            } else {
                None
            },
            shares: locald_guest_spec::shares::encode(&shares),
        })
    }
}

impl RunningVm {
    /// Pauses the VM, writes its snapshot into `dir` (a new or empty
    /// directory, created private) and resumes it, or stops it with
    /// [`ExitStatus::Snapshotted`]. See [`crate::snapshot`].
    pub fn snapshot(
        &self,
        dir: &Path,
        after: crate::snapshot::AfterSnapshot,
    ) -> Result<crate::snapshot::SnapshotInfo, Error> {
        match &self.snapshotter {
            Some(s) => Ok(s.take(dir, after)?),
            None => Err(crate::snapshot::SnapshotError::Unsupported(
                "this backend takes no snapshots".into(),
            )
            .into()),
        }
    }

    /// Waits until the guest agent is ready to run commands (agent mode).
    ///
    /// A VM restored from a snapshot has an agent that listens already;
    /// here it gets its clone refresh (fresh entropy, the host's clock,
    /// its hostname) before the caller can run anything.
    pub fn wait_ready(&mut self) -> Result<(), Error> {
        let plan = self.refresh.take();
        if let (Some(p), Some(uds)) = (&plan, &self.vsock) {
            if p.restored {
                let control = self.control.clone();
                let r = agent::refresh_restored(
                    uds,
                    p.hostname.as_deref(),
                    &p.shares,
                    self.agent_timeout,
                    || control.status().is_none(),
                );
                self.agent_failed = r.is_err();
                return r.map_err(Error::from);
            }
        }
        self.wait_ready_call()?;
        if let Some(dir) = self.snapshot_at_ready.take() {
            // A warm snapshot that fails to store costs only its speed.
            if let Err(e) = crate::warm::store(self, &dir) {
                tracing::warn!("could not store the warm snapshot {}: {e}", dir.display());
            }
        }
        if let (Some(p), Some(uds)) = (plan, &self.vsock) {
            let r = agent::refresh_now(p.hostname.as_deref(), &p.shares)?;
            agent::refresh(uds, &r)?;
        }
        Ok(())
    }

    /// Waits for the agent's readiness call.
    fn wait_ready_call(&mut self) -> Result<(), Error> {
        let Some(ready) = self.ready.take() else {
            return Ok(());
        };
        let control = self.control.clone();
        let r = ready.wait(self.agent_timeout, || control.status().is_none());
        self.agent_failed = r.is_err();
        r.map_err(|e| match self.control.status() {
            Some(status) => Error::Run(format!(
                "the VM ended ({status:?}) before its agent was ready"
            )),
            None => e.into(),
        })
    }

    /// The vsock device's host socket.
    pub fn vsock_path(&self) -> Option<&Path> {
        self.vsock.as_deref()
    }

    /// Runs a command through the guest agent and relays its streams.
    pub fn exec(
        &self,
        req: agent::ExecRequest,
        io: agent::ExecIo<'_>,
        on_start: impl FnOnce(agent::ExecHandle),
    ) -> Result<agent::ExecOutcome, Error> {
        let uds = self.vsock.as_deref().ok_or(Error::NoVsock)?;
        Ok(agent::exec(uds, req, io, on_start)?)
    }

    /// A handle that stops this VM from another thread.
    pub fn stopper(&self) -> VmStopper {
        VmStopper {
            control: self.control.clone(),
            vsock: self.vsock.clone(),
        }
    }

    /// Whether the VM is still running.
    pub fn is_running(&self) -> bool {
        self.control.status().is_none()
    }

    /// Stops the guest: asks the agent for a clean poweroff (disks synced
    /// and unmounted), waits up to `grace`, then stops the vCPUs. A VM
    /// whose agent never became ready is stopped at once.
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus, Error> {
        if self.agent_failed && self.is_running() {
            self.control.request_stop(ExitStatus::PowerOff);
        }
        if self.is_running() {
            if let Some(uds) = &self.vsock {
                if let Err(e) = agent::request_shutdown(uds) {
                    tracing::warn!("clean shutdown request failed ({e}); stopping the VM");
                }
            }
            if self.control.wait(Some(grace)).is_none() {
                tracing::warn!("the guest did not power off within {grace:?}; stopping it");
                self.control.request_stop(ExitStatus::PowerOff);
            }
        }
        self.join()
    }

    /// Waits for the VM to end on its own.
    pub fn wait(mut self) -> Result<ExitStatus, Error> {
        self.join()
    }

    fn join(&mut self) -> Result<ExitStatus, Error> {
        let Some(t) = self.thread.take() else {
            return Err(Error::Run("the VM thread is gone".into()));
        };
        match t.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Run("the VM thread panicked".into())),
        }
    }
}

/// Stops a VM from any thread; cheap to clone. See
/// [`VirtualMachine::stopper`] and [`RunningVm::stopper`].
#[derive(Clone)]
pub struct VmStopper {
    control: Arc<VmControl>,
    /// The agent's socket, for a clean poweroff (agent-mode VMs only).
    vsock: Option<PathBuf>,
}

impl VmStopper {
    /// Whether the VM is still running.
    pub fn is_running(&self) -> bool {
        self.control.status().is_none()
    }

    /// Asks for a clean poweroff: the agent's Shutdown (the guest syncs
    /// and unmounts its disks) when the VM has an agent, else — or if the
    /// agent cannot be reached — stops the vCPUs at once. Returns whether
    /// the clean path was taken. Either way the VM's disks are flushed on
    /// the host when it is dropped.
    pub fn request_shutdown(&self) -> bool {
        if let Some(uds) = &self.vsock {
            match agent::request_shutdown(uds) {
                Ok(()) => return true,
                Err(e) => tracing::warn!("clean shutdown request failed ({e}); stopping the VM"),
            }
        }
        self.force_stop();
        false
    }

    /// Stops the vCPUs now (the guest sees a power cut).
    pub fn force_stop(&self) {
        self.control.request_stop(ExitStatus::PowerOff);
    }

    /// Waits until the VM ended or `timeout` passed; returns whether it ended.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.control.wait(Some(timeout)).is_some()
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.control.request_stop(ExitStatus::PowerOff);
            let _ = self.join();
        }
    }
}
