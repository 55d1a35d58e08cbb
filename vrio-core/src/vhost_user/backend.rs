//! The vhost-user-blk back-end: virtio-blk features and config, and for
//! every vring the VMM starts, someone to serve it: a remote attachment
//! through the VM-host agent ([`Serving::Remote`]), or a local sidecore
//! over the guest memory the VMM shared ([`Serving::Local`]).
//!
//! Each vring is attached on its own (remote: one agent thread and one
//! fabric domain per queue; local: one `LocalQueue` on the shared sidecore)
//! when vhost-user-backend first reports it started and enabled, and
//! detached when the VMM stops it (GET_VRING_BASE). The kick
//! fd stays with vhost-user-backend's epoll thread, which forwards kicks to
//! the agent's (or sidecore queue's) kick eventfd; their call eventfd is a
//! listener on that same thread, which signals the vring's current call fd, so a VMM that
//! swaps call fds (masking) is still followed.
//!
//! Reconnect (QEMU `-chardev socket,reconnect-ms=...` after this process
//! died): QEMU resumes each vring at its used index, and every request
//! before it has completed, as both models complete in avail order. The
//! vring is attached at that base, so what was in flight is served again.
//! The kick that announced it may have been eaten by the dead process, so a
//! timer ([`RESCAN`]) attaches a started vring with requests waiting even
//! without a kick, and a resumed vring interrupts the guest once, in case
//! the dead process published completions without signalling them.
//!
//! With the VMM's inflight region ([`VrioBackend::set_inflight`], from
//! the relay), each vring's avail and used entries are recorded in it (on
//! kicks, completions and the rescan tick: see [`super::inflight`]), and an
//! attach first reads it back: the requests it holds in flight are the
//! ones resubmitted, reconciled with the used ring and the VMM's base.
//!
//! Memory hot-plug: a new memory table while vrings run detaches each
//! attached vring (drained) and attaches it again at its index with the
//! new table, so the agent registers the new regions with the fabric (or
//! the sidecore queue gets the new mappings).

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
use vmm_sys_util::timerfd::TimerFd;

use crate::blk::{config_space, device_features, BlockBackend, BlockConfig, BlockDevice};
use crate::memory::{GuestMemory, LocalMemory};
use crate::models::{DeviceSide, LocalQueue};
use crate::remote::{
    attach_placed, AgentConfig, AttachedDevice, DeviceAttach, DeviceKind, QueueAttach, QueueTarget,
};
use crate::ring::{RingFeatures, RingLayout, RingState};
use crate::sidecore::SidecoreHandle;

use super::inflight::{InflightRegion, QueueTracker};

// Offsets in `struct virtio_blk_config` (§5.2.4).
const SIZE_MAX_OFFSET: usize = 8;
const SEG_MAX_OFFSET: usize = 12;
const NUM_QUEUES_OFFSET: usize = 34;
/// Segment size we advertise (SIZE_MAX): the guest's page size.
const SEGMENT: u32 = 4096;
/// How often started but unattached vrings are checked for requests that
/// no kick announced (see the module docs).
pub const RESCAN: Duration = Duration::from_millis(100);

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Handler = VringEpollHandler<Arc<VrioBackend>>;

/// The front: what the VMM is offered and who serves the vrings.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    pub serving: Serving,
    /// Queues offered to the VMM (and written into the config space).
    pub queues: u16,
    pub max_queue_size: u16,
}

/// Who serves the vrings.
#[derive(Debug, Clone)]
pub enum Serving {
    /// A remote I/O server, through the VM-host agent and the fabric.
    Remote(RemoteFront),
    /// A sidecore on this host, over the guest memory from SET_MEM_TABLE.
    Local(LocalFront),
}

/// What the front needs to reach the I/O server.
#[derive(Debug, Clone)]
pub struct RemoteFront {
    pub server: String,
    pub fabric: vrio_rdma::Backend,
    /// RDMA device for verbs (default: the first one).
    pub device: Option<String>,
    /// Largest request (data, header and status) the I/O server accepts;
    /// the guest is held under it with SEG_MAX x SIZE_MAX, as virtio-blk
    /// has no field for a request's total size.
    pub max_request: u32,
    /// Device id the queue attachments carry (vring q attaches as queue q
    /// of this device).
    pub device_id: u64,
    pub agent: AgentConfig,
    /// Where each vring goes and which agent serves it; a controller
    /// follower reads and updates it.
    pub placement: Arc<Placement>,
}

/// Per-vring placement, shared by the front's sessions and a controller
/// follower (`vrio-client vhost-user-blk --controller`).
#[derive(Default)]
pub struct Placement {
    /// Where to attach vring q; None: [`RemoteFront::server`], the
    /// server's choice of sidecore.
    pub targets: Mutex<Vec<Option<QueueTarget>>>,
    /// The agent serving vring q while it runs (its one queue, index 0).
    pub attached: Mutex<Vec<Option<Arc<AttachedDevice>>>>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("targets", &self.targets.lock().map(|t| t.clone()).ok())
            .finish_non_exhaustive()
    }
}

impl Placement {
    pub fn target(&self, q: usize) -> Option<QueueTarget> {
        self.targets.lock().ok()?.get(q).cloned().flatten()
    }
    pub fn set_target(&self, q: usize, t: QueueTarget) {
        if let Ok(mut v) = self.targets.lock() {
            if v.len() <= q {
                v.resize(q + 1, None);
            }
            v[q] = Some(t);
        }
    }
    pub fn attached(&self, q: usize) -> Option<Arc<AttachedDevice>> {
        self.attached.lock().ok()?.get(q).cloned().flatten()
    }
    fn set_attached(&self, q: usize, d: Option<Arc<AttachedDevice>>) {
        if let Ok(mut v) = self.attached.lock() {
            if v.len() <= q {
                v.resize(q + 1, None);
            }
            v[q] = d;
        }
    }
}

/// A local sidecore serving the vrings from a block back-end.
#[derive(Clone)]
pub struct LocalFront {
    pub backend: Arc<dyn BlockBackend>,
    /// The device every queue runs (limits, read-only).
    pub blk: BlockConfig,
    /// Shared by every queue and every VMM session of this daemon.
    pub sidecore: Arc<SidecoreHandle>,
}

impl std::fmt::Debug for LocalFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFront")
            .field("capacity", &self.backend.capacity())
            .field("blk", &self.blk)
            .finish_non_exhaustive()
    }
}

impl LocalFront {
    /// The device's config space, as [`VrioBackend::new`] takes it.
    pub fn config_space(&self) -> Vec<u8> {
        config_space(&self.blk, self.backend.capacity())
    }
}

impl Serving {
    /// Largest request the server side takes, header and status included.
    fn max_request(&self) -> u32 {
        match self {
            Serving::Remote(r) => r.max_request,
            Serving::Local(l) => l.blk.max_request_bytes.saturating_add(SEGMENT),
        }
    }

    fn read_only(&self) -> bool {
        match self {
            Serving::Remote(_) => false,
            Serving::Local(l) => l.blk.read_only || l.backend.read_only(),
        }
    }

    fn name(&self) -> String {
        match self {
            Serving::Remote(r) => format!("the I/O server {}", r.server),
            Serving::Local(_) => "the local sidecore".into(),
        }
    }
}

/// Whoever serves one attached vring.
enum Served {
    Remote(Arc<AttachedDevice>),
    /// The queue's id on the local sidecore.
    Local(u64),
}

#[derive(Default)]
struct QueueState {
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
    paused: bool,
    /// This vring's bookkeeping in the inflight region.
    tracker: Option<QueueTracker>,
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

#[derive(Default)]
struct State {
    mem: Option<Arc<LocalMemory>>,
    acked: u64,
    queues: Vec<QueueState>,
    /// The VMM's inflight region (SET_INFLIGHT_FD through the relay).
    inflight: Option<Arc<InflightRegion>>,
}

/// The vhost-user back-end; share it as `Arc<VrioBackend>`. It serves
/// virtio-blk ([`VrioBackend::new`]) or, remote only, virtio-net
/// (`net_backend`, in `net.rs`, which builds on this module): the vring
/// plumbing is the same, only the features, config space and the kind the
/// agent declares differ.
pub struct VrioBackend {
    cfg: FrontConfig,
    config: Vec<u8>,
    features: u64,
    /// What the agent declares to the I/O server for every queue.
    kind: DeviceKind,
    state: Mutex<State>,
    handlers: Mutex<Vec<Weak<Handler>>>,
    rescan: Mutex<Option<TimerFd>>,
}

impl VrioBackend {
    /// `server_config` is the config space the I/O server reported (see
    /// [`super::fetch_config`]) or [`LocalFront::config_space`]; its queue
    /// count is replaced by ours, as every queue is attached on its own.
    pub fn new(cfg: FrontConfig, server_config: &[u8]) -> Self {
        let mut config = server_config.to_vec();
        // One segment of headroom for the header and status byte.
        let seg_max = (cfg.serving.max_request() / SEGMENT)
            .saturating_sub(1)
            .max(1);
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
        let features = device_features(&blk, cfg.serving.read_only())
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        Self::with_device(cfg, config, features, DeviceKind::Blk)
    }

    /// A back-end offering `features` (PROTOCOL_FEATURES included) and
    /// `config`, whose queues the agent attaches as `kind`.
    pub(super) fn with_device(
        cfg: FrontConfig,
        config: Vec<u8>,
        features: u64,
        kind: DeviceKind,
    ) -> Self {
        let queues = (0..cfg.queues).map(|_| QueueState::default()).collect();
        Self {
            cfg,
            config,
            features,
            kind,
            state: Mutex::new(State {
                queues,
                ..State::default()
            }),
            handlers: Mutex::new(Vec::new()),
            rescan: Mutex::new(None),
        }
    }

    /// Hands over the daemon's epoll handlers, where agent interrupts are
    /// registered (call once the daemon exists).
    pub fn set_handlers(&self, handlers: &[Arc<Handler>]) {
        if let Ok(mut h) = self.handlers.lock() {
            *h = handlers.iter().map(Arc::downgrade).collect();
        }
        let timer = TimerFd::new()
            .and_then(|mut t| t.reset(RESCAN, Some(RESCAN)).map(|_| t))
            .map_err(|e| io::Error::from_raw_os_error(e.errno()));
        let registered = match (timer, handlers.first()) {
            (Ok(t), Some(h)) => h
                .register_listener(t.as_raw_fd(), EventSet::IN, self.rescan_event())
                .map(|_| t),
            (Err(e), _) => Err(e),
            (_, None) => Err(io::Error::other("no epoll handler")),
        };
        match registered {
            Ok(t) => {
                if let Ok(mut r) = self.rescan.lock() {
                    *r = Some(t);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no rescan timer: a vring resumed after a crash waits for the guest's next kick")
            }
        }
    }

    /// Number of queues currently attached (to the I/O server or the local
    /// sidecore).
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

    /// Takes the VMM's inflight region (SET_INFLIGHT_FD, before the vrings
    /// start): vrings attached from now on resume from it and keep it.
    pub fn set_inflight(&self, region: InflightRegion) {
        tracing::info!(
            queues = region.queues(),
            queue_size = region.queue_size(),
            bytes = region.size(),
            inflight = region.inflight_entries(),
            "inflight region from the VMM (SET_INFLIGHT_FD)"
        );
        self.lock().inflight = Some(Arc::new(region));
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

    fn rescan_event(&self) -> u64 {
        (2 * usize::from(self.cfg.queues) + 1) as u64
    }

    /// Attaches every started, enabled vring that has requests waiting but
    /// is not attached yet (its kick went to a back-end that died).
    fn rescan(&self, vrings: &[VringRwLock<Mem>]) {
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
    fn detach(&self, q: usize, drain: bool) {
        let ring = self.lock().queues.get(q).and_then(|qs| qs.ring.clone());
        // A net RX ring always holds empty buffers: nothing to wait for.
        let wait = match self.kind {
            DeviceKind::Net { .. } if q == crate::net::RX_QUEUE => Duration::ZERO,
            _ => DRAIN_TIMEOUT,
        };
        let stopped_at = match (&ring, drain) {
            (Some((layout, mem, _)), true) => Some(drain_ring(q, layout, mem, wait)),
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

    /// Detaches vring `q` (drained) and attaches it again where it stopped,
    /// with the current memory table (memory hot-plug).
    fn reattach(&self, q: usize, regions: &[String]) {
        let vring = self
            .lock()
            .queues
            .get(q)
            .and_then(|qs| qs.ring.as_ref().map(|r| r.2.clone()));
        self.detach(q, true);
        if let Some(qs) = self.lock().queues.get_mut(q) {
            qs.paused = false;
        }
        let Some(vring) = vring else {
            return;
        };
        let at = vring.queue_next_avail();
        if self.ensure_attached(q, &vring) {
            tracing::info!(
                queue = q,
                at,
                ?regions,
                "vring re-attached with the new memory table"
            );
            // Requests posted while it was away announced themselves to
            // nobody.
            self.forward_kick(q);
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
        if qs.failed || qs.paused {
            return false;
        }
        let mem_for_ring = mem.clone();
        match self.attach_queue(q, vring, mem, acked, st.inflight.as_deref()) {
            Ok(Attached {
                dev,
                kick,
                call,
                layout,
                base,
                tracker,
            }) => {
                let Some(qs) = st.queues.get_mut(q) else {
                    return false;
                };
                qs.ring = Some((layout, mem_for_ring, vring.clone()));
                qs.dev = Some(dev);
                qs.kick = Some(kick);
                qs.call = Some(call);
                qs.tracker = tracker;
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

    fn forward_kick(&self, q: usize) {
        let mut st = self.lock();
        // Recorded before the server can fetch what the kick announces.
        Self::sync_locked(&mut st, q);
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

impl Drop for VrioBackend {
    fn drop(&mut self) {
        self.detach_all();
    }
}

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
        st.mem = Some(local);
        if same {
            return Ok(());
        }
        // Attached queues registered the old regions with the fabric (or
        // the sidecore holds the old table): each is detached and attached
        // again with the new table, at the index it stopped at. Until
        // then, no kick or rescan attaches it behind our back.
        let attached: Vec<usize> = st
            .queues
            .iter_mut()
            .enumerate()
            .filter(|(_, qs)| qs.dev.is_some())
            .map(|(q, qs)| {
                qs.paused = true;
                q
            })
            .collect();
        drop(st);
        for q in attached {
            self.reattach(q, &regions);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::layout::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SIZE_MAX};

    fn front(queues: u16, max_request: u32) -> FrontConfig {
        FrontConfig {
            serving: Serving::Remote(RemoteFront {
                server: "127.0.0.1:1".into(),
                fabric: vrio_rdma::Backend::Soft,
                device: None,
                max_request,
                device_id: 7,
                agent: AgentConfig::default(),
                placement: Default::default(),
            }),
            queues,
            max_queue_size: 256,
        }
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn config_keeps_the_server_capacity_and_bounds_requests() {
        let server = config_space(&BlockConfig::default(), 0x8_0000);
        let b = VrioBackend::new(front(3, 128 << 10), &server);
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
        let b = VrioBackend::new(front(1, 1 << 20), &server);
        assert_eq!(le32(&b.get_config(0, 16), SEG_MAX_OFFSET), 4);
    }

    #[test]
    fn features_and_protocol_features() {
        let b = VrioBackend::new(front(2, 128 << 10), &[0; 60]);
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

/// The local mode end to end without a VMM: the test plays the VMM (memory
/// table, vring addresses, call fd) and the guest driver (rings, kicks).
#[cfg(test)]
mod local_tests {
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};

    use vhost_user_backend::VhostUserDaemon;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::blk::MemoryBackend;
    use crate::ring::layout::VIRTIO_RING_F_EVENT_IDX;
    use crate::ring::{DriverQueue, Segment};
    use crate::sidecore::{SidecoreConfig, SidecoreThread};

    const SIZE: u16 = 16;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x11000;
    const STATUS: u64 = 0x13000;

    fn local_front(queues: u16, backend: Arc<dyn BlockBackend>) -> FrontConfig {
        let sidecore = SidecoreThread::spawn("test-sidecore", SidecoreConfig::default()).unwrap();
        FrontConfig {
            serving: Serving::Local(LocalFront {
                backend,
                blk: BlockConfig::default(),
                sidecore: Arc::new(sidecore),
            }),
            queues,
            max_queue_size: 256,
        }
    }

    /// One request on queue `q` (its rings at `base`), kicked and waited
    /// for; returns the status byte.
    #[allow(clippy::too_many_arguments)]
    fn request(
        b: &VrioBackend,
        vrings: &[VringRwLock<Mem>],
        drv: &mut DriverQueue,
        mem: &LocalMemory,
        q: usize,
        kind: u32,
        sector: u64,
        data: u64,
    ) -> u8 {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write(HDR, &hdr).unwrap();
        mem.write(STATUS, &[0xff]).unwrap();
        let seg = |addr, len| Segment { addr, len };
        let (hdr_seg, data_seg, status_seg) = (seg(HDR, 16), seg(data, 4096), seg(STATUS, 1));
        let (readable, writable) = if kind == VIRTIO_BLK_T_OUT {
            (vec![hdr_seg, data_seg], vec![status_seg])
        } else {
            (vec![hdr_seg], vec![data_seg, status_seg])
        };
        drv.add(mem, &readable, &writable, false).unwrap();
        drv.publish(mem).unwrap();
        // The VMM's epoll thread seeing the guest's kick.
        b.handle_event(q as u16, EventSet::IN, vrings, 0).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((_, len)) = drv.pop_used(mem).unwrap() {
                assert!(len >= 1, "used length {len}");
                break;
            }
            assert!(Instant::now() < deadline, "queue {q}: no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut s = [0u8];
        mem.read(STATUS, &mut s).unwrap();
        s[0]
    }

    /// A daemon for `b` whose vring worker has exited: it would consume
    /// the sidecore's interrupts for its own vrings, so the test's
    /// handle_event calls play its part. Its epoll set stays usable.
    fn idle_daemon(b: &Arc<VrioBackend>, name: &str) -> VhostUserDaemon<Arc<VrioBackend>> {
        let daemon = VhostUserDaemon::new(
            name.into(),
            b.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        b.set_handlers(&daemon.get_epoll_handlers());
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        wait_until_no_vring_worker();
        daemon
    }

    fn wait_until_no_vring_worker() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let alive = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| t.ok())
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .any(|c| c.trim() == "vring_worker");
            if !alive {
                return;
            }
            assert!(Instant::now() < deadline, "the vring worker did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_local_sidecore_serves_each_vring_and_interrupts_through_the_call_fd() {
        let disk = Arc::new(MemoryBackend::new(1 << 20));
        let front = local_front(2, disk.clone());
        let config = match &front.serving {
            Serving::Local(l) => l.config_space(),
            Serving::Remote(_) => unreachable!(),
        };
        let b = Arc::new(VrioBackend::new(front, &config));
        assert_eq!(b.get_config(0, 8), ((1u64 << 20) / 512).to_le_bytes());
        let _daemon = idle_daemon(&b, "test");
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let atomic = GuestMemoryAtomic::new(ram.clone());
        b.update_memory(atomic.clone()).unwrap();
        let features = b.features();
        assert_ne!(features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        b.acked_features(features);

        let mut vrings = Vec::new();
        let mut drivers = Vec::new();
        let mut calls = Vec::new();
        for q in 0..2u64 {
            let base = 0x1000 + q * 0x4000;
            let layout = RingLayout::new(SIZE, base, base + 0x1000, base + 0x2000).unwrap();
            let v = VringRwLock::new(atomic.clone(), 256).unwrap();
            v.set_queue_size(SIZE);
            v.set_queue_info(layout.desc, layout.avail, layout.used)
                .unwrap();
            v.set_queue_event_idx(true);
            v.set_queue_ready(true);
            v.set_enabled(true);
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            let fd = call.try_clone().unwrap().into_raw_fd();
            // SAFETY: `fd` is a fresh duplicate that nothing else owns.
            v.set_call(Some(unsafe { File::from_raw_fd(fd) }));
            let drv = DriverQueue::new(layout, RingFeatures::from_bits(features), None);
            drv.init(&ram).unwrap();
            vrings.push(v);
            drivers.push(drv);
            calls.push(call);
        }

        // A write on queue 1, read back on queue 0.
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        ram.write(DATA, &pattern).unwrap();
        let s = request(
            &b,
            &vrings,
            &mut drivers[1],
            &ram,
            1,
            VIRTIO_BLK_T_OUT,
            8,
            DATA,
        );
        assert_eq!(s, 0, "write status");
        let mut on_disk = vec![0u8; 4096];
        disk.read_vectored_at(8 * 512, &mut [std::io::IoSliceMut::new(&mut on_disk)])
            .unwrap();
        assert_eq!(on_disk, pattern, "the write reached the back-end");
        let back = DATA + 0x1000;
        let s = request(
            &b,
            &vrings,
            &mut drivers[0],
            &ram,
            0,
            VIRTIO_BLK_T_IN,
            8,
            back,
        );
        assert_eq!(s, 0, "read status");
        let mut got = vec![0u8; 4096];
        ram.read(back, &mut got).unwrap();
        assert_eq!(got, pattern, "read back through queue 0");
        assert_eq!(b.attached_queues(), 2, "one sidecore queue per vring");

        // The sidecore's interrupt reaches the VMM's call fd of that vring.
        // It publishes the used entry before it writes its call fd, so a
        // preempted sidecore may not have written it yet: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            b.handle_event(2 + 1, EventSet::IN, &vrings, 0).unwrap();
            if calls[0].read().is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "queue 0 was not interrupted within 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(calls[1].read().is_err(), "queue 1 has no new interrupt");

        // GET_VRING_BASE: the ring stops where it is and leaves the sidecore.
        b.stop_vring(0).unwrap();
        assert_eq!(vrings[0].queue_next_avail(), 1);
        assert_eq!(b.attached_queues(), 1);
        b.reset_device();
        assert_eq!(b.attached_queues(), 0);
        drop(b);

        // The back-end died with a request posted on queue 0 whose kick it
        // ate. The next back-end gets the ring at QEMU's base (used.idx, 1)
        // and no kick: the rescan timer finds the request and serves it.
        let pattern2: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
        ram.write(DATA, &pattern2).unwrap();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        hdr[8..16].copy_from_slice(&16u64.to_le_bytes());
        ram.write(HDR, &hdr).unwrap();
        ram.write(STATUS, &[0xff]).unwrap();
        let seg = |addr, len| Segment { addr, len };
        drivers[0]
            .add(
                &ram,
                &[seg(HDR, 16), seg(DATA, 4096)],
                &[seg(STATUS, 1)],
                false,
            )
            .unwrap();
        drivers[0].publish(&ram).unwrap();
        let front = local_front(2, disk.clone());
        let b = Arc::new(VrioBackend::new(front, &config));
        let _daemon = idle_daemon(&b, "test2");
        b.update_memory(atomic.clone()).unwrap();
        b.acked_features(features);
        // QEMU's SET_VRING_BASE after a crash: used.idx of each ring.
        for v in &vrings {
            v.set_queue_next_avail(1);
            v.set_queue_next_used(1);
        }
        while calls[0].read().is_ok() {}
        // What the epoll thread does on each timer tick.
        b.handle_event(b.rescan_event() as u16, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(b.attached_queues(), 1, "the rescan attached queue 0 only");
        assert!(
            calls[0].read().is_ok(),
            "a resumed vring interrupts the guest once"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while drivers[0].pop_used(&ram).unwrap().is_none() {
            assert!(Instant::now() < deadline, "the resumed ring served nothing");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut s = [0u8];
        ram.read(STATUS, &mut s).unwrap();
        assert_eq!(s[0], 0, "write status after the resume");
        disk.read_vectored_at(16 * 512, &mut [std::io::IoSliceMut::new(&mut on_disk)])
            .unwrap();
        assert_eq!(on_disk, pattern2, "the resumed ring wrote to the back-end");
        b.stop_vring(0).unwrap();
        assert_eq!(
            vrings[0].queue_next_avail(),
            2,
            "the resumed ring went on from 1"
        );
    }
}
