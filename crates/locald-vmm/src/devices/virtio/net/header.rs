//! The virtio-net packet header (`struct virtio_net_hdr_v1`, virtio 1.2
//! section 5.1.6) and the feature bits of the device, plus the check every
//! guest-transmitted header goes through. Pure functions, used on the
//! device's worker thread.

/// Size of the header in front of every frame (modern devices always
/// carry `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` inside the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Ethernet header.
pub const ETH_HLEN: usize = 14;
/// MTU the device advertises (`VIRTIO_NET_F_MTU`) and the guest keeps.
pub const MTU: u16 = 1500;
/// Largest frame without segmentation offload: MTU, Ethernet header and
/// one VLAN tag.
pub const MAX_FRAME: usize = MTU as usize + ETH_HLEN + 4;
/// Largest frame with TSO: a 64 KiB IP packet, Ethernet and VLAN headers.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HLEN + 4;
/// Largest packet (header + frame) the device ever moves.
pub const MAX_PACKET: usize = HDR_LEN + MAX_GSO_FRAME;

/// `VIRTIO_NET_F_*` feature bits.
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const GUEST_UFO: u64 = 1 << 10;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const HOST_UFO: u64 = 1 << 14;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    /// Host-side (guest → host) offloads.
    pub const HOST_OFFLOADS: u64 = CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN;
    /// Guest-side (host → guest) offloads.
    pub const GUEST_OFFLOADS: u64 = GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN;
}

/// `flags`: the checksum at `csum_start + csum_offset` must be completed.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

/// Config-space status: link up.
pub const STATUS_LINK_UP: u16 = 1;

/// A parsed header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHdr {
    /// Parses the first [`HDR_LEN`] bytes of `b` (little-endian fields).
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u16at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16at(2),
            gso_size: u16at(4),
            csum_start: u16at(6),
            csum_offset: u16at(8),
            num_buffers: u16at(10),
        }
    }
}

/// Why a guest-transmitted packet was dropped. `cause()` is the
/// once-per-device log key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("packet of {0} bytes is shorter than the virtio-net and Ethernet headers")]
    Runt(usize),
    #[error("frame of {0} bytes exceeds the negotiated limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("unknown header flags {0:#x}")]
    Flags(u8),
    #[error("checksum offload requested but VIRTIO_NET_F_CSUM was not negotiated")]
    CsumNotNegotiated,
    #[error("checksum at {0}+{1} lies outside the {2}-byte frame")]
    CsumOutside(u16, u16, usize),
    #[error("segmentation type {0:#x} was not negotiated")]
    GsoNotNegotiated(u8),
    #[error("segmentation offload without a checksum request or with segment size 0")]
    GsoMalformed,
}

impl TxError {
    /// Log key.
    pub fn cause(&self) -> &'static str {
        match self {
            TxError::Runt(_) => "runt packet",
            TxError::TooLarge(..) => "frame larger than the negotiated limit",
            TxError::Flags(_) => "unknown header flags",
            TxError::CsumNotNegotiated => "checksum offload not negotiated",
            TxError::CsumOutside(..) => "checksum offset outside the frame",
            TxError::GsoNotNegotiated(_) => "segmentation offload not negotiated",
            TxError::GsoMalformed => "malformed segmentation header",
        }
    }
}

/// Most bytes a transmitted packet (header + frame) may have under the
/// negotiated `features`.
pub fn max_tx_packet(features: u64) -> usize {
    if features & (features::HOST_TSO4 | features::HOST_TSO6) != 0 {
        HDR_LEN + MAX_GSO_FRAME
    } else {
        HDR_LEN + MAX_FRAME
    }
}

/// Checks a guest-transmitted packet (header + frame) against the
/// negotiated `features`.
pub fn check_tx(packet: &[u8], feats: u64) -> Result<NetHdr, TxError> {
    use self::features as f;
    let features = feats;
    let Some((hdr, frame)) = packet.split_first_chunk::<HDR_LEN>() else {
        return Err(TxError::Runt(packet.len()));
    };
    if frame.len() < ETH_HLEN {
        return Err(TxError::Runt(packet.len()));
    }
    let h = NetHdr::parse(hdr);
    if h.flags & !FLAG_NEEDS_CSUM != 0 {
        return Err(TxError::Flags(h.flags));
    }
    if h.flags & FLAG_NEEDS_CSUM != 0 {
        if features & f::CSUM == 0 {
            return Err(TxError::CsumNotNegotiated);
        }
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if end > frame.len() {
            return Err(TxError::CsumOutside(
                h.csum_start,
                h.csum_offset,
                frame.len(),
            ));
        }
    }
    let gso = h.gso_type & !GSO_ECN;
    let needed = match gso {
        GSO_NONE => 0,
        GSO_TCPV4 => f::HOST_TSO4,
        GSO_TCPV6 => f::HOST_TSO6,
        _ => return Err(TxError::GsoNotNegotiated(h.gso_type)),
    };
    if features & needed != needed {
        return Err(TxError::GsoNotNegotiated(h.gso_type));
    }
    if h.gso_type & GSO_ECN != 0 && (gso == GSO_NONE || features & f::HOST_ECN == 0) {
        return Err(TxError::GsoNotNegotiated(h.gso_type));
    }
    let limit = if gso == GSO_NONE {
        MAX_FRAME
    } else {
        if h.flags & FLAG_NEEDS_CSUM == 0 || h.gso_size == 0 {
            return Err(TxError::GsoMalformed);
        }
        MAX_GSO_FRAME
    };
    if frame.len() > limit {
        return Err(TxError::TooLarge(frame.len(), limit));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(hdr: [u8; HDR_LEN], frame_len: usize) -> Vec<u8> {
        let mut p = hdr.to_vec();
        p.resize(HDR_LEN + frame_len, 0xab);
        p
    }

    fn hdr(flags: u8, gso: u8, gso_size: u16, cs: u16, co: u16) -> [u8; HDR_LEN] {
        let mut h = [0u8; HDR_LEN];
        h[0] = flags;
        h[1] = gso;
        h[4..6].copy_from_slice(&gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&cs.to_le_bytes());
        h[8..10].copy_from_slice(&co.to_le_bytes());
        h
    }

    #[test]
    fn plain_frames_pass_within_the_mtu() {
        assert!(check_tx(&pkt([0; HDR_LEN], 60), 0).is_ok());
        assert!(check_tx(&pkt([0; HDR_LEN], MAX_FRAME), 0).is_ok());
        assert_eq!(
            check_tx(&pkt([0; HDR_LEN], MAX_FRAME + 1), features::HOST_TSO4),
            Err(TxError::TooLarge(MAX_FRAME + 1, MAX_FRAME))
        );
        assert!(matches!(check_tx(&[0; 5], 0), Err(TxError::Runt(5))));
        assert!(matches!(
            check_tx(&pkt([0; HDR_LEN], 13), 0),
            Err(TxError::Runt(_))
        ));
    }

    #[test]
    fn offloads_need_negotiation_and_sane_offsets() {
        let all = features::HOST_OFFLOADS;
        let csum = hdr(FLAG_NEEDS_CSUM, 0, 0, 34, 16);
        assert_eq!(
            check_tx(&pkt(csum, 100), 0),
            Err(TxError::CsumNotNegotiated)
        );
        assert!(check_tx(&pkt(csum, 100), all).is_ok());
        assert!(matches!(
            check_tx(&pkt(hdr(FLAG_NEEDS_CSUM, 0, 0, 0xffff, 0xffff), 100), all),
            Err(TxError::CsumOutside(..))
        ));
        assert!(matches!(
            check_tx(&pkt(hdr(0x80, 0, 0, 0, 0), 100), all),
            Err(TxError::Flags(0x80))
        ));
        let tso = hdr(FLAG_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16);
        assert!(matches!(
            check_tx(&pkt(tso, 60000), features::CSUM),
            Err(TxError::GsoNotNegotiated(_))
        ));
        assert!(check_tx(&pkt(tso, 60000), all).is_ok());
        assert!(matches!(
            check_tx(&pkt(tso, MAX_GSO_FRAME + 1), all),
            Err(TxError::TooLarge(..))
        ));
        assert_eq!(
            check_tx(&pkt(hdr(FLAG_NEEDS_CSUM, GSO_TCPV4, 0, 34, 16), 6000), all),
            Err(TxError::GsoMalformed)
        );
        assert_eq!(
            check_tx(&pkt(hdr(0, GSO_TCPV6, 1000, 0, 0), 6000), all),
            Err(TxError::GsoMalformed)
        );
        assert!(matches!(
            check_tx(&pkt(hdr(FLAG_NEEDS_CSUM, GSO_UDP, 1000, 34, 6), 6000), all),
            Err(TxError::GsoNotNegotiated(_))
        ));
        assert!(matches!(
            check_tx(&pkt(hdr(0, GSO_ECN, 0, 0, 0), 60), all),
            Err(TxError::GsoNotNegotiated(_))
        ));
    }
}
