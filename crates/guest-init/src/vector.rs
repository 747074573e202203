//! Vector state that the guest kernel does not preserve (runs on init's
//! main thread, once at start).
//!
//! On a software KVM (PVM) the guest kernel does not use XSAVE (the VMM
//! passes `clearcpuid=xsave`: KVM's instruction emulator has no `xrstor`),
//! so it saves only the FXSAVE state (x87, XMM0-15) of a task at a context
//! switch. Guest user mode, though, runs natively under the host's CR4 and
//! XCR0 there: `cpuid` reports OSXSAVE and AVX, `xgetbv` the host's AVX
//! (and AVX-512) state, and glibc picks its AVX2/EVEX string functions,
//! whose YMM/ZMM registers then leak between processes sharing a vCPU
//! (docs/software-kvm.md, "Vector state"; a busybox pipeline crashed on an
//! AVX-512 host). When init finds that mismatch it adds
//! [`GLIBC_NO_AVX_TUNABLES`] to every command's environment ([`add_tunables`]), so glibc keeps
//! to its SSE code, and first re-executes itself with them
//! ([`reexec_init_if_needed`]): init (the agent, which copies every byte
//! of a command's output) is a glibc program too, and lost 16-byte halves
//! of its 32-byte AVX2 copies that way. Programs that use AVX without
//! glibc's dispatch are not covered.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStringExt;

/// Keeps glibc (2.33 and later) off every AVX-family code path.
pub const GLIBC_NO_AVX_TUNABLES: (&[u8], &[u8]) = (
    b"GLIBC_TUNABLES",
    b"glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,\
-FMA,-FMA4,-F16C,-AVX_Fast_Unaligned_Load",
);

/// Adds [`GLIBC_NO_AVX_TUNABLES`] to `env`: as the variable, or appended
/// to a `GLIBC_TUNABLES` the user set, unless that already sets
/// `glibc.cpu.hwcaps` (the user's choice wins).
pub fn add_tunables(env: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    let (key, ours) = GLIBC_NO_AVX_TUNABLES;
    match env.iter_mut().find(|(k, _)| k == key) {
        None => env.push((key.to_vec(), ours.to_vec())),
        Some((_, v)) if v.windows(17).any(|w| w == b"glibc.cpu.hwcaps=") => {}
        Some((_, v)) if v.is_empty() => *v = ours.to_vec(),
        Some((_, v)) => {
            v.push(b':');
            v.extend_from_slice(ours);
        }
    }
}

/// Makes init itself keep glibc off AVX: if this machine needs it
/// ([`unmanaged_here`], after mounting `/proc` to read the kernel's flags)
/// and init's own environment lacks the tunables, re-executes itself (the
/// path `/proc/self/exe` links to) with them added (PID 1 stays PID 1; glibc reads the
/// tunables only at program start). Returns if no re-exec is needed or it
/// failed (logged): init then goes on as before. Called first thing, before
/// any I/O port or mount other than `/proc`.
pub fn reexec_init_if_needed() {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
        .map(|(k, v)| (k.into_vec(), v.into_vec()))
        .collect();
    let before = env.clone();
    // EBUSY (already mounted) and other failures just mean no check.
    // SAFETY: NUL-terminated literals; mounting proc on the initramfs' /proc.
    unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    add_tunables(&mut env);
    if env == before || !unmanaged_here() {
        return;
    }
    let argv: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.into_vec()).ok())
        .collect();
    let envp = crate::spec::envp(&env);
    let ptrs = |v: &[CString]| {
        let mut p: Vec<*const libc::c_char> = v.iter().map(|c| c.as_ptr()).collect();
        p.push(std::ptr::null());
        p
    };
    let (argv_p, envp_p) = (ptrs(&argv), ptrs(&envp));
    // The real path (`/init`), so the process name stays `init`, not `exe`.
    let path = std::fs::read_link("/proc/self/exe")
        .ok()
        .and_then(|p| CString::new(p.into_os_string().into_vec()).ok())
        .unwrap_or_else(|| c"/proc/self/exe".to_owned());
    // SAFETY: NULL-terminated arrays of NUL-terminated strings that outlive
    // the call; execve returns only on failure.
    unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
    crate::console::error("re-exec with GLIBC_TUNABLES", io::Error::last_os_error());
}

/// True when user mode can hold AVX state (CPUID.1:ECX OSXSAVE and AVX set,
/// XCR0 with the SSE and AVX bits) but the kernel, by its `/proc/cpuinfo`
/// `flags` line (`kernel_flags`), does not use XSAVE to preserve it.
/// (x86 only; pure, so it is built and tested everywhere.)
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub fn unmanaged(cpuid1_ecx: u32, xcr0: u64, kernel_flags: &str) -> bool {
    const OSXSAVE: u32 = 1 << 27;
    const AVX: u32 = 1 << 28;
    let user_avx = cpuid1_ecx & OSXSAVE != 0 && cpuid1_ecx & AVX != 0 && xcr0 & 0b110 == 0b110;
    let kernel_xsave = kernel_flags.split_ascii_whitespace().any(|f| f == "xsave");
    user_avx && !kernel_xsave
}

/// [`unmanaged`] for this machine (false if `/proc/cpuinfo` cannot be read).
#[cfg(target_arch = "x86_64")]
pub fn unmanaged_here() -> bool {
    let ecx = core::arch::x86_64::__cpuid(1).ecx;
    let xcr0 = if ecx & (1 << 27) != 0 {
        let (lo, hi): (u32, u32);
        // SAFETY: OSXSAVE is set, so XGETBV with ECX = 0 is defined; it
        // only reads XCR0 into EDX:EAX.
        unsafe {
            core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        u64::from(hi) << 32 | u64::from(lo)
    } else {
        0
    };
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = flags
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .unwrap_or_default();
    !flags.is_empty() && unmanaged(ecx, xcr0, flags)
}

/// Other architectures have no such mismatch.
#[cfg(not(target_arch = "x86_64"))]
pub fn unmanaged_here() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const OSXSAVE_AVX: u32 = (1 << 27) | (1 << 28);

    #[test]
    fn only_user_avx_without_kernel_xsave_is_unmanaged() {
        // Software KVM: host XCR0 in user mode, kernel told clearcpuid=xsave.
        assert!(unmanaged(OSXSAVE_AVX, 0x207, ": fpu sse sse2 hypervisor"));
        // Hardware KVM or bare metal: the kernel uses XSAVE.
        assert!(!unmanaged(OSXSAVE_AVX, 0x207, ": fpu sse xsave avx"));
        // No AVX state in XCR0, no OSXSAVE, or no AVX: nothing to protect.
        assert!(!unmanaged(OSXSAVE_AVX, 0x3, ": fpu sse"));
        assert!(!unmanaged(1 << 28, 0, ": fpu sse"));
        assert!(!unmanaged(1 << 27, 0x207, ": fpu sse"));
        // A flag that merely contains the word is not xsave.
        assert!(unmanaged(OSXSAVE_AVX, 0xe7, ": xsaveopt xsaveerptr"));
    }

    #[test]
    fn tunables_are_added_or_appended_but_never_override_the_user() {
        let ours = GLIBC_NO_AVX_TUNABLES.1.to_vec();
        let get = |env: &[(Vec<u8>, Vec<u8>)]| {
            env.iter()
                .find(|(k, _)| k == b"GLIBC_TUNABLES")
                .map(|(_, v)| v.clone())
        };
        let mut env = vec![(b"PATH".to_vec(), b"/bin".to_vec())];
        add_tunables(&mut env);
        assert_eq!(get(&env), Some(ours.clone()));
        let mut env = vec![(b"GLIBC_TUNABLES".to_vec(), b"glibc.malloc.check=3".to_vec())];
        add_tunables(&mut env);
        let mut want = b"glibc.malloc.check=3:".to_vec();
        want.extend_from_slice(&ours);
        assert_eq!(get(&env), Some(want));
        let mine = b"glibc.cpu.hwcaps=-AVX512F".to_vec();
        let mut env = vec![(b"GLIBC_TUNABLES".to_vec(), mine.clone())];
        add_tunables(&mut env);
        assert_eq!(get(&env), Some(mine));
    }

    #[test]
    fn the_tunables_switch_off_every_avx_family_hwcap() {
        let v = std::str::from_utf8(GLIBC_NO_AVX_TUNABLES.1).unwrap();
        let list = v.strip_prefix("glibc.cpu.hwcaps=").unwrap();
        for f in ["AVX", "AVX2", "AVX512F", "AVX512VL", "AVX512BW", "FMA"] {
            assert!(list.split(',').any(|x| x == format!("-{f}")), "{f}");
        }
        assert!(!v.contains(' ') && !v.contains('\n'));
    }
}
