//! A legitimate, verified workload to run next to a hostile one: synthetic
//! guests attached with credentials, driven until stopped, whose report
//! must end clean.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use vrio_core::remote::{NotifyMode, QueueTarget};
use vrio_rdma::{Backend, Domain};
use vrio_testkit::guest::{QueueReport, WorkloadConfig};
use vrio_testkit::runner::{attach_guests_credentialed, drive_guests, make_guests, RunConfig};

pub const BLOCK: u64 = 4096;
pub const BLOCKS: u64 = 64;

pub fn soft() -> Arc<dyn Domain> {
    Arc::from(vrio_rdma::open(Backend::Soft, None).unwrap())
}

pub fn rc(guests: u32, requests: u64) -> RunConfig {
    RunConfig {
        guests,
        queues_per_guest: 1,
        queue_size: 64,
        workload: WorkloadConfig {
            requests,
            depth: 8,
            read_pct: 40,
            flush_pct: 5,
            blocks: BLOCKS,
            stall_timeout: Duration::from_secs(60),
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    }
}

/// Attaches `devices[g]` with `credentials[g]` for guest `g` and runs the
/// workload to its end (or until `stop`); the attach error, or the guests'
/// merged report.
pub fn run_until(
    addr: &str,
    rc: &RunConfig,
    devices: &[u64],
    credentials: &[String],
    legit: &Legit,
) -> Result<QueueReport, String> {
    let guests = make_guests(rc).map_err(|e| e.to_string())?;
    let placed: Vec<_> = devices
        .iter()
        .map(|&d| (d, vec![QueueTarget::any(addr)]))
        .collect();
    let agents = attach_guests_credentialed(
        &guests,
        &placed,
        Backend::Soft,
        None,
        NotifyMode::Doorbell,
        credentials,
    )
    .map_err(|e| e.to_string())?;
    let r = drive_guests(guests, rc, &legit.done, &legit.stop);
    drop(agents);
    Ok(r)
}

pub fn run(
    addr: &str,
    rc: &RunConfig,
    devices: &[u64],
    credentials: &[String],
) -> Result<QueueReport, String> {
    run_until(addr, rc, devices, credentials, &Legit::default())
}

/// A legitimate workload's progress, and its stop.
#[derive(Default, Clone)]
pub struct Legit {
    pub done: Arc<AtomicU64>,
    pub stop: Arc<AtomicBool>,
}

impl Legit {
    /// Lets the workload complete `n` more requests, then stops it: it
    /// overlapped all of the hostile side and then some.
    pub fn finish_after(&self, n: u64) {
        let target = self.done.load(Relaxed) + n;
        let deadline = std::time::Instant::now() + Duration::from_secs(50);
        while self.done.load(Relaxed) < target && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Relaxed);
    }
}

/// A workload that runs until stopped (at most a minute), so that it is
/// still running whatever the hostile side takes on a machine of any speed.
pub fn endless(guests: u32) -> RunConfig {
    let mut c = rc(guests, 0);
    c.workload.duration = Some(Duration::from_secs(60));
    c
}

pub fn assert_clean(r: &QueueReport) {
    assert!(r.completed > 100, "{} requests completed", r.completed);
    assert_eq!(
        (r.io_errors, r.corrupt, r.lost, r.protocol_errors),
        (0, 0, 0, 0),
        "io errors, corrupt, lost, protocol errors"
    );
}
