//! Completing a partial checksum (§5.1.6.2, VIRTIO_NET_F_CSUM): the driver
//! leaves the checksum of a TCP or UDP packet to the device, seeding the
//! checksum field with the pseudo-header sum; the device sums from
//! `csum_start` to the end of the frame and stores the result at
//! `csum_start + csum_offset`. Done once, at TX, so every frame in the
//! switch is complete whatever port it goes to (a guest that did not
//! negotiate GUEST_CSUM, the TAP uplink).

/// Why a partial-checksum request cannot be carried out on a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("checksum at {start}+{offset} does not fit a {len}-byte frame")]
pub struct ChecksumError {
    /// The header's `csum_start`.
    pub start: u16,
    /// The header's `csum_offset`.
    pub offset: u16,
    /// The frame's length.
    pub len: usize,
}

/// Checks that the checksum field (2 bytes at `start + offset`) lies in a
/// frame of `len` bytes.
pub fn check_partial(start: u16, offset: u16, len: usize) -> Result<(), ChecksumError> {
    let field = usize::from(start) + usize::from(offset);
    if field + 2 > len {
        return Err(ChecksumError { start, offset, len });
    }
    Ok(())
}

/// Sums `frame[start..]` (the seeded field included) and stores the
/// ones'-complement at `start + offset`.
pub fn complete_partial(frame: &mut [u8], start: u16, offset: u16) -> Result<(), ChecksumError> {
    check_partial(start, offset, frame.len())?;
    let (s, at) = (usize::from(start), usize::from(start) + usize::from(offset));
    let sum = !fold(ones_sum(&frame[s..]));
    // 0 and 0xffff are the same in ones'-complement; UDP reserves 0 for
    // "no checksum", so never write it (as Linux's skb_checksum_help).
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The ones'-complement sum of `b` as big-endian 16-bit words (an odd last
/// byte padded with zero), not yet folded.
fn ones_sum(b: &[u8]) -> u64 {
    let mut words = b.chunks_exact(2);
    let mut sum: u64 = words
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 1071 example: words 0001 f203 f4f5 f6f7 sum to 0xddf2.
    #[test]
    fn rfc1071_example() {
        let mut f = vec![0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7, 0, 0];
        assert_eq!(fold(ones_sum(&f)), 0xddf2);
        complete_partial(&mut f, 0, 8).unwrap();
        assert_eq!(u16::from_be_bytes([f[8], f[9]]), !0xddf2);
        // A complete packet sums to 0xffff.
        assert_eq!(fold(ones_sum(&f)), 0xffff);
    }

    #[test]
    fn odd_lengths_and_bounds() {
        let mut f = vec![0x12, 0x34, 0, 0, 0x56];
        complete_partial(&mut f, 0, 2).unwrap();
        assert_eq!(fold(ones_sum(&f)), 0xffff);
        assert_eq!(
            complete_partial(&mut f, 3, 1),
            Err(ChecksumError {
                start: 3,
                offset: 1,
                len: 5
            })
        );
        assert!(complete_partial(&mut f, u16::MAX, u16::MAX).is_err());
        assert!(check_partial(0, 3, 5).is_ok());
    }

    #[test]
    fn a_zero_sum_is_written_as_ffff() {
        // Summing to 0xffff before the complement: the field gets 0xffff.
        let mut f = vec![0xff, 0xff, 0, 0];
        complete_partial(&mut f, 0, 2).unwrap();
        assert_eq!(f[2..], [0xff, 0xff]);
    }
}
