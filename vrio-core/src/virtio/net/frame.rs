//! Ethernet frame checks: what the switch accepts from any port.

use super::mac::MacAddr;

/// Destination + source + EtherType.
pub const ETH_HLEN: usize = 14;
/// One 802.1Q tag.
pub const VLAN_HLEN: usize = 4;
const ETH_P_8021Q: u16 = 0x8100;

/// Frame size bounds for a given MTU (payload bytes after the Ethernet
/// header; FCS is not carried by virtio-net).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest payload, in bytes.
    pub mtu: u16,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self { mtu: 1500 }
    }
}

impl FrameLimits {
    /// The largest frame any port may send: MTU + header + one VLAN tag.
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + ETH_HLEN + VLAN_HLEN
    }
}

/// Why [`parse_frame`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than [`ETH_HLEN`] (the length given).
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Short(usize),
    /// Longer than the MTU allows.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// The frame's length.
        len: usize,
        /// The limit for this frame (with a VLAN tag's 4 bytes if tagged).
        max: usize,
    },
    /// The source address is multicast or broadcast.
    #[error("source address {0} is a group address")]
    MulticastSource(MacAddr),
}

/// The addresses the switch needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthAddrs {
    /// Destination address.
    pub dst: MacAddr,
    /// Source address (unicast).
    pub src: MacAddr,
}

/// Validates one frame: length within `limits` (the extra 4 bytes only for
/// a VLAN-tagged frame), and a unicast source address.
pub fn parse_frame(frame: &[u8], limits: FrameLimits) -> Result<EthAddrs, FrameError> {
    let len = frame.len();
    if len < ETH_HLEN {
        return Err(FrameError::Short(len));
    }
    let tagged = u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_8021Q;
    let max = usize::from(limits.mtu) + ETH_HLEN + if tagged { VLAN_HLEN } else { 0 };
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    let (Some(dst), Some(src)) = (MacAddr::from_slice(frame), MacAddr::from_slice(&frame[6..]))
    else {
        return Err(FrameError::Short(len));
    };
    if src.is_multicast() {
        return Err(FrameError::MulticastSource(src));
    }
    Ok(EthAddrs { dst, src })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(len: usize, ethertype: u16) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&MacAddr::local(1).0);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        f
    }

    #[test]
    fn bounds_are_exact() {
        let l = FrameLimits::default();
        assert!(parse_frame(&frame(14, 0x0800), l).is_ok());
        assert!(parse_frame(&frame(1514, 0x0800), l).is_ok());
        assert_eq!(
            parse_frame(&frame(1515, 0x0800), l),
            Err(FrameError::Oversized {
                len: 1515,
                max: 1514
            })
        );
        assert!(parse_frame(&frame(1518, 0x8100), l).is_ok());
        assert!(parse_frame(&frame(1519, 0x8100), l).is_err());
        assert_eq!(parse_frame(&[0u8; 13], l), Err(FrameError::Short(13)));
        let mut f = frame(60, 0x0800);
        f[6] = 0x01;
        assert!(matches!(
            parse_frame(&f, l),
            Err(FrameError::MulticastSource(_))
        ));
        assert_eq!(l.max_frame(), 1518);
    }

    proptest! {
        /// Any byte string: never panics, and accepts exactly the frames
        /// within bounds with a unicast source.
        #[test]
        fn parser_is_total(b in proptest::collection::vec(any::<u8>(), 0..2000), mtu in 46u16..1600) {
            let l = FrameLimits { mtu };
            let r = parse_frame(&b, l);
            let ok_len = b.len() >= 14 && b.len() <= usize::from(mtu) + 14
                + if b.len() >= 14 && b[12] == 0x81 && b[13] == 0 { 4 } else { 0 };
            let ok = ok_len && b[6] & 1 == 0;
            prop_assert_eq!(r.is_ok(), ok);
            if let Ok(a) = r {
                prop_assert_eq!(&a.dst.0[..], &b[..6]);
                prop_assert_eq!(&a.src.0[..], &b[6..12]);
            }
        }
    }
}
