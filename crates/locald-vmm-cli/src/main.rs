//! `locald-vmm`: the command-line front end of the locald-vmm library. Parses
//! flags, builds a `VmConfig`, runs the VM on the main thread and exits with
//! the guest command's status (125 for VMM errors, as docker and libkrun).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod images;
mod named;
mod signals;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use locald_vmm::{
    config, config::GuestArch, ConfigError, ConsoleConfig, CpuCompat, DiskConfig, RootfsConfig,
    VirtualMachine, VmConfig,
};

/// clap value parser for `--arch`.
fn parse_arch(s: &str) -> Result<GuestArch, String> {
    GuestArch::parse(s).map_err(|e| e.to_string())
}

/// Exit code for failures of the VMM itself.
const VMM_ERROR: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "locald-vmm",
    version,
    about = "Run commands in fast-booting Linux microVMs on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM and run a command in it (or attach to its console).
    ///
    /// Without --kernel the default guest (a small Linux kernel and an
    /// initramfs with busybox, built and cached on first use) is used.
    /// The exit status is the command's; 125 means the VMM failed, 126/127
    /// that the command could not be executed / was not found.
    Run(Box<RunArgs>),
    /// Build (or find in the cache) the default guest kernel and initramfs,
    /// and print where they are (and the default guest's command line on a
    /// software KVM, without device entries). `run` does this on first use
    /// anyway.
    Prepare(PrepareArgs),
    /// Build an ext4 root-filesystem image for `run --rootfs` from a
    /// directory (with mkfs.ext4 -d; no root needed). The default guest's
    /// static busybox is added unless --no-busybox.
    Mkrootfs(MkrootfsArgs),
    /// Start a named VM in the background (same flags as `run`, no
    /// command); returns once its guest agent is ready.
    Start(Box<named::StartArgs>),
    /// Run a command in a named VM (stdout, stderr and exit code relayed).
    Exec(named::ExecArgs),
    /// Stop a named VM: clean guest poweroff (disks synced), forced after
    /// --timeout.
    Stop(named::StopArgs),
    /// Pause a named VM and write its snapshot (state and memory) into a
    /// new directory; it then runs on, or stops with --stop. Restore with
    /// `start --name N --restore DIR`.
    Snapshot(named::SnapshotArgs),
    /// List named VMs.
    Ps,
    /// Pull an OCI image into the cache (registry, OCI layout or archive).
    Pull(images::PullArgs),
    /// List the cached OCI images with their sizes.
    Images,
    /// Remove cached images, or prune what no image uses.
    #[command(subcommand)]
    Image(images::ImageCmd),
    /// Internal: the background process of `start`.
    #[command(hide = true)]
    Serve(Box<named::StartArgs>),
}

#[derive(clap::Args, Debug)]
struct PrepareArgs {
    /// Also make the default guest's warm snapshot (what `run` restores
    /// instead of booting), for the default vCPUs and memory.
    #[arg(long)]
    snapshot: bool,
    /// Guest architecture: x86_64 (amd64) or aarch64 (arm64). Default: the
    /// host's. The aarch64 kernel is cross-built with Debian's
    /// gcc-aarch64-linux-gnu (about ten minutes on two cores, once).
    #[arg(long, value_name = "ARCH", value_parser = parse_arch)]
    arch: Option<GuestArch>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// Guest kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (newc cpio). Default: the default guest's initramfs.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to the VMM's own.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = locald_vmm::config::DEFAULT_VCPUS.into())]
    cpus: u32,
    /// Guest memory: MiB, or with a suffix M, G or T (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    memory: String,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory of the command in the guest.
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// Software-KVM compatibility path: auto-detect, force on, or off.
    #[arg(long, value_enum, default_value_t = Compat::Auto)]
    cpu_compat: Compat,
    /// Stop the VM (exit 125) after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Sample the guest's instruction pointer HZ times a second and print a
    /// histogram by kernel symbol at exit (debug aid).
    #[arg(long, value_name = "HZ", default_value_t = 0)]
    profile_guest: u32,
    /// System.map for --profile-guest (default: the default kernel's).
    #[arg(long, value_name = "PATH")]
    system_map: Option<PathBuf>,
    /// Attach a raw disk image as a virtio block device (repeatable; the
    /// guest sees /dev/vda, /dev/vdb, … in order, after a --rootfs disk):
    /// PATH[,ro][,cache=writeback|writethrough|unsafe][,id=SERIAL].
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// Boot into this ext4 image as the root filesystem (it becomes
    /// /dev/vda) and run the command there. Same options as --disk.
    #[arg(long, value_name = "SPEC")]
    rootfs: Option<String>,
    /// Filesystem type of --rootfs.
    #[arg(long, value_name = "TYPE", default_value = "ext4")]
    rootfs_type: String,
    /// Boot an OCI image: a registry reference (`alpine`,
    /// `host:5000/app:tag`), an OCI layout directory, or a `docker save`/OCI
    /// archive tarball. Pulled into the cache on first use; its Entrypoint,
    /// Cmd, Env, WorkingDir and User apply (a command after `--` replaces
    /// Cmd). The root is writable, and the cached image never changes.
    #[arg(long, value_name = "IMAGE", conflicts_with = "rootfs")]
    image: Option<String>,
    /// Speak plain HTTP to this registry (HOST or HOST:PORT; loopback
    /// registries always may). Repeatable.
    #[arg(long, value_name = "HOST", requires = "image")]
    insecure_registry: Vec<String>,
    /// Run the command as this user (`uid[:gid]` or names from the image's
    /// /etc/passwd and /etc/group); default: the image's User.
    #[arg(long, value_name = "USER", requires = "image")]
    user: Option<String>,
    /// The guest's hostname (default: the image's name).
    #[arg(long, value_name = "NAME", requires = "image")]
    hostname: Option<String>,
    /// Do not attach the virtio entropy device.
    #[arg(long)]
    no_rng: bool,
    /// Run x86_64 Linux binaries in the aarch64 guest through Apple's
    /// Rosetta (macOS on Apple Silicon only).
    #[arg(long)]
    rosetta: bool,
    /// Attach a virtio network card: `user` (unprivileged, through passt;
    /// `,publish=HOST_PORT:GUEST_PORT` maps host loopback TCP ports;
    /// `,offload=on` lets the guest send TSO packets that the VMM cuts up),
    /// `tap=NAME` (an existing TAP) or `tap` (create one; CAP_NET_ADMIN).
    /// Options: `,mac=XX:…`, `,ip=ADDR/PREFIX|dhcp|none`, `,gw=`, `,dns=`.
    /// The default guest brings eth0 up (DHCP unless ip= is given).
    #[arg(long, value_name = "SPEC")]
    net: Option<String>,
    /// Share a host directory with the guest over virtio-fs, mounted by
    /// the default guest at GUEST_PATH (repeatable): HOST_DIR:GUEST_PATH[:ro].
    #[arg(long, value_name = "HOST_DIR:GUEST_PATH[:ro]")]
    share: Vec<String>,
    /// Guest caching of --share directories: never, auto (host edits seen at
    /// the next open, attributes within 1 s) or always.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    share_cache: String,
    /// Publish a guest TCP port on host loopback: HOST_PORT:GUEST_PORT
    /// (repeatable; carried over vsock, no root needed).
    #[arg(long, short = 'p', value_name = "HOST:GUEST")]
    publish: Vec<String>,
    /// Run the command on a pseudo-terminal (for interactive programs).
    #[arg(short = 't', long)]
    tty: bool,
    /// Run the command over the serial console instead of the guest agent
    /// (stdout and stderr mixed with the console; no vsock device).
    #[arg(long)]
    serial: bool,
    /// Boot the default guest instead of restoring its warm snapshot
    /// (made on first use, or by `prepare --snapshot`).
    #[arg(long)]
    pub(crate) cold: bool,
    /// Seconds to wait for the guest agent before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    agent_timeout: u64,
    /// Guest architecture: x86_64 (amd64) or aarch64 (arm64). Default: the
    /// host's. Selects the default guest kernel and initramfs; the KVM
    /// backend runs only the host's architecture.
    #[arg(long, value_name = "ARCH", value_parser = parse_arch)]
    arch: Option<GuestArch>,
    /// Verbose: VMM log, guest kernel log and boot timings on stderr.
    #[arg(short, long)]
    verbose: bool,
    /// Run without seccomp filters (a debugging aid: with them, a system
    /// call outside a thread's allow-list ends the VMM; see docs/seccomp.md).
    #[arg(long)]
    no_seccomp: bool,
    /// Command and arguments to run in the guest (after `--`).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct MkrootfsArgs {
    /// Directory whose contents become the guest's `/` (default: empty).
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// Image size (sparse): MiB, or with a suffix M or G.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    size: String,
    /// Do not add busybox and its applet links.
    #[arg(long)]
    no_busybox: bool,
    /// Image file to write (replaced if it exists).
    image: PathBuf,
}

fn mkrootfs(args: &MkrootfsArgs) -> anyhow::Result<()> {
    let size_mib = config::parse_memory_size(&args.size)
        .map_err(|_| anyhow::anyhow!("invalid --size '{}': use e.g. 256M or 1G", args.size))?;
    locald_vmm::assets::build_rootfs(&locald_vmm::assets::RootfsImage {
        source: args.from.clone(),
        image: args.image.clone(),
        size_mib,
        busybox: !args.no_busybox,
    })?;
    println!("{}", args.image.display());
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Compat {
    Auto,
    On,
    Off,
}

pub(crate) fn config_from(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let vcpus = u8::try_from(args.cpus)
        .ok()
        .filter(|n| (1..=config::MAX_VCPUS).contains(n))
        .ok_or(ConfigError::Vcpus(args.cpus, config::MAX_VCPUS as u32))?;
    let memory_mib = config::parse_memory_size(&args.memory)?;
    let env = args
        .env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env '{kv}' must be KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let timeout = match args.timeout {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            anyhow::bail!("--timeout must be a positive number of seconds")
        }
        Some(t) => Some(
            Duration::try_from_secs_f64(t)
                .ok()
                .filter(|d| *d <= locald_vmm::config::MAX_TIMEOUT)
                .context("--timeout is too large (at most 100 years)")?,
        ),
        None => None,
    };
    let mut cmdline = args.cmdline.clone();
    if args.verbose && args.kernel.is_none() {
        // The default guest boots `quiet`; a later loglevel wins.
        cmdline = Some(
            format!("loglevel=7 {}", cmdline.unwrap_or_default())
                .trim()
                .to_string(),
        );
    }
    Ok(VmConfig {
        arch: args.arch.unwrap_or_else(GuestArch::host),
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline,
        command: (!args.command.is_empty()).then(|| args.command.clone()),
        env,
        workdir: args.workdir.clone(),
        vcpus,
        memory_mib,
        console: ConsoleConfig::Stdio,
        cpu_compat: match args.cpu_compat {
            Compat::Auto => CpuCompat::Auto,
            Compat::On => CpuCompat::On,
            Compat::Off => CpuCompat::Off,
        },
        timeout,
        profile_hz: args.profile_guest,
        system_map: args.system_map.clone(),
        disks: args
            .disk
            .iter()
            .map(|d| DiskConfig::parse(d))
            .collect::<Result<_, _>>()?,
        rootfs: match &args.rootfs {
            Some(r) => Some(RootfsConfig {
                overlay: false,
                disk: DiskConfig::parse(r)?,
                fstype: args.rootfs_type.clone(),
            }),
            None => None,
        },
        rng: !args.no_rng,
        vsock: None,
        agent: false,
        agent_timeout: Duration::from_secs(args.agent_timeout),
        net: match &args.net {
            Some(n) => Some(locald_vmm::config::NetConfig::parse(n)?),
            None => None,
        },
        seccomp: !args.no_seccomp,
        rosetta: args.rosetta,
        image: args
            .image
            .as_ref()
            .map(|source| locald_vmm::config::ImageRun {
                source: source.clone(),
                insecure_registries: args.insecure_registry.clone(),
                offline: false,
            }),
        user: args.user.clone(),
        restore: None,
        late_shares: false,
        snapshot_at_ready: None,
        hostname: args.hostname.clone(),
        shares: {
            let cache =
                locald_vmm::config::ShareCache::parse(&args.share_cache).ok_or_else(|| {
                    locald_vmm::ConfigError::ShareSpec(
                        format!("--share-cache {}", args.share_cache),
                        "expected never, auto or always".into(),
                    )
                })?;
            args.share
                .iter()
                .map(|s| locald_vmm::config::ShareConfig::parse(s, cache))
                .collect::<Result<_, _>>()?
        },
    })
}

/// Whether `run` goes through the guest agent: a command (or an image's)
/// on the default guest, unless --serial.
fn uses_agent(args: &RunArgs) -> bool {
    !args.serial
        && args.kernel.is_none()
        && args.initrd.is_none()
        && (!args.command.is_empty() || args.image.is_some())
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
    if uses_agent(&args) {
        return named::run_with_agent(args);
    }
    if !args.publish.is_empty() || args.tty {
        anyhow::bail!(
            "--publish and --tty need the guest agent (the default guest, a command, no --serial)"
        );
    }
    let start = Instant::now();
    let config = config_from(&args)?;
    let seccomp = config.seccomp;
    let mut vm = VirtualMachine::new(config)?;
    tracing::info!("VM set up in {:.3} s", start.elapsed().as_secs_f64());
    signals::set_target(vm.stopper());
    if seccomp {
        install_main_filter()?;
    }
    let status = vm.run()?;
    if let Some(sig) = signals::received() {
        tracing::info!("guest ended after a signal: {status:?}");
        return Ok(signals::exit_code(sig));
    }
    let mut emulated: Vec<_> = vm.emulated_instructions().into_iter().collect();
    emulated.sort();
    if !emulated.is_empty() {
        let list: Vec<String> = emulated.iter().map(|(k, n)| format!("{k} {n}")).collect();
        tracing::info!("instructions completed by the VMM: {}", list.join(", "));
    }
    if args.verbose {
        for m in vm.markers() {
            eprintln!(
                "locald-vmm: guest marker {} at {:.3} s",
                m.value,
                m.at.as_secs_f64()
            );
        }
        eprintln!(
            "locald-vmm: guest ended: {status:?} after {:.3} s",
            start.elapsed().as_secs_f64()
        );
    }
    use locald_vmm::ExitStatus;
    match status {
        ExitStatus::TimedOut => eprintln!("locald-vmm: error: the VM timed out"),
        ExitStatus::TripleFault => eprintln!("locald-vmm: error: the guest triple faulted"),
        ExitStatus::Panic => eprintln!("locald-vmm: error: the guest kernel panicked"),
        _ => {}
    }
    Ok(status.code().clamp(0, 255) as u8)
}

/// Puts the main thread under the `main` seccomp filter; called once the
/// VM is built (and, in agent mode, its thread started), before anything
/// guest-controlled is read here.
pub(crate) fn install_main_filter() -> anyhow::Result<()> {
    locald_vmm::seccomp::install(locald_vmm::seccomp::ThreadKind::Main, "main")?;
    Ok(())
}

/// Ends the process with `r`'s code, or prints its error (one line) and
/// ends with 125.
fn exit(r: anyhow::Result<u8>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            print_error(&e);
            ExitCode::from(VMM_ERROR)
        }
    }
}

/// Prints `e` as one line: its causes joined by `: ` (a cause that repeats
/// the previous one is dropped), and a hint when the process ran out of
/// file descriptors.
fn print_error(e: &anyhow::Error) {
    eprintln!("locald-vmm: error: {}", error_line(e));
}

fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|p| p.ends_with(&text)) {
            continue;
        }
        parts.push(text);
    }
    let mut line = parts.join(": ");
    let out_of_fds = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|n| n == libc::EMFILE || n == libc::ENFILE)
    }) || line.contains("(os error 24)")
        || line.contains("(os error 23)");
    if out_of_fds {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the rlimit we pass.
        let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur.to_string()
        } else {
            "unknown".into()
        };
        line.push_str(&format!(
            " (out of file descriptors: the limit is {limit}; raise it with `ulimit -n`)"
        ));
    }
    line
}

/// Logging to stderr: `LOCALD_VMM_LOG` filter, else info with -v, else warn.
pub(crate) fn init_logging(verbose: bool) {
    let level = if verbose { "info" } else { "warn" };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCALD_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .without_time()
        .with_ansi(false)
        .try_init();
}

fn prepare(args: &PrepareArgs) -> anyhow::Result<()> {
    let arch = args.arch.unwrap_or_else(GuestArch::host);
    // The initramfs first: a missing aarch64 init is reported at once, not
    // after a kernel build of several minutes.
    let initramfs = locald_vmm::assets::default_initramfs_for(arch)?;
    let kernel = locald_vmm::assets::default_kernel_for(arch)?;
    println!("kernel:    {}", kernel.vmlinux.display());
    println!("initramfs: {}", initramfs.display());
    if arch == GuestArch::X86_64 {
        println!(
            "cmdline (software KVM): {}",
            locald_vmm::guest_cmdline(true, Some(""))
        );
    }
    if args.snapshot {
        println!("snapshot:  {}", named::prepare_snapshot(arch)?.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("locald-vmm: {}", line.trim_start_matches("error: ").trim());
            return ExitCode::from(VMM_ERROR);
        }
    };
    let args = match cli.command {
        Command::Run(args) => *args,
        Command::Start(a) => return exit(named::start(*a)),
        Command::Serve(a) => {
            if let Err(e) = signals::setup(!a.run.no_seccomp) {
                return exit(Err(e.into()));
            }
            return exit(named::serve(*a));
        }
        Command::Exec(a) => return exit(named::exec(a)),
        Command::Stop(a) => return exit(named::stop(a).map(|()| 0)),
        Command::Ps => return exit(named::ps().map(|()| 0)),
        Command::Snapshot(a) => return exit(named::snapshot(a).map(|()| 0)),
        Command::Pull(a) => return exit(images::pull(a)),
        Command::Images => return exit(images::images()),
        Command::Image(c) => return exit(images::image(c)),
        Command::Mkrootfs(a) => {
            return match mkrootfs(&a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    print_error(&e);
                    ExitCode::from(VMM_ERROR)
                }
            }
        }
        Command::Prepare(a) => {
            return match prepare(&a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    print_error(&e);
                    ExitCode::from(VMM_ERROR)
                }
            }
        }
    };
    init_logging(args.verbose);
    if let Err(e) = signals::setup(!args.no_seccomp) {
        return exit(Err(e.into()));
    }
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            print_error(&e);
            ExitCode::from(VMM_ERROR)
        }
    }
}
