//! A queue whose rings live in local (shared) guest memory.

use std::os::fd::RawFd;
use std::time::Instant;

use super::local_ring::{LocalRing, Popped};
use crate::sidecore::{PollOutcome, QueueFailure, ServedQueue};
use crate::virtio::device::{DeviceModel, DeviceSide};
use crate::virtio::ring::{DescriptorChain, DeviceQueue, QueueError, RingState};

/// One queue served a chain at a time by a [`DeviceModel`] (blk, net TX),
/// on a ring in local guest memory: the unit the vhost-style worker and
/// the local sidecore run.
pub struct LocalQueue<D> {
    ring: LocalRing,
    device: D,
    chain: DescriptorChain,
}

impl<D: DeviceModel> LocalQueue<D> {
    /// A queue on a fresh ring (indices 0) served by `device`; fails when
    /// the rings lie outside `side.mem`.
    pub fn new(side: DeviceSide, device: D) -> Result<Self, QueueError> {
        Ok(Self {
            ring: LocalRing::new(side)?,
            device,
            chain: DescriptorChain::default(),
        })
    }

    /// A queue that resumes at `state` instead of a fresh ring (index 0):
    /// a VMM reconnecting hands over its vring base, and a ring moved here
    /// brings its position along.
    pub fn resume(side: DeviceSide, device: D, state: RingState) -> Result<Self, QueueError> {
        let mut q = Self::new(side, device)?;
        q.ring.queue.set_state(state);
        Ok(q)
    }

    /// The device side of the ring (its position, for a handover).
    pub fn ring(&self) -> &DeviceQueue {
        &self.ring.queue
    }
}

impl<D: DeviceModel> ServedQueue for LocalQueue<D> {
    fn poll(&mut self, budget: usize, _now: Instant) -> Result<PollOutcome, QueueFailure> {
        let mut out = PollOutcome::default();
        for _ in 0..budget {
            let (head, len) = match self.ring.pop(&mut self.chain)? {
                Popped::Empty => break,
                Popped::Chain => {
                    let len = match self.device.process(&*self.ring.mem, &self.chain) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(queue = %self.ring.name, head = self.chain.head, error = %e, "request failed");
                            out.errors += 1;
                            0
                        }
                    };
                    out.requests += 1;
                    out.bytes += self.chain.readable_len() + self.chain.writable_len();
                    (self.chain.head, len)
                }
                Popped::Bad(head) => {
                    self.device.refused_chain();
                    out.errors += 1;
                    (head, 0)
                }
            };
            self.ring.complete(head, len)?;
        }
        if out.requests + out.errors > 0 {
            self.ring.finish()?;
        }
        Ok(out)
    }

    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        self.ring.set_kicks(enabled)
    }

    fn kick_fd(&self) -> Option<RawFd> {
        Some(self.ring.kick_fd())
    }

    fn take_kick(&mut self) -> bool {
        // The kick fd is non-blocking: EAGAIN means no kick.
        self.ring.kick.read().is_ok()
    }

    fn name(&self) -> &str {
        &self.ring.name
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EventFd;

    use crate::virtio::memory::LocalMemory;
    use crate::virtio::ring::{RingFeatures, RingLayout};

    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::device::RequestError;
    use crate::virtio::memory::GuestMemory;
    use crate::virtio::ring::{DriverQueue, Segment};

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
        assert_eq!(q.poll(64, Instant::now()).unwrap().requests, 5);
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
        assert_eq!(q.poll(64, Instant::now()).unwrap().requests, 5);
        assert_eq!(pop_all(&mut drv, &mem), 5, "every request completes");
        assert_eq!(q.ring().next_used(), 10);
        assert_eq!(*seen.lock().unwrap(), (1..=10).collect::<Vec<u8>>());

        // A queue starting at 0 instead would read stale avail entries:
        // 10 requests "available" on a ring of 8 is refused.
        let mut fresh = LocalQueue::new(side(&mem, layout), Recorder(seen.clone())).unwrap();
        assert!(
            fresh.poll(64, Instant::now()).is_err(),
            "a fresh ring must not accept a jump"
        );
    }
}
