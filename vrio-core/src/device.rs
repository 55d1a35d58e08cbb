//! The seam between queues and device models (virtio-blk, virtio-net TX):
//! a model turns one validated chain into guest-visible results.

use crate::memory::GuestMemory;
use crate::ring::DescriptorChain;

/// A request the device model could not make sense of; the queue completes
/// it with length 0.
pub type RequestError = Box<dyn std::error::Error + Send + Sync>;

/// A device type as a queue drives it, one chain at a time (virtio-blk's
/// `BlockDevice`, virtio-net's `TxDevice`). Local queues, sidecores and
/// remote queues all serve a queue through this trait, so a model is written
/// once over [`GuestMemory`].
pub trait DeviceModel: Send {
    /// Serves one validated chain through `mem`; returns the used length.
    fn process<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<u32, RequestError>;

    /// Completes a request the queue cannot serve (larger than it stages)
    /// with the device's error status, so the guest sees a failure rather
    /// than a silent success. `status` holds just the chain's last writable
    /// byte. Returns the used length.
    fn fail_request<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        status: &DescriptorChain,
    ) -> Result<u32, RequestError>;

    /// The queue refused a chain before it reached the device (it broke
    /// the ring's rules: a loop, a buffer outside guest memory, ...) and
    /// completes it with length 0. A device that counts what it drops
    /// (net TX, on its port) counts it here; the default does nothing.
    fn refused_chain(&mut self) {}
}

impl DeviceModel for crate::blk::BlockDevice {
    fn process<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<u32, RequestError> {
        crate::blk::BlockDevice::process(self, mem, chain).map_err(|e| e.into())
    }

    fn fail_request<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        status: &DescriptorChain,
    ) -> Result<u32, RequestError> {
        let s = status
            .writable
            .last()
            .filter(|s| s.len > 0)
            .ok_or("no status byte")?;
        let ioerr = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
        mem.write(s.addr + u64::from(s.len) - 1, &[ioerr])?;
        Ok(1)
    }
}
