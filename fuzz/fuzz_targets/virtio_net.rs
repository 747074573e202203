//! Fuzzes virtio-net queue handling without KVM: the input becomes guest
//! memory (descriptor tables, avail rings, packet headers and frames), the
//! layout of both queues, the negotiated features and the frames an
//! in-memory backend hands the device. The device's own queue functions
//! (`process_tx`, `process_rx`, what its worker thread runs) then parse,
//! validate and place everything. They must never panic, touch memory
//! outside the guest, or loop forever; every frame that reaches the
//! backend must have passed the header check.

#![no_main]

use std::collections::VecDeque;
use std::io;

use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::virtio::net::header::{self, features as f};
use locald_vmm::devices::virtio::net::{
    process_rx, process_tx, NetBackend, Offloads, RxState, TxState,
};
use locald_vmm::devices::virtio::{Warned, COMMON_FEATURES};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x1_0000;

struct Fake {
    inbox: VecDeque<Vec<u8>>,
    features: u64,
    blocked_after: usize,
    sent: usize,
}

impl NetBackend for Fake {
    fn describe(&self) -> String {
        "fuzz".into()
    }
    fn fd(&self) -> std::os::fd::RawFd {
        -1
    }
    fn offloads(&self) -> Offloads {
        Offloads {
            host: true,
            guest: true,
        }
    }
    fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        assert!(header::check_tx(packet, self.features).is_ok());
        assert!(packet.len() <= header::max_tx_packet(self.features));
        self.sent += 1;
        Ok(())
    }
    fn tx_blocked(&self) -> bool {
        self.sent >= self.blocked_after
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.inbox.pop_front() {
            Some(p) => {
                let n = p.len().min(buf.len());
                buf[..n].copy_from_slice(&p[..n]);
                Ok(Some(n))
            }
            None => Ok(None),
        }
    }
}

fn queue(mem: &GuestMemoryMmap, c: &[u8]) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.set_size(1u16 << (c[0] % 9));
    q.set_desc_table_address(Some(u32::from(c[1]) << 8), Some(0));
    q.set_avail_ring_address(Some(u32::from(c[2]) << 8), Some(0));
    q.set_used_ring_address(Some(u32::from(c[3]) << 8), Some(0));
    q.set_event_idx(c[4] & 1 != 0);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (ctl, rest) = data.split_at(16);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&rest[..rest.len().min(MEM)], GuestAddress(0));
    let mut features = COMMON_FEATURES;
    for (bit, flag) in [
        (0, f::MRG_RXBUF),
        (1, f::CSUM),
        (2, f::HOST_TSO4),
        (3, f::HOST_TSO6),
        (4, f::HOST_ECN),
        (5, f::GUEST_CSUM),
    ] {
        if ctl[10] >> bit & 1 != 0 {
            features |= flag;
        }
    }
    // Frames from the "host": slices of the input, sizes from ctl.
    let mut inbox = VecDeque::new();
    let mut off = 0usize;
    for i in 0..(ctl[11] % 8) as usize {
        let len = (usize::from(ctl[12 + i % 4]) * 37) % 9000 + 1;
        let start = off % rest.len().max(1);
        let mut p = rest.get(start..).unwrap_or_default().to_vec();
        p.resize(len, 0x5a);
        inbox.push_back(p);
        off += len;
    }
    let mut be = Fake {
        inbox,
        features,
        blocked_after: usize::from(ctl[13] % 8) + 1,
        sent: 0,
    };
    let mut w = Warned::default();
    if let Some(mut txq) = queue(&mem, &ctl[0..5]) {
        let mut st = TxState::new(features);
        let _ = process_tx(&mut txq, &mem, &mut be, &mut st, &mut w);
        be.blocked_after = usize::MAX;
        let _ = process_tx(&mut txq, &mem, &mut be, &mut st, &mut w);
    }
    if let Some(mut rxq) = queue(&mem, &ctl[5..10]) {
        let mut st = RxState::new(features);
        let _ = process_rx(&mut rxq, &mem, &mut be, &mut st, &mut w);
        st.readable = true;
        let _ = process_rx(&mut rxq, &mem, &mut be, &mut st, &mut w);
    }
});
