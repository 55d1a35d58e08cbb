//! Runs synthetic guests against one local I/O model and gathers the
//! figures the demo and the benchmark print.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cputime::{process_cpu_ns, spawn_timed, FabricCpuClock};
use crate::guest::{
    run_queue, GuestConfig, GuestError, QueueReport, SyntheticGuest, WorkloadConfig,
};
use vrio_core::blk::{BlockBackend, BlockConfig, BlockDevice};
use vrio_core::device::DeviceSide;
use vrio_core::models::{LocalQueue, VhostWorker};
use vrio_core::ring::RingFeatures;
use vrio_core::sidecore::{ServedQueue, SidecoreConfig, SidecoreThread, StatsSnapshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalModel {
    /// One worker thread per device, woken by every kick.
    VhostStyle,
    /// `cores` polling sidecores shared by all queues.
    Sidecore { cores: usize, cfg: SidecoreConfig },
}

impl LocalModel {
    pub fn name(&self) -> String {
        match self {
            LocalModel::VhostStyle => "vhost-style".into(),
            LocalModel::Sidecore { cores, .. } => format!("local-sidecore x{cores}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RunConfig {
    pub guests: u32,
    pub queues_per_guest: u16,
    pub queue_size: u16,
    pub features: RingFeatures,
    /// Template for every queue; each gets its own seed and block range.
    pub workload: WorkloadConfig,
    /// Remote models: the agents' inline limit (`AgentConfig::inline_max`).
    pub inline_max: usize,
}

impl RunConfig {
    /// One guest with one queue: `requests` at depth `depth` over `blocks`
    /// blocks of its own, the rest as the defaults.
    pub fn one_queue(requests: u64, depth: u16, blocks: u64) -> Self {
        Self {
            guests: 1,
            queues_per_guest: 1,
            workload: WorkloadConfig {
                requests,
                depth,
                blocks,
                ..WorkloadConfig::default()
            },
            ..Self::default()
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            guests: 4,
            queues_per_guest: 1,
            queue_size: 256,
            features: RingFeatures {
                indirect: true,
                event_idx: true,
            },
            workload: WorkloadConfig::default(),
            inline_max: vrio_core::remote::AgentConfig::default().inline_max,
        }
    }
}

/// What a model run cost: its wall time, the CPU time of the device side,
/// of the guests and of the whole process, and the device side's counters.
#[derive(Debug, Clone)]
pub struct RunCost {
    pub wall: Duration,
    /// CPU time of the device side (workers or sidecores).
    pub device_cpu_ns: u64,
    /// CPU time of the whole process (guests included).
    pub process_cpu_ns: u64,
    /// CPU time of the synthetic guests' driver threads (their thread
    /// clocks, summed).
    pub guest_cpu_ns: u64,
    pub stats: StatsSnapshot,
}

impl RunCost {
    /// This cost with the guests' CPU time set to `ns`.
    pub fn with_guest_cpu(self, ns: u64) -> Self {
        Self {
            guest_cpu_ns: ns,
            ..self
        }
    }

    /// `n` per second of wall time.
    pub fn per_sec(&self, n: f64) -> f64 {
        n / self.wall.as_secs_f64().max(1e-9)
    }
    /// `n` per second of the device side's CPU time.
    pub fn per_core_sec(&self, n: f64) -> f64 {
        n / (self.device_cpu_ns as f64 / 1e9).max(1e-9)
    }
    /// Device-side cores busy on average.
    pub fn device_cores(&self) -> f64 {
        self.per_sec(self.device_cpu_ns as f64 / 1e9)
    }
}

/// Measures a model run from its start: wall time, and the process's CPU
/// time.
pub struct RunClock {
    cpu0: u64,
    t0: Instant,
}

impl RunClock {
    pub fn start() -> Self {
        let cpu0 = process_cpu_ns();
        Self {
            cpu0,
            t0: Instant::now(),
        }
    }

    /// Wall time since the start.
    pub fn wall(&self) -> Duration {
        self.t0.elapsed()
    }

    /// The cost of a run that took `wall` (the process's CPU time counted
    /// until now), whose device side used `device_cpu_ns` and counted `stats`
    /// (the guests' CPU time unknown: see [`RunCost::with_guest_cpu`]).
    pub fn cost(&self, wall: Duration, device_cpu_ns: u64, stats: StatsSnapshot) -> RunCost {
        RunCost {
            wall,
            device_cpu_ns,
            process_cpu_ns: process_cpu_ns().saturating_sub(self.cpu0),
            guest_cpu_ns: 0,
            stats,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelReport {
    pub model: String,
    pub io: QueueReport,
    pub cost: RunCost,
}

impl ModelReport {
    pub fn requests_per_sec(&self) -> f64 {
        self.cost.per_sec(self.io.completed as f64)
    }
    pub fn mb_per_sec(&self) -> f64 {
        self.cost.per_sec(self.io.bytes as f64 / 1e6)
    }
    pub fn requests_per_core_sec(&self) -> f64 {
        self.cost.per_core_sec(self.io.completed as f64)
    }
    pub fn p50_us(&self) -> f64 {
        self.io.latency.value_at_quantile(0.5) as f64 / 1e3
    }
    pub fn p99_us(&self) -> f64 {
        self.io.latency.value_at_quantile(0.99) as f64 / 1e3
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("device setup: {0}")]
    Device(String),
    #[error("i/o model: {0}")]
    Model(String),
}

/// Sets up guests whose queues own disjoint block ranges.
pub fn make_guests(rc: &RunConfig) -> Result<Vec<SyntheticGuest>, GuestError> {
    (0..rc.guests)
        .map(|id| {
            SyntheticGuest::new(GuestConfig {
                id,
                queues: rc.queues_per_guest,
                queue_size: rc.queue_size,
                depth: rc.workload.depth,
                features: rc.features,
            })
        })
        .collect()
}

/// The workload of queue `q` of guest `g`: own seed, own block range.
pub fn queue_workload(rc: &RunConfig, g: u32, q: u16) -> WorkloadConfig {
    let n = u64::from(g) * u64::from(rc.queues_per_guest) + u64::from(q);
    WorkloadConfig {
        first_block: rc.workload.first_block + n * rc.workload.blocks,
        seed: rc.workload.seed ^ (n + 1).wrapping_mul(0x9e37_79b9),
        ..rc.workload
    }
}

/// Runs every guest queue on its own thread until the workload ends. The
/// report's `cpu_ns` is those threads' CPU time.
pub fn drive_guests(
    guests: Vec<SyntheticGuest>,
    rc: &RunConfig,
    progress: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
) -> QueueReport {
    let mut threads = Vec::new();
    for (g, guest) in guests.into_iter().enumerate() {
        let (mem, queues) = guest.into_queues();
        for (q, mut gq) in queues.into_iter().enumerate() {
            let wl = queue_workload(rc, g as u32, q as u16);
            let (mem, progress, stop) = (mem.clone(), progress.clone(), stop.clone());
            threads.push(spawn_timed(move || {
                run_queue(&mut gq, &mem, &wl, &progress, &stop)
            }));
        }
    }
    let mut total = QueueReport::empty();
    for t in threads {
        match t.join() {
            Ok((r, cpu)) => {
                total.merge(&r);
                total.cpu_ns += cpu;
            }
            Err(_) => total.protocol_errors += 1,
        }
    }
    total
}

fn sum(a: StatsSnapshot, b: StatsSnapshot) -> StatsSnapshot {
    StatsSnapshot {
        requests: a.requests + b.requests,
        bytes: a.bytes + b.bytes,
        errors: a.errors + b.errors,
        polls: a.polls + b.polls,
        empty_polls: a.empty_polls + b.empty_polls,
        busy_ns: a.busy_ns + b.busy_ns,
        sleeps: a.sleeps + b.sleeps,
        poll_mode_on: a.poll_mode_on + b.poll_mode_on,
        poll_mode_off: a.poll_mode_off + b.poll_mode_off,
        discovery_comparisons: a.discovery_comparisons + b.discovery_comparisons,
        discovery_switches: a.discovery_switches + b.discovery_switches,
        remote_poll_advised: a.remote_poll_advised + b.remote_poll_advised,
    }
}

/// Serves `devices` (each a list of queues) with a local model while
/// `work` runs: a worker per device, or sidecores sharing every queue.
/// Returns what `work` returned, the device side's CPU time and counters.
pub fn serve_local<T>(
    model: LocalModel,
    devices: Vec<Vec<Box<dyn ServedQueue>>>,
    what: &str,
    work: impl FnOnce() -> T,
) -> Result<(T, u64, StatsSnapshot), RunError> {
    let model_err = |e: &dyn std::fmt::Display| RunError::Model(e.to_string());
    let mut cpu = 0;
    let mut st = StatsSnapshot::default();
    let out = match model {
        LocalModel::VhostStyle => {
            let mut workers = Vec::new();
            for (i, qs) in devices.into_iter().enumerate() {
                workers.push(
                    VhostWorker::spawn(&format!("vhost-{what}-{i}"), qs)
                        .map_err(|e| model_err(&e))?,
                );
            }
            let out = work();
            for w in workers.iter_mut() {
                w.stop();
                cpu += w.cpu_ns();
                st = sum(st, w.stats().snapshot());
            }
            out
        }
        LocalModel::Sidecore { cores, cfg } => {
            let mut scs = Vec::new();
            for i in 0..cores.max(1) {
                scs.push(
                    SidecoreThread::spawn(&format!("sidecore-{what}-{i}"), cfg)
                        .map_err(|e| model_err(&e))?,
                );
            }
            for (i, q) in devices.into_iter().flatten().enumerate() {
                scs[i % scs.len()].add(q).map_err(|e| model_err(&e))?;
            }
            let out = work();
            for s in scs.iter_mut() {
                s.stop();
                cpu += s.cpu_ns();
                st = sum(st, s.stats().snapshot());
            }
            out
        }
    };
    Ok((out, cpu, st))
}

/// Runs `rc` against a local model over `backend`.
pub fn run_local(
    model: LocalModel,
    backend: Arc<dyn BlockBackend>,
    blk: BlockConfig,
    rc: &RunConfig,
    progress: &Arc<AtomicU64>,
) -> Result<ModelReport, RunError> {
    let guests = make_guests(rc)?;
    let mut devices: Vec<Vec<Box<dyn ServedQueue>>> = Vec::new();
    for g in &guests {
        let mut qs: Vec<Box<dyn ServedQueue>> = Vec::new();
        for q in 0..usize::from(rc.queues_per_guest) {
            let dev = BlockDevice::new(backend.clone(), blk.clone());
            let lq = LocalQueue::new(g.device_side(q)?, dev)
                .map_err(|e| RunError::Device(e.to_string()))?;
            qs.push(Box::new(lq));
        }
        devices.push(qs);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let clock = RunClock::start();
    let (io, device_cpu_ns, stats) = serve_local(model, devices, "blk", || {
        drive_guests(guests, rc, progress, &stop)
    })?;
    let wall = clock.wall();
    let guest_cpu_ns = io.cpu_ns;
    Ok(ModelReport {
        model: model.name(),
        io,
        cost: clock
            .cost(wall, device_cpu_ns, stats)
            .with_guest_cpu(guest_cpu_ns),
    })
}

/// Opens a protection domain on `backend` (`device`: which RDMA device, for
/// verbs).
pub fn open_domain(
    backend: vrio_rdma::Backend,
    device: Option<&str>,
) -> Result<Arc<dyn vrio_rdma::Domain>, RunError> {
    vrio_rdma::open(backend, device)
        .map(Arc::from)
        .map_err(|e| RunError::Model(e.to_string()))
}

/// `n` protection domains on `backend`, one per guest.
pub fn open_domains(
    backend: vrio_rdma::Backend,
    device: Option<&str>,
    n: usize,
) -> Result<Vec<Arc<dyn vrio_rdma::Domain>>, RunError> {
    (0..n).map(|_| open_domain(backend, device)).collect()
}

/// Where an in-process I/O server listens on `backend`: any free loopback
/// TCP port for the socket and verbs back-ends; a fresh Unix socket path
/// (`unix:/tmp/...`, unique in this process and among processes) for the
/// others, which take `unix:` addresses.
pub fn listen_addr_for(backend: vrio_rdma::Backend) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    use vrio_rdma::Backend;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    match backend {
        Backend::Soft | Backend::Verbs => "127.0.0.1:0".into(),
        #[allow(unreachable_patterns)]
        _ => {
            let name = format!(
                "vrio-{}-{}.sock",
                std::process::id(),
                NEXT.fetch_add(1, Relaxed)
            );
            format!("unix:{}", std::env::temp_dir().join(name).display())
        }
    }
}

/// The attach request for the queue behind `side`, from the ring's start.
pub fn queue_attach(side: DeviceSide) -> vrio_core::remote::QueueAttach {
    vrio_core::remote::QueueAttach {
        layout: side.layout,
        features: side.features,
        kick: side.kick,
        call: side.call,
        start: 0,
    }
}

/// Attaches every queue of `guests` to the I/O server at `server` through
/// the VM-host agent, one protection domain per guest.
pub fn attach_guests(
    guests: &[SyntheticGuest],
    server: &str,
    backend: vrio_rdma::Backend,
    device: Option<&str>,
    mode: vrio_core::remote::NotifyMode,
) -> Result<Vec<vrio_core::remote::AttachedDevice>, RunError> {
    let placed = any_placement(guests, server);
    attach_guests_placed(guests, &placed, backend, device, mode)
}

/// Like [`attach_guests`], with a device id and a per-queue placement for
/// each guest (`placed[g]`), as a controller decided.
pub fn attach_guests_placed(
    guests: &[SyntheticGuest],
    placed: &[(u64, Vec<vrio_core::remote::QueueTarget>)],
    backend: vrio_rdma::Backend,
    device: Option<&str>,
    mode: vrio_core::remote::NotifyMode,
) -> Result<Vec<vrio_core::remote::AttachedDevice>, RunError> {
    attach_guests_credentialed(guests, placed, backend, device, mode, &[])
}

/// Like [`attach_guests_placed`], guest `g` presenting `credentials[g]`
/// (none past the end) to servers that check them.
pub fn attach_guests_credentialed(
    guests: &[SyntheticGuest],
    placed: &[(u64, Vec<vrio_core::remote::QueueTarget>)],
    backend: vrio_rdma::Backend,
    device: Option<&str>,
    mode: vrio_core::remote::NotifyMode,
    credentials: &[String],
) -> Result<Vec<vrio_core::remote::AttachedDevice>, RunError> {
    let domains = open_domains(backend, device, guests.len())?;
    let cfg = vrio_core::remote::AgentConfig {
        mode,
        ..Default::default()
    };
    let agent = new_agent()?;
    attach_in_domains(&agent, guests, placed, &domains, cfg, credentials)
}

/// The VM host's agent: one thread for all the guests of a run, as the
/// local sidecore is one thread for all of them.
pub fn new_agent() -> Result<vrio_core::remote::Agent, RunError> {
    vrio_core::remote::Agent::new("vrio-agent").map_err(|e| RunError::Model(e.to_string()))
}

/// [`attach_guests_placed`] with guest `g`'s device in `domains[g]`, all
/// served by `agent`.
fn attach_in_domains(
    agent: &vrio_core::remote::Agent,
    guests: &[SyntheticGuest],
    placed: &[(u64, Vec<vrio_core::remote::QueueTarget>)],
    domains: &[Arc<dyn vrio_rdma::Domain>],
    cfg: vrio_core::remote::AgentConfig,
    credentials: &[String],
) -> Result<Vec<vrio_core::remote::AttachedDevice>, RunError> {
    use vrio_core::remote::DeviceAttach;
    if placed.len() != guests.len() || domains.len() != guests.len() {
        return Err(RunError::Model(format!(
            "{} placements and {} domains for {} guests",
            placed.len(),
            domains.len(),
            guests.len()
        )));
    }
    let mut agents = Vec::with_capacity(guests.len());
    for (g, ((guest, (device_id, targets)), domain)) in
        guests.iter().zip(placed).zip(domains).enumerate()
    {
        let mut queues = Vec::new();
        for q in 0..usize::from(guest.cfg.queues) {
            queues.push(queue_attach(guest.device_side(q)?));
        }
        let dev = agent
            .attach_placed(
                Arc::clone(domain),
                targets.clone(),
                DeviceAttach {
                    device_id: *device_id,
                    mem: guest.memory().clone(),
                    queues,
                    credential: credentials.get(g).cloned(),
                },
                cfg,
            )
            .map_err(|e| RunError::Model(e.to_string()))?;
        agents.push(dev);
    }
    Ok(agents)
}

/// Extra figures of a remote run.
#[derive(Debug, Clone, Default)]
pub struct RemoteFigures {
    pub fabric: vrio_core::remote::RemoteSnapshot,
    /// CPU time of the VM-host agents (what vRIO leaves on the VM host,
    /// besides the fabric's own threads).
    pub vmhost_cpu_ns: u64,
    /// CPU time of the VM host's fabric threads (its domains'
    /// [`fabric_cpu_ns`](vrio_rdma::Domain::fabric_cpu_ns); 0 with a NIC).
    pub vmhost_fabric_cpu_ns: u64,
    /// CPU time of the I/O server's fabric threads.
    pub server_fabric_cpu_ns: u64,
    pub doorbells: u64,
    pub interrupts: u64,
}

/// The placement of every queue of `guests` on the server at `server`,
/// guest `g` as device `g`.
pub fn any_placement(
    guests: &[SyntheticGuest],
    server: &str,
) -> Vec<(u64, Vec<vrio_core::remote::QueueTarget>)> {
    guests
        .iter()
        .enumerate()
        .map(|(g, guest)| {
            let t = vrio_core::remote::QueueTarget::any(server);
            (g as u64, vec![t; usize::from(guest.cfg.queues)])
        })
        .collect()
}

/// Runs `rc` against remote sidecores: an in-process I/O server and one
/// agent thread for all guests, over `fabric` on this host (listening where
/// [`listen_addr_for`] says).
pub fn run_remote(
    mode: vrio_core::remote::NotifyMode,
    sidecores: usize,
    fabric: vrio_rdma::Backend,
    backend: Arc<dyn BlockBackend>,
    blk: BlockConfig,
    rc: &RunConfig,
    progress: &Arc<AtomicU64>,
) -> Result<(ModelReport, RemoteFigures), RunError> {
    let server = vrio_core::remote::IoServerConfig {
        sidecores,
        blk,
        ..vrio_core::remote::IoServerConfig::default()
    };
    run_remote_with(mode, fabric, server, backend, rc, progress)
}

/// [`run_remote`] with the whole I/O server configuration (except its
/// `listen` address, which [`listen_addr_for`] picks for `fabric`).
///
/// Credentials are on, as in production: unless `server_cfg` has keys of
/// its own, the server gets a fresh keyring, and each guest attaches with a
/// credential for the default volume (shared: the guests' block ranges are
/// disjoint).
pub fn run_remote_with(
    mode: vrio_core::remote::NotifyMode,
    fabric: vrio_rdma::Backend,
    server_cfg: vrio_core::remote::IoServerConfig,
    backend: Arc<dyn BlockBackend>,
    rc: &RunConfig,
    progress: &Arc<AtomicU64>,
) -> Result<(ModelReport, RemoteFigures), RunError> {
    use std::sync::atomic::Ordering::Relaxed;
    use vrio_core::remote::{IoServer, IoServerConfig};
    let sidecores = server_cfg.sidecores;
    let server_domain = open_domain(fabric, None)?;
    let keys = match &server_cfg.keys {
        Some(k) => k.clone(),
        None => Arc::new(
            vrio_core::tenancy::Keyring::ephemeral().map_err(|e| RunError::Model(e.to_string()))?,
        ),
    };
    let server_cfg = IoServerConfig {
        listen: listen_addr_for(fabric),
        keys: Some(keys.clone()),
        ..server_cfg
    };
    let server = IoServer::start(Arc::clone(&server_domain), backend, server_cfg)
        .map_err(|e| RunError::Model(e.to_string()))?;
    let guests = make_guests(rc)?;
    let host_domains = open_domains(fabric, None, guests.len())?;
    let placed = any_placement(&guests, server.addr());
    let cfg = vrio_core::remote::AgentConfig {
        mode,
        inline_max: rc.inline_max,
        ..Default::default()
    };
    let agent = new_agent()?;
    let credentials = placed
        .iter()
        .map(|(device, _)| {
            keys.mint(
                *device,
                vrio_core::tenancy::DEFAULT_VOLUME,
                vrio_core::tenancy::AccessMode::Shared,
                "",
                std::time::Duration::from_secs(3600),
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RunError::Model(e.to_string()))?;
    let mut agents = attach_in_domains(&agent, &guests, &placed, &host_domains, cfg, &credentials)?;
    let stop = Arc::new(AtomicBool::new(false));
    let fabric_clock = FabricCpuClock::start(&server_domain, &host_domains);
    let clock = RunClock::start();
    let io = drive_guests(guests, rc, progress, &stop);
    let wall = clock.wall();
    let mut fig = RemoteFigures::default();
    for a in agents.iter_mut() {
        a.detach();
        fig.doorbells += a.stats().doorbells.load(Relaxed);
        fig.interrupts += a.stats().interrupts.load(Relaxed);
    }
    fig.vmhost_cpu_ns = agent.cpu_ns();
    // Before `stop`, whose own connection to the server is no request's.
    (fig.vmhost_fabric_cpu_ns, fig.server_fabric_cpu_ns) = fabric_clock.elapsed();
    let stats = server.sidecore_stats();
    fig.fabric = server.stats().snapshot();
    let device_cpu_ns = server.stop();
    let guest_cpu_ns = io.cpu_ns;
    Ok((
        ModelReport {
            model: format!("remote {} x{}", mode.name(), sidecores.max(1)),
            io,
            cost: clock
                .cost(wall, device_cpu_ns, stats)
                .with_guest_cpu(guest_cpu_ns),
        },
        fig,
    ))
}
