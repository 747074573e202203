//! An OCI image root (`/.locald/image`): the image configuration only the
//! guest can apply. Runs on PID 1's only thread: [`read`] before the root
//! switch (the spec is in the initramfs), [`apply`] after it (the user is
//! resolved in the image's own `/etc/passwd` and `/etc/group`, the
//! hostname is written to the image's `/etc/hostname`, which with the
//! `+overlay` root lands in the VM's tmpfs upper layer).
//!
//! `/etc/resolv.conf` is written by `net::install_resolv_conf` after the
//! switch, as for any root disk; with an image spec only when its
//! `resolv` key is set (see `main.rs`).

use std::io;
use std::path::Path;

use locald_guest_spec::{ImageSpec, SpecFile};

use crate::console;
use crate::spawn::Creds;
use crate::user;

/// The image spec plus what the `env` file says about `HOME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub spec: ImageSpec,
    /// The `env` file sets `HOME` (then the passwd home is not used).
    pub env_sets_home: bool,
}

/// Reads `dir/image` (`Ok(None)` when absent: not an image root). A bad
/// file is fatal (the error names it).
pub fn read(dir: &Path) -> Result<Option<Image>, (String, io::Error)> {
    let path = dir.join(SpecFile::Image.name());
    let load = |f: SpecFile| {
        locald_guest_spec::read_file(dir, f)
            .map_err(|e| (format!("reading {}", dir.join(f.name()).display()), e))
    };
    let Some(data) = load(SpecFile::Image)? else {
        return Ok(None);
    };
    let spec = ImageSpec::decode(&data).map_err(|e| {
        (
            format!("bad {}", path.display()),
            io::Error::new(io::ErrorKind::InvalidData, e),
        )
    })?;
    let env = load(SpecFile::Env)?.unwrap_or_default();
    let env_sets_home = locald_guest_spec::env::decode(&env)
        .iter()
        .any(|(k, _)| k == b"HOME");
    Ok(Some(Image {
        spec,
        env_sets_home,
    }))
}

/// Sets `key` in `env` (replacing its value, or appending).
pub fn set_env(env: &mut Vec<(Vec<u8>, Vec<u8>)>, key: &[u8], value: &[u8]) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_vec(),
        None => env.push((key.to_vec(), value.to_vec())),
    }
}

/// After the root switch: the hostname (best effort, printed on failure),
/// then the user, resolved under `root` (normally `/`); sets `HOME` in
/// `env` unless the `env` file did. An unknown user is fatal.
pub fn apply(
    image: &Image,
    root: &Path,
    env: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<Creds, (String, io::Error)> {
    if let Some(h) = &image.spec.hostname {
        set_hostname(root, h);
    }
    let db = |name: &str| {
        let p = root.join(name);
        user::read_db(&p).map_err(|e| (format!("reading {}", p.display()), e))
    };
    let passwd = db("etc/passwd")?;
    let group = db("etc/group")?;
    let spec = image.spec.user.as_deref().unwrap_or_default();
    let u = user::resolve(spec, passwd.as_deref(), group.as_deref()).map_err(|e| {
        (
            format!("user '{}'", String::from_utf8_lossy(spec)),
            io::Error::new(io::ErrorKind::NotFound, e),
        )
    })?;
    if !image.env_sets_home {
        set_env(env, b"HOME", &u.home);
    }
    Ok(Creds {
        uid: u.uid,
        gid: u.gid,
        groups: u.groups,
    })
}

/// `sethostname(name)` and `root/etc/hostname` (replacing a symlink
/// there rather than writing through it).
fn set_hostname(root: &Path, name: &[u8]) {
    // SAFETY: the pointer/length pair describes a valid byte slice.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        console::error("sethostname", io::Error::last_os_error());
    }
    if let Err(e) = write_hostname(root, name) {
        console::error("writing /etc/hostname", e);
    }
}

/// Writes `name` + newline to `root/etc/hostname`, creating `/etc`.
pub fn write_hostname(root: &Path, name: &[u8]) -> io::Result<()> {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    let path = etc.join("hostname");
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut text = name.to_vec();
    text.push(b'\n');
    std::fs::write(&path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("locald-init-image-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn read_spec_and_home_flag() {
        let d = scratch("read");
        assert_eq!(read(&d).unwrap(), None);
        std::fs::write(d.join("image"), b"user=app\0").unwrap();
        let img = read(&d).unwrap().unwrap();
        assert_eq!(img.spec.user.as_deref(), Some(&b"app"[..]));
        assert!(!img.env_sets_home);
        std::fs::write(d.join("env"), b"A=1\0HOME=/custom\0").unwrap();
        assert!(read(&d).unwrap().unwrap().env_sets_home);
        std::fs::write(d.join("image"), b"colour=red\0").unwrap();
        let (what, e) = read(&d).unwrap_err();
        assert_eq!(
            crate::console::format(&what, &e),
            format!(
                "locald-init: bad {}: unknown key 'colour'\n",
                d.join("image").display()
            )
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn apply_resolves_in_the_image_root() {
        let root = scratch("apply");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "app:x:1000:\nextra:x:7:app\n").unwrap();
        let image = |user: Option<&str>, env_sets_home| Image {
            spec: ImageSpec {
                user: user.map(|u| u.as_bytes().to_vec()),
                hostname: None,
                resolv: false,
            },
            env_sets_home,
        };
        let mut env = vec![(b"HOME".to_vec(), b"/root".to_vec())];
        let c = apply(&image(Some("app"), false), &root, &mut env).unwrap();
        assert_eq!(
            c,
            Creds {
                uid: 1000,
                gid: 1000,
                groups: vec![7]
            }
        );
        assert_eq!(env, [(b"HOME".to_vec(), b"/home/app".to_vec())]);
        let mut env = vec![(b"HOME".to_vec(), b"/custom".to_vec())];
        apply(&image(Some("app"), true), &root, &mut env).unwrap();
        assert_eq!(env[0].1, b"/custom", "the env file wins");
        let mut env = Vec::new();
        let c = apply(&image(None, false), &root, &mut env).unwrap();
        assert_eq!((c.uid, c.gid), (0, 0));
        assert_eq!(env, [(b"HOME".to_vec(), b"/root".to_vec())]);
        let (what, e) = apply(&image(Some("ghost"), false), &root, &mut env).unwrap_err();
        assert_eq!(
            crate::console::format(&what, &e),
            "locald-init: user 'ghost': unable to find user ghost: no matching entries in /etc/passwd\n"
        );
        // A scratch image: no /etc at all.
        let empty = scratch("apply-empty");
        let mut env = Vec::new();
        let c = apply(&image(Some("65534:65534"), false), &empty, &mut env).unwrap();
        assert_eq!((c.uid, c.gid, c.groups.len()), (65534, 65534, 0));
        assert_eq!(env, [(b"HOME".to_vec(), b"/".to_vec())]);
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn hostname_file() {
        let root = scratch("hostname");
        write_hostname(&root, b"web").unwrap();
        assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"web\n");
        // A symlink there is replaced, not written through.
        std::fs::remove_file(root.join("etc/hostname")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("etc/hostname")).unwrap();
        write_hostname(&root, b"db").unwrap();
        let md = std::fs::symlink_metadata(root.join("etc/hostname")).unwrap();
        assert!(md.is_file());
        assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"db\n");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
