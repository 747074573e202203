//! The Objective-C side of the VZ backend: turns a [`VzPlan`] into a
//! `VZVirtualMachineConfiguration`, runs the `VZVirtualMachine` on its own
//! serial dispatch queue, and wires its delegate, console and vsock device
//! to the plain-Rust parts (`lifecycle`, `console`, `bridge`). Makes no
//! decision of its own: every mapping is in `plan.rs`, every stop rule in
//! `lifecycle.rs`.
//!
//! Threads: the caller's (builds the configuration, waits in [`VzVm::run`]);
//! the VM's dispatch queue (every call on the `VZVirtualMachine` and its
//! devices, every delegate callback and completion handler, as VZ
//! requires); the console pump; the bridge's threads.
//!
//! Type-checked for aarch64- and x86_64-apple-darwin; never run (no Mac
//! was available). See docs/macos.md for where each call was checked.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchQueueAttr, DispatchRetained};
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2::{define_class, msg_send, AnyThread, DefinedClass};
use objc2_foundation::{
    NSArray, NSDictionary, NSError, NSFileHandle, NSObject, NSObjectProtocol, NSString, NSURL,
};
use objc2_virtualization::{
    VZDiskImageCachingMode, VZDiskImageStorageDeviceAttachment, VZDiskImageSynchronizationMode,
    VZFileHandleSerialPortAttachment, VZGenericPlatformConfiguration, VZLinuxBootLoader,
    VZLinuxRosettaAvailability, VZLinuxRosettaDirectoryShare, VZMACAddress,
    VZMultipleDirectoryShare, VZNATNetworkDeviceAttachment, VZSharedDirectory,
    VZSingleDirectoryShare, VZVirtioBlockDeviceConfiguration,
    VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration,
    VZVirtioFileSystemDeviceConfiguration, VZVirtioNetworkDeviceConfiguration,
    VZVirtioSocketConnection, VZVirtioSocketDevice, VZVirtioSocketDeviceConfiguration,
    VZVirtioSocketListener, VZVirtioSocketListenerDelegate, VZVirtualMachine,
    VZVirtualMachineConfiguration, VZVirtualMachineDelegate,
};

use super::bridge::{BridgeHandle, BridgeLimits, DialedConn, GuestDialer, VsockBridge};
use super::console::ConsoleEvent;
use super::error::VzError;
use super::lifecycle::{self, StopPolicy, Stopped, VmEvent, VmHandle};
use super::plan::{
    ConsolePlan, DiskCaching, DiskPlan, DiskSync, PlanError, ShareKind, SharePlan, SharedDirPlan,
    VzLimits, VzPlan,
};
use crate::devices::control::{ExitStatus, Outcome, VmControl};

/// How long a host-initiated vsock connection may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `startWithCompletionHandler:` may take to call back.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the console pump may take to drain once the VM is gone.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

/// VZ's limits on this Mac (`VZVirtualMachineConfiguration` class
/// properties). Plan with these.
pub fn host_limits() -> VzLimits {
    // SAFETY: class properties without arguments; callable from any
    // thread (Apple's samples read them while building a configuration).
    unsafe {
        VzLimits {
            min_cpus: VZVirtualMachineConfiguration::minimumAllowedCPUCount() as u64,
            max_cpus: VZVirtualMachineConfiguration::maximumAllowedCPUCount() as u64,
            min_memory: VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            max_memory: VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
        }
    }
}

/// A VZ object that is touched only on the VM's serial queue.
struct OnQueue<T>(T);

// SAFETY: VZ objects are not thread-safe, but VZ allows using them from
// any thread as long as every use is serialised on the VM's queue. Values
// of this type are only dereferenced inside closures submitted to that
// queue (`exec_sync`/`exec_async`), or, for configuration objects, before
// the VM exists; moving the reference between threads is then sound
// (retain/release are atomic).
unsafe impl<T> Send for OnQueue<T> {}
// SAFETY: as above: shared references are only used on the VM's queue.
unsafe impl<T> Sync for OnQueue<T> {}

/// What the delegates share with the Rust side.
struct Shared {
    control: Arc<VmControl>,
    stopped: Arc<Stopped>,
    console: Arc<ConsoleSeen>,
}

/// What the console pump saw: a kernel panic, the init's last exit status
/// (-1: none).
struct ConsoleSeen {
    panicked: AtomicBool,
    exit: AtomicI32,
}

impl Shared {
    fn event(&self, e: VmEvent) {
        let exit = u8::try_from(self.console.exit.load(Ordering::SeqCst)).ok();
        let panicked = self.console.panicked.load(Ordering::SeqCst);
        lifecycle::record(&self.control, &e, panicked, exit);
        self.stopped.set();
    }
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and this class
    // does not implement Drop.
    #[unsafe(super(NSObject))]
    #[name = "LocaldVmmVzVmDelegate"]
    #[ivars = Arc<Shared>]
    struct VmDelegate;

    unsafe impl NSObjectProtocol for VmDelegate {}

    // SAFETY: the two methods below have the protocol's selectors and
    // argument types (checked against objc2-virtualization's protocol).
    unsafe impl VZVirtualMachineDelegate for VmDelegate {
        #[unsafe(method(guestDidStopVirtualMachine:))]
        fn guest_did_stop(&self, _vm: &VZVirtualMachine) {
            self.ivars().event(VmEvent::GuestStopped);
        }

        #[unsafe(method(virtualMachine:didStopWithError:))]
        fn did_stop_with_error(&self, _vm: &VZVirtualMachine, error: &NSError) {
            let msg = error.localizedDescription().to_string();
            self.ivars().event(VmEvent::StoppedWithError(msg));
        }
    }
);

impl VmDelegate {
    fn new(shared: Arc<Shared>) -> Retained<Self> {
        let this = Self::alloc().set_ivars(shared);
        // SAFETY: NSObject's designated initialiser, on a fresh allocation.
        unsafe { msg_send![super(this), init] }
    }
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and this class
    // does not implement Drop.
    #[unsafe(super(NSObject))]
    #[name = "LocaldVmmVzListenerDelegate"]
    #[ivars = BridgeHandle]
    struct ListenerDelegate;

    unsafe impl NSObjectProtocol for ListenerDelegate {}

    // SAFETY: the method below has the protocol's selector and argument
    // types (checked against objc2-virtualization's protocol).
    unsafe impl VZVirtioSocketListenerDelegate for ListenerDelegate {
        #[unsafe(method(listener:shouldAcceptNewConnection:fromSocketDevice:))]
        fn should_accept(
            &self,
            _listener: &VZVirtioSocketListener,
            connection: &VZVirtioSocketConnection,
            _device: &VZVirtioSocketDevice,
        ) -> bool {
            // SAFETY: plain property reads on the connection VZ hands us,
            // on the VM's queue where this delegate is called.
            let (fd, port) = unsafe { (connection.fileDescriptor(), connection.destinationPort()) };
            match dup_fd(fd) {
                Some(fd) => {
                    self.ivars().guest_connected(port, fd);
                    true
                }
                None => false,
            }
        }
    }
);

impl ListenerDelegate {
    fn new(bridge: BridgeHandle) -> Retained<Self> {
        let this = Self::alloc().set_ivars(bridge);
        // SAFETY: NSObject's designated initialiser, on a fresh allocation.
        unsafe { msg_send![super(this), init] }
    }
}

/// Duplicates a connection's descriptor (close-on-exec), so that its
/// lifetime is ours and not the `VZVirtioSocketConnection`'s.
fn dup_fd(fd: i32) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: VZ documents `fileDescriptor` as the connection's open
    // descriptor (-1 once closed, handled above); the connection object is
    // alive for this call, so the descriptor is valid while borrowed.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    b.try_clone_to_owned().ok()
}

fn ns_error(e: &NSError) -> String {
    e.localizedDescription().to_string()
}

/// The text of a completion handler's error argument (nil = success).
fn completion_result(err: *mut NSError) -> Result<(), String> {
    // SAFETY: VZ passes nil or a valid NSError that lives for the call.
    match unsafe { err.as_ref() } {
        None => Ok(()),
        Some(e) => Err(ns_error(e)),
    }
}

fn file_url(what: &'static str, path: &Path) -> Result<Retained<NSURL>, VzError> {
    let bad = || VzError::Url {
        what,
        path: path.to_path_buf(),
    };
    let abs = std::path::absolute(path).map_err(|_| bad())?;
    NSURL::from_file_path(&abs).ok_or_else(bad)
}

fn dir_url(path: &Path) -> Result<Retained<NSURL>, VzError> {
    let bad = || VzError::Url {
        what: "shared directory",
        path: path.to_path_buf(),
    };
    let abs = std::path::absolute(path).map_err(|_| bad())?;
    NSURL::from_directory_path(&abs).ok_or_else(bad)
}

fn caching(c: DiskCaching) -> VZDiskImageCachingMode {
    match c {
        DiskCaching::Automatic => VZDiskImageCachingMode::Automatic,
        DiskCaching::Cached => VZDiskImageCachingMode::Cached,
        DiskCaching::Uncached => VZDiskImageCachingMode::Uncached,
    }
}

fn sync_mode(s: DiskSync) -> VZDiskImageSynchronizationMode {
    match s {
        DiskSync::Full => VZDiskImageSynchronizationMode::Full,
        DiskSync::Fsync => VZDiskImageSynchronizationMode::Fsync,
        DiskSync::None => VZDiskImageSynchronizationMode::None,
    }
}

fn block_device(d: &DiskPlan) -> Result<Retained<VZVirtioBlockDeviceConfiguration>, VzError> {
    let url = file_url("disk", &d.path)?;
    // SAFETY: initialiser on a fresh allocation with a file URL and enum
    // values VZ defines; errors come back as NSError.
    let attachment = unsafe {
        VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_cachingMode_synchronizationMode_error(
            VZDiskImageStorageDeviceAttachment::alloc(),
            &url,
            d.read_only,
            caching(d.caching),
            sync_mode(d.sync),
        )
    }
    .map_err(|e| VzError::Disk {
        path: d.path.clone(),
        msg: ns_error(&e),
    })?;
    // SAFETY: initialiser on a fresh allocation with a valid attachment.
    let dev = unsafe {
        VZVirtioBlockDeviceConfiguration::initWithAttachment(
            VZVirtioBlockDeviceConfiguration::alloc(),
            &attachment,
        )
    };
    if let Some(id) = &d.block_id {
        let id = NSString::from_str(id);
        // SAFETY: class method validating a string, then a property set on
        // a configuration object we own (not yet shared with any queue).
        unsafe {
            match VZVirtioBlockDeviceConfiguration::validateBlockDeviceIdentifier_error(&id) {
                Ok(()) => dev.setBlockDeviceIdentifier(&id),
                Err(e) => tracing::warn!(
                    "disk {}: serial not set ({})",
                    d.path.display(),
                    ns_error(&e)
                ),
            }
        }
    }
    Ok(dev)
}

fn shared_dir(d: &SharedDirPlan) -> Result<Retained<VZSharedDirectory>, VzError> {
    let url = dir_url(&d.host_dir)?;
    // SAFETY: initialiser on a fresh allocation with a directory URL.
    Ok(unsafe {
        VZSharedDirectory::initWithURL_readOnly(VZSharedDirectory::alloc(), &url, d.read_only)
    })
}

fn fs_device(s: &SharePlan) -> Result<Retained<VZVirtioFileSystemDeviceConfiguration>, VzError> {
    let tag = NSString::from_str(&s.tag);
    // SAFETY: class method validating a string; then initialisers on fresh
    // allocations and property sets on objects we own.
    unsafe {
        VZVirtioFileSystemDeviceConfiguration::validateTag_error(&tag)
            .map_err(|e| VzError::Invalid(format!("virtio-fs tag {}: {}", s.tag, ns_error(&e))))?;
        let dev = VZVirtioFileSystemDeviceConfiguration::initWithTag(
            VZVirtioFileSystemDeviceConfiguration::alloc(),
            &tag,
        );
        match &s.kind {
            ShareKind::Single(d) => {
                let dir = shared_dir(d)?;
                let share = VZSingleDirectoryShare::initWithDirectory(
                    VZSingleDirectoryShare::alloc(),
                    &dir,
                );
                dev.setShare(Some(&share));
            }
            ShareKind::Multiple(dirs) => {
                let mut names = Vec::with_capacity(dirs.len());
                let mut objs = Vec::with_capacity(dirs.len());
                for (name, d) in dirs {
                    let n = NSString::from_str(name);
                    // An invalid name raises an Objective-C exception in
                    // initWithDirectories:; check first.
                    VZMultipleDirectoryShare::validateName_error(&n).map_err(|e| {
                        VzError::Invalid(format!("share name {name}: {}", ns_error(&e)))
                    })?;
                    names.push(n);
                    objs.push(shared_dir(d)?);
                }
                let keys: Vec<&NSString> = names.iter().map(|n| &**n).collect();
                let vals: Vec<&VZSharedDirectory> = objs.iter().map(|o| &**o).collect();
                let dict = NSDictionary::from_slices(&keys, &vals);
                let share = VZMultipleDirectoryShare::initWithDirectories(
                    VZMultipleDirectoryShare::alloc(),
                    &dict,
                );
                dev.setShare(Some(&share));
            }
        }
        Ok(dev)
    }
}

fn rosetta_device(tag: &str) -> Result<Retained<VZVirtioFileSystemDeviceConfiguration>, VzError> {
    if !objc2::available!(macos = 13.0) {
        return Err(VzError::Rosetta("unavailable before macOS 13"));
    }
    // SAFETY: class property (macOS 13+, checked above), then initialisers
    // on fresh allocations and a property set on an object we own.
    unsafe {
        match VZLinuxRosettaDirectoryShare::availability() {
            VZLinuxRosettaAvailability::Installed => {}
            VZLinuxRosettaAvailability::NotInstalled => {
                return Err(VzError::Rosetta("not installed"))
            }
            _ => return Err(VzError::Rosetta("not supported")),
        }
        let share =
            VZLinuxRosettaDirectoryShare::initWithError(VZLinuxRosettaDirectoryShare::alloc())
                .map_err(|e| VzError::Invalid(format!("Rosetta share: {}", ns_error(&e))))?;
        let dev = VZVirtioFileSystemDeviceConfiguration::initWithTag(
            VZVirtioFileSystemDeviceConfiguration::alloc(),
            &NSString::from_str(tag),
        );
        dev.setShare(Some(&share));
        Ok(dev)
    }
}

/// The serial port, and the console pump reading the guest's output.
struct Console {
    port: Retained<VZVirtioConsoleDeviceSerialPortConfiguration>,
    pump: JoinHandle<()>,
}

fn file_handle(fd: OwnedFd) -> Retained<NSFileHandle> {
    // The handle takes ownership of a descriptor we own (`into_raw_fd`)
    // and closes it when deallocated.
    NSFileHandle::initWithFileDescriptor_closeOnDealloc(
        NSFileHandle::alloc(),
        fd.into_raw_fd(),
        true,
    )
}

fn console(
    plan: &ConsolePlan,
    control: Arc<VmControl>,
    seen: Arc<ConsoleSeen>,
) -> Result<Console, VzError> {
    let (out_r, out_w) = std::io::pipe().map_err(VzError::Console)?;
    let input: Option<OwnedFd> = match plan {
        ConsolePlan::Stdio => Some(
            std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(VzError::Console)?,
        ),
        ConsolePlan::Buffer { input, .. } => {
            let (r, mut w) = std::io::pipe().map_err(VzError::Console)?;
            let bytes = input.clone();
            // A writer thread: the input may exceed the pipe's buffer.
            std::thread::Builder::new()
                .name("vz-console-in".into())
                .spawn(move || {
                    let _ = w.write_all(&bytes);
                })
                .map_err(VzError::Console)?;
            Some(r.into())
        }
        ConsolePlan::Stderr | ConsolePlan::Null => None,
    };
    let sink: Option<Box<dyn Write + Send>> = match plan {
        ConsolePlan::Stdio => Some(Box::new(std::io::stdout())),
        ConsolePlan::Buffer { output, .. } => Some(Box::new(output.clone())),
        ConsolePlan::Stderr => Some(Box::new(std::io::stderr())),
        ConsolePlan::Null => None,
    };
    let pump = std::thread::Builder::new()
        .name("vz-console-out".into())
        .spawn(move || {
            super::console::pump(out_r, sink, |event| match event {
                ConsoleEvent::Panic => {
                    seen.panicked.store(true, Ordering::SeqCst);
                    control.note_panic();
                }
                ConsoleEvent::Exit(code) => seen.exit.store(i32::from(code), Ordering::SeqCst),
            })
        })
        .map_err(VzError::Console)?;
    let read = input.map(file_handle);
    let write = file_handle(out_w.into());
    // SAFETY: initialisers on fresh allocations with valid file handles (or
    // nil for no input), and a property set on an object we own.
    let port = unsafe {
        let attachment =
            VZFileHandleSerialPortAttachment::initWithFileHandleForReading_fileHandleForWriting(
                VZFileHandleSerialPortAttachment::alloc(),
                read.as_deref(),
                Some(&write),
            );
        let port = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        port.setAttachment(Some(&attachment));
        port
    };
    Ok(Console { port, pump })
}

/// Builds and validates the configuration for `plan`.
fn configuration(
    plan: &VzPlan,
    console_port: &VZVirtioConsoleDeviceSerialPortConfiguration,
) -> Result<Retained<VZVirtualMachineConfiguration>, VzError> {
    let kernel = file_url("kernel", &plan.boot.kernel)?;
    let initrd = match &plan.boot.initrd {
        Some(p) => Some(file_url("initrd", p)?),
        None => None,
    };
    let disks = plan
        .disks
        .iter()
        .map(block_device)
        .collect::<Result<Vec<_>, _>>()?;
    let mut shares = plan
        .shares
        .iter()
        .map(fs_device)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(tag) = &plan.rosetta {
        shares.push(rosetta_device(tag)?);
    }
    // SAFETY: initialisers on fresh allocations and property sets on
    // objects we own; no VM or queue exists yet. Arrays hold the device
    // configurations as their superclass, which VZ expects.
    unsafe {
        let boot = VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &kernel);
        boot.setInitialRamdiskURL(initrd.as_deref());
        boot.setCommandLine(&NSString::from_str(&plan.boot.cmdline));

        let config = VZVirtualMachineConfiguration::new();
        config.setBootLoader(Some(&boot));
        config.setPlatform(&VZGenericPlatformConfiguration::new());
        config.setCPUCount(plan.cpus as usize);
        config.setMemorySize(plan.memory_bytes);
        config.setSerialPorts(&NSArray::from_slice(&[&**console_port]));

        let storage: Vec<&_> = disks.iter().map(|d| &***d).collect();
        config.setStorageDevices(&NSArray::from_slice(&storage));
        let fs: Vec<&_> = shares.iter().map(|s| &***s).collect();
        config.setDirectorySharingDevices(&NSArray::from_slice(&fs));

        if let Some(n) = &plan.net {
            let mac = VZMACAddress::initWithString(
                VZMACAddress::alloc(),
                &NSString::from_str(&n.mac_string()),
            )
            .ok_or_else(|| VzError::Mac(n.mac_string()))?;
            let net = VZVirtioNetworkDeviceConfiguration::new();
            net.setAttachment(Some(&VZNATNetworkDeviceAttachment::new()));
            net.setMACAddress(&mac);
            config.setNetworkDevices(&NSArray::from_slice(&[&**net]));
        }
        if plan.entropy {
            let rng = VZVirtioEntropyDeviceConfiguration::new();
            config.setEntropyDevices(&NSArray::from_slice(&[&**rng]));
        }
        if plan.vsock.is_some() {
            let vsock = VZVirtioSocketDeviceConfiguration::new();
            config.setSocketDevices(&NSArray::from_slice(&[&**vsock]));
        }
        config
            .validateWithError()
            .map_err(|e| VzError::Invalid(ns_error(&e)))?;
        Ok(config)
    }
}

/// Host-initiated vsock connections through `connectToPort:`.
struct VzDialer {
    queue: DispatchRetained<DispatchQueue>,
    device: Arc<OnQueue<Retained<VZVirtioSocketDevice>>>,
}

impl GuestDialer for VzDialer {
    fn connect(&self, port: u32) -> std::io::Result<DialedConn> {
        let (tx, rx) = mpsc::sync_channel::<Result<DialedConn, String>>(1);
        let device = self.device.clone();
        self.queue.exec_async(move || {
            let block = RcBlock::new(
                move |conn: *mut VZVirtioSocketConnection, err: *mut NSError| {
                    // SAFETY: VZ passes nil or a live connection for the call.
                    let r = match unsafe { conn.as_ref() } {
                        // SAFETY: property reads on the live connection, on the
                        // VM's queue where completion handlers run.
                        Some(c) => match unsafe { (dup_fd(c.fileDescriptor()), c.sourcePort()) } {
                            (Some(fd), local_port) => Ok(DialedConn { fd, local_port }),
                            (None, _) => Err("the connection has no descriptor".to_string()),
                        },
                        None => Err(completion_result(err)
                            .err()
                            .unwrap_or_else(|| "no connection".into())),
                    };
                    // The VZVirtioSocketConnection closes its own descriptor
                    // when released; ours is a duplicate.
                    let _ = tx.try_send(r);
                },
            );
            // SAFETY: on the VM's queue; VZ copies the block.
            unsafe { device.0.connectToPort_completionHandler(port, &block) };
        });
        match rx.recv_timeout(DIAL_TIMEOUT) {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                e,
            )),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("guest port {port} did not answer within {DIAL_TIMEOUT:?}"),
            )),
        }
    }
}

/// A new VM and its socket device, as made on the queue.
type MadeVm = (
    Retained<VZVirtualMachine>,
    Option<Retained<VZVirtioSocketDevice>>,
);

/// [`VmHandle`] over the real VM: each call on its queue.
struct QueueVm {
    queue: DispatchRetained<DispatchQueue>,
    vm: Arc<OnQueue<Retained<VZVirtualMachine>>>,
    shared: Arc<Shared>,
}

impl VmHandle for QueueVm {
    fn request_stop(&self) -> Result<(), String> {
        let mut out = Err("not run".to_string());
        let vm = &self.vm;
        let slot = &mut out;
        self.queue.exec_sync(move || {
            // SAFETY: on the VM's queue.
            *slot = unsafe {
                if vm.0.canRequestStop() {
                    vm.0.requestStopWithError().map_err(|e| ns_error(&e))
                } else {
                    Err("the VM cannot take a stop request now".into())
                }
            };
        });
        out
    }

    fn force_stop(&self) {
        let vm = self.vm.clone();
        let shared = self.shared.clone();
        self.queue.exec_async(move || {
            let s = shared.clone();
            let block = RcBlock::new(move |err: *mut NSError| {
                s.event(VmEvent::ForceStopped(completion_result(err).err()));
            });
            // SAFETY: on the VM's queue; VZ copies the block.
            unsafe {
                if vm.0.canStop() {
                    vm.0.stopWithCompletionHandler(&block);
                } else {
                    // Already stopped (or stopping by itself).
                    shared.stopped.set();
                }
            }
        });
    }
}

/// One VZ virtual machine, from plan to end. See the module docs of
/// [`crate::vz`] for the call sequence.
pub struct VzVm {
    /// `None` only while being dropped.
    handle: Option<QueueVm>,
    control: Arc<VmControl>,
    policy: StopPolicy,
    console: Option<Console>,
    // Kept alive for the VM's lifetime: VZ holds delegates weakly.
    _delegate: Retained<VmDelegate>,
    _listener: Option<(
        OnQueue<Retained<VZVirtioSocketListener>>,
        Retained<ListenerDelegate>,
    )>,
    bridge: Option<VsockBridge>,
    started: bool,
}

// SAFETY: a VzVm moves to the `vm` thread of `VirtualMachine::spawn` as a
// whole. Every VZ object in it is messaged only on the VM's serial queue
// (the `QueueVm`/`OnQueue` wrappers dispatch there); the delegates are only
// kept alive here, never messaged from Rust, and Objective-C retain/release
// are thread-safe. The console and bridge parts are plain Rust threads and
// sockets.
unsafe impl Send for VzVm {}

impl VzVm {
    /// Builds the configuration for `plan`, validates it and creates the
    /// VM (not started) on a new serial queue; binds the vsock bridge.
    /// `control` is where the VM's end is reported (the lead's
    /// `VmStopper` stops the VM through it).
    pub fn new(plan: &VzPlan, control: Arc<VmControl>) -> Result<VzVm, VzError> {
        if !objc2::available!(macos = 12.3) {
            return Err(VzError::MacOsTooOld);
        }
        // SAFETY: class property, callable from any thread.
        if !unsafe { VZVirtualMachine::isSupported() } {
            return Err(VzError::Unsupported);
        }
        let limits = host_limits();
        if plan.cpus < limits.min_cpus || plan.cpus > limits.max_cpus {
            return Err(PlanError::Cpus {
                cpus: plan.cpus,
                min: limits.min_cpus,
                max: limits.max_cpus,
            }
            .into());
        }
        if plan.memory_bytes < limits.min_memory || plan.memory_bytes > limits.max_memory {
            return Err(PlanError::Memory {
                mib: plan.memory_bytes >> 20,
                min_mib: limits.min_memory.div_ceil(1 << 20),
                max_mib: limits.max_memory >> 20,
            }
            .into());
        }
        let shared = Arc::new(Shared {
            control: control.clone(),
            stopped: Arc::new(Stopped::default()),
            console: Arc::new(ConsoleSeen {
                panicked: AtomicBool::new(false),
                exit: AtomicI32::new(-1),
            }),
        });
        let console = console(&plan.console, control.clone(), shared.console.clone())?;
        let config = OnQueue(configuration(plan, &console.port)?);
        let delegate = VmDelegate::new(shared.clone());
        let queue = DispatchQueue::new("dev.locald.vmm.vz", DispatchQueueAttr::SERIAL);

        let mut made: Option<OnQueue<MadeVm>> = None;
        {
            let (config, delegate, slot, q) = (&config, OnQueue(&*delegate), &mut made, &*queue);
            queue.exec_sync(move || {
                // SAFETY: on the VM's queue, which is serial; the
                // configuration was validated; the delegate outlives the VM
                // (VzVm keeps it).
                unsafe {
                    let vm = VZVirtualMachine::initWithConfiguration_queue(
                        VZVirtualMachine::alloc(),
                        &config.0,
                        q,
                    );
                    vm.setDelegate(Some(ProtocolObject::from_ref(delegate.0)));
                    let sock = vm
                        .socketDevices()
                        .firstObject()
                        .and_then(|d| d.downcast::<VZVirtioSocketDevice>().ok());
                    *slot = Some(OnQueue((vm, sock)));
                }
            });
        }
        let OnQueue((vm, sock)) =
            made.ok_or_else(|| VzError::Invalid("the VM was not created".into()))?;
        let vm = Arc::new(OnQueue(vm));

        let (bridge, listener) = match (&plan.vsock, sock) {
            (Some(v), Some(dev)) => {
                let device = Arc::new(OnQueue(dev));
                let dialer = Arc::new(VzDialer {
                    queue: queue.clone(),
                    device: device.clone(),
                });
                let bridge = VsockBridge::bind(&v.uds_path, dialer, BridgeLimits::default())
                    .map_err(VzError::Bridge)?;
                let ld = ListenerDelegate::new(bridge.handle());
                let listener = {
                    let mut made = None;
                    let (slot, ld, ports) = (&mut made, OnQueue(&*ld), &v.guest_to_host_ports);
                    queue.exec_sync(move || {
                        // SAFETY: on the VM's queue; the delegate outlives
                        // the listener (VzVm keeps both).
                        unsafe {
                            let l = VZVirtioSocketListener::new();
                            l.setDelegate(Some(ProtocolObject::from_ref(ld.0)));
                            for &p in ports {
                                device.0.setSocketListener_forPort(&l, p);
                            }
                            *slot = Some(OnQueue(l));
                        }
                    });
                    made.ok_or_else(|| VzError::Invalid("no vsock listener".into()))?
                };
                (Some(bridge), Some((listener, ld)))
            }
            (Some(_), None) => {
                return Err(VzError::Invalid(
                    "the VM has no virtio socket device".into(),
                ))
            }
            (None, _) => (None, None),
        };
        Ok(VzVm {
            handle: Some(QueueVm { queue, vm, shared }),
            control,
            policy: StopPolicy::default(),
            console: Some(console),
            _delegate: delegate,
            _listener: listener,
            bridge,
            started: false,
        })
    }

    /// Changes the stop policy (grace before a forced stop).
    pub fn set_stop_policy(&mut self, policy: StopPolicy) {
        self.policy = policy;
    }

    /// Starts the VM and blocks until it ends: the guest stops, `timeout`
    /// passes ([`ExitStatus::TimedOut`]), or another thread calls
    /// `control.request_stop`/`fail` (the VM is then asked to stop, and
    /// forced after the grace period). Pass the plan's `timeout`.
    pub fn run(&mut self, timeout: Option<Duration>) -> Result<ExitStatus, VzError> {
        let Some(h) = self.handle.as_ref() else {
            return Err(VzError::Start("the VM is gone".into()));
        };
        if self.started {
            return Err(VzError::Start("the VM was already run".into()));
        }
        self.started = true;
        let (tx, rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let vm = h.vm.clone();
        h.queue.exec_async(move || {
            let block = RcBlock::new(move |err: *mut NSError| {
                let _ = tx.try_send(completion_result(err));
            });
            // SAFETY: on the VM's queue; VZ copies the block.
            unsafe { vm.0.startWithCompletionHandler(&block) };
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(VzError::Start(e)),
            Err(_) => {
                return Err(VzError::Start(format!(
                    "no answer within {START_TIMEOUT:?}"
                )))
            }
        }
        match lifecycle::run_to_end(&self.control, timeout, h, &h.shared.stopped, self.policy) {
            Outcome::Status(s) => Ok(s),
            Outcome::Failed(m) => Err(VzError::Failed(m)),
        }
    }

    /// The hybrid vsock socket, if the VM has one.
    pub fn vsock_path(&self) -> Option<&Path> {
        self.bridge.as_ref().map(|b| b.uds_path())
    }
}

impl Drop for VzVm {
    fn drop(&mut self) {
        let Some(h) = self.handle.take() else {
            return;
        };
        if self.started && !h.shared.stopped.get() {
            self.control.request_stop(ExitStatus::PowerOff);
            lifecycle::stop_vm(&h, &h.shared.stopped, self.policy);
        }
        self.bridge = None;
        // Release the VM on its queue; its serial port's file handles close
        // with it, which ends the console pump.
        let queue = h.queue.clone();
        queue.exec_sync(move || drop(h));
        if let Some(c) = self.console.take() {
            let (tx, rx) = mpsc::channel();
            let _ = std::thread::Builder::new()
                .name("vz-console-join".into())
                .spawn(move || {
                    let _ = c.pump.join();
                    let _ = tx.send(());
                });
            let _ = rx.recv_timeout(CONSOLE_DRAIN);
        }
    }
}
