//! Registry pulls against a tiny fake registry on 127.0.0.1 (see
//! `support::FakeRegistry`): anonymous pulls, by tag and digest, an
//! index, the bearer-token flow, docker config.json credentials, and bad
//! registries (wrong digest, truncated blob, unknown media type, 401,
//! 500), each one clear error leaving nothing cached.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use locald_image::testing::{build_image, build_index, sample_image, Blob, BuiltImage, TempDir};
use locald_image::{
    Arch, ImageError, ImageReference, ImageSource, ImageStore, NoProgress, PullOptions,
};
use support::{
    assert_blobs_valid, blob_names, cache_contents, pull_in_two_threads, registry_handler,
    run_two_children, serve_maps, FakeRegistry, Reply,
};

fn src(addr: &str, rest: &str) -> ImageSource {
    ImageSource::Registry(ImageReference::parse(&format!("{addr}/{rest}")).unwrap())
}

fn opts(arch: Arch, t: &TempDir) -> PullOptions {
    PullOptions {
        arch,
        insecure_registries: vec![],
        // No credentials unless a test writes some.
        docker_config: Some(t.path().join("no-docker-config.json")),
        ..PullOptions::default()
    }
}

#[test]
fn pull_by_tag_and_by_digest() {
    let t = TempDir::new("fake-ok");
    let img = build_image(&sample_image(Arch::Amd64));
    let (m, b) = serve_maps(&[&img], None, "v1");
    let reg = FakeRegistry::start(registry_handler(m, b));
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let got = store
        .pull(
            &src(&reg.addr, "ns/app:v1"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(got.reference, format!("{}/ns/app:v1", reg.addr));
    assert_eq!(got.manifest_digest, img.manifest.digest);
    assert_eq!(got.index_digest, None);
    assert_eq!(got.config.entrypoint.as_ref().unwrap()[0], "/bin/app");
    assert_eq!(cache_contents(store.dir()).0, blob_names(&img));
    assert_blobs_valid(store.dir());
    // Offline.
    assert_eq!(
        store
            .get(&format!("{}/ns/app:v1", reg.addr))
            .unwrap()
            .unwrap(),
        got
    );
    // Plain HTTP was used (loopback), and no Authorization was sent.
    assert!(reg
        .seen()
        .iter()
        .all(|s| !s.headers.contains_key("authorization")));

    // By digest: all blobs cached, only the manifest is fetched.
    let n = reg.seen().len();
    let by_digest = store
        .pull(
            &src(&reg.addr, &format!("ns/app@{}", img.manifest.digest)),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(by_digest.manifest_digest, img.manifest.digest);
    assert!(reg.seen()[n..].iter().all(|s| !s.path.contains("/blobs/")));
    assert_eq!(cache_contents(store.dir()).1.len(), 2);
}

#[test]
fn pull_index_picks_the_platform() {
    let t = TempDir::new("fake-index");
    let amd = build_image(&sample_image(Arch::Amd64));
    let arm = build_image(&sample_image(Arch::Arm64));
    let idx = build_index(&[&amd, &arm]);
    let (m, b) = serve_maps(&[&amd, &arm], Some(&idx), "multi");
    let reg = FakeRegistry::start(registry_handler(m, b));
    for (arch, want) in [(Arch::Amd64, &amd), (Arch::Arm64, &arm)] {
        let t2 = TempDir::new("fake-index-cache");
        let store = ImageStore::open(t2.path()).unwrap();
        let got = store
            .pull(
                &src(&reg.addr, "app:multi"),
                &opts(arch, &t),
                &mut NoProgress,
            )
            .unwrap();
        assert_eq!(got.manifest_digest, want.manifest.digest);
        assert_eq!(got.index_digest.as_deref(), Some(idx.digest.as_str()));
        assert_eq!(got.config.architecture, arch.as_str());
        let mut names = blob_names(want);
        names.push(idx.hex().to_string());
        names.sort();
        assert_eq!(cache_contents(store.dir()).0, names);
    }
    // A missing platform.
    let only_arm = build_index(&[&arm]);
    let (m, b) = serve_maps(&[&arm], Some(&only_arm), "arm");
    let reg2 = FakeRegistry::start(registry_handler(m, b));
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let e = store
        .pull(
            &src(&reg2.addr, "app:arm"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "no linux/amd64 image in the index; it has: linux/arm64"
    );
    assert_eq!(cache_contents(store.dir()), (vec![], vec![]));
}

/// Serves `img` but answers blob `victim` with `reply`.
fn bad_blob_registry(
    img: &locald_image::testing::BuiltImage,
    victim: String,
    reply: impl Fn() -> Reply + Send + Sync + 'static,
) -> FakeRegistry {
    let (m, b) = serve_maps(&[img], None, "bad");
    let inner = registry_handler(m, b);
    FakeRegistry::start(move |req| {
        if req.path.ends_with(&format!("/blobs/{victim}")) {
            reply()
        } else {
            inner(req)
        }
    })
}

/// A good pull first, so "nothing cached" means "nothing beyond it".
fn store_with_good_image(t: &TempDir) -> (ImageStore, (Vec<String>, Vec<String>), FakeRegistry) {
    let good = build_image(&locald_image::testing::ImageSpec {
        arch: Arch::Amd64,
        config: Default::default(),
        layers: vec![(
            vec![locald_image::testing::Entry::file("good", "1")],
            locald_image::testing::Comp::Gzip,
        )],
    });
    let (m, b) = serve_maps(&[&good], None, "good");
    let reg = FakeRegistry::start(registry_handler(m, b));
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    store
        .pull(
            &src(&reg.addr, "good:good"),
            &opts(Arch::Amd64, t),
            &mut NoProgress,
        )
        .unwrap();
    let before = cache_contents(store.dir());
    (store, before, reg)
}

#[test]
fn wrong_digest_and_truncated_blob() {
    let t = TempDir::new("fake-bad");
    let (store, before, _good) = store_with_good_image(&t);
    let img = build_image(&sample_image(Arch::Amd64));
    let last = img.layers.last().unwrap().clone();

    let mut wrong = last.data.clone();
    wrong[10] ^= 0x55;
    let reg = bad_blob_registry(&img, last.digest.clone(), move || {
        Reply::new(200, wrong.clone())
    });
    let e = store
        .pull(
            &src(&reg.addr, "app:bad"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e:?}");
    assert!(!e.to_string().contains('\n'));
    assert_eq!(cache_contents(store.dir()), before);

    // Cut off mid-body (Content-Length promises more).
    let data = last.data.clone();
    let reg = bad_blob_registry(&img, last.digest.clone(), move || Reply {
        cut_at: Some(data.len() / 2),
        ..Reply::new(200, data.clone())
    });
    let e = store
        .pull(
            &src(&reg.addr, "app:bad"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::SizeMismatch { .. } | ImageError::Registry { .. }
        ),
        "{e:?}"
    );
    assert_eq!(cache_contents(store.dir()), before);

    // A short but complete response.
    let short = last.data[..last.data.len() - 3].to_vec();
    let reg = bad_blob_registry(&img, last.digest.clone(), move || {
        Reply::new(200, short.clone())
    });
    let e = store
        .pull(
            &src(&reg.addr, "app:bad"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::SizeMismatch { .. }), "{e:?}");
    assert_eq!(cache_contents(store.dir()), before);

    // A wrong manifest for a digest reference.
    let (mut m, b) = serve_maps(&[&img], None, "bad");
    let other = build_image(&sample_image(Arch::Arm64));
    m.insert(img.manifest.digest.clone(), other.manifest.clone());
    let reg = FakeRegistry::start(registry_handler(m, b));
    let e = store
        .pull(
            &src(&reg.addr, &format!("app@{}", img.manifest.digest)),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::DigestMismatch { .. } | ImageError::Registry { .. }
        ),
        "{e:?}"
    );
    assert!(e.to_string().to_lowercase().contains("digest"), "{e}");
    assert_eq!(cache_contents(store.dir()), before);
}

#[test]
fn unknown_layer_media_type_fetches_nothing() {
    let t = TempDir::new("fake-mt");
    let (store, before, _good) = store_with_good_image(&t);
    let mut img = build_image(&sample_image(Arch::Amd64));
    let mut m: serde_json::Value = serde_json::from_slice(&img.manifest.data).unwrap();
    m["layers"][0]["mediaType"] = "application/vnd.example.weird".into();
    img.manifest = Blob::new(&img.manifest.media_type, serde_json::to_vec(&m).unwrap());
    let (mm, b) = serve_maps(&[&img], None, "odd");
    let reg = FakeRegistry::start(registry_handler(mm, b));
    let e = store
        .pull(
            &src(&reg.addr, "app:odd"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(
        matches!(e, ImageError::UnknownLayerMediaType { .. }),
        "{e:?}"
    );
    assert!(reg.seen().iter().all(|s| !s.path.contains("/blobs/")));
    assert_eq!(cache_contents(store.dir()), before);
}

#[test]
fn http_401_and_500() {
    let t = TempDir::new("fake-status");
    let (store, before, _good) = store_with_good_image(&t);
    // 401 without any token flow (no WWW-Authenticate challenge).
    let reg = FakeRegistry::start(|req| {
        if req.path == "/v2/" {
            Reply::new(200, "{}")
        } else {
            Reply::new(
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}"#,
            )
            .header("Content-Type", "application/json")
        }
    });
    let e = store
        .pull(
            &src(&reg.addr, "app:x"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e:?}");
    assert_eq!(cache_contents(store.dir()), before);

    let reg = FakeRegistry::start(|req| {
        if req.path == "/v2/" {
            Reply::new(200, "{}")
        } else {
            Reply::new(500, "boom")
        }
    });
    let e = store
        .pull(
            &src(&reg.addr, "app:x"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::Registry { .. }), "{e:?}");
    assert!(e.to_string().contains("500"), "{e}");
    assert!(!e.to_string().contains('\n'));
    assert_eq!(cache_contents(store.dir()), before);

    // 500 on a layer only.
    let img = build_image(&sample_image(Arch::Amd64));
    let reg = bad_blob_registry(&img, img.layers[1].digest.clone(), || {
        Reply::new(500, "boom")
    });
    let e = store
        .pull(
            &src(&reg.addr, "app:bad"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
    assert_eq!(cache_contents(store.dir()), before);
}

/// A registry that demands a bearer token from its /token endpoint, which
/// (if `want_basic` is set) demands those Basic credentials.
fn token_registry(
    img: &locald_image::testing::BuiltImage,
    want_basic: Option<String>,
) -> FakeRegistry {
    let (m, b) = serve_maps(&[img], None, "v1");
    let inner = registry_handler(m, b);
    let addr_cell: Arc<std::sync::OnceLock<String>> = Arc::new(std::sync::OnceLock::new());
    let cell = addr_cell.clone();
    let reg = FakeRegistry::start(move |req| {
        let realm = format!("http://{}/token", cell.get().unwrap());
        let challenge = format!(r#"Bearer realm="{realm}",service="fake""#);
        if req.path.starts_with("/token") {
            if let Some(want) = &want_basic {
                if req.headers.get("authorization") != Some(want) {
                    return Reply::new(401, "bad credentials");
                }
            }
            assert!(
                req.path.contains("scope=repository%3Aapp%3Apull")
                    || req.path.contains("scope=repository:app:pull"),
                "{}",
                req.path
            );
            return Reply::new(200, r#"{"token":"tok-123","expires_in":300}"#)
                .header("Content-Type", "application/json");
        }
        if req.headers.get("authorization").map(String::as_str) != Some("Bearer tok-123") {
            return Reply::new(
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}"#,
            )
            .header("WWW-Authenticate", &challenge)
            .header("Content-Type", "application/json");
        }
        inner(req)
    });
    addr_cell.set(reg.addr.clone()).unwrap();
    reg
}

#[test]
fn bearer_token_flow() {
    let t = TempDir::new("fake-bearer");
    let img = build_image(&sample_image(Arch::Amd64));
    let reg = token_registry(&img, None);
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let got = store
        .pull(
            &src(&reg.addr, "app:v1"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(got.manifest_digest, img.manifest.digest);
    let seen = reg.seen();
    assert!(seen.iter().any(|s| s.path.starts_with("/token")));
    assert!(seen
        .iter()
        .filter(|s| s.path.contains("/manifests/") || s.path.contains("/blobs/"))
        .any(|s| s.headers.get("authorization").map(String::as_str) == Some("Bearer tok-123")));
    assert_blobs_valid(store.dir());
}

#[test]
fn docker_config_credentials_reach_the_token_endpoint() {
    let t = TempDir::new("fake-creds");
    let img = build_image(&sample_image(Arch::Amd64));
    // base64("alice:s3cret")
    let want = "Basic YWxpY2U6czNjcmV0".to_string();
    let reg = token_registry(&img, Some(want.clone()));
    let cfg_dir = t.path().join("docker");
    std::fs::create_dir(&cfg_dir).unwrap();
    std::fs::write(
        cfg_dir.join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    let o = PullOptions {
        arch: Arch::Amd64,
        insecure_registries: vec![],
        docker_config: Some(cfg_dir.join("config.json")),
        ..PullOptions::default()
    };
    store
        .pull(&src(&reg.addr, "app:v1"), &o, &mut NoProgress)
        .unwrap();
    assert!(reg
        .seen()
        .iter()
        .any(|s| s.path.starts_with("/token") && s.headers.get("authorization") == Some(&want)));

    // `username`/`password` fields work too.
    std::fs::write(
        cfg_dir.join("config.json"),
        format!(
            r#"{{"auths": {{"http://{}": {{"username": "alice", "password": "s3cret"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let t2 = TempDir::new("fake-creds2");
    let store2 = ImageStore::open(t2.path()).unwrap();
    store2
        .pull(&src(&reg.addr, "app:v1"), &o, &mut NoProgress)
        .unwrap();

    // Without credentials the token endpoint refuses: Unauthorized, nothing cached.
    let t3 = TempDir::new("fake-creds3");
    let store3 = ImageStore::open(t3.path()).unwrap();
    let e = store3
        .pull(
            &src(&reg.addr, "app:v1"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e:?}");
    assert_eq!(cache_contents(store3.dir()), (vec![], vec![]));
}

#[test]
fn https_is_used_for_non_loopback_unless_insecure() {
    // A registry named by a non-loopback name is spoken to over https
    // unless listed as insecure; `localhost` is plain HTTP. Only checks
    // the scheme choice through a connection to our fake (plain) server.
    let t = TempDir::new("fake-scheme");
    let img = build_image(&sample_image(Arch::Amd64));
    let (m, b) = serve_maps(&[&img], None, "v1");
    let reg = FakeRegistry::start(registry_handler(m, b));
    let port = reg.addr.rsplit_once(':').unwrap().1;
    let store = ImageStore::open(&t.path().join("cache")).unwrap();
    store
        .pull(
            &src(&format!("localhost:{port}"), "app:v1"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap();
    // 127.0.0.2 is loopback but not one of the names allowed plain HTTP:
    // https to a plain server fails...
    let e = store.pull(
        &src(&format!("127.0.0.2:{port}"), "app:v1"),
        &opts(Arch::Amd64, &t),
        &mut NoProgress,
    );
    if let Err(e) = e {
        assert!(matches!(e, ImageError::Registry { .. }), "{e:?}");
        // ...unless named insecure.
        let mut o = opts(Arch::Amd64, &t);
        o.insecure_registries = vec!["127.0.0.2".into()];
        let r = store.pull(
            &src(&format!("127.0.0.2:{port}"), "app:v1"),
            &o,
            &mut NoProgress,
        );
        // Our fake listens on 127.0.0.1 only; a refused connection is fine
        // here, a TLS error is not.
        if let Err(e) = r {
            assert!(!e.to_string().to_lowercase().contains("tls"), "{e}");
        }
    }
}

/// A fake registry serving the sample image as `app:v1` whose blob
/// requests take `delay_ms` each (so concurrent pulls overlap), and the
/// count of blob requests it served (and the image).
fn slow_counting_registry(delay_ms: u64) -> (FakeRegistry, Arc<AtomicUsize>, BuiltImage) {
    let img = build_image(&sample_image(Arch::Amd64));
    let (m, b) = serve_maps(&[&img], None, "v1");
    let blob_gets = Arc::new(AtomicUsize::new(0));
    let counter = blob_gets.clone();
    let inner = registry_handler(m, b);
    let reg = FakeRegistry::start(move |req| {
        if req.path.contains("/blobs/") {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        }
        inner(req)
    });
    (reg, blob_gets, img)
}

#[test]
fn concurrent_pulls_two_threads_from_a_registry() {
    let t = TempDir::new("fake-threads");
    let (reg, blob_gets, img) = slow_counting_registry(50);
    let dir = t.path().join("cache");
    let s = src(&reg.addr, "app:v1");
    let o = opts(Arch::Amd64, &t);
    let res = pull_in_two_threads(&dir, &s, &o);
    for r in res {
        assert_eq!(r.unwrap().manifest_digest, img.manifest.digest);
    }
    assert_eq!(cache_contents(&dir).0, blob_names(&img));
    assert_eq!(cache_contents(&dir).1.len(), 1);
    // The second pull waited for the first and fetched no blob again.
    assert_eq!(blob_gets.load(Ordering::SeqCst), 1 + img.layers.len());
    assert_blobs_valid(&dir);
}

const CHILD_ENV: &str = "LOCALD_IMAGE_TEST_CHILD_REGISTRY_PULL";

/// The child side of `concurrent_pulls_two_processes_from_a_registry`
/// (does nothing unless the parent set the variable).
#[test]
fn child_registry_pull_helper() {
    let Ok(arg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (addr, cache) = arg.split_once('|').unwrap();
    let t = TempDir::new("fake-child");
    ImageStore::open(std::path::Path::new(cache))
        .unwrap()
        .pull(
            &src(addr, "app:v1"),
            &opts(Arch::Amd64, &t),
            &mut NoProgress,
        )
        .unwrap();
}

#[test]
fn concurrent_pulls_two_processes_from_a_registry() {
    let t = TempDir::new("fake-procs");
    let (reg, blob_gets, img) = slow_counting_registry(100);
    let dir = t.path().join("cache");
    run_two_children(
        "child_registry_pull_helper",
        CHILD_ENV,
        &format!("{}|{}", reg.addr, dir.display()),
    );
    assert_eq!(cache_contents(&dir).0, blob_names(&img));
    assert_eq!(cache_contents(&dir).1.len(), 1);
    assert_eq!(blob_gets.load(Ordering::SeqCst), 1 + img.layers.len());
    assert_blobs_valid(&dir);
}
