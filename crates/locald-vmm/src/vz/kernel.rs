//! What kind of kernel file a path holds, from its first bytes. The VZ
//! backend needs this before it hands the file to `VZLinuxBootLoader`,
//! which takes an uncompressed arm64 `Image` on Apple Silicon and a
//! `bzImage` on Intel Macs, and fails late and vaguely on anything else.
//! Pure; runs on the caller's thread.

use std::io::Read;
use std::path::Path;

/// Bytes of the file [`KernelFormat::sniff`] looks at.
pub const HEADER_LEN: usize = 0x240;

/// A kernel file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An arm64 `Image` (magic `ARM\x64` at offset 0x38).
    Arm64Image,
    /// An x86 `bzImage` (boot-sector signature and `HdrS` at 0x202).
    X86BzImage,
    /// An ELF file (`vmlinux`) for this `e_machine`.
    Elf { machine: u16 },
    /// A compressed file: gzip, or an EFI zboot image (`vmlinuz.efi`).
    Compressed,
    /// None of the above.
    Unknown,
}

/// ELF `e_machine` of x86-64.
pub const EM_X86_64: u16 = 0x3e;
/// ELF `e_machine` of AArch64.
pub const EM_AARCH64: u16 = 0xb7;

impl KernelFormat {
    /// Classifies a file from its first bytes (up to [`HEADER_LEN`]).
    pub fn sniff(h: &[u8]) -> Self {
        let at = |off: usize, magic: &[u8]| h.get(off..off + magic.len()) == Some(magic);
        if at(0, b"\x7fELF") {
            let machine = h
                .get(0x12..0x14)
                .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            return KernelFormat::Elf { machine };
        }
        if at(0, &[0x1f, 0x8b]) || (at(0, b"MZ") && at(4, b"zimg")) {
            return KernelFormat::Compressed;
        }
        if at(0x38, b"ARM\x64") {
            return KernelFormat::Arm64Image;
        }
        if at(0x1fe, &[0x55, 0xaa]) && at(0x202, b"HdrS") {
            return KernelFormat::X86BzImage;
        }
        KernelFormat::Unknown
    }

    /// Reads the first bytes of `path` and classifies them.
    pub fn of_file(path: &Path) -> std::io::Result<Self> {
        let mut f = std::fs::File::open(path)?;
        let mut h = Vec::with_capacity(HEADER_LEN);
        f.by_ref().take(HEADER_LEN as u64).read_to_end(&mut h)?;
        Ok(Self::sniff(&h))
    }

    /// A short human name for messages.
    pub fn describe(self) -> String {
        match self {
            KernelFormat::Arm64Image => "an arm64 Image".into(),
            KernelFormat::X86BzImage => "an x86 bzImage".into(),
            KernelFormat::Elf { machine: EM_X86_64 } => "an x86_64 ELF vmlinux".into(),
            KernelFormat::Elf {
                machine: EM_AARCH64,
            } => "an aarch64 ELF vmlinux".into(),
            KernelFormat::Elf { machine } => format!("an ELF file for machine {machine:#x}"),
            KernelFormat::Compressed => "a compressed kernel (gzip or EFI zboot)".into(),
            KernelFormat::Unknown => "not a kernel format we recognise".into(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal arm64 Image header.
    pub fn arm64_image() -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0x38..0x3c].copy_from_slice(b"ARM\x64");
        h
    }

    /// A minimal bzImage header.
    pub fn bzimage() -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0x1fe] = 0x55;
        h[0x1ff] = 0xaa;
        h[0x202..0x206].copy_from_slice(b"HdrS");
        h
    }

    /// A minimal ELF header for `machine`.
    pub fn elf(machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn sniffs_formats() {
        assert_eq!(
            KernelFormat::sniff(&arm64_image()),
            KernelFormat::Arm64Image
        );
        assert_eq!(KernelFormat::sniff(&bzimage()), KernelFormat::X86BzImage);
        assert_eq!(
            KernelFormat::sniff(&elf(EM_X86_64)),
            KernelFormat::Elf { machine: EM_X86_64 }
        );
        assert_eq!(
            KernelFormat::sniff(&[0x1f, 0x8b, 8, 0]),
            KernelFormat::Compressed
        );
        let mut zboot = vec![0u8; 64];
        zboot[..2].copy_from_slice(b"MZ");
        zboot[4..8].copy_from_slice(b"zimg");
        assert_eq!(KernelFormat::sniff(&zboot), KernelFormat::Compressed);
        assert_eq!(KernelFormat::sniff(b""), KernelFormat::Unknown);
        assert_eq!(KernelFormat::sniff(&[0u8; 16]), KernelFormat::Unknown);
        // A truncated ELF header still classifies, with an unknown machine.
        assert_eq!(
            KernelFormat::sniff(b"\x7fELF"),
            KernelFormat::Elf { machine: 0 }
        );
        assert!(KernelFormat::Elf { machine: 3 }.describe().contains("0x3"));
    }

    #[test]
    fn reads_files() {
        let p = std::env::temp_dir().join(format!("locald-vz-kernel-{}", std::process::id()));
        std::fs::write(&p, arm64_image()).unwrap();
        assert_eq!(KernelFormat::of_file(&p).unwrap(), KernelFormat::Arm64Image);
        std::fs::remove_file(&p).unwrap();
        assert!(KernelFormat::of_file(&p).is_err());
    }
}
