//! `vrio-bench net`: virtio-net through the L2 switch, between pairs of
//! synthetic guests, for 64 B and 1500 B frames, under vhost-style workers
//! (one per device, woken by kicks and by arriving frames), one local
//! polling sidecore serving every queue, and one remote sidecore on an
//! in-process I/O server (doorbell mode) over every fabric of `--fabric`.
//! Packets/s and Gbit/s, per wall second and per device core, with ratios
//! to the vhost-style baseline of the same frame size, and CPU per frame by
//! role (a "request" in the JSON is one frame received).

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use vrio_core::remote::NotifyMode;
use vrio_examples::{with_cost, Progress};

use super::cpu::{self, RemoteCpu, RoleCpu};
use super::{Fabrics, Model};
use vrio_testkit::net::{run_net, run_net_remote, NetReport, NetRunConfig, RemoteNetFigures};

/// Options of the net workload.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds per measurement point.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Frame sizes in bytes (Ethernet header included).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 1500])]
    pub sizes: Vec<usize>,
    /// Guests (in sending pairs).
    #[arg(long, default_value_t = 2)]
    pub guests: u32,
    /// Frames a sender may have in flight ahead of its receiver.
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// RX buffer size the guests post (below 1512, 1500 B frames merge).
    #[arg(long, default_value_t = 2048)]
    pub rx_buf: u32,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/vrio-netbench.json")]
    pub json: PathBuf,
    /// Do not draw the SVG charts beside the JSON (`out.json` ->
    /// `out-throughput.svg`, `out-cpu.svg`, ...).
    #[arg(long)]
    pub no_plots: bool,
    #[command(flatten)]
    pub fabrics: Fabrics,
}

/// Runs `model` on the net workload.
fn run_model(
    model: Model,
    rc: &NetRunConfig,
    done: &Arc<AtomicU64>,
) -> Result<(NetReport, Option<RemoteNetFigures>), vrio_testkit::runner::RunError> {
    let (mut r, fig) = match model {
        Model::Local(m) => (run_net(m, rc, done)?, None),
        Model::Remote(mode, fabric) => {
            let (r, f) = run_net_remote(mode, 1, fabric, rc, done)?;
            (r, Some(f))
        }
    };
    r.model = model.name();
    Ok((r, fig))
}

/// The CPU by role of a run.
fn roles(r: &NetReport, fig: Option<&RemoteNetFigures>) -> RoleCpu {
    RoleCpu::new(
        &r.cost,
        fig.map(|f| RemoteCpu {
            agent: f.vmhost_cpu_ns,
            vmhost_fabric: f.vmhost_fabric_cpu_ns,
            server_fabric: f.server_fabric_cpu_ns,
        }),
    )
}

fn json(
    r: &NetReport,
    fig: Option<&RemoteNetFigures>,
    fabric: Option<&str>,
    size: usize,
    ratio_pps: f64,
    ratio_core: f64,
) -> serde_json::Value {
    let fabric_figures = fig.map(|f| {
        serde_json::json!({
            "requests": f.fabric.requests,
            "fabric_ops_per_request": f.fabric.ops_per_request(),
            "round_trips_per_request": f.fabric.rtts_per_request(),
            "batches": f.fabric.batches,
            "doorbells": f.fabric.doorbells,
            "vmhost_cpu_s": f.vmhost_cpu_ns as f64 / 1e9,
            "vmhost_fabric_cpu_s": f.vmhost_fabric_cpu_ns as f64 / 1e9,
            "server_fabric_cpu_s": f.server_fabric_cpu_ns as f64 / 1e9,
        })
    });
    let mut j = serde_json::json!({
        "fabric": fabric_figures,
        "fabric_backend": fabric,
        "model": r.model,
        "frame_bytes": size,
        "frames_sent": r.sent.sent,
        "frames_received": r.recv.received,
        "bytes_received": r.recv.bytes,
        "packets_per_s": r.packets_per_sec(),
        "gbit_per_s": r.gbit_per_sec(),
        "packets_per_device_core_s": r.packets_per_core_sec(),
        "gbit_per_device_core_s": r.gbit_per_core_sec(),
        "ratio_packets_per_s_vs_vhost": ratio_pps,
        "ratio_packets_per_core_vs_vhost": ratio_core,
        "merged_frames": r.recv.merged,
        "flooded_frames": r.recv.flooded,
        "lost": r.recv.lost,
        "corrupt": r.recv.corrupt,
        "duplicate": r.recv.duplicate,
        "port_drops": r.port_drops(),
        "sidecore": {
            "polls": r.cost.stats.polls,
            "empty_polls": r.cost.stats.empty_polls,
            "sleeps": r.cost.stats.sleeps,
            "poll_mode_on": r.cost.stats.poll_mode_on,
            "poll_mode_off": r.cost.stats.poll_mode_off,
        },
    });
    cpu::merge(&mut j, roles(r, fig).json(r.recv.received));
    with_cost(j, &r.cost)
}

pub fn run(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let models = Model::all(&[NotifyMode::Doorbell], &a.fabrics);
    let mut rows = Vec::new();
    let mut points = Vec::new();
    let total = a.sizes.len() * models.len();
    let mut n = 0;
    for &size in &a.sizes {
        let mut base: Option<NetReport> = None;
        for &m in &models {
            n += 1;
            eprintln!(
                "[{n}/{total}] {} frames={size} B guests={} ...",
                m.name(),
                a.guests
            );
            let rc = NetRunConfig {
                guests: a.guests,
                frame_len: size,
                frames: 0,
                duration: Some(Duration::from_secs_f64(a.seconds)),
                window: a.window,
                rx_buf_len: a.rx_buf,
                ..NetRunConfig::default()
            };
            let done = Arc::new(AtomicU64::new(0));
            let p = Progress::start(format!("{} {size} B", m.name()), done.clone(), 0);
            let r = run_model(m, &rc, &done);
            p.finish();
            let (r, fig) = r?;
            if r.failures() > 0 {
                return Err(format!(
                    "{} {size} B: {} failures (lost {}, corrupt {}, duplicate {}, protocol {})",
                    r.model,
                    r.failures(),
                    r.recv.lost,
                    r.recv.corrupt,
                    r.recv.duplicate,
                    r.recv.protocol_errors + r.sent.protocol_errors
                )
                .into());
            }
            let b = base.get_or_insert_with(|| r.clone());
            let ratio_pps = r.packets_per_sec() / b.packets_per_sec().max(1e-9);
            let ratio_core = r.packets_per_core_sec() / b.packets_per_core_sec().max(1e-9);
            let mut row = vec![
                r.model.clone(),
                size.to_string(),
                format!("{:.0}", r.packets_per_sec()),
                format!("{:.3}", r.gbit_per_sec()),
                format!("{:.2}", r.cost.device_cores()),
                format!("{:.0}", r.packets_per_core_sec()),
                format!("{:.3}", r.gbit_per_core_sec()),
                format!("{ratio_pps:.2}"),
                format!("{ratio_core:.2}"),
                r.recv.merged.to_string(),
                r.port_drops().to_string(),
            ];
            row.extend(cpu::tail_cells(
                &roles(&r, fig.as_ref()),
                r.recv.received,
                fig.as_ref().map(|f| &f.fabric),
            ));
            rows.push(row);
            let fabric = m.fabric();
            points.push(json(&r, fig.as_ref(), fabric, size, ratio_pps, ratio_core));
        }
    }
    println!(
        "virtio-net through the switch, {} guests in pairs (both directions), {:.1} s per point",
        a.guests.max(2).div_ceil(2) * 2,
        a.seconds
    );
    cpu::print_rows(
        "frame received",
        &[
            "model",
            "frame B",
            "pkt/s",
            "Gbit/s",
            "device cores",
            "pkt/s per core",
            "Gbit/s per core",
            "x vhost (pkt/s)",
            "x vhost (per core)",
            "merged",
            "drops",
        ],
        &rows,
    );
    super::write_json(
        &a.json,
        "net",
        serde_json::json!({
            "benchmark": "virtio-net-switch",
            "seconds_per_point": a.seconds,
            "guests": a.guests,
            "window": a.window,
            "rx_buf_len": a.rx_buf,
        }),
        points,
        !a.no_plots,
    )
}
