//! The TX side of the device model: one transmit chain in, one frame to the
//! switch out. Per chain and over [`GuestMemory`] only, so it runs as is on
//! local rings or, on the I/O server, over a staged chain.

use std::sync::Arc;

use super::checksum::complete_partial;
use super::copy::gather;
use super::drop_reason::DropReason;
use super::frame::ETH_HLEN;
use super::header::{NetHeader, HDR_LEN};
use crate::interpose::{frame_info, Op, Refusal, Request};
use crate::virtio::device::{DeviceModel, RequestError};
use crate::virtio::memory::{GuestMemory, MemoryError};
use crate::virtio::ring::DescriptorChain;

/// Where transmitted frames go: in vrio, the guest's port on the I/O
/// server's switch (`net::SwitchPort`). Counting is the sink's: the device
/// says why it dropped a frame, or that it completed a checksum.
pub trait FrameSink: Send + Sync {
    /// The largest frame (Ethernet header included) the sink takes.
    fn max_frame(&self) -> usize;
    /// Takes a checked frame (the sink may still drop it, and counts that).
    fn forward(&self, frame: Vec<u8>);
    /// The device dropped a frame, for `reason`.
    fn dropped(&self, reason: DropReason);
    /// The device completed a partial checksum.
    fn checksummed(&self);
    /// The sink's name, for logs.
    fn name(&self) -> &str;
}

/// A guest's transmit path into its sink.
pub struct TxDevice {
    sink: Arc<dyn FrameSink>,
}

impl TxDevice {
    /// A device that transmits into `sink`.
    pub fn new(sink: Arc<dyn FrameSink>) -> Self {
        Self { sink }
    }

    fn drop_frame(&self, reason: DropReason) {
        self.sink.dropped(reason);
    }

    /// Reads `virtio_net_hdr` + frame from the chain's readable segments,
    /// checks them, and forwards the frame. Bad frames are dropped and
    /// counted on the port; only a guest memory failure is an error.
    pub fn transmit<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<(), MemoryError> {
        // §2.7.4: TX buffers are device-readable only.
        if !chain.writable.is_empty() {
            self.drop_frame(DropReason::BadChain);
            return Ok(());
        }
        let total = chain.readable_len();
        if total < HDR_LEN as u64 {
            self.drop_frame(DropReason::Short);
            return Ok(());
        }
        let len = total - HDR_LEN as u64;
        // Refuse before allocating: the guest picks `len`.
        if len > self.sink.max_frame() as u64 {
            self.drop_frame(DropReason::Oversized);
            return Ok(());
        }
        let mut hb = [0u8; HDR_LEN];
        gather(mem, &chain.readable, 0, &mut hb)?;
        let hdr = NetHeader::from_bytes(&hb);
        if let Err(e) = hdr.validate_tx(len as usize) {
            tracing::debug!(port = self.sink.name(), error = %e, "TX header refused");
            self.drop_frame(DropReason::BadHeader);
            return Ok(());
        }
        if (len as usize) < ETH_HLEN {
            self.drop_frame(DropReason::Short);
            return Ok(());
        }
        let mut frame = vec![0u8; len as usize];
        gather(mem, &chain.readable, HDR_LEN as u64, &mut frame)?;
        if hdr.needs_csum() {
            // validate_tx checked the field lies in the frame.
            if complete_partial(&mut frame, hdr.csum_start, hdr.csum_offset).is_err() {
                self.drop_frame(DropReason::BadHeader);
                return Ok(());
            }
            self.sink.checksummed();
        }
        self.sink.forward(frame);
        Ok(())
    }
}

impl DeviceModel for TxDevice {
    /// A transmitted chain has nothing to write back: used length 0, also
    /// for dropped frames (the drop is counted on the port, not failed).
    fn process<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<u32, RequestError> {
        self.transmit(mem, chain)?;
        Ok(0)
    }

    fn fail_request<M: GuestMemory + ?Sized>(
        &mut self,
        _mem: &M,
        _status: &DescriptorChain,
    ) -> Result<u32, RequestError> {
        self.sink.dropped(DropReason::Oversized);
        Ok(0)
    }

    fn refused_chain(&mut self) {
        self.sink.dropped(DropReason::BadChain);
    }

    /// A frame: its length and addresses (read from the first bytes after
    /// the virtio-net header).
    fn describe<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        chain: &DescriptorChain,
        device: u64,
        arrived: std::time::Instant,
    ) -> Option<Request> {
        let len = chain.readable_len().checked_sub(HDR_LEN as u64)?;
        // Ethernet + the IPv4 or ARP sender address: 14 + 18 bytes.
        let mut head = [0u8; 32];
        let n = (len as usize).min(head.len());
        gather(mem, &chain.readable, HDR_LEN as u64, &mut head[..n]).ok()?;
        Some(Request {
            device,
            op: Op::Transmit,
            sector: 0,
            len,
            frame: frame_info(&head[..n]),
            arrived,
            vm_host: 0,
        })
    }

    /// A refused frame is dropped, counted on the port as `policy`.
    fn reject<M: GuestMemory + ?Sized>(
        &mut self,
        _mem: &M,
        _chain: &DescriptorChain,
        _refusal: &Refusal,
    ) -> Result<u32, RequestError> {
        self.sink.dropped(DropReason::Policy);
        Ok(0)
    }
}
