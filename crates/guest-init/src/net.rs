//! Network bring-up: configures `eth0` from `/.locald/net` (written by the
//! VMM when the VM has a virtio-net card) before the command or the agent
//! runs, so `run --net … -- CMD` has a network.
//!
//! Runs on init's only thread, before the optional root switch (busybox
//! lives in the initramfs). Format: `KEY=VALUE` lines —
//! `mode=dhcp|static|manual`, and for `static`: `address=A.B.C.D/P`,
//! optional `gateway=`, `dns=`. `dhcp` runs busybox `udhcpc` once in the
//! foreground with a small script that applies the lease (address,
//! default route, `/etc/resolv.conf`); `manual` only sets the link up.
//! Failures are printed and the boot goes on (a command without network
//! is more useful than no command).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::console;

/// The interface the first virtio-net card becomes.
const IFACE: &str = "eth0";
/// Busybox in the initramfs.
const BUSYBOX: &str = "/bin/busybox";
/// Where the lease script is written.
const SCRIPT: &str = "/.locald/udhcpc.sh";

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
    $B mkdir -p /etc
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
  fi
  ;;
esac
exit 0
"#;

/// What `/.locald/net` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    Dhcp,
    Static {
        address: String,
        gateway: Option<String>,
        dns: Option<String>,
    },
    Manual,
}

/// Parses the spec file; `Err` names what is wrong.
pub fn parse(text: &str) -> Result<NetSpec, String> {
    let mut mode = None;
    let (mut address, mut gateway, mut dns) = (None, None, None);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line '{line}' is not KEY=VALUE"));
        };
        let ok = |v: &str| {
            !v.is_empty()
                && v.len() <= 18
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
        };
        match k {
            "mode" => mode = Some(v.to_string()),
            "address" if ok(v) && v.contains('/') => address = Some(v.to_string()),
            "gateway" if ok(v) => gateway = Some(v.to_string()),
            "dns" if ok(v) => dns = Some(v.to_string()),
            "mac" => {}
            _ => return Err(format!("bad entry '{line}'")),
        }
    }
    match mode.as_deref() {
        Some("dhcp") | None => Ok(NetSpec::Dhcp),
        Some("manual") => Ok(NetSpec::Manual),
        Some("static") => Ok(NetSpec::Static {
            address: address.ok_or("static mode without address=")?,
            gateway,
            dns,
        }),
        Some(m) => Err(format!("unknown mode '{m}'")),
    }
}

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

/// Configures `eth0` if `spec_dir/net` exists.
pub fn configure(spec_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(spec_dir.join("net")) else {
        return;
    };
    let spec = match parse(&text) {
        Ok(s) => s,
        Err(e) => {
            console::error("/.locald/net", e);
            return;
        }
    };
    if let Err(e) = apply(&spec) {
        console::error("network setup", e);
    }
}

fn apply(spec: &NetSpec) -> Result<(), String> {
    busybox(&["ip", "link", "set", IFACE, "up"])?;
    match spec {
        NetSpec::Manual => Ok(()),
        NetSpec::Static {
            address,
            gateway,
            dns,
        } => {
            busybox(&["ip", "addr", "add", address, "dev", IFACE])?;
            if let Some(g) = gateway {
                busybox(&["ip", "route", "add", "default", "via", g, "dev", IFACE])?;
            }
            if let Some(d) = dns {
                let _ = std::fs::create_dir_all("/etc");
                std::fs::write("/etc/resolv.conf", format!("nameserver {d}\n"))
                    .map_err(|e| format!("/etc/resolv.conf: {e}"))?;
            }
            Ok(())
        }
        NetSpec::Dhcp => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(SCRIPT, UDHCPC_SCRIPT).map_err(|e| format!("{SCRIPT}: {e}"))?;
            std::fs::set_permissions(SCRIPT, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{SCRIPT}: {e}"))?;
            // Foreground, quit once leased, fail after 5 tries 2 s apart.
            busybox(&[
                "udhcpc", "-i", IFACE, "-f", "-q", "-n", "-t", "5", "-T", "2", "-s", SCRIPT,
            ])
            .map_err(|e| format!("DHCP on {IFACE} failed ({e})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            parse("mac=02:00:00:00:00:01\nmode=dhcp\n"),
            Ok(NetSpec::Dhcp)
        );
        assert_eq!(parse(""), Ok(NetSpec::Dhcp));
        assert_eq!(parse("mode=manual"), Ok(NetSpec::Manual));
        assert_eq!(
            parse("mode=static\naddress=10.0.0.2/24\ngateway=10.0.0.1\ndns=10.0.0.1\n"),
            Ok(NetSpec::Static {
                address: "10.0.0.2/24".into(),
                gateway: Some("10.0.0.1".into()),
                dns: Some("10.0.0.1".into()),
            })
        );
        for bad in [
            "mode=static",
            "mode=bogus",
            "garbage",
            "address=10.0.0.2",
            "gateway=1.2.3.4; rm -rf /",
            "dns=",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
