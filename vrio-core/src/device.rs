//! The seam between queues and device models (virtio-blk now, virtio-net
//! later): a model turns one validated chain into guest-visible results.

use crate::memory::GuestMemory;
use crate::ring::DescriptorChain;

/// A request the device model could not make sense of; the queue completes
/// it with length 0.
pub type RequestError = Box<dyn std::error::Error + Send + Sync>;

pub trait DeviceModel: Send {
    /// Serves one validated chain through `mem`; returns the used length.
    fn process<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<u32, RequestError>;
}

impl DeviceModel for crate::blk::BlockDevice {
    fn process<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<u32, RequestError> {
        crate::blk::BlockDevice::process(self, mem, chain).map_err(|e| e.into())
    }
}
