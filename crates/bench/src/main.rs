//! `locald-bench`: times locald-vmm against QEMU microvm on tiny guests.
//!
//! For each VMM and guest it runs the VMM as a child process N times
//! (default 7, after one untimed warm-up) and reports medians of:
//! - process start → first guest byte on the child's stdout (pipe),
//! - process start → process exit,
//! - CPU time (user + sys) and peak RSS, from `wait4`'s rusage,
//! - process start → the VM destroyed: locald-vmm hands the host's VM
//!   teardown to a helper process that outlives it (kvm/teardown.rs); the
//!   bench is a child subreaper, so it reaps that helper too and reports
//!   when it ended and its CPU time (not in the VMM's own rusage),
//! - the cost of one port-I/O exit: (port_loop − pvh_exit0) / 100,000.
//!
//! It ends with the goals of issue 17 (item 6), measured as the issue did,
//! on "a tiny PVH guest that prints two lines" (`pvh_two_lines`): CPU ≤
//! 0.1× QEMU's, start → exit ≤ 0.25× QEMU's, peak RSS ≤ 3 MiB. `pvh_hello`
//! (about 500 bytes of output, so about 1,000 port exits whose cost is the
//! host KVM's and the same under both VMMs) is reported beside it.
//!
//! It is a measurement tool, not a test: it prints a table and fails only
//! when a VMM cannot be run at all or a guest ends with the wrong status.
//! Usage: `locald-bench [--runs N] [--vmm PATH] [--qemu PATH | --no-qemu]`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// OUTs that `port_loop` performs.
const PORT_LOOP_EXITS: f64 = 100_000.0;
/// A single run taking longer than this is killed and reported.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// How long a teardown helper may outlive its VMM.
const HELPER_LIMIT: Duration = Duration::from_secs(10);

/// Goals of issue 17, item 6 (pvh_hello): CPU and start → exit as a
/// fraction of QEMU's, and peak RSS in MiB.
const GOAL_CPU_RATIO: f64 = 0.10;
const GOAL_WALL_RATIO: f64 = 0.25;
const GOAL_RSS_MIB: f64 = 3.0;

/// Which VMM runs a guest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ours,
    Qemu,
}

/// Settings from the command line.
struct Options {
    runs: usize,
    vmm: PathBuf,
    qemu: Option<PathBuf>,
}

/// What one run measured.
struct Sample {
    first_byte: Option<Duration>,
    exit: Duration,
    cpu: Duration,
    max_rss_kib: u64,
    /// When the last process the VMM left behind (a teardown helper)
    /// ended; the VMM's exit if it left none.
    gone: Duration,
    /// CPU time of those processes.
    helper_cpu: Duration,
}

/// The guests, in the order of [`Summaries`].
const GUESTS: [&str; 4] = ["pvh_two_lines", "pvh_hello", "pvh_exit0", "port_loop"];

/// The medians of one VMM on each of [`GUESTS`].
type Summaries = [Summary; 4];

/// Picks one table cell out of a VMM's [`Summaries`].
type Getter = fn(&Summaries) -> Option<f64>;

/// Medians over the runs of one VMM on one guest.
struct Summary {
    first_byte_ms: Option<f64>,
    exit_ms: f64,
    cpu_ms: f64,
    rss_mib: f64,
    gone_ms: f64,
    helper_cpu_ms: f64,
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("locald-bench: {e}");
            eprintln!("usage: locald-bench [--runs N] [--vmm PATH] [--qemu PATH | --no-qemu]");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("locald-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<Options, String> {
    let mut runs = 7;
    let mut vmm = None;
    let mut qemu = Some(PathBuf::from("qemu-system-x86_64"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        match a.as_str() {
            "--runs" => {
                let v = value("--runs")?;
                runs = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("--runs: not a positive number: {v}"))?;
            }
            "--vmm" => vmm = Some(PathBuf::from(value("--vmm")?)),
            "--qemu" => qemu = Some(PathBuf::from(value("--qemu")?)),
            "--no-qemu" => qemu = None,
            "-h" | "--help" => {
                println!("usage: locald-bench [--runs N] [--vmm PATH] [--qemu PATH | --no-qemu]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let vmm = match vmm {
        Some(v) => v,
        None => default_vmm()?,
    };
    Ok(Options { runs, vmm, qemu })
}

/// The `locald-vmm` binary next to this one (same cargo profile), else in
/// `target/release` of the workspace.
fn default_vmm() -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("locald-vmm"));
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(Path::new(&dir).join("release/locald-vmm"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/locald-vmm"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
            "no locald-vmm binary found (looked at {}); run `cargo build --release` or pass --vmm",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
        })
}

fn run(opts: &Options) -> Result<(), String> {
    // Orphans of our children (locald-vmm's teardown helper) come to us.
    // SAFETY: sets a flag of this process; no pointers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut vmms = vec![Vmm::Ours];
    if opts.qemu.is_some() {
        vmms.push(Vmm::Qemu);
    }

    println!(
        "locald-bench: {} runs each (medians); ours = {}",
        opts.runs,
        opts.vmm.display()
    );
    let mut table: Vec<(Vmm, Summaries)> = Vec::new();
    for &vmm in &vmms {
        let one = |name: &str| -> Result<Summary, String> {
            eprint!("  {} {name} ...", label(vmm));
            let s = measure(opts, vmm, &test_guests::path(name))?;
            eprintln!(" exit {:.1} ms", s.exit_ms);
            Ok(s)
        };
        let [t, h, e, p] = GUESTS;
        table.push((vmm, [one(t)?, one(h)?, one(e)?, one(p)?]));
    }

    let cell = |v: Option<f64>, prec: usize| match v {
        Some(v) => format!("{v:.prec$}"),
        None => "-".to_string(),
    };
    let rows: Vec<(&str, usize, Getter)> = vec![
        ("pvh_two_lines: start -> first byte (ms)", 1, |s| {
            s[0].first_byte_ms
        }),
        ("pvh_two_lines: start -> exit (ms)", 1, |s| {
            Some(s[0].exit_ms)
        }),
        ("pvh_two_lines: start -> VM destroyed", 1, |s| {
            Some(s[0].gone_ms)
        }),
        ("pvh_two_lines: CPU user+sys (ms)", 1, |s| Some(s[0].cpu_ms)),
        ("pvh_two_lines: teardown helper CPU", 1, |s| {
            Some(s[0].helper_cpu_ms)
        }),
        ("pvh_two_lines: peak RSS (MiB)", 1, |s| Some(s[0].rss_mib)),
        ("pvh_hello: start -> first byte (ms)", 1, |s| {
            s[1].first_byte_ms
        }),
        ("pvh_hello: start -> exit (ms)", 1, |s| Some(s[1].exit_ms)),
        ("pvh_hello: CPU user+sys (ms)", 1, |s| Some(s[1].cpu_ms)),
        ("pvh_hello: peak RSS (MiB)", 1, |s| Some(s[1].rss_mib)),
        // The startup/teardown cost itself: a guest that exits at once.
        ("pvh_exit0: start -> exit (ms)", 1, |s| Some(s[2].exit_ms)),
        ("pvh_exit0: CPU user+sys (ms)", 1, |s| Some(s[2].cpu_ms)),
        ("port_loop: start -> exit (ms)", 1, |s| Some(s[3].exit_ms)),
        ("port I/O exit cost (us/exit)", 2, |s| {
            Some((s[3].exit_ms - s[2].exit_ms) * 1000.0 / PORT_LOOP_EXITS)
        }),
    ];

    println!();
    println!(
        "{:<38} {:>12} {:>12} {:>10}",
        "metric (median)", "locald-vmm", "qemu", "ours/qemu"
    );
    println!("{}", "-".repeat(75));
    for (name, prec, get) in &rows {
        let ours = table
            .iter()
            .find(|(v, _)| *v == Vmm::Ours)
            .and_then(|(_, s)| get(s));
        let qemu = table
            .iter()
            .find(|(v, _)| *v == Vmm::Qemu)
            .and_then(|(_, s)| get(s));
        let ratio = match (ours, qemu) {
            (Some(o), Some(q)) if q > 0.0 => Some(o / q),
            _ => None,
        };
        println!(
            "{:<38} {:>12} {:>12} {:>10}",
            name,
            cell(ours, *prec),
            cell(qemu, *prec),
            cell(ratio, 2)
        );
    }
    print_goals(&table);
    Ok(())
}

/// Prints the three goals of issue 17 (item 6) against this run, on
/// `pvh_two_lines`, and the same ratios on `pvh_hello` for context.
fn print_goals(table: &[(Vmm, Summaries)]) {
    let guest = |vmm, i: usize| table.iter().find(|(v, _)| *v == vmm).map(|(_, s)| &s[i]);
    let hello = |vmm| guest(vmm, 0);
    let Some(ours) = hello(Vmm::Ours) else {
        return;
    };
    let qemu = hello(Vmm::Qemu);

    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!();
    println!("goals (issue 17, item 6; pvh_two_lines, medians):");
    match qemu {
        Some(q) => {
            let cpu = ours.cpu_ms / q.cpu_ms;
            let wall = ours.exit_ms / q.exit_ms;
            println!(
                "  CPU           ours/qemu {cpu:>6.3}  goal <= {GOAL_CPU_RATIO:.2}  {}",
                verdict(cpu <= GOAL_CPU_RATIO)
            );
            println!(
                "  start->exit   ours/qemu {wall:>6.3}  goal <= {GOAL_WALL_RATIO:.2}  {}",
                verdict(wall <= GOAL_WALL_RATIO)
            );
        }
        None => println!("  CPU and start->exit ratios: need QEMU (--no-qemu given)"),
    }
    // Context: pvh_hello's CPU includes ~1,000 port-I/O exits of the guest's
    // own printing (each costs the host's KVM, not the VMM); pvh_exit0 is
    // the VMM's start and exit alone.
    for (i, what) in [
        (1, "pvh_hello, ~500 bytes of output"),
        (2, "pvh_exit0, no output"),
    ] {
        if let (Some(o), Some(q)) = (guest(Vmm::Ours, i), guest(Vmm::Qemu, i)) {
            println!(
                "  ({what}: CPU ours/qemu {:.3}, start->exit ours/qemu {:.3})",
                o.cpu_ms / q.cpu_ms,
                o.exit_ms / q.exit_ms
            );
        }
    }
    println!(
        "  peak RSS      ours {:>6.2} MiB   goal <= {GOAL_RSS_MIB:.2}  {}",
        ours.rss_mib,
        verdict(ours.rss_mib <= GOAL_RSS_MIB)
    );
}

fn label(vmm: Vmm) -> &'static str {
    match vmm {
        Vmm::Ours => "locald-vmm",
        Vmm::Qemu => "qemu",
    }
}

/// One warm-up run, then `opts.runs` measured runs; returns the medians.
fn measure(opts: &Options, vmm: Vmm, guest: &Path) -> Result<Summary, String> {
    let mut samples = Vec::with_capacity(opts.runs);
    for i in 0..=opts.runs {
        let s = run_once(opts, vmm, guest)?;
        if i > 0 {
            samples.push(s);
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let first: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.first_byte.map(ms))
        .collect();
    Ok(Summary {
        first_byte_ms: (first.len() == samples.len()).then(|| median(first)),
        exit_ms: median(samples.iter().map(|s| ms(s.exit)).collect()),
        cpu_ms: median(samples.iter().map(|s| ms(s.cpu)).collect()),
        rss_mib: median(
            samples
                .iter()
                .map(|s| s.max_rss_kib as f64 / 1024.0)
                .collect(),
        ),
        gone_ms: median(samples.iter().map(|s| ms(s.gone)).collect()),
        helper_cpu_ms: median(samples.iter().map(|s| ms(s.helper_cpu)).collect()),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn command(opts: &Options, vmm: Vmm, guest: &Path) -> Command {
    match vmm {
        Vmm::Ours => {
            let mut c = Command::new(&opts.vmm);
            c.arg("run")
                .arg("--kernel")
                .arg(guest)
                .args(["--memory", "64M", "--cpus", "1"]);
            c
        }
        Vmm::Qemu => {
            let mut c = Command::new(opts.qemu.as_deref().unwrap_or(Path::new("qemu")));
            c.args([
                "-M",
                "microvm",
                "-enable-kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
                "-m",
                "64",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
                "-kernel",
            ])
            .arg(guest);
            c
        }
    }
}

/// Runs the VMM once; the guest must end with status 0 (QEMU's
/// isa-debug-exit turns that into process status 1).
fn run_once(opts: &Options, vmm: Vmm, guest: &Path) -> Result<Sample, String> {
    let mut cmd = command(opts, vmm, guest);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", cmd.get_program().to_string_lossy()))?;
    let pid = child.id() as libc::pid_t;

    let (tx, rx) = mpsc::channel();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut first = None;
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if first.is_none() {
                        first = Some(start.elapsed());
                    }
                    all.extend_from_slice(&buf[..n]);
                }
            }
        }
        let _ = tx.send(());
        (first, all)
    });
    let mut stderr = child.stderr.take().expect("piped stderr");
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let (status, rusage, exit) = wait_with_limit(&mut child, pid, start)?;
    let (gone, helper_cpu) = reap_helpers(start, exit)?;
    let _ = rx.recv_timeout(Duration::from_secs(5));
    let (first_byte, output) = reader.join().map_err(|_| "stdout reader panicked")?;
    let errors = err_reader.join().unwrap_or_default();

    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    let name = guest.file_name().unwrap_or_default().to_string_lossy();
    if let Err(why) = check_run(vmm, &name, code, &output, &errors) {
        return Err(format!(
            "{} on {}: {why} ({})\nstdout: {}\nstderr: {}",
            label(vmm),
            guest.display(),
            describe_status(status),
            String::from_utf8_lossy(&output).trim_end(),
            errors.trim_end()
        ));
    }
    Ok(Sample {
        first_byte,
        exit,
        cpu: cpu_time(&rusage),
        max_rss_kib: rusage.ru_maxrss as u64,
        gone: gone.unwrap_or(exit).max(exit),
        helper_cpu,
    })
}

fn cpu_time(r: &libc::rusage) -> Duration {
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// Reaps what the VMM left behind (as subreaper: its orphans are ours),
/// waiting up to [`HELPER_LIMIT`]. Returns when the last one ended (none:
/// `None`) and their total CPU time.
fn reap_helpers(start: Instant, exit: Duration) -> Result<(Option<Duration>, Duration), String> {
    let mut last = None;
    let mut cpu = Duration::ZERO;
    loop {
        let mut status = 0;
        // SAFETY: as in `wait_with_limit`, for any child of ours.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: any child of this process; locals for the results.
        let r = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG | libc::__WALL, &mut rusage) };
        if r > 0 {
            last = Some(start.elapsed());
            cpu += cpu_time(&rusage);
            continue;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => return Ok((last, cpu)),
                _ => return Err(format!("wait4: {e}")),
            }
        }
        if start.elapsed() > exit + HELPER_LIMIT {
            return Err(format!(
                "a process left by the VMM still runs {HELPER_LIMIT:?} after it"
            ));
        }
        thread::sleep(Duration::from_micros(200));
    }
}

/// Decides whether a run did the work: the guest ended with status 0 and
/// printed what it prints. For QEMU, status 0 through isa-debug-exit is
/// process status 1 — which is also QEMU's own error exit, so there the
/// run must also have no stderr line other than a warning (QEMU reports
/// its errors there; `-cpu host,-arch-capabilities` warns on AMD hosts)
/// and the guest's output must be right.
fn check_run(
    vmm: Vmm,
    guest: &str,
    code: Option<i32>,
    stdout: &[u8],
    stderr: &str,
) -> Result<(), String> {
    let expected = match vmm {
        Vmm::Ours => 0,
        Vmm::Qemu => 1,
    };
    if code != Some(expected) {
        return Err(format!("expected exit status {expected}"));
    }
    if vmm == Vmm::Qemu {
        if let Some(line) = stderr
            .lines()
            .find(|l| !l.trim().is_empty() && !l.contains("warning:"))
        {
            return Err(format!("QEMU reported an error: {line}"));
        }
    }
    let out = String::from_utf8_lossy(stdout).replace('\r', "");
    let ok = match guest {
        "pvh_hello" => out.starts_with("pvh ok\n") && out.contains("\nmemmap entries: "),
        "pvh_two_lines" => out == "hello from pvh\nbye\n",
        _ => out.is_empty(),
    };
    if !ok {
        return Err(format!("unexpected guest output for {guest}"));
    }
    Ok(())
}

/// Waits for the child with `wait4` (for its rusage), killing it after
/// [`RUN_LIMIT`]. Returns the raw status, the rusage and the elapsed time.
fn wait_with_limit(
    child: &mut Child,
    pid: libc::pid_t,
    start: Instant,
) -> Result<(libc::c_int, libc::rusage, Duration), String> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: all-zero is a valid `rusage` (plain integers and timevals).
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own unreaped child; `status` and `rusage`
        // are valid, writable locals for the duration of the call.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        let now = start.elapsed();
        if r == pid {
            return Ok((status, rusage, now));
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("wait4: {e}"));
        }
        if now > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("a run took more than {RUN_LIMIT:?}; killed"));
        }
        // Poll finely: the exit time is what is being measured.
        thread::sleep(Duration::from_micros(200));
    }
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("raw status {status:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_status_1_counts_only_with_the_guest_output_and_no_error() {
        let hello = b"pvh ok\ncmdline: x\nmemmap entries: 2\n";
        assert_eq!(
            check_run(Vmm::Qemu, "pvh_hello", Some(1), hello, ""),
            Ok(())
        );
        let warn = "qemu-system-x86_64: warning: host doesn't support requested feature: \
                    CPUID.07H:EDX.arch-capabilities [bit 29]\n";
        assert_eq!(
            check_run(Vmm::Qemu, "pvh_exit0", Some(1), b"", warn),
            Ok(())
        );
        // QEMU's own error exit is also 1.
        let err = "qemu-system-x86_64: -kernel x: could not load kernel\n";
        assert!(check_run(Vmm::Qemu, "pvh_exit0", Some(1), b"", err).is_err());
        assert!(check_run(Vmm::Qemu, "pvh_hello", Some(1), b"", "").is_err());
        assert!(check_run(Vmm::Qemu, "pvh_hello", Some(3), hello, "").is_err());
        assert!(check_run(Vmm::Qemu, "port_loop", None, b"", "").is_err());
    }

    #[test]
    fn ours_needs_status_0_and_the_guest_output() {
        let hello = b"pvh ok\r\ncmdline: x\r\nmemmap entries: 2\r\n";
        assert_eq!(
            check_run(Vmm::Ours, "pvh_hello", Some(0), hello, ""),
            Ok(())
        );
        assert!(check_run(Vmm::Ours, "pvh_hello", Some(0), b"", "").is_err());
        assert!(check_run(Vmm::Ours, "pvh_exit0", Some(1), b"", "").is_err());
        assert!(check_run(Vmm::Ours, "port_loop", Some(0), b"junk", "").is_err());
        let two = b"hello from pvh\r\nbye\r\n";
        assert_eq!(
            check_run(Vmm::Ours, "pvh_two_lines", Some(0), two, ""),
            Ok(())
        );
        assert!(check_run(Vmm::Ours, "pvh_two_lines", Some(0), b"hello from pvh\n", "").is_err());
    }
}
