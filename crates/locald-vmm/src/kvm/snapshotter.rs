//! Taking a snapshot of a running KVM VM ([`Snapshotter::take`]) and
//! loading one for a restore ([`load`]). `take` runs on the thread that
//! asks for the snapshot (a named VM's control thread, a library caller);
//! each vCPU reads its own state on its own thread while parked.
//!
//! The order of a snapshot:
//! 1. park every vCPU between two `KVM_RUN`s (each completes pending I/O
//!    with an `immediate_exit` run and saves its registers, XSAVE area,
//!    LAPIC, MSRs, events…);
//! 2. park every device worker between two events ([`Gate`]);
//! 3. read the PICs, IOAPIC, PIT and kvmclock, the UART and every virtio
//!    transport (queue positions from the used rings in guest memory);
//! 4. write guest memory, then the state file (memory first: a directory
//!    with a state file is complete);
//! 5. let the workers and vCPUs go on, or stop the VM.
//!
//! [`Gate`]: crate::devices::virtio::worker::Gate

use std::path::Path;
use std::time::{Duration, Instant};

use super::snapshot::{self, SavedMachine};
use super::{BootSpec, Restore, SnapshotParts, VirtioSpec};
use crate::devices::ExitStatus;
use crate::snapshot::{self as files, AfterSnapshot, SnapshotError, SnapshotInfo};

/// How long the vCPUs get to park.
pub const PARK_LIMIT: Duration = Duration::from_secs(5);

/// Takes snapshots of one running VM; cheap to clone, usable from any
/// thread while the VM runs. It holds the VM weakly: once the VM is
/// dropped its devices go at once (their host connections close, so an
/// `exec` relay sees the end), and a snapshot is refused as not running.
#[derive(Clone)]
pub struct Snapshotter(pub(super) std::sync::Weak<SnapshotParts>);

impl Snapshotter {
    /// Pauses the VM, writes its snapshot into `dir` (a new or empty
    /// directory of ours) and resumes or stops it.
    pub fn take(&self, dir: &Path, after: AfterSnapshot) -> Result<SnapshotInfo, SnapshotError> {
        let p = &self.0.upgrade().ok_or(SnapshotError::NotRunning)?;
        let _one = p.busy.lock().unwrap_or_else(|e| e.into_inner());
        let dir = files::prepare_dir(dir)?;
        let control = &p.shared.control;
        let started = Instant::now();
        let vcpus = p
            .shared
            .pause
            .park_all(Some(p.msr_indices.clone()), PARK_LIMIT, control);
        let result = vcpus.and_then(|vcpus| {
            if let Err(e) = p.gate.pause() {
                p.gate.resume();
                return Err(e.into());
            }
            let r = Self::write(p, &dir, vcpus);
            if r.is_err() || after == AfterSnapshot::Resume {
                p.gate.resume();
            }
            r
        });
        let paused = started.elapsed();
        if let (Ok(_), AfterSnapshot::Stop) = (&result, after) {
            control.request_stop(ExitStatus::Snapshotted);
            p.gate.resume();
        }
        p.shared.pause.release();
        let (memory_written, state_bytes) = result?;
        Ok(SnapshotInfo {
            dir,
            paused,
            memory_written,
            state_bytes,
        })
    }

    fn write(
        p: &SnapshotParts,
        dir: &Path,
        vcpus: Vec<snapshot::VcpuState>,
    ) -> Result<(u64, u64), SnapshotError> {
        let vm = snapshot::save_vm(&p.vm)?;
        let serial = p.serial.lock().unwrap_or_else(|e| e.into_inner()).save();
        let virtio = p
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save())
            .collect::<Result<Vec<_>, _>>()?;
        let mem_path = dir.join(files::MEMORY_FILE);
        let mem_file = files::create_file(dir, files::MEMORY_FILE)?;
        let (ram, written) =
            snapshot::write_memory(&p.mem, &mem_file).map_err(|err| SnapshotError::Io {
                what: "writing",
                path: mem_path,
                err,
            })?;
        let mut shape = p.shape.clone();
        shape.ram = ram;
        let saved = SavedMachine {
            arch: std::env::consts::ARCH.into(),
            host: p.host.clone(),
            shape,
            vm,
            vcpus,
            serial,
            virtio,
        };
        let bytes = files::format::encode(&saved);
        files::write_state(dir, &bytes)?;
        Ok((written, bytes.len() as u64))
    }
}

/// Reads and checks the snapshot in `dir` for a restore: the state file's
/// envelope and body, and the memory file (both checked as ours).
pub fn load(dir: &Path) -> Result<Restore, SnapshotError> {
    let bytes = files::read_state(dir)?;
    let saved: SavedMachine = files::format::decode(&bytes)?;
    saved.validate()?;
    if saved.arch != std::env::consts::ARCH {
        return Err(SnapshotError::ForeignHost(format!(
            "it is a {} snapshot",
            saved.arch
        )));
    }
    let memory = files::open_file(dir, files::MEMORY_FILE)?;
    Ok(Restore { saved, memory })
}

/// The vCPU count and memory size of the snapshot in `dir` (its state
/// file checked as for a restore).
pub fn machine_of(dir: &Path) -> Result<(u8, u64), SnapshotError> {
    let r = load(dir)?;
    Ok((r.saved.shape.vcpus, r.saved.shape.memory_mib))
}

/// Refuses a restore whose saved machine differs from the one `spec` and
/// `virtio` describe.
pub(super) fn check_shape(
    spec: &BootSpec,
    virtio: &[VirtioSpec],
    saved: &SavedMachine,
) -> Result<(), SnapshotError> {
    let s = &saved.shape;
    let mismatch = |what: String| Err(SnapshotError::Mismatch(what));
    if s.vcpus != spec.vcpus || saved.vcpus.len() != usize::from(spec.vcpus) {
        return mismatch(format!("it has {} vCPUs, this VM {}", s.vcpus, spec.vcpus));
    }
    if s.memory_mib != spec.memory_mib {
        return mismatch(format!(
            "it has {} MiB of memory, this VM {} MiB",
            s.memory_mib, spec.memory_mib
        ));
    }
    let names: Vec<&str> = virtio.iter().map(|v| v.name.as_str()).collect();
    if s.devices != names || saved.virtio.len() != names.len() {
        return mismatch(format!(
            "its devices are [{}], this VM's [{}]",
            s.devices.join(", "),
            names.join(", ")
        ));
    }
    if s.compat == spec.masked.is_empty() {
        return mismatch("the software-KVM compatibility path differs".into());
    }
    Ok(())
}
