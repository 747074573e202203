//! The KVM backend's device plan: the emulated virtio devices a
//! [`VmConfig`] asks for, built in guest order (disks with the root disk
//! first, vsock, net, shares, entropy). Runs on the caller's thread while
//! the VM is built; the devices then run on their worker threads.

use super::VirtioSpec;
use crate::config::VmConfig;
use crate::error::{DeviceError, Error};

/// The virtio devices `config` asks for, in guest order: disks (root
/// first), then the entropy device. Opening a disk takes its lock, so a
/// disk another VM uses fails here.
pub(crate) fn virtio_devices(config: &VmConfig) -> Result<Vec<VirtioSpec>, Error> {
    let mut out = Vec::new();
    for (i, disk) in config.all_disks().enumerate() {
        let name = crate::config::disk_name(i);
        let dev =
            crate::devices::virtio::block::Block::new(disk, &name).map_err(DeviceError::from)?;
        out.push(VirtioSpec {
            name: format!("virtio-blk {name}"),
            device: Box::new(dev),
        });
    }
    if let Some(v) = &config.vsock {
        let dev = crate::devices::virtio::vsock::Vsock::new(v.guest_cid, v.uds_path.clone())
            .map_err(DeviceError::from)?;
        out.push(VirtioSpec {
            name: "virtio-vsock".into(),
            device: Box::new(dev),
        });
    }
    if let Some(n) = &config.net {
        let dev = crate::devices::virtio::net::Net::from_config(n).map_err(DeviceError::from)?;
        out.push(VirtioSpec {
            name: "virtio-net".into(),
            device: Box::new(dev),
        });
    }
    for (i, share) in config.shares.iter().enumerate() {
        let mut opts = crate::devices::virtio::fs::ShareFsOptions::new(
            &share.host_dir,
            share.read_only,
            share.cache,
        );
        opts.read_only = share.read_only;
        let fs =
            crate::devices::virtio::fs::ShareFs::new(opts).map_err(|err| DeviceError::Share {
                path: share.host_dir.clone(),
                err,
            })?;
        let tag = crate::config::ShareConfig::tag(i);
        out.push(VirtioSpec {
            name: format!("virtio-fs {tag}"),
            device: Box::new(crate::devices::virtio::fs::Fs::new(&tag, fs)),
        });
    }
    if config.rng {
        out.push(VirtioSpec {
            name: "virtio-rng".into(),
            device: Box::new(crate::devices::virtio::rng::Rng::new()),
        });
    }
    Ok(out)
}
