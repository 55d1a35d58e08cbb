//! vrio-demo: synthetic guests run a verified random read/write/flush
//! workload against each I/O model in turn, with live progress, and the
//! run ends with one comparison table. Exit status is non-zero if any
//! request was lost, duplicated, failed or read back corrupt.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vrio_core::blk::{BlockBackend, BlockConfig, FileBackend, MemoryBackend};
use vrio_core::guest::WorkloadConfig;
use vrio_core::models::{run_local, run_remote, LocalModel, ModelReport, RunConfig};
use vrio_core::remote::NotifyMode;
use vrio_core::sidecore::SidecoreConfig;
use vrio_examples::{init_tracing, model_json, model_row, print_table, Progress, MODEL_HEADERS};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Model {
    /// A worker thread per device, woken by every guest kick.
    Vhost,
    /// Polling sidecore(s) on the same host (Elvis).
    Sidecore,
    /// Remote sidecore(s) on an I/O server, reached over the fabric; the VM
    /// host pushes doorbells (vRIO).
    Remote,
    /// Remote sidecores that READ the avail ring themselves.
    RemotePoll,
    /// Remote sidecores switching between doorbells and polling by load.
    RemoteAdaptive,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Disk {
    /// Sparse in-memory disk.
    Memory,
    /// Raw image file (see --file).
    File,
}

/// Compare vrio's I/O models on one machine with verified synthetic guests.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Synthetic guests (VMs).
    #[arg(long, default_value_t = 4)]
    guests: u32,
    /// virtio-blk queues per guest.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Requests per queue.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 16)]
    depth: u16,
    /// Percent of reads (the rest: writes and flushes).
    #[arg(long, default_value_t = 50)]
    read_pct: u8,
    /// Percent of flushes.
    #[arg(long, default_value_t = 5)]
    flush_pct: u8,
    /// 4 KiB blocks each queue owns on the disk.
    #[arg(long, default_value_t = 512)]
    blocks: u64,
    /// Sidecore threads for the sidecore model.
    #[arg(long, default_value_t = 1)]
    sidecores: usize,
    /// Models to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["vhost", "sidecore", "remote"])]
    models: Vec<Model>,
    /// Disk back-end.
    #[arg(long, value_enum, default_value_t = Disk::Memory)]
    disk: Disk,
    /// Image file for --disk file (created or extended as needed).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    init_tracing();
    let a = Args::parse();
    match run(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vrio-demo: FAILED: some requests were lost, failed or corrupt (see table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vrio-demo: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(a: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    if a.guests == 0 || a.queues == 0 || a.depth == 0 || a.blocks == 0 {
        return Err("--guests, --queues, --depth and --blocks must be at least 1".into());
    }
    let total_blocks = a.blocks * u64::from(a.guests) * u64::from(a.queues);
    let capacity = total_blocks * 4096;
    let rc = RunConfig {
        guests: a.guests,
        queues_per_guest: a.queues,
        workload: WorkloadConfig {
            requests: a.requests,
            depth: a.depth,
            read_pct: a.read_pct,
            flush_pct: a.flush_pct,
            blocks: a.blocks,
            stall_timeout: Duration::from_secs(30),
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    println!(
        "vrio-demo: {} guests x {} queue(s), {} requests per queue at depth {}, {}% reads, {}% flushes, {} MiB {:?} disk",
        a.guests, a.queues, a.requests, a.depth, a.read_pct, a.flush_pct, capacity >> 20, a.disk
    );
    let mut reports: Vec<ModelReport> = Vec::new();
    for m in &a.models {
        let backend: Arc<dyn BlockBackend> = match a.disk {
            Disk::Memory => Arc::new(MemoryBackend::new(capacity)),
            Disk::File => {
                let path = a.file.clone().ok_or("--disk file needs --file PATH")?;
                Arc::new(FileBackend::create(&path, capacity)?)
            }
        };
        let done = Arc::new(AtomicU64::new(0));
        let total = a.requests * u64::from(a.guests) * u64::from(a.queues);
        let remote = match m {
            Model::Remote => Some(NotifyMode::Doorbell),
            Model::RemotePoll => Some(NotifyMode::RemotePoll),
            Model::RemoteAdaptive => Some(NotifyMode::Adaptive),
            _ => None,
        };
        let r = if let Some(mode) = remote {
            let progress = Progress::start(format!("remote-{}", mode.name()), done.clone(), total);
            let r = run_remote(
                mode,
                a.sidecores,
                backend,
                BlockConfig::default(),
                &rc,
                &done,
            );
            progress.finish();
            let (r, fig) = r?;
            println!(
                "  {}: {:.2} fabric ops/request, {:.2} round trips/request on the critical path, VM-host CPU {:.2} us/request, {} doorbells, {} interrupts",
                r.model,
                fig.fabric.ops_per_request(),
                fig.fabric.rtts_per_request(),
                fig.vmhost_cpu_ns as f64 / 1e3 / r.io.completed.max(1) as f64,
                fig.doorbells,
                fig.interrupts
            );
            r
        } else {
            let model = match m {
                Model::Vhost => LocalModel::VhostStyle,
                _ => LocalModel::Sidecore {
                    cores: a.sidecores,
                    cfg: SidecoreConfig::default(),
                },
            };
            let progress = Progress::start(model.name(), done.clone(), total);
            let r = run_local(model, backend, BlockConfig::default(), &rc, &done);
            progress.finish();
            r?
        };
        println!(
            "  {}: {} requests in {:.2} s, {} errors",
            r.model,
            r.io.completed,
            r.wall.as_secs_f64(),
            r.io.failures()
        );
        reports.push(r);
    }
    println!();
    print_table(
        &MODEL_HEADERS,
        &reports.iter().map(model_row).collect::<Vec<_>>(),
    );
    println!("(device cores: CPU time of the workers or sidecores / wall time; errors: lost + corrupt + failed + protocol)");
    if let Some(p) = &a.json {
        let j = serde_json::json!({ "models": reports.iter().map(model_json).collect::<Vec<_>>() });
        std::fs::write(p, serde_json::to_string_pretty(&j)?)?;
        println!("wrote {}", p.display());
    }
    let expected = a.requests * u64::from(a.guests) * u64::from(a.queues);
    Ok(reports
        .iter()
        .all(|r| r.io.failures() == 0 && r.io.completed == expected))
}
