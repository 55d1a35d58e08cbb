//! vrio-server: an I/O server. Its sidecores serve the virtqueues of remote
//! guests through the fabric; VM-host agents (`vrio-client`, or a VMM
//! linking vrio's agent) attach queues to it.
//!
//! With `--controller` it registers with vrio-controller, renews its lease
//! with load reports, and follows the controller's moves of its queues
//! between its sidecores. With `--key-file` every attach must carry a
//! credential signed with one of its keys, naming the volume (under
//! `--volume-dir`, or `--memory-volume`) the device may use; without it the
//! server serves whoever attaches, all on one shared disk (one trusted box).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use vrio_control::{join_as_server_with, ControlOpts, JoinOptions};
use vrio_core::blk::BlockConfig;
use vrio_core::interpose::PolicySpec;
use vrio_core::net::{PortSnapshot, TapUplink};
use vrio_core::remote::{IoServer, IoServerConfig};
use vrio_core::tenancy::{Keyring, VolumeSet};
use vrio_examples::metrics::{ObsArgs, ServerMetrics};
use vrio_examples::{
    backend_name, block_signals, init_tracing_as, resolve_fabric, wait_for_signal, Disk,
    FabricChoice,
};

/// Serve remote guests' virtio-blk and virtio-net queues with polling
/// sidecores; net devices share one switch, with an optional TAP uplink.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  \
        vrio-server --listen 127.0.0.1:7420 --sidecores 2\n  \
        vrio-ctl key generate --out /etc/vrio/data.key\n  \
        vrio-server --key-file /etc/vrio/data.key --volume-dir /var/lib/vrio/volumes --memory-volume scratch:512\n  \
        vrio-server --fabric shm --listen unix:/run/vrio/io.sock   (VMs on this host)\n  \
        VRIO_TOKEN=secret vrio-server --listen 127.0.0.1:7421 --controller 127.0.0.1:7470 --server-id io-1 \\\n    \
        --disk file --file /var/lib/vrio/disk.img\n  \
        vrio-server --listen 127.0.0.1:7420 --uplink-tap vrio0\n    \
        (then: ip addr add 10.0.0.254/24 dev vrio0; ip link set vrio0 up)\n  \
        vrio-server --metrics-listen 127.0.0.1:9100 --log-format json   (Prometheus: http://127.0.0.1:9100/metrics)"
)]
struct Args {
    /// Address to listen on: IP:PORT (port 0 picks one), or unix:PATH
    /// (soft, and always for shm).
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: String,
    /// Sidecore threads.
    #[arg(long, default_value_t = 1)]
    sidecores: usize,
    /// The `default` volume's back-end: the disk every device shares when
    /// there is no --key-file (with one, only credentials naming `default`
    /// reach it).
    #[arg(long, value_enum, default_value_t = Disk::Memory)]
    disk: Disk,
    /// Image file for --disk file (created or grown to --size-mib).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Disk size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Data-plane keys (`vrio-ctl key generate`): every attach must carry a
    /// credential signed with one of them. Without it the data plane is
    /// open to any peer that reaches --listen.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Serve the raw images `DIR/<volume>.img` as volumes (opened on first
    /// attach; `vrio-ctl volume create` makes them).
    #[arg(long, value_name = "DIR")]
    volume_dir: Option<PathBuf>,
    /// Add a sparse memory volume: NAME:MIB (repeatable).
    #[arg(long, value_name = "NAME:MIB", value_parser = parse_memory_volume)]
    memory_volume: Vec<(String, u64)>,
    /// Fabric back-end.
    #[arg(long, value_enum, default_value_t = FabricChoice::Auto)]
    fabric: FabricChoice,
    /// RDMA device for verbs (default: the first one).
    #[arg(long)]
    device: Option<String>,
    /// Print statistics every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 5)]
    stats_every: u64,
    /// Exit after this many seconds (default: run until SIGINT or SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Register with this vrio-controller (host:port) and follow its
    /// placement decisions.
    #[arg(long)]
    controller: Option<String>,
    /// This server's id at the controller (default: `server-<listen address>`).
    #[arg(long, requires = "controller")]
    server_id: Option<String>,
    /// Most queues the controller may place here.
    #[arg(long, default_value_t = 256, requires = "controller")]
    capacity: u32,
    /// Bearer token for the controller.
    #[arg(long, env = "VRIO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: vrio_examples::control::TlsArgs,
    /// Join the net devices' switch to this TAP device (created if it does
    /// not exist; needs CAP_NET_ADMIN), making the server the guests'
    /// gateway. Address it, bridge it or move it to a namespace with `ip`;
    /// its descriptor keeps working wherever the link goes.
    #[arg(long, value_name = "NAME")]
    uplink_tap: Option<String>,
    /// An interposition policy for one device, without a controller:
    /// DEVICE is its id (decimal or 0x hex, as `dev<id>` in queue names) or
    /// its name, FILE the policy's JSON (see docs/interposition.md), for
    /// example {"stages":[{"stage":"qos","rw_ios_per_sec":2000}]}.
    /// Repeat for more devices. With --controller, the controller's
    /// policies (`vrio-ctl policy set`) replace these when they arrive.
    #[arg(long, value_name = "DEVICE=FILE", value_parser = parse_policy)]
    policy: Vec<(u64, PolicySpec)>,
    #[command(flatten)]
    obs: ObsArgs,
}

/// `--policy DEVICE=FILE`: the device's key and the checked policy.
fn parse_policy(s: &str) -> Result<(u64, PolicySpec), String> {
    let (dev, file) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want DEVICE=FILE, like 7=/etc/vrio/qos.json"))?;
    let id = match dev.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => dev.parse().ok(),
    }
    .unwrap_or_else(|| vrio_core::remote::device_key(dev));
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    let spec = PolicySpec::parse(&text).map_err(|e| format!("{file}: {e}"))?;
    // Checked in full (keys included) before the server starts.
    spec.build(id).map_err(|e| format!("{file}: {e}"))?;
    Ok((id, spec))
}

fn parse_memory_volume(s: &str) -> Result<(String, u64), String> {
    let (name, mib) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: want NAME:MIB, like scratch:512"))?;
    if !vrio_core::tenancy::valid_volume_name(name) {
        return Err(format!(
            "{name:?}: a volume name is 1 to 64 of [A-Za-z0-9._-], not starting with '.'"
        ));
    }
    let mib: u64 = mib
        .parse()
        .map_err(|_| format!("{mib:?}: the size is a number of MiB"))?;
    let bytes = mib
        .checked_mul(1 << 20)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{mib} MiB: the size must be from 1 MiB to 16 EiB"))?;
    Ok((name.to_string(), bytes))
}

fn main() -> ExitCode {
    let a = Args::parse();
    init_tracing_as(a.obs.log_format);
    block_signals();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrio-server: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // First, so that a taken address fails before anything starts.
    let metrics = a.obs.bind_metrics()?;
    let size = a
        .size_mib
        .checked_mul(1 << 20)
        .ok_or("--size-mib too large")?;
    let backend = a.disk.open(a.file.as_deref(), size)?;
    let fabric = resolve_fabric(a.fabric, a.device.as_deref())?;
    let domain: Arc<dyn vrio_rdma::Domain> =
        Arc::from(vrio_rdma::open(fabric, a.device.as_deref())?);
    let volumes = Arc::new(match &a.volume_dir {
        Some(d) => {
            if !d.is_dir() {
                return Err(format!("--volume-dir {}: not a directory", d.display()).into());
            }
            VolumeSet::with_dir(d)
        }
        None => VolumeSet::new(),
    });
    for (name, bytes) in &a.memory_volume {
        volumes.add_memory(name, *bytes)?;
    }
    let keys = match &a.key_file {
        Some(f) => Some(Arc::new(Keyring::from_file(f)?)),
        None => None,
    };
    let server = IoServer::start(
        domain,
        backend,
        IoServerConfig {
            listen: a.listen.clone(),
            sidecores: a.sidecores,
            blk: BlockConfig::default(),
            keys,
            volumes,
            // The queues' own figures cost a few atomic adds a request:
            // only kept when something reads them.
            queue_metrics: metrics.is_some(),
            ..IoServerConfig::default()
        },
    )?;
    // The first line is machine-readable: tests wait for it.
    println!(
        "vrio-server: listening on {} (fabric {}), {} sidecore(s), {:?} disk of {} MiB",
        server.addr(),
        backend_name(fabric),
        a.sidecores.max(1),
        a.disk,
        a.size_mib
    );
    match &a.key_file {
        Some(f) => println!(
            "vrio-server: attaches need a credential signed with a key in {}; volumes: {}{}",
            f.display(),
            server.volumes().names().join(", "),
            a.volume_dir
                .as_ref()
                .map(|d| format!(", and {}/*.img", d.display()))
                .unwrap_or_default()
        ),
        None => println!(
            "vrio-server: WARNING: no --key-file: any peer that reaches {} may attach, and every device shares the default disk",
            server.addr()
        ),
    }
    for (id, spec) in &a.policy {
        server.policies().set(*id, spec)?;
        println!(
            "vrio-server: device {id:#x} ({}): interposition {}",
            vrio_core::proto::queue_name(*id, 0),
            spec.summary()
        );
    }
    let server = Arc::new(server);
    let uplink = match &a.uplink_tap {
        Some(name) => {
            let u = TapUplink::start(server.net().switch(), name)?;
            println!(
                "vrio-server: uplink TAP {name} joined to the switch as port {}",
                u.port().id()
            );
            Some(u)
        }
        None => None,
    };
    // Read at scrape time from the server's own counters.
    let _metrics = match metrics {
        Some(l) => {
            let m = l.serve("vrio-server", ServerMetrics::new(server.clone()))?;
            println!(
                "vrio-server: metrics listening on http://{}/metrics",
                m.addr()
            );
            Some(m)
        }
        None => None,
    };
    let mut member = match &a.controller {
        Some(addr) => {
            let id = a
                .server_id
                .clone()
                .unwrap_or_else(|| format!("server-{}", server.addr()));
            println!("vrio-server: registering with controller {addr} as {id}");
            // With --volume-dir, the controller's volumes get their images
            // here (created sparse when missing).
            Some(join_as_server_with(
                ControlOpts {
                    addr: addr.clone(),
                    token: a.token.clone(),
                    tls: a.tls.load()?,
                },
                id,
                a.capacity,
                server.clone(),
                JoinOptions {
                    volume_dir: a.volume_dir.clone(),
                },
            )?)
        }
        None => None,
    };
    let t0 = std::time::Instant::now();
    let end = a.duration.map(Duration::from_secs_f64);
    loop {
        let step = if a.stats_every == 0 {
            end.map(|e| e.saturating_sub(t0.elapsed()))
        } else {
            let s = Duration::from_secs(a.stats_every);
            Some(end.map_or(s, |e| s.min(e.saturating_sub(t0.elapsed()))))
        };
        if let Some(sig) = wait_for_signal(step) {
            println!("vrio-server: signal {sig}, stopping");
            break;
        }
        if end.is_some_and(|e| t0.elapsed() >= e) {
            break;
        }
        print_stats(&server, uplink.as_ref(), "stats");
    }
    if let Some(m) = member.as_mut() {
        m.stop();
    }
    print_stats(&server, uplink.as_ref(), "final");
    drop(uplink);
    server.stop();
    Ok(())
}

fn print_stats(server: &IoServer, uplink: Option<&TapUplink>, what: &str) {
    let f = server.stats().snapshot();
    let s = server.sidecore_stats();
    println!(
        "vrio-server: {what}: {} requests ({} refused), {} doorbells, {} remote polls, {:.2} fabric ops/request, {:.2} round trips/request, {} sidecore polls ({} empty), {} queues served, {} handed back, {} sidecore moves",
        f.requests,
        f.bad_requests,
        f.doorbells,
        f.remote_polls,
        f.ops_per_request(),
        f.rtts_per_request(),
        s.polls,
        s.empty_polls,
        server.queues().len(),
        f.handovers,
        server.sidecore_moves()
    );
    let r = server.refusals();
    let (unauth, forbidden) = (
        r.unauthenticated.load(std::sync::atomic::Ordering::Relaxed),
        r.forbidden.load(std::sync::atomic::Ordering::Relaxed),
    );
    if unauth + forbidden > 0 {
        println!(
            "vrio-server: {what}: attaches refused: {unauth} without a valid credential, {forbidden} for a volume not granted, missing or busy"
        );
    }
    print_net_stats(server, what);
    if let Some(u) = uplink {
        let p = u.port().stats().snapshot();
        println!(
            "vrio-server: uplink {}: from the TAP {} frames {} bytes, to the TAP {} frames {} bytes, drops {} [{}] ({what})",
            u.port().name(),
            p.rx_packets,
            p.rx_bytes,
            p.tx_packets,
            p.tx_bytes,
            p.total_drops(),
            drop_reasons(&p)
        );
    }
}

fn drop_reasons(p: &PortSnapshot) -> String {
    p.nonzero_drops()
        .iter()
        .map(|(r, k)| format!("{}={k}", r.name()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The net queues' counters and each port's, with its drops by reason
/// (malformed, oversized or spoofed frames are dropped and counted there).
/// Silent while no net device ever attached.
fn print_net_stats(server: &IoServer, what: &str) {
    let ports = server.net().port_stats();
    if ports.is_empty() {
        return;
    }
    let n = server.net_stats().snapshot();
    let drops: u64 = ports.iter().map(|(_, p)| p.total_drops()).sum();
    println!(
        "vrio-server: net: {} requests ({} refused), {} doorbells, {} port(s), {drops} frames dropped ({what})",
        n.requests,
        n.bad_requests,
        n.doorbells,
        ports.len()
    );
    for (id, p) in ports {
        println!(
            "vrio-server: net port dev{id}: from guest {} frames {} bytes ({} checksums completed), to guest {} frames {} bytes, drops {} [{}]",
            p.rx_packets,
            p.rx_bytes,
            p.checksummed,
            p.tx_packets,
            p.tx_bytes,
            p.total_drops(),
            drop_reasons(&p)
        );
    }
}
