//! Pulls from a real registry on loopback: Debian's `docker-registry`
//! started by each test on 127.0.0.1:<free port> with a temp storage dir,
//! test images pushed with `skopeo copy`. Skipped (strict mode: failed)
//! when `/usr/bin/docker-registry` or `/usr/bin/skopeo` is missing.

mod support;

use locald_image::testing::{build_image, sample_image, OciLayout, TempDir};
use locald_image::unpack::{Limits, Unpacker};
use locald_image::{
    Arch, ImageError, ImageReference, ImageSource, ImageStore, NoProgress, ProgressEvent,
    PullOptions,
};
use support::{assert_blobs_valid, cache_contents, pull_in_two_threads, RealRegistry};

fn src(addr: &str, rest: &str) -> ImageSource {
    ImageSource::Registry(ImageReference::parse(&format!("{addr}/{rest}")).unwrap())
}

/// The blobs of a pulled image: config, layers, manifest (skopeo
/// re-serializes the manifest and gzips plain layers on push, so these
/// differ from the built image's).
fn pushed_blob_names(got: &locald_image::PulledImage) -> Vec<String> {
    let hex = |d: &str| d.strip_prefix("sha256:").unwrap().to_string();
    let mut v = vec![hex(&got.config_digest), got.key().to_string()];
    v.extend(got.layers.iter().map(|l| hex(&l.digest)));
    v.sort();
    v
}

fn opts(arch: Arch, t: &TempDir) -> PullOptions {
    PullOptions {
        arch,
        insecure_registries: vec![],
        docker_config: Some(t.path().join("none.json")),
        ..PullOptions::default()
    }
}

#[test]
fn multi_layer_image_by_tag_and_digest() {
    let Some(reg) = RealRegistry::start() else {
        return;
    };
    let t = TempDir::new("real-ml");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, Some("v1"));
    reg.push(&l.dir, "v1", "test/sample", false);

    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let mut lines = Vec::new();
    let mut p = |e: &ProgressEvent<'_>| {
        if let Some(s) = locald_image::TerminalProgress::line(e) {
            lines.push(s)
        }
    };
    let got = store
        .pull(
            &src(&reg.addr, "test/sample:v1"),
            &opts(Arch::Amd64, &t),
            &mut p,
        )
        .unwrap();
    // skopeo re-serializes the manifest (its digest changes); config and
    // layers are the same blobs.
    assert_eq!(got.config_digest, img.config.digest);
    assert_eq!(got.layers.len(), 3);
    // skopeo gzips the plain layer on push; the others are unchanged.
    for (g, want) in got.layers.iter().zip(&img.layers) {
        let data = std::fs::read(&g.path).unwrap();
        if want.media_type.ends_with(".tar") {
            assert!(g.media_type.ends_with("tar+gzip"), "{}", g.media_type);
            let plain = support::read_all(flate2::read::GzDecoder::new(&data[..]));
            assert_eq!(plain, want.data);
        } else {
            assert_eq!(g.digest, want.digest);
            assert_eq!(data, want.data);
        }
    }
    assert_eq!(got.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(cache_contents(store.dir()).0, pushed_blob_names(&got));
    assert_blobs_valid(store.dir());
    // One line per step: resolving, manifest, 3 layers, cached.
    assert_eq!(lines.len(), 6, "{lines:?}");

    // Unpacks.
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut u = Unpacker::new(&root, Limits::default()).unwrap();
    for layer in &got.layers {
        u.apply_layer(std::fs::File::open(&layer.path).unwrap(), &layer.media_type)
            .unwrap();
    }
    u.finish().unwrap();
    assert!(root.join("srv/new").exists() && !root.join("srv/old").exists());

    // By digest, into a fresh cache.
    let t2 = TempDir::new("real-ml-digest");
    let store2 = ImageStore::open(t2.path()).unwrap();
    let by_digest = store2
        .pull(
            &src(&reg.addr, &format!("test/sample@{}", got.manifest_digest)),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(by_digest.manifest_digest, got.manifest_digest);
    assert_eq!(cache_contents(store2.dir()).0, pushed_blob_names(&got));

    // A tag that is not there.
    let e = store2
        .pull(
            &src(&reg.addr, "test/sample:nope"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::NotFound { .. }), "{e:?}");
}

#[test]
fn multi_platform_index() {
    let Some(reg) = RealRegistry::start() else {
        return;
    };
    let t = TempDir::new("real-index");
    let amd = build_image(&sample_image(Arch::Amd64));
    let arm = build_image(&sample_image(Arch::Arm64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_index(&[&amd, &arm], Some("multi"));
    reg.push(&l.dir, "multi", "test/multi", true);
    for (arch, want) in [(Arch::Amd64, &amd), (Arch::Arm64, &arm)] {
        let t2 = TempDir::new("real-index-cache");
        let store = ImageStore::open(t2.path()).unwrap();
        let got = store
            .pull(
                &src(&reg.addr, "test/multi:multi"),
                &opts(arch, &t),
                &mut NoProgress,
            )
            .unwrap();
        assert_eq!(got.config_digest, want.config.digest, "{arch}");
        assert!(got.index_digest.is_some());
        assert_eq!(got.config.architecture, arch.as_str());
        assert_blobs_valid(store.dir());
    }

    // An index without our platform.
    let mut l2 = OciLayout::create(&t.path().join("layout2"));
    l2.add_index(&[&arm], Some("armonly"));
    reg.push(&l2.dir, "armonly", "test/armonly", true);
    let t3 = TempDir::new("real-noplat");
    let store = ImageStore::open(t3.path()).unwrap();
    let e = store
        .pull(
            &src(&reg.addr, "test/armonly:armonly"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::PlatformNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("linux/arm64"), "{e}");
    assert_eq!(cache_contents(store.dir()), (vec![], vec![]));
}

#[test]
fn tampered_blob_in_registry_storage() {
    let Some(reg) = RealRegistry::start() else {
        return;
    };
    let t = TempDir::new("real-tamper");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, Some("v1"));
    reg.push(&l.dir, "v1", "test/tamper", false);
    let victim = &img.layers[1];
    let p = reg.blob_data_path(&victim.digest);
    let mut data = std::fs::read(&p).unwrap();
    assert_eq!(data, victim.data);
    data[5] ^= 0xff;
    std::fs::write(&p, &data).unwrap();
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let e = store
        .pull(
            &src(&reg.addr, "test/tamper:v1"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e:?}");
    assert!(!e.to_string().contains('\n'));
    assert_eq!(cache_contents(store.dir()), (vec![], vec![]));
}

#[test]
fn concurrent_pulls_two_threads() {
    let Some(reg) = RealRegistry::start() else {
        return;
    };
    let t = TempDir::new("real-threads");
    let img = build_image(&sample_image(Arch::Amd64));
    let mut l = OciLayout::create(&t.path().join("layout"));
    l.add_image(&img, Some("v1"));
    reg.push(&l.dir, "v1", "test/conc", false);
    let dir = t.path().join("cache");
    let s = src(&reg.addr, "test/conc:v1");
    let o = opts(Arch::Amd64, &t);
    let res = pull_in_two_threads(&dir, &s, &o);
    let res: Vec<_> = res.into_iter().map(Result::unwrap).collect();
    assert_eq!(res[0], res[1]);
    assert_eq!(res[0].config_digest, img.config.digest);
    assert_eq!(cache_contents(&dir).0, pushed_blob_names(&res[0]));
    assert_eq!(cache_contents(&dir).1.len(), 1);
}
