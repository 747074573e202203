//! virtio-fs server benchmark through a host FUSE mount: the same server
//! the virtio-fs device runs (ShareFs behind fuse-backend-rs), mounted on
//! the host through /dev/fuse, against the same operations on the shared
//! host directory directly. Reports ops/s (MiB/s for sequential I/O),
//! medians over runs, and the ratio mount/direct. Needs root and /dev/fuse.
//!
//! Usage: locald-fs-bench [--runs N]

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use locald_vmm::devices::virtio::fs::host::HostMount;
use locald_vmm::devices::virtio::fs::{ShareCache, ShareFsOptions};

const SMALL: usize = 4096;
const STATS: usize = 20_000;
const READS: usize = 5_000;
const CREATES: usize = 2_000;
const DIR_ENTRIES: usize = 10_000;
const SEQ_MIB: usize = 256;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `op` on `base` `runs` times; returns the median rate (units/s).
fn rate(runs: usize, base: &Path, units: f64, op: &dyn Fn(&Path, usize)) -> f64 {
    median(
        (0..runs)
            .map(|r| {
                let t = Instant::now();
                op(base, r);
                units / t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn setup(dir: &Path) {
    fs::create_dir_all(dir.join("big")).unwrap();
    for i in 0..DIR_ENTRIES {
        fs::write(dir.join("big").join(format!("f{i:05}")), b"").unwrap();
    }
    fs::write(dir.join("small"), vec![7u8; SMALL]).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5usize);
    if !Path::new("/dev/fuse").exists() {
        eprintln!("locald-fs-bench: /dev/fuse is missing");
        std::process::exit(1);
    }
    let tmp = std::env::temp_dir().join(format!("locald-fs-bench-{}", std::process::id()));
    let share = tmp.join("share");
    let mnt = tmp.join("mnt");
    fs::create_dir_all(&share).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    setup(&share);
    let mount = HostMount::mount(
        ShareFsOptions::new(&share, false, ShareCache::Auto),
        &mnt,
        2,
    )
    .expect("mount the share through /dev/fuse (needs root)");

    type Op = Box<dyn Fn(&Path, usize)>;
    let ops: Vec<(&str, &str, f64, Op)> = vec![
        (
            "stat",
            "ops/s",
            STATS as f64,
            Box::new(|b: &Path, _| {
                let p = b.join("small");
                for _ in 0..STATS {
                    fs::metadata(&p).unwrap();
                }
            }),
        ),
        (
            "open+read 4 KiB",
            "ops/s",
            READS as f64,
            Box::new(|b: &Path, _| {
                let p = b.join("small");
                let mut buf = vec![0u8; SMALL];
                for _ in 0..READS {
                    let mut f = fs::File::open(&p).unwrap();
                    f.read_exact(&mut buf).unwrap();
                }
            }),
        ),
        (
            "create+write 4 KiB+close",
            "ops/s",
            CREATES as f64,
            Box::new(|b: &Path, r| {
                let d = b.join(format!("c{r}"));
                fs::create_dir_all(&d).unwrap();
                let data = vec![1u8; SMALL];
                for i in 0..CREATES {
                    let mut f = fs::File::create(d.join(format!("n{i}"))).unwrap();
                    f.write_all(&data).unwrap();
                }
            }),
        ),
        (
            "readdir 10k entries",
            "entries/s",
            DIR_ENTRIES as f64,
            Box::new(|b: &Path, _| {
                let n = fs::read_dir(b.join("big")).unwrap().count();
                assert_eq!(n, DIR_ENTRIES);
            }),
        ),
        (
            "sequential write 256 MiB",
            "MiB/s",
            SEQ_MIB as f64,
            Box::new(|b: &Path, _| {
                let mut f = fs::File::create(b.join("seq")).unwrap();
                let block = vec![3u8; 1 << 20];
                for _ in 0..SEQ_MIB {
                    f.write_all(&block).unwrap();
                }
                f.sync_all().unwrap();
            }),
        ),
        (
            "sequential read 256 MiB",
            "MiB/s",
            SEQ_MIB as f64,
            Box::new(|b: &Path, _| {
                let mut f = fs::File::open(b.join("seq")).unwrap();
                let mut block = vec![0u8; 1 << 20];
                let mut total = 0;
                loop {
                    let n = f.read(&mut block).unwrap();
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                assert_eq!(total, SEQ_MIB << 20);
            }),
        ),
    ];
    println!("virtio-fs server via host FUSE mount vs the host directory ({runs} runs, medians)");
    println!(
        "{:<28} {:>14} {:>14} {:>7}  unit",
        "operation", "direct", "fuse mount", "ratio"
    );
    for (name, unit, units, op) in &ops {
        let clean = || {
            for r in 0..runs {
                let _ = fs::remove_dir_all(share.join(format!("c{r}")));
            }
        };
        let direct = rate(runs, &share, *units, op.as_ref());
        clean();
        let fuse = rate(runs, mount.mountpoint(), *units, op.as_ref());
        clean();
        println!(
            "{name:<28} {direct:>14.0} {fuse:>14.0} {:>7.2}  {unit}",
            fuse / direct
        );
    }
    drop(mount);
    let _ = fs::remove_dir_all(&tmp);
}
