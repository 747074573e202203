//! Checks the built guests against linux-loader 0.13 (the loader the VMM
//! uses), without KVM: PVH guests expose their PVH entry, boot64 has none,
//! and the synthetic bzImage passes the bzImage checks with the intended
//! setup header.

use std::fs::File;

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("guest memory")
}

#[test]
fn pvh_guests_have_a_pvh_entry_at_1mib() {
    for spec in test_guests::builder::GUESTS
        .iter()
        .filter(|g| g.script == "pvh.ld")
    {
        let mut f = File::open(test_guests::path(spec.name)).expect("open guest");
        let r = Elf::load(&memory(), None, &mut f, Some(GuestAddress(0x100000)))
            .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        assert_eq!(
            r.pvh_boot_cap,
            PvhBootCapability::PvhEntryPresent(GuestAddress(0x100000)),
            "{}",
            spec.name
        );
        assert_eq!(r.kernel_load, GuestAddress(0x100000), "{}", spec.name);
        assert!(r.kernel_end > 0x100000, "{}", spec.name);
    }
}

#[test]
fn boot64_is_an_elf_without_pvh_note() {
    let mut f = File::open(test_guests::BOOT64).expect("open boot64");
    let r = Elf::load(&memory(), None, &mut f, Some(GuestAddress(0x100000))).expect("load");
    // No PT_NOTE at all: linux-loader leaves its default (PvhEntryIgnored).
    assert!(
        !matches!(r.pvh_boot_cap, PvhBootCapability::PvhEntryPresent(_)),
        "{:?}",
        r.pvh_boot_cap
    );
    assert_eq!(r.kernel_load, GuestAddress(0x100000));
}

#[test]
fn bzimage_passes_linux_loader_checks() {
    let mut f = File::open(test_guests::BZIMAGE).expect("open bzimage");
    let r = BzImage::load(&memory(), None, &mut f, Some(GuestAddress(0x100000))).expect("load");
    let hdr = r.setup_header.expect("setup header");
    assert_eq!(r.kernel_load, GuestAddress(0x100000));
    // Copy the packed fields out before comparing them.
    let (magic, version, loadflags, code32, xload, sects, boot_flag) = (
        hdr.header,
        hdr.version,
        hdr.loadflags,
        hdr.code32_start,
        hdr.xloadflags,
        hdr.setup_sects,
        hdr.boot_flag,
    );
    assert_eq!(magic, 0x5372_6448, "HdrS");
    assert!(version >= 0x020c, "version {version:#x}");
    assert_eq!(loadflags & 1, 1, "LOADED_HIGH");
    assert_eq!(code32, 0x100000);
    assert_eq!(xload & 1, 1, "XLF_KERNEL_64");
    assert_eq!(sects, 4);
    assert_eq!(boot_flag, 0xaa55);
    let (syssize, init_size) = (hdr.syssize, hdr.init_size);
    let payload = std::fs::metadata(test_guests::BZIMAGE).unwrap().len() - 5 * 512;
    assert_eq!(u64::from(syssize) * 16, payload.div_ceil(16) * 16);
    assert!(u64::from(init_size) >= payload);
    assert_eq!(r.kernel_end, 0x100000 + payload);
}

#[test]
fn every_guest_is_built() {
    for name in test_guests::names() {
        let len = std::fs::metadata(test_guests::path(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .len();
        assert!(len > 0, "{name} is empty");
    }
}
