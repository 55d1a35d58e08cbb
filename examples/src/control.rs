//! The binaries' side of the control plane: an I/O server registers, keeps
//! its lease with load reports and follows moves between its sidecores; a
//! VM host attaches devices where the controller places them and follows
//! moves and failovers. Each runs on a small tokio runtime of its own, next
//! to the synchronous data path.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::Code;
use vrio_control::client::{connect_with, Client};
use vrio_control::pb;
use vrio_core::remote::{device_key, queue_name, AttachedDevice, IoServer, LinkState, QueueTarget};

/// How to reach the controller.
#[derive(Clone)]
pub struct ControlOpts {
    pub addr: String,
    pub token: Option<String>,
    /// Mutual TLS (see [`TlsArgs`]); None for plain HTTP/2.
    pub tls: Option<vrio_control::tls::ClientTls>,
}

/// Command-line flags for mutual TLS to the controller, shared by the
/// binaries that talk to it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signed the controller's certificate; turns
    /// TLS on, together with --tls-cert and --tls-key.
    #[arg(long, env = "VRIO_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), signed by the controller's client CA.
    #[arg(long, env = "VRIO_TLS_CERT", requires = "tls_ca")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "VRIO_TLS_KEY", requires = "tls_ca")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Name the controller's certificate carries.
    #[arg(long, env = "VRIO_TLS_DOMAIN", default_value = "localhost")]
    pub tls_domain: String,
}

impl TlsArgs {
    pub fn load(&self) -> Result<Option<vrio_control::tls::ClientTls>, ControlGlueError> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => {
                let f = vrio_control::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                };
                Ok(Some(vrio_control::tls::ClientTls::load(
                    &f,
                    &self.tls_domain,
                )?))
            }
            (None, None, None) => Ok(None),
            _ => Err(ControlGlueError::Placement(
                "--tls-ca, --tls-cert and --tls-key go together".into(),
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlGlueError {
    #[error(transparent)]
    Connect(#[from] vrio_control::client::ConnectError),
    #[error("controller: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("{0}")]
    Placement(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] vrio_control::tls::TlsError),
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A background task on its own thread and runtime, stopped on drop.
pub struct Background {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Background {
    fn spawn<F, Fut>(name: &str, f: F) -> std::io::Result<Self>
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let rt = runtime()?;
        let (tx, rx) = oneshot::channel();
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || rt.block_on(f(rx)))?;
        Ok(Self {
            stop: Some(tx),
            join: Some(join),
        })
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Per-sidecore load since the previous sample.
struct LoadSampler {
    server: Arc<IoServer>,
    last: Vec<(u64, u64)>,
    at: Instant,
}

impl LoadSampler {
    fn sample(&mut self) -> Vec<pb::SidecoreLoad> {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let loads = self.server.sidecore_loads();
        let mut out = Vec::with_capacity(loads.len());
        self.last.resize(loads.len(), (0, 0));
        for (i, (s, _)) in loads.iter().enumerate() {
            let (busy0, req0) = self.last[i];
            let busy = (s.busy_ns.saturating_sub(busy0) as f64 / 1e9 / dt).clamp(0.0, 1.0);
            let rps = s.requests.saturating_sub(req0) as f64 / dt;
            out.push(pb::SidecoreLoad {
                sidecore: i as u32,
                busy,
                requests_per_sec: rps,
            });
            self.last[i] = (s.busy_ns, s.requests);
        }
        self.at = now;
        out
    }
}

/// Registers `server` as `id`, renews its lease with load reports, and
/// moves its queues between its sidecores as the controller decides.
pub fn join_as_server(
    ctl: ControlOpts,
    id: String,
    capacity: u32,
    server: Arc<IoServer>,
) -> Result<Background, ControlGlueError> {
    let reg = pb::RegisterServerRequest {
        id: id.clone(),
        address: server.addr().to_string(),
        sidecores: server.sidecore_count() as u32,
        capacity,
    };
    Ok(Background::spawn("vrio-control", move |stop| async move {
        let client = loop {
            match connect_with(&ctl.addr, ctl.token.as_deref(), ctl.tls.as_ref()).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "controller unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let mut sampler = LoadSampler {
            server: server.clone(),
            last: Vec::new(),
            at: Instant::now(),
        };
        let lease = vrio_control::agent::keep_registered(
            client.clone(),
            reg,
            move || sampler.sample(),
            std::future::pending(),
        );
        let follow = follow_as_server(client, id, server);
        tokio::select! {
            _ = stop => {}
            _ = lease => {}
            _ = follow => {}
        }
    })?)
}

/// Applies every assignment of this server to its sidecores.
async fn follow_as_server(mut client: Client, id: String, server: Arc<IoServer>) {
    loop {
        let req = pb::WatchAssignmentsRequest {
            device_id: String::new(),
            server_id: id.clone(),
        };
        match client.watch_assignments(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            let Some(a) = ev.assignment else { continue };
                            if a.server_id != id {
                                continue;
                            }
                            let name = queue_name(device_key(&a.device_id), a.queue as u16);
                            let (s, k) = (server.clone(), a.sidecore as usize);
                            let n = name.clone();
                            let r = tokio::task::spawn_blocking(move || s.move_queue(&n, k)).await;
                            match r {
                                Ok(Ok(())) => {}
                                // Not attached here (yet): the agent's ATTACH
                                // carries the sidecore.
                                Ok(Err(vrio_core::remote::ServerError::NoSuchQueue(_))) => {}
                                Ok(Err(e)) => {
                                    tracing::warn!(queue = %name, error = %e, "cannot follow a move")
                                }
                                Err(e) => tracing::error!(error = %e, "move task failed"),
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "assignment watch ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch assignments"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where the controller placed one device's queues.
pub struct Placed {
    pub device_id: String,
    pub targets: Vec<QueueTarget>,
}

async fn server_addresses(
    client: &mut Client,
) -> Result<HashMap<String, (String, bool)>, tonic::Status> {
    let r = client
        .list_servers(pb::ListServersRequest {})
        .await?
        .into_inner();
    Ok(r.servers
        .into_iter()
        .map(|s| (s.id, (s.address, s.alive)))
        .collect())
}

fn targets(
    n: u16,
    assignments: &[pb::Assignment],
    servers: &HashMap<String, (String, bool)>,
    device: &str,
) -> Result<Vec<QueueTarget>, ControlGlueError> {
    let mut out = Vec::with_capacity(usize::from(n));
    for q in 0..u32::from(n) {
        let a = assignments.iter().find(|a| a.queue == q).ok_or_else(|| {
            ControlGlueError::Placement(format!("no assignment for queue {q} of {device}"))
        })?;
        let (addr, _) = servers.get(&a.server_id).ok_or_else(|| {
            ControlGlueError::Placement(format!(
                "queue {q} of {device} waits for a live server with room"
            ))
        })?;
        out.push(QueueTarget {
            server: addr.clone(),
            sidecore: a.sidecore as u16,
        });
    }
    Ok(out)
}

/// Attaches `devices` (id, queues) with the controller and returns where
/// each queue goes. A device the controller already knows (an agent that
/// restarted) keeps its placement.
pub fn place_devices(
    ctl: &ControlOpts,
    vm_id: &str,
    agent_address: &str,
    devices: &[(String, u16)],
) -> Result<Vec<Placed>, ControlGlueError> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut client = connect_with(&ctl.addr, ctl.token.as_deref(), ctl.tls.as_ref()).await?;
        let mut assigned = Vec::new();
        for (id, queues) in devices {
            let req = pb::AttachDeviceRequest {
                device: Some(pb::Device {
                    id: id.clone(),
                    vm_id: vm_id.to_string(),
                    r#type: pb::DeviceType::Blk as i32,
                    queues: u32::from(*queues),
                    agent_address: agent_address.to_string(),
                    pinned_server_id: String::new(),
                }),
            };
            let a = match client.attach_device(req).await {
                Ok(r) => r.into_inner().assignments,
                Err(s) if s.code() == Code::AlreadyExists => {
                    tracing::info!(device = %id, "device known to the controller; keeping its placement");
                    client
                        .list_assignments(pb::ListAssignmentsRequest {
                            device_id: id.clone(),
                            server_id: String::new(),
                        })
                        .await?
                        .into_inner()
                        .assignments
                }
                Err(s) => return Err(s.into()),
            };
            assigned.push((id.clone(), *queues, a));
        }
        let servers = server_addresses(&mut client).await?;
        assigned
            .into_iter()
            .map(|(id, n, a)| {
                Ok(Placed {
                    targets: targets(n, &a, &servers, &id)?,
                    device_id: id,
                })
            })
            .collect()
    })
}

/// One line per completed move or failover, for logs and tests.
fn report(device: &str, queue: u16, r: &vrio_core::remote::MoveReport, to: &QueueTarget) {
    match r.down {
        Some(down) => println!(
            "agent: failover: device {device} queue {queue} resumed on {} sidecore {} at ring index {} after {} ms without a server",
            to.server, to.sidecore, r.resumed_at, down.as_millis()
        ),
        None => println!(
            "agent: moved: device {device} queue {queue} to {} sidecore {} at ring index {} in {} ms",
            to.server, to.sidecore, r.resumed_at, r.took.as_millis()
        ),
    }
}

/// What an agent follows: controller device ids, and for each of their
/// queues the attached device serving it now (if its ring runs) and that
/// queue's index there.
pub trait Followed: Send + Sync + 'static {
    fn devices(&self) -> Vec<String>;
    fn queue(&self, device: &str, queue: u16) -> Option<(Arc<AttachedDevice>, u16)>;
    /// Where the controller wants `queue` now (recorded for a ring that is
    /// not attached yet).
    fn placed(&self, _device: &str, _queue: u16, _to: &QueueTarget) {}
}

/// Devices attached once, queue q of device d being queue q of its agent.
pub struct AttachedSet(pub Vec<(String, Arc<AttachedDevice>)>);

impl Followed for AttachedSet {
    fn devices(&self) -> Vec<String> {
        self.0.iter().map(|(id, _)| id.clone()).collect()
    }
    fn queue(&self, device: &str, queue: u16) -> Option<(Arc<AttachedDevice>, u16)> {
        let (_, d) = self.0.iter().find(|(id, _)| id == device)?;
        Some((d.clone(), queue))
    }
}

/// Moves `queue` of `device` to where the controller says if that is
/// another server, or if the queue lost its server. Sidecore changes within
/// one server are the server's to make.
async fn apply(f: &Arc<dyn Followed>, device: &str, queue: u16, to: QueueTarget) {
    f.placed(device, queue, &to);
    let Some((dev, index)) = f.queue(device, queue) else {
        return;
    };
    let Some(now) = dev.queues().into_iter().find(|q| q.queue == index) else {
        tracing::warn!(
            device,
            queue,
            "the controller names a queue this agent lacks"
        );
        return;
    };
    if now.state != LinkState::Orphaned && now.target.server == to.server {
        return;
    }
    let t = to.clone();
    match tokio::task::spawn_blocking(move || dev.move_queue(index, t)).await {
        Ok(Ok(r)) => report(device, queue, &r, &to),
        Ok(Err(e)) => {
            tracing::warn!(device, queue, server = %to.server, error = %e, "move failed; will retry")
        }
        Err(e) => tracing::error!(error = %e, "move task failed"),
    }
}

/// Follows the controller for `followed`: moves and failovers the watch
/// stream announces, plus a reconciliation every second for what the watch
/// could not do (a move that failed or raced another, a queue that lost
/// its server while its assignment stayed).
pub fn follow_as_agent(
    ctl: ControlOpts,
    followed: Arc<dyn Followed>,
) -> Result<Background, ControlGlueError> {
    Ok(Background::spawn("vrio-follow", move |stop| async move {
        let run = async {
            loop {
                let mut client =
                    match connect_with(&ctl.addr, ctl.token.as_deref(), ctl.tls.as_ref()).await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "controller unreachable; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    };
                if let Err(e) = follow_once(&mut client, &followed).await {
                    tracing::warn!(error = %e, "lost the controller; reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        };
        tokio::select! {
            _ = stop => {}
            _ = run => {}
        }
    })?)
}

async fn follow_once(client: &mut Client, f: &Arc<dyn Followed>) -> Result<(), tonic::Status> {
    let mut stream = client
        .watch_assignments(pb::WatchAssignmentsRequest {
            device_id: String::new(),
            server_id: String::new(),
        })
        .await?
        .into_inner();
    let mut servers = server_addresses(client).await?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            m = stream.message() => {
                let Some(ev) = m? else { return Ok(()) };
                let Some(a) = ev.assignment else { continue };
                if !f.devices().contains(&a.device_id) {
                    continue;
                }
                if a.server_id.is_empty() {
                    tracing::warn!(device = %a.device_id, queue = a.queue, "no live server has room; the queue waits");
                    continue;
                }
                if !servers.contains_key(&a.server_id) {
                    servers = server_addresses(client).await?;
                }
                let Some((addr, _)) = servers.get(&a.server_id) else { continue };
                let to = QueueTarget { server: addr.clone(), sidecore: a.sidecore as u16 };
                apply(f, &a.device_id, a.queue as u16, to).await;
            }
            _ = check.tick() => reconcile(client, f, &mut servers).await?,
        }
    }
}

/// Brings every followed queue to where the controller says.
async fn reconcile(
    client: &mut Client,
    f: &Arc<dyn Followed>,
    servers: &mut HashMap<String, (String, bool)>,
) -> Result<(), tonic::Status> {
    let assigned = client
        .list_assignments(pb::ListAssignmentsRequest::default())
        .await?
        .into_inner()
        .assignments;
    *servers = server_addresses(client).await?;
    let ours = f.devices();
    for a in assigned.iter().filter(|a| ours.contains(&a.device_id)) {
        // Only a live server: a dead one's queues move on lease expiry.
        let Some((addr, true)) = servers.get(&a.server_id) else {
            continue;
        };
        let to = QueueTarget {
            server: addr.clone(),
            sidecore: a.sidecore as u16,
        };
        apply(f, &a.device_id, a.queue as u16, to).await;
    }
    Ok(())
}

/// A controller inside this process: the crash-safe file store in
/// `state_dir`, the default placement policy, the gRPC service on a free
/// loopback port behind `token`. Returns it and its address.
pub fn embedded_controller(
    state_dir: &std::path::Path,
    token: &str,
    lease_ttl_ms: u64,
) -> Result<(Background, String), ControlGlueError> {
    use vrio_control::placement::LeastLoaded;
    use vrio_control::server::{serve, ServeOptions};
    use vrio_control::store::FileStore;
    use vrio_control::{Controller, ControllerConfig};
    let store = FileStore::open(state_dir)
        .map_err(|e| ControlGlueError::Placement(format!("controller state: {e}")))?;
    let ctrl = Controller::open(
        ControllerConfig {
            lease_ttl_ms,
            ..ControllerConfig::default()
        },
        Box::new(store),
        Box::new(LeastLoaded::default()),
        vrio_control::service::now_ms(),
    )
    .map_err(|e| ControlGlueError::Placement(format!("controller state: {e}")))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?.to_string();
    let opts = ServeOptions {
        token: Some(token.to_string()),
        tick: Duration::from_millis(100),
        rebalance_every: None,
        tls: None,
    };
    let bg = Background::spawn("vrio-controller", move |stop| async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "embedded controller cannot listen");
                return;
            }
        };
        let shutdown = async {
            let _ = stop.await;
        };
        if let Err(e) = serve(listener, Arc::new(ctrl), opts, shutdown).await {
            tracing::error!(error = %e, "embedded controller failed");
        }
    })?;
    Ok((bg, addr))
}

/// Blocks until `n` servers are alive at the controller.
pub fn wait_for_servers(
    ctl: &ControlOpts,
    n: usize,
    within: Duration,
) -> Result<(), ControlGlueError> {
    let rt = runtime()?;
    rt.block_on(async {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(mut c) = connect_with(&ctl.addr, ctl.token.as_deref(), ctl.tls.as_ref()).await
            {
                if let Ok(m) = server_addresses(&mut c).await {
                    if m.values().filter(|(_, alive)| *alive).count() >= n {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(ControlGlueError::Placement(format!(
                    "{n} I/O server(s) did not register within {within:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Asks the controller to drain `server_id`; returns how many queues it
/// moved.
pub fn drain(ctl: &ControlOpts, server_id: &str) -> Result<usize, ControlGlueError> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = connect_with(&ctl.addr, ctl.token.as_deref(), ctl.tls.as_ref()).await?;
        let r = c
            .drain_server(pb::DrainServerRequest {
                server_id: server_id.to_string(),
            })
            .await?;
        Ok(r.into_inner().moved.len())
    })
}
