//! A device's chain of stages ([`Pipeline`]), swapped live
//! ([`Interposer`]), and the server's registry of them ([`Policies`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::request::{Admit, Refusal, Request};
use super::spec::{PolicyError, PolicySpec};
use super::stage::{Stage, StageReport};

/// One device's ordered stages, built from a [`PolicySpec`]. Immutable: a
/// policy change builds a new pipeline (and new stage state).
#[derive(Debug, Default)]
pub struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
    spec: PolicySpec,
}

impl Pipeline {
    /// No stages: requests go straight to the back-end.
    pub fn empty() -> Self {
        Self::default()
    }

    /// `stages` in chain order, built from `spec`.
    pub fn new(spec: PolicySpec, stages: Vec<Box<dyn Stage>>) -> Self {
        Self { stages, spec }
    }

    /// True when there is nothing to run: queues skip every hook.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// The policy it was built from.
    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    /// Asks the stages from `*passed` on whether `req` may run; `*passed`
    /// counts the stages that said [`Admit::Go`], so that a request held by
    /// a later stage is not charged twice by an earlier one.
    pub fn admit(&self, req: &Request, now: Instant, passed: &mut usize) -> Admit {
        while let Some(s) = self.stages.get(*passed) {
            match s.admit(req, now) {
                Admit::Go => *passed += 1,
                other => return other,
            }
        }
        Admit::Go
    }

    /// Data on its way to the back-end, through the stages in order.
    pub fn write_data(&self, req: &Request, data: &mut [u8]) -> Result<(), Refusal> {
        self.stages.iter().try_for_each(|s| s.write_data(req, data))
    }

    /// Data from the back-end, through the stages in reverse order (the
    /// inverse of [`write_data`](Self::write_data)).
    pub fn read_data(&self, req: &Request, data: &mut [u8]) -> Result<(), Refusal> {
        self.stages
            .iter()
            .rev()
            .try_for_each(|s| s.read_data(req, data))
    }

    /// Tells every stage how `req` ended.
    pub fn completed(&self, req: &Request, status: u8, latency: Duration) {
        for s in &self.stages {
            s.completed(req, status, latency);
        }
    }

    /// Each stage's counters, in chain order.
    pub fn reports(&self) -> Vec<StageReport> {
        self.stages.iter().map(|s| s.report()).collect()
    }
}

impl PolicySpec {
    /// Checks every stage and builds the pipeline for `device`.
    pub fn build(&self, device: u64) -> Result<Pipeline, PolicyError> {
        Ok(Pipeline::new(self.clone(), self.stages(device)?))
    }
}

/// One device's current pipeline, which a policy change swaps while its
/// queues run. Queues read it through an [`Interposed`], which costs one
/// atomic load per batch while nothing changes.
#[derive(Debug)]
pub struct Interposer {
    device: u64,
    current: RwLock<Arc<Pipeline>>,
    generation: AtomicU64,
}

impl Interposer {
    /// Device `device`, with no stages yet.
    pub fn new(device: u64) -> Self {
        Self {
            device,
            current: RwLock::new(Arc::new(Pipeline::empty())),
            generation: AtomicU64::new(0),
        }
    }

    /// The device's id.
    pub fn device(&self) -> u64 {
        self.device
    }

    /// The pipeline now in force.
    pub fn pipeline(&self) -> Arc<Pipeline> {
        // A poisoned lock only means a writer panicked between two plain
        // stores; the Arc inside is whole.
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Puts `p` in force for the next batch of every queue of the device.
    pub fn replace(&self, p: Pipeline) {
        let p = Arc::new(p);
        match self.current.write() {
            Ok(mut g) => *g = p,
            Err(g) => *g.into_inner() = p,
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A queue's handle on its device's [`Interposer`], caching the pipeline.
#[derive(Debug, Clone)]
pub struct Interposed {
    src: Arc<Interposer>,
    cached: Arc<Pipeline>,
    seen: u64,
}

impl Interposed {
    /// A handle on `src`.
    pub fn new(src: Arc<Interposer>) -> Self {
        let seen = src.generation();
        let cached = src.pipeline();
        Self { src, cached, seen }
    }

    /// The pipeline in force, refreshed when a policy changed since the
    /// last call.
    pub fn current(&mut self) -> &Arc<Pipeline> {
        let g = self.src.generation();
        if g != self.seen {
            self.cached = self.src.pipeline();
            self.seen = g;
        }
        &self.cached
    }

    /// The device's id.
    pub fn device(&self) -> u64 {
        self.src.device
    }
}

/// An I/O server's policies, by device id. Queues take their device's
/// [`Interposer`] when they attach; a policy set later reaches them live.
#[derive(Debug, Default)]
pub struct Policies {
    devices: Mutex<HashMap<u64, Arc<Interposer>>>,
}

impl Policies {
    /// No policies: every device has an empty pipeline.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Interposer>>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Device `device`'s interposer (created empty if it has none).
    pub fn interposer(&self, device: u64) -> Arc<Interposer> {
        self.lock()
            .entry(device)
            .or_insert_with(|| Arc::new(Interposer::new(device)))
            .clone()
    }

    /// Builds `spec` and puts it in force for `device`. On error nothing
    /// changes: the device keeps its old policy.
    pub fn set(&self, device: u64, spec: &PolicySpec) -> Result<(), PolicyError> {
        let p = spec.build(device)?;
        let i = self.interposer(device);
        if spec.stages.is_empty() {
            tracing::info!(device, "interposition policy cleared");
        } else {
            tracing::info!(device, stages = %spec.summary(), "interposition policy applied");
        }
        i.replace(p);
        self.prune();
        Ok(())
    }

    /// The policy in force for `device` (empty if none).
    pub fn spec(&self, device: u64) -> PolicySpec {
        self.lock()
            .get(&device)
            .map(|i| i.pipeline().spec().clone())
            .unwrap_or_default()
    }

    /// The devices that have stages, with each stage's report.
    pub fn reports(&self) -> Vec<(u64, Vec<StageReport>)> {
        let all: Vec<_> = self.lock().values().cloned().collect();
        let mut out: Vec<_> = all
            .iter()
            .map(|i| (i.device, i.pipeline()))
            .filter(|(_, p)| !p.is_empty())
            .map(|(d, p)| (d, p.reports()))
            .collect();
        out.sort_by_key(|(d, _)| *d);
        out
    }

    /// Drops entries with no stages that no queue holds.
    fn prune(&self) {
        self.lock()
            .retain(|_, i| Arc::strong_count(i) > 1 || !i.pipeline().is_empty());
    }
}
