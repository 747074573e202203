//! Fuzzes the library-side parsing and validation of what the CLI passes
//! in: `--disk`/`--rootfs` (`DiskConfig::parse`), `--memory`/`--size`
//! (`config::parse_memory_size`), `--net` (`NetConfig::parse`, with its
//! `publish=`/`mac=`/`ip=`), `--share` and `--share-cache`
//! (`ShareConfig::parse`, `ShareCache::parse`, `check_shares`),
//! `--publish` (`publish::PortMap::parse`), MAC addresses, VM names
//! (`instance::check_name`), and whole `VmConfig`s through
//! `VmConfig::validate` (what `VirtualMachine::new` checks first). The
//! clap argument structs and `config_from` live in the CLI binary crate
//! and are not reachable from here; everything they call is.
//!
//! Oracles, besides "no panic":
//! - every accepted spec round-trips: printing the parsed value in the
//!   documented syntax and parsing it again gives the same value (disks,
//!   shares, nets, port maps, MACs, memory sizes in MiB/G);
//! - accepted values respect their documented limits (unicast MAC, TAP
//!   name 1-15 bytes, prefix 1-32, ports non-zero, memory = number x
//!   unit, share guest paths absolute/normalised/unique, VM names stay
//!   one component under the runtime directory);
//! - a `VmConfig` that validates can be run: counts and sizes within
//!   limits, its files exist, and its timeouts can become deadlines
//!   (`Instant::now() + t`, which `run()` and `wait_ready()` compute).

#![no_main]

#[path = "common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Input;
use libfuzzer_sys::fuzz_target;
use locald_vmm::config::{
    self, CacheMode, DiskConfig, GuestNet, NetBackendConfig, NetConfig, RootfsConfig, ShareCache,
    ShareConfig, VmConfig, VsockConfig,
};
use locald_vmm::devices::virtio::fs::config::check_shares;
use locald_vmm::devices::virtio::net::config::{format_mac, parse_mac};
use locald_vmm::instance;
use locald_vmm::publish::PortMap;

/// A real file and directory that `@` in a path stands for, so validation
/// can get past its existence checks.
fn fixtures() -> &'static (PathBuf, PathBuf) {
    static F: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("locald-fuzz-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("disk.img");
        std::fs::write(&f, [0u8; 512]).unwrap();
        (f, d)
    })
}

fn cache_name(c: CacheMode) -> &'static str {
    match c {
        CacheMode::Writeback => "writeback",
        CacheMode::Writethrough => "writethrough",
        CacheMode::Unsafe => "unsafe",
    }
}

fn check_disk(spec: &str) -> Option<DiskConfig> {
    let d = DiskConfig::parse(spec).ok()?;
    let path = d.path.to_str().expect("parsed from a str");
    assert!(!path.is_empty() && !path.contains(','), "{spec:?}");
    let mut again = format!("{path},{}", if d.read_only { "ro" } else { "rw" });
    again += &format!(",cache={}", cache_name(d.cache));
    if let Some(id) = &d.id {
        assert!(!id.contains(','));
        again += &format!(",id={id}");
    }
    assert_eq!(
        DiskConfig::parse(&again).ok(),
        Some(d.clone()),
        "{spec:?} -> {again:?}"
    );
    Some(d)
}

fn check_memory(s: &str) -> Option<u64> {
    let m = config::parse_memory_size(s).ok()?;
    assert_eq!(
        config::parse_memory_size(&m.to_string()).ok(),
        Some(m),
        "{s:?}"
    );
    assert_eq!(
        config::parse_memory_size(&format!("{m}M")).ok(),
        Some(m),
        "{s:?}"
    );
    if m % 1024 == 0 {
        assert_eq!(
            config::parse_memory_size(&format!("{}g", m / 1024)).ok(),
            Some(m)
        );
    }
    // The number times its unit, nothing else.
    let t = s.trim();
    let unit = match t.chars().last() {
        Some('m' | 'M') => 1,
        Some('g' | 'G') => 1024,
        Some('t' | 'T') => 1 << 20,
        _ => 0,
    };
    let digits = if unit == 0 { t } else { &t[..t.len() - 1] };
    let n: u64 = digits.trim().parse().expect("accepted size has a number");
    assert_eq!(Some(m), n.checked_mul(unit.max(1)), "{s:?}");
    Some(m)
}

fn net_spec(c: &NetConfig) -> String {
    let mut s = match &c.backend {
        NetBackendConfig::Tap { name: None } => "tap".to_string(),
        NetBackendConfig::Tap { name: Some(n) } => format!("tap={n}"),
        NetBackendConfig::User { .. } => "user".to_string(),
    };
    s += &format!(",mac={}", format_mac(&c.mac));
    match &c.guest {
        GuestNet::Dhcp => s += ",ip=dhcp",
        GuestNet::Manual => s += ",ip=none",
        GuestNet::Static {
            address,
            prefix,
            gateway,
            dns,
        } => {
            s += &format!(",ip={address}/{prefix}");
            if let Some(g) = gateway {
                s += &format!(",gw={g}");
            }
            if let Some(d) = dns {
                s += &format!(",dns={d}");
            }
        }
    }
    if let NetBackendConfig::User {
        publish,
        offload,
        host_loopback,
    } = &c.backend
    {
        for (h, g) in publish {
            s += &format!(",publish={h}:{g}");
        }
        if *offload {
            s += ",offload=on";
        }
        if *host_loopback {
            s += ",host-loopback=on";
        }
    }
    s
}

fn check_net(spec: &str) -> Option<NetConfig> {
    let c = NetConfig::parse(spec).ok()?;
    assert_eq!(c.mac[0] & 1, 0, "multicast MAC accepted: {spec:?}");
    match &c.backend {
        NetBackendConfig::Tap { name: Some(n) } => {
            assert!((1..=15).contains(&n.len()) && !n.contains(['/', ' ', '\0', ',']));
        }
        NetBackendConfig::Tap { name: None } => {}
        NetBackendConfig::User { publish, .. } => {
            assert!(publish.iter().all(|&(h, g)| h != 0 && g != 0));
        }
    }
    if let GuestNet::Static { prefix, .. } = c.guest {
        assert!((1..=32).contains(&prefix));
    }
    let gs = String::from_utf8(c.guest_spec().encode()).expect("net spec is text");
    assert_eq!(
        locald_guest_spec::NetSpec::decode(gs.as_bytes()).as_ref(),
        Ok(&c.guest_spec()),
        "{gs:?}"
    );
    assert!(
        gs.starts_with(&format!("mac={}\n", format_mac(&c.mac))),
        "{gs:?}"
    );
    assert!(gs.lines().all(|l| l.contains('=')) && !gs.contains('\0'));
    let again = net_spec(&c);
    assert_eq!(
        NetConfig::parse(&again).ok(),
        Some(c.clone()),
        "{spec:?} -> {again:?}"
    );
    Some(c)
}

/// The rules `check_shares` documents, checked independently.
fn guest_path_ok(g: &str) -> bool {
    g.starts_with('/')
        && g.len() <= 1024
        && !g.contains('\0')
        && g.split('/').any(|p| !p.is_empty())
        && g.split('/').all(|p| p != "." && p != "..")
}

fn normalised(g: &str) -> String {
    let parts: Vec<&str> = g.split('/').filter(|p| !p.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

fn check_share(spec: &str, cache: ShareCache) -> Option<ShareConfig> {
    let s = ShareConfig::parse(spec, cache).ok()?;
    let host = s.host_dir.to_str().expect("parsed from a str");
    assert!(!host.is_empty());
    assert!(!s.guest_path.contains(':'), "{spec:?}");
    let again = format!(
        "{host}:{}:{}",
        s.guest_path,
        if s.read_only { "ro" } else { "rw" }
    );
    assert_eq!(
        ShareConfig::parse(&again, cache).ok(),
        Some(s.clone()),
        "{again:?}"
    );
    Some(s)
}

fn check_shares_oracle(shares: &[ShareConfig]) {
    let dir = &fixtures().1;
    let real: Vec<ShareConfig> = shares
        .iter()
        .map(|s| ShareConfig {
            host_dir: dir.clone(),
            ..s.clone()
        })
        .collect();
    if check_shares(&real).is_ok() {
        let mut seen = std::collections::HashSet::new();
        for s in &real {
            assert!(guest_path_ok(&s.guest_path), "{:?}", s.guest_path);
            assert!(
                seen.insert(normalised(&s.guest_path)),
                "duplicate {:?}",
                s.guest_path
            );
        }
    }
}

fn check_port_map(s: &str) -> Option<PortMap> {
    let m = PortMap::parse(s).ok()?;
    assert!(m.host != 0 && m.guest != 0);
    let again = format!("{}:{}", m.host, m.guest);
    assert_eq!(PortMap::parse(&again).ok(), Some(m));
    Some(m)
}

fn check_name(s: &str) {
    if instance::check_name(s).is_ok() {
        assert!(!s.contains('/') && s != "." && s != ".." && !s.contains('\0'));
        let d = instance::dir(s);
        assert_eq!(
            d.parent(),
            Some(locald_vmm::runtime_base().join("vms").as_path())
        );
        assert_eq!(d.file_name().and_then(|n| n.to_str()), Some(s));
        assert!(instance::control_path(s).starts_with(&d));
    }
}

fn check_mac(s: &str) {
    if let Some(m) = parse_mac(s) {
        assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        assert_eq!(s.len(), 17, "{s:?}");
    }
}

fn at_fixture(p: &Path, file: bool) -> PathBuf {
    match p.to_str() {
        Some(s) if s.starts_with('@') => {
            if file {
                fixtures().0.clone()
            } else {
                fixtures().1.clone()
            }
        }
        _ => p.to_path_buf(),
    }
}

fn duration(inp: &mut Input) -> Duration {
    match inp.u8() % 5 {
        0 => Duration::from_secs(inp.u64()),
        1 => Duration::new(inp.u64(), inp.u32() % 1_000_000_000),
        2 => Duration::from_secs(u64::from(inp.u16())),
        3 => Duration::from_secs_f64(f64::from(inp.u32()) / 1000.0),
        _ => Duration::from_millis(u64::from(inp.u32())),
    }
}

fn vm_config(inp: &mut Input) {
    let vcpus = inp.u8();
    let n_disks = usize::from(inp.u8() % 4);
    let n_shares = usize::from(inp.u8() % 4);
    let flags = inp.u8();
    let cid = match inp.u8() % 3 {
        0 => None,
        1 => Some(u64::from(inp.u8())),
        _ => Some(inp.u64()),
    };
    let timeout = (flags & 0x10 != 0).then(|| duration(inp));
    let agent_timeout = duration(inp);
    let text = String::from_utf8_lossy(inp.rest()).into_owned();
    let mut lines = text.split('\n');
    let mut line = || lines.next().unwrap_or("");
    let memory_mib = check_memory(line()).unwrap_or(128);
    let mut disks = Vec::new();
    for _ in 0..n_disks {
        if let Some(mut d) = check_disk(line()) {
            d.path = at_fixture(&d.path, true);
            disks.push(d);
        }
    }
    let rootfs = if flags & 1 != 0 {
        check_disk(line()).map(|mut d| {
            d.path = at_fixture(&d.path, true);
            RootfsConfig {
                disk: d,
                fstype: "ext4".into(),
            }
        })
    } else {
        None
    };
    let cache = ShareCache::parse(line()).unwrap_or_default();
    let mut shares = Vec::new();
    for _ in 0..n_shares {
        if let Some(mut s) = check_share(line(), cache) {
            s.host_dir = at_fixture(&s.host_dir, false);
            shares.push(s);
        }
    }
    let net = if flags & 2 != 0 {
        check_net(line())
    } else {
        None
    };
    let command = match flags >> 5 {
        0 => None,
        1 => Some(Vec::new()),
        _ => Some(vec![line().to_string()]),
    };
    let cfg = VmConfig {
        vcpus,
        memory_mib,
        disks,
        rootfs,
        shares,
        net,
        command,
        rng: flags & 4 != 0,
        agent: flags & 8 != 0,
        vsock: cid.map(|guest_cid| VsockConfig {
            guest_cid,
            uds_path: "/nonexistent/v.sock".into(),
        }),
        timeout,
        agent_timeout,
        ..VmConfig::default()
    };
    if cfg.validate().is_err() {
        return;
    }
    assert!((1..=config::MAX_VCPUS).contains(&cfg.vcpus));
    assert!((config::MIN_MEMORY_MIB..=config::MAX_MEMORY_MIB).contains(&cfg.memory_mib));
    assert!(cfg.memory_mib.checked_shl(20).is_some());
    if let Some(c) = &cfg.command {
        assert!(!c.is_empty());
    }
    let mut devices = 0;
    for d in cfg.all_disks() {
        devices += 1;
        assert!(d
            .id
            .as_ref()
            .is_none_or(|id| id.len() <= config::DISK_ID_MAX));
        assert!(d.path.exists());
    }
    devices += usize::from(cfg.rng)
        + usize::from(cfg.vsock.is_some() || cfg.agent)
        + usize::from(cfg.net.is_some())
        + cfg.shares.len();
    assert!(devices <= config::MAX_VIRTIO_DEVICES);
    if let Some(v) = &cfg.vsock {
        assert!((3..=u64::from(u32::MAX - 1)).contains(&v.guest_cid));
    }
    let mut seen = std::collections::HashSet::new();
    for s in &cfg.shares {
        assert!(s.host_dir.is_dir());
        assert!(guest_path_ok(&s.guest_path), "{:?}", s.guest_path);
        assert!(seen.insert(normalised(&s.guest_path)));
    }
    let now = Instant::now();
    if let Some(t) = cfg.timeout {
        assert!(
            now.checked_add(t).is_some(),
            "accepted timeout {t:?} overflows a deadline"
        );
    }
    assert!(
        now.checked_add(cfg.agent_timeout).is_some(),
        "accepted agent timeout {:?} overflows a deadline",
        cfg.agent_timeout
    );
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    if sel % 9 == 8 {
        vm_config(&mut inp);
        return;
    }
    let text = String::from_utf8_lossy(inp.rest()).into_owned();
    match sel % 9 {
        0 => {
            check_disk(&text);
        }
        1 => {
            check_memory(&text);
        }
        2 => {
            check_net(&text);
        }
        3 => {
            let cache = ShareCache::parse(&text);
            if let Some(c) = cache {
                assert_eq!(ShareCache::parse(c.name()), Some(c));
            }
            let shares: Vec<ShareConfig> = text
                .split('\n')
                .filter_map(|l| check_share(l, cache.unwrap_or_default()))
                .collect();
            check_shares_oracle(&shares);
        }
        4 => {
            check_port_map(&text);
        }
        5 => check_name(&text),
        6 => check_mac(&text),
        _ => {
            // One spec of each kind from the same text.
            check_disk(&text);
            check_memory(&text);
            check_net(&text);
            check_share(&text, ShareCache::Auto);
            check_port_map(&text);
            check_name(&text);
            check_mac(&text);
        }
    }
});
