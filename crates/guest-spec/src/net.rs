//! `/.locald/net`: how the guest configures `eth0` (written when the VM has
//! a virtio-net card). Pure functions, any thread.
//!
//! Format: `KEY=VALUE` lines, each ending in a newline:
//! `mac=aa:bb:cc:dd:ee:ff` (optional, informational),
//! `mode=dhcp|static|manual` (absent means `dhcp`), and for `static`:
//! `address=A.B.C.D/P` (P 1–32), optional `gateway=A.B.C.D`,
//! `dns=A.B.C.D`. Decoding trims each line and skips empty ones; an unknown
//! or repeated key, a malformed value, `address`/`gateway`/`dns` without
//! `mode=static`, or a static mode without `address` is an error.

use std::net::Ipv4Addr;

/// How the guest configures its interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// DHCP (busybox `udhcpc`: address, route, DNS from the lease).
    Dhcp,
    /// A fixed address.
    Static {
        /// Interface address.
        address: Ipv4Addr,
        /// Prefix length, 1–32.
        prefix: u8,
        /// Default route, if any.
        gateway: Option<Ipv4Addr>,
        /// DNS server, if any.
        dns: Option<Ipv4Addr>,
    },
    /// Link up only; the command configures the rest.
    Manual,
}

/// Contents of `/.locald/net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The card's MAC address (informational: the device already has it).
    pub mac: Option<[u8; 6]>,
    /// Interface configuration.
    pub mode: NetMode,
}

/// Why `/.locald/net` was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    /// The file is not UTF-8.
    NotUtf8,
    /// A line is not `KEY=VALUE` (the line).
    NotKeyValue(String),
    /// Unknown key (the key).
    UnknownKey(String),
    /// A key appears twice (the key).
    Repeated(String),
    /// A value does not parse (key, value).
    BadValue(String, String),
    /// `mode=` names no known mode (the value).
    UnknownMode(String),
    /// `mode=static` without `address=`.
    MissingAddress,
    /// `address=`, `gateway=` or `dns=` without `mode=static` (the key).
    NotStatic(String),
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotUtf8 => write!(f, "not UTF-8 text"),
            Self::NotKeyValue(l) => write!(f, "line '{l}' is not KEY=VALUE"),
            Self::UnknownKey(k) => write!(f, "unknown key '{k}'"),
            Self::Repeated(k) => write!(f, "key '{k}' given twice"),
            Self::BadValue(k, v) => write!(f, "bad {k} '{v}'"),
            Self::UnknownMode(m) => write!(f, "unknown mode '{m}'"),
            Self::MissingAddress => write!(f, "static mode without address="),
            Self::NotStatic(k) => write!(f, "{k}= needs mode=static"),
        }
    }
}

impl std::error::Error for NetError {}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or `-` separators).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut it = s.split([':', '-']);
    for b in &mut m {
        let p = it.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    it.next().is_none().then_some(m)
}

/// Parses `A.B.C.D/P` with P in 1–32.
fn parse_cidr(v: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = v.split_once('/')?;
    if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = p.parse().ok().filter(|p| (1..=32).contains(p))?;
    Some((a.parse().ok()?, prefix))
}

impl NetSpec {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::new();
        if let Some(m) = &self.mac {
            s.push_str(&format!("mac={}\n", format_mac(m)));
        }
        match &self.mode {
            NetMode::Dhcp => s.push_str("mode=dhcp\n"),
            NetMode::Manual => s.push_str("mode=manual\n"),
            NetMode::Static {
                address,
                prefix,
                gateway,
                dns,
            } => {
                s.push_str(&format!("mode=static\naddress={address}/{prefix}\n"));
                if let Some(g) = gateway {
                    s.push_str(&format!("gateway={g}\n"));
                }
                if let Some(d) = dns {
                    s.push_str(&format!("dns={d}\n"));
                }
            }
        }
        s.into_bytes()
    }

    /// Parses the file (see the module documentation).
    pub fn decode(data: &[u8]) -> Result<Self, NetError> {
        let text = std::str::from_utf8(data).map_err(|_| NetError::NotUtf8)?;
        let mut mac = None;
        let mut mode = None;
        let (mut address, mut gateway, mut dns) = (None, None, None);
        let mut seen: Vec<&str> = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Some((k, v)) = line.split_once('=') else {
                return Err(NetError::NotKeyValue(line.to_string()));
            };
            if seen.contains(&k) {
                return Err(NetError::Repeated(k.to_string()));
            }
            let bad = || NetError::BadValue(k.to_string(), v.to_string());
            let ip = |v: &str| v.parse::<Ipv4Addr>().map_err(|_| bad());
            match k {
                "mac" => mac = Some(parse_mac(v).ok_or_else(bad)?),
                "mode" => mode = Some(v),
                "address" => address = Some(parse_cidr(v).ok_or_else(bad)?),
                "gateway" => gateway = Some(ip(v)?),
                "dns" => dns = Some(ip(v)?),
                _ => return Err(NetError::UnknownKey(k.to_string())),
            }
            seen.push(k);
        }
        let mode = match mode.unwrap_or("dhcp") {
            "static" => {
                let (address, prefix) = address.ok_or(NetError::MissingAddress)?;
                NetMode::Static {
                    address,
                    prefix,
                    gateway,
                    dns,
                }
            }
            m @ ("dhcp" | "manual") => {
                for (key, given) in [
                    ("address", address.is_some()),
                    ("gateway", gateway.is_some()),
                    ("dns", dns.is_some()),
                ] {
                    if given {
                        return Err(NetError::NotStatic(key.into()));
                    }
                }
                if m == "dhcp" {
                    NetMode::Dhcp
                } else {
                    NetMode::Manual
                }
            }
            m => return Err(NetError::UnknownMode(m.to_string())),
        };
        Ok(NetSpec { mac, mode })
    }
}
