//! The OCI image stage of `VirtualMachine::new` (before the guest image
//! stage, see [`crate::builder`]): make sure the image is in the image
//! cache (pulled from its registry, or read from a local layout or
//! archive), build its ext4 root disk once per manifest digest (layers
//! unpacked by `locald_image::unpack`, which treats every tar entry as
//! hostile), and fill in from the image's configuration what the
//! [`VmConfig`] leaves unset. Also the cache operations behind the CLI's
//! `pull`, `images` and `image rm|prune`. Runs on the caller's thread.
//!
//! Cache layout, under [`crate::assets::cache_dir`] (checked, like every
//! cache path, by [`crate::hostdir`]): `images/` is the content-addressed
//! store of `locald_image::ImageStore`; `images/rootfs/<digest>.ext4` are
//! the root disks, attached read-only (each VM writes to a tmpfs overlay).

use std::path::PathBuf;

use locald_image::{rootfs, unpack, Arch, ImageSource, ImageStore, PullOptions};
pub use locald_image::{
    ImageConfig, ImageEntry, ImageError, NoProgress, Progress, PruneStats, PulledImage,
    TerminalProgress,
};

use crate::config::{GuestArch, ImageRun, RootfsConfig, VmConfig};
use crate::error::{ConfigError, Error};
use crate::DiskConfig;

/// An image ready to boot: its identity, configuration and root disk.
#[derive(Clone, Debug)]
pub struct PreparedImage {
    /// The reference or local source it came from (normalized).
    pub reference: String,
    /// Its manifest digest (`sha256:…`).
    pub digest: String,
    /// Its configuration.
    pub config: ImageConfig,
    /// The cached ext4 root disk (attach read-only).
    pub rootfs: PathBuf,
}

/// The image store in the (owner-checked) cache directory.
pub fn store() -> Result<ImageStore, Error> {
    let dir = crate::assets::trusted_cache_dir()?.join("images");
    crate::hostdir::ensure_private_dir(&dir)?;
    Ok(ImageStore::open(&dir)?)
}

fn arch(a: GuestArch) -> Arch {
    match a {
        GuestArch::X86_64 => Arch::Amd64,
        GuestArch::Aarch64 => Arch::Arm64,
    }
}

/// Pulls `run.source` into the cache (a registry image already cached for
/// `guest` is used as is, as docker's `run` does; a local layout or
/// archive is re-read only when it changed), reporting to `progress`.
pub fn pull(
    run: &ImageRun,
    guest: GuestArch,
    progress: &mut dyn Progress,
) -> Result<PulledImage, Error> {
    let store = store()?;
    let source = ImageSource::parse(&run.source)?;
    let want = arch(guest);
    if let ImageSource::Registry(_) = source {
        if let Some(img) = store.get(&source.key())? {
            if img.config.architecture == want.as_str() {
                return Ok(img);
            }
        }
        if run.offline {
            return Err(ImageError::NotCached(source.key()).into());
        }
    }
    let opts = PullOptions {
        arch: want,
        insecure_registries: run.insecure_registries.clone(),
        ..PullOptions::default()
    };
    Ok(store.pull(&source, &opts, progress)?)
}

/// Pulls the image if needed and builds (or finds) its root disk.
pub fn prepare(
    run: &ImageRun,
    guest: GuestArch,
    progress: &mut dyn Progress,
) -> Result<PreparedImage, Error> {
    let image = pull(run, guest, progress)?;
    if image.config.os != "linux" || image.config.architecture != arch(guest).as_str() {
        return Err(ConfigError::ImagePlatform {
            image: image.reference.clone(),
            platform: format!("{}/{}", image.config.os, image.config.architecture),
            guest,
        }
        .into());
    }
    let store = store()?;
    let dir = store.dir().join("rootfs");
    crate::hostdir::ensure_private_dir(&dir)?;
    let dest = dir.join(format!("{}.ext4", image.key()));
    let layers = image.layers.clone();
    let built = rootfs::cached_rootfs(&dest, &rootfs::RootfsOptions::default(), |staging| {
        let mut u = unpack::Unpacker::new(staging, unpack::Limits::default())?;
        for l in &layers {
            let f = std::fs::File::open(&l.path).map_err(unpack::UnpackError::Read)?;
            u.apply_layer(std::io::BufReader::new(f), &l.media_type)?;
        }
        Ok::<_, unpack::UnpackError>(u.finish()?.0)
    })?;
    Ok(PreparedImage {
        reference: image.reference.clone(),
        digest: image.manifest_digest.clone(),
        config: image.config,
        rootfs: built.path,
    })
}

/// Removes an image (as given to `pull`) from the cache; its blobs and
/// root disk go with the next [`prune`].
pub fn remove(image: &str) -> Result<(), Error> {
    let source = ImageSource::parse(image)?;
    Ok(store()?.remove(&source.key())?)
}

/// What [`prune`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Blobs no image refers to.
    pub blobs_removed: u64,
    /// Root disks of images no longer cached.
    pub rootfs_removed: u64,
    /// Bytes freed in all.
    pub bytes_freed: u64,
}

/// Deletes the blobs and root disks that no cached image refers to (a VM
/// still running from a deleted root disk keeps its open file).
pub fn prune() -> Result<Pruned, Error> {
    let store = store()?;
    let blobs = store.prune()?;
    let live: std::collections::HashSet<String> = store
        .list()?
        .into_iter()
        .map(|e| e.manifest_digest.trim_start_matches("sha256:").to_string())
        .collect();
    let mut out = Pruned {
        blobs_removed: blobs.blobs_removed as u64,
        bytes_freed: blobs.bytes_freed,
        ..Pruned::default()
    };
    let dir = store.dir().join("rootfs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".ext4")) else {
            continue;
        };
        if live.contains(key) {
            continue;
        }
        let size = e.metadata().map_or(0, |m| m.len());
        if std::fs::remove_file(e.path()).is_ok() {
            out.rootfs_removed += 1;
            out.bytes_freed += size;
            let _ = std::fs::remove_file(dir.join(format!("{key}.ext4.lock")));
        }
    }
    Ok(out)
}

/// Fills `config` from the image: its root disk (read-only, overlay), the
/// command (Entrypoint + Cmd; `config.command` replaces Cmd, as with
/// docker), the environment (the image's, then `config.env` over it), the
/// working directory and user unless set, and a hostname from the image's
/// name unless set. Pure.
pub fn apply(config: &mut VmConfig, image: &PreparedImage) -> Result<(), ConfigError> {
    if config.rootfs.is_some() {
        return Err(ConfigError::ImageWithRootfs);
    }
    config.rootfs = Some(RootfsConfig {
        disk: DiskConfig {
            read_only: true,
            ..DiskConfig::new(&image.rootfs)
        },
        fstype: "ext4".into(),
        overlay: true,
    });
    let c = &image.config;
    let mut argv = c.entrypoint.clone().unwrap_or_default();
    match &config.command {
        Some(cmd) => argv.extend(cmd.iter().cloned()),
        None => argv.extend(c.cmd.clone().unwrap_or_default()),
    }
    // Agent mode runs commands through `exec`; the image's command is then
    // only the default of `run`.
    if !config.agent {
        if argv.is_empty() {
            return Err(ConfigError::ImageNoCommand(image.reference.clone()));
        }
        config.command = Some(argv);
    }
    let mut env: Vec<(String, String)> = c
        .env
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect();
    for (k, v) in config.env.drain(..) {
        match env.iter_mut().find(|(ek, _)| *ek == k) {
            Some(e) => e.1 = v,
            None => env.push((k, v)),
        }
    }
    config.env = env;
    if config.workdir.is_none() {
        config.workdir = c.working_dir.clone();
    }
    if config.user.is_none() {
        config.user = c.user.clone();
    }
    if config.hostname.is_none() {
        config.hostname = Some(hostname_for(&image.reference));
    }
    Ok(())
}

/// A hostname from an image reference: the last path component of its
/// name, letters, digits and `-` only, at most 63 bytes (`locald` when
/// nothing is left).
pub fn hostname_for(reference: &str) -> String {
    let name = reference.split(['@']).next().unwrap_or_default();
    let last = name.rsplit('/').next().unwrap_or_default();
    let last = last.split(':').next().unwrap_or_default();
    let h: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let h = h.trim_matches('-').to_string();
    if h.is_empty() {
        "locald".into()
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: Option<&[&str]>, cmd: Option<&[&str]>) -> PreparedImage {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        PreparedImage {
            reference: "127.0.0.1:5000/team/web-app:1.2".into(),
            digest: "sha256:00".into(),
            config: ImageConfig {
                entrypoint: entrypoint.map(v),
                cmd: cmd.map(v),
                env: vec!["PATH=/usr/bin:/bin".into(), "A=image".into(), "=x".into()],
                working_dir: Some("/app".into()),
                user: Some("app:staff".into()),
                exposed_ports: vec!["80/tcp".into()],
                architecture: "amd64".into(),
                os: "linux".into(),
                ..ImageConfig::default()
            },
            rootfs: "/cache/images/rootfs/00.ext4".into(),
        }
    }

    #[test]
    fn the_image_fills_what_the_config_leaves_unset() {
        let mut c = VmConfig {
            env: vec![("A".into(), "user".into()), ("B".into(), "2".into())],
            ..VmConfig::default()
        };
        apply(&mut c, &image(Some(&["/entry", "-x"]), Some(&["serve"]))).unwrap();
        assert_eq!(c.command.as_deref().unwrap(), ["/entry", "-x", "serve"]);
        let env: Vec<String> = c.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(env, ["PATH=/usr/bin:/bin", "A=user", "B=2"]);
        assert_eq!(c.workdir.as_deref(), Some("/app"));
        assert_eq!(c.user.as_deref(), Some("app:staff"));
        assert_eq!(c.hostname.as_deref(), Some("web-app"));
        let root = c.rootfs.unwrap();
        assert!(root.overlay && root.disk.read_only);
        assert_eq!(
            root.disk.path,
            PathBuf::from("/cache/images/rootfs/00.ext4")
        );
    }

    #[test]
    fn a_command_replaces_cmd_and_flags_win() {
        let mut c = VmConfig {
            command: Some(vec!["echo".into(), "hi".into()]),
            workdir: Some("/w".into()),
            user: Some("0".into()),
            hostname: Some("h".into()),
            ..VmConfig::default()
        };
        apply(&mut c, &image(Some(&["/entry"]), Some(&["serve"]))).unwrap();
        assert_eq!(c.command.as_deref().unwrap(), ["/entry", "echo", "hi"]);
        assert_eq!(c.workdir.as_deref(), Some("/w"));
        assert_eq!(c.user.as_deref(), Some("0"));
        assert_eq!(c.hostname.as_deref(), Some("h"));
        // Without an entrypoint the command runs as given.
        let mut c = VmConfig {
            command: Some(vec!["true".into()]),
            ..VmConfig::default()
        };
        apply(&mut c, &image(None, Some(&["serve"]))).unwrap();
        assert_eq!(c.command.as_deref().unwrap(), ["true"]);
    }

    #[test]
    fn nothing_to_run_or_a_second_root_is_an_error() {
        let mut c = VmConfig::default();
        let e = apply(&mut c, &image(None, None)).unwrap_err().to_string();
        assert!(e.contains("no Entrypoint or Cmd"), "{e}");
        // Agent mode runs commands later: no default needed.
        let mut c = VmConfig {
            agent: true,
            ..VmConfig::default()
        };
        apply(&mut c, &image(None, None)).unwrap();
        assert_eq!(c.command, None);
        let mut c = VmConfig {
            rootfs: Some(RootfsConfig {
                disk: DiskConfig::new("/x"),
                fstype: "ext4".into(),
                overlay: false,
            }),
            ..VmConfig::default()
        };
        assert!(apply(&mut c, &image(None, Some(&["x"]))).is_err());
    }

    #[test]
    fn hostnames_come_from_the_image_name() {
        assert_eq!(hostname_for("docker.io/library/alpine:latest"), "alpine");
        assert_eq!(hostname_for("h:5000/a/b_c@sha256:ab"), "b-c");
        assert_eq!(hostname_for("/tmp/my image.tar"), "my-image-tar");
        assert_eq!(hostname_for("___"), "locald");
        assert_eq!(hostname_for(&"x".repeat(100)).len(), 63);
    }
}
