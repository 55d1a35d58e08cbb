//! Shared code of the vrio example binaries: progress output and tables,
//! and the control plane's command-line side ([`control`]: TLS flags, move
//! lines).

pub mod control;
pub mod metrics;
pub mod top;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vrio_core::blk::{BlockBackend, FileBackend, MemoryBackend};
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::runner::{ModelReport, RunConfig, RunCost};

/// Prints a live progress line to stderr until stopped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl Progress {
    pub fn start(label: String, done: Arc<AtomicU64>, total: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let join = std::thread::spawn(move || {
            let t0 = Instant::now();
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut last_line = Instant::now() - Duration::from_secs(10);
            while !s.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let n = done.load(Relaxed);
                let rate = n as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                let pct = if total > 0 {
                    format!(" ({:5.1}%)", 100.0 * n as f64 / total as f64)
                } else {
                    String::new()
                };
                let line = format!("  {label}: {n:>9} requests{pct}  {rate:>10.0} req/s");
                // On a terminal redraw in place; in logs print every 2 s.
                if tty {
                    eprint!("\r{line}   ");
                } else if last_line.elapsed() >= Duration::from_secs(2) {
                    eprintln!("{line}");
                    last_line = Instant::now();
                }
                let _ = std::io::stderr().flush();
            }
            if tty {
                eprintln!();
            }
        });
        Self {
            stop,
            join: Some(join),
        }
    }

    pub fn finish(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// A plain text table with right-aligned numeric columns.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = w[i])
                } else {
                    format!("{c:>w$}", w = w[i])
                }
            })
            .collect();
        println!("| {} |", s.join(" | "));
    };
    line(headers.iter().map(|s| s.to_string()).collect());
    println!(
        "|{}|",
        w.iter()
            .map(|n| "-".repeat(n + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.clone());
    }
}

/// The demo's per-model row.
pub fn model_row(r: &ModelReport) -> Vec<String> {
    vec![
        r.model.clone(),
        r.io.completed.to_string(),
        format!("{:.0}", r.requests_per_sec()),
        format!("{:.1}", r.mb_per_sec()),
        format!("{:.1}", r.p50_us()),
        format!("{:.1}", r.p99_us()),
        format!("{:.2}", r.cost.device_cores()),
        r.io.failures().to_string(),
    ]
}

pub const MODEL_HEADERS: [&str; 8] = [
    "model",
    "requests",
    "req/s",
    "MB/s",
    "p50 us",
    "p99 us",
    "device cores",
    "errors",
];

/// The JSON object `j` of a model run with what the run cost added: wall
/// time, and the CPU time of the device side (workers or sidecores) and of
/// the whole process.
pub fn with_cost(mut j: serde_json::Value, cost: &RunCost) -> serde_json::Value {
    if let Some(o) = j.as_object_mut() {
        o.insert("wall_s".into(), cost.wall.as_secs_f64().into());
        let cpu_s = |ns: u64| serde_json::Value::from(ns as f64 / 1e9);
        o.insert("device_cpu_s".into(), cpu_s(cost.device_cpu_ns));
        o.insert("process_cpu_s".into(), cpu_s(cost.process_cpu_ns));
        o.insert("device_cores".into(), cost.device_cores().into());
    }
    j
}

/// JSON of one model run.
pub fn model_json(r: &ModelReport) -> serde_json::Value {
    let j = serde_json::json!({
        "model": r.model,
        "requests": r.io.completed,
        "reads": r.io.reads,
        "writes": r.io.writes,
        "flushes": r.io.flushes,
        "bytes": r.io.bytes,
        "requests_per_s": r.requests_per_sec(),
        "mb_per_s": r.mb_per_sec(),
        "p50_us": r.p50_us(),
        "p99_us": r.p99_us(),
        "requests_per_device_core_s": r.requests_per_core_sec(),
        "io_errors": r.io.io_errors,
        "corrupt": r.io.corrupt,
        "lost": r.io.lost,
        "protocol_errors": r.io.protocol_errors,
        "sidecore": {
            "polls": r.cost.stats.polls,
            "empty_polls": r.cost.stats.empty_polls,
            "sleeps": r.cost.stats.sleeps,
            "busy_s": r.cost.stats.busy_ns as f64 / 1e9,
            "poll_mode_on": r.cost.stats.poll_mode_on,
            "poll_mode_off": r.cost.stats.poll_mode_off,
            "discovery_comparisons": r.cost.stats.discovery_comparisons,
            "discovery_switches": r.cost.stats.discovery_switches,
            "remote_poll_advised": r.cost.stats.remote_poll_advised,
        },
    });
    with_cost(j, &r.cost)
}

/// A binary's exit code for what `run` came to: success when every request
/// verified; 1, after printing `bin: FAILED: {failed}`, when some did not; 2,
/// after printing the error, when the run could not go on.
pub fn verdict_exit(
    bin: &str,
    run: Result<bool, Box<dyn std::error::Error>>,
    failed: &str,
) -> ExitCode {
    match run {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("{bin}: FAILED: {failed}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{bin}: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The synthetic blk workload's flags, shared by vrio-client and vrio-demo
/// (which changes the defaults of `--requests` and `--blocks` with
/// `mut_arg`).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Synthetic guests (VMs).
    #[arg(long, default_value_t = 4)]
    pub guests: u32,
    /// virtio-blk queues per guest.
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Requests per queue.
    #[arg(long, default_value_t = 10_000)]
    pub requests: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 16)]
    pub depth: u16,
    /// Percent of reads; the rest are writes and flushes.
    #[arg(long, default_value_t = 50)]
    pub read_pct: u8,
    /// Percent of flushes.
    #[arg(long, default_value_t = 5)]
    pub flush_pct: u8,
    /// 4 KiB blocks each queue owns on the disk.
    #[arg(long, default_value_t = 256)]
    pub blocks: u64,
}

impl WorkloadArgs {
    /// The sizes must all be at least 1.
    pub fn check(&self) -> Result<(), Box<dyn std::error::Error>> {
        if self.guests == 0 || self.queues == 0 || self.depth == 0 || self.blocks == 0 {
            return Err("--guests, --queues, --depth and --blocks must be at least 1".into());
        }
        Ok(())
    }

    /// The run these flags ask for; `workload` sets what they do not say.
    pub fn run_config(&self, workload: WorkloadConfig) -> RunConfig {
        RunConfig {
            guests: self.guests,
            queues_per_guest: self.queues,
            workload: WorkloadConfig {
                requests: self.requests,
                depth: self.depth,
                read_pct: self.read_pct,
                flush_pct: self.flush_pct,
                blocks: self.blocks,
                ..workload
            },
            ..RunConfig::default()
        }
    }

    /// Requests over all guests and queues.
    pub fn total_requests(&self) -> u64 {
        self.requests * u64::from(self.guests) * u64::from(self.queues)
    }
}

/// How log events are written to stderr: `--log-format` of vrio-server
/// and vrio-client, and `VRIO_LOG_FORMAT` for every binary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event, for people; coloured only when stderr is a
    /// terminal (and NO_COLOR is unset).
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, message and the
    /// event's fields), for log collectors.
    Json,
}

/// Logging for the binaries without a `--log-format` flag: the format of
/// `VRIO_LOG_FORMAT` (`text`, the default, or `json`); see
/// [`init_tracing_as`].
pub fn init_tracing() {
    let format = match std::env::var("VRIO_LOG_FORMAT") {
        Ok(v) if !v.is_empty() => <LogFormat as clap::ValueEnum>::from_str(&v, true)
            .unwrap_or_else(|_| {
                eprintln!("VRIO_LOG_FORMAT={v:?}: want text or json; logging as text");
                LogFormat::Text
            }),
        _ => LogFormat::Text,
    };
    init_tracing_as(format);
}

/// Logs events to stderr in `format`, filtered by `RUST_LOG` (tracing's
/// env-filter syntax, e.g. `info` or `vrio_core=debug`; default `warn`).
/// Text is coloured only when stderr is a terminal and NO_COLOR is unset,
/// so a log redirected to a file holds no escape sequences.
pub fn init_tracing_as(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&spec)
            .unwrap_or_else(|e| {
                eprintln!("RUST_LOG={spec:?}: {e}; logging warnings only");
                tracing_subscriber::EnvFilter::new("warn")
            }),
        _ => tracing_subscriber::EnvFilter::new("warn"),
    };
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => fmt.with_ansi(colour).try_init(),
        LogFormat::Json => fmt
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// `--disk` choices of vrio-server and vrio-demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Disk {
    /// Sparse in-memory disk (lost at exit).
    Memory,
    /// Raw image file (see --file).
    File,
}

impl Disk {
    /// A disk of `size` bytes: sparse memory, or the image `file` (created
    /// or grown to `size`).
    pub fn open(
        self,
        file: Option<&Path>,
        size: u64,
    ) -> Result<Arc<dyn BlockBackend>, Box<dyn std::error::Error>> {
        Ok(match self {
            Disk::Memory => Arc::new(MemoryBackend::new(size)),
            Disk::File => {
                let path = file.ok_or("--disk file needs --file PATH")?;
                Arc::new(FileBackend::create(path, size)?)
            }
        })
    }
}

/// `--fabric` choices of the server and client binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FabricChoice {
    /// Real verbs when an RDMA device exists, else the software fabric.
    Auto,
    /// The software fabric (TCP or Unix sockets).
    Soft,
    /// Real verbs (RoCE, InfiniBand, Soft-RoCE); fails without a device.
    Verbs,
    /// Shared memory with processes on this host (`unix:PATH` addresses):
    /// an I/O server beside its VMs, where READ and WRITE cost the target
    /// no CPU.
    Shm,
}

/// `--mode` choices: how a remote queue's server learns of new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// The VM host pushes new requests (with their descriptors) to the server.
    Doorbell,
    /// The server READs the guests' avail rings; guest kicks are suppressed.
    RemotePoll,
    /// Doorbells or remote polling, whichever costs the server's sidecore
    /// less CPU per request (it measures both); doorbells while quiet.
    Adaptive,
}

impl ModeChoice {
    /// The protocol's mode.
    pub fn notify(self) -> vrio_core::remote::NotifyMode {
        use vrio_core::remote::NotifyMode;
        match self {
            ModeChoice::Doorbell => NotifyMode::Doorbell,
            ModeChoice::RemotePoll => NotifyMode::RemotePoll,
            ModeChoice::Adaptive => NotifyMode::Adaptive,
        }
    }
}

/// Resolves `--fabric` to a back-end once, so every later domain (one per
/// guest) uses the same one.
pub fn resolve_fabric(
    choice: FabricChoice,
    device: Option<&str>,
) -> Result<vrio_rdma::Backend, vrio_rdma::FabricError> {
    use vrio_rdma::Backend;
    match choice {
        FabricChoice::Soft => Ok(Backend::Soft),
        FabricChoice::Shm => Ok(Backend::Shm),
        FabricChoice::Verbs => vrio_rdma::open(Backend::Verbs, device).map(|_| Backend::Verbs),
        FabricChoice::Auto => match vrio_rdma::open(Backend::Verbs, device) {
            Ok(_) => Ok(Backend::Verbs),
            Err(vrio_rdma::FabricError::NoDevice(why)) => {
                eprintln!("no RDMA device ({why}); using the software fabric");
                Ok(Backend::Soft)
            }
            Err(e) => Err(e),
        },
    }
}

pub fn backend_name(b: vrio_rdma::Backend) -> &'static str {
    match b {
        vrio_rdma::Backend::Soft => "soft",
        vrio_rdma::Backend::Verbs => "verbs",
        vrio_rdma::Backend::Shm => "shm",
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and the threads it
/// starts afterwards), so that [`wait_for_signal`] can take them.
pub fn block_signals() {
    // SAFETY: sigset operations on a local, zero-initialised sigset_t, and
    // pthread_sigmask with valid pointers; no memory is shared.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for SIGINT or SIGTERM, or until `timeout` passes.
pub fn wait_for_signal(timeout: Option<std::time::Duration>) -> Option<i32> {
    // SAFETY: as in `block_signals`; sigtimedwait only writes `info`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let left = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()),
                None => std::time::Duration::from_secs(3600),
            };
            if deadline.is_some() && left.is_zero() {
                return None;
            }
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            let s = libc::sigtimedwait(&set, &mut info, &ts);
            if s > 0 {
                return Some(s);
            }
        }
    }
}
