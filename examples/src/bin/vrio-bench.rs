//! vrio-bench: 4 KiB reads on the memory back-end, vhost-style against
//! local sidecore, for several guest counts and queue depths, all in one run.
//! Prints a table and writes JSON. Figures are ratios against the
//! vhost-style baseline measured in the same run, because these machines are
//! noisy.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use vrio_core::blk::{BlockConfig, MemoryBackend};
use vrio_core::guest::WorkloadConfig;
use vrio_core::models::{run_local, LocalModel, ModelReport, RunConfig};
use vrio_core::sidecore::SidecoreConfig;
use vrio_examples::{init_tracing, model_json, print_table};

/// Benchmark the local I/O models (vhost-style vs local sidecore).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Seconds per measurement point.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Guest counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 4, 16])]
    guests: Vec<u32>,
    /// Queue depths to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1u16, 32])]
    depths: Vec<u16>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/vrio-bench.json")]
    json: PathBuf,
}

fn main() -> ExitCode {
    init_tracing();
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrio-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn point(
    model: LocalModel,
    guests: u32,
    depth: u16,
    secs: f64,
) -> Result<ModelReport, Box<dyn std::error::Error>> {
    let blocks = 256;
    let rc = RunConfig {
        guests,
        queues_per_guest: 1,
        workload: WorkloadConfig {
            requests: 0,
            duration: Some(Duration::from_secs_f64(secs)),
            depth,
            read_pct: 100,
            flush_pct: 0,
            blocks,
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let backend = Arc::new(MemoryBackend::new(u64::from(guests) * blocks * 4096));
    let done = Arc::new(AtomicU64::new(0));
    Ok(run_local(
        model,
        backend,
        BlockConfig::default(),
        &rc,
        &done,
    )?)
}

fn run(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let models = [
        LocalModel::VhostStyle,
        LocalModel::Sidecore {
            cores: 1,
            cfg: SidecoreConfig::default(),
        },
    ];
    let mut rows = Vec::new();
    let mut json = Vec::new();
    let points = a.guests.len() * a.depths.len() * models.len();
    let mut n = 0;
    for &g in &a.guests {
        for &d in &a.depths {
            let mut base: Option<ModelReport> = None;
            for m in models {
                n += 1;
                eprintln!("[{n}/{points}] {} guests={g} depth={d} ...", m.name());
                let r = point(m, g, d, a.seconds)?;
                if r.io.failures() > 0 {
                    return Err(format!("{}: {} failed requests", r.model, r.io.failures()).into());
                }
                let b = base.get_or_insert_with(|| r.clone());
                let ratio = r.requests_per_core_sec() / b.requests_per_core_sec().max(1e-9);
                rows.push(vec![
                    r.model.clone(),
                    g.to_string(),
                    d.to_string(),
                    format!("{:.0}", r.requests_per_sec()),
                    format!("{:.2}", r.device_cores()),
                    format!("{:.0}", r.requests_per_core_sec()),
                    format!("{ratio:.2}"),
                    format!("{:.1}", r.p50_us()),
                    format!("{:.1}", r.p99_us()),
                ]);
                let mut j = model_json(&r);
                j["guests"] = g.into();
                j["depth"] = d.into();
                j["ratio_req_per_core_vs_vhost"] = ratio.into();
                json.push(j);
            }
        }
    }
    println!(
        "4 KiB random reads, memory back-end, {:.1} s per point",
        a.seconds
    );
    print_table(
        &[
            "model",
            "guests",
            "QD",
            "req/s",
            "device cores",
            "req/s per core",
            "x vhost (per core)",
            "p50 us",
            "p99 us",
        ],
        &rows,
    );
    if let Some(dir) = a.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &a.json,
        serde_json::to_string_pretty(&serde_json::json!({
            "benchmark": "local-models-4k-read",
            "seconds_per_point": a.seconds,
            "points": json,
        }))?,
    )?;
    println!("wrote {}", a.json.display());
    Ok(())
}
