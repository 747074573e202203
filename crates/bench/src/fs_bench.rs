//! `locald-fs-bench`: the cost of locald-vmm's virtio-fs server, as
//! ops/s (MiB/s for sequential I/O), medians over runs, and the ratio to
//! the same operations on the shared host directory directly. Two modes:
//!
//! - **inproc** (`fs_inproc.rs`): FUSE requests in a virtio queue in guest
//!   memory, served by the device's own queue function
//!   (`devices::virtio::fs::process_queue`) — the server's cost without a
//!   guest kernel, KVM or host FUSE; no privileges needed;
//! - **mount**: the same server (ShareFs behind fuse-backend-rs) mounted on
//!   the host through /dev/fuse, driven with ordinary syscalls — the host
//!   kernel's FUSE client standing in for the guest's. Needs root and
//!   /dev/fuse.
//!
//! Usage: `locald-fs-bench [--mode inproc|mount|both] [--runs N] [--dir DIR]
//! [--seq-mib N] [--only TEXT] [--inodes auto|fds|handles] [--check]`
//! (`--only` keeps the in-process workloads whose name contains TEXT;
//! `--inodes` makes the in-process server keep inodes as fds or file
//! handles instead of what the VMM would choose on this host; `--check` runs only the in-process
//! self-check, which compares what each FUSE operation returned or wrote
//! with the host directory byte for byte).

mod fs_inproc;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
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

/// The host-FUSE-mount half: the mount vs the host directory.
fn mount_mode(runs: usize, tmp: &Path) -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".into());
    }
    let share = tmp.join("share");
    let mnt = tmp.join("mnt");
    fs::create_dir_all(&share).map_err(|e| e.to_string())?;
    fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    setup(&share);
    let mount = HostMount::mount(
        ShareFsOptions::new(&share, false, ShareCache::Auto),
        &mnt,
        2,
    )
    .map_err(|e| format!("mount the share through /dev/fuse (needs root): {e}"))?;

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
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Inproc,
    Mount,
    Both,
}

struct Options {
    mode: Mode,
    runs: usize,
    dir: PathBuf,
    seq_mib: u64,
    only: Option<String>,
    check: bool,
    /// In-process: inodes as file handles (true) or fds (false); None:
    /// what the VMM would choose on this host.
    inode_handles: Option<bool>,
}

const USAGE: &str = "usage: locald-fs-bench [--mode inproc|mount|both] [--runs N] [--dir DIR] \
                     [--seq-mib N] [--only TEXT] [--inodes auto|fds|handles] [--check]";

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        mode: Mode::Both,
        runs: 5,
        dir: std::env::temp_dir(),
        seq_mib: SEQ_MIB as u64,
        only: None,
        check: false,
        inode_handles: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--mode" => {
                o.mode = match value()?.as_str() {
                    "inproc" => Mode::Inproc,
                    "mount" => Mode::Mount,
                    "both" => Mode::Both,
                    m => return Err(format!("--mode: unknown mode {m}")),
                }
            }
            "--runs" => o.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--dir" => o.dir = value()?.into(),
            "--seq-mib" => o.seq_mib = value()?.parse().map_err(|e| format!("--seq-mib: {e}"))?,
            "--only" => o.only = Some(value()?),
            "--check" => o.check = true,
            "--inodes" => {
                o.inode_handles = match value()?.as_str() {
                    "auto" => None,
                    "fds" => Some(false),
                    "handles" => Some(true),
                    m => return Err(format!("--inodes: unknown mode {m}")),
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    if o.runs == 0 || o.seq_mib == 0 {
        return Err("need --runs >= 1 and --seq-mib >= 1".into());
    }
    Ok(o)
}

/// The in-process half: the device's queue function vs the host directory.
fn inproc_mode(o: &Options, tmp: &Path) -> Result<(), String> {
    let share = tmp.join("inproc");
    fs::create_dir_all(&share).map_err(|e| e.to_string())?;
    let sizes = fs_inproc::Sizes {
        stats: STATS,
        reads: READS,
        creates: CREATES,
        dir_entries: DIR_ENTRIES,
        listings: 10,
        small: SMALL,
        seq: o.seq_mib << 20,
    };
    fs_inproc::populate(&share, &sizes).map_err(|e| format!("populate the share: {e}"))?;
    let mut dev = fs_inproc::Device::new(&share, o.inode_handles)?;
    let tree = fs_inproc::Tree::open(&mut dev, &share)?;
    fs_inproc::self_check(&mut dev, &tree, &sizes)?;
    println!(
        "in-process self-check passed (READ bytes, WRITE bytes on the host, listings, \
         inode numbers, error replies, no leaked inodes or handles)"
    );
    if o.check {
        return Ok(());
    }
    println!(
        "virtio-fs device in-process (process_queue over a guest-memory queue, one request \
         per pass) vs the host directory ({} runs, medians, {} in the host page cache)",
        o.runs,
        share.display()
    );
    let init = dev.init_out();
    println!(
        "inodes kept as {} (fd limit {})",
        if dev.inode_handles() {
            "file handles (name_to_handle_at/open_by_handle_at)"
        } else {
            "O_PATH fds"
        },
        locald_vmm::devices::virtio::fs::share::fd_limit()
    );
    println!(
        "INIT reply: max_write {} bytes, max_pages {} (0: not negotiated; a Linux guest then \
         reads at most 32 pages = 128 KiB per READ)",
        init.max_write, init.max_pages
    );
    let rows = fs_inproc::bench(&mut dev, &tree, &sizes, o.runs, o.only.as_deref())?;
    fs_inproc::print_rows(&rows);
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("locald-fs-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let tmp = o
        .dir
        .join(format!("locald-fs-bench-{}", std::process::id()));
    let mut status = ExitCode::SUCCESS;
    if o.check || o.mode != Mode::Mount {
        if let Err(e) = inproc_mode(&o, &tmp) {
            eprintln!("locald-fs-bench: in-process: {e}");
            status = ExitCode::FAILURE;
        }
    }
    if !o.check && o.mode != Mode::Inproc {
        if o.mode == Mode::Both {
            println!();
        }
        if let Err(e) = mount_mode(o.runs, &tmp) {
            eprintln!("locald-fs-bench: mount: {e}");
            status = ExitCode::FAILURE;
        }
    }
    let _ = fs::remove_dir_all(&tmp);
    status
}
