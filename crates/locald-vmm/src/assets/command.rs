//! The per-run command archive: a small newc archive appended after the
//! base initramfs that tells the guest init what to run (`/.locald/argv`,
//! `env`, `workdir`, `agent`, `shares`, `net`, `root`, `rosetta`).
//!
//! The file formats live in `locald-guest-spec`, shared with the guest init;
//! this module only maps the VMM's view of a run ([`GuestCommand`], plain
//! `String`s) onto [`CommandSpec`] and writes its files with the cpio
//! builder. Runs on the caller's thread, before the VM is created.

use locald_guest_spec::{
    CommandSpec, ImageSpec, NetSpec, RootSpec, RosettaSpec, ShareSpec, ARCHIVE_DIR, DIR_MODE,
};

use crate::cpio::{CpioBuilder, CpioError};

/// What the guest init runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestCommand {
    /// Program and arguments (no shell). Empty: interactive `/bin/sh`.
    pub argv: Vec<String>,
    /// Extra environment, applied over the init's defaults
    /// (`PATH`, `HOME=/root`, `TERM=linux`).
    pub env: Vec<(String, String)>,
    /// Working directory (created if missing).
    pub workdir: Option<String>,
    /// Root filesystem to switch to before running the command.
    pub root: Option<GuestRoot>,
    /// Agent mode: the init starts the guest agent (`/.locald/agent`)
    /// instead of running `argv`.
    pub agent: bool,
    /// virtio-fs shares to mount, written to `/.locald/shares`.
    pub shares: Vec<GuestShare>,
    /// Network configuration for `eth0`, written to `/.locald/net` (see
    /// `NetConfig::guest_spec`).
    pub net: Option<NetSpec>,
    /// virtio-fs tag of Apple's Rosetta share, written to
    /// `/.locald/rosetta`: the init mounts it at `/run/rosetta` and
    /// registers it with `binfmt_misc` for x86-64 binaries.
    pub rosetta: Option<String>,
    /// An OCI image's run settings the guest applies, written to
    /// `/.locald/image` (its presence marks the root as an image).
    pub image: Option<GuestImageRun>,
}

/// What the guest applies from an OCI image's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestImageRun {
    /// Docker's `User` (`uid[:gid]` or names from the image's passwd/group).
    pub user: Option<String>,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// Write `/etc/resolv.conf` into the image's root (the VM has a network).
    pub resolv: bool,
}

/// A virtio-fs share the guest init mounts (after the root switch), written
/// to `/.locald/shares` (`TAG\0PATH\0MODE\0` per share, MODE `rw` or `ro`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestShare {
    /// virtio-fs mount tag.
    pub tag: String,
    /// Absolute guest path (created if missing).
    pub path: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// A disk the guest init mounts as `/`, written to `/.locald/root`
/// (`DEVICE\0FSTYPE\0MODE\0`, MODE `rw` or `ro`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestRoot {
    /// Guest device node, e.g. `/dev/vda`.
    pub device: String,
    /// Filesystem type for mount(2).
    pub fstype: String,
    /// Mount read-only.
    pub read_only: bool,
    /// Mount it read-only under a tmpfs overlay: the guest may write, the
    /// disk never changes (OCI image roots).
    pub overlay: bool,
}

fn bytes(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

impl GuestCommand {
    /// The same run as the shared spec type.
    pub fn to_spec(&self) -> CommandSpec {
        CommandSpec {
            argv: self.argv.iter().map(|a| bytes(a)).collect(),
            env: self.env.iter().map(|(k, v)| (bytes(k), bytes(v))).collect(),
            workdir: self.workdir.as_deref().map(bytes),
            agent: self.agent,
            shares: self
                .shares
                .iter()
                .map(|s| ShareSpec {
                    tag: bytes(&s.tag),
                    path: bytes(&s.path),
                    read_only: s.read_only,
                })
                .collect(),
            net: self.net.clone(),
            root: self.root.as_ref().map(|r| RootSpec {
                device: bytes(&r.device),
                fstype: bytes(&r.fstype),
                read_only: r.read_only,
                overlay: r.overlay,
            }),
            rosetta: self
                .rosetta
                .as_deref()
                .map(|t| RosettaSpec { tag: bytes(t) }),
            image: self.image.as_ref().map(|i| ImageSpec {
                user: i.user.as_deref().map(bytes),
                hostname: i.hostname.as_deref().map(bytes),
                resolv: i.resolv,
            }),
        }
    }
}

/// Builds the small newc archive appended after the base initramfs: the
/// directory `.locald` and the files of [`CommandSpec::files`] (formats in
/// `locald-guest-spec` and docs/guest-init.md). A string containing NUL is
/// cut at the NUL; a key containing `=` is split there by the guest.
///
/// # Panics
/// Only if a file exceeds 4 GiB (the newc size limit).
pub fn command_archive(cmd: &GuestCommand) -> Vec<u8> {
    let files = cmd.to_spec().files();
    let mut b = CpioBuilder::new();
    let mut add = || -> Result<(), CpioError> {
        b.dir(ARCHIVE_DIR, DIR_MODE)?;
        for (path, mode, data) in &files {
            b.file(path, *mode, data)?;
        }
        Ok(())
    };
    if let Err(e) = add() {
        // Fixed valid paths: only a > 4 GiB argv/env can get here.
        panic!("command archive: {e}");
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::tests::{host_cpio, parse_all, temp_dir};
    use locald_guest_spec::{NetMode, SpecFile};
    use std::fs;

    #[test]
    fn command_archive_round_trip() {
        let cmd = GuestCommand {
            argv: vec![
                "echo".into(),
                "hello world".into(),
                String::new(),
                "a'b\"c$d\n".into(),
            ],
            env: vec![
                ("FOO".into(), "bar=baz".into()),
                ("EMPTY".into(), String::new()),
            ],
            workdir: Some("/srv/app".into()),
            root: Some(GuestRoot {
                device: "/dev/vda".into(),
                fstype: "ext4".into(),
                read_only: true,
                overlay: true,
            }),
            agent: true,
            net: Some(NetSpec {
                mac: None,
                mode: NetMode::Dhcp,
            }),
            shares: vec![
                GuestShare {
                    tag: "locald-share0".into(),
                    path: "/mnt/src".into(),
                    read_only: false,
                },
                GuestShare {
                    tag: "locald-share1".into(),
                    path: "/data".into(),
                    read_only: true,
                },
            ],
            rosetta: Some("rosetta".into()),
            image: Some(GuestImageRun {
                user: Some("app:staff".into()),
                hostname: Some("web".into()),
                resolv: true,
            }),
        };
        let a = command_archive(&cmd);
        assert_eq!(a.len() % 4, 0);
        let e = &parse_all(&a)[0];
        let get = |n: &str| e.iter().find(|p| p.name == n).unwrap().data.clone();
        assert_eq!(get(".locald/argv"), b"echo\0hello world\0\0a'b\"c$d\n\0");
        assert_eq!(get(".locald/env"), b"FOO=bar=baz\0EMPTY=\0");
        assert_eq!(get(".locald/workdir"), b"/srv/app");
        assert_eq!(get(".locald/root"), b"/dev/vda\0ext4\0ro+overlay\0");
        assert_eq!(
            get(".locald/image"),
            b"user=app:staff\0hostname=web\0resolv=1\0"
        );
        assert_eq!(get(".locald/agent"), b"1\n");
        assert_eq!(get(".locald/net"), b"mode=dhcp\n");
        assert_eq!(
            get(".locald/shares"),
            b"locald-share0\0/mnt/src\0rw\0locald-share1\0/data\0ro\0"
        );
        assert_eq!(get(".locald/rosetta"), b"rosetta");

        // What the guest decodes is what was asked for.
        let files: Vec<(SpecFile, &[u8])> = e
            .iter()
            .filter_map(|p| Some((SpecFile::from_archive_path(&p.name)?, p.data.as_slice())))
            .collect();
        assert_eq!(files.len(), 9);
        assert_eq!(CommandSpec::decode_files(files).unwrap(), cmd.to_spec());

        // Independent check with the host cpio.
        let dir = temp_dir("cmd");
        host_cpio(&dir, &["-i", "--quiet", "--make-directories"], &a);
        assert_eq!(
            fs::read(dir.join(".locald/argv")).unwrap(),
            b"echo\0hello world\0\0a'b\"c$d\n\0"
        );
        assert_eq!(
            fs::read(dir.join(".locald/env")).unwrap(),
            b"FOO=bar=baz\0EMPTY=\0"
        );
        assert_eq!(fs::read(dir.join(".locald/workdir")).unwrap(), b"/srv/app");
        assert_eq!(fs::read(dir.join(".locald/rosetta")).unwrap(), b"rosetta");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn command_archive_minimal_and_nul() {
        let e = &parse_all(&command_archive(&GuestCommand::default()))[0];
        assert_eq!(
            e.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            [".locald"]
        );
        let cmd = GuestCommand {
            argv: vec!["a\0b".into()],
            ..Default::default()
        };
        let e = &parse_all(&command_archive(&cmd))[0];
        assert_eq!(e[1].data, b"a\0");
    }
}
