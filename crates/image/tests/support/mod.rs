//! Helpers for the pull and cache tests: cache inspection, a tiny fake
//! registry (std::net, one thread per connection, `Connection: close`)
//! whose behaviour each test picks, and the real `docker-registry` +
//! `skopeo` harness.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use locald_image::cache::sha256_digest;
use locald_image::testing::{Blob, BuiltImage};

#[path = "../../../locald-vmm/src/test_support.rs"]
pub mod test_support;

/// Names of the files under `dir/blobs/sha256` and `dir/refs` (temp
/// entries included, so leftovers show).
pub fn cache_contents(dir: &Path) -> (Vec<String>, Vec<String>) {
    let names = |p: PathBuf| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut blobs = names(dir.join("blobs/sha256"));
    // Staging dirs next to sha256/ count as leftovers too.
    for n in names(dir.join("blobs")) {
        if n != "sha256" {
            blobs.push(format!("../{n}"));
        }
    }
    (blobs, names(dir.join("refs")))
}

/// Asserts every blob in the cache hashes to its name.
pub fn assert_blobs_valid(dir: &Path) {
    for n in cache_contents(dir).0 {
        let data = std::fs::read(dir.join("blobs/sha256").join(&n)).unwrap();
        assert_eq!(sha256_digest(&data), format!("sha256:{n}"), "blob {n}");
    }
}

/// Expected blob names of an image.
pub fn blob_names(img: &BuiltImage) -> Vec<String> {
    let mut v: Vec<String> = img.blobs().iter().map(|b| b.hex().to_string()).collect();
    v.sort();
    v
}

/// One request the fake registry saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

/// A response.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send only this many body bytes (then close) while declaring
    /// `Content-Length: body.len()`.
    pub cut_at: Option<usize>,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
            cut_at: None,
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A fake registry on 127.0.0.1:<random>.
pub struct FakeRegistry {
    pub addr: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeRegistry {
    pub fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> FakeRegistry {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let h = handler.clone();
                let s = s2.clone();
                std::thread::spawn(move || serve(conn, &*h, &s));
            }
        });
        FakeRegistry { addr, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(conn: TcpStream, h: &Handler, seen: &Mutex<Vec<Seen>>) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).is_err() || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Seen {
        method,
        path,
        headers,
    };
    seen.lock().unwrap().push(req.clone());
    let rep = h(&req);
    let mut w = conn;
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        rep.status,
        rep.body.len()
    );
    for (k, v) in &rep.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = w.write_all(head.as_bytes());
    if req.method != "HEAD" {
        let n = rep.cut_at.unwrap_or(rep.body.len());
        let _ = w.write_all(&rep.body[..n]);
    }
    let _ = w.flush();
    let _ = w.shutdown(std::net::Shutdown::Both);
}

/// Serves `blobs` (manifests by digest and by `tag`) under any name.
/// `manifests` maps tag or digest → blob.
pub fn registry_handler(
    manifests: HashMap<String, Blob>,
    blobs: HashMap<String, Vec<u8>>,
) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |req: &Seen| {
        if req.path == "/v2/" {
            return Reply::new(200, "{}");
        }
        if let Some((_, r)) = req.path.split_once("/manifests/") {
            return match manifests.get(r) {
                Some(b) => Reply::new(200, b.data.clone())
                    .header("Content-Type", &b.media_type)
                    .header("Docker-Content-Digest", &b.digest),
                None => Reply::new(
                    404,
                    r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
                )
                .header("Content-Type", "application/json"),
            };
        }
        if let Some((_, d)) = req.path.split_once("/blobs/") {
            return match blobs.get(d) {
                Some(b) => {
                    Reply::new(200, b.clone()).header("Content-Type", "application/octet-stream")
                }
                None => Reply::new(
                    404,
                    r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
                )
                .header("Content-Type", "application/json"),
            };
        }
        Reply::new(404, "")
    }
}

/// Manifest and blob maps for images (and an optional index) under `tag`.
pub fn serve_maps(
    images: &[&BuiltImage],
    index: Option<&Blob>,
    tag: &str,
) -> (HashMap<String, Blob>, HashMap<String, Vec<u8>>) {
    let mut m = HashMap::new();
    let mut b = HashMap::new();
    for i in images {
        m.insert(i.manifest.digest.clone(), i.manifest.clone());
        b.insert(i.config.digest.clone(), i.config.data.clone());
        for l in &i.layers {
            b.insert(l.digest.clone(), l.data.clone());
        }
    }
    match index {
        Some(ix) => {
            m.insert(ix.digest.clone(), ix.clone());
            m.insert(tag.to_string(), ix.clone());
        }
        None => {
            m.insert(tag.to_string(), images[0].manifest.clone());
        }
    }
    (m, b)
}

/// A real `docker-registry` on 127.0.0.1:<free port>, killed on drop.
pub struct RealRegistry {
    pub addr: String,
    child: Child,
    pub _dir: locald_image::testing::TempDir,
}

pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";
pub const SKOPEO: &str = "/usr/bin/skopeo";

impl RealRegistry {
    /// `None` (after a skip) if docker-registry or skopeo is missing.
    pub fn start() -> Option<RealRegistry> {
        use test_support::{skip, Why};
        for tool in [DOCKER_REGISTRY, SKOPEO] {
            if !Path::new(tool).exists() {
                skip(Why::Missing(tool));
                return None;
            }
        }
        let dir = locald_image::testing::TempDir::new("registry");
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new(DOCKER_REGISTRY)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(RealRegistry {
            addr,
            child,
            _dir: dir,
        })
    }

    /// `skopeo copy [--all] oci:LAYOUT:TAG docker://ADDR/NAME:TAG`.
    pub fn push(&self, layout: &Path, tag: &str, name: &str, all: bool) {
        let mut c = Command::new(SKOPEO);
        c.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if all {
            c.arg("--all");
        }
        c.arg(format!("oci:{}:{tag}", layout.display()));
        c.arg(format!("docker://{}/{name}:{tag}", self.addr));
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The storage directory of a blob (to tamper with it).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self._dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for RealRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two threads pulling `s` into the store at `dir` at once (each opens
/// the store itself); their results in order.
pub fn pull_in_two_threads(
    dir: &Path,
    s: &locald_image::pull::ImageSource,
    o: &locald_image::pull::PullOptions,
) -> Vec<Result<locald_image::PulledImage, locald_image::ImageError>> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    locald_image::ImageStore::open(dir).unwrap().pull(
                        s,
                        o,
                        &mut locald_image::NoProgress,
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Runs this test binary's `helper` test in two child processes at once,
/// with `env_key=env_value`, and asserts that both succeed.
pub fn run_two_children(helper: &str, env_key: &str, env_value: &str) {
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", helper, "--nocapture", "--test-threads", "1"])
                .env(env_key, env_value)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "child failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Reads all of `r` (for tests that read layers).
pub fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}
