//! The vhost-user-blk back-end: virtio-blk features and config from the I/O
//! server, and for every vring the VMM starts, a remote attachment through
//! the VM-host agent.
//!
//! Each vring is attached on its own (one agent thread and one fabric
//! domain per queue) when vhost-user-backend first reports it started and
//! enabled, and detached when the VMM stops it (GET_VRING_BASE). The kick
//! fd stays with vhost-user-backend's epoll thread, which forwards kicks to
//! the agent's kick eventfd; the agent's call eventfd is a listener on that
//! same thread, which signals the vring's current call fd, so a VMM that
//! swaps call fds (masking) is still followed.

use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::{device_features, BlockConfig};
use crate::memory::{GuestMemory, LocalMemory};
use crate::remote::{attach, AgentConfig, AttachedDevice, DeviceAttach, QueueAttach};
use crate::ring::{RingFeatures, RingLayout};

// Offsets in `struct virtio_blk_config` (§5.2.4).
const SIZE_MAX_OFFSET: usize = 8;
const SEG_MAX_OFFSET: usize = 12;
const NUM_QUEUES_OFFSET: usize = 34;
/// Segment size we advertise (SIZE_MAX): the guest's page size.
const SEGMENT: u32 = 4096;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Handler = VringEpollHandler<Arc<VrioBlkBackend>>;

/// What the front needs to reach the I/O server.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    pub server: String,
    pub fabric: vrio_rdma::Backend,
    /// RDMA device for verbs (default: the first one).
    pub device: Option<String>,
    /// Queues offered to the VMM (and written into the config space).
    pub queues: u16,
    pub max_queue_size: u16,
    /// Largest request (data, header and status) the I/O server accepts;
    /// the guest is held under it with SEG_MAX x SIZE_MAX, as virtio-blk
    /// has no field for a request's total size.
    pub max_request: u32,
    /// Device id queue attachments carry: `device_id << 16 | queue`.
    pub device_id: u64,
    pub agent: AgentConfig,
}

#[derive(Default)]
struct QueueState {
    dev: Option<AttachedDevice>,
    /// Our end of the kick we forward to the agent.
    kick: Option<EventFd>,
    /// Our end of the agent's interrupts (an epoll listener).
    call: Option<EventFd>,
    /// What stop_vring needs to drain the ring and report its index.
    ring: Option<(RingLayout, Arc<LocalMemory>, VringRwLock<Mem>)>,
    /// Set when attaching failed; cleared when the VMM restarts the vring.
    failed: bool,
}

#[derive(Default)]
struct State {
    mem: Option<Arc<LocalMemory>>,
    acked: u64,
    queues: Vec<QueueState>,
}

/// The vhost-user back-end; share it as `Arc<VrioBlkBackend>`.
pub struct VrioBlkBackend {
    cfg: FrontConfig,
    config: Vec<u8>,
    features: u64,
    state: Mutex<State>,
    handlers: Mutex<Vec<Weak<Handler>>>,
}

impl VrioBlkBackend {
    /// `server_config` is the config space the I/O server reported (see
    /// [`super::fetch_config`]); its queue count is replaced by ours, as
    /// every queue is attached on its own.
    pub fn new(cfg: FrontConfig, server_config: &[u8]) -> Self {
        let mut config = server_config.to_vec();
        // One segment of headroom for the header and status byte.
        let seg_max = (cfg.max_request / SEGMENT).saturating_sub(1).max(1);
        let server_seg_max = config
            .get(SEG_MAX_OFFSET..SEG_MAX_OFFSET + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .filter(|&s| s > 0)
            .unwrap_or(seg_max);
        let seg_max = seg_max.min(server_seg_max);
        for (off, v) in [
            (SIZE_MAX_OFFSET, &SEGMENT.to_le_bytes()[..]),
            (SEG_MAX_OFFSET, &seg_max.to_le_bytes()[..]),
            (NUM_QUEUES_OFFSET, &cfg.queues.to_le_bytes()[..]),
        ] {
            if let Some(dst) = config.get_mut(off..off + v.len()) {
                dst.copy_from_slice(v);
            }
        }
        // The wire does not carry the server's feature bits; these are the
        // ones its BlockDevice offers for a writable disk, plus SIZE_MAX.
        let blk = BlockConfig {
            size_max: Some(SEGMENT),
            ..BlockConfig::default()
        };
        let features =
            device_features(&blk, false) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let queues = (0..cfg.queues).map(|_| QueueState::default()).collect();
        Self {
            cfg,
            config,
            features,
            state: Mutex::new(State {
                queues,
                ..State::default()
            }),
            handlers: Mutex::new(Vec::new()),
        }
    }

    /// Hands over the daemon's epoll handlers, where agent interrupts are
    /// registered (call once the daemon exists).
    pub fn set_handlers(&self, handlers: &[Arc<Handler>]) {
        if let Ok(mut h) = self.handlers.lock() {
            *h = handlers.iter().map(Arc::downgrade).collect();
        }
    }

    /// Number of queues currently attached to the I/O server.
    pub fn attached_queues(&self) -> usize {
        self.lock()
            .queues
            .iter()
            .filter(|q| q.dev.is_some())
            .count()
    }

    /// Detaches every queue (the VMM went away).
    pub fn detach_all(&self) {
        let n = self.lock().queues.len();
        for q in 0..n {
            self.detach(q, false);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the front down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handler(&self) -> Option<Arc<Handler>> {
        let h = self.handlers.lock().ok()?;
        h.first().and_then(Weak::upgrade)
    }

    fn call_event(&self, q: usize) -> u64 {
        // vhost-user-backend reserves 0..=num_queues.
        (usize::from(self.cfg.queues) + 1 + q) as u64
    }

    /// Detaches queue `q`. With `drain`, first waits (bounded) for the
    /// requests the guest made available to complete, and afterwards sets
    /// the vring's indices to where the ring stopped, so GET_VRING_BASE
    /// reports it to the VMM.
    fn detach(&self, q: usize, drain: bool) {
        let ring = self.lock().queues.get(q).and_then(|qs| qs.ring.clone());
        let stopped_at = match (&ring, drain) {
            (Some((layout, mem, _)), true) => Some(drain_ring(q, layout, mem)),
            _ => None,
        };
        let (dev, call) = {
            let mut st = self.lock();
            let Some(qs) = st.queues.get_mut(q) else {
                return;
            };
            qs.kick = None;
            qs.failed = false;
            qs.ring = None;
            (qs.dev.take(), qs.call.take())
        };
        if let (Some(call), Some(h)) = (&call, self.handler()) {
            let _ = h.unregister_listener(call.as_raw_fd(), EventSet::IN, self.call_event(q));
        }
        if let Some(mut d) = dev {
            d.detach();
            tracing::info!(queue = q, "queue detached from the I/O server");
        }
        if let (Some((_, _, vring)), Some(idx)) = (ring, stopped_at) {
            vring.set_queue_next_avail(idx);
            vring.set_queue_next_used(idx);
        }
    }

    /// Attaches vring `q` if it is not yet; returns whether it is attached.
    fn ensure_attached(&self, q: usize, vring: &VringRwLock<Mem>) -> bool {
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
        if qs.failed {
            return false;
        }
        let mem_for_ring = mem.clone();
        match self.attach_queue(q, vring, mem, acked) {
            Ok((dev, kick, call, layout)) => {
                qs.ring = Some((layout, mem_for_ring, vring.clone()));
                qs.dev = Some(dev);
                qs.kick = Some(kick);
                qs.call = Some(call);
                tracing::info!(queue = q, server = %self.cfg.server, "queue attached to the I/O server");
                true
            }
            Err(e) => {
                tracing::error!(queue = q, error = %e, "cannot attach the queue; it stays unserved");
                qs.failed = true;
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
    ) -> Result<(AttachedDevice, EventFd, EventFd, RingLayout), String> {
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
        if base != 0 {
            // The agent and the server both start a ring at index 0.
            return Err(format!(
                "the VMM resumes the ring at {base}; only fresh rings can be attached"
            ));
        }
        let layout = RingLayout::new(size, desc, avail, used).map_err(|e| e.to_string())?;
        tracing::info!(queue = q, size, desc, avail, used, "attaching vring");
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
        let domain: Arc<dyn vrio_rdma::Domain> = Arc::from(
            vrio_rdma::open(self.cfg.fabric, self.cfg.device.as_deref())
                .map_err(|e| e.to_string())?,
        );
        let dev = attach(
            domain,
            &self.cfg.server,
            DeviceAttach {
                device_id: self.cfg.device_id << 16 | q as u64,
                mem,
                queues: vec![QueueAttach {
                    layout,
                    features: RingFeatures::from_bits(acked),
                    kick: agent_kick,
                    call: agent_call,
                    start: 0,
                }],
            },
            self.cfg.agent,
        );
        match dev {
            Ok(d) => Ok((d, kick, call, layout)),
            Err(e) => {
                let _ =
                    handler.unregister_listener(call.as_raw_fd(), EventSet::IN, self.call_event(q));
                Err(e.to_string())
            }
        }
    }

    fn forward_kick(&self, q: usize) {
        let st = self.lock();
        if let Some(k) = st.queues.get(q).and_then(|qs| qs.kick.as_ref()) {
            let _ = k.write(1);
        }
    }

    fn forward_call(&self, q: usize, vrings: &[VringRwLock<Mem>]) {
        let fired = {
            let st = self.lock();
            st.queues
                .get(q)
                .and_then(|qs| qs.call.as_ref())
                .is_some_and(|c| c.read().is_ok())
        };
        if fired {
            if let Some(v) = vrings.get(q) {
                if let Err(e) = v.signal_used_queue() {
                    tracing::warn!(queue = q, error = %e, "cannot interrupt the guest");
                }
            }
        }
    }
}

/// How long a stopping vring may take to finish its requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until the used index catches up with the avail index (every
/// request the guest made available has completed) or the timeout passes;
/// returns the used index.
fn drain_ring(q: usize, layout: &RingLayout, mem: &LocalMemory) -> u16 {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let avail = mem.load_u16(layout.avail_idx()).unwrap_or(0);
        let used = mem.load_u16(layout.used_idx()).unwrap_or(0);
        if used == avail {
            return used;
        }
        if Instant::now() > deadline {
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

impl Drop for VrioBlkBackend {
    fn drop(&mut self) {
        self.detach_all();
    }
}

impl VhostUserBackend for VrioBlkBackend {
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
        self.lock().acked = features;
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
        let local = Arc::new(mem.memory().deref().clone());
        let regions: Vec<String> = local
            .iter()
            .map(|r| format!("{:#x}+{:#x}", r.start_addr().0, r.len()))
            .collect();
        tracing::info!(?regions, "memory table");
        let mut st = self.lock();
        let same = st.mem.as_ref().is_some_and(|old| {
            old.iter()
                .map(|r| (r.start_addr(), r.len()))
                .eq(local.iter().map(|r| (r.start_addr(), r.len())))
        });
        if !same && st.queues.iter().any(|q| q.dev.is_some()) {
            // Attached queues keep the regions they registered (the old
            // mappings stay alive); new regions reach queues attached from
            // now on.
            tracing::warn!("memory table changed while queues are attached");
        }
        st.mem = Some(local);
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
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::config_space;
    use crate::ring::layout::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SIZE_MAX};

    fn front(queues: u16, max_request: u32) -> FrontConfig {
        FrontConfig {
            server: "127.0.0.1:1".into(),
            fabric: vrio_rdma::Backend::Soft,
            device: None,
            queues,
            max_queue_size: 256,
            max_request,
            device_id: 7,
            agent: AgentConfig::default(),
        }
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn config_keeps_the_server_capacity_and_bounds_requests() {
        let server = config_space(&BlockConfig::default(), 0x8_0000);
        let b = VrioBlkBackend::new(front(3, 128 << 10), &server);
        let c = b.get_config(0, server.len() as u32);
        assert_eq!(&c[0..8], &server[0..8], "capacity");
        assert_eq!(le32(&c, SIZE_MAX_OFFSET), SEGMENT);
        // 31 page segments plus header and status stay under 128 KiB.
        assert_eq!(le32(&c, SEG_MAX_OFFSET), 31);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3, "num_queues");
        assert_eq!(&c[36..], &server[36..], "discard and write-zeroes limits");
        // Partial and out-of-range reads, as the VMM may issue them.
        assert_eq!(b.get_config(20, 4), server[20..24].to_vec());
        assert_eq!(b.get_config(1000, 4), vec![0; 4]);
        assert_eq!(b.get_config(92, 8), [&server[92..96], &[0; 4][..]].concat());
    }

    #[test]
    fn a_small_server_seg_max_wins() {
        let server = config_space(
            &BlockConfig {
                seg_max: 4,
                ..BlockConfig::default()
            },
            8,
        );
        let b = VrioBlkBackend::new(front(1, 1 << 20), &server);
        assert_eq!(le32(&b.get_config(0, 16), SEG_MAX_OFFSET), 4);
    }

    #[test]
    fn features_and_protocol_features() {
        let b = VrioBlkBackend::new(front(2, 128 << 10), &[0; 60]);
        let f = b.features();
        for bit in [
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = b.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert_eq!(b.num_queues(), 2);
        assert_eq!(b.max_queue_size(), 256);
        assert_eq!(b.attached_queues(), 0);
    }
}
