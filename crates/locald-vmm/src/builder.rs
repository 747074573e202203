//! `VirtualMachine::new` in stages, after Firecracker's `builder.rs`:
//!
//! 0. **backend check** ([`crate::backend::Backend::check`]): what the
//!    platform's backend refuses, before any work;
//! 1. **guest image** ([`GuestImage::resolve`]): the kernel and initramfs
//!    (the default guest's for the configured arch, or the user's), with
//!    the per-run command spec appended to the initramfs;
//! 2. **agent link** ([`AgentLink::prepare`]): the runtime directory, the
//!    vsock socket and the agent's readiness listener;
//! 3. **device plan and backend** ([`crate::backend::Backend::build`]): each
//!    backend plans and creates its own devices (KVM: emulated virtio-mmio
//!    devices; Virtualization.framework: the framework's devices).
//!
//! Every stage is backend-neutral except the last. Runs on the caller's
//! thread; nothing runs in the guest until `run`.

use std::path::PathBuf;

use crate::agent;
use crate::assets;
use crate::config::{self, VmConfig};
use crate::error::{ConfigError, Error};
use crate::runtime::RuntimeDir;

/// The kernel and initramfs a VM boots, resolved and loaded.
pub(crate) struct GuestImage {
    /// Kernel image.
    pub(crate) kernel: PathBuf,
    /// `System.map` for profiling, when known.
    pub(crate) system_map: Option<PathBuf>,
    /// Whether `kernel` is the default guest kernel (it gets our extra
    /// command line).
    pub(crate) default_kernel: bool,
    /// Initrd name (for messages) and bytes, the command spec included.
    pub(crate) initrd: Option<(String, Vec<u8>)>,
}

impl GuestImage {
    /// No kernel or initrd: a restored VM resumes from its snapshot.
    pub(crate) fn none() -> Self {
        GuestImage {
            kernel: PathBuf::new(),
            system_map: None,
            default_kernel: true,
            initrd: None,
        }
    }

    /// Resolves the default guest's assets where the config names none,
    /// reads the initrd and appends the command spec the guest init reads
    /// (command, environment, root disk, agent mode, network, shares).
    pub(crate) fn resolve(config: &VmConfig) -> Result<Self, Error> {
        let default_kernel = config.kernel.is_none();
        let (kernel, system_map) = match &config.kernel {
            Some(k) => (k.clone(), config.system_map.clone()),
            None => {
                let k = assets::default_kernel_for(config.arch)?;
                (k.vmlinux, config.system_map.clone().or(Some(k.system_map)))
            }
        };
        let default_init = default_kernel && config.initrd.is_none();
        let initrd_path = match (&config.initrd, default_kernel) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => Some(assets::default_initramfs_for(config.arch)?),
            (None, false) => None,
        };
        let mut initrd = match initrd_path {
            Some(path) => {
                let bytes = std::fs::read(&path).map_err(|err| ConfigError::File {
                    path: path.clone(),
                    err,
                })?;
                Some((path.display().to_string(), bytes))
            }
            None => None,
        };
        if let Some(spec) = command_spec(config, default_init) {
            let Some((_, bytes)) = initrd.as_mut() else {
                return Err(ConfigError::NeedsGuestInit.into());
            };
            // newc archives concatenate: the command spec rides after the base image.
            while bytes.len() % 4 != 0 {
                bytes.push(0);
            }
            bytes.extend_from_slice(&assets::command_archive(&spec));
        }
        Ok(GuestImage {
            kernel,
            system_map,
            default_kernel,
            initrd,
        })
    }
}

/// The command spec for the guest init, when the config needs one.
/// `default_init`: the guest runs our init (default kernel and initramfs),
/// which alone reads the network and share specs.
pub(crate) fn command_spec(config: &VmConfig, default_init: bool) -> Option<assets::GuestCommand> {
    let root = config.rootfs.as_ref().map(|r| assets::GuestRoot {
        device: format!("/dev/{}", config::disk_name(0)),
        fstype: r.fstype.clone(),
        read_only: r.disk.read_only,
        overlay: r.overlay,
    });
    // A network card on the default guest needs its `/.locald/net`.
    let net = config
        .net
        .as_ref()
        .filter(|_| default_init)
        .map(|n| n.guest_spec());
    // Shares on the default guest: `/.locald/shares` tells init where to mount them.
    let shares: Vec<assets::GuestShare> = if default_init && !config.late_shares {
        config
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| assets::GuestShare {
                tag: config::ShareConfig::tag(i),
                path: s.guest_path.clone(),
                read_only: s.read_only,
            })
            .collect()
    } else {
        Vec::new()
    };
    // Rosetta: the init mounts the framework's share and registers it.
    let rosetta = (config.rosetta && default_init).then(|| config::ROSETTA_TAG.to_string());
    // An image: what only the guest can apply from its configuration.
    let image = config.image.as_ref().map(|_| assets::GuestImageRun {
        user: config.user.clone(),
        hostname: config.hostname.clone(),
        resolv: config.net.is_some(),
    });
    let needed = image.is_some()
        || config.command.is_some()
        || root.is_some()
        || config.agent
        || net.is_some()
        || !shares.is_empty()
        || rosetta.is_some();
    needed.then(|| assets::GuestCommand {
        argv: config.command.clone().unwrap_or_default(),
        env: config.env.clone(),
        workdir: config.workdir.clone(),
        root,
        agent: config.agent,
        net,
        shares,
        rosetta,
        image,
    })
}

/// How the host reaches the guest agent: the VM's runtime directory, its
/// vsock socket and the readiness listener.
pub(crate) struct AgentLink {
    /// The private runtime directory, when the VM has one.
    pub(crate) runtime_dir: Option<RuntimeDir>,
    /// The agent's readiness listener (agent mode).
    pub(crate) ready: Option<agent::ReadyListener>,
    /// The vsock device's host socket, if the VM has a vsock device.
    pub(crate) vsock_path: Option<PathBuf>,
}

impl AgentLink {
    /// Agent mode needs a vsock device; without an explicit socket the VM
    /// gets a private one in a runtime directory removed with it (made
    /// also when `want_dir`: a backend that needs files of its own there).
    /// Binds the readiness listener before the guest can call it.
    pub(crate) fn prepare(config: &mut VmConfig, want_dir: bool) -> Result<Self, Error> {
        let mut runtime_dir = None;
        if want_dir || (config.agent && config.vsock.is_none()) {
            runtime_dir = Some(RuntimeDir::new()?);
        }
        if let (true, None, Some(dir)) = (config.agent, &config.vsock, &runtime_dir) {
            config.vsock = Some(config::VsockConfig {
                guest_cid: 3,
                uds_path: dir.0.join("vsock.sock"),
            });
        }
        let ready = match (&config.vsock, config.agent) {
            (Some(v), true) => Some(agent::ReadyListener::bind(&v.uds_path)?),
            _ => None,
        };
        Ok(AgentLink {
            runtime_dir,
            ready,
            vsock_path: config.vsock.as_ref().map(|v| v.uds_path.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_spec_without_a_reason() {
        let c = VmConfig::default();
        assert!(command_spec(&c, true).is_none());
    }

    #[test]
    fn spec_carries_command_root_and_shares() {
        let dir = std::env::temp_dir();
        let c = VmConfig {
            command: Some(vec!["echo".into(), "hi".into()]),
            env: vec![("A".into(), "1".into())],
            workdir: Some("/w".into()),
            rootfs: Some(config::RootfsConfig {
                overlay: false,
                disk: config::DiskConfig {
                    read_only: true,
                    ..config::DiskConfig::new("/r.img")
                },
                fstype: "ext4".into(),
            }),
            shares: vec![config::ShareConfig::parse(
                &format!("{}:/mnt:ro", dir.display()),
                config::ShareCache::Auto,
            )
            .unwrap()],
            ..VmConfig::default()
        };
        let s = command_spec(&c, true).unwrap();
        assert_eq!(s.argv, ["echo", "hi"]);
        assert_eq!(s.workdir.as_deref(), Some("/w"));
        let root = s.root.unwrap();
        assert_eq!((root.device.as_str(), root.read_only), ("/dev/vda", true));
        assert_eq!(s.shares.len(), 1);
        assert_eq!(s.shares[0].path, "/mnt");
        assert!(s.shares[0].read_only);
        assert_eq!(s.rosetta, None);
        // Another init does not read the share spec.
        assert!(command_spec(&c, false).unwrap().shares.is_empty());
        let c = VmConfig {
            rosetta: true,
            ..VmConfig::default()
        };
        let s = command_spec(&c, true).expect("Rosetta alone needs a spec");
        assert_eq!(s.rosetta.as_deref(), Some(config::ROSETTA_TAG));
    }

    #[test]
    fn agent_mode_gets_a_private_socket() {
        let mut c = VmConfig {
            agent: true,
            ..VmConfig::default()
        };
        let link = AgentLink::prepare(&mut c, false).unwrap();
        let dir = link.runtime_dir.as_ref().unwrap().0.clone();
        assert_eq!(c.vsock.as_ref().unwrap().uds_path, dir.join("vsock.sock"));
        assert_eq!(link.vsock_path.as_deref(), Some(&*dir.join("vsock.sock")));
        assert!(link.ready.is_some());
        drop(link);
        assert!(!dir.exists(), "the runtime directory goes with the VM");
    }
}
