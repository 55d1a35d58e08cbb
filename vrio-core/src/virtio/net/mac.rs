//! Ethernet MAC addresses.

use std::fmt;

/// A 48-bit IEEE 802 MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Reads the address at `b[0..6]`; `None` when `b` is shorter.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let a: [u8; 6] = b.get(..6)?.try_into().ok()?;
        Some(Self(a))
    }

    /// A locally administered unicast address for synthetic guest `n`.
    pub fn local(n: u32) -> Self {
        let b = n.to_be_bytes();
        Self([0x02, 0x76, b[0], b[1], b[2], b[3]])
    }

    /// Group bit set (multicast or broadcast): never a valid source.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
    /// The broadcast address.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
    /// All zeros (no address).
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_bit_and_display() {
        assert!(MacAddr::BROADCAST.is_multicast() && MacAddr::BROADCAST.is_broadcast());
        assert!(MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        let m = MacAddr::local(0x0102_0304);
        assert!(!m.is_multicast() && !m.is_zero());
        assert_eq!(m.to_string(), "02:76:01:02:03:04");
        assert_eq!(MacAddr::from_slice(&[1, 2, 3]), None);
    }
}
