//! Software completion of guest transmit offloads, for backends that carry
//! no virtio-net header (passt). The guest hands the device one large TCP
//! packet with a partial checksum (`NEEDS_CSUM`, `GSO_TCPV4/6`); here it
//! becomes the MSS-sized, fully checksummed frames a NIC would have put on
//! the wire. Under an emulated guest kernel this moves per-segment work
//! (headers, checksums, one virtqueue round trip each) out of the guest,
//! where every instruction is expensive, into the VMM.
//!
//! Pure functions on byte slices, run on the net device's worker thread.
//! The packet is guest-written: every length and offset is checked here
//! again (the guest's `hdr_len` is ignored; the headers are parsed), and a
//! packet that is not what its header claims is refused, never trusted.

use super::header::{
    NetHdr, ETH_HLEN, FLAG_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_LEN,
};

/// Why a packet's offloads could not be completed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("packet of {0} bytes is shorter than its headers")]
    Truncated(usize),
    #[error("segmentation requested for a frame that is not {0}")]
    NotTcp(&'static str),
    #[error("IPv6 extension headers (next header {0}) in a segmented packet")]
    Ipv6Extension(u8),
    #[error("IPv4 fragment in a segmented packet")]
    Fragment,
    #[error("IP length {0} disagrees with the {1}-byte frame")]
    IpLength(usize, usize),
    #[error("unsupported segmentation type {0:#x}")]
    GsoType(u8),
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Completes the offloads of one guest packet (a virtio-net header then an
/// Ethernet frame, as validated by [`super::header::check_tx`]) and hands
/// each resulting frame to `emit`. Returns the number of frames emitted.
/// A packet without offloads is emitted as it is.
pub fn complete(packet: &[u8], mut emit: impl FnMut(&[u8])) -> Result<usize, SegmentError> {
    let Some((hdr, frame)) = packet.split_first_chunk::<HDR_LEN>() else {
        return Err(SegmentError::Truncated(packet.len()));
    };
    let h = NetHdr::parse(hdr);
    match h.gso_type & !GSO_ECN {
        GSO_NONE => {
            if h.flags & FLAG_NEEDS_CSUM == 0 {
                emit(frame);
                return Ok(1);
            }
            let mut f = frame.to_vec();
            let start = usize::from(h.csum_start);
            let at = start + usize::from(h.csum_offset);
            if at + 2 > f.len() {
                return Err(SegmentError::Truncated(f.len()));
            }
            // The driver left the pseudo-header sum in the field: folding
            // everything from csum_start, field included, finishes it.
            let sum = fold(sum16(&f[start..], 0));
            f[at..at + 2].copy_from_slice(&finish(sum).to_be_bytes());
            emit(&f);
            Ok(1)
        }
        GSO_TCPV4 | GSO_TCPV6 => segment_tcp(frame, h, &mut emit),
        _ => Err(SegmentError::GsoType(h.gso_type)),
    }
}

/// Layout of a TCP frame: where the IP and TCP headers start and where the
/// payload begins.
struct Layout {
    ip: usize,
    v4: bool,
    tcp: usize,
    payload: usize,
}

fn parse_tcp(frame: &[u8], want_v4: bool) -> Result<Layout, SegmentError> {
    let short = || SegmentError::Truncated(frame.len());
    let be16 = |i: usize| -> Result<u16, SegmentError> {
        frame
            .get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(short)
    };
    let mut ip = ETH_HLEN;
    let mut ethertype = be16(12)?;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(16)?;
        ip += 4;
    }
    let (v4, tcp, ip_end) = match ethertype {
        ETHERTYPE_IPV4 if want_v4 => {
            let vihl = *frame.get(ip).ok_or_else(short)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(SegmentError::NotTcp("IPv4"));
            }
            if *frame.get(ip + 9).ok_or_else(short)? != IPPROTO_TCP {
                return Err(SegmentError::NotTcp("TCP over IPv4"));
            }
            // More-fragments or a fragment offset.
            if be16(ip + 6)? & 0x3fff != 0 {
                return Err(SegmentError::Fragment);
            }
            (true, ip + ihl, ip + usize::from(be16(ip + 2)?))
        }
        ETHERTYPE_IPV6 if !want_v4 => {
            if *frame.get(ip).ok_or_else(short)? >> 4 != 6 {
                return Err(SegmentError::NotTcp("IPv6"));
            }
            let next = *frame.get(ip + 6).ok_or_else(short)?;
            if next != IPPROTO_TCP {
                return Err(SegmentError::Ipv6Extension(next));
            }
            (false, ip + 40, ip + 40 + usize::from(be16(ip + 4)?))
        }
        _ => return Err(SegmentError::NotTcp(if want_v4 { "IPv4" } else { "IPv6" })),
    };
    // The IP length must cover exactly the frame (Ethernet padding cannot
    // occur on a packet this large, and anything else is a lie).
    if ip_end != frame.len() {
        return Err(SegmentError::IpLength(
            ip_end.saturating_sub(ip),
            frame.len(),
        ));
    }
    let doff = usize::from(*frame.get(tcp + 12).ok_or_else(short)? >> 4) * 4;
    if doff < 20 || tcp + doff > frame.len() {
        return Err(SegmentError::Truncated(frame.len()));
    }
    Ok(Layout {
        ip,
        v4,
        tcp,
        payload: tcp + doff,
    })
}

fn segment_tcp(
    frame: &[u8],
    h: NetHdr,
    emit: &mut impl FnMut(&[u8]),
) -> Result<usize, SegmentError> {
    let l = parse_tcp(frame, h.gso_type & !GSO_ECN == GSO_TCPV4)?;
    let mss = usize::from(h.gso_size).max(1);
    let payload = &frame[l.payload..];
    let headers = &frame[..l.payload];
    let seq0 = u32::from_be_bytes(frame[l.tcp + 4..l.tcp + 8].try_into().unwrap_or_default());
    let id0 = u16::from_be_bytes([frame[l.ip + 4], frame[l.ip + 5]]);
    let flags0 = frame[l.tcp + 13];
    let mut seg = Vec::with_capacity(headers.len() + mss.min(payload.len()));
    let chunks = payload.len().div_ceil(mss).max(1);
    for i in 0..chunks {
        let body = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        seg.clear();
        seg.extend_from_slice(headers);
        seg.extend_from_slice(body);
        let ip_len = seg.len() - l.ip;
        if l.v4 {
            seg[l.ip + 2..l.ip + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            seg[l.ip + 4..l.ip + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[l.ip + 10..l.ip + 12].fill(0);
            let c = finish(fold(sum16(&seg[l.ip..l.tcp], 0)));
            seg[l.ip + 10..l.ip + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            seg[l.ip + 4..l.ip + 6].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[l.tcp + 4..l.tcp + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < chunks {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        seg[l.tcp + 13] = flags;
        // A fresh checksum over the pseudo-header and the segment (the
        // guest's partial sum covered the whole packet's length).
        seg[l.tcp + 16..l.tcp + 18].fill(0);
        let tcp_len = seg.len() - l.tcp;
        let mut sum = if l.v4 {
            sum16(&seg[l.ip + 12..l.ip + 20], 0)
        } else {
            sum16(&seg[l.ip + 8..l.ip + 40], 0)
        };
        sum += u64::from(IPPROTO_TCP) + tcp_len as u64;
        let c = finish(fold(sum16(&seg[l.tcp..], sum)));
        seg[l.tcp + 16..l.tcp + 18].copy_from_slice(&c.to_be_bytes());
        emit(&seg);
    }
    Ok(chunks)
}

/// Ones'-complement sum of `b` as big-endian 16-bit words (an odd last
/// byte is padded with zero), added to `acc`; not yet folded.
fn sum16(b: &[u8], mut acc: u64) -> u64 {
    let mut words = b.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a running sum into 16 bits.
fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum field's value for a folded sum.
fn finish(s: u16) -> u16 {
    !s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden checksums, computed once outside this module by an
    /// independent RFC 1071 implementation (Python's `struct` over the
    /// same segments, rebuilt there from the packet description: see
    /// docs/virtio-net.md, "Tests"), as (IPv4 header, TCP) per segment.
    /// `tso4_splits_into_checksummed_mss_segments`: 4000 bytes, MSS 1448.
    const GOLDEN_TSO4: [(u16, u16); 3] = [(0x0ef2, 0xde52), (0x0ef1, 0xf747), (0x1048, 0x28dc)];
    /// `checksum_only_is_completed_in_place`.
    const GOLDEN_CSUM_ONLY: (u16, u16) = (0x1481, 0x02be);
    /// `tiny_mss_and_empty_payload_terminate`: FIN without payload.
    const GOLDEN_EMPTY_FIN: (u16, u16) = (0x149a, 0xeb4e);
    /// `tso6_splits_and_checksums`: TCP checksums of the three segments.
    const GOLDEN_TSO6: [u16; 3] = [0x3282, 0x0d79, 0xe86f];

    fn be16(f: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([f[at], f[at + 1]])
    }

    /// The pseudo-header partial sum a driver leaves in the TCP checksum
    /// field (folded, not inverted), computed here without the module's
    /// helpers.
    fn ref_partial(words: &[u8], extra: u32) -> u16 {
        let mut s = extra;
        for w in words.chunks(2) {
            s += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// The emitted IPv4 segment carries the golden checksums.
    fn verify_v4(f: &[u8], golden: (u16, u16)) {
        assert_eq!(be16(f, 24), golden.0, "IPv4 header checksum");
        assert_eq!(be16(f, 50), golden.1, "TCP checksum");
    }

    /// An Ethernet + IPv4 + TCP packet with `payload`, the TCP checksum
    /// field holding the pseudo-header partial sum, as Linux sends it.
    fn v4_packet(payload: &[u8], flags: u8, gso: u8, mss: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
        let tcp = &mut f[34..54];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        let ipc = !ref_partial(&f[14..34], 0);
        f[24..26].copy_from_slice(&ipc.to_be_bytes());
        f.extend_from_slice(payload);
        let partial = ref_partial(&f[26..34], 6 + (20 + payload.len()) as u32);
        f[50..52].copy_from_slice(&partial.to_be_bytes());
        let mut p = vec![0u8; HDR_LEN];
        p[0] = FLAG_NEEDS_CSUM;
        p[1] = gso;
        p[4..6].copy_from_slice(&mss.to_le_bytes());
        p[6..8].copy_from_slice(&34u16.to_le_bytes());
        p[8..10].copy_from_slice(&16u16.to_le_bytes());
        p.extend_from_slice(&f);
        p
    }

    #[test]
    fn tso4_splits_into_checksummed_mss_segments() {
        let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7 + 3) as u8).collect();
        let p = v4_packet(
            &payload,
            0x18 | TCP_FIN | TCP_CWR,
            GSO_TCPV4 | GSO_ECN,
            1448,
        );
        let mut out = Vec::new();
        let n = complete(&p, |f| out.push(f.to_vec())).unwrap();
        assert_eq!(n, 3);
        let mut joined = Vec::new();
        for (i, f) in out.iter().enumerate() {
            verify_v4(f, GOLDEN_TSO4[i]);
            let body = &f[54..];
            assert_eq!(body.len(), if i < 2 { 1448 } else { 4000 - 2 * 1448 });
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
            assert_eq!(u16::from_be_bytes([f[18], f[19]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes(f[38..42].try_into().unwrap());
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add(1448 * i as u32));
            let flags = f[47];
            assert_eq!(flags & TCP_FIN != 0, i == 2, "FIN only on the last");
            assert_eq!(flags & TCP_PSH != 0, i == 2, "PSH only on the last");
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
            assert!(flags & 0x10 != 0, "ACK on every segment");
            joined.extend_from_slice(body);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn tso6_splits_and_checksums() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut f = vec![0u8; 14 + 40 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f[14] = 0x60;
        f[18..20].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        f[20] = IPPROTO_TCP;
        f[21] = 64;
        f[22..38].copy_from_slice(&[0xfd; 16]);
        f[38..54].copy_from_slice(&[0xfe; 16]);
        f[54 + 12] = 5 << 4;
        f[54 + 13] = 0x10;
        f.extend_from_slice(&payload);
        let mut p = vec![0u8; HDR_LEN];
        p[0] = FLAG_NEEDS_CSUM;
        p[1] = GSO_TCPV6;
        p[4..6].copy_from_slice(&1000u16.to_le_bytes());
        p.extend_from_slice(&f);
        let mut out = Vec::new();
        assert_eq!(complete(&p, |f| out.push(f.to_vec())).unwrap(), 3);
        let mut joined = Vec::new();
        for (i, s) in out.iter().enumerate() {
            let tcp_len = s.len() - 54;
            assert_eq!(u16::from_be_bytes([s[18], s[19]]) as usize, tcp_len);
            assert_eq!(be16(s, 54 + 16), GOLDEN_TSO6[i], "TCP checksum");
            assert_eq!(
                u32::from_be_bytes(s[58..62].try_into().unwrap()),
                1000 * i as u32
            );
            joined.extend_from_slice(&s[74..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn checksum_only_is_completed_in_place() {
        let payload = b"hello, odd-length payload";
        let p = v4_packet(payload, 0x18, GSO_NONE, 0);
        let mut out = Vec::new();
        assert_eq!(complete(&p, |f| out.push(f.to_vec())).unwrap(), 1);
        verify_v4(&out[0], GOLDEN_CSUM_ONLY);
        assert_eq!(&out[0][54..], payload);
        // No offload at all: the frame goes out untouched.
        let mut plain = vec![0u8; HDR_LEN];
        plain.extend_from_slice(&[7u8; 60]);
        out.clear();
        complete(&plain, |f| out.push(f.to_vec())).unwrap();
        assert_eq!(out, vec![vec![7u8; 60]]);
    }

    #[test]
    fn lies_are_refused() {
        let payload = vec![1u8; 3000];
        let good = v4_packet(&payload, 0x10, GSO_TCPV4, 1448);
        let mut none = |_: &[u8]| panic!("nothing may be emitted");
        // Claimed IPv6 on an IPv4 frame.
        let mut p = good.clone();
        p[1] = GSO_TCPV6;
        assert!(matches!(
            complete(&p, &mut none),
            Err(SegmentError::NotTcp(_))
        ));
        // UDP, not TCP.
        let mut p = good.clone();
        p[HDR_LEN + 14 + 9] = 17;
        assert!(matches!(
            complete(&p, &mut none),
            Err(SegmentError::NotTcp(_))
        ));
        // IP length larger than the frame, and smaller.
        for len in [9000u16, 100] {
            let mut p = good.clone();
            p[HDR_LEN + 16..HDR_LEN + 18].copy_from_slice(&len.to_be_bytes());
            assert!(matches!(
                complete(&p, &mut none),
                Err(SegmentError::IpLength(..))
            ));
        }
        // TCP data offset past the end, IHL below 5, a fragment.
        let mut p = good.clone();
        p.truncate(HDR_LEN + 54 + 10);
        p[HDR_LEN + 16..HDR_LEN + 18].copy_from_slice(&50u16.to_be_bytes());
        p[HDR_LEN + 34 + 12] = 15 << 4;
        assert!(matches!(
            complete(&p, &mut none),
            Err(SegmentError::Truncated(_))
        ));
        let mut p = good.clone();
        p[HDR_LEN + 14] = 0x44;
        assert!(complete(&p, &mut none).is_err());
        let mut p = good.clone();
        p[HDR_LEN + 20] = 0x20;
        assert_eq!(complete(&p, &mut none), Err(SegmentError::Fragment));
        // UDP segmentation, a truncated packet, a checksum offset past the end.
        let mut p = good.clone();
        p[1] = 3;
        assert!(matches!(
            complete(&p, &mut none),
            Err(SegmentError::GsoType(3))
        ));
        assert!(complete(&good[..20], &mut none).is_err());
        assert!(complete(&good[..5], &mut none).is_err());
        let mut p = v4_packet(b"x", 0x18, GSO_NONE, 0);
        p[8..10].copy_from_slice(&0xfff0u16.to_le_bytes());
        assert!(complete(&p, &mut none).is_err());
    }

    #[test]
    fn tiny_mss_and_empty_payload_terminate() {
        let p = v4_packet(&[5u8; 100], 0x10, GSO_TCPV4, 1);
        let mut n = 0;
        assert_eq!(complete(&p, |_| n += 1).unwrap(), 100);
        assert_eq!(n, 100);
        // gso_size 0 is refused before here (check_tx), but must not loop.
        let p = v4_packet(&[5u8; 100], 0x10, GSO_TCPV4, 0);
        assert_eq!(complete(&p, |_| ()).unwrap(), 100);
        let p = v4_packet(&[], 0x11, GSO_TCPV4, 1448);
        let mut out = Vec::new();
        assert_eq!(complete(&p, |f| out.push(f.to_vec())).unwrap(), 1);
        verify_v4(&out[0], GOLDEN_EMPTY_FIN);
    }
}
