//! Building ext4 root-filesystem images for `--rootfs` from a host
//! directory, with `mkfs.ext4 -d` (e2fsprogs): no root, no loop device.
//! Optionally adds the default guest's static busybox with a symlink per
//! applet and the mount points the guest init needs, so an empty or
//! missing source directory still gives a usable root.
//!
//! Runs on the caller's thread. The image is written under a temporary
//! name and renamed into place: a failed build leaves nothing behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{applet_list, busybox, io_err, run_captured, AssetError, TempDir};

/// What to build.
#[derive(Clone, Debug)]
pub struct RootfsImage {
    /// Directory whose contents become `/` (None: start empty).
    pub source: Option<PathBuf>,
    /// Image file to create (replaced if it exists).
    pub image: PathBuf,
    /// Image size in MiB (the file is sparse).
    pub size_mib: u64,
    /// Add `/bin/busybox` and applet symlinks (existing files win).
    pub busybox: bool,
}

/// Mount points the guest init moves its mounts to.
const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys", "tmp", "run", "root", "etc"];

/// Builds the image described by `spec`.
pub fn build_rootfs(spec: &RootfsImage) -> Result<(), AssetError> {
    if let Some(src) = &spec.source {
        if !src.is_dir() {
            return Err(AssetError::Io {
                action: "reading source directory",
                path: src.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
            });
        }
    }
    let parent = match spec.image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let stage = TempDir::new_in(&parent, "rootfs")?;
    if let Some(src) = &spec.source {
        // `cp -a` keeps modes, symlinks and times; ownership becomes root's
        // through mkfs's root_owner below only for the root directory, so
        // files keep the owner they have on the host.
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(src.join(".")).arg(&stage.0);
        run_captured(&mut cp, "coreutils")?;
    }
    for d in MOUNT_POINTS {
        let p = stage.0.join(d);
        if !p.exists() {
            fs::create_dir_all(&p).map_err(io_err("creating directory", &p))?;
        }
    }
    if spec.busybox {
        add_busybox(&stage.0)?;
    }
    let tmp = parent.join(format!(".tmp-rootfs-image-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args([
        "-q",
        "-F",
        "-L",
        "locald-root",
        "-E",
        "root_owner=0:0",
        "-d",
    ])
    .arg(&stage.0)
    .arg(&tmp)
    .arg(format!("{}M", spec.size_mib));
    let result = run_captured(&mut mkfs, "e2fsprogs (apt-get install e2fsprogs)").and_then(|_| {
        fs::rename(&tmp, &spec.image).map_err(io_err("renaming into place", &spec.image))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn add_busybox(root: &Path) -> Result<(), AssetError> {
    let bb = busybox()?;
    let bin = root.join("bin");
    fs::create_dir_all(&bin).map_err(io_err("creating directory", &bin))?;
    let dest = bin.join("busybox");
    if !dest.exists() {
        fs::copy(&bb, &dest).map_err(io_err("copying busybox to", &dest))?;
    }
    for applet in applet_list(&bb)? {
        let link = root.join(&applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .map_err(io_err("creating symlink", &link))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("locald-rootfs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Lists `path` inside an ext4 image with debugfs (e2fsprogs).
    fn debugfs_cat(image: &Path, path: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn image_holds_the_source_tree_and_mount_points() {
        let d = tmp("tree");
        let src = d.join("src");
        fs::create_dir_all(src.join("app")).unwrap();
        fs::write(src.join("app/hello.txt"), "hello rootfs\n").unwrap();
        let image = d.join("root.ext4");
        build_rootfs(&RootfsImage {
            source: Some(src),
            image: image.clone(),
            size_mib: 16,
            busybox: false,
        })
        .unwrap();
        assert_eq!(fs::metadata(&image).unwrap().len(), 16 << 20);
        assert_eq!(debugfs_cat(&image, "/app/hello.txt"), "hello rootfs\n");
        let ls = Command::new("debugfs")
            .args(["-R", "ls -l /"])
            .arg(&image)
            .output()
            .unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout);
        for m in MOUNT_POINTS {
            assert!(ls.contains(m), "{m} missing in {ls}");
        }
        // Nothing else left in the directory.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_inputs_leave_nothing_behind() {
        let d = tmp("bad");
        let image = d.join("root.ext4");
        let missing = build_rootfs(&RootfsImage {
            source: Some(d.join("nope")),
            image: image.clone(),
            size_mib: 16,
            busybox: false,
        });
        assert!(missing.unwrap_err().to_string().contains("nope"));
        // Too small for ext4's metadata.
        let small = build_rootfs(&RootfsImage {
            source: None,
            image: image.clone(),
            size_mib: 0,
            busybox: false,
        });
        assert!(small.is_err());
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        fs::remove_dir_all(&d).unwrap();
    }
}
