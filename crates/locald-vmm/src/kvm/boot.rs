//! Loads the kernel and initrd into guest memory and writes the boot
//! structures the kernel reads: PVH `hvm_start_info` for ELF kernels with a
//! PVH entry, Linux `boot_params` for the 64-bit boot protocol (ELF without
//! PVH, and bzImage). Runs on the setup thread, before any vCPU starts.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::layout::*;
use crate::error::BootError;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
    /// 64-bit long mode, identity paging, RSI = `boot_params`.
    Linux64,
}

/// Where and how the kernel starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// Entry point (guest physical).
    pub entry: u64,
    /// Register setup the entry expects.
    pub mode: EntryMode,
}

/// A kernel loaded into guest memory, before the boot structures are written.
pub struct LoadedKernel {
    /// Entry point and mode.
    pub entry: KernelEntry,
    /// First byte past what the kernel will occupy.
    pub end: u64,
    /// The bzImage setup header, if the kernel is a bzImage.
    header: Option<linux_loader::loader::bootparam::setup_header>,
}

const XLF_KERNEL_64: u16 = 1 << 0;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Loads an ELF vmlinux (PVH entry preferred) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|e| BootError::KernelRead {
        path: path.into(),
        err: e,
    })?;
    let len = file
        .metadata()
        .map_err(|e| BootError::KernelRead {
            path: path.into(),
            err: e,
        })?
        .len();
    if len == 0 {
        return Err(BootError::KernelEmpty(path.into()));
    }
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let himem = Some(GuestAddress(HIMEM));
    if is_elf {
        let r = Elf::load(mem, None, &mut file, himem).map_err(|e| load_error(path, e))?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => KernelEntry {
                entry: addr.0,
                mode: EntryMode::Pvh,
            },
            _ => KernelEntry {
                entry: r.kernel_load.0,
                mode: EntryMode::Linux64,
            },
        };
        let end = elf_image_end(&mut file, r.kernel_end)
            .map_err(|why| BootError::KernelLoad(path.into(), why))?;
        check_image(mem, path, entry.entry, end)?;
        Ok(LoadedKernel {
            entry,
            end,
            header: None,
        })
    } else {
        let r = BzImage::load(mem, None, &mut file, himem).map_err(|e| load_error(path, e))?;
        let hdr = r.setup_header.ok_or_else(|| {
            BootError::KernelFormat(path.into(), "bzImage without a setup header".into())
        })?;
        if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::KernelFormat(
                path.into(),
                "bzImage has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)"
                    .into(),
            ));
        }
        let load = r.kernel_load.0;
        let end = r.kernel_end.max(load + u64::from(hdr.init_size));
        check_image(mem, path, load + 0x200, end)?;
        Ok(LoadedKernel {
            entry: KernelEntry {
                entry: load + 0x200,
                mode: EntryMode::Linux64,
            },
            end,
            header: Some(hdr),
        })
    }
}

/// The end of an ELF kernel's image: past every `PT_LOAD` segment, its
/// zero-filled tail included. Refuses segments below HIMEM, where the boot
/// structures go (linux-loader loads them wherever they say).
fn elf_image_end(file: &mut File, loaded_end: u64) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    let io = |e: std::io::Error| format!("reading the program headers: {e}");
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut ehdr).map_err(io)?;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap_or_default());
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]);
    file.seek(SeekFrom::Start(phoff)).map_err(io)?;
    let mut end = loaded_end;
    for _ in 0..phnum {
        let mut ph = [0u8; 56];
        file.read_exact(&mut ph).map_err(io)?;
        let word = |at: usize| u64::from_le_bytes(ph[at..at + 8].try_into().unwrap_or_default());
        let (paddr, size) = (word(24), word(32).max(word(40)));
        if ph[0..4] != [1, 0, 0, 0] || size == 0 {
            continue; // not a PT_LOAD, or empty
        }
        if paddr < HIMEM {
            return Err(format!(
                "a segment loads at {paddr:#x}, below {HIMEM:#x} where the boot structures go"
            ));
        }
        let seg_end = paddr
            .checked_add(size)
            .ok_or_else(|| format!("the segment at {paddr:#x} overflows"))?;
        end = end.max(seg_end);
    }
    Ok(end)
}

/// Refuses a kernel whose entry point is outside its own image, or whose
/// image `[HIMEM, end)` is not all guest RAM below the MMIO hole.
fn check_image(mem: &GuestMemoryMmap, path: &Path, entry: u64, end: u64) -> Result<(), BootError> {
    if !(HIMEM..end).contains(&entry) {
        return Err(BootError::KernelFormat(
            path.into(),
            format!("entry point {entry:#x} is outside the kernel image [{HIMEM:#x}, {end:#x})"),
        ));
    }
    let fits = usize::try_from(end - HIMEM).is_ok_and(|n| mem.check_range(GuestAddress(HIMEM), n));
    if !fits {
        return Err(BootError::KernelLoad(
            path.into(),
            format!("the image ends at {end:#x}, past the end of low RAM"),
        ));
    }
    Ok(())
}

fn load_error(path: &Path, e: linux_loader::loader::Error) -> BootError {
    use linux_loader::loader::Error as L;
    match e {
        L::MemoryOverflow | L::InvalidKernelStartAddress => {
            BootError::KernelLoad(path.into(), e.to_string())
        }
        L::Elf(linux_loader::loader::elf::Error::ReadKernelImage) => BootError::KernelFormat(
            path.into(),
            "the ELF file is truncated: a segment extends past its end".into(),
        ),
        _ => BootError::KernelFormat(path.into(), e.to_string()),
    }
}

/// Where the initrd landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Copies the initrd as high in low RAM as the kernel allows.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    name: &str,
    data: &[u8],
) -> Result<InitrdPlacement, BootError> {
    let size = data.len() as u64;
    let addr_max = match kernel.header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => INITRD_ADDR_MAX_DEFAULT,
    };
    let addr = initrd_address(mem_bytes, size, kernel.end, addr_max)
        .ok_or_else(|| BootError::InitrdTooBig(name.to_string(), size))?;
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| BootError::Setup(format!("initrd: {e}")))?;
    Ok(InitrdPlacement { addr, size })
}

/// Writes the command line and the boot structures for `kernel`'s entry mode.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline(format!(
            "{} bytes (at most {} allowed, no NUL bytes)",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    let setup = |e: vm_memory::GuestMemoryError| BootError::Setup(e.to_string());
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(setup)?;
    let map = e820_map(mem_bytes);
    match kernel.entry.mode {
        EntryMode::Pvh => {
            for (i, e) in map.iter().enumerate() {
                let entry = hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.kind,
                    reserved: 0,
                };
                let at = PVH_MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
                mem.write_obj(entry, GuestAddress(at)).map_err(setup)?;
            }
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE,
                memmap_paddr: PVH_MEMMAP,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            if let Some(rd) = initrd {
                let m = hvm_modlist_entry {
                    paddr: rd.addr,
                    size: rd.size,
                    ..Default::default()
                };
                mem.write_obj(m, GuestAddress(PVH_MODLIST)).map_err(setup)?;
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST;
            }
            mem.write_obj(info, GuestAddress(PVH_INFO)).map_err(setup)?;
        }
        EntryMode::Linux64 => {
            let mut params = boot_params::default();
            if let Some(h) = kernel.header {
                params.hdr = h;
            } else {
                params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
                params.hdr.header = KERNEL_HDR_MAGIC;
                params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.cmd_line_ptr = CMDLINE as u32;
            params.hdr.cmdline_size = bytes.len() as u32;
            if let Some(rd) = initrd {
                params.hdr.ramdisk_image = rd.addr as u32;
                params.hdr.ramdisk_size = rd.size as u32;
            }
            if map.len() > params.e820_table.len() {
                return Err(BootError::Setup("too many e820 entries".into()));
            }
            for (slot, e) in params.e820_table.iter_mut().zip(&map) {
                slot.addr = e.addr;
                slot.size = e.size;
                slot.type_ = e.kind;
            }
            params.e820_entries = map.len() as u8;
            mem.write_obj(params, GuestAddress(ZERO_PAGE))
                .map_err(setup)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory;

    fn memory(bytes: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = ram_ranges(bytes)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn tmpfile(name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("locald-boot-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        p
    }

    /// A minimal ELF64 with one PT_LOAD at 1 MiB and, optionally, a PVH note.
    fn elf(pvh: bool) -> Vec<u8> {
        let code = [0xf4u8; 16]; // hlt
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz "Xen\0"
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x10_0008u32.to_le_bytes());
        let phnum: u16 = if pvh { 2 } else { 1 };
        let code_off = 64 + 56 * phnum as u64;
        let note_off = code_off + code.len() as u64;
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&62u16.to_le_bytes()); // x86-64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        f.extend_from_slice(&64u64.to_le_bytes()); // phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // shoff
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(&56u16.to_le_bytes());
        f.extend_from_slice(&phnum.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64| {
            f.extend_from_slice(&ty.to_le_bytes());
            f.extend_from_slice(&5u32.to_le_bytes());
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&4u64.to_le_bytes());
        };
        ph(&mut f, 1, code_off, 0x10_0000, code.len() as u64);
        if pvh {
            ph(&mut f, 4, note_off, 0, note.len() as u64);
        }
        f.extend_from_slice(&code);
        f.extend_from_slice(&note);
        f
    }

    #[test]
    fn elf_with_pvh_note_boots_pvh() {
        let mem = memory(32 << 20);
        let p = tmpfile("pvh", &elf(true));
        let k = load_kernel(&mem, &p).unwrap();
        assert_eq!(
            k.entry,
            KernelEntry {
                entry: 0x10_0008,
                mode: EntryMode::Pvh
            }
        );
        let rd = load_initrd(&mem, 32 << 20, &k, "rd", b"initrd!").unwrap();
        write_boot_info(&mem, 32 << 20, &k, "console=ttyS0", Some(rd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (rd.addr, 7));
        let mut got = [0u8; 7];
        mem.read_slice(&mut got, GuestAddress(m.paddr)).unwrap();
        assert_eq!(&got, b"initrd!");
        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn elf_without_note_boots_linux64() {
        let mem = memory(32 << 20);
        let p = tmpfile("l64", &elf(false));
        let k = load_kernel(&mem, &p).unwrap();
        assert_eq!(
            k.entry,
            KernelEntry {
                entry: 0x10_0000,
                mode: EntryMode::Linux64
            }
        );
        write_boot_info(&mem, 32 << 20, &k, "x", None).unwrap();
        let bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!({ bp.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ bp.hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!(bp.e820_entries, 3);
        assert_eq!({ bp.e820_table[2].addr }, HIMEM);
        assert_eq!({ bp.hdr.ramdisk_image }, 0);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn garbage_kernels_are_rejected_with_their_name() {
        let mem = memory(32 << 20);
        let cases: [(&str, Vec<u8>); 3] = [
            ("empty", vec![]),
            (
                "random",
                (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
            ),
            ("truncated", elf(true)[..100].to_vec()),
        ];
        for (name, data) in cases {
            let p = tmpfile(name, &data);
            let err = load_kernel(&mem, &p).err().expect(name).to_string();
            assert!(err.contains(p.to_str().unwrap()), "{name}: {err}");
            std::fs::remove_file(p).unwrap();
        }
    }

    /// Found by the `boot_loader` fuzz target: kernels whose entry point
    /// lies outside their image (or guest RAM), whose segments load over
    /// the boot structures below 1 MiB, or whose image runs past guest RAM
    /// were accepted; the guest then ran garbage.
    #[test]
    fn kernels_outside_their_image_or_ram_are_rejected() {
        let mem = memory(32 << 20);
        let patch = |mut f: Vec<u8>, at: usize, v: u64| {
            f[at..at + 8].copy_from_slice(&v.to_le_bytes());
            f
        };
        let mut note_entry = elf(true);
        let n = note_entry.len();
        note_entry[n - 4..].copy_from_slice(&0x5000u32.to_le_bytes());
        let mut no_load = elf(false);
        no_load[64] = 6; // the only PT_LOAD becomes a PT_PHDR
        let cases: [(&str, Vec<u8>, &str); 5] = [
            (
                "entry-past-image",
                patch(elf(false), 24, 0x20_0000),
                "entry point",
            ),
            ("pvh-entry-low", note_entry, "entry point"),
            ("no-segments", no_load, "entry point"),
            (
                "low-segment",
                patch(elf(false), 64 + 24, 0x7000),
                "boot structures",
            ),
            (
                "bss-past-ram",
                patch(elf(false), 64 + 40, 64 << 20),
                "past the end",
            ),
        ];
        for (name, data, why) in cases {
            let p = tmpfile(name, &data);
            let err = load_kernel(&mem, &p).err().expect(name).to_string();
            assert!(err.contains(p.to_str().unwrap()), "{name}: {err}");
            assert!(err.contains(why), "{name}: {err}");
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn oversized_initrd_and_cmdline_fail() {
        let mem = memory(16 << 20);
        let p = tmpfile("big", &elf(true));
        let k = load_kernel(&mem, &p).unwrap();
        let big = vec![0u8; 16 << 20];
        assert!(matches!(
            load_initrd(&mem, 16 << 20, &k, "big.img", &big),
            Err(BootError::InitrdTooBig(..))
        ));
        let long = "a".repeat(CMDLINE_MAX);
        assert!(matches!(
            write_boot_info(&mem, 16 << 20, &k, &long, None),
            Err(BootError::Cmdline(_))
        ));
        assert!(mem.last_addr().0 < (16 << 20));
        std::fs::remove_file(p).unwrap();
    }
}
