//! The RX side of the device model, and the seam that tells it a frame is
//! waiting.
//!
//! RX is not "one chain in, one result out" like TX: with MRG_RXBUF one
//! frame may fill several chains, and the first chain's header carries
//! `num_buffers`, which depends on the chains after it. So RX works per
//! *frame* over a list of chains the queue has already popped and holds:
//! [`RxDevice::fit`] says how many held chains the next frame needs (or that
//! more must be popped, or that it can never fit), and
//! [`RxDevice::deliver`] writes header + frame across them and returns the
//! used length of each. Both only touch [`GuestMemory`], so the remote path
//! can run them over staged buffers.
//!
//! Frames come from a [`FrameSource`] (a switch port's backlog). Besides
//! peek and pop it has `arm`: "wake me when a frame arrives", which a queue
//! calls when it stops polling. Local queues hand the port a clone of their
//! RX kick eventfd as waker, so one fd means "guest added buffers *or* a
//! frame arrived", and the unchanged vhost worker and sidecore sleep on it.

use super::copy::scatter;
use super::drop_reason::DropReason;
use super::header::{NetHeader, HDR_LEN};
use crate::virtio::memory::{GuestMemory, MemoryError};
use crate::virtio::ring::DescriptorChain;

/// Where received frames wait (a port's backlog). One consumer per source.
pub trait FrameSource: Send + Sync {
    /// Length of the next frame, without taking it.
    fn peek_len(&self) -> Option<usize>;
    /// Takes the next frame.
    fn pop(&self) -> Option<Vec<u8>>;
    /// Asks to be woken when a frame arrives; true when one already waits.
    fn arm(&self) -> bool;
    /// Polling again: no wake-ups needed.
    fn disarm(&self);
    /// A frame reached the guest.
    fn delivered(&self, bytes: usize);
    /// A frame taken from the source was dropped for `reason`.
    fn dropped(&self, reason: DropReason);
}

/// Why an RX chain cannot be used at all (completed with length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RxChainError {
    /// The chain has device-readable descriptors.
    #[error("RX chain has device-readable descriptors")]
    Readable,
    /// The chain's writable bytes (given) are fewer than a header.
    #[error("RX chain of {0} bytes cannot hold the {HDR_LEN}-byte header")]
    TooSmall(u64),
}

/// What the next frame needs from the held chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The first `n` held chains take it.
    Fits(usize),
    /// Pop more chains first.
    NeedMore,
    /// It cannot fit whatever the guest adds: drop it.
    Never,
}

/// The receive side of a virtio-net device: fits frames to held chains
/// and writes them (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct RxDevice {
    /// MRG_RXBUF negotiated.
    pub mergeable: bool,
}

impl RxDevice {
    /// A device with or without MRG_RXBUF.
    pub fn new(mergeable: bool) -> Self {
        Self { mergeable }
    }

    /// §5.1.6.3: receive buffers are device-writable, and each holds at
    /// least a header (a driver requirement; we enforce it).
    pub fn check_chain(chain: &DescriptorChain) -> Result<(), RxChainError> {
        if !chain.readable.is_empty() {
            return Err(RxChainError::Readable);
        }
        let w = chain.writable_len();
        if w < HDR_LEN as u64 {
            return Err(RxChainError::TooSmall(w));
        }
        Ok(())
    }

    /// How a frame of `frame_len` bytes fits the held chains, given their
    /// writable capacities in order. `more` says whether more chains can
    /// still be held (the queue is not holding all of its entries yet).
    pub fn fit(&self, frame_len: usize, caps: impl IntoIterator<Item = u64>, more: bool) -> Fit {
        let need = (HDR_LEN + frame_len) as u64;
        let mut have = 0u64;
        for (i, c) in caps.into_iter().enumerate() {
            have += c;
            if have >= need {
                return Fit::Fits(i + 1);
            }
            if !self.mergeable {
                return Fit::Never;
            }
            if i + 1 >= usize::from(u16::MAX) {
                return Fit::Never;
            }
        }
        if more {
            Fit::NeedMore
        } else {
            Fit::Never
        }
    }

    /// Writes header + `frame` across `chains` (as many as [`fit`] said) and
    /// appends each chain's `(head, used length)` to `used`.
    ///
    /// [`fit`]: RxDevice::fit
    pub fn deliver<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        frame: &[u8],
        chains: &[DescriptorChain],
        used: &mut Vec<(u16, u32)>,
    ) -> Result<(), MemoryError> {
        let hdr = NetHeader::rx(chains.len().min(usize::from(u16::MAX)) as u16).to_bytes();
        let mut at = 0usize;
        for (i, c) in chains.iter().enumerate() {
            let mut n = 0;
            let mut off = 0u64;
            if i == 0 {
                n += scatter(mem, &c.writable, 0, &hdr)?;
                off = n as u64;
            }
            let w = scatter(mem, &c.writable, off, &frame[at..])?;
            at += w;
            n += w;
            used.push((c.head, n as u32));
        }
        if at < frame.len() {
            // `fit` guarantees room; reaching here means the chains changed.
            return Err(MemoryError::OutOfBounds {
                addr: 0,
                len: (frame.len() - at) as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::memory::anonymous_memory;
    use crate::virtio::ring::Segment;

    fn chain(head: u16, segs: &[(u64, u32)]) -> DescriptorChain {
        DescriptorChain {
            head,
            writable: segs
                .iter()
                .map(|&(addr, len)| Segment { addr, len })
                .collect(),
            ..DescriptorChain::default()
        }
    }

    #[test]
    fn fit_rules() {
        let m = RxDevice::new(true);
        assert_eq!(m.fit(100, [50, 50, 50], true), Fit::Fits(3));
        assert_eq!(m.fit(100, [112], true), Fit::Fits(1));
        assert_eq!(m.fit(100, [111], true), Fit::NeedMore);
        assert_eq!(m.fit(100, [111], false), Fit::Never);
        let s = RxDevice::new(false);
        assert_eq!(s.fit(100, [112, 10], true), Fit::Fits(1));
        assert_eq!(s.fit(100, [111, 1000], true), Fit::Never);
        assert_eq!(s.fit(100, [], true), Fit::NeedMore);
    }

    #[test]
    fn mergeable_delivery_spans_chains_and_counts_buffers() {
        let mem = anonymous_memory(0x10000).unwrap();
        let frame: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        // 12 + 200 = 212 bytes over 64 + (32 + 64) + 100.
        let chains = [
            chain(7, &[(0x1000, 64)]),
            chain(3, &[(0x2000, 32), (0x3000, 64)]),
            chain(9, &[(0x4000, 100)]),
        ];
        let d = RxDevice::new(true);
        assert_eq!(
            d.fit(200, chains.iter().map(|c| c.writable_len()), true),
            Fit::Fits(3)
        );
        let mut used = Vec::new();
        d.deliver(&mem, &frame, &chains, &mut used).unwrap();
        assert_eq!(used, vec![(7, 64), (3, 96), (9, 52)]);
        let mut out = vec![0u8; 212];
        let mut at = 0;
        for (c, &(_, n)) in chains.iter().zip(&used) {
            at += crate::virtio::net::copy::gather(
                &mem,
                &c.writable,
                0,
                &mut out[at..at + n as usize],
            )
            .unwrap();
        }
        assert_eq!(&out[..12], &NetHeader::rx(3).to_bytes());
        assert_eq!(&out[12..], &frame[..]);
    }

    #[test]
    fn chain_checks() {
        assert_eq!(
            RxDevice::check_chain(&chain(0, &[(0, 11)])),
            Err(RxChainError::TooSmall(11))
        );
        let mut c = chain(0, &[(0, 64)]);
        assert_eq!(RxDevice::check_chain(&c), Ok(()));
        c.readable.push(Segment { addr: 0, len: 1 });
        assert_eq!(RxDevice::check_chain(&c), Err(RxChainError::Readable));
    }
}
