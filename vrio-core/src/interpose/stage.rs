//! The [`Stage`] trait: one step of a device's interposition chain.

use std::time::{Duration, Instant};

use super::request::{Admit, Refusal, Request};

/// One step between a parsed request and the back-end (blk), or between a
/// port and the switch (net TX). A device's stages are shared by all its
/// queues, which may run on different sidecores at once: a stage keeps its
/// state behind atomics or a short lock.
///
/// Every method has a default that does nothing, so a stage implements
/// only the hooks it needs. The queue calls them in chain order:
/// 1. [`admit`](Stage::admit) before the request runs (every stage must
///    answer [`Admit::Go`] for it to run);
/// 2. [`write_data`](Stage::write_data) on data going to the back-end, or
///    [`read_data`](Stage::read_data) in reverse chain order on data
///    coming from it;
/// 3. [`completed`](Stage::completed) as the result is posted to the guest.
pub trait Stage: Send + Sync + std::fmt::Debug {
    /// The stage's kind in policies, logs and metrics (`qos`, `crypt`).
    fn kind(&self) -> &'static str;

    /// May `req` run at `now`? Asked once per request, and again after
    /// each [`Admit::Wait`] until it answers something else. A stage that
    /// charges for requests (QoS) charges when it answers `Go`. Must not
    /// block.
    fn admit(&self, _req: &Request, _now: Instant) -> Admit {
        Admit::Go
    }

    /// Transforms `data`, the whole payload of a blk write starting at
    /// `req.sector`, in place before it reaches the back-end. DISCARD and
    /// WRITE_ZEROES do not come here: they reach the back-end as they are.
    fn write_data(&self, _req: &Request, _data: &mut [u8]) -> Result<(), Refusal> {
        Ok(())
    }

    /// Transforms `data`, read from the back-end at `req.sector`, in place
    /// before the guest sees it.
    fn read_data(&self, _req: &Request, _data: &mut [u8]) -> Result<(), Refusal> {
        Ok(())
    }

    /// The request completed with virtio `status` (0 is OK): its reply is
    /// posted to the guest, `latency` after the server learnt of it.
    /// Refused requests come here too.
    fn completed(&self, _req: &Request, _status: u8, _latency: Duration) {}

    /// What the stage counted, for metrics and `vrio-ctl policy show`.
    fn report(&self) -> StageReport {
        StageReport {
            kind: self.kind().to_string(),
            ..StageReport::default()
        }
    }
}

/// One counter of a stage: `name` with one label value (`op`, `reason`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageCounter {
    /// What is counted (`requests`, `bytes`, `drops`, `delayed`).
    pub name: String,
    /// The dimension's value (`read`, `acl_mac`), or empty.
    pub label: String,
    /// The count since the stage was created.
    pub value: u64,
}

/// A latency histogram: counts of requests at or below each bound.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencyHistogram {
    /// Upper bounds in seconds, ascending; the last bucket is +Inf and is
    /// not listed.
    pub bounds: Vec<f64>,
    /// Requests per bucket (not cumulative), `bounds.len() + 1` of them.
    pub counts: Vec<u64>,
    /// Sum of all latencies, in seconds.
    pub sum: f64,
}

impl LatencyHistogram {
    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The bound at or below which fraction `q` (0..=1) of requests fall;
    /// None when empty, infinity when in the last bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// What one stage reports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageReport {
    /// The stage's kind.
    pub kind: String,
    /// Its counters.
    pub counters: Vec<StageCounter>,
    /// Its latency histogram, for stages that keep one (`meter`).
    pub latency: Option<LatencyHistogram>,
}

impl StageReport {
    /// The value of counter `name` with `label`, 0 when absent.
    pub fn counter(&self, name: &str, label: &str) -> u64 {
        self.counters
            .iter()
            .filter(|c| c.name == name && c.label == label)
            .map(|c| c.value)
            .sum()
    }
}
