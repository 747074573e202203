//! The clone refresh of a guest restored from a snapshot
//! ([`locald_agent_proto::Frame::Refresh`]): the host's entropy goes into
//! the kernel's pool and the CRNG is reseeded at once (two restores of one
//! snapshot must not draw the same random numbers), the wall clock is set
//! to the host's, and the hostname changes if the host gives one. Runs in
//! the agent's connection handler process (root), before the host lets
//! any command run. Shares given with it are mounted (a warm guest's
//! shares are bound after the restore).

use std::io;
use std::os::fd::AsRawFd;

use locald_agent_proto::Refresh;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Longest hostname Linux takes.
const HOST_NAME_MAX: usize = 64;

/// The `rand_pool_info` of `RNDADDENTROPY`: entropy bits credited, buffer
/// length in bytes, then the bytes (u32-aligned).
pub fn pool_info(entropy: &[u8]) -> Vec<u32> {
    let words = entropy.len().div_ceil(4);
    let mut v = vec![0u32; 2 + words];
    v[0] = (entropy.len() * 8) as u32;
    v[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        v[2 + i] = u32::from_ne_bytes(w);
    }
    v
}

/// Applies `r`; the first failure is returned with what failed.
pub fn apply(r: &Refresh) -> Result<(), String> {
    if !r.entropy.is_empty() {
        add_entropy(&r.entropy).map_err(|e| format!("adding entropy: {e}"))?;
    }
    if r.time_ns > 0 {
        let ts = libc::timespec {
            tv_sec: (r.time_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (r.time_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec for the duration of the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(format!("setting the clock: {}", io::Error::last_os_error()));
        }
    }
    if !r.shares.is_empty() {
        let shares =
            locald_guest_spec::shares::decode(&r.shares).map_err(|e| format!("shares: {e}"))?;
        for s in &shares {
            crate::shares::mount(s).map_err(|e| {
                format!(
                    "mounting share {} at {}: {e}",
                    String::from_utf8_lossy(&s.tag),
                    String::from_utf8_lossy(&s.path)
                )
            })?;
        }
    }
    if let Some(h) = &r.hostname {
        if h.is_empty() || h.len() > HOST_NAME_MAX || h.contains(&0) {
            return Err(format!("invalid hostname ({} bytes)", h.len()));
        }
        // SAFETY: the pointer and length describe the live slice `h`.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
            return Err(format!(
                "setting the hostname: {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")?;
    let info = pool_info(bytes);
    // SAFETY: `info` is a complete rand_pool_info (header + buf_size bytes)
    // that lives for the call; the kernel only reads it.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_carries_bits_length_and_bytes() {
        let v = pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(v[0], 40);
        assert_eq!(v[1], 5);
        assert_eq!(v[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(v[3], u32::from_ne_bytes([5, 0, 0, 0]));
        assert_eq!(pool_info(&[]), vec![0, 0]);
    }

    #[test]
    fn bad_hostnames_are_refused_before_any_call() {
        for h in [Vec::new(), vec![b'a'; 65], b"a\0b".to_vec()] {
            let r = Refresh {
                hostname: Some(h),
                ..Default::default()
            };
            assert!(apply(&r).unwrap_err().contains("invalid hostname"));
        }
    }
}
