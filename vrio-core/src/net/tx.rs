//! The TX side of the device model: one transmit chain in, one frame to the
//! switch out. Per chain and over [`GuestMemory`] only, so it runs as is on
//! local rings or, on the I/O server, over a staged chain.

use std::sync::Arc;

use super::checksum::complete_partial;
use super::copy::gather;
use super::frame::ETH_HLEN;
use super::header::{NetHeader, HDR_LEN};
use super::port::Port;
use super::stats::DropReason;
use super::switch::{Forwarded, Switch};
use crate::device::{DeviceModel, RequestError};
use crate::memory::{GuestMemory, MemoryError};
use crate::ring::DescriptorChain;

/// A guest's transmit path into its switch port.
pub struct TxDevice {
    switch: Arc<Switch>,
    port: Arc<Port>,
}

impl TxDevice {
    /// Transmits into `switch` from `port` (the guest's).
    pub fn new(switch: Arc<Switch>, port: Arc<Port>) -> Self {
        Self { switch, port }
    }

    /// The guest's port.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    fn drop_frame(&self, reason: DropReason) -> Forwarded {
        self.port.stats().dropped(reason);
        Forwarded::Dropped(reason)
    }

    /// Reads `virtio_net_hdr` + frame from the chain's readable segments,
    /// checks them, and forwards the frame. Bad frames are dropped and
    /// counted on the port; only a guest memory failure is an error.
    pub fn transmit<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<Forwarded, MemoryError> {
        // §2.7.4: TX buffers are device-readable only.
        if !chain.writable.is_empty() {
            return Ok(self.drop_frame(DropReason::BadChain));
        }
        let total = chain.readable_len();
        if total < HDR_LEN as u64 {
            return Ok(self.drop_frame(DropReason::Short));
        }
        let len = total - HDR_LEN as u64;
        // Refuse before allocating: the guest picks `len`.
        if len > self.switch.config().limits.max_frame() as u64 {
            return Ok(self.drop_frame(DropReason::Oversized));
        }
        let mut hb = [0u8; HDR_LEN];
        gather(mem, &chain.readable, 0, &mut hb)?;
        let hdr = NetHeader::from_bytes(&hb);
        if let Err(e) = hdr.validate_tx(len as usize) {
            tracing::debug!(port = self.port.name(), error = %e, "TX header refused");
            return Ok(self.drop_frame(DropReason::BadHeader));
        }
        if (len as usize) < ETH_HLEN {
            return Ok(self.drop_frame(DropReason::Short));
        }
        let mut frame = vec![0u8; len as usize];
        gather(mem, &chain.readable, HDR_LEN as u64, &mut frame)?;
        if hdr.needs_csum() {
            // validate_tx checked the field lies in the frame.
            if complete_partial(&mut frame, hdr.csum_start, hdr.csum_offset).is_err() {
                return Ok(self.drop_frame(DropReason::BadHeader));
            }
            self.port.stats().checksummed();
        }
        Ok(self.switch.forward(&self.port, frame))
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
        self.port.stats().dropped(DropReason::Oversized);
        Ok(0)
    }

    fn refused_chain(&mut self) {
        self.port.stats().dropped(DropReason::BadChain);
    }
}
