//! vrio-client: a VM host. It runs synthetic guests whose virtio-blk queues
//! are served by a remote `vrio-server`, through vrio's VM-host agent: the
//! guests' memory is registered with the fabric (one protection domain per
//! guest), kicks become doorbells, completions become interrupts. Every
//! block written is verified when read back.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use vrio_core::guest::WorkloadConfig;
use vrio_core::models::{drive_guests, make_guests, RunConfig};
use vrio_core::remote::{attach, AgentConfig, DeviceAttach, NotifyMode, QueueAttach};
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

/// Run verified synthetic guests against a remote vrio I/O server.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
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
    let a = Args::parse();
    match run(&a) {
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
    let mode = match a.mode {
        Mode::Doorbell => NotifyMode::Doorbell,
        Mode::RemotePoll => NotifyMode::RemotePoll,
        Mode::Adaptive => NotifyMode::Adaptive,
    };
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
    let mut agents = Vec::new();
    for (g, guest) in guests.iter().enumerate() {
        let mut queues = Vec::new();
        for q in 0..usize::from(a.queues) {
            let s = guest.device_side(q)?;
            queues.push(QueueAttach {
                layout: s.layout,
                features: s.features,
                kick: s.kick,
                call: s.call,
            });
        }
        let domain = Arc::from(vrio_rdma::open(fabric, a.device.as_deref())?);
        let dev = attach(
            domain,
            &a.server,
            DeviceAttach {
                device_id: g as u64,
                mem: guest.memory().clone(),
                queues,
            },
            AgentConfig {
                mode,
                ..AgentConfig::default()
            },
        )?;
        agents.push(dev);
    }
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
