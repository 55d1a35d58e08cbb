//! The vhost-user back-end: for every vring the VMM starts, someone to
//! serve it: a remote attachment through the VM-host agent
//! ([`Serving::Remote`]), or a local sidecore over the guest memory the VMM
//! shared ([`Serving::Local`]). It offers virtio-blk, or virtio-net through
//! `net.rs`.
//!
//! Each vring is attached on its own (remote: one agent thread and one
//! fabric domain per queue; local: one `LocalQueue` on the shared sidecore)
//! when vhost-user-backend first reports it started and enabled, and
//! detached when the VMM stops it (GET_VRING_BASE). The kick fd stays with
//! vhost-user-backend's epoll thread, which forwards kicks to the agent's
//! (or sidecore queue's) kick eventfd; their call eventfd is a listener on
//! that same thread, which signals the vring's current call fd, so a VMM
//! that swaps call fds (masking) is still followed.
//!
//! By concept:
//! - `front.rs`: the `VhostUserBackend` impl, what the VMM's messages and
//!   the epoll thread's events do;
//! - `vrings.rs`: attaching, kicking, interrupting and detaching each vring,
//!   reconnects and the inflight region;
//! - `serving.rs`: who serves the vrings ([`FrontConfig`], [`Serving`]);
//! - `placement.rs`: where each vring goes and which agent serves it;
//! - `config_space.rs`: the config space and features, patched to the
//!   server's request limit;
//! - `memory_update.rs`: a new memory table while vrings run;
//! - `migration.rs`: the dirty log, for live migration.
//!
//! This module holds the back-end's state, which the others share.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use vhost_user_backend::VringEpollHandler;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::remote::DeviceKind;
use crate::virtio::memory::LocalMemory;

use super::inflight::InflightRegion;

mod config_space;
mod front;
mod memory_update;
mod migration;
mod placement;
mod serving;
mod vrings;

pub use migration::VHOST_F_LOG_ALL;
pub use placement::{AttachHook, Placement};
pub use serving::{FrontConfig, LocalFront, RemoteFront, Serving};
use vrings::QueueState;

/// How often started but unattached vrings are checked for requests that
/// no kick announced (a reconnect: see `vrings.rs`).
pub const RESCAN: Duration = Duration::from_millis(100);

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Handler = VringEpollHandler<Arc<VrioBackend>>;

/// What the vrings share, under one lock.
#[derive(Default)]
struct State {
    mem: Option<Arc<LocalMemory>>,
    acked: u64,
    queues: Vec<QueueState>,
    /// The VMM's inflight region (SET_INFLIGHT_FD through the relay).
    inflight: Option<Arc<InflightRegion>>,
    /// The VMM's dirty log (SET_LOG_BASE through the relay), used while
    /// LOG_ALL is acked.
    dirty_log: Option<Arc<crate::virtio::dirty_log::DirtyLog>>,
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
        let config =
            config_space::patch_blk_config(server_config, cfg.serving.max_request(), cfg.queues);
        let features = config_space::blk_features(cfg.serving.read_only());
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
        // Offered only where every write to the guest can be logged.
        let features = match cfg.serving {
            Serving::Remote(_) => features | VHOST_F_LOG_ALL,
            Serving::Local(_) => features,
        };
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
            .filter(|q| q.is_attached())
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
}

impl Drop for VrioBackend {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// The local mode end to end without a VMM.
#[cfg(test)]
mod local_tests;
