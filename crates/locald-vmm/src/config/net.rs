//! What the user asks of the network card: the backend, the MAC and how
//! the guest configures its interface. Parsed from the CLI's
//! `--net tap[=NAME]|user[,OPTION…]`; pure data, used on the caller's thread.

use std::net::Ipv4Addr;

use locald_guest_spec::NetSpec;

/// Which host attachment the card uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A TAP device: an existing one by name (it must exist and be usable
    /// by us), or a new one (`None`, needs CAP_NET_ADMIN).
    Tap { name: Option<String> },
    /// User-mode networking through a `passt` process we spawn;
    /// `publish` maps host loopback TCP ports to guest ports; `offload`
    /// offers the guest checksum/TSO offloads that the VMM completes in
    /// software (opt-in, see docs/virtio-net.md); `host_loopback` lets the
    /// guest reach the host's loopback services at the gateway address
    /// (passt's gateway mapping; off by default: the guest is untrusted).
    User {
        publish: Vec<(u16, u16)>,
        offload: bool,
        host_loopback: bool,
    },
}

/// How the guest init configures `eth0`: DHCP, a static address or link
/// up only. The type of the `/.locald/net` spec file, shared with the
/// guest init (`locald-guest-spec`).
pub use locald_guest_spec::NetMode as GuestNet;

/// A virtio network card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Host side.
    pub backend: NetBackendConfig,
    /// Guest MAC address (a random locally administered one by default).
    pub mac: [u8; 6],
    /// Guest interface configuration.
    pub guest: GuestNet,
}

/// Why a `--net` spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --net '{spec}': {why}")]
pub struct NetSpecError {
    /// The spec as given.
    pub spec: String,
    /// What is wrong with it.
    pub why: String,
}

impl NetConfig {
    /// A card on `backend` with a random MAC and DHCP.
    pub fn new(backend: NetBackendConfig) -> Self {
        NetConfig {
            backend,
            mac: random_mac(),
            guest: GuestNet::Dhcp,
        }
    }

    /// Parses `tap[=NAME]|user` followed by `,mac=XX:…`, `,ip=ADDR/PREFIX`
    /// (or `ip=dhcp`, `ip=none`), `,gw=ADDR`, `,dns=ADDR` and, for `user`,
    /// `,publish=HOST_PORT:GUEST_PORT` (repeatable), `,offload=on|off` and
    /// `,host-loopback=on|off`.
    pub fn parse(spec: &str) -> Result<Self, NetSpecError> {
        let bad = |why: String| NetSpecError {
            spec: spec.to_string(),
            why,
        };
        let mut parts = spec.split(',');
        let kind = parts.next().unwrap_or_default();
        let backend = match kind.split_once('=') {
            None if kind == "tap" => NetBackendConfig::Tap { name: None },
            None if kind == "user" => NetBackendConfig::User {
                publish: Vec::new(),
                offload: false,
                host_loopback: false,
            },
            Some(("tap", name)) => {
                if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                    return Err(bad(format!(
                        "TAP name '{name}' must be 1-15 characters without '/' or spaces"
                    )));
                }
                NetBackendConfig::Tap {
                    name: Some(name.to_string()),
                }
            }
            _ => return Err(bad("start with 'tap', 'tap=NAME' or 'user'".into())),
        };
        let mut cfg = NetConfig::new(backend);
        let mut static_addr: Option<(Ipv4Addr, u8)> = None;
        let mut gateway = None;
        let mut dns = None;
        let ip = |v: &str, what: &str| -> Result<Ipv4Addr, NetSpecError> {
            v.parse()
                .map_err(|_| bad(format!("{what} '{v}' is not an IPv4 address")))
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("mac", v)) => {
                    cfg.mac = parse_mac(v).ok_or_else(|| {
                        bad(format!(
                            "MAC '{v}' must be six hex bytes like 02:00:00:00:00:01"
                        ))
                    })?;
                    if cfg.mac[0] & 1 != 0 {
                        return Err(bad(format!("MAC '{v}' is a multicast address")));
                    }
                }
                Some(("ip", "dhcp")) => cfg.guest = GuestNet::Dhcp,
                Some(("ip", "none")) => cfg.guest = GuestNet::Manual,
                Some(("ip", v)) => {
                    let (a, p) = v.split_once('/').ok_or_else(|| {
                        bad(format!("ip '{v}' must be ADDR/PREFIX, dhcp or none"))
                    })?;
                    let prefix: u8 = p
                        .parse()
                        .ok()
                        .filter(|p| (1..=32).contains(p))
                        .ok_or_else(|| bad(format!("prefix '/{p}' must be 1-32")))?;
                    static_addr = Some((ip(a, "ip")?, prefix));
                }
                Some(("gw", v)) => gateway = Some(ip(v, "gw")?),
                Some(("dns", v)) => dns = Some(ip(v, "dns")?),
                Some(("publish", v)) => {
                    let NetBackendConfig::User { publish, .. } = &mut cfg.backend else {
                        return Err(bad(
                            "publish= needs 'user' (forward ports yourself with a TAP)".into(),
                        ));
                    };
                    let port = |s: &str| s.parse::<u16>().ok().filter(|&p| p != 0);
                    let pair = v
                        .split_once(':')
                        .and_then(|(h, g)| Some((port(h)?, port(g)?)))
                        .ok_or_else(|| {
                            bad(format!(
                                "publish '{v}' must be HOST_PORT:GUEST_PORT (1-65535)"
                            ))
                        })?;
                    publish.push(pair);
                }
                Some(("offload", v)) => {
                    let NetBackendConfig::User { offload, .. } = &mut cfg.backend else {
                        return Err(bad(
                            "offload= is for 'user' (a TAP always takes offloads)".into()
                        ));
                    };
                    *offload = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(format!("offload '{v}' must be on or off"))),
                    };
                }
                Some(("host-loopback", v)) => {
                    let NetBackendConfig::User { host_loopback, .. } = &mut cfg.backend else {
                        return Err(bad(
                            "host-loopback= is for 'user' (a TAP reaches what you route to it)"
                                .into(),
                        ));
                    };
                    *host_loopback = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(format!("host-loopback '{v}' must be on or off"))),
                    };
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option '{opt}' (use mac=, ip=, gw=, dns=, publish=, offload= \
                         or host-loopback=)"
                    )))
                }
            }
        }
        if let Some((address, prefix)) = static_addr {
            cfg.guest = GuestNet::Static {
                address,
                prefix,
                gateway,
                dns,
            };
        } else if gateway.is_some() || dns.is_some() {
            return Err(bad("gw= and dns= need a static ip=ADDR/PREFIX".into()));
        }
        Ok(cfg)
    }

    /// The `/.locald/net` spec for the guest init: this card's MAC and
    /// guest configuration (encoded by `locald-guest-spec` as `KEY=VALUE`
    /// lines).
    pub fn guest_spec(&self) -> NetSpec {
        NetSpec {
            mac: Some(self.mac),
            mode: self.guest.clone(),
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`, and its parser (also `-` separators).
pub use locald_guest_spec::net::{format_mac, parse_mac};

/// A random unicast, locally administered MAC (`x2:…`, `x6:…`, …).
pub fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    // SAFETY: getentropy writes exactly `m.len()` (≤ 256) bytes into `m`.
    let rc = unsafe { libc::getentropy(m.as_mut_ptr().cast(), m.len()) };
    if rc != 0 {
        // Practically unreachable; still unique enough per host process.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let pid = std::process::id();
        m[1..5].copy_from_slice(&(t as u32 ^ pid).to_le_bytes());
        m[5] = (t >> 32) as u8;
    }
    m[0] = (m[0] & 0xfc) | 0x02;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let c = NetConfig::parse("user").unwrap();
        assert_eq!(
            c.backend,
            NetBackendConfig::User {
                publish: Vec::new(),
                offload: false,
                host_loopback: false,
            },
            "host loopback is off unless asked for"
        );
        let c = NetConfig::parse("user,host-loopback=on").unwrap();
        assert!(matches!(
            c.backend,
            NetBackendConfig::User {
                host_loopback: true,
                offload: false,
                ..
            }
        ));
        let c = NetConfig::parse("user,host-loopback=on,host-loopback=off").unwrap();
        assert!(matches!(
            c.backend,
            NetBackendConfig::User {
                host_loopback: false,
                ..
            }
        ));
        let c = NetConfig::parse("user,offload=on").unwrap();
        assert!(matches!(
            c.backend,
            NetBackendConfig::User { offload: true, .. }
        ));
        for bad in [
            "user,offload=yes",
            "tap,offload=on",
            "user,host-loopback=yes",
            "user,host-loopback",
            "tap,host-loopback=on",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(c.guest, GuestNet::Dhcp);
        assert_eq!(c.mac[0] & 3, 2, "locally administered unicast");
        let c =
            NetConfig::parse("user,publish=8080:80,publish=2222:22,mac=02:00:00:00:00:09").unwrap();
        assert_eq!(
            c.backend,
            NetBackendConfig::User {
                publish: vec![(8080, 80), (2222, 22)],
                offload: false,
                host_loopback: false,
            }
        );
        assert_eq!(c.mac, [2, 0, 0, 0, 0, 9]);
        let c = NetConfig::parse("tap=ld0,ip=10.0.0.2/24,gw=10.0.0.1,dns=10.0.0.1").unwrap();
        assert_eq!(
            c.backend,
            NetBackendConfig::Tap {
                name: Some("ld0".into())
            }
        );
        assert_eq!(
            c.guest,
            GuestNet::Static {
                address: "10.0.0.2".parse().unwrap(),
                prefix: 24,
                gateway: Some("10.0.0.1".parse().unwrap()),
                dns: Some("10.0.0.1".parse().unwrap()),
            }
        );
        let spec = String::from_utf8(c.guest_spec().encode()).unwrap();
        assert!(spec.contains("mode=static\naddress=10.0.0.2/24\ngateway=10.0.0.1\n"));
        assert_eq!(
            NetConfig::parse("tap,ip=none").unwrap().guest,
            GuestNet::Manual
        );
        for bad in [
            "",
            "bridge",
            "tap=",
            "tap=a/b",
            "tap=waytoolongname123",
            "user,bogus",
            "user,mac=01:00:00:00:00:00",
            "user,mac=zz",
            "user,ip=10.0.0.1",
            "user,ip=10.0.0.1/33",
            "user,gw=10.0.0.1",
            "user,publish=80",
            "user,publish=0:80",
            "tap,publish=1:2",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_round_trip() {
        let m = random_mac();
        assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
    }
}
