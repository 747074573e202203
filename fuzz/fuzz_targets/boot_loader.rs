//! Fuzzes guest image loading without KVM, through the code
//! `VirtualMachine::new` uses (`kvm::boot::{load_kernel, load_initrd,
//! write_boot_info}` into a `GuestMemoryMmap` laid out by
//! `kvm::layout::ram_ranges`). The kernel is a file of fuzzed bytes, either
//! raw or built from fuzzed fields of an ELF64 (program headers, PVH note)
//! or bzImage (setup header) template so the fuzzer gets past the magic
//! numbers; the initrd, command line and guest memory size are fuzzed too.
//!
//! Oracles, besides "no panic":
//! - an accepted kernel lies within guest RAM and out of the boot area:
//!   its entry point is in `[HIMEM, end)` and `end` within low RAM; every
//!   ELF `PT_LOAD` segment (parsed independently here) lies in
//!   `[HIMEM, end)`, including its zero-filled tail;
//! - an accepted initrd is page aligned, after the kernel, below the
//!   kernel's `initrd_addr_max`, inside low RAM, and reads back intact;
//! - accepted boot info reads back: the NUL-terminated command line, the
//!   PVH start info (magic, memory map, module = initrd) or `boot_params`
//!   (loader type, command line, ramdisk, e820), and the memory map's RAM
//!   entries are all guest memory and cover the kernel and initrd; a
//!   command line is refused only when too long or containing NUL.

#![no_main]

#[path = "common.rs"]
mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::Input;
use libfuzzer_sys::fuzz_target;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use locald_vmm::kvm::boot::{load_initrd, load_kernel, write_boot_info, EntryMode};
use locald_vmm::kvm::layout::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

fn big_initrd() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| {
        (0..(64usize << 20) + 8192)
            .map(|i| (i % 251) as u8)
            .collect()
    })
}

fn kernel_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("locald-fuzz-kernel-{}", std::process::id()))
    })
}

/// An address biased towards guest RAM above HIMEM, sometimes anything.
fn addr(inp: &mut Input, mem: u64) -> u64 {
    match inp.u8() % 8 {
        0 => inp.u64(),
        1 => u64::from(inp.u32()),
        2 => u64::from(inp.u16()) << 4, // the boot area
        3 => mem - u64::from(inp.u16()),
        _ => HIMEM + u64::from(inp.u32()) % (mem - HIMEM),
    }
}

fn size(inp: &mut Input, mem: u64) -> u64 {
    match inp.u8() % 6 {
        0 => inp.u64(),
        1 => u64::from(inp.u32()) % (2 * mem),
        2 => 0,
        _ => u64::from(inp.u16() % 8192),
    }
}

struct Seg {
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// An ELF64 vmlinux from fuzzed fields; also returns its PT_LOAD segments.
fn elf(inp: &mut Input, mem: u64) -> Vec<u8> {
    let phnum = usize::from(inp.u8() % 5);
    let entry = addr(inp, mem);
    let mut phdrs = Vec::new();
    let mut note = Vec::new();
    for _ in 0..phnum {
        let ty = [PT_LOAD, PT_LOAD, PT_NOTE, 6][usize::from(inp.u8() % 4)];
        let paddr = addr(inp, mem);
        let filesz = size(inp, mem);
        let memsz = match inp.u8() % 4 {
            0 => size(inp, mem),
            _ => filesz.saturating_add(size(inp, mem) % (mem / 2)),
        };
        let off_sel = inp.u8();
        phdrs.push((ty, paddr, filesz, memsz, off_sel));
        if ty == PT_NOTE && note.is_empty() {
            let namesz = if inp.u8() % 4 == 0 { inp.u32() } else { 4 };
            let descsz = if inp.u8() % 4 == 0 { inp.u32() } else { 4 };
            let ntype = if inp.u8() % 4 == 0 { inp.u32() } else { 18 };
            note.extend_from_slice(&namesz.to_le_bytes());
            note.extend_from_slice(&descsz.to_le_bytes());
            note.extend_from_slice(&ntype.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&(addr(inp, mem) as u32).to_le_bytes());
        }
    }
    let payload = inp.rest();
    let hdr_end = 64 + 56 * phnum as u64;
    let note_off = hdr_end;
    let payload_off = note_off + note.len() as u64;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(&62u16.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&56u16.to_le_bytes());
    f.extend_from_slice(&(phnum as u16).to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    for (ty, paddr, filesz, memsz, off_sel) in phdrs {
        let (off, filesz) = match (ty, off_sel % 4) {
            (PT_NOTE, 0) => (u64::from(off_sel), filesz),
            (PT_NOTE, _) => (note_off, note.len() as u64),
            (_, 0) => (u64::from(off_sel) * 8, filesz),
            // Mostly: a slice of the payload, so the segment can load.
            _ => (payload_off, filesz.min(payload.len() as u64)),
        };
        let memsz = if off_sel & 0x80 == 0 {
            memsz.max(filesz)
        } else {
            memsz
        };
        f.extend_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes());
        f.extend_from_slice(&off.to_le_bytes());
        f.extend_from_slice(&paddr.to_le_bytes());
        f.extend_from_slice(&paddr.to_le_bytes());
        f.extend_from_slice(&filesz.to_le_bytes());
        f.extend_from_slice(&memsz.to_le_bytes());
        f.extend_from_slice(&4u64.to_le_bytes());
    }
    f.extend_from_slice(&note);
    f.extend_from_slice(payload);
    f
}

/// A bzImage from fuzzed setup-header fields and payload.
fn bzimage(inp: &mut Input, mem: u64) -> Vec<u8> {
    let setup_sects = inp.u8() % 6;
    let setup_len = (usize::from(if setup_sects == 0 { 4 } else { setup_sects }) + 1) * 512;
    let mut f = vec![0u8; setup_len];
    let put = |f: &mut Vec<u8>, at: usize, v: &[u8]| f[at..at + v.len()].copy_from_slice(v);
    put(&mut f, 0x1f1, &[setup_sects]);
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut f, 0x202, b"HdrS");
    let version: u16 = if inp.u8() % 4 == 0 { inp.u16() } else { 0x020f };
    put(&mut f, 0x206, &version.to_le_bytes());
    let loadflags = if inp.u8() % 4 == 0 { inp.u8() } else { 0x01 };
    put(&mut f, 0x211, &[loadflags]);
    put(&mut f, 0x214, &(addr(inp, mem) as u32).to_le_bytes());
    let addr_max: u32 = match inp.u8() % 3 {
        0 => inp.u32(),
        1 => 0,
        _ => 0x7fff_ffff,
    };
    put(&mut f, 0x22c, &addr_max.to_le_bytes());
    let xload: u16 = if inp.u8() % 4 == 0 { inp.u16() } else { 0x1 };
    put(&mut f, 0x236, &xload.to_le_bytes());
    put(&mut f, 0x260, &(size(inp, mem) as u32).to_le_bytes());
    f.extend_from_slice(inp.rest());
    f
}

/// PT_LOAD segments with file bytes, read back from the file (independent
/// of linux-loader's parser).
fn elf_segments(f: &[u8]) -> Vec<Seg> {
    let rd = |at: usize, n: usize| -> Option<u64> {
        let b = f.get(at..at.checked_add(n)?)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    let (Some(phoff), Some(phnum)) = (rd(32, 8), rd(56, 2)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for i in 0..phnum as usize {
        let Some(at) = (phoff as usize).checked_add(i * 56) else {
            break;
        };
        let (Some(ty), Some(paddr), Some(filesz), Some(memsz)) =
            (rd(at, 4), rd(at + 24, 8), rd(at + 32, 8), rd(at + 40, 8))
        else {
            break;
        };
        if ty == u64::from(PT_LOAD) && filesz != 0 {
            out.push(Seg {
                paddr,
                filesz,
                memsz,
            });
        }
    }
    out
}

fn in_ram_map(map: &[E820Entry], start: u64, len: u64) -> bool {
    len == 0
        || map
            .iter()
            .any(|e| e.kind == E820_RAM && start >= e.addr && start + len <= e.addr + e.size)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem_mib = 8 + u64::from(inp.u8() % 57);
    let mem_bytes = mem_mib << 20;
    let low_end = low_ram_end(mem_bytes);
    let mode = inp.u8() % 3;
    let cmd_len = usize::from(inp.u16() % 2200);
    let fill = inp.u8();
    let mut cmdline: Vec<u8> = inp.bytes(cmd_len.min(64)).to_vec();
    cmdline.resize(cmd_len, b'a' + fill % 26);
    let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
    let small: Vec<u8>;
    let initrd: Option<&[u8]> = match inp.u8() % 3 {
        0 => None,
        _ => {
            // Up to a little more than guest memory; the big ones share
            // one preallocated buffer (allocating them each run is slow).
            let n = (size(&mut inp, mem_bytes) as usize).min(mem_bytes as usize + 8192);
            if n > 4096 {
                Some(&big_initrd()[..n])
            } else {
                let mut d = inp.bytes(n.min(256)).to_vec();
                d.resize(n, 0x5a);
                small = d;
                Some(&small[..])
            }
        }
    };
    let image = match mode {
        0 => elf(&mut inp, mem_bytes),
        1 => bzimage(&mut inp, mem_bytes),
        _ => inp.rest().to_vec(),
    };

    let ranges: Vec<_> = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    let path = kernel_path();
    std::fs::write(path, &image).unwrap();
    let kernel = load_kernel(&mem, path);
    let _ = std::fs::remove_file(path);
    let Ok(k) = kernel else { return };

    let is_elf = image.starts_with(b"\x7fELF");
    // The kernel lies in guest RAM, above the boot area.
    let entry = k.entry.entry;
    assert!(
        entry >= HIMEM && entry < k.end,
        "entry {entry:#x} outside the kernel image [{HIMEM:#x}, {:#x})",
        k.end
    );
    assert!(
        k.end <= low_end,
        "kernel ends at {:#x}, past low RAM {low_end:#x}",
        k.end
    );
    if is_elf {
        for s in elf_segments(&image) {
            assert!(
                s.paddr >= HIMEM && s.paddr.saturating_add(s.filesz.max(s.memsz)) <= k.end,
                "segment {:#x}+{:#x}/{:#x} outside [{HIMEM:#x}, {:#x})",
                s.paddr,
                s.filesz,
                s.memsz,
                k.end
            );
        }
    } else {
        assert_eq!(k.entry.mode, EntryMode::Linux64);
    }

    let addr_max = if !is_elf && image.len() >= 0x230 {
        match u32::from_le_bytes(image[0x22c..0x230].try_into().unwrap()) {
            0 => INITRD_ADDR_MAX_DEFAULT,
            v => u64::from(v),
        }
    } else {
        INITRD_ADDR_MAX_DEFAULT
    };
    let placed = match &initrd {
        Some(d) => match load_initrd(&mem, mem_bytes, &k, "fuzz.img", d) {
            Ok(p) => {
                assert_eq!(p.size, d.len() as u64);
                assert_eq!(p.addr % 4096, 0);
                assert!(
                    p.addr >= k.end.max(HIMEM),
                    "initrd {:#x} overlaps the kernel",
                    p.addr
                );
                assert!(p.addr + p.size <= low_end);
                assert!(p.addr + p.size <= addr_max.saturating_add(1));
                let mut back = vec![0u8; d.len()];
                mem.read_slice(&mut back, GuestAddress(p.addr)).unwrap();
                assert!(back == **d, "initrd corrupted");
                Some(p)
            }
            Err(_) => return,
        },
        None => None,
    };

    let r = write_boot_info(&mem, mem_bytes, &k, &cmdline, placed);
    let valid_cmdline = cmdline.len() < CMDLINE_MAX && !cmdline.contains('\0');
    assert_eq!(r.is_ok(), valid_cmdline, "{r:?}");
    if r.is_err() {
        return;
    }
    let mut cl = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut cl, GuestAddress(CMDLINE)).unwrap();
    assert_eq!(&cl[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(cl[cmdline.len()], 0);

    let map = e820_map(mem_bytes);
    for e in map.iter().filter(|e| e.kind == E820_RAM) {
        assert!(mem.check_range(GuestAddress(e.addr), e.size as usize));
    }
    assert!(
        in_ram_map(&map, HIMEM, k.end - HIMEM),
        "kernel not in e820 RAM"
    );
    if let Some(p) = placed {
        assert!(in_ram_map(&map, p.addr, p.size), "initrd not in e820 RAM");
    }
    match k.entry.mode {
        EntryMode::Pvh => {
            let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO)).unwrap();
            assert_eq!(info.magic, 0x336e_c578);
            assert_eq!(info.cmdline_paddr, CMDLINE);
            assert_eq!(info.memmap_entries as usize, map.len());
            for (i, e) in map.iter().enumerate() {
                let at =
                    info.memmap_paddr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
                let got: hvm_memmap_table_entry = mem.read_obj(GuestAddress(at)).unwrap();
                assert_eq!((got.addr, got.size, got.type_), (e.addr, e.size, e.kind));
            }
            match placed {
                Some(p) => {
                    assert_eq!(info.nr_modules, 1);
                    let m: hvm_modlist_entry =
                        mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
                    assert_eq!((m.paddr, m.size), (p.addr, p.size));
                }
                None => assert_eq!(info.nr_modules, 0),
            }
        }
        EntryMode::Linux64 => {
            let bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
            assert_eq!({ bp.hdr.type_of_loader }, 0xff);
            assert_eq!(u64::from(bp.hdr.cmd_line_ptr), CMDLINE);
            assert_eq!({ bp.hdr.cmdline_size } as usize, cmdline.len() + 1);
            let (img, sz) = placed.map(|p| (p.addr, p.size)).unwrap_or((0, 0));
            assert_eq!(u64::from(bp.hdr.ramdisk_image), img);
            assert_eq!(u64::from(bp.hdr.ramdisk_size), sz);
            assert_eq!(bp.e820_entries as usize, map.len());
            for (slot, e) in bp.e820_table.iter().zip(&map) {
                assert_eq!(
                    ({ slot.addr }, { slot.size }, { slot.type_ }),
                    (e.addr, e.size, e.kind)
                );
            }
        }
    }
});
