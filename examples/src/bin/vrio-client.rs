//! vrio-client: a VM host whose guests' virtio-blk queues are served by a
//! remote `vrio-server`, through vrio's VM-host agent: guest memory is
//! registered with the fabric (one protection domain per guest), kicks
//! become doorbells, completions become interrupts.
//!
//! - `vrio-client synthetic`: synthetic guests; every block written is
//!   verified when read back.
//! - `vrio-client vhost-user-blk`: a vhost-user-blk back-end, so an
//!   unmodified VMM (QEMU `vhost-user-blk-pci`) and its guest's stock
//!   virtio_blk driver are served by the I/O server.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use vrio_core::guest::WorkloadConfig;
use vrio_core::models::{attach_guests, drive_guests, make_guests, RunConfig};
use vrio_core::remote::{AgentConfig, NotifyMode};
use vrio_core::vhost_user::{fetch_config, serve, FrontConfig};
use vrio_examples::{
    backend_name, init_tracing, print_table, resolve_fabric, FabricChoice, Progress,
};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Mode {
    /// The VM host pushes new requests (with their descriptors) to the server.
    Doorbell,
    /// The server READs the guests' avail rings; guest kicks are suppressed.
    RemotePoll,
    /// Doorbells while quiet, remote polling while busy.
    Adaptive,
}

impl Mode {
    fn notify(self) -> NotifyMode {
        match self {
            Mode::Doorbell => NotifyMode::Doorbell,
            Mode::RemotePoll => NotifyMode::RemotePoll,
            Mode::Adaptive => NotifyMode::Adaptive,
        }
    }
}

/// A VM host whose guests' virtio-blk queues a remote vrio I/O server serves.
#[derive(Parser, Debug)]
#[command(
    version,
    long_about = None,
    after_help = "Examples:\n  \
        vrio-client synthetic --server 127.0.0.1:7420 --guests 4 --queues 2\n  \
        vrio-client vhost-user-blk --socket /tmp/vub.sock --server 127.0.0.1:7420 --queues 2\n    \
        (then QEMU: -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem\n     \
        -chardev socket,id=vub0,path=/tmp/vub.sock -device vhost-user-blk-pci,chardev=vub0,num-queues=2)"
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
    /// the I/O server.
    VhostUserBlk(VhostArgs),
}

#[derive(ClapArgs, Debug)]
struct VhostArgs {
    /// The vhost-user socket to create and listen on.
    #[arg(long)]
    socket: PathBuf,
    /// The I/O server's address (as vrio-server printed it).
    #[arg(long, default_value = "127.0.0.1:7420")]
    server: String,
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
    /// How the server learns of requests.
    #[arg(long, value_enum, default_value_t = Mode::Doorbell)]
    mode: Mode,
    /// Fabric back-end.
    #[arg(long, value_enum, default_value_t = FabricChoice::Auto)]
    fabric: FabricChoice,
    /// RDMA device for verbs (default: the first one).
    #[arg(long)]
    device: Option<String>,
    /// Exit when the first VMM disconnects instead of waiting for the next.
    #[arg(long)]
    once: bool,
}

#[derive(ClapArgs, Debug)]
struct Args {
    /// The I/O server's address (as vrio-server printed it).
    #[arg(long, default_value = "127.0.0.1:7420")]
    server: String,
    /// Synthetic guests.
    #[arg(long, default_value_t = 4)]
    guests: u32,
    /// Queues per guest.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Requests per queue.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 16)]
    depth: u16,
    /// Percent of reads; the rest are writes and flushes.
    #[arg(long, default_value_t = 50)]
    read_pct: u8,
    /// Percent of flushes.
    #[arg(long, default_value_t = 5)]
    flush_pct: u8,
    /// 4 KiB blocks each queue owns.
    #[arg(long, default_value_t = 256)]
    blocks: u64,
    /// First disk block used (clients sharing one server use disjoint ranges).
    #[arg(long, default_value_t = 0)]
    first_block: u64,
    /// How the server learns of requests.
    #[arg(long, value_enum, default_value_t = Mode::Doorbell)]
    mode: Mode,
    /// Fabric back-end.
    #[arg(long, value_enum, default_value_t = FabricChoice::Auto)]
    fabric: FabricChoice,
    /// RDMA device for verbs (default: the first one).
    #[arg(long)]
    device: Option<String>,
}

fn main() -> ExitCode {
    init_tracing();
    match Cli::parse().cmd {
        Cmd::Synthetic(a) => synthetic(&a),
        Cmd::VhostUserBlk(a) => match vhost_user_blk(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vrio-client: error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn vhost_user_blk(a: &VhostArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.queues == 0 || a.queues > 64 {
        return Err("--queues must be between 1 and 64".into());
    }
    if a.max_request_kib < 8 {
        return Err("--max-request-kib must be at least 8".into());
    }
    let fabric = resolve_fabric(a.fabric, a.device.as_deref())?;
    let cfg = FrontConfig {
        server: a.server.clone(),
        fabric,
        device: a.device.clone(),
        queues: a.queues,
        max_queue_size: a.max_queue_size,
        max_request: a.max_request_kib.saturating_mul(1024),
        device_id: a.device_id,
        agent: AgentConfig {
            mode: a.mode.notify(),
            ..AgentConfig::default()
        },
    };
    let domain = Arc::from(vrio_rdma::open(fabric, a.device.as_deref())?);
    let config = fetch_config(domain, &a.server, a.device_id << 16 | 0xffff, cfg.agent)?;
    // The first line is machine-readable: tests wait for it.
    println!(
        "vrio-client: vhost-user-blk on {} served by {} (fabric {}, {} queue(s), {} mode, {} sectors)",
        a.socket.display(),
        a.server,
        backend_name(fabric),
        a.queues,
        a.mode.notify().name(),
        config
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    );
    let once = a.once;
    serve(&a.socket, &cfg, &config, || !once)?;
    println!("vrio-client: the VMM disconnected, exiting");
    Ok(())
}

fn synthetic(a: &Args) -> ExitCode {
    match run(a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vrio-client: FAILED: requests were lost, failed or corrupt");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vrio-client: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(a: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    if a.guests == 0 || a.queues == 0 || a.depth == 0 || a.blocks == 0 {
        return Err("--guests, --queues, --depth and --blocks must be at least 1".into());
    }
    let mode = a.mode.notify();
    let fabric = resolve_fabric(a.fabric, a.device.as_deref())?;
    let rc = RunConfig {
        guests: a.guests,
        queues_per_guest: a.queues,
        workload: WorkloadConfig {
            requests: a.requests,
            depth: a.depth,
            read_pct: a.read_pct,
            flush_pct: a.flush_pct,
            blocks: a.blocks,
            first_block: a.first_block,
            stall_timeout: Duration::from_secs(60),
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let guests = make_guests(&rc)?;
    let mut agents = attach_guests(&guests, &a.server, fabric, a.device.as_deref(), mode)?;
    println!(
        "vrio-client: {} guest(s) x {} queue(s) attached to {} (fabric {}, {} mode)",
        a.guests,
        a.queues,
        a.server,
        backend_name(fabric),
        mode.name()
    );
    let total = a.requests * u64::from(a.guests) * u64::from(a.queues);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Progress::start("remote guests".into(), done.clone(), total);
    let t0 = Instant::now();
    let io = drive_guests(guests, &rc, &done, &stop);
    let wall = t0.elapsed();
    progress.finish();
    let (mut cpu, mut doorbells, mut interrupts) = (0, 0, 0);
    for d in agents.iter_mut() {
        d.detach();
        cpu += d.stats().cpu_ns.load(Relaxed);
        doorbells += d.stats().doorbells.load(Relaxed);
        interrupts += d.stats().interrupts.load(Relaxed);
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
            io.lost.to_string(),
            io.corrupt.to_string(),
            (io.io_errors + io.protocol_errors).to_string(),
        ]],
    );
    let ok = io.failures() == 0 && io.completed == total;
    println!(
        "vrio-client: {} of {} requests verified, {} errors",
        io.completed,
        total,
        io.failures()
    );
    Ok(ok)
}
