//! TAP backend: frames go through a Linux TAP device opened with
//! `IFF_VNET_HDR` (12-byte `virtio_net_hdr_v1` in front of every frame,
//! so checksum and TSO offloads pass through) and `TUNSETOFFLOAD` set to
//! what the guest accepts. The fd is non-blocking; a full TAP queue drops,
//! as a NIC would. Opened on the caller's thread, used on the device's
//! worker thread.
//!
//! `Tap::open(Some(name))` attaches to an existing TAP (it must exist: we
//! check first, because TUNSETIFF would otherwise create it); `None`
//! creates a fresh `ldtap%d` device (CAP_NET_ADMIN), brought up, removed
//! when the VM ends. The host side (addresses, bridge, NAT) is the user's.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::backend::{NetBackend, Offloads};
use super::header::{self, features as f};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// Why a TAP device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "TAP device '{0}' does not exist: create it (e.g. `ip tuntap add {0} mode tap user $USER`) \
         or use `--net tap` to have one created (needs CAP_NET_ADMIN)"
    )]
    Missing(String),
    #[error(
        "no permission to use TAP device '{0}': it must belong to your user \
         (`ip tuntap add {0} mode tap user $USER`) or the VMM needs CAP_NET_ADMIN"
    )]
    Permission(String),
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded and may you open it?)")]
    OpenTun(io::Error),
    #[error("cannot create a TAP device: {0} (creating one needs CAP_NET_ADMIN; use --net user without root)")]
    Create(io::Error),
    #[error("TAP device '{name}': {what} failed: {err}")]
    Setup {
        name: String,
        what: &'static str,
        err: io::Error,
    },
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn ifreq_name(name: &str) -> [libc::c_char; libc::IFNAMSIZ] {
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *o = b as libc::c_char;
    }
    out
}

impl Tap {
    /// Opens TAP `name` (must exist) or creates a new one.
    pub fn open(name: Option<&str>) -> Result<Self, TapError> {
        if let Some(n) = name {
            let c = CString::new(n).map_err(|_| TapError::Missing(n.to_string()))?;
            // SAFETY: `c` is a valid NUL-terminated string.
            if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
                return Err(TapError::Missing(n.to_string()));
            }
        }
        // SAFETY: a constant NUL-terminated path; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly opened descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifreq_name(name.unwrap_or("ldtap%d"));
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and updates an ifreq, which `ifr` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut ifr) } < 0 {
            let err = io::Error::last_os_error();
            return Err(match name {
                Some(n) if err.raw_os_error() == Some(libc::EPERM) => {
                    TapError::Permission(n.to_string())
                }
                Some(n) => TapError::Setup {
                    name: n.to_string(),
                    what: "attaching (TUNSETIFF; is it a TAP, not a TUN, device?)",
                    err,
                },
                None => TapError::Create(err),
            });
        }
        // SAFETY: the kernel NUL-terminated the name it wrote back.
        let actual = unsafe { std::ffi::CStr::from_ptr(ifr.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let setup = |what: &'static str, err: io::Error| TapError::Setup {
            name: actual.clone(),
            what,
            err,
        };
        let hdr = header::HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr) } < 0 {
            return Err(setup("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_uint) } < 0 {
            return Err(setup("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        if name.is_none() {
            set_up(&actual).map_err(|e| setup("bringing the link up", e))?;
        }
        Ok(Tap { fd, name: actual })
    }

    /// The interface name (the kernel's choice for a created device).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Sets IFF_UP on interface `name`.
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name = ifreq_name(name);
    // SAFETY: SIOCGIFFLAGS fills the flags of a valid ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS initialised ifru_flags.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl NetBackend for Tap {
    fn describe(&self) -> String {
        format!("TAP {}", self.name)
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn offloads(&self) -> Offloads {
        Offloads {
            host: true,
            guest: true,
        }
    }

    fn set_guest_features(&mut self, features: u64) -> io::Result<()> {
        let mut flags = 0;
        if features & f::GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if features & f::GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if features & f::GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
            if features & f::GUEST_ECN != 0 && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                flags |= TUN_F_TSO_ECN;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD as _, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: writes `packet.len()` bytes from a valid slice.
            let n =
                unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: reads at most `buf.len()` bytes into a valid slice.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(Some(n as usize));
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                // The interface is down: nothing to read, not gone.
                _ if e.raw_os_error() == Some(libc::EIO) => return Ok(None),
                _ => return Err(e),
            }
        }
    }
}
