//! The front the VMM talks to: vhost-user-backend calls these for the
//! VMM's messages (features, config, memory table, vring stops) and for
//! the events of its epoll thread (kicks, interrupts, the rescan tick).

use std::io;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::{Mem, VrioBackend};

impl VhostUserBackend for VrioBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.max_queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.set_acked(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.detach_all();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The agent reads EVENT_IDX from the acked features.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (o, n) = (offset as usize, size as usize);
        let mut out = vec![0u8; n];
        if let Some(src) = self.config.get(o..) {
            let k = src.len().min(n);
            out[..k].copy_from_slice(&src[..k]);
        }
        out
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.set_memory(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.detach(queue_index as usize, true);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned here would end the epoll thread: log instead.
        let ev = usize::from(device_event);
        let nq = usize::from(self.cfg.queues);
        if ev < nq {
            if let Some(v) = vrings.get(ev) {
                if self.ensure_attached(ev, v) {
                    self.forward_kick(ev);
                }
            }
        } else if ev > nq && ev - nq - 1 < nq {
            self.forward_call(ev - nq - 1, vrings);
        } else if ev as u64 == self.rescan_event() {
            let ticked = self
                .rescan
                .lock()
                .ok()
                .and_then(|mut t| t.as_mut().map(|t| t.wait().is_ok()))
                .unwrap_or(false);
            if ticked {
                self.rescan(vrings);
            }
        }
        Ok(())
    }
}
