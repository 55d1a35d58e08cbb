//! `vrio-bench blk --metrics-cost`: what serving Prometheus metrics costs
//! the I/O server (issue 17: "with metrics on, throughput within 3% of
//! metrics off, in the same run").
//!
//! The remote doorbell model at one load point, run over each fabric of
//! `--fabric` `--pairs` times with metrics OFF and ON, in ABBA order
//! (OFF, ON, then ON, OFF, ...) so that a drift in the machine's load
//! falls on both sides. ON is what `vrio-server --metrics-listen` does:
//! the server's collector ([`ServerMetrics`]) registered and served on a
//! loopback port, and a scraper thread GETting `/metrics` every
//! `--scrape-ms` (100 ms: ten times Prometheus's usual rate) for the whole
//! run, and the queues keep their own figures (`queue_metrics`), as
//! with `--metrics-listen`. The runs build the remote model from the testkit's pieces, as
//! `run_remote_with` does (credentials on), because the collector needs
//! the `IoServer`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vrio_core::blk::{BlockConfig, MemoryBackend};
use vrio_core::remote::{IoServer, IoServerConfig, NotifyMode};
use vrio_core::tenancy::{AccessMode, Keyring, DEFAULT_VOLUME};
use vrio_examples::metrics::{MetricsListener, ServerMetrics};
use vrio_examples::{backend_name, model_json, print_table};
use vrio_rdma::Backend;
use vrio_testkit::cputime::{process_cpu_ns, thread_cpu_ns};
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::runner::{
    any_placement, attach_guests_credentialed, drive_guests, listen_addr_for, make_guests,
    open_domain, ModelReport, RunClock, RunConfig,
};

type BoxError = Box<dyn std::error::Error>;

/// What `--metrics-cost` (and `--interpose-cost`) measure with.
#[derive(Debug, Clone)]
pub struct CostArgs {
    pub fabrics: Vec<Backend>,
    pub guests: u32,
    pub depth: u16,
    pub seconds: f64,
    pub pairs: u32,
    pub scrape_every: Duration,
    /// Share of reads in the workload (the rest are writes).
    pub read_pct: u8,
}

/// What a run changes on the I/O server.
#[derive(Debug, Clone)]
pub enum Arm {
    /// Nothing: metrics off, interposition as by default (no stages).
    Plain,
    /// The server's /metrics served and scraped.
    Metrics,
    /// No interposition hooks at all (`IoServerConfig::interposition`
    /// off): the baseline of `--interpose-cost`.
    NoInterposition,
    /// Every device under this policy.
    Policy(vrio_core::interpose::PolicySpec),
}

/// What the scraper saw during one run.
#[derive(Debug, Clone, Copy, Default)]
struct Scrapes {
    count: u64,
    total: Duration,
    bytes: u64,
    /// The scraper thread's own CPU time (it stands in for a Prometheus on
    /// another machine, so it is left out of the CPU per request).
    cpu_ns: u64,
    /// The metrics endpoint's thread's CPU time during the run
    /// ([`vrio_examples::metrics::MetricsServer::cpu_ns`]).
    endpoint_cpu_ns: u64,
}

/// One run, metrics OFF or ON.
pub struct Sample {
    pub report: ModelReport,
    /// The process's CPU per request, less the scraper's, in us.
    pub cpu_us_per_req: f64,
    /// The process's CPU time over the run, less the scraper's, in ns.
    cpu_ns: u64,
    scrapes: Option<Scrapes>,
}

/// GETs `http://addr/metrics` (HTTP/1.0, the connection closed after it)
/// and returns the body's length; an error unless the answer is a 200
/// with the server's metrics in it.
fn scrape(addr: SocketAddr) -> Result<u64, String> {
    let t = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(format!("http://{addr}/metrics: {head:?}"));
    }
    if !body.contains("vrio_server_") {
        return Err(format!("http://{addr}/metrics: no vrio_server_ metric"));
    }
    Ok(body.len() as u64)
}

/// Scrapes `addr` every `every` until `stop`, on a thread of its own.
fn spawn_scraper(
    addr: SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Scrapes, String>> {
    std::thread::spawn(move || {
        let cpu0 = thread_cpu_ns();
        let mut s = Scrapes::default();
        let mut next = Instant::now();
        while !stop.load(Relaxed) {
            let t0 = Instant::now();
            s.bytes += scrape(addr)?;
            s.total += t0.elapsed();
            s.count += 1;
            next += every;
            // Sleep in short steps, so that the end of the run stops it.
            while !stop.load(Relaxed) && Instant::now() < next {
                let left = next.saturating_duration_since(Instant::now());
                std::thread::sleep(left.min(Duration::from_millis(10)));
            }
        }
        s.cpu_ns = thread_cpu_ns().saturating_sub(cpu0);
        Ok(s)
    })
}

/// One run of the remote doorbell model over `fabric`, with the server's
/// metrics served and scraped when `metrics`.
/// One run of the remote doorbell model with `arm`'s change.
pub fn run_once(a: &CostArgs, fabric: Backend, arm: &Arm) -> Result<Sample, BoxError> {
    let metrics = matches!(arm, Arm::Metrics);
    let blocks = 256;
    let rc = RunConfig {
        guests: a.guests,
        queues_per_guest: 1,
        workload: WorkloadConfig {
            requests: 0,
            duration: Some(Duration::from_secs_f64(a.seconds)),
            depth: a.depth,
            read_pct: a.read_pct,
            flush_pct: 0,
            blocks,
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let backend = Arc::new(MemoryBackend::new(u64::from(a.guests) * blocks * 4096));
    // As run_remote_with: an ephemeral keyring, one credential per guest.
    let keys = Arc::new(Keyring::ephemeral()?);
    let server = Arc::new(IoServer::start(
        open_domain(fabric, None)?,
        backend,
        IoServerConfig {
            listen: listen_addr_for(fabric),
            sidecores: 1,
            blk: BlockConfig::default(),
            keys: Some(keys.clone()),
            interposition: !matches!(arm, Arm::NoInterposition),
            // As vrio-server --metrics-listen: the queues' own figures.
            queue_metrics: metrics,
            ..IoServerConfig::default()
        },
    )?);
    let guests = make_guests(&rc)?;
    let placed = any_placement(&guests, server.addr());
    if let Arm::Policy(spec) = arm {
        for (dev, _) in &placed {
            server.policies().set(*dev, spec)?;
        }
    }
    let ttl = Duration::from_secs(3600);
    let credentials = placed
        .iter()
        .map(|(dev, _)| keys.mint(*dev, DEFAULT_VOLUME, AccessMode::Shared, "", ttl))
        .collect::<Result<Vec<_>, _>>()?;
    let mode = NotifyMode::Doorbell;
    let mut agents =
        attach_guests_credentialed(&guests, &placed, fabric, None, mode, &credentials)?;

    let endpoint = if metrics {
        let l = MetricsListener::bind("127.0.0.1:0")?;
        Some(l.serve("vrio-server", ServerMetrics::new(server.clone()))?)
    } else {
        None
    };
    let stop_scraper = Arc::new(AtomicBool::new(false));
    let scraper = endpoint
        .as_ref()
        .map(|m| spawn_scraper(m.addr(), a.scrape_every, stop_scraper.clone()));

    let (progress, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let clock = RunClock::start();
    let cpu0 = process_cpu_ns();
    let endpoint0 = endpoint.as_ref().map_or(0, |m| m.cpu_ns());
    let io = drive_guests(guests, &rc, &progress, &stop);
    let wall = clock.wall();
    let cpu_ns = process_cpu_ns().saturating_sub(cpu0);
    let endpoint_cpu_ns = endpoint
        .as_ref()
        .map_or(0, |m| m.cpu_ns().saturating_sub(endpoint0));
    stop_scraper.store(true, Relaxed);
    let scrapes = match scraper {
        Some(t) => {
            let s = t
                .join()
                .map_err(|_| "the scraper thread panicked")?
                .map_err(|e| format!("scrape failed: {e}"))?;
            Some(Scrapes {
                endpoint_cpu_ns,
                ..s
            })
        }
        None => None,
    };
    for ag in agents.iter_mut() {
        ag.detach();
    }
    drop(endpoint);
    let stats = server.sidecore_stats();
    let device_cpu_ns = server.stop();
    let guest_cpu_ns = io.cpu_ns;
    let report = ModelReport {
        model: format!("remote doorbell x1 ({})", backend_name(fabric)),
        io,
        cost: clock
            .cost(wall, device_cpu_ns, stats)
            .with_guest_cpu(guest_cpu_ns),
    };
    if report.io.failures() > 0 {
        return Err(format!("{}: {} failed requests", report.model, report.io.failures()).into());
    }
    if report.io.completed == 0 {
        return Err(format!("{}: no request completed", report.model).into());
    }
    let cpu_ns = cpu_ns.saturating_sub(scrapes.map_or(0, |s| s.cpu_ns));
    Ok(Sample {
        cpu_us_per_req: cpu_ns as f64 / 1e3 / report.io.completed as f64,
        cpu_ns,
        report,
        scrapes,
    })
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The within-3% verdict on a median ratio ON/OFF of requests/s.
fn verdict(ratio: f64) -> &'static str {
    if ratio >= 0.97 {
        "within 3%"
    } else {
        "NOT within 3%"
    }
}

/// Runs the check, prints the tables and returns (the JSON's fields, one
/// point per run). Errors only when a run fails, never on the ratio.
pub fn measure(a: &CostArgs) -> Result<(serde_json::Value, Vec<serde_json::Value>), BoxError> {
    let mut fabrics: Vec<Backend> = Vec::new();
    for &f in &a.fabrics {
        if !fabrics.contains(&f) {
            fabrics.push(f);
        }
    }
    let total = fabrics.len() * a.pairs as usize * 2;
    let (mut n, mut rows, mut points) = (0, Vec::new(), Vec::new());
    let (mut summary, mut sum_rows) = (Vec::new(), Vec::new());
    for &fabric in &fabrics {
        let name = backend_name(fabric);
        // Per pair: req/s OFF and ON, CPU/req OFF and ON.
        let mut pairs: Vec<[f64; 4]> = Vec::new();
        // Over the ON runs: the scrapes, and the process's CPU (less the
        // scraper's).
        let (mut sc, mut on_cpu_ns) = (Scrapes::default(), 0);
        for pair in 0..a.pairs {
            // ABBA: OFF first in even pairs, ON first in odd ones.
            let order = [pair % 2 == 1, pair % 2 == 0];
            let mut got = [(0.0, 0.0); 2];
            for on in order {
                n += 1;
                let what = if on { "ON" } else { "OFF" };
                eprintln!(
                    "[{n}/{total}] metrics cost: {name} pair {} metrics {what} ...",
                    pair + 1
                );
                let s = run_once(a, fabric, if on { &Arm::Metrics } else { &Arm::Plain })?;
                let r = &s.report;
                let scr = s.scrapes.unwrap_or_default();
                let endpoint_pct = 100.0 * scr.endpoint_cpu_ns as f64 / s.cpu_ns.max(1) as f64;
                let on_only = |v: String| if on { v } else { "-".into() };
                rows.push(vec![
                    name.to_string(),
                    (pair + 1).to_string(),
                    what.into(),
                    format!("{:.0}", r.requests_per_sec()),
                    format!("{:.2}", s.cpu_us_per_req),
                    format!("{:.1}", r.p99_us()),
                    on_only(scr.count.to_string()),
                    on_only(format!("{:.2}", mean_ms(&scr))),
                    on_only(format!("{endpoint_pct:.2}")),
                ]);
                let mut j = model_json(r);
                j["fabric_backend"] = name.into();
                j["pair"] = (pair + 1).into();
                j["metrics"] = on.into();
                j["process_cpu_us_per_request"] = s.cpu_us_per_req.into();
                if let Some(x) = s.scrapes {
                    j["scrapes"] = x.count.into();
                    j["mean_scrape_ms"] = mean_ms(&x).into();
                    j["mean_scrape_bytes"] = (x.bytes / x.count.max(1)).into();
                    j["scraper_cpu_s"] = (x.cpu_ns as f64 / 1e9).into();
                    j["endpoint_cpu_s"] = (x.endpoint_cpu_ns as f64 / 1e9).into();
                    j["endpoint_cpu_pct_of_process"] = endpoint_pct.into();
                    sc.count += x.count;
                    sc.total += x.total;
                    sc.bytes += x.bytes;
                    sc.endpoint_cpu_ns += x.endpoint_cpu_ns;
                    on_cpu_ns += s.cpu_ns;
                }
                points.push(j);
                got[usize::from(on)] = (r.requests_per_sec(), s.cpu_us_per_req);
            }
            let [(off_rps, off_cpu), (on_rps, on_cpu)] = got;
            pairs.push([off_rps, on_rps, off_cpu, on_cpu]);
        }
        let col = |k: usize| pairs.iter().map(|p| p[k]).collect::<Vec<_>>();
        let ratios = |k: usize| {
            pairs
                .iter()
                .map(|p| p[k + 1] / p[k].max(1e-9))
                .collect::<Vec<_>>()
        };
        let (rps, cpu) = (ratios(0), ratios(2));
        let (ratio, cpu_ratio) = (median(rps.clone()), median(cpu.clone()));
        let (off, on) = (col(0), col(1));
        // How far apart the OFF runs are: the noise the ratio sits in.
        let spread = {
            let (lo, hi) = off
                .iter()
                .fold((f64::MAX, 0.0f64), |(l, h), &v| (l.min(v), h.max(v)));
            100.0 * (hi - lo) / median(off.clone()).max(1e-9)
        };
        let endpoint_pct = 100.0 * sc.endpoint_cpu_ns as f64 / on_cpu_ns.max(1) as f64;
        sum_rows.push(vec![
            name.to_string(),
            a.pairs.to_string(),
            format!("{:.0}", median(off.clone())),
            format!("{:.0}", median(on.clone())),
            format!("{ratio:.3}"),
            format!("{cpu_ratio:.3}"),
            format!("{spread:.1}"),
            sc.count.to_string(),
            format!("{:.2}", mean_ms(&sc)),
            format!("{endpoint_pct:.2}"),
            verdict(ratio).into(),
        ]);
        summary.push(serde_json::json!({
            "fabric_backend": name,
            "pairs": a.pairs,
            "requests_per_s_off": off,
            "requests_per_s_on": on,
            "median_requests_per_s_off": median(off.clone()),
            "median_requests_per_s_on": median(on.clone()),
            "ratio_requests_per_s_on_off": rps,
            "median_ratio_requests_per_s_on_off": ratio,
            "ratio_cpu_per_request_on_off": cpu,
            "median_ratio_cpu_per_request_on_off": cpu_ratio,
            "off_spread_pct": spread,
            "scrapes": sc.count,
            "mean_scrape_ms": mean_ms(&sc),
            "mean_scrape_bytes": sc.bytes / sc.count.max(1),
            "endpoint_cpu_pct_of_process": endpoint_pct,
            "within_3_percent": ratio >= 0.97,
        }));
    }
    println!(
        "metrics cost: remote doorbell x1, {} guests x QD{}, 4 KiB random reads, {:.1} s per run; \
         ON = the server's /metrics served on loopback and scraped every {} ms",
        a.guests,
        a.depth,
        a.seconds,
        a.scrape_every.as_millis()
    );
    println!(
        "cpu us/req: the process's CPU per request, less the scraper thread's (it stands in for \
         a Prometheus on another machine); endpoint %: the metrics endpoint's thread's share of it"
    );
    print_table(
        &[
            "fabric",
            "pair",
            "metrics",
            "req/s",
            "cpu us/req",
            "p99 us",
            "scrapes",
            "mean scrape ms",
            "endpoint %",
        ],
        &rows,
    );
    println!();
    println!(
        "OFF spread: (max - min) / median of the OFF runs' req/s, the noise the ratio sits in"
    );
    print_table(
        &[
            "fabric",
            "pairs",
            "median req/s OFF",
            "median req/s ON",
            "median ON/OFF req/s",
            "median ON/OFF cpu/req",
            "OFF spread %",
            "scrapes",
            "mean scrape ms",
            "endpoint %",
            "verdict (ON/OFF >= 0.97)",
        ],
        &sum_rows,
    );
    let fields = serde_json::json!({
        "benchmark": "metrics-cost",
        "model": "remote doorbell x1",
        "guests": a.guests,
        "depth": a.depth,
        "seconds_per_run": a.seconds,
        "pairs": a.pairs,
        "scrape_interval_ms": a.scrape_every.as_millis() as u64,
        "summary": summary,
    });
    Ok((fields, points))
}

fn mean_ms(s: &Scrapes) -> f64 {
    s.total.as_secs_f64() * 1e3 / s.count.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    /// One short pair over the soft fabric: both runs complete requests,
    /// the ON run is scraped, and the JSON has a summary with a ratio.
    #[test]
    fn one_pair_is_measured_and_scraped() {
        let a = CostArgs {
            fabrics: vec![Backend::Soft],
            guests: 1,
            depth: 4,
            seconds: 0.3,
            pairs: 1,
            scrape_every: Duration::from_millis(50),
            read_pct: 100,
        };
        let (fields, points) = measure(&a).unwrap();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0]["metrics"], false);
        assert_eq!(points[1]["metrics"], true);
        assert!(points.iter().all(|p| p["requests"].as_u64() > Some(0)));
        assert!(points[1]["scrapes"].as_u64() > Some(0), "{}", points[1]);
        let s = &fields["summary"][0];
        assert!(s["median_ratio_requests_per_s_on_off"].as_f64() > Some(0.0));
        assert!(s["scrapes"].as_u64() > Some(0));
        assert!(
            points[1]["endpoint_cpu_s"].as_f64() > Some(0.0),
            "{}",
            points[1]
        );
    }
}
