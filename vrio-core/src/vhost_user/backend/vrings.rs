//! Each vring's life: attached (remote or to the local sidecore) when it
//! first starts or a rescan finds requests on it, kicks forwarded to whoever
//! serves it, their interrupts forwarded to the vring's call fd, and
//! detached (drained) when the VMM stops it.
//!
//! Reconnect (QEMU `-chardev socket,reconnect-ms=...` after this process
//! died): QEMU resumes each vring at its used index, and every request
//! before it has completed, as both models complete in avail order. The
//! vring is attached at that base, so what was in flight is served again.
//! The kick that announced it may have been eaten by the dead process, so a
//! timer ([`super::RESCAN`]) attaches a started vring with requests waiting
//! even without a kick, and a resumed vring interrupts the guest once, in
//! case the dead process published completions without signalling them.
//!
//! With the VMM's inflight region ([`VrioBackend::set_inflight`], from
//! the relay), each vring's avail and used entries are recorded in it (on
//! kicks, completions and the rescan tick: see [`crate::vhost_user::inflight`]),
//! and an attach first reads it back: the requests it holds in flight are
//! the ones resubmitted, reconciled with the used ring and the VMM's base.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::BlockDevice;
use crate::models::LocalQueue;
use crate::remote::{
    attach_placed, AgentConfig, AttachedDevice, DeviceAttach, DeviceKind, QueueAttach, QueueTarget,
};
use crate::vhost_user::inflight::{InflightRegion, QueueTracker};
use crate::virtio::device::DeviceSide;
use crate::virtio::memory::{GuestMemory, LocalMemory};
use crate::virtio::ring::{RingFeatures, RingLayout, RingState};

use super::serving::{RemoteFront, Serving};
use super::{Mem, State, VrioBackend};

/// Whoever serves one attached vring.
enum Served {
    Remote(Arc<AttachedDevice>),
    /// The queue's id on the local sidecore.
    Local(u64),
}

#[derive(Default)]
/// One vring's attachment; the rest of the back-end sees only whether it
/// is attached, its vring, and the hot-plug pause.
pub(super) struct QueueState {
    dev: Option<Served>,
    /// Our end of the kick we forward to the agent.
    kick: Option<EventFd>,
    /// Our end of the agent's interrupts (an epoll listener).
    call: Option<EventFd>,
    /// What stop_vring needs to drain the ring and report its index.
    ring: Option<(RingLayout, Arc<LocalMemory>, VringRwLock<Mem>)>,
    /// Set when attaching failed; cleared when the VMM restarts the vring.
    failed: bool,
    /// Held detached while the memory table changes (no kick re-attaches).
    pub(super) paused: bool,
    /// This vring's bookkeeping in the inflight region.
    tracker: Option<QueueTracker>,
}

impl QueueState {
    pub(super) fn is_attached(&self) -> bool {
        self.dev.is_some()
    }

    /// The vring, while attached.
    pub(super) fn vring(&self) -> Option<&VringRwLock<Mem>> {
        self.ring.as_ref().map(|r| &r.2)
    }
}

/// A vring just attached: who serves it, our ends of its kick and call,
/// where it lives, the index it resumed at and its inflight bookkeeping.
struct Attached {
    dev: Served,
    kick: EventFd,
    call: EventFd,
    layout: RingLayout,
    base: u16,
    tracker: Option<QueueTracker>,
}

impl VrioBackend {
    /// The agents of the vrings a remote server serves now.
    pub(super) fn remote_devices(&self) -> Vec<(usize, Arc<AttachedDevice>)> {
        self.lock()
            .queues
            .iter()
            .enumerate()
            .filter_map(|(q, qs)| match &qs.dev {
                Some(Served::Remote(d)) => Some((q, d.clone())),
                _ => None,
            })
            .collect()
    }

    /// Records vring `q`'s progress in the inflight region.
    fn sync_inflight(&self, q: usize) {
        Self::sync_locked(&mut self.lock(), q);
    }

    fn sync_locked(st: &mut State, q: usize) {
        let Some(region) = st.inflight.as_deref() else {
            return;
        };
        let Some(qs) = st.queues.get_mut(q) else {
            return;
        };
        let (Some(t), Some((_, mem, _))) = (qs.tracker.as_mut(), qs.ring.as_ref()) else {
            return;
        };
        if let Err(e) = t.sync(region, mem.as_ref()) {
            tracing::warn!(queue = q, error = %e, "inflight bookkeeping stopped for this vring");
            qs.tracker = None;
        }
    }

    /// Attaches every started, enabled vring that has requests waiting but
    /// is not attached yet (its kick went to a back-end that died).
    pub(super) fn rescan(&self, vrings: &[VringRwLock<Mem>]) {
        let Some(mem) = self.lock().mem.clone() else {
            return;
        };
        for (q, v) in vrings.iter().enumerate() {
            // Requests the server fetched without a kick (EVENT_IDX) and
            // completions it did not signal reach the region here at the
            // latest.
            self.sync_inflight(q);
            let idle = self
                .lock()
                .queues
                .get(q)
                .is_some_and(|qs| qs.dev.is_none() && !qs.failed && !qs.paused);
            if !idle {
                continue;
            }
            let (running, avail_ring, next) = {
                let r = v.get_ref();
                let qu = r.get_queue();
                (
                    qu.ready() && r.is_enabled(),
                    qu.avail_ring(),
                    qu.next_avail(),
                )
            };
            if !running {
                continue;
            }
            // avail.idx follows the flags word.
            let avail = mem.load_u16(avail_ring + 2).unwrap_or(next);
            if avail != next {
                tracing::info!(
                    queue = q,
                    avail,
                    base = next,
                    "requests wait on a vring no kick announced; attaching it"
                );
                if self.ensure_attached(q, v) {
                    self.forward_kick(q);
                }
            }
        }
    }

    /// Detaches queue `q`. With `drain`, first waits (bounded) for the
    /// requests the guest made available to complete, and afterwards sets
    /// the vring's indices to where the ring stopped, so GET_VRING_BASE
    /// reports it to the VMM.
    pub(super) fn detach(&self, q: usize, drain: bool) {
        let ring = self.lock().queues.get(q).and_then(|qs| qs.ring.clone());
        // A net RX ring always holds empty buffers: nothing to wait for.
        let wait = match self.kind {
            DeviceKind::Net { .. } if q == crate::net::RX_QUEUE => Duration::ZERO,
            _ => DRAIN_TIMEOUT,
        };
        let stopped_at = match (&ring, drain) {
            (Some((layout, mem, _)), true) => {
                // vhost-user-backend took the kick fd off its epoll before
                // calling us: a kick it had not read yet is gone. Announce
                // whatever the guest made available, or the drain waits
                // for requests the agent never heard of.
                self.forward_kick(q);
                Some(drain_ring(q, layout, mem, wait))
            }
            _ => None,
        };
        if stopped_at.is_some() {
            self.sync_inflight(q);
        }
        let (dev, call) = {
            let mut st = self.lock();
            let Some(qs) = st.queues.get_mut(q) else {
                return;
            };
            qs.kick = None;
            qs.failed = false;
            qs.ring = None;
            qs.tracker = None;
            (qs.dev.take(), qs.call.take())
        };
        if let (Some(call), Some(h)) = (&call, self.handler()) {
            let _ = h.unregister_listener(call.as_raw_fd(), EventSet::IN, self.call_event(q));
        }
        match (dev, &self.cfg.serving) {
            (Some(Served::Remote(d)), Serving::Remote(r)) => {
                r.placement.set_attached(q, None);
                d.detach();
                tracing::info!(queue = q, "queue detached from the I/O server");
            }
            (Some(Served::Local(id)), Serving::Local(l)) => match l.sidecore.remove(id) {
                Ok(_) => tracing::info!(queue = q, "queue removed from the local sidecore"),
                Err(e) => tracing::warn!(queue = q, error = %e, "cannot remove the queue"),
            },
            _ => {}
        }
        if let (Some((layout, mem, vring)), Some(drained)) = (ring, stopped_at) {
            // The server may have completed more between the drain and
            // its stop; in avail order, the used index says how far.
            let idx = mem.load_u16(layout.used_idx()).unwrap_or(drained);
            vring.set_queue_next_avail(idx);
            vring.set_queue_next_used(idx);
        }
    }

    /// Attaches vring `q` if it is not yet; returns whether it is attached.
    pub(super) fn ensure_attached(&self, q: usize, vring: &VringRwLock<Mem>) -> bool {
        let mut st = self.lock();
        let acked = st.acked;
        let Some(mem) = st.mem.clone() else {
            tracing::warn!(queue = q, "vring started before the memory table");
            return false;
        };
        let Some(qs) = st.queues.get_mut(q) else {
            return false;
        };
        if qs.dev.is_some() {
            return true;
        }
        if qs.failed || qs.paused {
            return false;
        }
        let log = if acked & super::VHOST_F_LOG_ALL != 0 {
            st.dirty_log.clone()
        } else {
            None
        };
        let mem_for_ring = mem.clone();
        match self.attach_queue(q, vring, mem, acked, st.inflight.as_deref()) {
            Ok(a) => {
                let Some(qs) = st.queues.get_mut(q) else {
                    return false;
                };
                let base = a.base;
                if let (Some(log), Served::Remote(d)) = (log, &a.dev) {
                    // A vring started while the VMM migrates.
                    if let Err(e) = d.set_log(Some(log)) {
                        tracing::error!(queue = q, error = %e, "the I/O server did not confirm dirty logging");
                    }
                }
                qs.ring = Some((a.layout, mem_for_ring, vring.clone()));
                qs.dev = Some(a.dev);
                qs.kick = Some(a.kick);
                qs.call = Some(a.call);
                qs.tracker = a.tracker;
                tracing::info!(queue = q, to = %self.cfg.serving.name(), base, "queue attached");
                if base != 0 {
                    // The back-end before us may have published completions
                    // and died before signalling them; a spurious interrupt
                    // costs the guest a look at the used ring.
                    if let Err(e) = vring.signal_used_queue() {
                        tracing::warn!(queue = q, error = %e, "cannot interrupt the guest");
                    }
                }
                true
            }
            Err(e) => {
                tracing::error!(queue = q, error = %e, "cannot attach the queue; it stays unserved");
                if let Some(qs) = st.queues.get_mut(q) {
                    qs.failed = true;
                }
                false
            }
        }
    }

    fn attach_queue(
        &self,
        q: usize,
        vring: &VringRwLock<Mem>,
        mem: Arc<LocalMemory>,
        acked: u64,
        inflight: Option<&InflightRegion>,
    ) -> Result<Attached, String> {
        let (size, desc, avail, used, base) = {
            let v = vring.get_ref();
            let qu = v.get_queue();
            (
                qu.size(),
                qu.desc_table(),
                qu.avail_ring(),
                qu.used_ring(),
                qu.next_avail(),
            )
        };
        let layout = RingLayout::new(size, desc, avail, used).map_err(|e| e.to_string())?;
        tracing::info!(queue = q, size, desc, avail, used, base, "attaching vring");
        let (base, tracker) = match inflight
            .map(|r| QueueTracker::recover(r, q, layout, mem.as_ref(), base))
        {
            None => (base, None),
            Some(Ok((tracker, rec))) => {
                // Both models serve the avail ring in order from `start`,
                // so the resubmitted requests go first, in counter order.
                tracing::info!(
                    queue = q,
                    resubmitted = rec.resubmit.len(),
                    heads = ?rec.resubmit,
                    start = rec.start,
                    vmm_base = base,
                    completed_since = rec.completed_since,
                    beyond = rec.beyond,
                    stale = rec.stale,
                    fresh = rec.fresh,
                    "resubmitting requests from the inflight region"
                );
                (rec.start, Some(tracker))
            }
            Some(Err(e)) => {
                tracing::warn!(queue = q, error = %e, "cannot use the inflight region for this vring; resuming at the VMM's base");
                (base, None)
            }
        };
        if base != 0 {
            let avail_idx = mem.load_u16(layout.avail_idx()).unwrap_or(base);
            // Outstanding: in flight when the last back-end died, or made
            // available since; all are served from `base` on.
            tracing::info!(
                queue = q,
                base,
                outstanding = avail_idx.wrapping_sub(base),
                "resuming the vring at the VMM's base"
            );
        }
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let agent_kick = kick.try_clone().map_err(|e| e.to_string())?;
        let agent_call = call.try_clone().map_err(|e| e.to_string())?;
        let handler = self
            .handler()
            .ok_or_else(|| "no epoll handler to receive interrupts".to_string())?;
        handler
            .register_listener(call.as_raw_fd(), EventSet::IN, self.call_event(q))
            .map_err(|e| format!("register the interrupt listener: {e}"))?;
        let features = RingFeatures::from_bits(acked);
        let dev = match &self.cfg.serving {
            Serving::Remote(r) => attach_remote(
                r, self.kind, q, mem, layout, features, base, agent_kick, agent_call,
            ),
            Serving::Local(l) => {
                let side = DeviceSide {
                    name: format!("vhost-user-blk/q{q}"),
                    mem,
                    layout,
                    features,
                    kick: agent_kick,
                    call: agent_call,
                };
                let device = BlockDevice::new(l.backend.clone(), l.blk.clone());
                // Like the remote model, the sidecore completes in avail
                // order, so the base is also where the used ring stands.
                let state = RingState {
                    next_avail: base,
                    next_used: base,
                };
                LocalQueue::resume(side, device, state)
                    .map_err(|e| e.to_string())
                    .and_then(|lq| l.sidecore.add(Box::new(lq)).map_err(|e| e.to_string()))
                    .map(Served::Local)
            }
        };
        match dev {
            Ok(dev) => Ok(Attached {
                dev,
                kick,
                call,
                layout,
                base,
                tracker,
            }),
            Err(e) => {
                let _ =
                    handler.unregister_listener(call.as_raw_fd(), EventSet::IN, self.call_event(q));
                Err(e.to_string())
            }
        }
    }

    pub(super) fn forward_kick(&self, q: usize) {
        let mut st = self.lock();
        // Recorded before the server can fetch what the kick announces.
        Self::sync_locked(&mut st, q);
        if let Some(k) = st.queues.get(q).and_then(|qs| qs.kick.as_ref()) {
            let _ = k.write(1);
        }
    }

    pub(super) fn forward_call(&self, q: usize, vrings: &[VringRwLock<Mem>]) {
        let fired = {
            let st = self.lock();
            st.queues
                .get(q)
                .and_then(|qs| qs.call.as_ref())
                .is_some_and(|c| c.read().is_ok())
        };
        if fired {
            self.sync_inflight(q);
            if let Some(v) = vrings.get(q) {
                if let Err(e) = v.signal_used_queue() {
                    tracing::warn!(queue = q, error = %e, "cannot interrupt the guest");
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attach_remote(
    r: &RemoteFront,
    kind: DeviceKind,
    q: usize,
    mem: Arc<LocalMemory>,
    layout: RingLayout,
    features: RingFeatures,
    start: u16,
    kick: EventFd,
    call: EventFd,
) -> Result<Served, String> {
    let domain: Arc<dyn vrio_rdma::Domain> =
        Arc::from(vrio_rdma::open(r.fabric, r.device.as_deref()).map_err(|e| e.to_string())?);
    let target = r
        .placement
        .target(q)
        .unwrap_or_else(|| QueueTarget::any(&r.server));
    attach_placed(
        domain,
        vec![target],
        DeviceAttach {
            device_id: r.device_id,
            mem,
            queues: vec![QueueAttach {
                layout,
                features,
                kick,
                call,
                // The VMM's vring base: after a stop (GET_VRING_BASE drains
                // first) or a back-end crash (QEMU then takes used.idx),
                // every request before it has completed, as the remote
                // model completes in avail order.
                start,
            }],
            credential: r.credential.clone(),
        },
        AgentConfig {
            queue_base: q as u16,
            device: kind,
            ..r.agent
        },
    )
    .map(|d| {
        let d = Arc::new(d);
        r.placement.set_attached(q, Some(d.clone()));
        Served::Remote(d)
    })
    .map_err(|e| e.to_string())
}

/// How long a stopping vring may take to finish its requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until the used index catches up with the avail index (every
/// request the guest made available has completed) or `timeout` passes;
/// returns the used index.
fn drain_ring(q: usize, layout: &RingLayout, mem: &LocalMemory, timeout: Duration) -> u16 {
    let deadline = Instant::now() + timeout;
    loop {
        let avail = mem.load_u16(layout.avail_idx()).unwrap_or(0);
        let used = mem.load_u16(layout.used_idx()).unwrap_or(0);
        if used == avail {
            return used;
        }
        if Instant::now() >= deadline {
            if timeout.is_zero() {
                return used;
            }
            tracing::warn!(
                queue = q,
                avail,
                used,
                "stopping a vring with requests still in flight"
            );
            return used;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
