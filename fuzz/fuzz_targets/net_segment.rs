//! Fuzzes the software completion of guest transmit offloads
//! (`devices::virtio::net::segment::complete`, what the passt backend runs
//! on every guest packet): a virtio-net header and an Ethernet frame,
//! either raw bytes or an IPv4/IPv6 TCP packet whose header fields,
//! options and payload come from the input (so the segmentation path is
//! reached, not only the parsers' refusals).
//!
//! Oracles, besides "no panic":
//! - the count returned is the number of frames emitted; an error emits
//!   nothing;
//! - a packet without offloads comes out unchanged;
//! - every emitted TCP segment (segmentation or checksum-only on a
//!   well-formed packet) carries a TCP checksum that verifies against its
//!   pseudo-header, and an IPv4 header checksum that verifies;
//! - segmentation keeps the payload: the segments' payloads, in order,
//!   are the original payload, each at most `gso_size` bytes.

#![no_main]

#[path = "common.rs"]
mod common;

use common::Input;
use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::virtio::net::header::HDR_LEN;
use locald_vmm::devices::virtio::net::segment::complete;

fn sum16(b: &[u8], mut acc: u64) -> u64 {
    let mut it = b.chunks_exact(2);
    for w in &mut it {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [x] = it.remainder() {
        acc += u64::from(*x) << 8;
    }
    acc
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Builds header + frame of a TCP packet from the input.
fn tcp_packet(inp: &mut Input, v4: bool) -> (Vec<u8>, usize, u16) {
    let gso_size = inp.u16() % 3000;
    let opts = usize::from(inp.u8() % 11) * 4;
    let plen = usize::from(inp.u16()) % 70_000;
    let payload: Vec<u8> = (0..plen).map(|i| (i as u8) ^ 0x5a).collect();
    let mut f = vec![0u8; 12];
    f.extend_from_slice(inp.bytes(12));
    f.resize(12, 0);
    f.extend_from_slice(&(if v4 { 0x0800u16 } else { 0x86dd }).to_be_bytes());
    let ip = f.len();
    let l4 = 20 + opts + plen;
    if v4 {
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0]);
        f[ip + 2..ip + 4].copy_from_slice(&((20 + l4) as u16).to_be_bytes());
        f.extend_from_slice(inp.bytes(8));
        f.resize(ip + 20, 0);
    } else {
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 6, 64]);
        f[ip + 4..ip + 6].copy_from_slice(&(l4 as u16).to_be_bytes());
        f.extend_from_slice(inp.bytes(32));
        f.resize(ip + 40, 0);
    }
    let tcp = f.len();
    f.extend_from_slice(inp.bytes(12));
    f.resize(tcp + 12, 0);
    f.push((((20 + opts) / 4) as u8) << 4);
    f.push(inp.u8());
    f.resize(tcp + 20 + opts, 1);
    f.extend_from_slice(&payload);
    // Field values a fuzzer would rarely guess: lengths that lie.
    if inp.u8() == 0 {
        let at = usize::from(inp.u16()) % f.len();
        f[at] = inp.u8();
    }
    let gso = match inp.u8() % 4 {
        0 => 0,
        1 => {
            if v4 {
                1
            } else {
                4
            }
        }
        2 => 0x81,
        _ => inp.u8(),
    };
    let mut p = vec![0u8; HDR_LEN];
    p[0] = 1;
    p[1] = gso;
    p[4..6].copy_from_slice(&gso_size.to_le_bytes());
    p[6..8].copy_from_slice(&(tcp as u16).to_le_bytes());
    p[8..10].copy_from_slice(&16u16.to_le_bytes());
    p.extend_from_slice(&f);
    (p, tcp, gso_size)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8() % 3;
    let (packet, tcp_at) = if mode == 0 {
        (inp.rest().to_vec(), None)
    } else {
        let (p, tcp, _) = tcp_packet(&mut inp, mode == 1);
        (p, Some(tcp))
    };
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let r = complete(&packet, |f| frames.push(f.to_vec()));
    match r {
        Err(_) => assert!(frames.is_empty(), "error after emitting"),
        Ok(n) => {
            assert_eq!(n, frames.len());
            let flags = packet[0];
            let gso = packet[1] & 0x7f;
            if flags == 0 && gso == 0 {
                assert_eq!(frames, vec![packet[HDR_LEN..].to_vec()]);
            }
            let Some(tcp) = tcp_at else { return };
            let original = &packet[HDR_LEN..];
            let v4 = original[12..14] == [0x08, 0x00];
            let doff = usize::from(original[tcp + 12] >> 4) * 4;
            let mut joined = Vec::new();
            for f in &frames {
                if f.len() < tcp + 20 {
                    // A checksum-only packet whose IP length lied.
                    assert_eq!(gso, 0);
                    continue;
                }
                if gso != 0 {
                    let ip_ok = if v4 {
                        fold(sum16(&f[14..34], 0)) == 0xffff
                    } else {
                        true
                    };
                    assert!(ip_ok, "IPv4 header checksum");
                    let l4 = (f.len() - tcp) as u64;
                    let pseudo = if v4 {
                        sum16(&f[26..34], 0)
                    } else {
                        sum16(&f[22..54], 0)
                    } + 6
                        + l4;
                    assert_eq!(fold(sum16(&f[tcp..], pseudo)), 0xffff, "TCP checksum");
                    let mss = usize::from(u16::from_le_bytes([packet[4], packet[5]])).max(1);
                    assert!(f.len() - tcp - doff <= mss);
                    joined.extend_from_slice(&f[tcp + doff..]);
                }
            }
            if gso != 0 {
                assert_eq!(joined, original[tcp + doff..], "payload kept");
            }
        }
    }
});
