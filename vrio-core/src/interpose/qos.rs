//! QoS: per-device limits on requests and bytes per second, with a burst.
//!
//! Each limit is a token bucket that may go into debt: a request is let
//! through whenever no bucket it draws on is in debt, and then charged in
//! full. So a request larger than the burst still runs, and over any long
//! window the device gets its limit exactly (SPDK enforces the same limits
//! per 1 ms time slice). A held request waits in its queue, never dropped;
//! the queue's sidecore serves its other queues meanwhile.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::params::QosSpec;
use super::request::{Admit, Op, Request};
use super::stage::{Stage, StageCounter, StageReport};

const MIB: f64 = 1024.0 * 1024.0;

/// Token buckets refilled at their rates, capped at `rate * burst`.
#[derive(Debug)]
pub(crate) struct Buckets<const N: usize> {
    /// Per bucket: tokens per second, 0 for no limit.
    rates: [f64; N],
    burst: Duration,
    state: Mutex<BucketState<N>>,
}

#[derive(Debug)]
struct BucketState<const N: usize> {
    tokens: [f64; N],
    last: Option<Instant>,
}

impl<const N: usize> Buckets<N> {
    /// Buckets for `rates` (per second; 0 unlimited), starting full.
    pub(crate) fn new(rates: [f64; N], burst: Duration) -> Self {
        let mut tokens = [0.0; N];
        for (t, r) in tokens.iter_mut().zip(rates) {
            *t = r * burst.as_secs_f64();
        }
        Self {
            rates,
            burst,
            state: Mutex::new(BucketState { tokens, last: None }),
        }
    }

    /// Charges `costs` (one per bucket; 0 for buckets the request does not
    /// draw on) if no bucket it draws on is in debt; otherwise says when
    /// the last of them is out of debt.
    pub(crate) fn take(&self, costs: [f64; N], now: Instant) -> Admit {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Queues on other sidecores may pass a slightly older `now`.
        let dt = match s.last {
            Some(l) if now > l => (now - l).as_secs_f64(),
            Some(_) => 0.0,
            None => 0.0,
        };
        if s.last.is_none_or(|l| now > l) {
            s.last = Some(now);
        }
        let mut wait: f64 = 0.0;
        let burst = self.burst.as_secs_f64();
        for ((t, &r), &cost) in s.tokens.iter_mut().zip(&self.rates).zip(&costs) {
            if r == 0.0 {
                continue;
            }
            let cap = (r * burst).max(1.0);
            *t = (*t + dt * r).min(cap);
            if cost > 0.0 && *t < 0.0 {
                wait = wait.max(-*t / r);
            }
        }
        if wait > 0.0 {
            // At least a microsecond, so a queue never spins on a wait of 0.
            return Admit::Wait(now + Duration::from_secs_f64(wait.max(1e-6)));
        }
        for ((t, &r), &cost) in s.tokens.iter_mut().zip(&self.rates).zip(&costs) {
            if r != 0.0 {
                *t -= cost;
            }
        }
        Admit::Go
    }
}

/// The `qos` stage: buckets for requests, all bytes, read bytes and write
/// bytes. Reads and writes draw on them; other requests (flush, discard)
/// pass free, as in SPDK.
#[derive(Debug)]
pub struct QosStage {
    buckets: Buckets<4>,
    delayed: AtomicU64,
}

impl QosStage {
    /// Checks `spec` and builds the stage.
    pub fn new(spec: &QosSpec) -> Result<Self, String> {
        let all = [
            spec.rw_ios_per_sec,
            spec.rw_mbytes_per_sec,
            spec.r_mbytes_per_sec,
            spec.w_mbytes_per_sec,
        ];
        if all.iter().all(|&v| v == 0) {
            return Err("no limit set (rw_ios_per_sec, rw_mbytes_per_sec, r_mbytes_per_sec or w_mbytes_per_sec)".into());
        }
        if spec.burst_ms == 0 || spec.burst_ms > 60_000 {
            return Err(format!(
                "burst_ms {} is not within 1..=60000",
                spec.burst_ms
            ));
        }
        let rates = [
            spec.rw_ios_per_sec as f64,
            spec.rw_mbytes_per_sec as f64 * MIB,
            spec.r_mbytes_per_sec as f64 * MIB,
            spec.w_mbytes_per_sec as f64 * MIB,
        ];
        Ok(Self {
            buckets: Buckets::new(rates, Duration::from_millis(spec.burst_ms)),
            delayed: AtomicU64::new(0),
        })
    }
}

impl Stage for QosStage {
    fn kind(&self) -> &'static str {
        "qos"
    }

    fn admit(&self, req: &Request, now: Instant) -> Admit {
        let bytes = req.len as f64;
        let costs = match req.op {
            Op::Read => [1.0, bytes, bytes, 0.0],
            Op::Write => [1.0, bytes, 0.0, bytes],
            _ => return Admit::Go,
        };
        let a = self.buckets.take(costs, now);
        if matches!(a, Admit::Wait(_)) {
            self.delayed.fetch_add(1, Relaxed);
        }
        a
    }

    fn report(&self) -> StageReport {
        StageReport {
            kind: "qos".into(),
            counters: vec![StageCounter {
                name: "waits".into(),
                label: String::new(),
                value: self.delayed.load(Relaxed),
            }],
            latency: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(len: u64) -> Request {
        Request {
            device: 1,
            op: Op::Read,
            sector: 0,
            len,
            frame: None,
            arrived: Instant::now(),
            vm_host: 0,
        }
    }

    /// Drives the stage with a fake clock: every request is retried at the
    /// time it was told to wait for.
    fn run(spec: &QosSpec, req: Request, secs: f64) -> u64 {
        let q = QosStage::new(spec).expect("valid");
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let mut now = t0;
        let mut n = 0;
        while now < end {
            match q.admit(&req, now) {
                Admit::Go => n += 1,
                Admit::Wait(t) => {
                    assert!(t > now, "a wait must move time on");
                    now = t;
                }
                Admit::Refuse(_) => panic!("qos never refuses"),
            }
        }
        n
    }

    #[test]
    fn an_iops_limit_holds_over_ten_seconds() {
        let spec = QosSpec {
            rw_ios_per_sec: 1000,
            burst_ms: 100,
            ..QosSpec::default()
        };
        let n = run(&spec, read(4096), 10.0);
        // 10 s at 1000/s plus the 100 ms burst it starts with.
        assert!((10_000..=10_101).contains(&n), "{n} requests");
    }

    #[test]
    fn a_bandwidth_limit_holds_for_requests_larger_than_the_burst() {
        let spec = QosSpec {
            r_mbytes_per_sec: 1,
            burst_ms: 10,
            ..QosSpec::default()
        };
        // 1 MiB requests against a 10 KiB burst: each runs, then the
        // bucket pays its debt.
        let n = run(&spec, read(1 << 20), 10.0);
        assert!((10..=11).contains(&n), "{n} requests");
    }

    #[test]
    fn writes_do_not_draw_on_the_read_limit() {
        let spec = QosSpec {
            r_mbytes_per_sec: 1,
            ..QosSpec::default()
        };
        let q = QosStage::new(&spec).expect("valid");
        let mut w = read(1 << 20);
        w.op = Op::Write;
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(q.admit(&w, now), Admit::Go);
        }
    }

    #[test]
    fn a_spec_without_limits_is_refused() {
        assert!(QosStage::new(&QosSpec::default()).is_err());
        let spec = QosSpec {
            rw_ios_per_sec: 1,
            burst_ms: 0,
            ..QosSpec::default()
        };
        assert!(QosStage::new(&spec).is_err());
    }
}
