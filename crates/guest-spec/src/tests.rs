//! Tests of the spec formats: byte-exact encodings (compatible with the
//! formats before this crate existed), encode → decode round trips for
//! representative and edge cases, a deterministic property loop, and
//! garbage that must give errors, never panics.

use super::*;
use std::net::Ipv4Addr;

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn share(tag: &str, path: &str, read_only: bool) -> ShareSpec {
    ShareSpec {
        tag: b(tag),
        path: b(path),
        read_only,
    }
}

fn static_net(gateway: Option<[u8; 4]>, dns: Option<[u8; 4]>) -> NetSpec {
    NetSpec {
        mac: Some([2, 0, 0, 0, 0, 1]),
        mode: NetMode::Static {
            address: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            gateway: gateway.map(Ipv4Addr::from),
            dns: dns.map(Ipv4Addr::from),
        },
    }
}

/// Encodes `spec` as archive files and decodes them back.
fn round_trip(spec: &CommandSpec) -> CommandSpec {
    let files = spec.files();
    for (path, mode, _) in &files {
        assert_eq!(*mode, FILE_MODE);
        assert!(path.starts_with(".locald/"), "{path}");
    }
    CommandSpec::decode_files(
        files
            .iter()
            .map(|(p, _, d)| (SpecFile::from_archive_path(p).unwrap(), d.as_slice())),
    )
    .unwrap()
}

fn full() -> CommandSpec {
    CommandSpec {
        argv: vec![b("echo"), b("hello world"), b(""), b("a'b\"c$d\n")],
        env: vec![(b("FOO"), b("bar=baz")), (b("EMPTY"), b(""))],
        workdir: Some(b("/srv/app")),
        agent: true,
        shares: vec![
            share("locald-share0", "/mnt/src", false),
            share("locald-share1", "/data", true),
        ],
        net: Some(NetSpec {
            mac: Some([2, 0, 0, 0, 0, 1]),
            mode: NetMode::Dhcp,
        }),
        root: Some(RootSpec {
            device: b("/dev/vda"),
            fstype: b("ext4"),
            read_only: true,
            overlay: false,
        }),
        rosetta: Some(RosettaSpec { tag: b("rosetta") }),
        image: Some(ImageSpec {
            user: Some(b("app:app")),
            hostname: Some(b("web")),
            resolv: true,
        }),
    }
}

#[test]
fn byte_exact_formats() {
    let files = full().files();
    let get = |f: SpecFile| {
        files
            .iter()
            .find(|(p, _, _)| *p == f.archive_path())
            .map(|(_, _, d)| d.as_slice())
            .unwrap()
    };
    assert_eq!(get(SpecFile::Argv), b"echo\0hello world\0\0a'b\"c$d\n\0");
    assert_eq!(get(SpecFile::Env), b"FOO=bar=baz\0EMPTY=\0");
    assert_eq!(get(SpecFile::Workdir), b"/srv/app");
    assert_eq!(get(SpecFile::Agent), b"1\n");
    assert_eq!(
        get(SpecFile::Shares),
        b"locald-share0\0/mnt/src\0rw\0locald-share1\0/data\0ro\0"
    );
    assert_eq!(get(SpecFile::Net), b"mac=02:00:00:00:00:01\nmode=dhcp\n");
    assert_eq!(get(SpecFile::Root), b"/dev/vda\0ext4\0ro\0");
    assert_eq!(get(SpecFile::Rosetta), b"rosetta");
    assert_eq!(
        get(SpecFile::Image),
        b"user=app:app\0hostname=web\0resolv=1\0"
    );
    // Archive order is SpecFile::ALL order.
    let order: Vec<&str> = files.iter().map(|f| f.0).collect();
    let all: Vec<&str> = SpecFile::ALL.iter().map(|f| f.archive_path()).collect();
    assert_eq!(order, all);
    assert_eq!(
        static_net(Some([10, 0, 0, 1]), Some([10, 0, 0, 1])).encode(),
        b"mac=02:00:00:00:00:01\nmode=static\naddress=10.0.0.2/24\ngateway=10.0.0.1\ndns=10.0.0.1\n"
    );
    let manual = NetSpec {
        mac: None,
        mode: NetMode::Manual,
    };
    assert_eq!(manual.encode(), b"mode=manual\n");
}

#[test]
fn paths_agree() {
    for f in SpecFile::ALL {
        assert_eq!(f.archive_path(), format!("{ARCHIVE_DIR}/{}", f.name()));
        assert_eq!(f.guest_path(), format!("{SPEC_DIR}/{}", f.name()));
        assert_eq!(SpecFile::from_archive_path(f.archive_path()), Some(f));
        assert_eq!(f.to_string(), f.guest_path());
    }
    assert_eq!(SpecFile::from_archive_path(".locald/udhcpc.sh"), None);
}

#[test]
fn round_trips() {
    let cases = [
        CommandSpec::default(),
        full(),
        // One empty argument is not "no command".
        CommandSpec {
            argv: vec![b("")],
            ..Default::default()
        },
        CommandSpec {
            argv: vec![b(""), b(""), b("")],
            env: vec![(b("A"), b("")), (b("A"), b("2"))],
            ..Default::default()
        },
        // Unicode everywhere.
        CommandSpec {
            argv: vec![b("écho"), b("日本語 ✓"), b("🦀")],
            env: vec![(b("ÜNÏ"), b("välue=with=equals"))],
            workdir: Some(b("/srv/été")),
            shares: vec![share("tág", "/mnt/ünï", true)],
            root: Some(RootSpec {
                device: b("/dev/disk/by-label/été"),
                fstype: b("ext4"),
                read_only: false,
                overlay: false,
            }),
            ..Default::default()
        },
        // Non-UTF-8 bytes (a hand-made spec; the VMM only writes UTF-8).
        CommandSpec {
            argv: vec![vec![0xff, b'\n', 0xfe]],
            root: Some(RootSpec {
                device: vec![b'/', 0xe9],
                fstype: vec![b'x', 0xff],
                read_only: true,
                overlay: true,
            }),
            ..Default::default()
        },
        // Many shares, both modes.
        CommandSpec {
            shares: (0..100)
                .map(|i| share(&format!("locald-share{i}"), &format!("/m/{i}"), i % 3 == 0))
                .collect(),
            ..Default::default()
        },
        CommandSpec {
            net: Some(static_net(None, None)),
            ..Default::default()
        },
        CommandSpec {
            net: Some(static_net(Some([10, 0, 0, 1]), None)),
            ..Default::default()
        },
        CommandSpec {
            net: Some(static_net(None, Some([1, 1, 1, 1]))),
            ..Default::default()
        },
        CommandSpec {
            net: Some(static_net(Some([10, 0, 0, 1]), Some([9, 9, 9, 9]))),
            ..Default::default()
        },
        CommandSpec {
            net: Some(NetSpec {
                mac: None,
                mode: NetMode::Manual,
            }),
            agent: true,
            ..Default::default()
        },
        CommandSpec {
            rosetta: Some(RosettaSpec {
                tag: vec![b'x'; rosetta::MAX_TAG_LEN],
            }),
            ..Default::default()
        },
    ];
    for spec in cases {
        assert_eq!(round_trip(&spec), spec);
    }
}

#[test]
fn nul_is_cut_and_empty_workdir_is_none() {
    let spec = CommandSpec {
        argv: vec![b("a\0b"), b("c")],
        env: vec![(b("K\0x"), b("v\0y"))],
        workdir: Some(b("/w\0z")),
        shares: vec![share("t\0u", "/p\0q", false)],
        root: Some(RootSpec {
            device: b("/dev/vda\0junk"),
            fstype: b("ext4\0"),
            read_only: false,
            overlay: true,
        }),
        rosetta: Some(RosettaSpec {
            tag: b("rosetta\0x"),
        }),
        ..Default::default()
    };
    let back = round_trip(&spec);
    assert_eq!(back.argv, [b("a"), b("c")]);
    assert_eq!(back.env, [(b("K"), b("v"))]);
    assert_eq!(back.workdir, Some(b("/w")));
    assert_eq!(back.shares, [share("t", "/p", false)]);
    assert_eq!(back.root.unwrap().device, b("/dev/vda"));
    assert_eq!(back.rosetta.unwrap().tag, b("rosetta"));
    let empty = CommandSpec {
        workdir: Some(Vec::new()),
        ..Default::default()
    };
    assert_eq!(empty.files().len(), 1, "written, as before");
    assert_eq!(round_trip(&empty).workdir, None);
}

#[test]
fn lenient_decoders() {
    // argv: a last entry without its NUL.
    assert_eq!(argv::decode(b"a\0b"), [b("a"), b("b")]);
    assert!(argv::decode(b"").is_empty());
    assert_eq!(argv::decode(b"\0"), [b("")]);
    // env: entries without '=' or with an empty key are skipped; the key
    // ends at the first '='.
    assert_eq!(env::decode(b"NOEQ\0=v\0A=b=c\0K\0"), [(b("A"), b("b=c"))]);
    assert_eq!(env::encode(&[("A=B", "v")]), b"A=B=v\0");
    assert_eq!(
        env::decode(&env::encode(&[("A=B", "v")])),
        [(b("A"), b("B=v"))]
    );
    // workdir: one trailing NUL or newline.
    assert_eq!(workdir::decode(b""), None);
    assert_eq!(workdir::decode(b"\0"), None);
    assert_eq!(workdir::decode(b"/srv\0"), Some(b("/srv")));
    assert_eq!(workdir::decode(b"/srv\n"), Some(b("/srv")));
    assert_eq!(workdir::decode(b"/srv\n\n\0x"), Some(b("/srv")));
    assert_eq!(workdir::decode(b"\n"), None);
    assert_eq!(workdir::decode(b"/a b"), Some(b("/a b")));
    // net: no mode means dhcp; blank lines and spaces are fine.
    assert_eq!(
        NetSpec::decode(b"").unwrap(),
        NetSpec {
            mac: None,
            mode: NetMode::Dhcp
        }
    );
    assert_eq!(
        NetSpec::decode(b"\n  mode=manual  \n\n").unwrap().mode,
        NetMode::Manual
    );
    assert_eq!(
        net::parse_mac("02-00-00-00-00-0a"),
        Some([2, 0, 0, 0, 0, 10])
    );
    // rosetta: one trailing newline.
    assert_eq!(RosettaSpec::decode(b"rosetta\n").unwrap().tag, b("rosetta"));
}

#[test]
fn root_mode_overlay() {
    // Old files decode as before, with no overlay.
    for (mode, read_only, overlay) in [
        ("rw", false, false),
        ("ro", true, false),
        ("ro+overlay", true, true),
        ("rw+overlay", false, true),
    ] {
        let data = format!("/dev/vda\0ext4\0{mode}\0");
        let spec = RootSpec::decode(data.as_bytes()).unwrap();
        assert_eq!(
            (spec.read_only, spec.overlay),
            (read_only, overlay),
            "{mode}"
        );
        assert_eq!(spec.encode(), data.as_bytes(), "byte-exact re-encoding");
    }
}

#[test]
fn garbage_is_an_error() {
    use RootError as R;
    assert_eq!(RootSpec::decode(b""), Err(R::FieldCount(0)));
    assert_eq!(RootSpec::decode(b"/dev/vda\0ext4\0"), Err(R::FieldCount(2)));
    assert_eq!(
        RootSpec::decode(b"/dev/vda\0ext4\0rw\0\0"),
        Err(R::FieldCount(4))
    );
    assert_eq!(RootSpec::decode(b"\0ext4\0rw\0"), Err(R::EmptyDevice));
    assert_eq!(
        RootSpec::decode(b"/dev/vda\0\0rw\0"),
        Err(R::EmptyFstype("/dev/vda".into()))
    );
    assert_eq!(
        RootSpec::decode(b"/dev/vda\0ext4\0rx\0")
            .unwrap_err()
            .to_string(),
        "MODE for /dev/vda must be 'rw' or 'ro', optionally followed by '+overlay', got 'rx'"
    );
    for bad in [
        &b"overlay"[..],
        b"+overlay",
        b"ro+",
        b"ro+overlay+overlay",
        b"ro+Overlay",
    ] {
        let mut data = b"/dev/vda\0ext4\0".to_vec();
        data.extend_from_slice(bad);
        data.push(0);
        assert!(
            matches!(RootSpec::decode(&data), Err(R::BadMode(..))),
            "{bad:?}"
        );
    }

    use SharesError as S;
    assert_eq!(shares::decode(b"t\0/x\0"), Err(S::FieldCount(2)));
    assert_eq!(shares::decode(b"\0/x\0rw\0"), Err(S::EmptyTag(0)));
    assert_eq!(
        shares::decode(b"t\0rel\0rw\0"),
        Err(S::NotAbsolute("rel".into()))
    );
    assert_eq!(shares::decode(b"t\0/x\0rx\0"), Err(S::BadMode("rx".into())));
    assert_eq!(shares::decode(b"t\0/x\0RW\0"), Err(S::BadMode("RW".into())));

    for bad in [
        &b"mode=static"[..],
        b"mode=bogus",
        b"garbage",
        b"address=10.0.0.2/24",
        b"mode=dhcp\ngateway=10.0.0.1",
        b"mode=static\naddress=10.0.0.2",
        b"mode=static\naddress=10.0.0.2/0",
        b"mode=static\naddress=10.0.0.2/33",
        b"mode=static\naddress=10.0.0.2/+8",
        b"mode=static\naddress=10.0.0.256/8",
        b"mode=static\naddress=10.0.0.2/24\ngateway=1.2.3.4; rm -rf /",
        b"mode=static\naddress=10.0.0.2/24\ndns=",
        b"mac=zz:00:00:00:00:00",
        b"mac=+2:00:00:00:00:00",
        b"mac=02:00:00:00:00",
        b"mode=dhcp\nmode=dhcp",
        b"color=blue",
        b"mode=dhcp\xff",
    ] {
        assert!(
            NetSpec::decode(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        NetSpec::decode(b"mode=static").unwrap_err().to_string(),
        "static mode without address="
    );

    for bad in [&b""[..], b"\n", b"a/b", b"a\0b", b"a\nb"] {
        assert!(RosettaSpec::decode(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        RosettaSpec::decode(&[b'x'; 37]),
        Err(RosettaError::TooLong(37))
    );

    // The whole-spec error names the file.
    let e =
        CommandSpec::decode_files([(SpecFile::Root, &b"/dev/vda\0ext4\0rx\0"[..])]).unwrap_err();
    assert_eq!(e.file(), SpecFile::Root);
    assert_eq!(
        e.to_string(),
        "bad /.locald/root: MODE for /dev/vda must be 'rw' or 'ro', optionally followed by '+overlay', got 'rx'"
    );
    assert!(std::error::Error::source(&e).is_some());
}

/// xorshift64*: a small deterministic generator (no dependencies).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// Bytes without NUL, biased towards the formats' special characters.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        const SPECIAL: &[u8] = b"=/\n :\xff\xc3\xa9";
        (0..self.below(max + 1))
            .map(|_| {
                if self.below(4) == 0 {
                    SPECIAL[self.below(SPECIAL.len())]
                } else {
                    1 + self.below(255) as u8
                }
            })
            .collect()
    }

    fn nonempty(&mut self, max: usize) -> Vec<u8> {
        let mut v = self.bytes(max);
        if v.is_empty() {
            v.push(b'x');
        }
        v
    }

    fn ip(&mut self) -> Ipv4Addr {
        Ipv4Addr::from(self.next() as u32)
    }

    fn spec(&mut self) -> CommandSpec {
        let argv = (0..self.below(5)).map(|_| self.bytes(12)).collect();
        // Keys: non-empty, no '=' (the key ends at the first '=').
        let env = (0..self.below(4))
            .map(|_| {
                let mut k = self.nonempty(8);
                k.retain(|&c| c != b'=');
                k.insert(0, b'K');
                (k, self.bytes(12))
            })
            .collect();
        // A workdir neither empty nor ending in a newline.
        let workdir = self.coin().then(|| {
            let mut w = self.bytes(12);
            w.insert(0, b'/');
            w.retain(|&c| c != b'\n');
            w
        });
        let shares = (0..self.below(4))
            .map(|_| {
                let mut path = self.bytes(10);
                path.insert(0, b'/');
                ShareSpec {
                    tag: self.nonempty(10),
                    path,
                    read_only: self.coin(),
                }
            })
            .collect();
        let mode = match self.below(3) {
            0 => NetMode::Dhcp,
            1 => NetMode::Manual,
            _ => NetMode::Static {
                address: self.ip(),
                prefix: 1 + self.below(32) as u8,
                gateway: self.coin().then(|| self.ip()),
                dns: self.coin().then(|| self.ip()),
            },
        };
        let net = self.coin().then(|| NetSpec {
            mac: self
                .coin()
                .then(|| self.next().to_le_bytes()[..6].try_into().unwrap()),
            mode,
        });
        let root = self.coin().then(|| RootSpec {
            device: self.nonempty(10),
            fstype: self.nonempty(6),
            read_only: self.coin(),
            overlay: self.coin(),
        });
        let rosetta = self.coin().then(|| {
            let mut tag = self.nonempty(rosetta::MAX_TAG_LEN);
            tag.retain(|&c| c != b'\n' && c != b'/');
            tag.insert(0, b'r');
            tag.truncate(rosetta::MAX_TAG_LEN);
            RosettaSpec { tag }
        });
        CommandSpec {
            argv,
            env,
            workdir,
            agent: self.coin(),
            shares,
            net,
            root,
            rosetta,
            image: self.coin().then(|| ImageSpec {
                user: self.coin().then(|| b("1000:1000")),
                hostname: self.coin().then(|| b("h")),
                resolv: self.coin(),
            }),
        }
    }
}

#[test]
fn random_specs_round_trip() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for i in 0..2000 {
        let spec = rng.spec();
        assert_eq!(round_trip(&spec), spec, "case {i}");
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let valid = full().files();
    for _ in 0..5000 {
        // Random bytes, or a valid file with a few bytes flipped.
        let (file, data) = if rng.coin() {
            let f = SpecFile::ALL[rng.below(SpecFile::ALL.len())];
            let mut d = rng.bytes(40);
            if rng.coin() {
                d.insert(rng.below(d.len() + 1), 0);
            }
            (f, d)
        } else {
            let (p, _, d) = &valid[rng.below(valid.len())];
            let mut d = d.clone();
            for _ in 0..1 + rng.below(3) {
                if !d.is_empty() {
                    let i = rng.below(d.len());
                    d[i] = rng.next() as u8;
                }
            }
            (SpecFile::from_archive_path(p).unwrap(), d)
        };
        if let Ok(spec) = CommandSpec::decode_files([(file, data.as_slice())]) {
            // Whatever decodes re-encodes to something that decodes the same.
            assert_eq!(round_trip(&spec), spec, "{file:?} {data:?}");
        }
    }
}
