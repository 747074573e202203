//! Rosetta: runs x86-64 Linux binaries on an aarch64 guest through Apple's
//! Rosetta runtime, which the macOS Virtualization.framework backend shares
//! as a virtio-fs device whose tag is in `/.locald/rosetta` (format:
//! `locald_guest_spec::rosetta`).
//!
//! Runs on init's only thread: [`read`] before the optional root switch
//! (the file lives in the initramfs), [`setup`] after the shares are
//! mounted and before the agent or the command starts. Steps: mount the
//! tag read-only (virtiofs) at [`MOUNT_POINT`], mount `binfmt_misc` at
//! [`BINFMT_MISC`] unless it is there already, then register x86-64 ELF
//! executables with the interpreter [`INTERPRETER`] and flags `OCF` — the
//! registration Lima, UTM and Tart use ([`rosetta_registration`]). `F`
//! makes the kernel open the interpreter at registration time, so it keeps
//! working whatever the command later does to its mount namespace.
//!
//! Best effort: a failure prints one line
//! (`locald-init: rosetta: <step>: <error> (x86-64 binaries will not run)`)
//! and the boot goes on. Needs `CONFIG_BINFMT_MISC` and `CONFIG_VIRTIO_FS`
//! in the guest kernel.

use std::ffi::CStr;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::Path;

use locald_guest_spec::{RosettaSpec, SpecFile};

use crate::console;

/// Where the Rosetta share is mounted.
pub const MOUNT_POINT: &CStr = c"/run/rosetta";
/// The Rosetta runtime inside the share.
pub const INTERPRETER: &str = "/run/rosetta/rosetta";
/// Where `binfmt_misc` is mounted.
pub const BINFMT_MISC: &CStr = c"/proc/sys/fs/binfmt_misc";
/// Name of the `binfmt_misc` entry.
pub const NAME: &str = "rosetta";
/// ELF header of an x86-64 executable: `\x7fELF`, 64-bit, little endian,
/// version 1, then `e_type` 2 (`ET_EXEC`) and `e_machine` 62 (`EM_X86_64`).
pub const X86_64_MAGIC: [u8; 20] = [
    0x7f, b'E', b'L', b'F', 0x02, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x02, 0x00, 0x3e, 0x00,
];
/// Bits of [`X86_64_MAGIC`] that must match: any OS ABI byte with its low
/// bit clear, any ABI version, and `e_type` 2 or 3 (`ET_DYN`: PIE and
/// shared objects).
pub const X86_64_MASK: [u8; 20] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xfe, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xfe, 0xff, 0xff, 0xff,
];
/// `O`: pass the binary as an open fd; `C`: credentials from the binary
/// (setuid works; implies `O`); `F`: open the interpreter now.
pub const FLAGS: &str = "OCF";

/// `bytes` for a `binfmt_misc` magic or mask: ASCII letters and digits as
/// they are, everything else as `\xHH` (so no `:` separator and no NUL,
/// where the kernel's parsing stops, can appear).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 4);
    for &b in bytes {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// A magic-type `binfmt_misc` registration at offset 0:
/// `:NAME:M::MAGIC:MASK:INTERPRETER:FLAGS`.
pub fn registration(
    name: &str,
    magic: &[u8],
    mask: &[u8],
    interpreter: &str,
    flags: &str,
) -> String {
    format!(
        ":{name}:M::{}:{}:{interpreter}:{flags}",
        escape(magic),
        escape(mask)
    )
}

/// The Rosetta registration for x86-64 ELF executables.
pub fn rosetta_registration() -> String {
    registration(NAME, &X86_64_MAGIC, &X86_64_MASK, INTERPRETER, FLAGS)
}

/// Reads `dir/rosetta`: `None` when absent or bad (a bad file is printed:
/// the command still runs, without Rosetta).
pub fn read(dir: &Path) -> Option<RosettaSpec> {
    let what = SpecFile::Rosetta.guest_path();
    match locald_guest_spec::read_file(dir, SpecFile::Rosetta) {
        Ok(Some(data)) => match RosettaSpec::decode(&data) {
            Ok(spec) => Some(spec),
            Err(e) => {
                console::error(format_args!("bad {what}"), e);
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            console::error(format_args!("reading {what}"), e);
            None
        }
    }
}

fn errno_result(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `mount(source, target, fstype, flags)` without data; `EBUSY` (already
/// mounted) counts as success.
fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call; the data argument may be null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    match errno_result(rc) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

/// The steps of [`setup`]; `Err` names the failed step.
fn try_setup(spec: &RosettaSpec) -> Result<(), (String, io::Error)> {
    let tag = String::from_utf8_lossy(&spec.tag);
    let mount_point = MOUNT_POINT.to_string_lossy();
    let source = std::ffi::CString::new(spec.tag.clone())
        .map_err(|e| (format!("tag '{tag}'"), io::Error::other(e)))?;
    std::fs::create_dir_all(&*mount_point).map_err(|e| (format!("creating {mount_point}"), e))?;
    mount(
        &source,
        MOUNT_POINT,
        c"virtiofs",
        libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID,
    )
    .map_err(|e| (format!("mounting virtiofs '{tag}' on {mount_point}"), e))?;

    let binfmt = Path::new(BINFMT_MISC.to_str().unwrap_or_default());
    if !binfmt.join("register").exists() {
        mount(
            c"binfmt_misc",
            BINFMT_MISC,
            c"binfmt_misc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        )
        .map_err(|e| (format!("mounting binfmt_misc on {}", binfmt.display()), e))?;
    }
    if binfmt.join(NAME).exists() {
        return Ok(()); // Registered already (a reboot keeps nothing, but be safe).
    }
    let register = binfmt.join("register");
    // binfmt_misc takes the whole registration in one write.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&register)
        .and_then(|mut f| f.write_all(rosetta_registration().as_bytes()))
        .map_err(|e| {
            (
                format!("registering {INTERPRETER} in {}", register.display()),
                e,
            )
        })
}

/// Mounts the Rosetta share and registers it for x86-64 binaries (see the
/// module documentation); a failure is printed and ignored.
pub fn setup(spec: &RosettaSpec) {
    if let Err((what, e)) = try_setup(spec) {
        console::error(
            format_args!("rosetta: {what}"),
            format_args!("{} (x86-64 binaries will not run)", console::describe(&e)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registration Lima (`pkg/cidata/.../05-rosetta-volume.sh`), Tart
    /// and NixOS use, with Lima's interpreter path replaced by ours.
    const PUBLISHED: &str = r":rosetta:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00:\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/run/rosetta/rosetta:OCF";

    #[test]
    fn registration_matches_the_published_one() {
        assert_eq!(rosetta_registration(), PUBLISHED);
    }

    #[test]
    fn escaping() {
        assert_eq!(escape(b""), "");
        assert_eq!(escape(b"AZaz09"), "AZaz09");
        assert_eq!(escape(b":\0\\x/\xff"), r"\x3a\x00\x5cx\x2f\xff");
        assert_eq!(
            registration("n", b"\x01", b"\xff", "/i", "F"),
            r":n:M::\x01:\xff:/i:F"
        );
    }

    #[test]
    fn magic_and_mask_select_x86_64_elf() {
        // Byte-wise (header & mask) == (magic & mask), as the kernel checks.
        let matches = |hdr: &[u8]| {
            X86_64_MAGIC
                .iter()
                .zip(X86_64_MASK)
                .zip(hdr)
                .all(|((m, k), h)| h & k == m & k)
        };
        let mut exec = X86_64_MAGIC;
        assert!(matches(&exec));
        exec[16] = 3; // ET_DYN (PIE)
        assert!(matches(&exec));
        exec[7] = 3; // OS ABI GNU/Linux
        assert!(matches(&exec));
        exec[18] = 0xb7; // EM_AARCH64
        assert!(!matches(&exec));
        let mut elf32 = X86_64_MAGIC;
        elf32[4] = 1;
        assert!(!matches(&elf32));
        let mut rel = X86_64_MAGIC;
        rel[16] = 1; // ET_REL: not run
        assert!(!matches(&rel));
    }

    #[test]
    fn read_from_directory() {
        let dir = std::env::temp_dir().join(format!("locald-init-rosetta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir), None);
        std::fs::write(dir.join("rosetta"), b"rosetta").unwrap();
        assert_eq!(
            read(&dir),
            Some(RosettaSpec {
                tag: b"rosetta".to_vec()
            })
        );
        std::fs::write(dir.join("rosetta"), b"").unwrap();
        assert_eq!(read(&dir), None, "bad: printed, ignored");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
