//! `vrio-bench blk`: 4 KiB random reads on the memory back-end, for
//! several guest counts and queue depths, under every model (remote ones
//! over every fabric of `--fabric`), with CPU per request by role.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use vrio_core::blk::{BlockConfig, MemoryBackend};
use vrio_core::remote::NotifyMode;
use vrio_examples::{model_json, ModeChoice};

use super::cpu::{self, RemoteCpu, RoleCpu};
use super::{Fabrics, Model};
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::runner::{run_local, run_remote, ModelReport, RemoteFigures, RunConfig};

/// Options of the blk workload.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds per measurement point.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Guest counts to measure [default: 1,4,16; with --metrics-cost: 4,
    /// and only one may be given].
    #[arg(long, value_delimiter = ',')]
    pub guests: Option<Vec<u32>>,
    /// Queue depths to measure [default: 1,32; with --metrics-cost: 32,
    /// and only one may be given].
    #[arg(long, value_delimiter = ',')]
    pub depths: Option<Vec<u16>>,
    /// Where to write the JSON results [default: target/vrio-bench.json;
    /// with --metrics-cost: target/vrio-bench-metrics-cost.json].
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Do not draw the SVG charts beside the JSON (`out.json` ->
    /// `out-throughput.svg`, `out-cpu.svg`, ...).
    #[arg(long)]
    pub no_plots: bool,
    /// Leave out the remote-sidecore models (local models only).
    #[arg(long)]
    pub local_only: bool,
    /// Remote notification modes to measure, comma-separated [default:
    /// doorbell,remote-poll,adaptive]. The local models always run: they
    /// are the baseline of every ratio.
    #[arg(long, value_delimiter = ',', value_enum, conflicts_with_all = ["local_only", "metrics_cost", "interpose_cost"])]
    pub modes: Option<Vec<ModeChoice>>,
    /// Instead of the model comparison, measure what Prometheus metrics
    /// cost: the remote doorbell model at one load point (default 4 guests
    /// x QD32), over each fabric of --fabric, --pairs times with metrics
    /// OFF and ON (ON: the server's /metrics served on loopback and
    /// scraped every --scrape-ms), in ABBA order. Prints req/s per run,
    /// the median ratio ON/OFF of req/s and of CPU per request, the
    /// spread of the OFF runs (the noise), the scrapes and their mean
    /// time, the endpoint thread's share of the CPU, and the within-3%
    /// verdict (which does not change the exit status: only errors do).
    /// No charts.
    #[arg(long, conflicts_with = "local_only")]
    pub metrics_cost: bool,
    /// Instead of the model comparison, measure what interposition costs:
    /// the remote doorbell model at one load point (default 4 guests x
    /// QD32, half reads, half writes), over each fabric of --fabric,
    /// --pairs rounds of five arms in rotated order: no hooks at all
    /// (the baseline), hooks with no stages, then a meter, a QoS limit
    /// far above the load, and AES-XTS encryption. Prints each arm's
    /// median req/s and CPU per request against the baseline of the same
    /// round, the baseline's spread (the noise), and AES-XTS-256's rate on
    /// one core. No charts.
    #[arg(long, conflicts_with_all = ["local_only", "metrics_cost"])]
    pub interpose_cost: bool,
    /// With --metrics-cost: OFF/ON pairs per fabric; with
    /// --interpose-cost: rounds per fabric.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub pairs: u32,
    /// With --metrics-cost: milliseconds between two scrapes of /metrics
    /// (Prometheus usually scrapes every 1000 to 15000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..), requires = "metrics_cost")]
    pub scrape_ms: u64,
    #[command(flatten)]
    pub fabrics: Fabrics,
}

type Point = (ModelReport, Option<RemoteFigures>);

fn point(
    model: Model,
    guests: u32,
    depth: u16,
    secs: f64,
) -> Result<Point, Box<dyn std::error::Error>> {
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
    let (mut r, fig) = match model {
        Model::Local(m) => (
            run_local(m, backend, BlockConfig::default(), &rc, &done)?,
            None,
        ),
        Model::Remote(mode, fabric) => {
            let cfg = BlockConfig::default();
            let (r, f) = run_remote(mode, 1, fabric, backend, cfg, &rc, &done)?;
            (r, Some(f))
        }
    };
    r.model = model.name();
    Ok((r, fig))
}

/// The one value of `list`, or `default` when it is not given.
fn one<T: Copy>(list: &Option<Vec<T>>, default: T, what: &str) -> Result<T, String> {
    match list.as_deref() {
        None => Ok(default),
        Some([v]) => Ok(*v),
        Some(_) => Err(format!(
            "--metrics-cost and --interpose-cost measure one load point: give one {what}"
        )),
    }
}

type Measure =
    fn(
        &super::cost::CostArgs,
    ) -> Result<(serde_json::Value, Vec<serde_json::Value>), Box<dyn std::error::Error>>;

/// `--metrics-cost` ([`super::cost`], reads only) and `--interpose-cost`
/// ([`super::interpose`], half writes, for the cipher): one load point,
/// no charts, JSON at `target/vrio-bench-<name>.json` by default.
fn cost(
    a: &Args,
    name: &str,
    read_pct: u8,
    measure: Measure,
) -> Result<(), Box<dyn std::error::Error>> {
    let c = super::cost::CostArgs {
        fabrics: a.fabrics.fabric.clone(),
        guests: one(&a.guests, 4, "--guests")?,
        depth: one(&a.depths, 32, "--depths")?,
        seconds: a.seconds,
        pairs: a.pairs,
        scrape_every: Duration::from_millis(a.scrape_ms),
        read_pct,
    };
    let (fields, points) = measure(&c)?;
    let json = a
        .json
        .clone()
        .unwrap_or_else(|| format!("target/vrio-bench-{name}.json").into());
    super::write_json(&json, &format!("blk-{name}"), fields, points, false)
}

pub fn run(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if a.metrics_cost {
        return cost(a, "metrics-cost", 100, super::cost::measure);
    }
    if a.interpose_cost {
        return cost(a, "interpose-cost", 50, super::interpose::measure);
    }
    let guests = a.guests.clone().unwrap_or_else(|| vec![1, 4, 16]);
    let depths = a.depths.clone().unwrap_or_else(|| vec![1, 32]);
    let remote: Vec<NotifyMode> = match (&a.modes, a.local_only) {
        (_, true) => Vec::new(),
        (Some(m), false) => m.iter().fold(Vec::new(), |mut v, m| {
            if !v.contains(&m.notify()) {
                v.push(m.notify());
            }
            v
        }),
        (None, false) => vec![
            NotifyMode::Doorbell,
            NotifyMode::RemotePoll,
            NotifyMode::Adaptive,
        ],
    };
    let models = Model::all(&remote, &a.fabrics);
    let mut rows = Vec::new();
    let mut json = Vec::new();
    let points = guests.len() * depths.len() * models.len();
    let mut n = 0;
    for &g in &guests {
        for &d in &depths {
            let mut base: Option<ModelReport> = None;
            for &m in &models {
                n += 1;
                eprintln!("[{n}/{points}] {} guests={g} depth={d} ...", m.name());
                let (r, fig) = point(m, g, d, a.seconds)?;
                // The old VM-host figure: all of the device work for local
                // models, only the agents' for remote ones.
                let vmhost_ns = fig
                    .as_ref()
                    .map_or(r.cost.device_cpu_ns, |f| f.vmhost_cpu_ns);
                let roles = RoleCpu::new(
                    &r.cost,
                    fig.as_ref().map(|f| RemoteCpu {
                        agent: f.vmhost_cpu_ns,
                        vmhost_fabric: f.vmhost_fabric_cpu_ns,
                        server_fabric: f.server_fabric_cpu_ns,
                    }),
                );
                let per_req = |ns: u64| ns as f64 / 1e3 / r.io.completed.max(1) as f64;
                if r.io.failures() > 0 {
                    return Err(format!("{}: {} failed requests", r.model, r.io.failures()).into());
                }
                let b = base.get_or_insert_with(|| r.clone());
                let ratio = r.requests_per_core_sec() / b.requests_per_core_sec().max(1e-9);
                let mut row = vec![
                    r.model.clone(),
                    g.to_string(),
                    d.to_string(),
                    format!("{:.0}", r.requests_per_sec()),
                    format!("{:.2}", r.cost.device_cores()),
                    format!("{:.0}", r.requests_per_core_sec()),
                    format!("{ratio:.2}"),
                    format!("{:.1}", r.p50_us()),
                    format!("{:.1}", r.p99_us()),
                ];
                row.extend(cpu::tail_cells(
                    &roles,
                    r.io.completed,
                    fig.as_ref().map(|f| &f.fabric),
                ));
                rows.push(row);
                let mut j = model_json(&r);
                j["guests"] = g.into();
                j["depth"] = d.into();
                j["fabric_backend"] = m.fabric().into();
                j["ratio_req_per_core_vs_vhost"] = ratio.into();
                j["vmhost_cpu_us_per_request"] = per_req(vmhost_ns).into();
                cpu::merge(&mut j, roles.json(r.io.completed));
                if let Some(f) = &fig {
                    j["fabric_ops_per_request"] = f.fabric.ops_per_request().into();
                    j["round_trips_per_request"] = f.fabric.rtts_per_request().into();
                    j["doorbells"] = f.doorbells.into();
                    j["interrupts"] = f.interrupts.into();
                    j["remote_polls"] = f.fabric.remote_polls.into();
                    j["mode_switches"] = f.fabric.mode_switches.into();
                }
                json.push(j);
            }
        }
    }
    println!(
        "4 KiB random reads, memory back-end, {:.1} s per point",
        a.seconds
    );
    cpu::print_rows(
        "request",
        &[
            "model",
            "guests",
            "QD",
            "req/s",
            "sidecore/worker cores",
            "req/s per core",
            "x vhost (per core)",
            "p50 us",
            "p99 us",
        ],
        &rows,
    );
    let json_path = a
        .json
        .clone()
        .unwrap_or_else(|| "target/vrio-bench.json".into());
    super::write_json(
        &json_path,
        "blk",
        serde_json::json!({
            "benchmark": "io-models-4k-read",
            "seconds_per_point": a.seconds,
        }),
        json,
        !a.no_plots,
    )
}
