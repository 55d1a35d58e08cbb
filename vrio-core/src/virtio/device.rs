//! The seam between queues and device models (virtio-blk, virtio-net TX):
//! a model turns one validated chain into guest-visible results.

use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::interpose::{Pipeline, Refusal, Request};
use crate::virtio::memory::{GuestMemory, LocalMemory};
use crate::virtio::ring::DescriptorChain;
use crate::virtio::ring::{RingFeatures, RingLayout};

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

    /// What interposition stages see of the request in `chain`, as device
    /// `device` learnt of at `arrived`. None (the default): the model has
    /// nothing to interpose, and stages are skipped for the request.
    fn describe<M: GuestMemory + ?Sized>(
        &self,
        _mem: &M,
        _chain: &DescriptorChain,
        _device: u64,
        _arrived: Instant,
    ) -> Option<Request> {
        None
    }

    /// [`process`](Self::process) with `req`'s data passing `pipe` (for
    /// models whose stages transform data); returns the used length and
    /// the request's status (0 is success). The default ignores `pipe`.
    fn process_interposed<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
        _req: &Request,
        _pipe: &Pipeline,
    ) -> Result<(u32, u8), RequestError> {
        self.process(mem, chain).map(|len| (len, 0))
    }

    /// A stage refused the request: complete it without running it, with
    /// the refusal's status where the device has one. Returns the used
    /// length. The default completes it with length 0.
    fn reject<M: GuestMemory + ?Sized>(
        &mut self,
        _mem: &M,
        _chain: &DescriptorChain,
        _refusal: &Refusal,
    ) -> Result<u32, RequestError> {
        Ok(0)
    }
}

impl DeviceModel for crate::virtio::blk::BlockDevice {
    fn process<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<u32, RequestError> {
        crate::virtio::blk::BlockDevice::process(self, mem, chain).map_err(|e| e.into())
    }

    fn describe<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        chain: &DescriptorChain,
        device: u64,
        arrived: Instant,
    ) -> Option<Request> {
        crate::virtio::blk::BlockDevice::describe(mem, chain, device, arrived)
    }

    fn process_interposed<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
        req: &Request,
        pipe: &Pipeline,
    ) -> Result<(u32, u8), RequestError> {
        crate::virtio::blk::BlockDevice::process_interposed(self, mem, chain, Some((req, pipe)))
            .map_err(|e| e.into())
    }

    fn reject<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
        refusal: &Refusal,
    ) -> Result<u32, RequestError> {
        crate::virtio::blk::BlockDevice::reject(self, mem, chain, refusal.status)
            .map_err(|e| e.into())
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

/// What a device back-end gets from the VMM for one queue: the guest's
/// memory, where the ring is and what was negotiated, and the two eventfds
/// (the back-end only holds them; its runtime waits on and writes them).
pub struct DeviceSide {
    /// The queue's name in logs and failures.
    pub name: String,
    /// Guest memory the rings and buffers are in.
    pub mem: Arc<LocalMemory>,
    /// Where the rings are.
    pub layout: RingLayout,
    /// The negotiated ring features.
    pub features: RingFeatures,
    /// Written by the guest to kick (non-blocking).
    pub kick: EventFd,
    /// Written by the device to interrupt the guest.
    pub call: EventFd,
}
