//! Commands that go through the guest agent: `run -- CMD` on the default
//! guest, and the named, long-lived VMs (`start`, `exec`, `stop`, `ps`,
//! and the hidden `serve` process behind `start`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use locald_vmm::agent::{ExecIo, ExecOutcome, ExecRequest};
use locald_vmm::instance::{self, ControlTarget, Info};
use locald_vmm::publish::{self, PortMap, Publisher};
use locald_vmm::{config, warm, ConsoleConfig, RunningVm, VirtualMachine};

use crate::{config_from, init_logging, install_main_filter, signals, RunArgs};

/// Grace period for a clean guest poweroff before the VM is stopped.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub(crate) struct StartArgs {
    /// Name of the VM (letters, digits, '-', '_', '.').
    #[arg(long)]
    name: String,
    /// Resume the snapshot in DIR instead of booting (`locald-vmm
    /// snapshot`). vCPUs and memory come from the snapshot; give the same
    /// devices (--disk, --share, --net…) it was taken with. The guest gets
    /// fresh entropy, the host's clock and the VM's name as hostname.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ExecArgs {
    /// The VM.
    name: String,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// Run on a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Command and arguments (after `--`).
    #[arg(last = true, value_name = "CMD", required = true)]
    command: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct SnapshotArgs {
    /// The VM.
    name: String,
    /// Directory for the snapshot: new or empty; created mode 0700.
    dir: PathBuf,
    /// Stop the VM once the snapshot is written.
    #[arg(long)]
    stop: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct StopArgs {
    /// The VM.
    name: String,
    /// Seconds to wait for a clean poweroff before stopping it by force.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(..=instance::MAX_STOP_TIMEOUT_SECS))]
    timeout: u64,
}

fn parse_env(env: &[String]) -> anyhow::Result<Vec<Vec<u8>>> {
    env.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if !k.is_empty() => Ok(kv.as_bytes().to_vec()),
            _ => anyhow::bail!("--env '{kv}' must be KEY=VALUE"),
        })
        .collect()
}

/// Our terminal's size (rows, cols), or 24x80.
fn terminal_size() -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass.
    let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
        (ws.ws_row, ws.ws_col)
    } else {
        (24, 80)
    }
}

fn request(argv: &[String], env: Vec<Vec<u8>>, workdir: Option<&str>, tty: bool) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        workdir: workdir.map(|w| w.as_bytes().to_vec()),
        uid: None,
        gid: None,
        tty: tty.then(terminal_size),
    }
}

/// Runs one command through an agent socket with our stdio; returns the
/// shell's exit code and prints a start failure as one line.
fn exec_with_stdio(
    run: impl FnOnce(ExecIo<'_>) -> Result<ExecOutcome, locald_vmm::Error>,
    tty: bool,
) -> anyhow::Result<u8> {
    let _raw = if tty && std::io::stdin().is_terminal() {
        locald_vmm::console::RawTerminal::enable()
    } else {
        None
    };
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let outcome = run(ExecIo {
        stdin: Some(Box::new(std::io::stdin())),
        stdout: &mut out,
        stderr: &mut err,
    })?;
    drop(_raw);
    if let ExecOutcome::Failed { message, .. } = &outcome {
        eprintln!("locald-vmm: {message}");
    }
    Ok(outcome.shell_code())
}

fn publishers(uds: &Path, specs: &[String]) -> anyhow::Result<Vec<Publisher>> {
    specs
        .iter()
        .map(|s| Ok(publish::publish(uds.to_path_buf(), PortMap::parse(s)?)?))
        .collect()
}

/// `run -- CMD` on the default guest: boot in agent mode, run the command
/// with our stdio, power the guest off cleanly, exit with its code.
pub(crate) fn run_with_agent(args: RunArgs) -> anyhow::Result<u8> {
    let maps: Vec<PortMap> = args
        .publish
        .iter()
        .map(|s| PortMap::parse(s))
        .collect::<Result<_, _>>()?;
    let mut cfg = config_from(&args)?;
    let (argv, workdir) = match &cfg.image {
        // The image's Entrypoint, Cmd and WorkingDir make the command.
        Some(run) => {
            let mut progress = locald_vmm::image::TerminalProgress::new();
            let img = locald_vmm::image::prepare(run, cfg.arch, &mut progress)?;
            let mut probe = cfg.clone();
            locald_vmm::image::apply(&mut probe, &img)?;
            (probe.command.unwrap_or_default(), probe.workdir)
        }
        None => (cfg.command.take().unwrap_or_default(), cfg.workdir.take()),
    };
    cfg.command = None;
    let env: Vec<Vec<u8>> = cfg
        .env
        .drain(..)
        .map(|(k, v)| format!("{k}={v}").into_bytes())
        .collect();
    cfg.agent = true;
    cfg.agent_timeout = Duration::from_secs(args.agent_timeout);
    cfg.console = if args.verbose {
        ConsoleConfig::Stderr
    } else {
        ConsoleConfig::Null
    };
    let seccomp = cfg.seccomp;
    // A warm guest has no disks (see `locald_vmm::warm`): its root is
    // tmpfs and its shares write through to the host, so once the command
    // ended nothing of it needs a clean poweroff.
    let warm_guest = warm::cold_reason(&cfg).is_none() && !args.cold;
    let mut vm = new_warm(cfg, args.cold)?.spawn()?;
    signals::set_target(vm.stopper());
    if seccomp {
        install_main_filter()?;
    }
    let ready = vm.wait_ready();
    let code = ready.map_err(anyhow::Error::from).and_then(|()| {
        let uds = vm
            .vsock_path()
            .context("agent VM without vsock")?
            .to_path_buf();
        let _pubs = maps
            .into_iter()
            .map(|m| publish::publish(uds.clone(), m))
            .collect::<Result<Vec<_>, _>>()?;
        let req = request(&argv, env, workdir.as_deref(), args.tty);
        exec_with_stdio(|io| vm.exec(req, io, |_| {}), args.tty)
    });
    // After a signal the guest is already powering off (or stopped):
    // whatever the command's relay saw, the answer is the signal.
    let status = if warm_guest && signals::received().is_none() {
        vm.stopper().force_stop();
        vm.wait()?
    } else {
        vm.stop(STOP_GRACE)?
    };
    tracing::info!("guest ended: {status:?}");
    if let Some(sig) = signals::received() {
        return Ok(signals::exit_code(sig));
    }
    code
}

/// Builds `cfg`'s VM, restoring the default guest's warm snapshot where
/// it can (see `locald_vmm::warm`); a snapshot that no longer restores is
/// removed and the VM boots cold as the new snapshot's template.
fn new_warm(cfg: locald_vmm::VmConfig, cold: bool) -> anyhow::Result<VirtualMachine> {
    let mut planned = cfg.clone();
    let plan = warm::plan(&mut planned, cold)?;
    tracing::info!("start: {plan:?}");
    match VirtualMachine::new(planned) {
        Ok(vm) => Ok(vm),
        Err(e) => match &plan {
            warm::Plan::Restore(dir) if warm::discard_if_stale(dir, &e) => {
                let mut again = cfg;
                warm::plan(&mut again, false)?;
                Ok(VirtualMachine::new(again)?)
            }
            _ => Err(e.into()),
        },
    }
}

/// `prepare --snapshot`: the default guest's warm snapshot for the default
/// vCPUs and memory (made now unless cached); returns its directory.
pub(crate) fn prepare_snapshot(arch: locald_vmm::GuestArch) -> anyhow::Result<PathBuf> {
    let mut cfg = locald_vmm::VmConfig {
        arch,
        agent: true,
        console: ConsoleConfig::Null,
        ..locald_vmm::VmConfig::default()
    };
    match warm::plan(&mut cfg, false)? {
        warm::Plan::Restore(dir) => Ok(dir),
        warm::Plan::Cold(why) => anyhow::bail!("no warm snapshot for this guest: {why}"),
        warm::Plan::Template(dir) => {
            let mut vm = VirtualMachine::new(cfg)?.spawn()?;
            vm.wait_ready()?;
            let _ = vm.stop(STOP_GRACE);
            if !dir.join(locald_vmm::snapshot::STATE_FILE).exists() {
                anyhow::bail!("the warm snapshot was not stored (run with LOCALD_VMM_LOG=info)");
            }
            Ok(dir)
        }
    }
}

/// `start`: spawns `serve` in its own session and waits for its verdict
/// (one line on its stdout: `ok` or `error: ...`).
pub(crate) fn start(args: StartArgs) -> anyhow::Result<u8> {
    instance::check_name(&args.name)?;
    if !args.run.command.is_empty() {
        anyhow::bail!(
            "start takes no command: run commands with `locald-vmm exec {} -- CMD`",
            args.name
        );
    }
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // Replace the subcommand: everything after it is the same.
    if let Some(i) = argv.iter().position(|a| a == "start") {
        argv[i] = "serve".into();
    }
    let mut child = Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the VM process")?;
    let mut verdict = String::new();
    if let Some(out) = child.stdout.take() {
        let mut r = std::io::BufReader::new(out);
        let _ = std::io::BufRead::read_line(&mut r, &mut verdict);
    }
    match verdict.trim_end() {
        "ok" => {
            println!("{}", args.name);
            Ok(0)
        }
        "" => {
            let status = child.wait().ok();
            let log = instance::dir(&args.name).join("console.log");
            anyhow::bail!(
                "the VM process ended during start ({}); see {}",
                status.map_or("unknown".into(), |s| s.to_string()),
                log.display()
            )
        }
        line => {
            let _ = child.wait();
            anyhow::bail!("{}", line.trim_start_matches("error: "))
        }
    }
}

/// Serves a started VM: its state directory, the VM, published ports and
/// the control socket, until `stop` or the guest ends.
pub(crate) fn serve(args: StartArgs) -> anyhow::Result<u8> {
    // SAFETY: setsid has no memory effects; failure (already a leader) is harmless.
    unsafe { libc::setsid() };
    let result = serve_inner(&args);
    if let Err(e) = &result {
        // Until `ok` is written, stdout is the pipe `start` reads.
        println!("error: {e:#}");
        let _ = std::io::stdout().flush();
    }
    result
}

/// Points standard descriptor `fd` at `f` (the VM's console.log, opened
/// with `O_NOFOLLOW`).
fn redirect(fd: i32, f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto a standard descriptor we own; `f` stays valid for the call.
    if unsafe { libc::dup2(f.as_raw_fd(), fd) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

struct Served {
    vm: Option<RunningVm>,
    info: Info,
}

impl ControlTarget for Served {
    fn info(&self) -> Info {
        self.info.clone()
    }
    fn stop(&mut self, timeout: Duration) -> String {
        match self.vm.take().map(|vm| vm.stop(timeout)) {
            Some(Ok(status)) => format!("{status:?}").to_lowercase(),
            Some(Err(e)) => format!("error: {e}"),
            None => "already stopped".into(),
        }
    }
    fn snapshot(&mut self, dir: &Path, stop: bool) -> instance::Response {
        let Some(vm) = self.vm.as_ref() else {
            return instance::Response::Error {
                message: "the VM is not running".into(),
            };
        };
        let after = if stop {
            locald_vmm::snapshot::AfterSnapshot::Stop
        } else {
            locald_vmm::snapshot::AfterSnapshot::Resume
        };
        match vm.snapshot(dir, after) {
            Ok(info) => {
                if stop {
                    if let Some(vm) = self.vm.take() {
                        let _ = vm.wait();
                    }
                }
                instance::Response::Snapshotted {
                    dir: info.dir,
                    paused_ms: info.paused.as_millis() as u64,
                    memory_bytes: info.memory_written,
                    stopped: stop,
                }
            }
            Err(e) => instance::Response::Error {
                message: e.to_string(),
            },
        }
    }
    fn running(&self) -> bool {
        // After SIGINT/SIGTERM the server still answers until the guest
        // has powered off (the signal thread asked it to).
        self.vm.as_ref().is_some_and(RunningVm::is_running)
    }
}

fn serve_inner(args: &StartArgs) -> anyhow::Result<u8> {
    // Checked, created already locked (a `ps` meanwhile sees it starting).
    let claimed = instance::create_dir(&args.name)?;
    let dir = claimed.dir.clone();
    let cleanup = DirGuard(dir.clone());
    let log = instance::open_console_log(&dir, true)?;
    redirect(2, &log).context("redirecting stderr to console.log")?;
    init_logging(args.run.verbose);
    let maps: Vec<PortMap> = args
        .run
        .publish
        .iter()
        .map(|s| PortMap::parse(s))
        .collect::<Result<_, _>>()?;
    let mut cfg = config_from(&args.run)?;
    cfg.command = None;
    cfg.agent = true;
    cfg.agent_timeout = Duration::from_secs(args.run.agent_timeout);
    cfg.console = ConsoleConfig::Stderr;
    if let Some(dir) = &args.restore {
        let dir = std::path::absolute(dir)
            .with_context(|| format!("snapshot directory {}", dir.display()))?;
        (cfg.vcpus, cfg.memory_mib) = locald_vmm::snapshot::machine_of(&dir)?;
        cfg.restore = Some(dir);
        cfg.hostname = Some(args.name.clone());
    }
    let uds = dir.join("vsock.sock");
    cfg.vsock = Some(config::VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    });
    let (cpus, memory_mib, seccomp) = (cfg.vcpus, cfg.memory_mib, cfg.seccomp);
    let vm = if cfg.restore.is_some() {
        VirtualMachine::new(cfg)?
    } else {
        new_warm(cfg, args.run.cold)?
    };
    let exposed = vm
        .image()
        .map(|i| i.config.exposed_ports.clone())
        .unwrap_or_default();
    let mut vm = vm.spawn()?;
    signals::set_target(vm.stopper());
    if seccomp {
        install_main_filter()?;
    }
    vm.wait_ready()?;
    let pubs = publishers(&uds, &args.run.publish)?;
    let listener = std::os::unix::net::UnixListener::bind(dir.join("control.sock"))
        .context("binding the control socket")?;
    let mut served = Served {
        vm: Some(vm),
        info: Info {
            version: instance::PROTOCOL_VERSION,
            name: args.name.clone(),
            pid: std::process::id(),
            cpus,
            memory_mib,
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            vsock: uds,
            publish: maps.iter().map(|m| (m.host, m.guest)).collect(),
            exposed,
        },
    };
    println!("ok");
    std::io::stdout().flush()?;
    redirect(1, &log)?;
    instance::serve_control(&listener, &mut served)?;
    drop(pubs);
    // The guest ended on its own (or was stopped): reap the VM thread.
    if let Some(vm) = served.vm.take() {
        let _ = vm.stop(STOP_GRACE);
    }
    // Removed while its lock is still held.
    drop(cleanup);
    drop(claimed);
    Ok(signals::received().map_or(0, signals::exit_code))
}

/// Removes a named VM's state directory when its VMM ends.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `exec NAME -- CMD`.
pub(crate) fn exec(args: ExecArgs) -> anyhow::Result<u8> {
    instance::check_name(&args.name)?;
    // Asking for info first turns a missing or crashed VM into a clear error.
    instance::info(&args.name)?;
    // The socket in the checked state directory, not a path the VM reports.
    let vsock = instance::checked_vsock_path(&args.name)?;
    let req = request(
        &args.command,
        parse_env(&args.env)?,
        args.workdir.as_deref(),
        args.tty,
    );
    exec_with_stdio(
        |io| Ok(locald_vmm::agent::exec(&vsock, req, io, |_| {})?),
        args.tty,
    )
}

/// `stop NAME`.
pub(crate) fn stop(args: StopArgs) -> anyhow::Result<()> {
    let how = instance::stop(&args.name, Duration::from_secs(args.timeout))?;
    println!("{}: {how}", args.name);
    Ok(())
}

/// `snapshot NAME DIR [--stop]`.
pub(crate) fn snapshot(args: SnapshotArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir)
        .with_context(|| format!("snapshot directory {}", args.dir.display()))?;
    match instance::snapshot(&args.name, &dir, args.stop)? {
        instance::Response::Snapshotted {
            dir,
            paused_ms,
            memory_bytes,
            stopped,
        } => {
            println!(
                "{}: snapshot in {} (paused {paused_ms} ms, {:.1} MiB of memory written){}",
                args.name,
                dir.display(),
                memory_bytes as f64 / f64::from(1 << 20),
                if stopped { ", VM stopped" } else { "" }
            );
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from VM '{}': {other:?}", args.name),
    }
}

/// `ps`.
pub(crate) fn ps() -> anyhow::Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!(
        "{:<20} {:>8} {:>4} {:>8} {:>8}  PUBLISH / EXPOSED",
        "NAME", "PID", "CPUS", "MEMORY", "UPTIME"
    );
    for (name, info) in instance::list()? {
        match info {
            Ok(i) => {
                let publish: Vec<String> =
                    i.publish.iter().map(|(h, g)| format!("{h}:{g}")).collect();
                let exposed = if i.exposed.is_empty() {
                    String::new()
                } else {
                    format!(" (exposes {})", i.exposed.join(","))
                };
                println!(
                    "{:<20} {:>8} {:>4} {:>7}M {:>7}s  {}{}",
                    name,
                    i.pid,
                    i.cpus,
                    i.memory_mib,
                    now.saturating_sub(i.started_at),
                    publish.join(","),
                    exposed
                );
            }
            Err(instance::InstanceError::Busy(_)) => {
                println!(
                    "{name:<20} {:>8} {:>4} {:>8} {:>8}  (starting)",
                    "-", "-", "-", "-"
                );
            }
            Err(e) => eprintln!("locald-vmm: {e}"),
        }
    }
    Ok(())
}
