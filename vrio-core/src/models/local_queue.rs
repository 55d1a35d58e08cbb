//! A queue whose rings live in local (shared) guest memory.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::device::DeviceModel;
use crate::memory::{LocalMemory, MemoryMap};
use crate::ring::{DescriptorChain, DeviceQueue, QueueError, RingFeatures, RingLayout, RingState};
use crate::sidecore::{PollOutcome, QueueFailure, ServedQueue};

/// What a device back-end gets from the VMM for one queue.
pub struct DeviceSide {
    pub name: String,
    pub mem: Arc<LocalMemory>,
    pub layout: RingLayout,
    pub features: RingFeatures,
    /// Written by the guest to kick (non-blocking).
    pub kick: EventFd,
    /// Written by the device to interrupt the guest.
    pub call: EventFd,
}

pub struct LocalQueue<D> {
    name: String,
    mem: Arc<LocalMemory>,
    map: MemoryMap,
    queue: DeviceQueue,
    device: D,
    kick: EventFd,
    call: EventFd,
    chain: DescriptorChain,
}

impl<D: DeviceModel> LocalQueue<D> {
    pub fn new(side: DeviceSide, device: D) -> Result<Self, QueueError> {
        let map = MemoryMap::of(&*side.mem)?;
        let queue = DeviceQueue::new(side.layout, side.features, &map)?;
        Ok(Self {
            name: side.name,
            mem: side.mem,
            map,
            queue,
            device,
            kick: side.kick,
            call: side.call,
            chain: DescriptorChain::default(),
        })
    }

    /// A queue that resumes at `state` instead of a fresh ring (index 0):
    /// a VMM reconnecting hands over its vring base, and a ring moved here
    /// brings its position along.
    pub fn resume(side: DeviceSide, device: D, state: RingState) -> Result<Self, QueueError> {
        let mut q = Self::new(side, device)?;
        q.queue.set_state(state);
        Ok(q)
    }

    pub fn ring(&self) -> &DeviceQueue {
        &self.queue
    }

    fn fail(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> QueueFailure {
        QueueFailure {
            queue: self.name.clone(),
            reason: e.into(),
        }
    }
}

impl<D: DeviceModel> ServedQueue for LocalQueue<D> {
    fn poll(&mut self, budget: usize) -> Result<PollOutcome, QueueFailure> {
        let mut out = PollOutcome::default();
        let mem = &*self.mem;
        for _ in 0..budget {
            let (head, len) = match self.queue.pop(mem, &self.map, &mut self.chain) {
                Ok(false) => break,
                Ok(true) => {
                    let len = match self.device.process(mem, &self.chain) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(queue = %self.name, head = self.chain.head, error = %e, "request failed");
                            out.errors += 1;
                            0
                        }
                    };
                    out.requests += 1;
                    out.bytes += self.chain.readable_len() + self.chain.writable_len();
                    (self.chain.head, len)
                }
                Err(QueueError::BadChain { head, source }) => {
                    tracing::warn!(queue = %self.name, head, error = %source, "bad descriptor chain");
                    out.errors += 1;
                    (head, 0)
                }
                Err(e) => return Err(self.fail(e)),
            };
            let (addr, elem) = self.queue.take_used_slot(head, len);
            crate::memory::GuestMemory::write(mem, addr, &elem).map_err(|e| self.fail(e))?;
        }
        if out.requests + out.errors > 0 {
            let idx = self.queue.next_used();
            self.queue
                .publish_used(mem, idx)
                .map_err(|e| self.fail(e))?;
            if self
                .queue
                .needs_notification(mem)
                .map_err(|e| self.fail(e))?
            {
                self.call.write(1).map_err(|e| self.fail(e))?;
            }
        }
        Ok(out)
    }

    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        let mem = &*self.mem;
        if enabled {
            self.queue
                .enable_notification(mem)
                .map_err(|e| self.fail(e))
        } else {
            self.queue
                .disable_notification(mem)
                .map_err(|e| self.fail(e))?;
            Ok(false)
        }
    }

    fn kick_fd(&self) -> Option<RawFd> {
        Some(self.kick.as_raw_fd())
    }

    fn take_kick(&mut self) -> bool {
        // The kick fd is non-blocking: EAGAIN means no kick.
        self.kick.read().is_ok()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::device::RequestError;
    use crate::memory::GuestMemory;
    use crate::ring::{DriverQueue, Segment};

    const SIZE: u16 = 8;
    const TAGS: u64 = 0x8000;

    /// Records the tag (first readable byte) of every request it serves.
    struct Recorder(Arc<Mutex<Vec<u8>>>);

    impl DeviceModel for Recorder {
        fn process<M: GuestMemory + ?Sized>(
            &mut self,
            mem: &M,
            chain: &DescriptorChain,
        ) -> Result<u32, RequestError> {
            let mut tag = [0u8];
            mem.read(chain.readable[0].addr, &mut tag)?;
            self.0.lock().unwrap().push(tag[0]);
            Ok(0)
        }

        fn fail_request<M: GuestMemory + ?Sized>(
            &mut self,
            _mem: &M,
            _status: &DescriptorChain,
        ) -> Result<u32, RequestError> {
            Ok(0)
        }
    }

    fn side(mem: &Arc<LocalMemory>, layout: RingLayout) -> DeviceSide {
        DeviceSide {
            name: "q".into(),
            mem: mem.clone(),
            layout,
            features: RingFeatures::default(),
            kick: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
        }
    }

    /// Posts requests tagged `tags` (one byte each, read by the device).
    fn post(drv: &mut DriverQueue, mem: &LocalMemory, tags: &[u8]) {
        for &t in tags {
            let addr = TAGS + u64::from(t);
            mem.write(addr, &[t]).unwrap();
            drv.add(mem, &[Segment { addr, len: 1 }], &[], false)
                .unwrap();
        }
        drv.publish(mem).unwrap();
    }

    fn pop_all(drv: &mut DriverQueue, mem: &LocalMemory) -> usize {
        let mut n = 0;
        while drv.pop_used(mem).unwrap().is_some() {
            n += 1;
        }
        n
    }

    #[test]
    fn a_resumed_queue_serves_what_the_dead_back_end_left_and_goes_on() {
        let mem = Arc::new(LocalMemory::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap());
        let layout = RingLayout::new(SIZE, 0x1000, 0x2000, 0x3000).unwrap();
        let mut drv = DriverQueue::new(layout, RingFeatures::default(), None);
        drv.init(&*mem).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));

        // A first back-end serves 1..=5 (the ring wraps past SIZE later).
        let mut q = LocalQueue::new(side(&mem, layout), Recorder(seen.clone())).unwrap();
        post(&mut drv, &mem, &[1, 2, 3, 4, 5]);
        assert_eq!(q.poll(64).unwrap().requests, 5);
        assert_eq!(pop_all(&mut drv, &mem), 5);
        // 6 and 7 are made available; the back-end dies before serving
        // them, so used.idx stays at 5, where the VMM resumes the ring.
        post(&mut drv, &mem, &[6, 7]);
        drop(q);
        let state = RingState {
            next_avail: 5,
            next_used: 5,
        };
        let mut q = LocalQueue::resume(side(&mem, layout), Recorder(seen.clone()), state).unwrap();
        assert_eq!(q.ring().state(), state);
        post(&mut drv, &mem, &[8, 9, 10]);
        assert_eq!(q.poll(64).unwrap().requests, 5);
        assert_eq!(pop_all(&mut drv, &mem), 5, "every request completes");
        assert_eq!(q.ring().next_used(), 10);
        assert_eq!(*seen.lock().unwrap(), (1..=10).collect::<Vec<u8>>());

        // A queue starting at 0 instead would read stale avail entries:
        // 10 requests "available" on a ring of 8 is refused.
        let mut fresh = LocalQueue::new(side(&mem, layout), Recorder(seen.clone())).unwrap();
        assert!(
            fresh.poll(64).is_err(),
            "a fresh ring must not accept a jump"
        );
    }
}
