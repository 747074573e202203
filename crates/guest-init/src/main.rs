//! `locald-init`: PID 1 of the default locald-vmm guest.
//!
//! Single-threaded. Boot sequence: report "userspace reached" on the exit
//! port, mount the pseudo filesystems, set the hostname, bring up `lo`, read
//! the command spec from `/.locald/`, configure `eth0` (`net`), switch to a
//! root disk if the spec names one (`rootfs`; `+overlay` for OCI images),
//! apply the image's user and hostname (`image`), mount the virtio-fs shares
//! (`shares`), set up Rosetta if asked (`rosetta`), spawn the command (one `posix_spawn`, no shell) with the
//! console as stdio, reap children until it exits, make the disks' data
//! durable (`shutdown`), then report its exit code through port `0xf4`,
//! which ends the VM. Without the port (not under locald-vmm) it falls back
//! to `reboot(2)`. In agent mode (`/.locald/agent`) it starts the vsock
//! guest agent instead of the command and runs until a power signal
//! (`agent`, `session`).
//!
//! Never panics on purpose; every failure prints `locald-init: <what>: <err>`
//! and reports exit code 125. A panic hook does the same as a last resort.
//!
//! `#![no_main]`: the C `main` below skips Rust's runtime setup (stdio
//! polling, main-thread stack guard via `/proc/self/maps`, sigaltstack,
//! `SIGPIPE` ignore) — about fifteen syscalls that each cost emulated kernel
//! time and that PID 1 does not need.

#![cfg_attr(not(test), no_main)]

mod agent;
mod console;
mod forward;
mod image;
mod mounts;
mod net;
mod port;
mod refresh;
mod rootfs;
mod rosetta;
mod session;
mod shares;
mod shutdown;
mod spawn;
mod spec;
mod sys;
/// The one skip function of the project's tests (see docs/testing.md).
#[cfg(test)]
#[path = "../../locald-vmm/src/test_support.rs"]
mod test_support;
mod user;
mod vector;

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use port::{ExitPort, Marker};
use spawn::{Event, Resolved, Stdio};

/// Exit code for init's own failures.
const CODE_INIT_FAILURE: u8 = 125;
/// Interactive fallback shell.
const SHELL: &str = "/bin/sh";
/// Serial console used as controlling terminal of the interactive shell
/// when the kernel does not say which one it uses.
const CONSOLE_TTY: &std::ffi::CStr = c"/dev/ttyS0";
/// Where the kernel lists its active consoles (the primary one last).
const ACTIVE_CONSOLES: &str = "/sys/class/tty/console/active";

/// The console device the kernel writes to, from the contents of
/// [`ACTIVE_CONSOLES`] (`ttyS0` on the KVM backend, `hvc0` under
/// Virtualization.framework, `ttyAMA0` under QEMU's arm64 `virt`): the
/// last name, if it is a plain device name.
fn active_console(list: &str) -> Option<CString> {
    let name = list.split_ascii_whitespace().last()?;
    if name.len() > 32 || !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    CString::new(format!("/dev/{name}")).ok()
}

/// How init ends the VM.
enum Ending {
    /// Report this exit code (power off).
    Exit(u8),
    /// Reboot (`reboot` from inside the guest).
    Reboot,
}

/// C entry point (called by glibc's startup code).
#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    init_main()
}

/// Body of PID 1; returns only when not running as PID 1.
#[cfg_attr(test, allow(dead_code))]
fn init_main() -> libc::c_int {
    // Checked before touching any I/O port, so running the binary by mistake
    // on a host (or in a test) is harmless.
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        console::error("refusing to run", "not PID 1");
        return CODE_INIT_FAILURE.into();
    }
    vector::reexec_init_if_needed();
    let port = ExitPort::open();
    port.marker(Marker::UserspaceReached);
    std::panic::set_hook(Box::new(move |info| {
        console::error("panic", info);
        // SAFETY: getpid has no preconditions.
        if unsafe { libc::getpid() } != 1 {
            // A forked agent process (listener, connection handler): only
            // it dies, the VM goes on.
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(CODE_INIT_FAILURE.into()) };
        }
        power_off(port, CODE_INIT_FAILURE);
    }));
    match run(port) {
        Ending::Exit(code) => power_off(port, code),
        Ending::Reboot => reboot(),
    }
}

/// Everything between boot and the command's exit.
fn run(port: ExitPort) -> Ending {
    mounts::mount_all();
    mounts::set_hostname();
    mounts::loopback_up();
    if let Err(e) = spawn::block_signals() {
        console::error("sigprocmask", e);
        return Ending::Exit(CODE_INIT_FAILURE);
    }
    let mut spec = match spec::read(Path::new(spec::SPEC_DIR)) {
        Ok(s) => s,
        Err((what, e)) => {
            console::error(what, e);
            return Ending::Exit(CODE_INIT_FAILURE);
        }
    };
    // Vector registers the kernel would not preserve: keep glibc off them.
    if vector::unmanaged_here() {
        vector::add_tunables(&mut spec.env);
    }
    // Read before the root switch (the file is in the initramfs).
    let shares = match shares::read(Path::new(spec::SPEC_DIR)) {
        Ok(s) => s,
        Err(e) => {
            console::error("/.locald/shares", e);
            return Ending::Exit(CODE_INIT_FAILURE);
        }
    };
    let rosetta = rosetta::read(Path::new(spec::SPEC_DIR));
    let image = match image::read(Path::new(spec::SPEC_DIR)) {
        Ok(i) => i,
        Err((what, e)) => {
            console::error(what, e);
            return Ending::Exit(CODE_INIT_FAILURE);
        }
    };
    // eth0 from /.locald/net, while busybox is still reachable.
    let resolv = net::configure(Path::new(spec::SPEC_DIR));
    if let Some(root) = &spec.root {
        if let Err((what, e)) = rootfs::switch_root(root) {
            console::error(what, e);
            return Ending::Exit(CODE_INIT_FAILURE);
        }
        // The DNS servers went to the initramfs' /etc: tell the new root
        // (an image root only when its spec asks).
        if let Some(text) = resolv
            .as_ref()
            .filter(|_| image.as_ref().is_none_or(|i| i.spec.resolv))
        {
            net::install_resolv_conf(text);
        }
    }
    // The image's hostname and user, from its own /etc.
    let creds = match &image {
        Some(i) => match image::apply(i, Path::new("/"), &mut spec.env) {
            Ok(c) => Some(c),
            Err((what, e)) => {
                console::error(what, e);
                return Ending::Exit(CODE_INIT_FAILURE);
            }
        },
        None => None,
    };
    for share in &shares {
        if let Err(e) = shares::mount(share) {
            console::error(
                format_args!(
                    "cannot mount share {} at {}",
                    String::from_utf8_lossy(&share.tag),
                    String::from_utf8_lossy(&share.path)
                ),
                e,
            );
            return Ending::Exit(CODE_INIT_FAILURE);
        }
    }
    // x86-64 binaries through Rosetta (best effort), after the mounts.
    if let Some(r) = &rosetta {
        rosetta::setup(r);
    }
    if let Some(dir) = &spec.workdir {
        if let Err(e) = enter_workdir(dir) {
            console::error(
                format_args!("workdir '{}'", String::from_utf8_lossy(dir)),
                e,
            );
            return Ending::Exit(CODE_INIT_FAILURE);
        }
    }
    if spec.agent {
        return agent::run(&spec, creds.as_ref().map(|c| (c.uid, c.gid)));
    }

    let interactive = spec.argv.is_empty();
    let tty = std::fs::read_to_string(ACTIVE_CONSOLES)
        .ok()
        .and_then(|l| active_console(&l))
        .unwrap_or_else(|| CONSOLE_TTY.to_owned());
    let (argv, stdio) = if interactive {
        let stdio = if Path::new(OsStr::from_bytes(tty.to_bytes())).exists() {
            Stdio::ControllingTty(&tty)
        } else {
            Stdio::Inherit
        };
        (vec![CString::from(c"sh")], stdio)
    } else {
        (spec.argv.clone(), Stdio::Inherit)
    };
    let name = if interactive {
        SHELL.as_bytes()
    } else {
        argv[0].to_bytes()
    };
    let display = String::from_utf8_lossy(name);
    let path_var = spec.env_var(b"PATH").unwrap_or_default();
    let path = match spawn::resolve_or_applet(name, path_var, spawn::probe_fs) {
        Resolved::Path(p) => p,
        Resolved::NotFound => return spawn_failed(port, &display, libc::ENOENT),
        Resolved::NotExecutable => return spawn_failed(port, &display, libc::EACCES),
    };

    port.marker(Marker::CommandStarted);
    let spawned = match &creds {
        Some(c) => spawn::spawn_as(&path, &argv, &spec.envp(), stdio, c),
        None => spawn::spawn(&path, &argv, &spec.envp(), stdio),
    };
    let pid = match spawned {
        Ok(pid) => pid,
        Err(e) => return spawn_failed(port, &display, e.raw_os_error().unwrap_or(libc::EINVAL)),
    };
    match spawn::wait_for(pid) {
        Event::Exited(code) => {
            port.marker(Marker::CommandFinished);
            Ending::Exit(code)
        }
        Event::PowerOff => Ending::Exit(0),
        Event::Reboot => Ending::Reboot,
    }
}

/// Prints the "cannot run" line and maps `errno` to 127/126.
fn spawn_failed(port: ExitPort, name: &str, errno: i32) -> Ending {
    console::error(
        format_args!("cannot run '{name}'"),
        std::io::Error::from_raw_os_error(errno),
    );
    port.marker(Marker::CommandFinished);
    Ending::Exit(spawn::code_from_spawn_errno(errno))
}

/// `chdir` into the workdir, creating it first if missing (like docker -w).
fn enter_workdir(dir: &[u8]) -> std::io::Result<()> {
    let dir = Path::new(OsStr::from_bytes(dir));
    match std::env::set_current_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            std::env::set_current_dir(dir)
        }
        other => other,
    }
}

/// Flushes and unmounts the disks, then ends the VM with `code`; never
/// returns.
fn power_off(port: ExitPort, code: u8) -> ! {
    shutdown::shutdown();
    port.exit(code);
    // Still running: no locald-vmm exit device. Power off the classic way.
    // SAFETY: reboot(2) with a valid command; returns only on failure.
    let rc = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    console::error(
        "reboot(RB_POWER_OFF)",
        if rc == 0 {
            std::io::Error::other("returned")
        } else {
            std::io::Error::last_os_error()
        },
    );
    hang()
}

/// Reboots (the VMM sees the reset); never returns.
fn reboot() -> ! {
    shutdown::shutdown();
    // SAFETY: reboot(2) with a valid command; returns only on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    console::error("reboot(RB_AUTOBOOT)", std::io::Error::last_os_error());
    hang()
}

/// PID 1 must never exit (the kernel would panic): sleep forever.
fn hang() -> ! {
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_console_is_the_last_active_one() {
        assert_eq!(active_console("ttyS0\n").unwrap(), c"/dev/ttyS0".to_owned());
        assert_eq!(
            active_console("tty0 hvc0\n").unwrap(),
            c"/dev/hvc0".to_owned()
        );
        assert_eq!(
            active_console("ttyAMA0").unwrap(),
            c"/dev/ttyAMA0".to_owned()
        );
        for bad in ["", "\n", "../sda", "tty/0", "x\u{e9}"] {
            assert_eq!(active_console(bad), None, "{bad:?}");
        }
    }
}
