//! Unpack throughput versus `tar -x`: builds a plain tar layer of a few
//! thousand small files in a few dozen directories plus some large files,
//! then times (median of N runs, default 5) `Unpacker` (apply + finish)
//! and `tar -x --no-same-owner` of the same file into fresh directories,
//! with `sync` and the removal of the previous tree outside the timing.
//! Prints both medians and tar_time / our_time (the goal: ≥ 0.8).
//!
//!     cargo run --release -p locald-image --example unpack_bench -- [--runs N] [--dir DIR]
//!
//! Runs on the main thread; writes under DIR (default: the temp dir).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use locald_image::unpack::{Limits, Unpacker};

const SMALL_FILES: usize = 4000;
const DIRS: usize = 40;
const LARGE_FILES: usize = 6;
const LARGE_SIZE: usize = 16 << 20;

fn build_layer(path: &Path) -> (u64, u64) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    let mut seed = 0x1234_5678_u64;
    let mut data = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let mut bytes = 0u64;
    let header = |kind: tar::EntryType, size: usize, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size as u64);
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for d in 0..DIRS {
        let mut h = header(tar::EntryType::Directory, 0, 0o755);
        b.append_data(&mut h, format!("usr/share/d{d:02}/"), &[][..])
            .unwrap();
    }
    for i in 0..SMALL_FILES {
        let size = 512 + (i * 977) % 8192;
        let mut h = header(tar::EntryType::Regular, size, 0o644);
        let body = data(size);
        bytes += size as u64;
        b.append_data(
            &mut h,
            format!("usr/share/d{:02}/file-{i}.txt", i % DIRS),
            &body[..],
        )
        .unwrap();
    }
    let big = data(LARGE_SIZE);
    for i in 0..LARGE_FILES {
        let mut h = header(tar::EntryType::Regular, LARGE_SIZE, 0o755);
        bytes += LARGE_SIZE as u64;
        b.append_data(&mut h, format!("usr/lib/big-{i}.so"), &big[..])
            .unwrap();
    }
    b.finish().unwrap();
    ((SMALL_FILES + LARGE_FILES) as u64, bytes)
}

fn fresh(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    Command::new("sync").status().unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut runs = 5;
    let mut base = std::env::temp_dir().join(format!("locald-unpack-bench-{}", std::process::id()));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--dir" => base = PathBuf::from(args.next().expect("--dir DIR")),
            other => panic!("unknown argument {other}"),
        }
    }
    fs::create_dir_all(&base).unwrap();
    let layer = base.join("layer.tar");
    let (files, bytes) = build_layer(&layer);
    let out = base.join("out");
    println!(
        "layer: {files} files ({SMALL_FILES} small in {DIRS} dirs, {LARGE_FILES} x {} MiB), {:.1} MiB data, {:.1} MiB tar; {runs} runs",
        LARGE_SIZE >> 20,
        bytes as f64 / (1 << 20) as f64,
        fs::metadata(&layer).unwrap().len() as f64 / (1 << 20) as f64
    );
    let mut ours = Vec::new();
    let mut tar = Vec::new();
    for _ in 0..runs {
        fresh(&out);
        let t = Instant::now();
        let mut u = Unpacker::new(&out, Limits::default()).unwrap();
        u.apply_layer(
            fs::File::open(&layer).unwrap(),
            "application/vnd.oci.image.layer.v1.tar",
        )
        .unwrap();
        u.finish().unwrap();
        ours.push(t.elapsed());

        fresh(&out);
        let t = Instant::now();
        let st = Command::new("tar")
            .arg("-x")
            .arg("--no-same-owner")
            .arg("-f")
            .arg(&layer)
            .arg("-C")
            .arg(&out)
            .status()
            .unwrap();
        tar.push(t.elapsed());
        assert!(st.success());
    }
    let (o, t) = (median(ours), median(tar));
    let mibs = |d: Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "locald-image unpack: {:>8.1} ms  ({:.0} MiB/s)",
        o.as_secs_f64() * 1e3,
        mibs(o)
    );
    println!(
        "tar -x:              {:>8.1} ms  ({:.0} MiB/s)",
        t.as_secs_f64() * 1e3,
        mibs(t)
    );
    println!(
        "speed ratio (tar time / our time): {:.2}",
        t.as_secs_f64() / o.as_secs_f64()
    );
    let _ = fs::remove_dir_all(&base);
}
