//! Fuzzes virtio-fs request parsing end to end without KVM: the input is
//! split into FUSE messages (each preceded by a 2-byte reply-buffer size);
//! each one is placed in guest memory as a readable descriptor followed by a
//! writable reply descriptor and served by the device's own queue function
//! (`process_queue`, what its worker thread runs) with the confined
//! passthrough file system over a scratch directory. The first message is an
//! INIT unless the control byte says otherwise. Every input gets a fresh
//! share (fixture files recreated, a new `ShareFs`, so its inode and handle
//! bounds start empty and earlier inputs cannot delete the fixtures).
//! Oracles: no panic, no hang, the sentinel file next to (outside) the
//! share is never changed or removed, and no reply carries the sentinel's
//! bytes (unless the input itself contains them: the guest may write any
//! bytes into a share file and read them back).

#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::virtio::fs::{
    process_queue, FsServer, ShareCache, ShareFs, ShareFsOptions,
};
use locald_vmm::devices::virtio::Warned;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x4_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const MSG: u64 = 0x1_0000;
const REPLY: u64 = 0x2_0000;
const SENTINEL: &[u8] = b"locald-fuzz: outside the share, 7f3a9c1e5d\n";
const REPLY_MAX: usize = 0x1_0000;

/// A fresh scratch tree for one input: base/{sentinel, share/{file, dir/,
/// up -> ../sentinel}}; removed when dropped.
struct Env {
    base: PathBuf,
    server: FsServer,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn env() -> Env {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("locald-fuzz-fs-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let share = base.join("share");
    std::fs::create_dir_all(share.join("dir")).unwrap();
    std::fs::write(share.join("file"), b"hello").unwrap();
    std::fs::write(base.join("sentinel"), SENTINEL).unwrap();
    let _ = std::os::unix::fs::symlink("../sentinel", share.join("up"));
    let mut opts = ShareFsOptions::new(&share, false, ShareCache::Auto);
    opts.max_inodes = 256;
    opts.max_handles = 64;
    let fs = ShareFs::new(opts).unwrap();
    Env {
        base,
        server: FsServer::new(Arc::new(fs)),
    }
}

/// Whether `data` holds 8 consecutive bytes of the sentinel (then a reply
/// may legitimately echo them).
fn input_has_sentinel_bytes(data: &[u8]) -> bool {
    data.windows(8).any(|w| SENTINEL.windows(8).any(|s| s == w))
}

/// The INIT a guest kernel sends: every flag offered. The flags include
/// `FUSE_INIT_EXT`, so `fuse_init_in`'s 48-byte extension (`flags2` and
/// reserved words) must follow, or the server fails to decode the message
/// and the session is never initialised.
fn init_message() -> Vec<u8> {
    let mut m = Vec::new();
    for v in [40u32 + 16 + 48, 26] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m.extend_from_slice(&1u64.to_le_bytes()); // unique
    m.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    m.extend_from_slice(&[0u8; 16]); // uid gid pid padding
    for v in [7u32, 31, 0x2_0000, 0xffff_ffff] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m.extend_from_slice(&[0u8; 48]); // flags2, unused[11]
    m
}

fn put_desc(mem: &GuestMemoryMmap, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let a = GuestAddress(DESC + i * 16);
    mem.write_obj(addr, a).unwrap();
    mem.write_obj(len, a.unchecked_add(8)).unwrap();
    mem.write_obj(flags, a.unchecked_add(12)).unwrap();
    mem.write_obj(next, a.unchecked_add(14)).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return;
    };
    let env = env();
    let check_echo = !input_has_sentinel_bytes(data);
    let windows: std::collections::HashSet<&[u8]> = SENTINEL.windows(8).collect();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let Ok(mut q) = Queue::new(16) else { return };
    q.set_size(16);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let mut messages: Vec<(Vec<u8>, u32)> = Vec::new();
    if ctl & 1 == 0 {
        messages.push((init_message(), 0x1000));
    }
    while rest.len() >= 2 && messages.len() < 8 {
        let reply = u32::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        // Message length from its own header when present, else the rest.
        let len = if rest.len() >= 4 {
            (u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize).min(rest.len())
        } else {
            rest.len()
        };
        let len = len.clamp(rest.len().min(1), 0x8000);
        messages.push((rest[..len].to_vec(), reply));
        rest = &rest[len..];
    }
    let mut warned = Warned::default();
    for (i, (msg, reply)) in messages.iter().enumerate() {
        mem.write_slice(msg, GuestAddress(MSG)).unwrap();
        let has_reply = *reply != 0;
        put_desc(
            &mem,
            0,
            MSG,
            msg.len() as u32,
            if has_reply { 1 } else { 0 },
            1,
        );
        put_desc(&mem, 1, REPLY, (*reply).min(REPLY_MAX as u32), 2, 0);
        let slot = i as u64 % 16;
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + slot * 2))
            .unwrap();
        mem.write_obj((i + 1) as u16, GuestAddress(AVAIL + 2))
            .unwrap();
        let _ = process_queue(&mut q, &mem, &env.server, &mut warned);
        if check_echo {
            // The reply the device wrote: its length from the used ring.
            let used_len: u32 = mem
                .read_obj(GuestAddress(USED + 4 + slot * 8 + 4))
                .unwrap_or(0);
            let n = (used_len as usize).min(REPLY_MAX);
            let mut reply = vec![0u8; n];
            mem.read_slice(&mut reply, GuestAddress(REPLY)).unwrap();
            assert!(
                !reply.windows(8).any(|w| windows.contains(w)),
                "a reply carries the bytes of the file outside the share"
            );
            mem.write_slice(&vec![0u8; n], GuestAddress(REPLY)).unwrap();
        }
    }
    let sentinel =
        std::fs::read(env.base.join("sentinel")).expect("sentinel outside the share removed");
    assert_eq!(sentinel, SENTINEL, "sentinel outside the share changed");
});
