//! vrio-bench: the paper's comparison on one machine, in one run, for each
//! device: `blk` (4 KiB random reads on the memory back-end) and `net`
//! (frames through the L2 switch between pairs of guests). Each workload
//! runs under vhost-style workers, a local polling sidecore and remote
//! sidecores over each fabric of `--fabric`, prints a table and writes JSON.
//! Throughput figures are ratios against the vhost-style baseline measured
//! in the same run, because these machines are noisy. Every row gives the
//! CPU per request by role from per-thread clocks ([`cpu`]); remote rows
//! add fabric operations and round trips per request (counts, not times).
//!
//! `vrio-bench [blk options]` without a workload runs `blk`, as the
//! blk-only vrio-bench did; `vrio-bench net` replaces vrio-netbench. Both
//! JSON files keep their old fields and add `"workload"`. Beside the JSON
//! each run draws SVG charts ([`plot`]; `--no-plots` leaves them out).
//!
//! `vrio-bench blk --metrics-cost` measures instead what serving Prometheus
//! metrics costs the I/O server, metrics OFF against ON in the same run
//! ([`cost`]); `--interpose-cost` what interposition stages cost the
//! remote path, and AES-XTS's rate on one core ([`interpose`]).

mod blk;
mod cost;
mod cpu;
mod interpose;
mod net;
mod plot;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vrio_core::remote::NotifyMode;
use vrio_core::sidecore::SidecoreConfig;
use vrio_examples::{backend_name, init_tracing};
use vrio_rdma::Backend;
use vrio_testkit::runner::LocalModel;

/// Benchmark the I/O models (vhost-style, local sidecore, remote
/// sidecores) on virtio-blk or virtio-net, with ratios against vhost-style
/// from the same run.
#[derive(Parser, Debug)]
#[command(version, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    workload: Option<Workload>,
    /// Options of `blk`, the default workload.
    #[command(flatten)]
    blk: blk::Args,
}

#[derive(Subcommand, Debug)]
enum Workload {
    /// 4 KiB random reads on the memory back-end, for several guest counts
    /// and queue depths (the default workload).
    Blk(blk::Args),
    /// virtio-net frames through the switch between pairs of guests, for
    /// several frame sizes.
    Net(net::Args),
}

/// The fabrics the remote models run over.
#[derive(clap::Args, Debug, Clone)]
struct Fabrics {
    /// Fabrics the remote models run over, comma-separated (soft, shm,
    /// verbs): each remote model gets a row per fabric, in the same run.
    #[arg(long = "fabric", value_delimiter = ',', default_value = "soft,shm")]
    fabric: Vec<Backend>,
}

/// One I/O model a workload runs under.
#[derive(Clone, Copy, Debug)]
enum Model {
    Local(LocalModel),
    /// One remote sidecore on an in-process I/O server, over a fabric.
    Remote(NotifyMode, Backend),
}

impl Model {
    /// vhost-style (the baseline, first), a local sidecore, then one remote
    /// sidecore per mode in `remote`, each over every fabric of `fabrics`.
    fn all(remote: &[NotifyMode], fabrics: &Fabrics) -> Vec<Model> {
        let mut models = vec![
            Model::Local(LocalModel::VhostStyle),
            Model::Local(LocalModel::Sidecore {
                cores: 1,
                cfg: SidecoreConfig::default(),
            }),
        ];
        let mut list: Vec<Backend> = Vec::new();
        for &f in &fabrics.fabric {
            if !list.contains(&f) {
                list.push(f);
            }
        }
        for &m in remote {
            models.extend(list.iter().map(|&f| Model::Remote(m, f)));
        }
        models
    }

    /// The row's name, e.g. `remote doorbell x1 (soft)`.
    fn name(&self) -> String {
        match self {
            Model::Local(m) => m.name(),
            Model::Remote(m, f) => format!("remote {} x1 ({})", m.name(), backend_name(*f)),
        }
    }

    /// The fabric of a remote model.
    fn fabric(&self) -> Option<&'static str> {
        match self {
            Model::Local(_) => None,
            Model::Remote(_, f) => Some(backend_name(*f)),
        }
    }
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let r = match cli.workload {
        None => blk::run(&cli.blk),
        Some(Workload::Blk(a)) => blk::run(&a),
        Some(Workload::Net(a)) => net::run(&a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrio-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes one run's JSON (`fields` plus `"workload"` and `"points"`) to
/// `path`, creating its directory, then (with `plots`) its charts beside
/// it. A chart that cannot be written is an error, after the JSON is.
fn write_json(
    path: &Path,
    workload: &str,
    mut fields: serde_json::Value,
    points: Vec<serde_json::Value>,
    plots: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    fields["workload"] = workload.into();
    fields["points"] = points.into();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&fields)?)?;
    println!("wrote {}", path.display());
    if plots {
        let points = fields["points"].as_array().map_or(&[][..], Vec::as_slice);
        plot::write(path, workload, points)
            .map_err(|e| format!("{e} (the JSON is written: {})", path.display()))?;
    }
    Ok(())
}
