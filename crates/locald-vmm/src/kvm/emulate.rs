//! Instructions the VMM completes itself when KVM's instruction emulator
//! gives up (`KVM_EXIT_INTERNAL_ERROR`, emulation failure). This matters on
//! software-KVM hosts (PVM), where every guest-kernel instruction goes
//! through that emulator, which lacks a few that Linux executes. Runs on
//! the vCPU thread that took the exit; the decision is a pure function of
//! the instruction bytes and registers, tested without KVM.
//!
//! Handled (see docs/software-kvm.md):
//! - `int3`: advance RIP past it and inject #BP (a trap), as the CPU would.
//! - `clac` / `stac`: clear / set RFLAGS.AC.
//! - `popcnt r, r` (register form, 16/32/64-bit): compute, set ZF, clear
//!   CF/OF/SF/AF/PF.
//! - `fwait`/`wait`: no x87 exceptions are ever pending, so a no-op.
//! - `rdrand r`: filled from the host's `getrandom`, CF set. Completing it
//!   lets the guest see RDRAND and seed its RNG at once: without a CPU
//!   entropy source, a 6.1 guest re-hashes its whole entropy pool (BLAKE2s,
//!   emulated) on every random-number request until enough interrupts have
//!   arrived — measured as most of a 40 s boot on this kind of host.
//!
//! Anything else ends the VM with an error naming the instruction, its
//! bytes and the guest RIP.
//!
//! On hardware KVM none of these exits happens, so [`code_window`] gives
//! tests a way to reach this path on any host: a test-only page from which
//! KVM cannot fetch instructions.

use iced_x86::{
    Code, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, OpKind, Register,
};
use kvm_bindings::kvm_regs;

/// What the vCPU loop must do after a handled instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Registers updated; re-enter the guest.
    Done,
    /// Registers updated; inject exception vector `0` (no error code) first.
    InjectException(u8),
}

/// An instruction we could not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot emulate `{text}` (bytes {bytes}) at guest RIP {rip:#x}")]
pub struct Unhandled {
    /// The instruction as Intel-syntax text (or "invalid").
    pub text: String,
    /// The instruction's bytes in hex.
    pub bytes: String,
    /// Guest RIP.
    pub rip: u64,
}

/// The kind of a handled instruction, for statistics.
pub fn kind_name(code: Code) -> &'static str {
    match code {
        Code::Int3 => "int3",
        Code::Clac => "clac",
        Code::Stac => "stac",
        Code::Wait => "fwait",
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64 => "popcnt",
        Code::Rdrand_r16 | Code::Rdrand_r32 | Code::Rdrand_r64 => "rdrand",
        _ => "other",
    }
}

const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;

/// Decodes one instruction for a CPU in `bitness`-bit mode at `rip`.
pub fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Instruction {
    Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE).decode()
}

fn describe(insn: &Instruction, bytes: &[u8], rip: u64) -> Unhandled {
    let text = if insn.is_invalid() {
        "invalid".to_string()
    } else {
        let mut s = String::new();
        IntelFormatter::new().format(insn, &mut s);
        s
    };
    let n = if insn.is_invalid() {
        bytes.len().min(15)
    } else {
        insn.len()
    };
    Unhandled {
        text,
        bytes: bytes[..n]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
        rip,
    }
}

/// The full 64-bit register behind `reg` and the width of `reg` in bytes.
fn gpr(regs: &mut kvm_regs, reg: Register) -> Option<(&mut u64, u32)> {
    let full = reg.full_register();
    let slot = match full {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    };
    Some((slot, reg.size() as u32))
}

/// Random bits from the host kernel (`getrandom`), or `None` if it fails.
fn host_random_u64() -> Option<u64> {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most `v.len()` bytes into our buffer.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    (n == v.len() as isize).then(|| u64::from_ne_bytes(v))
}

/// Completes the instruction in `bytes` (read at the guest's RIP) for a CPU
/// in `bitness`-bit mode, updating `regs`.
pub fn emulate(
    bytes: &[u8],
    bitness: u32,
    regs: &mut kvm_regs,
) -> Result<(Effect, &'static str), Unhandled> {
    let rip = regs.rip;
    let insn = decode(bytes, bitness, rip);
    let next = insn.next_ip();
    let kind = kind_name(insn.code());
    let effect = match insn.code() {
        Code::Int3 => Effect::InjectException(3),
        Code::Clac => {
            regs.rflags &= !RFLAGS_AC;
            Effect::Done
        }
        Code::Stac => {
            regs.rflags |= RFLAGS_AC;
            Effect::Done
        }
        Code::Wait => Effect::Done,
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64
            if insn.op1_kind() == OpKind::Register =>
        {
            let (src, width) =
                gpr(regs, insn.op1_register()).ok_or_else(|| describe(&insn, bytes, rip))?;
            let mask = if width == 8 {
                u64::MAX
            } else {
                (1u64 << (width * 8)) - 1
            };
            let value = *src & mask;
            let count = u64::from(value.count_ones());
            let (dst, width) =
                gpr(regs, insn.op0_register()).ok_or_else(|| describe(&insn, bytes, rip))?;
            *dst = match width {
                2 => (*dst & !0xffff) | count,
                _ => count, // 32-bit writes zero-extend; 64-bit is whole
            };
            regs.rflags &= !(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
            if value == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            Effect::Done
        }
        Code::Rdrand_r16 | Code::Rdrand_r32 | Code::Rdrand_r64 => {
            let random = host_random_u64();
            let (dst, width) =
                gpr(regs, insn.op0_register()).ok_or_else(|| describe(&insn, bytes, rip))?;
            let v = random.unwrap_or(0);
            *dst = match width {
                2 => (*dst & !0xffff) | (v & 0xffff),
                4 => v & 0xffff_ffff,
                _ => v,
            };
            regs.rflags &= !(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
            if random.is_some() {
                regs.rflags |= RFLAGS_CF; // CF=1: the value is valid
            } // else CF=0 tells the guest to retry, as a CPU out of entropy would
            Effect::Done
        }
        _ => return Err(describe(&insn, bytes, rip)),
    };
    regs.rip = if bitness == 64 {
        next
    } else {
        next & 0xffff_ffff
    };
    Ok((effect, kind))
}

/// Test hook (off unless `LOCALD_VMM_TEST_CODE_WINDOW=1` is in the VMM's
/// environment when the VM is created): one page of guest-physical
/// address space at [`code_window::BASE`], the start of the MMIO hole,
/// that is **not** a KVM memory slot but is backed by VMM memory. The
/// guest fills it with plain MMIO writes (each one a VM exit; reads return
/// what was written) and jumps into it. KVM cannot fetch an instruction
/// from a guest-physical address without a memory slot, on Intel, AMD and
/// software KVM alike: its emulator gives up with `KVM_EXIT_INTERNAL_ERROR`
/// (`KVM_INTERNAL_ERROR_EMULATION`) at CPL 0, with RIP on the instruction
/// — the very exit a software-KVM host takes for `int3` or `stac` in RAM.
/// The vCPU loop then takes its one path for it (fetch the bytes through
/// the guest's page tables, [`emulate`], count the kind), which reads the
/// window from the VMM memory added to its view. Every instruction in the
/// window exits this way, so a sequence ends with `int3` (completed here,
/// #BP into the guest's handler in RAM) to leave it. See docs/testing.md
/// and `guests/emulate_window.S`.
pub mod code_window {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

    use crate::devices::{Bus, BusDevice};
    use crate::error::Error;

    /// The environment variable that turns the window on (`1`).
    pub const ENV: &str = "LOCALD_VMM_TEST_CODE_WINDOW";
    /// Guest-physical base of the window: the first page of the MMIO hole.
    pub const BASE: u64 = crate::kvm::layout::MMIO_GAP_START;
    /// Size of the window.
    pub const SIZE: u64 = 0x1000;

    /// True if the hook is on in this process's environment.
    pub fn enabled() -> bool {
        std::env::var(ENV).is_ok_and(|v| v == "1")
    }

    /// The window's MMIO side: guest reads and writes go to `mem` (holding
    /// only the window page), the same memory the vCPU loop fetches from.
    struct Window {
        mem: GuestMemoryMmap,
    }

    impl BusDevice for Window {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            if self
                .mem
                .read_slice(data, GuestAddress(BASE + offset))
                .is_err()
            {
                data.fill(0xff);
            }
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            let _ = self.mem.write_slice(data, GuestAddress(BASE + offset));
        }
    }

    /// Puts the window on `mmio` and returns `ram` plus the window page:
    /// the memory the vCPU loop reads instructions from. `ram` itself (what
    /// KVM and the devices see) stays without it.
    pub fn attach(ram: &GuestMemoryMmap, mmio: &mut Bus) -> Result<GuestMemoryMmap, Error> {
        let err = |e: String| Error::from(crate::error::DeviceError::CodeWindow(e));
        let region = Arc::new(
            GuestRegionMmap::from_range(GuestAddress(BASE), SIZE as usize, None)
                .map_err(|e| err(e.to_string()))?,
        );
        let own = GuestMemoryMmap::from_arc_regions(vec![region.clone()])
            .map_err(|e| err(e.to_string()))?;
        mmio.insert(Arc::new(Mutex::new(Window { mem: own })), BASE, SIZE)
            .map_err(|e| err(e.to_string()))?;
        ram.insert_region(region).map_err(|e| err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x2,
            ..Default::default()
        }
    }

    #[test]
    fn int3_advances_and_injects_breakpoint() {
        let mut r = regs();
        assert_eq!(
            emulate(&[0xcc, 0x90], 64, &mut r).unwrap(),
            (Effect::InjectException(3), "int3")
        );
        assert_eq!(r.rip, 0xffff_ffff_8100_0001);
    }

    #[test]
    fn clac_stac_toggle_ac() {
        let mut r = regs();
        assert_eq!(
            emulate(&[0x0f, 0x01, 0xcb], 64, &mut r).unwrap().0,
            Effect::Done
        ); // stac
        assert_ne!(r.rflags & RFLAGS_AC, 0);
        assert_eq!(r.rip, 0xffff_ffff_8100_0003);
        emulate(&[0x0f, 0x01, 0xca], 64, &mut r).unwrap(); // clac
        assert_eq!(r.rflags & RFLAGS_AC, 0);
        assert_eq!(r.rip, 0xffff_ffff_8100_0006);
    }

    #[test]
    fn fwait_is_a_no_op() {
        let mut r = regs();
        let before = r;
        assert_eq!(
            emulate(&[0x9b], 64, &mut r).unwrap(),
            (Effect::Done, "fwait")
        );
        assert_eq!(r.rip, before.rip + 1);
        assert_eq!(r.rax, before.rax);
    }

    #[test]
    fn popcnt_register_forms() {
        // popcnt rax, rbx
        let mut r = regs();
        r.rbx = 0xf0f0_0000_0000_0001;
        r.rflags |= RFLAGS_CF | RFLAGS_ZF;
        emulate(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3], 64, &mut r).unwrap();
        assert_eq!(r.rax, 9);
        assert_eq!(r.rflags & (RFLAGS_CF | RFLAGS_ZF), 0);
        assert_eq!(r.rip, 0xffff_ffff_8100_0005);
        // popcnt ecx, edx with a zero source: ZF set, upper half of rcx cleared
        let mut r = regs();
        r.rcx = u64::MAX;
        r.rdx = 0xffff_ffff_0000_0000;
        emulate(&[0xf3, 0x0f, 0xb8, 0xca], 64, &mut r).unwrap();
        assert_eq!(r.rcx, 0);
        assert_ne!(r.rflags & RFLAGS_ZF, 0);
        // popcnt r9w, r10w keeps the upper bits of r9
        let mut r = regs();
        r.r9 = 0x1234_5678_0000_ffff;
        r.r10 = 0xffff_ffff_ffff_0007;
        emulate(&[0x66, 0xf3, 0x45, 0x0f, 0xb8, 0xca], 64, &mut r).unwrap();
        assert_eq!(r.r9, 0x1234_5678_0000_0003);
    }

    #[test]
    fn popcnt_from_memory_and_others_are_refused_by_name() {
        let mut r = regs();
        // popcnt rax, [rbx]
        let e = emulate(&[0xf3, 0x48, 0x0f, 0xb8, 0x03], 64, &mut r).unwrap_err();
        assert!(e.text.starts_with("popcnt"), "{e}");
        assert_eq!(e.bytes, "f3 48 0f b8 03");
        assert_eq!(r, regs(), "registers untouched on failure");
        // xrstor [rdi]
        let e = emulate(&[0x0f, 0xae, 0x2f], 64, &mut r).unwrap_err();
        assert!(e.text.starts_with("xrstor"), "{e}");
        assert!(e.to_string().contains("0xffffffff81000000"));
        // garbage
        let e = emulate(&[0x0f, 0x0b], 64, &mut r).unwrap_err();
        assert_eq!(e.text, "ud2");
        let e = emulate(&[0x0f], 64, &mut r).unwrap_err();
        assert_eq!(e.text, "invalid");
    }

    #[test]
    fn rdrand_fills_the_register_and_sets_cf() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let mut r = regs();
            r.rflags |= RFLAGS_ZF;
            // rdrand rax
            assert_eq!(
                emulate(&[0x48, 0x0f, 0xc7, 0xf0], 64, &mut r).unwrap(),
                (Effect::Done, "rdrand")
            );
            assert_ne!(r.rflags & RFLAGS_CF, 0);
            assert_eq!(r.rflags & RFLAGS_ZF, 0);
            assert_eq!(r.rip, 0xffff_ffff_8100_0004);
            seen.insert(r.rax);
        }
        assert!(seen.len() > 1, "values must differ");
        // rdrand ecx: 32-bit write zero-extends
        let mut r = regs();
        r.rcx = u64::MAX;
        emulate(&[0x0f, 0xc7, 0xf1], 64, &mut r).unwrap();
        assert_eq!(r.rcx >> 32, 0);
        // rdrand dx keeps the upper bits
        let mut r = regs();
        r.rdx = 0xaaaa_bbbb_cccc_0000;
        emulate(&[0x66, 0x0f, 0xc7, 0xf2], 64, &mut r).unwrap();
        assert_eq!(r.rdx & !0xffff, 0xaaaa_bbbb_cccc_0000);
    }

    #[test]
    fn code_window_writes_are_what_the_vcpu_fetches() {
        use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut bus = crate::devices::Bus::new();
        let fetch = code_window::attach(&ram, &mut bus).unwrap();
        // The guest's MMIO writes (stac) land where the vCPU loop reads.
        bus.write(code_window::BASE, &[0x0f, 0x01]);
        bus.write(code_window::BASE + 2, &[0xcb]);
        let mut b = [0u8; 3];
        fetch
            .read_slice(&mut b, GuestAddress(code_window::BASE))
            .unwrap();
        assert_eq!(b, [0x0f, 0x01, 0xcb]);
        let mut back = [0u8; 1];
        bus.read(code_window::BASE + 2, &mut back);
        assert_eq!(back, [0xcb]);
        // RAM is still there; KVM's view (`ram`) has no window.
        assert!(fetch.address_in_range(GuestAddress(0xfff0)));
        assert!(!ram.address_in_range(GuestAddress(code_window::BASE)));
        let mut r = regs();
        r.rip = code_window::BASE;
        assert_eq!(emulate(&b, 32, &mut r).unwrap(), (Effect::Done, "stac"));
        assert_eq!(r.rip, code_window::BASE + 3);
    }

    #[test]
    fn thirty_two_bit_mode_wraps_rip() {
        let mut r = kvm_regs {
            rip: 0xffff_ffff,
            ..Default::default()
        };
        emulate(&[0x9b], 32, &mut r).unwrap();
        assert_eq!(r.rip, 0);
    }
}
