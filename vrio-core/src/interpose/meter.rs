//! Metering: per-device ops, bytes, errors and a latency histogram, as
//! SPDK's `bdev_get_iostat` and `bdev_get_histogram`. The same counters
//! serve as every queue's own figures when the server meters queues
//! ([`QueueMeter`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::request::{Op, Request};
use super::stage::{LatencyHistogram, Stage, StageCounter, StageReport};

/// Histogram bucket bounds, in seconds: 10 µs to 10 s, 1-2.5-5 steps.
pub const LATENCY_BOUNDS: [f64; 19] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const OPS: usize = Op::ALL.len();

/// The `meter` stage. Counts with relaxed atomics: a few nanoseconds per
/// request, shared by the device's queues.
#[derive(Debug)]
pub struct Meter {
    requests: [AtomicU64; OPS],
    bytes: [AtomicU64; OPS],
    errors: [AtomicU64; OPS],
    /// By status: OK, IOERR, UNSUPP, anything else.
    status: [AtomicU64; 4],
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

/// The status labels of [`Meter`]'s `status` counters.
const STATUS: [&str; 4] = ["ok", "ioerr", "unsupp", "other"];

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

impl Meter {
    /// Zeroed counters.
    pub fn new() -> Self {
        Self {
            requests: Default::default(),
            bytes: Default::default(),
            errors: Default::default(),
            status: Default::default(),
            buckets: Default::default(),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Stage for Meter {
    fn kind(&self) -> &'static str {
        "meter"
    }

    fn completed(&self, req: &Request, status: u8, latency: Duration) {
        let i = req.op.index();
        self.requests[i].fetch_add(1, Relaxed);
        if status == 0 {
            self.bytes[i].fetch_add(req.len, Relaxed);
        } else {
            self.errors[i].fetch_add(1, Relaxed);
        }
        self.status[usize::from(status.min(3))].fetch_add(1, Relaxed);
        let s = latency.as_secs_f64();
        let b = LATENCY_BOUNDS.partition_point(|&bound| bound < s);
        self.buckets[b].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    fn report(&self) -> StageReport {
        let mut counters = Vec::new();
        for op in Op::ALL {
            let i = op.index();
            for (name, v) in [
                ("requests", &self.requests[i]),
                ("bytes", &self.bytes[i]),
                ("errors", &self.errors[i]),
            ] {
                counters.push(StageCounter {
                    name: name.into(),
                    label: op.name().into(),
                    value: v.load(Relaxed),
                });
            }
        }
        for (label, v) in STATUS.iter().zip(&self.status) {
            counters.push(StageCounter {
                name: "status".into(),
                label: (*label).into(),
                value: v.load(Relaxed),
            });
        }
        StageReport {
            kind: "meter".into(),
            counters,
            latency: Some(LatencyHistogram {
                bounds: LATENCY_BOUNDS.to_vec(),
                counts: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                sum: self.sum_ns.load(Relaxed) as f64 / 1e9,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn counts_ops_bytes_errors_and_latency() {
        let m = Meter::new();
        let mut r = Request {
            device: 3,
            op: Op::Read,
            sector: 0,
            len: 4096,
            frame: None,
            arrived: Instant::now(),
            vm_host: 0,
        };
        m.completed(&r, 0, Duration::from_micros(30));
        m.completed(&r, 0, Duration::from_micros(30));
        r.op = Op::Write;
        m.completed(&r, 1, Duration::from_secs(20));
        let rep = m.report();
        assert_eq!(rep.counter("requests", "read"), 2);
        assert_eq!(rep.counter("bytes", "read"), 8192);
        assert_eq!(rep.counter("errors", "write"), 1);
        assert_eq!(rep.counter("bytes", "write"), 0);
        assert_eq!(rep.counter("status", "ok"), 2);
        assert_eq!(rep.counter("status", "ioerr"), 1);
        let h = rep.latency.expect("histogram");
        assert_eq!(h.count(), 3);
        assert_eq!(h.quantile(0.5), Some(50e-6));
        assert_eq!(h.quantile(1.0), Some(f64::INFINITY));
    }
}

/// One queue's own I/O figures, kept when the server meters queues
/// (`IoServerConfig::queue_metrics`): a [`Meter`] of the queue's requests
/// and the number it holds in flight.
#[derive(Debug, Default)]
pub struct QueueMeter {
    /// Requests by op and status, bytes, latency.
    pub meter: Meter,
    /// Requests the queue took from the guest and has not completed.
    pub in_flight: AtomicU64,
}
