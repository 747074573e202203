//! Local inputs and the cache: OCI layout directories, OCI archives,
//! `docker save` tarballs (old and Docker 25+ layouts), platform
//! selection, bad inputs (nothing cached), list/remove/prune, sweeping
//! after a crash, and concurrent pulls from 2 threads and 2 processes.

mod support;

use std::path::Path;

use locald_image::testing::{
    build_image, build_index, docker_archive, oci_archive, sample_image, Blob, Comp, Entry,
    ImageSpec, OciLayout, TempDir,
};
use locald_image::unpack::{Limits, Unpacker};
use locald_image::{
    Arch, ImageError, ImageSource, ImageStore, NoProgress, ProgressEvent, PullOptions,
};
use support::{assert_blobs_valid, blob_names, cache_contents, run_two_children};

fn opts(arch: Arch) -> PullOptions {
    PullOptions {
        arch,
        ..PullOptions::default()
    }
}

fn layout_src(dir: &Path, tag: Option<&str>) -> ImageSource {
    ImageSource::OciLayout {
        dir: dir.to_path_buf(),
        tag: tag.map(str::to_string),
    }
}

/// Unpacks a pulled image and checks the sample image's tree.
fn check_sample_tree(img: &locald_image::PulledImage, arch: Arch) {
    let t = TempDir::new("unpacked");
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut u = Unpacker::new(&root, Limits::default()).unwrap();
    for l in &img.layers {
        let f = std::fs::File::open(&l.path).unwrap();
        u.apply_layer(f, &l.media_type).unwrap();
    }
    u.finish().unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("bin/app")).unwrap(),
        format!("app for {arch}\n")
    );
    assert!(!root.join("etc/gone").exists(), "whiteout");
    assert!(!root.join("srv/old").exists(), "opaque dir");
    assert_eq!(
        std::fs::read_to_string(root.join("srv/new")).unwrap(),
        "layer 2\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/layer3")).unwrap(),
        "plain\n"
    );
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(root.join("bin/app")).unwrap();
    let b = std::fs::metadata(root.join("bin/app-link")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link");
}

fn check_sample_config(img: &locald_image::PulledImage) {
    let c = &img.config;
    assert_eq!(
        c.entrypoint.as_deref(),
        Some(&["/bin/app".to_string(), "--serve".to_string()][..])
    );
    assert_eq!(
        c.cmd.as_deref(),
        Some(&["--port".to_string(), "8080".to_string()][..])
    );
    assert_eq!(c.env, ["PATH=/usr/bin:/bin", "MODE=test"]);
    assert_eq!(c.working_dir.as_deref(), Some("/srv"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));
    assert_eq!(c.exposed_ports, ["53/udp", "8080/tcp"]);
    assert_eq!(
        c.labels.get("org.example.test").map(String::as_str),
        Some("yes")
    );
    assert_eq!(c.os, "linux");
}

#[test]
fn oci_layout_dir_and_cached_reuse() {
    let t = TempDir::new("layout");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, Some("v1"));
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let mut events = Vec::new();
    let mut record = |e: &ProgressEvent<'_>| events.push(format!("{e:?}"));
    let got = store
        .pull(
            &layout_src(&l.dir, Some("v1")),
            &opts(Arch::Amd64),
            &mut record,
        )
        .unwrap();
    assert_eq!(got.manifest_digest, img.manifest.digest);
    assert_eq!(got.config_digest, img.config.digest);
    assert_eq!(got.key(), img.manifest.hex());
    assert_eq!(got.layers.len(), 3);
    for (g, want) in got.layers.iter().zip(&img.layers) {
        assert_eq!(g.digest, want.digest);
        assert_eq!(g.media_type, want.media_type);
        assert_eq!(std::fs::read(&g.path).unwrap(), want.data);
    }
    check_sample_config(&got);
    check_sample_tree(&got, Arch::Amd64);
    assert_eq!(cache_contents(store.dir()).0, blob_names(&img));
    assert_blobs_valid(store.dir());
    assert_eq!(
        events
            .iter()
            .filter(|e| e.starts_with("LayerVerified"))
            .count(),
        3
    );
    assert!(events.last().unwrap().starts_with("Cached"));

    // Unchanged input: served from the cache, nothing read.
    let mut events2 = Vec::new();
    let mut record2 = |e: &ProgressEvent<'_>| events2.push(format!("{e:?}"));
    let again = store
        .pull(
            &layout_src(&l.dir, Some("v1")),
            &opts(Arch::Amd64),
            &mut record2,
        )
        .unwrap();
    assert_eq!(again, got);
    assert_eq!(events2.len(), 2, "{events2:?}"); // Resolving, Cached
                                                 // And offline by its key.
    let key = layout_src(&l.dir, Some("v1")).key();
    assert_eq!(store.get(&key).unwrap().unwrap(), got);

    // The layout's only image is picked without a tag, too.
    let untagged = store
        .pull(
            &layout_src(&l.dir, None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(untagged.manifest_digest, got.manifest_digest);
}

#[test]
fn oci_archive_tarball() {
    let t = TempDir::new("ociarchive");
    let img = build_image(&sample_image(Arch::Arm64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, Some("latest"));
    let tar = t.path().join("image.tar");
    oci_archive(&l.dir, &tar);
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let src = ImageSource::parse(tar.to_str().unwrap()).unwrap();
    assert!(matches!(src, ImageSource::Archive { .. }));
    let got = store
        .pull(&src, &opts(Arch::Arm64), &mut NoProgress)
        .unwrap();
    assert_eq!(got.manifest_digest, img.manifest.digest);
    check_sample_tree(&got, Arch::Arm64);
    assert_eq!(cache_contents(store.dir()).0, blob_names(&img));
    // `PATH:TAG` form.
    let tagged = ImageSource::parse(&format!("{}:latest", tar.display())).unwrap();
    assert!(matches!(tagged, ImageSource::Archive { tag: Some(ref t), .. } if t == "latest"));
    store
        .pull(&tagged, &opts(Arch::Arm64), &mut NoProgress)
        .unwrap();
}

#[test]
fn docker_save_tarball_old_layout() {
    let t = TempDir::new("dockersave");
    let img = build_image(&sample_image(Arch::Amd64));
    let tar = t.path().join("save.tar");
    docker_archive(&img, "example/app:1.0", &tar);
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let src = ImageSource::Archive {
        path: tar.clone(),
        tag: None,
    };
    let got = store
        .pull(&src, &opts(Arch::Amd64), &mut NoProgress)
        .unwrap();
    assert_eq!(got.config_digest, img.config.digest);
    assert_eq!(got.layers.len(), 3);
    // docker save holds plain tars: the layers are the diff ids.
    for (g, tar) in got.layers.iter().zip(&img.layer_tars) {
        assert_eq!(g.digest, locald_image::cache::sha256_digest(tar));
        assert_eq!(g.media_type, "application/vnd.oci.image.layer.v1.tar");
    }
    check_sample_config(&got);
    check_sample_tree(&got, Arch::Amd64);
    assert_blobs_valid(store.dir());
    // By tag (short and full forms), and a wrong tag is one clear error.
    for tag in ["1.0", "example/app:1.0", "docker.io/example/app:1.0"] {
        let s = ImageSource::Archive {
            path: tar.clone(),
            tag: Some(tag.to_string()),
        };
        store.pull(&s, &opts(Arch::Amd64), &mut NoProgress).unwrap();
    }
    let e = store
        .pull(
            &ImageSource::Archive {
                path: tar.clone(),
                tag: Some("2.0".into()),
            },
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(e.to_string().contains("example/app:1.0"), "{e}");
}

#[test]
fn docker_save_tarball_docker25_layout() {
    // Docker 25+ writes an OCI layout plus manifest.json; the layout wins.
    let t = TempDir::new("docker25");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, Some("docker.io/example/app:2"));
    let m = serde_json::json!([{
        "Config": format!("blobs/sha256/{}", img.config.hex()),
        "RepoTags": ["example/app:2"],
        "Layers": img.layers.iter().map(|b| format!("blobs/sha256/{}", b.hex())).collect::<Vec<_>>(),
    }]);
    std::fs::write(l.dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let tar = t.path().join("save25.tar");
    oci_archive(&l.dir, &tar);
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    for tag in [None, Some("2"), Some("example/app:2")] {
        let got = store
            .pull(
                &ImageSource::Archive {
                    path: tar.clone(),
                    tag: tag.map(str::to_string),
                },
                &opts(Arch::Amd64),
                &mut NoProgress,
            )
            .unwrap();
        assert_eq!(got.manifest_digest, img.manifest.digest);
    }
}

#[test]
fn multi_platform_index_in_a_layout() {
    let t = TempDir::new("index");
    let amd = build_image(&sample_image(Arch::Amd64));
    let arm = build_image(&sample_image(Arch::Arm64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    let idx = l.add_index(&[&amd, &arm], Some("multi"));
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let a = store
        .pull(
            &layout_src(&l.dir, Some("multi")),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(a.manifest_digest, amd.manifest.digest);
    assert_eq!(a.index_digest.as_deref(), Some(idx.digest.as_str()));
    assert_eq!(a.config.architecture, "amd64");
    let t2 = TempDir::new("index-arm");
    let store2 = ImageStore::open(t2.path()).unwrap();
    let b = store2
        .pull(
            &layout_src(&l.dir, Some("multi")),
            &opts(Arch::Arm64),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(b.manifest_digest, arm.manifest.digest);
    check_sample_tree(&b, Arch::Arm64);
}

#[test]
fn missing_platform_is_one_error_and_caches_nothing() {
    let t = TempDir::new("noplat");
    let arm = build_image(&sample_image(Arch::Arm64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_index(&[&arm], Some("armonly"));
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let e = store
        .pull(
            &layout_src(&l.dir, Some("armonly")),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::PlatformNotFound { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "no linux/amd64 image in the index; it has: linux/arm64"
    );
    assert_eq!(cache_contents(store.dir()), (vec![], vec![]));
}

/// Builds a layout whose blob `victim` is replaced by `data`.
fn tampered_layout(
    dir: &Path,
    img: &locald_image::testing::BuiltImage,
    victim: &Blob,
    data: &[u8],
) {
    let mut l = OciLayout::create(dir);
    l.add_image(img, Some("t"));
    std::fs::write(dir.join("blobs/sha256").join(victim.hex()), data).unwrap();
}

#[test]
fn bad_blobs_cache_nothing_beyond_a_previous_good_pull() {
    let t = TempDir::new("badblobs");
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    // A good pull first: its blobs and ref must survive the bad ones.
    let good = build_image(&ImageSpec {
        arch: Arch::Amd64,
        config: Default::default(),
        layers: vec![(vec![Entry::file("good", "1")], Comp::Gzip)],
    });
    let mut gl = OciLayout::create(&t.path().join("good"));
    gl.add_image(&good, None);
    store
        .pull(
            &layout_src(&gl.dir, None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
    let before = cache_contents(store.dir());
    assert_eq!(before.1.len(), 1);

    let img = build_image(&sample_image(Arch::Amd64));
    let last = img.layers.last().unwrap();
    let mut wrong = last.data.clone();
    wrong[0] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>, &Blob)> = vec![
        ("wrong digest", wrong, last),
        ("truncated", last.data[..last.data.len() / 2].to_vec(), last),
        ("oversized", [&last.data[..], b"more"].concat(), last),
        ("bad config", b"{}".to_vec(), &img.config),
    ];
    for (name, data, victim) in cases {
        let dir = t.path().join(name.replace(' ', "-"));
        tampered_layout(&dir, &img, victim, &data);
        let e = store
            .pull(
                &layout_src(&dir, Some("t")),
                &opts(Arch::Amd64),
                &mut NoProgress,
            )
            .unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{name}: {msg}");
        match name {
            "wrong digest" => assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e:?}"),
            "truncated" | "oversized" | "bad config" => {
                assert!(
                    matches!(e, ImageError::SizeMismatch { .. }),
                    "{name}: {e:?}"
                )
            }
            _ => unreachable!(),
        }
        assert_eq!(cache_contents(store.dir()), before, "{name}");
    }

    // An unknown layer media type: refused before any blob is fetched.
    let mut odd = build_image(&sample_image(Arch::Amd64));
    let mut m: serde_json::Value = serde_json::from_slice(&odd.manifest.data).unwrap();
    m["layers"][1]["mediaType"] = "application/vnd.example.layer.v1.tar+lz4".into();
    odd.manifest = Blob::new(&odd.manifest.media_type, serde_json::to_vec(&m).unwrap());
    let mut ol = OciLayout::create(&t.path().join("odd"));
    ol.add_image(&odd, None);
    let e = store
        .pull(
            &layout_src(&ol.dir, None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(
        matches!(e, ImageError::UnknownLayerMediaType { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("lz4"), "{e}");
    assert_eq!(cache_contents(store.dir()), before);
    assert!(store
        .get(&layout_src(&gl.dir, None).key())
        .unwrap()
        .is_some());
}

#[test]
fn hostile_archive_names_are_never_written() {
    // An OCI archive with extra entries named ../x and /abs: they are only
    // names, nothing is extracted, the pull works.
    let t = TempDir::new("hostile");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, None);
    let tar_path = t.path().join("hostile.tar");
    {
        let f = std::fs::File::create(&tar_path).unwrap();
        let mut b = tar::Builder::new(f);
        b.append_dir_all(".", &l.dir).unwrap();
        for name in ["../escaped", "/tmp/locald-image-abs-escape"] {
            let mut h = tar::Header::new_gnu();
            let data = b"pwned";
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // Raw name bytes: the tar crate's setters refuse these.
            let n = name.as_bytes();
            h.as_old_mut().name[..n.len()].copy_from_slice(n);
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
        }
        // A duplicate of index.json pointing nowhere must not be
        // silently preferred either: duplicates are refused by name.
        b.into_inner().unwrap();
    }
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let got = store
        .pull(
            &ImageSource::Archive {
                path: tar_path,
                tag: None,
            },
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(got.manifest_digest, img.manifest.digest);
    assert!(!t.path().parent().unwrap().join("escaped").exists());
    assert!(!Path::new("/tmp/locald-image-abs-escape").exists());
}

#[test]
fn list_remove_prune() {
    let t = TempDir::new("prune");
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let a = build_image(&sample_image(Arch::Amd64));
    let b = build_image(&ImageSpec {
        arch: Arch::Amd64,
        config: Default::default(),
        layers: vec![(vec![Entry::file("only-b", "b")], Comp::Zstd)],
    });
    let mut la = OciLayout::create(&t.path().join("a"));
    la.add_image(&a, None);
    let mut lb = OciLayout::create(&t.path().join("b"));
    lb.add_image(&b, None);
    let ia = store
        .pull(
            &layout_src(&la.dir, None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
    let ib = store
        .pull(
            &layout_src(&lb.dir, None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    let size_of = |img: &locald_image::testing::BuiltImage| -> u64 {
        img.blobs().iter().map(|b| b.data.len() as u64).sum()
    };
    let ea = list.iter().find(|e| e.reference == ia.reference).unwrap();
    assert_eq!(ea.size, size_of(&a));
    assert_eq!(ea.manifest_digest, a.manifest.digest);
    assert!(ea.created > 1_700_000_000);
    let eb = list.iter().find(|e| e.reference == ib.reference).unwrap();
    assert_eq!(eb.size, size_of(&b));

    store.remove(&ib.reference).unwrap();
    assert!(store.get(&ib.reference).unwrap().is_none());
    assert!(matches!(
        store.remove(&ib.reference).unwrap_err(),
        ImageError::NotCached(_)
    ));
    let stats = store.prune().unwrap();
    assert_eq!(stats.blobs_removed, b.blobs().len());
    assert_eq!(stats.bytes_freed, size_of(&b));
    assert_eq!(cache_contents(store.dir()).0, blob_names(&a));
    assert_eq!(store.get(&ia.reference).unwrap().unwrap(), ia);
    assert_eq!(store.prune().unwrap(), Default::default());
}

#[test]
fn interrupted_pull_leftovers_are_swept() {
    let t = TempDir::new("sweep");
    let dir = t.path().join("cache");
    drop(ImageStore::open(&dir).unwrap());
    // A process that is gone: a child we waited for.
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let stale = dir.join(format!("blobs/.tmp-{dead}-0"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("abc"), b"half").unwrap();
    std::fs::write(dir.join(format!("refs/.tmp-{dead}-1")), b"{").unwrap();
    // One of a live process (ours, as another store would be) stays.
    let live = dir.join(format!("blobs/.tmp-{}-999999", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    let _store = ImageStore::open(&dir).unwrap();
    assert!(!stale.exists());
    assert!(!dir.join(format!("refs/.tmp-{dead}-1")).exists());
    assert!(live.exists());
    std::fs::remove_dir(&live).unwrap();
}

#[test]
fn cache_files_and_dirs_modes() {
    use std::os::unix::fs::PermissionsExt;
    let t = TempDir::new("modes");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, None);
    let dir = t.path().join("cache");
    let store = ImageStore::open(&dir).unwrap();
    store
        .pull(
            &layout_src(&l.dir, None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for d in ["", "blobs", "blobs/sha256", "refs", "locks"] {
        assert_eq!(mode(&dir.join(d)), 0o700, "{d}");
    }
    for b in cache_contents(&dir).0 {
        assert_eq!(mode(&dir.join("blobs/sha256").join(&b)), 0o644);
    }
    for r in cache_contents(&dir).1 {
        assert_eq!(mode(&dir.join("refs").join(&r)), 0o600);
    }
    // A symlink where a cache directory should be is refused.
    let t2 = TempDir::new("symlinked");
    std::fs::create_dir(t2.path().join("elsewhere")).unwrap();
    std::os::unix::fs::symlink(t2.path().join("elsewhere"), t2.path().join("cache")).unwrap();
    assert!(ImageStore::open(&t2.path().join("cache")).is_err());
}

#[test]
fn concurrent_pulls_two_threads() {
    let t = TempDir::new("threads");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, None);
    let dir = t.path().join("cache");
    let src = layout_src(&l.dir, None);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let store = ImageStore::open(&dir).unwrap();
                    store.pull(&src, &opts(Arch::Amd64), &mut NoProgress)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.as_ref().unwrap().manifest_digest, img.manifest.digest);
    }
    assert_eq!(cache_contents(&dir).0, blob_names(&img));
    assert_eq!(cache_contents(&dir).1.len(), 1);
    assert_blobs_valid(&dir);
}

const CHILD_ENV: &str = "LOCALD_IMAGE_TEST_CHILD_PULL";

/// The child side of `concurrent_pulls_two_processes` (does nothing
/// unless the parent set the variable): pulls `<layout>` into `<cache>`.
#[test]
fn child_pull_helper() {
    let Ok(arg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (layout, cache) = arg.split_once('|').unwrap();
    let store = ImageStore::open(Path::new(cache)).unwrap();
    store
        .pull(
            &layout_src(Path::new(layout), None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
}

#[test]
fn concurrent_pulls_two_processes() {
    let t = TempDir::new("procs");
    // Bigger layers, so the two pulls overlap.
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let img = build_image(&ImageSpec {
        arch: Arch::Amd64,
        config: Default::default(),
        layers: vec![
            (vec![Entry::file("big1", &big)], Comp::None),
            (vec![Entry::file("big2", &big[1..])], Comp::Gzip),
        ],
    });
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, None);
    let dir = t.path().join("cache");
    run_two_children(
        "child_pull_helper",
        CHILD_ENV,
        &format!("{}|{}", l.dir.display(), dir.display()),
    );
    assert_eq!(cache_contents(&dir).0, blob_names(&img));
    assert_eq!(cache_contents(&dir).1.len(), 1);
    assert_blobs_valid(&dir);
    let store = ImageStore::open(&dir).unwrap();
    assert_eq!(
        store
            .get(&layout_src(&l.dir, None).key())
            .unwrap()
            .unwrap()
            .manifest_digest,
        img.manifest.digest
    );
}

#[test]
fn index_blob_of_a_layout_is_verified() {
    let t = TempDir::new("idxverify");
    let amd = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    let idx = l.add_index(&[&amd], None);
    // Swap the index blob for another valid index: digest mismatch.
    let other = build_index(&[&amd, &amd]);
    std::fs::write(l.dir.join("blobs/sha256").join(idx.hex()), &other.data).unwrap();
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let e = store
        .pull(
            &layout_src(&l.dir, None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e:?}");
    assert_eq!(cache_contents(store.dir()), (vec![], vec![]));
}

#[test]
fn source_parsing() {
    let t = TempDir::new("srcparse");
    let l = OciLayout::create(&t.path().join("layout"));
    let plain = t.path().join("alpine");
    std::fs::create_dir(&plain).unwrap();
    let p = |s: &str| ImageSource::parse(s).unwrap();
    assert!(matches!(
        p(l.dir.to_str().unwrap()),
        ImageSource::OciLayout { tag: None, .. }
    ));
    assert!(matches!(
        p(&format!("{}:v1", l.dir.display())),
        ImageSource::OciLayout { tag: Some(ref t), .. } if t == "v1"
    ));
    // A directory without oci-layout is not a layout: parsed as a reference.
    let e = ImageSource::parse(plain.to_str().unwrap()).unwrap_err();
    assert!(matches!(e, ImageError::Reference(_)), "{e:?}");
    assert_eq!(
        p("alpine"),
        ImageSource::Registry(locald_image::ImageReference::parse("alpine").unwrap())
    );
    assert_eq!(p("alpine").key(), "docker.io/library/alpine:latest");
    assert!(p(l.dir.to_str().unwrap()).key().starts_with("oci:/"));
}

#[test]
fn scratch_image_with_one_binary() {
    use std::os::unix::fs::PermissionsExt;
    let t = TempDir::new("scratch");
    let bin = Path::new("/bin/true");
    let img = build_image(&locald_image::testing::scratch_image(bin, Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, None);
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let got = store
        .pull(
            &layout_src(&l.dir, None),
            &opts(Arch::Amd64),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(
        got.config.entrypoint.as_deref(),
        Some(&["/app".to_string()][..])
    );
    assert_eq!(got.config.cmd, None);
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut u = Unpacker::new(&root, Limits::default()).unwrap();
    u.apply_layer(
        std::fs::File::open(&got.layers[0].path).unwrap(),
        &got.layers[0].media_type,
    )
    .unwrap();
    let (table, _) = u.finish().unwrap();
    assert_eq!(
        std::fs::read(root.join("app")).unwrap(),
        std::fs::read(bin).unwrap()
    );
    assert_eq!(
        std::fs::metadata(root.join("app"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert!(table.iter().any(|(p, _)| p == b"app"));
}

#[test]
fn declared_size_over_the_limit_fetches_nothing() {
    let t = TempDir::new("toolarge");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, None);
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let o = PullOptions {
        max_image_bytes: 100,
        ..opts(Arch::Amd64)
    };
    let e = store
        .pull(&layout_src(&l.dir, None), &o, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(e, ImageError::TooLarge { max: 100, .. }), "{e:?}");
    assert_eq!(cache_contents(store.dir()), (vec![], vec![]));
}
