//! The I/O server: accepts queue attachments from VM-host agents and hands
//! each queue to the sidecore its controller chose, or else to the least
//! loaded one. Queues move between its sidecores as whole objects
//! ([`IoServer::move_queue`]): the ring state travels with the queue.
//!
//! Every ATTACH passes the server's [`Gate`] first: with a keyring, its
//! credential must be signed, current and for this device and host; a blk
//! queue then claims the volume its credential names (readers share, writers
//! exclude each other). Refusals are answered with a status and counted.
//!
//! Queues are virtio-blk (each on its device's volume) or virtio-net (TX
//! through [`RemoteQueue`]`<TxDevice>`, RX through [`RemoteRxQueue`]), the
//! net devices switched among themselves by [`NetDevices`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use vrio_rdma::{
    Access, Completion, Domain, Endpoint, EndpointConfig, FabricError, RecvRequest, Sge, WcStatus,
};

use super::net_devices::{NetDeviceError, NetDevices, NetQueue, NetServerConfig};
use super::net_rx::RemoteRxQueue;
use super::remote_queue::RemoteQueue;
use crate::blk::{BlockBackend, BlockConfig, BlockDevice};
use crate::interpose::{Policies, QueueMeter};
use crate::net::{RxDevice, SwitchPort};
use crate::proto::config::RemoteQueueConfig;
use crate::proto::staging::StagingBuffer;
use crate::proto::stats::RemoteStats;
use crate::proto::wire::{
    Attach, AttachReply, AttachStatus, DeviceKind, Message, WireError, MAX_MSG,
};
use crate::sidecore::{QueueFailure, ServedQueue, SidecoreConfig, SidecoreHandle, SidecoreThread};
use crate::tenancy::{
    peer_host, Gate, Keyring, Refusal, RefusalCounts, VolumeSet, WarnLimiter, DEFAULT_VOLUME,
};
use crate::virtio::memory::MemoryError;

/// How an [`IoServer`] listens, how many sidecores it runs, and what its
/// queues and devices look like.
#[derive(Debug, Clone)]
pub struct IoServerConfig {
    /// Fabric address agents connect to (port 0: any free port; see
    /// [`IoServer::addr`]).
    pub listen: String,
    /// Sidecore threads to start (at least one).
    pub sidecores: usize,
    /// Scheduling of each sidecore.
    pub sidecore: SidecoreConfig,
    /// Limits of every queue; its `send_depth` is taken from `endpoint`.
    pub queue: RemoteQueueConfig,
    /// The virtio-blk device every blk queue presents.
    pub blk: BlockConfig,
    /// Which devices are net devices, and their switch.
    pub net: NetServerConfig,
    /// The endpoints accepted from agents.
    pub endpoint: EndpointConfig,
    /// Keys attach credentials are checked with. None: an open server
    /// (attaches are taken on trust and every blk queue shares the
    /// [`DEFAULT_VOLUME`]), logged as such at start.
    pub keys: Option<Arc<Keyring>>,
    /// The volumes blk queues attach (the `backend` given to
    /// [`IoServer::start`] joins them as [`DEFAULT_VOLUME`]).
    pub volumes: Arc<VolumeSet>,
    /// Most queues one VM host (peer address) may have attached at once;
    /// more attaches are refused.
    pub max_queues_per_peer: usize,
    /// Interposition policies by device id (empty: nothing interposed).
    /// Shared: a policy set here later, as a controller does, reaches the
    /// device's queues live ([`IoServer::policies`]).
    pub policies: Arc<Policies>,
    /// False: queues get no interposition hooks at all and `policies` has
    /// no effect; only to measure what the hooks cost (`vrio-bench blk
    /// --interpose-cost`).
    pub interposition: bool,
    /// Keep every blk and net TX queue's own I/O figures (requests, bytes
    /// and status by op, latency, in flight; [`IoServer::queue_meters`]),
    /// as `vrio-server --metrics-listen` does. A few atomic adds per
    /// request.
    pub queue_metrics: bool,
}

impl Default for IoServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            sidecores: 1,
            sidecore: SidecoreConfig::default(),
            queue: RemoteQueueConfig::default(),
            blk: BlockConfig::default(),
            net: NetServerConfig::default(),
            endpoint: EndpointConfig::default(),
            keys: None,
            volumes: Arc::new(VolumeSet::new()),
            max_queues_per_peer: 256,
            policies: Arc::new(Policies::new()),
            interposition: true,
            queue_metrics: false,
        }
    }
}

/// Why the server did not start, or a queue did not move.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// [`IoServer::start`]: the fabric would not listen.
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    /// [`IoServer::start`]: the accept thread did not spawn.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A sidecore thread did not spawn or refused a queue, or the registry
    /// of queues was poisoned.
    #[error("sidecore: {0}")]
    Sidecore(String),
    /// [`IoServer::move_queue`]: no live queue has that name.
    #[error("no queue {0} is served here")]
    NoSuchQueue(String),
    /// [`IoServer::move_queue`]: the target sidecore (first) does not exist
    /// among this many (second).
    #[error("no sidecore {0} (this server has {1})")]
    NoSuchSidecore(usize, usize),
    /// [`IoServer::start`]: the default volume could not be added.
    #[error(transparent)]
    Volume(#[from] crate::tenancy::VolumeError),
}

/// A queue a sidecore serves.
struct Served {
    name: String,
    /// The VM host it came from (`tenancy::peer_host`).
    host: String,
    sidecore: usize,
    id: u64,
    alive: Weak<()>,
    /// Its I/O figures, when the server keeps them.
    meter: Option<Arc<QueueMeter>>,
    /// The device it belongs to.
    device: u64,
}

/// The sidecores and which queue each serves.
struct Sidecores {
    handles: Vec<SidecoreHandle>,
    /// In attach order. Names are unique per controller, but two VM hosts
    /// without one may reuse device ids: a clash never evicts a queue.
    queues: Vec<Served>,
}

impl Sidecores {
    /// Forgets queues their sidecore dropped (detached, failed, handed back).
    fn prune(&mut self) {
        self.queues.retain(|s| s.alive.strong_count() > 0);
    }

    /// Live queues attached from `host`.
    fn held_by(&mut self, host: &str) -> usize {
        self.prune();
        self.queues.iter().filter(|s| s.host == host).count()
    }

    fn load(&mut self) -> Vec<usize> {
        self.prune();
        let mut n = vec![0; self.handles.len()];
        for s in &self.queues {
            n[s.sidecore] += 1;
        }
        n
    }

    /// Puts a new queue on sidecore `hint` if there is one, else on the
    /// least loaded.
    fn place(
        &mut self,
        q: Admitted,
        hint: u16,
        host: &str,
    ) -> Result<(String, usize), ServerError> {
        let Admitted {
            queue: q,
            alive,
            meter,
            device,
        } = q;
        let load = self.load();
        let k = if usize::from(hint) < self.handles.len() {
            usize::from(hint)
        } else {
            (0..load.len()).min_by_key(|&i| load[i]).unwrap_or(0)
        };
        let name = q.name().to_string();
        if self.find(&name).is_some() {
            tracing::warn!(queue = %name, "two live queues share a name; moves by name reach the newer");
        }
        let id = self.handles[k]
            .add(q)
            .map_err(|e| ServerError::Sidecore(e.to_string()))?;
        self.queues.push(Served {
            name: name.clone(),
            host: host.to_string(),
            sidecore: k,
            id,
            alive,
            meter,
            device,
        });
        Ok((name, k))
    }

    /// The newest live queue called `name`.
    fn find(&self, name: &str) -> Option<usize> {
        self.queues
            .iter()
            .rposition(|s| s.name == name && s.alive.strong_count() > 0)
    }
}

/// A running I/O server: an accept thread that admits one queue per
/// endpoint, and the sidecores serving them. Dropping it stops both.
pub struct IoServer {
    addr: String,
    stop: Arc<AtomicBool>,
    accept: Mutex<Option<JoinHandle<()>>>,
    sidecores: Arc<Mutex<Sidecores>>,
    sidecore_moves: AtomicU64,
    stats: Arc<RemoteStats>,
    net_stats: Arc<RemoteStats>,
    net: Arc<NetDevices>,
    domain: Arc<dyn Domain>,
    endpoint: EndpointConfig,
    gate: Arc<Gate>,
    policies: Arc<Policies>,
}

impl IoServer {
    /// Listens on `cfg.listen`, spawns the sidecores and the accept thread,
    /// and returns at once. `backend` joins `cfg.volumes` as the
    /// [`DEFAULT_VOLUME`] (unless the set has one), which an open server
    /// gives every blk queue. Attachments that fail are logged (rate
    /// limited per peer) and refused; the server goes on.
    pub fn start(
        domain: Arc<dyn Domain>,
        backend: Arc<dyn BlockBackend>,
        cfg: IoServerConfig,
    ) -> Result<Self, ServerError> {
        if !cfg.volumes.names().iter().any(|n| n == DEFAULT_VOLUME) {
            cfg.volumes.insert(DEFAULT_VOLUME, backend)?;
        }
        let gate = Arc::new(Gate::new(cfg.keys.clone(), cfg.volumes.clone()));
        if !gate.requires_credentials() {
            tracing::warn!(
                "data plane open: any peer that reaches {} may attach queues (no keys given)",
                cfg.listen
            );
        }
        let mut listener = domain.listen(&cfg.listen, cfg.endpoint)?;
        let addr = listener.local_addr();
        let mut scs = Vec::new();
        for i in 0..cfg.sidecores.max(1) {
            let h = SidecoreThread::spawn(&format!("sidecore-{i}"), cfg.sidecore)
                .map_err(|e| ServerError::Sidecore(e.to_string()))?;
            scs.push(h);
        }
        let sidecores = Arc::new(Mutex::new(Sidecores {
            handles: scs,
            queues: Vec::new(),
        }));
        let stats = Arc::new(RemoteStats::default());
        let net_stats = Arc::new(RemoteStats::default());
        let net = Arc::new(NetDevices::new(cfg.net.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s, sc) = (domain.clone(), stop.clone(), sidecores.clone());
        let kinds = Kinds {
            gate: gate.clone(),
            sidecores: sidecores.clone(),
            warn: Arc::new(WarnLimiter::new(Duration::from_secs(10), 5)),
            net: net.clone(),
            blk_stats: stats.clone(),
            net_stats: net_stats.clone(),
            policies: cfg.interposition.then(|| cfg.policies.clone()),
            queue_metrics: cfg.queue_metrics,
        };
        let admitting = Arc::new(AtomicUsize::new(0));
        let policies = cfg.policies.clone();
        let cfg = Arc::new(cfg);
        let accept = std::thread::Builder::new()
            .name("vrio-accept".into())
            .spawn(move || {
                while !s.load(Relaxed) {
                    let ep = match listener.accept() {
                        Ok(ep) => ep,
                        Err(e) => {
                            if !s.load(Relaxed) {
                                tracing::warn!(error = %e, "accept failed");
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            continue;
                        }
                    };
                    if s.load(Relaxed) {
                        break;
                    }
                    // Each attach waits for its agent on a thread of its own,
                    // so one slow or silent agent holds up no other; the
                    // number waiting at once is bounded.
                    if admitting.load(Relaxed) >= MAX_ADMITTING {
                        tracing::warn!(peer = %ep.peer(), limit = MAX_ADMITTING, "too many attaches in progress; connection refused");
                        continue;
                    }
                    admitting.fetch_add(1, Relaxed);
                    let job = Admission {
                        domain: d.clone(),
                        kinds: kinds.clone(),
                        cfg: cfg.clone(),
                        sidecores: sc.clone(),
                        stop: s.clone(),
                        admitting: admitting.clone(),
                    };
                    let spawned = std::thread::Builder::new()
                        .name("vrio-admit".into())
                        .spawn(move || job.run(ep));
                    if let Err(e) = spawned {
                        admitting.fetch_sub(1, Relaxed);
                        tracing::error!(error = %e, "cannot start an attach thread; connection refused");
                    }
                }
            })?;
        Ok(Self {
            addr,
            stop,
            accept: Mutex::new(Some(accept)),
            sidecores,
            sidecore_moves: AtomicU64::new(0),
            stats,
            net_stats,
            net,
            domain,
            endpoint: EndpointConfig::default(),
            gate,
            policies,
        })
    }

    /// Each live queue's I/O figures (name, device id, figures), when
    /// [`IoServerConfig::queue_metrics`] is on; net RX queues have none
    /// (their frames are the switch ports' figures).
    pub fn queue_meters(&self) -> Vec<(String, u64, Arc<QueueMeter>)> {
        let Ok(mut scs) = self.sidecores.lock() else {
            return Vec::new();
        };
        scs.prune();
        scs.queues
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.device, s.meter.clone()?)))
            .collect()
    }

    /// The devices' interposition policies: set one to change it live, read
    /// the stages' counters.
    pub fn policies(&self) -> &Arc<Policies> {
        &self.policies
    }

    /// Attaches refused so far (no or bad credential; volume not granted,
    /// missing or busy).
    pub fn refusals(&self) -> &RefusalCounts {
        self.gate.refused()
    }

    /// The volumes this server serves.
    pub fn volumes(&self) -> &Arc<VolumeSet> {
        self.gate.volumes()
    }

    /// Where agents connect.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Fabric counters of the virtio-blk queues.
    pub fn stats(&self) -> &Arc<RemoteStats> {
        &self.stats
    }

    /// Fabric counters of the virtio-net queues (requests are TX chains
    /// plus RX frames).
    pub fn net_stats(&self) -> &Arc<RemoteStats> {
        &self.net_stats
    }

    /// The switch and ports of this server's net devices.
    pub fn net(&self) -> &Arc<NetDevices> {
        &self.net
    }

    /// Queues moved between this server's sidecores so far.
    pub fn sidecore_moves(&self) -> u64 {
        self.sidecore_moves.load(Relaxed)
    }

    /// Number of sidecores.
    pub fn sidecore_count(&self) -> usize {
        self.sidecores.lock().map(|s| s.handles.len()).unwrap_or(0)
    }

    /// Each sidecore's counters and the number of queues it serves.
    pub fn sidecore_loads(&self) -> Vec<(crate::sidecore::StatsSnapshot, usize)> {
        let Ok(mut scs) = self.sidecores.lock() else {
            return Vec::new();
        };
        let load = scs.load();
        scs.handles
            .iter()
            .zip(load)
            .map(|(h, n)| (h.stats().snapshot(), n))
            .collect()
    }

    /// The queues served here (`dev<device>.q<queue>`) and their sidecores.
    pub fn queues(&self) -> Vec<(String, usize)> {
        let Ok(mut scs) = self.sidecores.lock() else {
            return Vec::new();
        };
        scs.prune();
        let mut v: Vec<_> = scs
            .queues
            .iter()
            .map(|s| (s.name.clone(), s.sidecore))
            .collect();
        v.sort();
        v
    }

    /// Moves a served queue to another of this server's sidecores while it
    /// runs. The queue object, and with it the ring state and any fabric
    /// wave in flight, passes between the sidecore threads whole.
    pub fn move_queue(&self, name: &str, to: usize) -> Result<(), ServerError> {
        let mut scs = self
            .sidecores
            .lock()
            .map_err(|_| ServerError::Sidecore("registry poisoned".into()))?;
        scs.prune();
        let n = scs.handles.len();
        if to >= n {
            return Err(ServerError::NoSuchSidecore(to, n));
        }
        let Some(i) = scs.find(name) else {
            return Err(ServerError::NoSuchQueue(name.to_string()));
        };
        let (from, id) = (scs.queues[i].sidecore, scs.queues[i].id);
        if from == to {
            return Ok(());
        }
        let q = scs.handles[from]
            .remove(id)
            .map_err(|e| ServerError::Sidecore(e.to_string()))?;
        let Some(q) = q else {
            // Dropped by its sidecore meanwhile (failed or handed back).
            scs.queues.remove(i);
            return Err(ServerError::NoSuchQueue(name.to_string()));
        };
        let id = scs.handles[to]
            .add(q)
            .map_err(|e| ServerError::Sidecore(e.to_string()))?;
        scs.queues[i].sidecore = to;
        scs.queues[i].id = id;
        self.sidecore_moves.fetch_add(1, Relaxed);
        tracing::info!(queue = %name, from, to, "queue moved between sidecores");
        Ok(())
    }

    /// Sidecore counters, summed.
    pub fn sidecore_stats(&self) -> crate::sidecore::StatsSnapshot {
        let mut t = crate::sidecore::StatsSnapshot::default();
        if let Ok(scs) = self.sidecores.lock() {
            for h in scs.handles.iter() {
                let s = h.stats().snapshot();
                t.requests += s.requests;
                t.bytes += s.bytes;
                t.errors += s.errors;
                t.polls += s.polls;
                t.empty_polls += s.empty_polls;
                t.busy_ns += s.busy_ns;
                t.sleeps += s.sleeps;
                t.poll_mode_on += s.poll_mode_on;
                t.poll_mode_off += s.poll_mode_off;
                t.discovery_comparisons += s.discovery_comparisons;
                t.discovery_switches += s.discovery_switches;
                t.remote_poll_advised += s.remote_poll_advised;
            }
        }
        t
    }

    /// Stops accepting and stops the sidecores; returns their CPU time.
    pub fn stop(&self) -> u64 {
        self.stop.store(true, Relaxed);
        let accept = self.accept.lock().ok().and_then(|mut a| a.take());
        if let Some(j) = accept {
            // Unblock accept() with a connection of our own.
            let _ = self.domain.connect(&self.addr, self.endpoint);
            let _ = j.join();
        }
        let mut cpu = 0;
        if let Ok(mut scs) = self.sidecores.lock() {
            for h in scs.handles.iter_mut() {
                h.stop();
                cpu += h.cpu_ns();
            }
        }
        cpu
    }
}

impl Drop for IoServer {
    fn drop(&mut self) {
        let running = self.accept.lock().map(|a| a.is_some()).unwrap_or(false);
        if running {
            self.stop();
        }
    }
}

/// Attaches waiting for their agent's ATTACH at once; more connections are
/// refused until one finishes (each waits at most `ATTACH_WAIT`).
const MAX_ADMITTING: usize = 64;
/// How long a new connection may take to send its ATTACH.
const ATTACH_WAIT: Duration = Duration::from_secs(10);

/// One connection being attached, on its own thread.
struct Admission {
    domain: Arc<dyn Domain>,
    kinds: Kinds,
    cfg: Arc<IoServerConfig>,
    sidecores: Arc<Mutex<Sidecores>>,
    stop: Arc<AtomicBool>,
    admitting: Arc<AtomicUsize>,
}

impl Admission {
    fn run(self, ep: Box<dyn Endpoint>) {
        let peer = ep.peer();
        match admit(&*self.domain, ep, &self.kinds, &self.cfg) {
            // A queue admitted while the server stops is dropped, which
            // closes its endpoint: the agent sees the server gone.
            Ok(_) if self.stop.load(Relaxed) => {}
            Ok((q, a)) => match self.sidecores.lock() {
                Ok(mut scs) => match scs.place(q, a.sidecore, peer_host(&peer)) {
                    Ok((name, k)) => tracing::info!(
                        device = format_args!("{:#x}", a.device_id),
                        queue = a.queue,
                        name = %name,
                        %peer,
                        sidecore = k,
                        "queue attached"
                    ),
                    Err(e) => tracing::error!(error = %e, "sidecore gone"),
                },
                Err(_) => tracing::error!("sidecore registry poisoned; attach dropped"),
            },
            Err(e) => {
                // Keyed by host, not port: a peer reconnecting must not
                // get a fresh allowance each time.
                if let Some(suppressed) = self.kinds.warn.allow(peer_host(&peer), Instant::now()) {
                    tracing::warn!(%peer, error = %e, suppressed, "attach refused");
                }
            }
        }
        self.admitting.fetch_sub(1, Relaxed);
    }
}

/// What a queue is built from, by device type.
#[derive(Clone)]
struct Kinds {
    gate: Arc<Gate>,
    /// For per-peer queue counts.
    sidecores: Arc<Mutex<Sidecores>>,
    warn: Arc<WarnLimiter>,
    net: Arc<NetDevices>,
    blk_stats: Arc<RemoteStats>,
    net_stats: Arc<RemoteStats>,
    /// None: no interposition (`IoServerConfig::interposition` off).
    policies: Option<Arc<Policies>>,
    queue_metrics: bool,
}

/// A queue ready for a sidecore, and its liveness token.
struct Admitted {
    queue: Box<dyn ServedQueue>,
    alive: Weak<()>,
    meter: Option<Arc<QueueMeter>>,
    device: u64,
}

/// Why a new endpoint got no queue (logged as "attach refused").
#[derive(Debug, thiserror::Error)]
enum AdmitError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Fabric(#[from] FabricError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("no ATTACH within 10 s")]
    NoAttach,
    #[error("attach receive failed: {0:?}")]
    ReceiveFailed(WcStatus),
    #[error("bad message from agent: {0}")]
    BadMessage(#[source] WireError),
    #[error("expected ATTACH, got {0:?}")]
    NotAttach(Box<Message>),
    #[error(transparent)]
    Net(#[from] NetDeviceError),
    #[error(transparent)]
    Queue(#[from] QueueFailure),
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{host} has {limit} queues attached already (the per-peer limit)")]
    TooManyQueues { host: String, limit: usize },
    #[error("{0} guest regions (at most {MAX_REGIONS})")]
    TooManyRegions(usize),
}

/// Guest memory regions an ATTACH may name (QEMU uses a handful).
const MAX_REGIONS: usize = 64;

/// Receives the ATTACH on a new endpoint, checks it at the gate, and
/// builds the queue.
fn admit(
    domain: &dyn Domain,
    mut ep: Box<dyn Endpoint>,
    kinds: &Kinds,
    cfg: &IoServerConfig,
) -> Result<(Admitted, Attach), AdmitError> {
    let peer = ep.peer();
    let (attach, kind) = {
        let mut buf = StagingBuffer::new(MAX_MSG)?;
        // SAFETY: `buf` outlives `mr` (dropped at the end of this block,
        // after `mr`, which is declared later and so dropped first).
        let mr = unsafe { domain.register(buf.as_ptr(), buf.len(), Access::LOCAL_ONLY) }?;
        ep.post_recv(&[RecvRequest {
            wr_id: 1,
            local: Sge {
                lkey: mr.lkey(),
                addr: buf.addr(),
                len: MAX_MSG as u32,
            },
        }])?;
        let deadline = Instant::now() + ATTACH_WAIT;
        let mut c = [Completion::EMPTY];
        loop {
            if ep.poll(&mut c)? == 1 {
                break;
            }
            if Instant::now() > deadline {
                return Err(AdmitError::NoAttach);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if !c[0].status.is_ok() {
            return Err(AdmitError::ReceiveFailed(c[0].status));
        }
        let mut b = vec![0u8; (c[0].byte_len as usize).min(MAX_MSG)];
        buf.get(0, &mut b)?;
        let (attach, said, credential) =
            match Message::decode(&b).map_err(AdmitError::BadMessage)? {
                Message::Attach(a) => (a, None, None),
                Message::AttachDevice(d) => (d.attach, Some(d.device), d.credential),
                other => return Err(AdmitError::NotAttach(Box::new(other))),
            };
        // Checked before any queue, ring or registration exists for it.
        let checked = kinds
            .gate
            .admit(
                credential.as_deref(),
                attach.device_id,
                &peer,
                SystemTime::now(),
            )
            .map_err(AdmitError::from)
            .and_then(|grant| {
                if attach.regions.len() > MAX_REGIONS {
                    return Err(AdmitError::TooManyRegions(attach.regions.len()));
                }
                let host = peer_host(&peer);
                let held = kinds
                    .sidecores
                    .lock()
                    .map(|mut s| s.held_by(host))
                    .unwrap_or(0);
                if held >= cfg.max_queues_per_peer {
                    return Err(AdmitError::TooManyQueues {
                        host: host.to_string(),
                        limit: cfg.max_queues_per_peer,
                    });
                }
                Ok(match kinds.net.kind(attach.device_id, said)? {
                    DeviceKind::Blk => Kind::Blk(kinds.gate.claim(&grant, attach.device_id)?),
                    DeviceKind::Net { mac } => Kind::Net(mac),
                })
            });
        match checked {
            Ok(kind) => (attach, kind),
            Err(e) => {
                let status = match &e {
                    AdmitError::Refused(r) => r.status(),
                    _ => AttachStatus::Refused,
                };
                refuse(&mut *ep, &*mr, &mut buf, status);
                return Err(e);
            }
        }
    };
    let q = admit_queue(domain, ep, &attach, kind, kinds, cfg)?;
    Ok((q, attach))
}

/// What an admitted ATTACH builds: a blk queue on its claim of a volume, or
/// a net queue on the port of `mac`.
enum Kind {
    Blk(crate::tenancy::Claim),
    Net(crate::net::MacAddr),
}

/// Tells a refused agent why, best effort (it may be gone or hostile): the
/// endpoint is dropped right after.
fn refuse(
    ep: &mut dyn Endpoint,
    mr: &dyn vrio_rdma::MemoryRegion,
    buf: &mut StagingBuffer,
    status: AttachStatus,
) {
    let mut m = Vec::new();
    let reply = Message::AttachReply(AttachReply {
        status: status.code(),
        config: Vec::new(),
        features: 0,
    });
    if reply.encode(&mut m).is_err() || buf.put(0, &m).is_err() {
        return;
    }
    let sent = ep.post_send(&[vrio_rdma::SendRequest {
        wr_id: 2,
        opcode: vrio_rdma::Opcode::Send,
        local: Sge {
            lkey: mr.lkey(),
            addr: buf.addr(),
            len: m.len() as u32,
        },
        signaled: true,
    }]);
    if sent.is_err() {
        return;
    }
    // The buffer must stay registered until the SEND completes.
    let deadline = Instant::now() + REFUSE_WAIT;
    let mut c = [Completion::EMPTY];
    while Instant::now() < deadline {
        if !matches!(ep.poll(&mut c), Ok(0)) {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// How long a refusal waits for its reply to leave.
const REFUSE_WAIT: Duration = Duration::from_secs(1);

fn admit_queue(
    domain: &dyn Domain,
    ep: Box<dyn Endpoint>,
    attach: &Attach,
    kind: Kind,
    kinds: &Kinds,
    cfg: &IoServerConfig,
) -> Result<Admitted, AdmitError> {
    let qcfg = RemoteQueueConfig {
        send_depth: cfg.endpoint.send_depth as usize,
        ..cfg.queue
    };
    let vm_host = crate::proto::device_key(peer_host(&ep.peer()));
    let mac = match kind {
        Kind::Blk(claim) => {
            let dev = BlockDevice::new(Arc::new(claim), cfg.blk.clone());
            let config = dev.config_space();
            let features = if dev.read_only() {
                1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO
            } else {
                0
            };
            let mut q = RemoteQueue::new(domain, ep, attach, dev, qcfg, kinds.blk_stats.clone())?;
            if let Some(p) = &kinds.policies {
                q.set_interposer(p.interposer(attach.device_id), vm_host);
            }
            let meter = kinds.queue_metrics.then(|| Arc::new(QueueMeter::default()));
            if let Some(m) = &meter {
                q.set_meter(m.clone());
            }
            q.reply_attach(config, features)?;
            let alive = q.liveness();
            return Ok(Admitted {
                queue: Box::new(q),
                alive,
                meter,
                device: attach.device_id,
            });
        }
        Kind::Net(mac) => mac,
    };
    let which = NetDevices::queue(attach.queue)?;
    let port = kinds.net.port(attach.device_id, mac)?;
    let config = kinds.net.config_space(mac);
    let stats = kinds.net_stats.clone();
    Ok(match which {
        NetQueue::Tx => {
            let dev = SwitchPort::tx(kinds.net.switch().clone(), port);
            let mut q = RemoteQueue::new(domain, ep, attach, dev, qcfg, stats)?;
            if let Some(p) = &kinds.policies {
                q.set_interposer(p.interposer(attach.device_id), vm_host);
            }
            let meter = kinds.queue_metrics.then(|| Arc::new(QueueMeter::default()));
            if let Some(m) = &meter {
                q.set_meter(m.clone());
            }
            q.reply_attach(config, 0)?;
            let alive = q.liveness();
            Admitted {
                queue: Box::new(q),
                alive,
                meter,
                device: attach.device_id,
            }
        }
        NetQueue::Rx => {
            let dev = RxDevice::new(kinds.net.mergeable());
            let mut q = RemoteRxQueue::new(domain, ep, attach, dev, port, qcfg, stats)?;
            q.reply_attach(config)?;
            let alive = q.liveness();
            Admitted {
                queue: Box::new(q),
                alive,
                meter: None,
                device: attach.device_id,
            }
        }
    })
}
