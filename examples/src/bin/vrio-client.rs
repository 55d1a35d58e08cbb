//! vrio-client: a VM host whose guests' virtio-blk queues are served by a
//! remote `vrio-server`, through vrio's VM-host agent: guest memory is
//! registered with the fabric (one protection domain per guest), kicks
//! become doorbells, completions become interrupts.
//!
//! - `vrio-client synthetic`: synthetic guests; every block written is
//!   verified when read back.
//! - `vrio-client vhost-user-blk`: a vhost-user-blk back-end, so an
//!   unmodified VMM (QEMU `vhost-user-blk-pci`) and its guest's stock
//!   virtio_blk driver are served by the I/O server, or (`--local-file`)
//!   by a local sidecore on a disk image, the local model to compare with.
//! - `vrio-client vhost-user-net`: a vhost-user-net back-end (QEMU
//!   `-netdev vhost-user`): the guest's RX and TX queues attach to the I/O
//!   server's switch as a net device with the given MAC.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};
use vrio_control::{
    claim_device, follow_placement, place_devices, AttachedSet, ControlOpts, Followed,
};
use vrio_core::blk::{BlockBackend, BlockConfig, FileBackend};
use vrio_core::net::MacAddr;
use vrio_core::remote::AgentConfig;
use vrio_core::remote::{device_key, AttachedDevice, QueueTarget};
use vrio_core::sidecore::{SidecoreConfig, SidecoreThread};
use vrio_core::vhost_user::{
    fetch_config, serve, serve_net, AttachHook, FrontConfig, LocalFront, Placement, RemoteFront,
    Serving,
};
use vrio_examples::control::print_move;
use vrio_examples::metrics::{Agents, ClientMetrics, MetricsListener, MetricsServer, ObsArgs};
use vrio_examples::{
    backend_name, block_signals, init_tracing_as, print_table, resolve_fabric, verdict_exit,
    wait_for_signal, FabricChoice, ModeChoice, Progress, WorkloadArgs,
};
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::runner::{any_placement, attach_guests_credentialed, drive_guests, make_guests};

/// A VM host whose guests' virtio-blk queues a remote vrio I/O server serves.
#[derive(Parser, Debug)]
#[command(
    version,
    long_about = None,
    after_help = "Examples:\n  \
        vrio-client synthetic --server 127.0.0.1:7420 --guests 4 --queues 2\n  \
        vrio-client vhost-user-blk --socket /tmp/vub.sock --server 127.0.0.1:7420 --queues 2\n  \
        vrio-client vhost-user-blk --socket /tmp/vub.sock --local-file disk.raw --queues 2\n    \
        (then QEMU: -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem\n     \
        -chardev socket,id=vub0,path=/tmp/vub.sock,reconnect-ms=500\n     \
        -device vhost-user-blk-pci,chardev=vub0,num-queues=2;\n     \
        reconnect-ms lets QEMU come back to a restarted vrio-client)\n  \
        vrio-client synthetic --server 127.0.0.1:7420 --metrics-listen 127.0.0.1:9101 --metrics-linger 30"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run verified synthetic guests against the I/O server.
    Synthetic(Args),
    /// Serve a vhost-user-blk socket (QEMU -device vhost-user-blk-pci) from
    /// the I/O server, or from a local sidecore with --local-file.
    VhostUserBlk(VhostArgs),
    /// Serve a vhost-user-net socket (QEMU -netdev vhost-user) from the I/O
    /// server's switch.
    VhostUserNet(VhostNetArgs),
}

/// How a VM host reaches its I/O server (every subcommand that has one).
#[derive(ClapArgs, Debug)]
struct LinkArgs {
    /// How the server learns of requests.
    #[arg(long, value_enum, default_value_t = ModeChoice::Doorbell)]
    mode: ModeChoice,
    /// Fabric back-end.
    #[arg(long, value_enum, default_value_t = FabricChoice::Auto)]
    fabric: FabricChoice,
    /// RDMA device for verbs (default: the first one).
    #[arg(long)]
    device: Option<String>,
    /// The device's attach credential, for servers started with
    /// --key-file (mint one with `vrio-ctl credential mint`): the token, or
    /// @FILE to read it from a file. `synthetic` takes one per guest, in
    /// guest order.
    #[arg(
        long = "credential",
        value_name = "TOKEN|@FILE",
        env = "VRIO_CREDENTIAL",
        hide_env_values = true
    )]
    credentials: Vec<String>,
}

impl LinkArgs {
    /// The credentials given, files read.
    fn credentials(&self) -> Result<Vec<String>, String> {
        self.credentials
            .iter()
            .map(|c| match c.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map(|t| t.trim().to_string())
                    .map_err(|e| format!("--credential @{path}: {e}")),
                None => Ok(c.trim().to_string()),
            })
            .collect()
    }
    /// The one credential of a one-device subcommand.
    fn credential(&self) -> Result<Option<String>, String> {
        let mut c = self.credentials()?;
        if c.len() > 1 {
            return Err("give --credential once: this serves one device".into());
        }
        Ok(c.pop())
    }
}

#[derive(ClapArgs, Debug)]
struct VhostNetArgs {
    /// The vhost-user socket to create and listen on.
    #[arg(long)]
    socket: PathBuf,
    /// The I/O server's address (as vrio-server printed it).
    #[arg(long, default_value = "127.0.0.1:7420")]
    server: String,
    /// The guest's MAC (match QEMU's `-device virtio-net-pci,mac=`): the
    /// server's switch port takes this address and drops frames from others.
    #[arg(long, value_parser = parse_mac)]
    mac: MacAddr,
    /// Device id the queue attachments carry; unique per server (each
    /// device is one switch port).
    #[arg(long, default_value_t = 0)]
    device_id: u64,
    /// Largest vring the VMM may set up.
    #[arg(long, default_value_t = 1024)]
    max_queue_size: u16,
    #[command(flatten)]
    link: LinkArgs,
    /// Exit when the first VMM disconnects instead of waiting for the next.
    #[arg(long)]
    once: bool,
    /// TEST ONLY: during a live migration, do not mark the RX buffers the
    /// I/O server writes in the VMM's dirty log (see vhost-user-blk's).
    #[arg(long, hide = true)]
    test_unlogged_writes: bool,
    #[command(flatten)]
    obs: ObsArgs,
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bytes: Vec<u8> = parts
        .iter()
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad MAC {s:?}: {e}"))?;
    let mac = MacAddr::from_slice(&bytes)
        .filter(|_| bytes.len() == 6)
        .ok_or_else(|| format!("bad MAC {s:?}: want six hex bytes like 52:54:00:00:00:01"))?;
    if mac.is_multicast() || mac.is_zero() {
        return Err(format!("{mac} is not a unicast address"));
    }
    Ok(mac)
}

#[derive(ClapArgs, Debug)]
struct VhostArgs {
    /// The vhost-user socket to create and listen on.
    #[arg(long)]
    socket: PathBuf,
    /// The I/O server's address (as vrio-server printed it).
    #[arg(long, default_value = "127.0.0.1:7420")]
    server: String,
    /// Serve the vrings here, with a local sidecore on this raw disk image
    /// (no I/O server).
    #[arg(long, conflicts_with = "server")]
    local_file: Option<PathBuf>,
    /// With --local-file: create the image, or extend it, to this size.
    #[arg(long, requires = "local_file")]
    size_mib: Option<u64>,
    /// Queues offered to the VMM (match the VMM's num-queues).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Largest vring the VMM may set up.
    #[arg(long, default_value_t = 1024)]
    max_queue_size: u16,
    /// Largest request the I/O server accepts, in KiB (its
    /// RemoteQueueConfig::max_request); the guest is kept under it.
    #[arg(long, default_value_t = 128)]
    max_request_kib: u32,
    /// Device id the queue attachments carry (distinguishes VM hosts in
    /// the server's logs).
    #[arg(long, default_value_t = 0)]
    device_id: u64,
    #[command(flatten)]
    link: LinkArgs,
    /// Exit when the first VMM disconnects instead of waiting for the next.
    #[arg(long)]
    once: bool,
    /// TEST ONLY: during a live migration, do not mark the data the I/O
    /// server writes in the VMM's dirty log, so the destination loses it
    /// (the test that proves the log matters).
    #[arg(long, hide = true)]
    test_unlogged_writes: bool,
    /// Let this vrio-controller (host:port) place the vrings, instead of
    /// --server, and follow its moves and failovers while the guest runs.
    #[arg(long, conflicts_with_all = ["server", "local_file"])]
    controller: Option<String>,
    /// The device's id at the controller (default: `vhost-user-<device-id>`).
    #[arg(long, requires = "controller")]
    device_name: Option<String>,
    /// VM id reported to the controller.
    #[arg(long, default_value = "vhost-user", requires = "controller")]
    vm_id: String,
    /// This VM host's name for the controller (the device's agent
    /// address). When the VMM starts the vrings here, the controller
    /// records that the device runs on this host: after a live migration,
    /// the destination's. Default: HOSTNAME:SOCKET.
    #[arg(long, requires = "controller")]
    vm_host: Option<String>,
    /// Bearer token for the controller.
    #[arg(long, env = "VRIO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: vrio_examples::control::TlsArgs,
    #[command(flatten)]
    obs: ObsArgs,
}

/// This host's name, for the controller.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// When a vring attaches, tells the controller (off the attaching thread)
/// that device `name` runs on `vm_host` now; prints it when that is news
/// (a live migration brought the guest here).
fn claim_on_attach(ctl: ControlOpts, name: String, vm_host: String, vm_id: String) -> AttachHook {
    Arc::new(move |q| {
        let (ctl, name, vm_host, vm_id) =
            (ctl.clone(), name.clone(), vm_host.clone(), vm_id.clone());
        let spawned = std::thread::Builder::new()
            .name("vrio-claim".into())
            .spawn(move || match claim_device(&ctl, &name, &vm_host, &vm_id) {
                Ok((before, _)) if before != vm_host => println!(
                    "vrio-client: device {name} moved VM hosts: {before} -> {vm_host} (vring {q} attached here)"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(device = %name, error = %e, "cannot tell the controller the device runs here"),
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the controller claim");
        }
    })
}

/// The vrings of one vhost-user device, as a controller follower sees them.
struct VhostFollowed {
    name: String,
    placement: Arc<Placement>,
}

impl Followed for VhostFollowed {
    fn devices(&self) -> Vec<String> {
        vec![self.name.clone()]
    }
    fn queue(&self, device: &str, queue: u16) -> Option<(Arc<AttachedDevice>, u16)> {
        (device == self.name)
            .then(|| self.placement.attached(usize::from(queue)))
            .flatten()
            .map(|d| (d, 0))
    }
    fn placed(&self, device: &str, queue: u16, to: &QueueTarget) {
        if device == self.name {
            self.placement.set_target(usize::from(queue), to.clone());
        }
    }
}

#[derive(ClapArgs, Debug)]
struct Args {
    /// The I/O server's address (as vrio-server printed it).
    #[arg(long, default_value = "127.0.0.1:7420")]
    server: String,
    #[command(flatten)]
    w: WorkloadArgs,
    /// Run for this many seconds instead of a number of requests. SIGINT or
    /// SIGTERM ends any run early: the guests stop issuing, drain what is in
    /// flight, and the verdict is printed as usual.
    #[arg(long, conflicts_with = "requests")]
    seconds: Option<f64>,
    /// First disk block used (clients sharing one server use disjoint ranges).
    #[arg(long, default_value_t = 0)]
    first_block: u64,
    #[command(flatten)]
    link: LinkArgs,
    /// Place the devices through this vrio-controller (host:port) instead
    /// of --server, and follow its moves and failovers.
    #[arg(long, conflicts_with = "server")]
    controller: Option<String>,
    /// VM id reported to the controller; device ids are `<vm-id>-d<guest>`.
    #[arg(long, default_value = "synthetic", requires = "controller")]
    vm_id: String,
    /// Bearer token for the controller.
    #[arg(long, env = "VRIO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: vrio_examples::control::TlsArgs,
    #[command(flatten)]
    obs: ObsArgs,
    /// With --metrics-listen: before the guests start, wait up to this many
    /// seconds for a first scrape of /metrics, so that the scraper sees the
    /// counters start from zero (then go on anyway).
    #[arg(long, value_name = "SECS", requires = "metrics_listen")]
    metrics_wait: Option<f64>,
    /// With --metrics-listen: after the verdict, keep serving /metrics for
    /// this many seconds (SIGINT or SIGTERM ends it sooner), so that the
    /// scraper sees the final counts.
    #[arg(long, value_name = "SECS", requires = "metrics_listen")]
    metrics_linger: Option<f64>,
}

impl Cmd {
    fn obs(&self) -> &ObsArgs {
        match self {
            Cmd::Synthetic(a) => &a.obs,
            Cmd::VhostUserBlk(a) => &a.obs,
            Cmd::VhostUserNet(a) => &a.obs,
        }
    }
}

/// Serves /metrics from `collector` on `listener` (when --metrics-listen
/// was given), and says where.
fn serve_metrics(
    listener: Option<MetricsListener>,
    collector: ClientMetrics,
) -> Result<Option<MetricsServer>, Box<dyn std::error::Error>> {
    let Some(l) = listener else {
        return Ok(None);
    };
    let m = l.serve("vrio-client", collector)?;
    println!(
        "vrio-client: metrics listening on http://{}/metrics",
        m.addr()
    );
    Ok(Some(m))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing_as(cli.cmd.obs().log_format);
    match cli.cmd {
        Cmd::Synthetic(a) => verdict_exit(
            "vrio-client",
            run(&a),
            "requests were lost, failed or corrupt",
        ),
        // These serve until the VMM leaves: nothing to verify.
        Cmd::VhostUserBlk(a) => verdict_exit("vrio-client", vhost_user_blk(&a).map(|()| true), ""),
        Cmd::VhostUserNet(a) => verdict_exit("vrio-client", vhost_user_net(&a).map(|()| true), ""),
    }
}

fn vhost_user_blk(a: &VhostArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.queues == 0 || a.queues > 64 {
        return Err("--queues must be between 1 and 64".into());
    }
    if a.max_request_kib < 8 {
        return Err("--max-request-kib must be at least 8".into());
    }
    let metrics = a.obs.bind_metrics()?;
    if let Some(image) = &a.local_file {
        return vhost_user_blk_local(a, image, metrics);
    }
    let fabric = resolve_fabric(a.link.fabric, a.link.device.as_deref())?;
    let placement = Arc::new(Placement::default());
    // With a controller: where it places each vring, and a follower.
    let (server, device_id, where_, mut follower, issued) = match &a.controller {
        None => (a.server.clone(), a.device_id, a.server.clone(), None, None),
        Some(addr) => {
            let ctl = ControlOpts {
                addr: addr.clone(),
                token: a.token.clone(),
                tls: a.tls.load()?,
            };
            let name = a
                .device_name
                .clone()
                .unwrap_or_else(|| format!("vhost-user-{}", a.device_id));
            let vm_host = a
                .vm_host
                .clone()
                .unwrap_or_else(|| format!("{}:{}", host_name(), a.socket.display()));
            let placed = place_devices(&ctl, &a.vm_id, &vm_host, &[(name.clone(), a.queues)])?;
            if let Ok(mut h) = placement.on_attach.lock() {
                *h = Some(claim_on_attach(
                    ctl.clone(),
                    name.clone(),
                    vm_host,
                    a.vm_id.clone(),
                ));
            }
            let (targets, issued) = placed
                .into_iter()
                .next()
                .map(|p| (p.targets, p.credential))
                .ok_or("the controller placed nothing")?;
            for (q, t) in targets.iter().enumerate() {
                placement.set_target(q, t.clone());
            }
            let first = targets
                .first()
                .map(|t| t.server.clone())
                .ok_or("the controller placed no queue")?;
            let f = follow_placement(
                ctl,
                Arc::new(VhostFollowed {
                    name: name.clone(),
                    placement: placement.clone(),
                }),
                print_move,
            )?;
            let w = format!("controller {addr} as device {name}");
            (first, device_key(&name), w, Some(f), issued)
        }
    };
    let remote = RemoteFront {
        server: server.clone(),
        fabric,
        device: a.link.device.clone(),
        max_request: a.max_request_kib.saturating_mul(1024),
        device_id,
        agent: AgentConfig {
            mode: a.link.mode.notify(),
            log_data: !a.test_unlogged_writes,
            ..AgentConfig::default()
        },
        placement,
        // The controller's, if it signs them; else the one given.
        credential: issued.or(a.link.credential()?),
        read_only: false,
    };
    let domain = Arc::from(vrio_rdma::open(fabric, a.link.device.as_deref())?);
    let probed = fetch_config(
        domain,
        &server,
        device_id,
        remote.credential.clone(),
        remote.agent,
    )?;
    let remote = RemoteFront {
        read_only: probed.read_only(),
        ..remote
    };
    let _metrics = serve_metrics(
        metrics,
        ClientMetrics::new(Agents::Vrings {
            device: device_id.to_string(),
            placement: remote.placement.clone(),
        }),
    )?;
    let config = probed.config;
    // The first line is machine-readable: tests wait for it.
    println!(
        "vrio-client: vhost-user-blk on {} served by {} (fabric {}, {} queue(s), {} mode, {} sectors)",
        a.socket.display(),
        where_,
        backend_name(fabric),
        a.queues,
        a.link.mode.notify().name(),
        capacity(&config)
    );
    serve_blk(a, Serving::Remote(remote), &config)?;
    if let Some(f) = follower.as_mut() {
        f.stop();
    }
    println!("vrio-client: the VMM disconnected, exiting");
    Ok(())
}

fn vhost_user_net(a: &VhostNetArgs) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = a.obs.bind_metrics()?;
    let fabric = resolve_fabric(a.link.fabric, a.link.device.as_deref())?;
    let remote = RemoteFront {
        server: a.server.clone(),
        fabric,
        device: a.link.device.clone(),
        // Unused by net queues: the server bounds frames by its MTU.
        max_request: 64 << 10,
        device_id: a.device_id,
        agent: AgentConfig {
            mode: a.link.mode.notify(),
            log_data: !a.test_unlogged_writes,
            ..AgentConfig::default()
        },
        placement: Arc::new(Placement::default()),
        credential: a.link.credential()?,
        read_only: false,
    };
    // The first line is machine-readable: tests wait for it.
    println!(
        "vrio-client: vhost-user-net on {} served by {} (fabric {}, device {}, mac {}, {} mode)",
        a.socket.display(),
        a.server,
        backend_name(fabric),
        a.device_id,
        a.mac,
        a.link.mode.notify().name(),
    );
    let _metrics = serve_metrics(
        metrics,
        ClientMetrics::new(Agents::Vrings {
            device: a.device_id.to_string(),
            placement: remote.placement.clone(),
        }),
    )?;
    let once = a.once;
    serve_net(&a.socket, &remote, a.mac, a.max_queue_size, || !once)?;
    println!("vrio-client: the VMM disconnected, exiting");
    Ok(())
}

/// Serves the vhost-user-blk socket with `serving` until the VMM leaves
/// (the first one with `--once`).
fn serve_blk(
    a: &VhostArgs,
    serving: Serving,
    config: &[u8],
) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = FrontConfig {
        serving,
        queues: a.queues,
        max_queue_size: a.max_queue_size,
    };
    let once = a.once;
    serve(&a.socket, &cfg, config, || !once)?;
    Ok(())
}

fn capacity(config: &[u8]) -> u64 {
    config
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// The local model: one sidecore on this host serves every vring straight
/// from the guest memory the VMM shared, on a file image.
fn vhost_user_blk_local(
    a: &VhostArgs,
    image: &std::path::Path,
    metrics: Option<MetricsListener>,
) -> Result<(), Box<dyn std::error::Error>> {
    let file = match a.size_mib {
        Some(mib) => FileBackend::create(image, mib.saturating_mul(1 << 20))?,
        None => FileBackend::open(image, false)?,
    };
    let backend: Arc<dyn BlockBackend> = Arc::new(file);
    let sidecore = Arc::new(SidecoreThread::spawn(
        "vhost-sidecore",
        SidecoreConfig::default(),
    )?);
    let local = LocalFront {
        backend,
        blk: BlockConfig {
            num_queues: a.queues,
            ..BlockConfig::default()
        },
        sidecore,
    };
    let config = local.config_space();
    // The first line is machine-readable: tests wait for it.
    println!(
        "vrio-client: vhost-user-blk on {} served by a local sidecore (file {}, {} queue(s), {} sectors)",
        a.socket.display(),
        image.display(),
        a.queues,
        capacity(&config)
    );
    let _metrics = serve_metrics(
        metrics,
        ClientMetrics::new(Agents::None).with_sidecore(local.sidecore.stats().clone()),
    )?;
    serve_blk(a, Serving::Local(local), &config)?;
    println!("vrio-client: the VMM disconnected, exiting");
    Ok(())
}

fn run(a: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    a.w.check()?;
    if a.seconds.is_some_and(|s| !(s > 0.0 && s < 1e9)) {
        return Err("--seconds must be a positive number".into());
    }
    for (flag, v) in [
        ("--metrics-wait", a.metrics_wait),
        ("--metrics-linger", a.metrics_linger),
    ] {
        if v.is_some_and(|s| !(0.0..1e9).contains(&s)) {
            return Err(format!("{flag} must be a number of seconds, 0 or more").into());
        }
    }
    let metrics = a.obs.bind_metrics()?;
    // Before any thread starts, so that only the waiter below takes them.
    block_signals();
    let stop = Arc::new(AtomicBool::new(false));
    let signalled = Arc::new(AtomicBool::new(false));
    {
        let (stop, signalled) = (stop.clone(), signalled.clone());
        std::thread::spawn(move || {
            if let Some(sig) = wait_for_signal(None) {
                eprintln!(
                    "vrio-client: signal {sig}: draining the guests' queues (again to quit now)"
                );
                signalled.store(true, Relaxed);
                stop.store(true, Relaxed);
            }
            if let Some(sig) = wait_for_signal(None) {
                eprintln!("vrio-client: signal {sig}: quitting without a verdict");
                std::process::exit(130);
            }
        });
    }
    let mode = a.link.mode.notify();
    let fabric = resolve_fabric(a.link.fabric, a.link.device.as_deref())?;
    let mut rc = a.w.run_config(WorkloadConfig {
        duration: a.seconds.map(Duration::from_secs_f64),
        first_block: a.first_block,
        stall_timeout: Duration::from_secs(60),
        ..WorkloadConfig::default()
    });
    if a.seconds.is_some() {
        // Until the duration is over, however many requests that is.
        rc.workload.requests = 0;
    }
    let guests = make_guests(&rc)?;
    let (agents, where_, follower) = match &a.controller {
        None => {
            let placed = any_placement(&guests, &a.server);
            let agents = attach_guests_credentialed(
                &guests,
                &placed,
                fabric,
                a.link.device.as_deref(),
                mode,
                &a.link.credentials()?,
            )?;
            (agents, a.server.clone(), None)
        }
        Some(addr) => {
            let ctl = ControlOpts {
                addr: addr.clone(),
                token: a.token.clone(),
                tls: a.tls.load()?,
            };
            let ids: Vec<(String, u16)> = (0..a.w.guests)
                .map(|g| (format!("{}-d{g}", a.vm_id), a.w.queues))
                .collect();
            let placed = place_devices(&ctl, &a.vm_id, "vrio-client", &ids)?;
            let targets: Vec<_> = placed
                .iter()
                .map(|p| (device_key(&p.device_id), p.targets.clone()))
                .collect();
            for p in &placed {
                for (q, t) in p.targets.iter().enumerate() {
                    println!(
                        "vrio-client: device {} queue {q} placed on {} sidecore {}",
                        p.device_id, t.server, t.sidecore
                    );
                }
            }
            // Credentials the controller signed (none without its
            // --data-key), else the ones given.
            let issued: Option<Vec<String>> = placed.iter().map(|p| p.credential.clone()).collect();
            let credentials = match issued {
                Some(c) => c,
                None => a.link.credentials()?,
            };
            let agents = attach_guests_credentialed(
                &guests,
                &targets,
                fabric,
                a.link.device.as_deref(),
                mode,
                &credentials,
            )?;
            (
                agents,
                format!("the servers controller {addr} chose"),
                Some((ctl, ids)),
            )
        }
    };
    let agents: Vec<Arc<AttachedDevice>> = agents.into_iter().map(Arc::new).collect();
    let mut follower = match follower {
        Some((ctl, ids)) => Some(follow_placement(
            ctl,
            Arc::new(AttachedSet(
                ids.into_iter()
                    .map(|(id, _)| id)
                    .zip(agents.iter().cloned())
                    .collect(),
            )),
            print_move,
        )?),
        None => None,
    };
    println!(
        "vrio-client: {} guest(s) x {} queue(s) attached to {} (fabric {}, {} mode)",
        a.w.guests,
        a.w.queues,
        where_,
        backend_name(fabric),
        mode.name()
    );
    // 0: as many as the run's duration allows.
    let total = match a.seconds {
        Some(_) => 0,
        None => a.w.total_requests(),
    };
    let done = Arc::new(AtomicU64::new(0));
    let metrics = serve_metrics(
        metrics,
        ClientMetrics::new(Agents::Devices(
            agents
                .iter()
                .enumerate()
                .map(|(g, d)| (g.to_string(), d.clone()))
                .collect(),
        ))
        .with_completed(done.clone()),
    )?;
    if let (Some(m), Some(s)) = (&metrics, a.metrics_wait) {
        if m.wait_scraped_after(0, Duration::from_secs_f64(s), &stop) {
            println!("vrio-client: metrics scraped; starting the guests");
        } else {
            eprintln!("vrio-client: no scrape of /metrics within --metrics-wait {s} s; starting the guests anyway");
        }
    }
    let progress = Progress::start("remote guests".into(), done.clone(), total);
    let t0 = Instant::now();
    let io = drive_guests(guests, &rc, &done, &stop);
    let wall = t0.elapsed();
    progress.finish();
    if let Some(f) = follower.as_mut() {
        f.stop();
    }
    let (mut cpu, mut doorbells, mut interrupts, mut moves, mut failovers) = (0, 0, 0, 0, 0);
    for d in agents.iter() {
        d.detach();
        cpu += d.stats().cpu_ns.load(Relaxed);
        doorbells += d.stats().doorbells.load(Relaxed);
        interrupts += d.stats().interrupts.load(Relaxed);
        moves += d.stats().moves.load(Relaxed);
        failovers += d.stats().failovers.load(Relaxed);
    }
    let n = io.completed.max(1) as f64;
    print_table(
        &[
            "requests",
            "req/s",
            "p50 us",
            "p99 us",
            "VM-host CPU us/req",
            "doorbells",
            "interrupts",
            "moves",
            "failovers",
            "lost",
            "corrupt",
            "failed",
        ],
        &[vec![
            io.completed.to_string(),
            format!("{:.0}", n / wall.as_secs_f64().max(1e-9)),
            format!("{:.1}", io.latency.value_at_quantile(0.5) as f64 / 1e3),
            format!("{:.1}", io.latency.value_at_quantile(0.99) as f64 / 1e3),
            format!("{:.2}", cpu as f64 / 1e3 / n),
            doorbells.to_string(),
            interrupts.to_string(),
            moves.to_string(),
            failovers.to_string(),
            io.lost.to_string(),
            io.corrupt.to_string(),
            (io.io_errors + io.protocol_errors).to_string(),
        ]],
    );
    // A timed run, or one a signal ended, is as long as it got.
    let stopped = signalled.load(Relaxed);
    let total = if total == 0 || stopped {
        io.completed
    } else {
        total
    };
    let ok = io.failures() == 0 && io.completed == total && total > 0;
    println!(
        "vrio-client: {} of {} requests verified, {} errors{}",
        io.completed,
        total,
        io.failures(),
        if stopped {
            " (stopped by a signal)"
        } else {
            ""
        }
    );
    if let (Some(_), Some(s)) = (&metrics, a.metrics_linger) {
        println!("vrio-client: serving the final metrics for {s} s (SIGTERM ends it)");
        let until = Instant::now() + Duration::from_secs_f64(s);
        while Instant::now() < until && !stop.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(ok)
}
