//! Fuzzes the virtio-vsock packet path: the input is a script of guest TX
//! packets (descriptor layout, header and payload bytes), guest RX drains,
//! host-side actions (accept, write, close) and host CONNECT lines, played
//! against a real muxer on Unix sockets in a scratch directory (some input
//! bits steer headers and lines towards valid values, so fuzzing reaches
//! live connections in both directions). Packet parsing, validation,
//! routing and the connection state machine must never panic, and every
//! packet handed to the guest must be well formed.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::virtio::vsock::packet::{
    read_tx_packet, rx_payload_room, write_rx_packet, Desc, Header, HDR_SIZE, HOST_CID,
    MAX_PKT_PAYLOAD, TYPE_STREAM,
};
use locald_vmm::devices::virtio::vsock::{Muxer, MuxerConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST: u64 = 3;
/// The one guest-reachable host port: `<uds>_5` listens.
const HOST_PORT: u32 = 5;
const MEM: u64 = 0x10_0000;
const BUF_ALLOC: u32 = 64 * 1024;

struct Env {
    uds: PathBuf,
    host: UnixListener,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vsock-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let mut p = uds.clone().into_os_string();
        p.push(format!("_{HOST_PORT}"));
        let host = UnixListener::bind(PathBuf::from(p)).unwrap();
        host.set_nonblocking(true).unwrap();
        Env { uds, host }
    })
}

/// A cursor over the fuzz input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn accept_all(host: &UnixListener, streams: &mut Vec<UnixStream>) {
    while let Ok((s, _)) = host.accept() {
        let _ = s.set_nonblocking(true);
        if streams.len() < 64 {
            streams.push(s);
        }
    }
}

/// Checks and delivers everything the muxer has for the guest into RX
/// buffers of `room` bytes.
fn drain(mem: &GuestMemoryMmap, muxer: &mut Muxer, room: usize) {
    let descs = [Desc {
        addr: GuestAddress(0x8_0000),
        len: (HDR_SIZE + room) as u32,
        write_only: true,
    }];
    let room = rx_payload_room(mem, &descs).expect("valid RX chain");
    let mut buf = vec![0u8; room];
    for _ in 0..256 {
        let Some((h, n)) = muxer.recv_pkt(&mut buf) else {
            break;
        };
        assert_eq!(
            (h.src_cid, h.dst_cid, h.type_),
            (HOST_CID, GUEST, TYPE_STREAM)
        );
        assert!((1..=7).contains(&h.op), "op {}", h.op);
        assert!(n <= buf.len() && h.len as usize == n);
        assert!(n == 0 || h.op == 5, "payload on op {}", h.op);
        let written = write_rx_packet(mem, &descs, &h, &buf[..n]).expect("fits");
        assert_eq!(written as usize, HDR_SIZE + n);
    }
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let mut stale = Vec::new();
    accept_all(&env.host, &mut stale);
    drop(stale);
    let cfg = MuxerConfig {
        buf_alloc: BUF_ALLOC,
        connect_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(5),
        max_connections: 64,
        max_guest_connections: 48,
    };
    let mut muxer = Muxer::new(GUEST, env.uds.clone(), cfg).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut host_streams: Vec<UnixStream> = Vec::new();
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut payload = Vec::new();
    let mut input = Input(data);

    while let Some(kind) = input.byte() {
        match kind % 5 {
            // A guest TX packet.
            0 | 1 => {
                let Some(nd) = input.byte() else { break };
                let Some(fix) = input.byte() else { break };
                let mut descs = Vec::new();
                for i in 0..(nd % 4 + 1) as u64 {
                    let (Some(len), Some(fl)) = (input.u16(), input.byte()) else {
                        break;
                    };
                    let addr = if fl & 2 != 0 { MEM - 8 } else { i * 0x1_0000 };
                    descs.push(Desc {
                        addr: GuestAddress(addr),
                        len: u32::from(len),
                        write_only: fl & 1 != 0,
                    });
                }
                let Some(body_len) = input.u16() else { break };
                let mut body = input.bytes(usize::from(body_len)).to_vec();
                // Optionally make the header plausible, so packets get past
                // validation and reach connections.
                if body.len() >= HDR_SIZE && fix & 1 != 0 {
                    let mut h = Header::from_bytes(body[..HDR_SIZE].try_into().unwrap());
                    h.src_cid = GUEST;
                    h.dst_cid = HOST_CID;
                    h.type_ = TYPE_STREAM;
                    h.op = h.op % 8;
                    if fix & 2 != 0 {
                        // Guest-initiated: to the listening host port.
                        h.dst_port = HOST_PORT;
                        h.src_port %= 4;
                    } else if fix & 8 != 0 {
                        // Host-initiated: the muxer's first local ports,
                        // from the guest ports CONNECT lines ask for.
                        h.dst_port = (1 << 30) + h.dst_port % 4;
                        h.src_port %= 8;
                    }
                    if fix & 4 != 0 {
                        h.len = (body.len() - HDR_SIZE) as u32;
                    }
                    body[..HDR_SIZE].copy_from_slice(&h.to_bytes());
                }
                // Lay the body over the descriptors, in order.
                let mut rest: &[u8] = &body;
                for d in &descs {
                    let n = (d.len as usize).min(rest.len());
                    let _ = mem.write_slice(&rest[..n], d.addr);
                    rest = &rest[n..];
                }
                match read_tx_packet(&mem, descs.iter().copied(), &mut payload) {
                    Ok(h) => {
                        assert_eq!(payload.len(), h.len as usize);
                        assert!(payload.len() <= MAX_PKT_PAYLOAD);
                        muxer.send_pkt(&h, &payload);
                    }
                    Err(e) => {
                        if let Some(h) = e.header() {
                            muxer.reject_pkt(h);
                        }
                    }
                }
                accept_all(&env.host, &mut host_streams);
            }
            // The guest takes packets.
            2 => {
                let room = usize::from(input.byte().unwrap_or(16)) * 64;
                drain(&mem, &mut muxer, room);
            }
            // The host acts on one of its streams.
            3 => {
                let (Some(which), Some(what)) = (input.byte(), input.byte()) else {
                    break;
                };
                accept_all(&env.host, &mut host_streams);
                let all = host_streams.len() + clients.len();
                if all > 0 {
                    let i = usize::from(which) % all;
                    let s = if i < host_streams.len() {
                        &mut host_streams[i]
                    } else {
                        &mut clients[i - host_streams.len()]
                    };
                    match what % 4 {
                        0 => {
                            let n = usize::from(what);
                            let _ = s.write(input.bytes(n));
                        }
                        1 => {
                            let mut b = [0u8; 4096];
                            let _ = s.read(&mut b);
                        }
                        2 => {
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        }
                        _ => {
                            if i < host_streams.len() {
                                host_streams.swap_remove(i);
                            } else {
                                clients.swap_remove(i - host_streams.len());
                            }
                        }
                    }
                }
                muxer.process_events();
                muxer.process_events();
            }
            // A host client connects and sends (part of) a CONNECT line.
            _ => {
                let sel = input.byte().unwrap_or(0);
                let line = if sel & 0x80 != 0 {
                    format!("CONNECT {}\n", sel & 7).into_bytes()
                } else {
                    input.bytes(usize::from(sel % 40)).to_vec()
                };
                if clients.len() < 16 {
                    if let Ok(mut c) = UnixStream::connect(&env.uds) {
                        let _ = c.set_nonblocking(true);
                        let _ = c.write(&line);
                        clients.push(c);
                    }
                }
                muxer.process_events();
                muxer.process_events();
            }
        }
        assert!(muxer.buffered_bytes() <= BUF_ALLOC as usize * muxer.connection_count());
    }
    drain(&mem, &mut muxer, 4096);
});
