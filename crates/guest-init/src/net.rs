//! Network bring-up: configures `eth0` from `/.locald/net` (written by the
//! VMM when the VM has a virtio-net card) before the command or the agent
//! runs, so `run --net … -- CMD` has a network.
//!
//! Runs on init's only thread, before the optional root switch (busybox
//! lives in the initramfs). Format and decoder: `locald_guest_spec::net`
//! (`KEY=VALUE` lines — `mode=dhcp|static|manual`, and for `static`:
//! `address=A.B.C.D/P`, optional `gateway=`, `dns=`). `dhcp` runs busybox `udhcpc` once in the
//! foreground with a small script that applies the lease (address,
//! default route, `/etc/resolv.conf`); `manual` only sets the link up.
//! Failures are printed and the boot goes on (a command without network
//! is more useful than no command).
//!
//! DNS: the resolver configuration (static `dns=` or the lease's servers)
//! is written to the initramfs' `/etc/resolv.conf` and returned by
//! [`configure`]; after a switch to a `--rootfs` disk, [`install_resolv_conf`]
//! writes it again into the new root's `/etc/resolv.conf` (when that root
//! is writable), so programs on the disk resolve names too.

use std::path::Path;
use std::process::{Command, Stdio};

use locald_guest_spec::{NetMode, NetSpec, SpecFile};

use crate::console;

/// The interface the first virtio-net card becomes.
const IFACE: &str = "eth0";
/// Busybox in the initramfs.
const BUSYBOX: &str = "/bin/busybox";
/// Where the lease script is written.
const SCRIPT: &str = "/.locald/udhcpc.sh";
/// Where the lease script leaves the resolver configuration.
const LEASE_RESOLV: &str = "/.locald/resolv.conf";
/// The resolver configuration file, in the initramfs and in a new root.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Applies a lease (udhcpc calls it with `deconfig`, `bound`, `renew`).
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
B=/bin/busybox
case "$1" in
deconfig)
  $B ip addr flush dev "$interface"
  $B ip link set "$interface" up
  ;;
bound|renew)
  $B ip addr flush dev "$interface"
  $B ip addr add "$ip/${mask:-24}" dev "$interface"
  for r in $router; do
    $B ip route add default via "$r" dev "$interface" && break
  done
  if [ -n "$dns" ]; then
    : > /.locald/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /.locald/resolv.conf; done
  fi
  ;;
esac
exit 0
"#;

/// Runs a busybox applet quietly; `Err` describes a failure.
fn busybox(args: &[&str]) -> Result<(), String> {
    let out = Command::new(BUSYBOX)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Configures `eth0` if `spec_dir/net` exists. Returns the resolver
/// configuration (`resolv.conf` text) when DNS servers are known, for
/// [`install_resolv_conf`] after a root switch.
pub fn configure(spec_dir: &Path) -> Option<String> {
    let Ok(data) = std::fs::read(spec_dir.join(SpecFile::Net.name())) else {
        return None;
    };
    let spec = match NetSpec::decode(&data) {
        Ok(s) => s,
        Err(e) => {
            console::error(SpecFile::Net.guest_path(), e);
            return None;
        }
    };
    match apply(&spec.mode) {
        Ok(resolv) => {
            if let Some(r) = &resolv {
                if let Err(e) = write_resolv_conf(Path::new("/"), r) {
                    console::error(RESOLV_CONF, e);
                }
            }
            resolv
        }
        Err(e) => {
            console::error("network setup", e);
            None
        }
    }
}

/// `resolv.conf` text naming `servers`.
fn resolv_text<'a>(servers: impl IntoIterator<Item = &'a str>) -> String {
    servers
        .into_iter()
        .map(|d| format!("nameserver {d}\n"))
        .collect()
}

/// Writes `text` to `root`/etc/resolv.conf, creating `/etc` if needed. A
/// symbolic link there (e.g. to systemd-resolved's file under `/run`) is
/// followed when its target's directory exists and replaced by a plain
/// file otherwise.
pub fn write_resolv_conf(root: &Path, text: &str) -> std::io::Result<()> {
    let etc = root.join("etc");
    let path = root.join(RESOLV_CONF.trim_start_matches('/'));
    std::fs::create_dir_all(&etc)?;
    match std::fs::write(&path, text) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A dangling symbolic link: replace it.
            std::fs::remove_file(&path)?;
            std::fs::write(&path, text)
        }
        other => other,
    }
}

/// Writes the resolver configuration into the (new) root's
/// `/etc/resolv.conf`; a read-only root is left alone with a note.
pub fn install_resolv_conf(text: &str) {
    match write_resolv_conf(Path::new("/"), text) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => console::error(
            "read-only root: DNS servers not written to /etc/resolv.conf",
            e,
        ),
        Err(e) => console::error(RESOLV_CONF, e),
    }
}

/// Configures the interface; returns the `resolv.conf` text if DNS
/// servers are known.
fn apply(mode: &NetMode) -> Result<Option<String>, String> {
    busybox(&["ip", "link", "set", IFACE, "up"])?;
    match mode {
        NetMode::Manual => Ok(None),
        NetMode::Static {
            address,
            prefix,
            gateway,
            dns,
        } => {
            let cidr = format!("{address}/{prefix}");
            busybox(&["ip", "addr", "add", &cidr, "dev", IFACE])?;
            if let Some(g) = gateway {
                let g = g.to_string();
                busybox(&["ip", "route", "add", "default", "via", &g, "dev", IFACE])?;
            }
            Ok(dns.map(|d| resolv_text([d.to_string().as_str()])))
        }
        NetMode::Dhcp => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(SCRIPT, UDHCPC_SCRIPT).map_err(|e| format!("{SCRIPT}: {e}"))?;
            std::fs::set_permissions(SCRIPT, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{SCRIPT}: {e}"))?;
            let _ = std::fs::remove_file(LEASE_RESOLV);
            // Foreground, quit once leased, fail after 5 tries 2 s apart.
            busybox(&[
                "udhcpc", "-i", IFACE, "-f", "-q", "-n", "-t", "5", "-T", "2", "-s", SCRIPT,
            ])
            .map_err(|e| format!("DHCP on {IFACE} failed ({e})"))?;
            Ok(std::fs::read_to_string(LEASE_RESOLV)
                .ok()
                .filter(|t| !t.is_empty()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh empty directory under the temporary directory.
    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("locald-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn resolv_text_lists_servers() {
        assert_eq!(resolv_text(["10.0.0.1"]), "nameserver 10.0.0.1\n");
        assert_eq!(
            resolv_text(["1.1.1.1", "9.9.9.9"]),
            "nameserver 1.1.1.1\nnameserver 9.9.9.9\n"
        );
    }

    #[test]
    fn resolv_conf_lands_in_a_new_root() {
        use std::os::unix::fs::symlink;
        let text = "nameserver 10.0.2.3\n";
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();

        // No /etc yet (a minimal image): created.
        let root = scratch("resolv-noetc");
        write_resolv_conf(&root, text).unwrap();
        assert_eq!(read(&root.join("etc/resolv.conf")), text);

        // An old file is replaced.
        std::fs::write(root.join("etc/resolv.conf"), "nameserver 1.2.3.4\n").unwrap();
        write_resolv_conf(&root, text).unwrap();
        assert_eq!(read(&root.join("etc/resolv.conf")), text);

        // A dangling link (systemd-resolved's stub under an empty /run).
        let root = scratch("resolv-dangling");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            root.join("etc/resolv.conf"),
        )
        .unwrap();
        write_resolv_conf(&root, text).unwrap();
        let meta = std::fs::symlink_metadata(root.join("etc/resolv.conf")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(read(&root.join("etc/resolv.conf")), text);

        // A link whose target directory exists is followed.
        let root = scratch("resolv-link");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("run")).unwrap();
        symlink("../run/resolv.conf", root.join("etc/resolv.conf")).unwrap();
        write_resolv_conf(&root, text).unwrap();
        assert_eq!(read(&root.join("run/resolv.conf")), text);

        for name in ["resolv-noetc", "resolv-dangling", "resolv-link"] {
            let _ = std::fs::remove_dir_all(scratch(name));
        }
    }
}
