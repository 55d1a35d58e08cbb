//! vrio-demo: synthetic guests run a verified random read/write/flush
//! workload against each I/O model in turn, with live progress, and the
//! run ends with one comparison table. Exit status is non-zero if any
//! request was lost, duplicated, failed or read back corrupt.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vrio_control::{
    drain, embedded_controller_with, follow_placement, grant_volume, join_as_server, place_devices,
    wait_for_servers, AttachedSet, ControlOpts, CredentialConfig,
};
use vrio_core::blk::{BlockBackend, BlockConfig};
use vrio_core::remote::{device_key, AttachedDevice, IoServer, IoServerConfig, NotifyMode};
use vrio_core::sidecore::SidecoreConfig;
use vrio_core::tenancy::{AccessMode, Keyring, DEFAULT_VOLUME};
use vrio_examples::control::print_move;
use vrio_examples::{
    init_tracing, model_json, model_row, print_table, verdict_exit, Disk, Progress, WorkloadArgs,
    MODEL_HEADERS,
};
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::runner::{
    attach_guests_credentialed, drive_guests, make_guests, run_local, run_remote, LocalModel,
    ModelReport, RunClock, RunConfig,
};

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
    /// Two I/O servers placed by an embedded controller; halfway through,
    /// one is drained and its queues move live to the other.
    Controlled,
}

/// Compare vrio's I/O models on one machine with verified synthetic guests.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about = None,
    mut_arg("requests", |a| a.default_value("20000")),
    mut_arg("blocks", |a| a.default_value("512"))
)]
struct Args {
    #[command(flatten)]
    w: WorkloadArgs,
    /// Sidecore threads for the sidecore model.
    #[arg(long, default_value_t = 1)]
    sidecores: usize,
    /// Models to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["vhost", "sidecore", "remote", "controlled"])]
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
    verdict_exit(
        "vrio-demo",
        run(&a),
        "some requests were lost, failed or corrupt (see table)",
    )
}

fn run(a: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    a.w.check()?;
    let total_blocks = a.w.blocks * u64::from(a.w.guests) * u64::from(a.w.queues);
    let capacity = total_blocks * 4096;
    let rc = a.w.run_config(WorkloadConfig {
        stall_timeout: Duration::from_secs(30),
        ..WorkloadConfig::default()
    });
    println!(
        "vrio-demo: {} guests x {} queue(s), {} requests per queue at depth {}, {}% reads, {}% flushes, {} MiB {:?} disk",
        a.w.guests, a.w.queues, a.w.requests, a.w.depth, a.w.read_pct, a.w.flush_pct, capacity >> 20, a.disk
    );
    let mut reports: Vec<ModelReport> = Vec::new();
    for m in &a.models {
        let backend = a.disk.open(a.file.as_deref(), capacity)?;
        let done = Arc::new(AtomicU64::new(0));
        let total = a.w.total_requests();
        let remote = match m {
            Model::Remote => Some(NotifyMode::Doorbell),
            Model::RemotePoll => Some(NotifyMode::RemotePoll),
            Model::RemoteAdaptive => Some(NotifyMode::Adaptive),
            _ => None,
        };
        let r = if *m == Model::Controlled {
            let progress = Progress::start("controlled".into(), done.clone(), total);
            let r = run_controlled(a.sidecores, backend, &rc, &done, total);
            progress.finish();
            r?
        } else if let Some(mode) = remote {
            let progress = Progress::start(format!("remote-{}", mode.name()), done.clone(), total);
            let r = run_remote(
                mode,
                a.sidecores,
                vrio_rdma::Backend::Soft,
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
            r.cost.wall.as_secs_f64(),
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
    let expected = a.w.total_requests();
    Ok(reports
        .iter()
        .all(|r| r.io.failures() == 0 && r.io.completed == expected))
}

/// The remote model under the control plane: an embedded controller (file
/// store in a temporary directory), two in-process I/O servers that register
/// with it, agents attached where it places them; at half the workload the
/// first server is drained and its queues move live.
fn run_controlled(
    sidecores: usize,
    backend: Arc<dyn BlockBackend>,
    rc: &RunConfig,
    done: &Arc<AtomicU64>,
    total: u64,
) -> Result<ModelReport, Box<dyn std::error::Error>> {
    let state = std::env::temp_dir().join(format!("vrio-demo-controller-{}", std::process::id()));
    let token = format!("demo-{:x}", rand::random::<u64>());
    // Credentials on: the controller signs them with a key the servers check,
    // and each guest's device is granted the shared disk.
    let keys = Arc::new(Keyring::ephemeral()?);
    let credentials = CredentialConfig {
        keys: keys.clone(),
        ttl: Duration::from_secs(3600),
    };
    let (mut controller, addr) =
        embedded_controller_with(&state, &token, 3_000, Some(credentials))?;
    let ctl = ControlOpts {
        addr: addr.clone(),
        token: Some(token),
        tls: None,
    };
    let mut servers = Vec::new();
    let mut members = Vec::new();
    for id in ["io-1", "io-2"] {
        let domain: Arc<dyn vrio_rdma::Domain> =
            Arc::from(vrio_rdma::open(vrio_rdma::Backend::Soft, None)?);
        let s = Arc::new(IoServer::start(
            domain,
            backend.clone(),
            IoServerConfig {
                sidecores,
                blk: BlockConfig::default(),
                keys: Some(keys.clone()),
                ..IoServerConfig::default()
            },
        )?);
        members.push(join_as_server(ctl.clone(), id.into(), 256, s.clone())?);
        servers.push(s);
    }
    wait_for_servers(&ctl, 2, Duration::from_secs(10))?;
    let guests = make_guests(rc)?;
    let ids: Vec<(String, u16)> = (0..rc.guests)
        .map(|g| (format!("demo-vm{g}"), rc.queues_per_guest))
        .collect();
    let names: Vec<String> = ids.iter().map(|(n, _)| n.clone()).collect();
    grant_volume(
        &ctl,
        DEFAULT_VOLUME,
        backend.capacity() * 512,
        &names,
        AccessMode::Shared,
    )?;
    let placed = place_devices(&ctl, "demo", "vrio-demo", &ids)?;
    let credentials: Vec<String> = placed
        .iter()
        .map(|p| p.credential.clone().unwrap_or_default())
        .collect();
    let targets: Vec<_> = placed
        .iter()
        .map(|p| (device_key(&p.device_id), p.targets.clone()))
        .collect();
    println!(
        "  controller {addr} (embedded, state in {}) placed {} queue(s) on io-1 and io-2",
        state.display(),
        targets.iter().map(|t| t.1.len()).sum::<usize>()
    );
    let agents: Vec<Arc<AttachedDevice>> = attach_guests_credentialed(
        &guests,
        &targets,
        vrio_rdma::Backend::Soft,
        None,
        NotifyMode::Doorbell,
        &credentials,
    )?
    .into_iter()
    .map(Arc::new)
    .collect();
    let mut follower = follow_placement(
        ctl.clone(),
        Arc::new(AttachedSet(
            ids.iter()
                .map(|(id, _)| id.clone())
                .zip(agents.iter().cloned())
                .collect(),
        )),
        print_move,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let clock = RunClock::start();
    let io = std::thread::scope(|s| {
        let work = s.spawn(|| drive_guests(guests, rc, done, &stop));
        while done.load(Relaxed) < total / 2 && !work.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !work.is_finished() {
            match drain(&ctl, "io-1") {
                Ok(n) => println!("  drained io-1 at 50%: the controller moved {n} queue(s) to io-2 while the guests ran"),
                Err(e) => eprintln!("  drain failed: {e}"),
            }
        }
        work.join()
    })
    .map_err(|_| "the guests' thread panicked")?;
    let wall = clock.wall();
    follower.stop();
    let (mut moves, mut failovers) = (0, 0);
    for d in &agents {
        d.detach();
        moves += d.stats().moves.load(Relaxed);
        failovers += d.stats().failovers.load(Relaxed);
    }
    for m in members.iter_mut() {
        m.stop();
    }
    let mut stats = servers[0].sidecore_stats();
    let s2 = servers[1].sidecore_stats();
    stats.requests += s2.requests;
    stats.bytes += s2.bytes;
    stats.errors += s2.errors;
    stats.busy_ns += s2.busy_ns;
    stats.polls += s2.polls;
    stats.empty_polls += s2.empty_polls;
    let served: Vec<u64> = servers
        .iter()
        .map(|s| s.stats().snapshot().requests)
        .collect();
    let device_cpu_ns = servers.iter().map(|s| s.stop()).sum();
    controller.stop();
    let _ = std::fs::remove_dir_all(&state);
    println!(
        "  controlled: {moves} live handover(s), {failovers} failover(s); io-1 served {}, io-2 served {} requests",
        served[0], served[1]
    );
    Ok(ModelReport {
        model: format!(
            "remote via controller x{}x2 (drain at 50%)",
            sidecores.max(1)
        ),
        io,
        cost: clock.cost(wall, device_cpu_ns, stats),
    })
}
