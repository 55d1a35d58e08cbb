//! Fault injection on a sector range, as SPDK's error and delay bdevs:
//! for tests of what guests and agents do when storage misbehaves.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::params::FaultSpec;
use super::request::{Admit, Op, Refusal, Request};
use super::stage::{Stage, StageCounter, StageReport};

/// The `fault` stage.
#[derive(Debug)]
pub struct FaultStage {
    first: u64,
    end: u64,
    /// Indexed by [`Op::index`].
    ops: [bool; Op::ALL.len()],
    error: Option<Refusal>,
    delay: Duration,
    failed: AtomicU64,
    delayed: AtomicU64,
}

impl FaultStage {
    /// Checks `spec` and builds the stage.
    pub fn new(spec: &FaultSpec) -> Result<Self, String> {
        if spec.sectors == 0 {
            return Err("sectors must be at least 1".into());
        }
        let end = spec
            .first_sector
            .checked_add(spec.sectors)
            .ok_or("first_sector + sectors overflows")?;
        let mut ops = [spec.ops.is_empty(); Op::ALL.len()];
        for name in &spec.ops {
            let op = Op::ALL
                .into_iter()
                .find(|o| o.name() == name && *o != Op::Transmit)
                .ok_or_else(|| {
                    format!(
                        "unknown op {name:?} (read, write, flush, discard, write_zeroes, other)"
                    )
                })?;
            ops[op.index()] = true;
        }
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
        let error = match spec.error.as_deref() {
            None => None,
            Some("ioerr") => Some(Refusal {
                status: VIRTIO_BLK_S_IOERR as u8,
                reason: "fault",
            }),
            Some("unsupp") => Some(Refusal {
                status: VIRTIO_BLK_S_UNSUPP as u8,
                reason: "fault",
            }),
            Some(e) => return Err(format!("unknown error {e:?} (ioerr or unsupp)")),
        };
        if error.is_none() && spec.delay_ms == 0 {
            return Err("neither error nor delay_ms is set".into());
        }
        if spec.delay_ms > 60_000 {
            return Err(format!("delay_ms {} is over 60000", spec.delay_ms));
        }
        Ok(Self {
            first: spec.first_sector,
            end,
            ops,
            error,
            delay: Duration::from_millis(spec.delay_ms),
            failed: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
        })
    }

    fn hits(&self, req: &Request) -> bool {
        if !self.ops[req.op.index()] || req.op == Op::Transmit {
            return false;
        }
        // Requests without data (flush) touch their sector alone.
        let sectors = req.len.div_ceil(512).max(1);
        let end = req.sector.saturating_add(sectors);
        req.sector < self.end && self.first < end
    }
}

impl Stage for FaultStage {
    fn kind(&self) -> &'static str {
        "fault"
    }

    fn admit(&self, req: &Request, now: Instant) -> Admit {
        if !self.hits(req) {
            return Admit::Go;
        }
        let until = req.arrived + self.delay;
        if now < until {
            // Counted once per request: on its first ask.
            if now <= req.arrived {
                self.delayed.fetch_add(1, Relaxed);
            }
            return Admit::Wait(until);
        }
        match self.error {
            Some(r) => {
                self.failed.fetch_add(1, Relaxed);
                Admit::Refuse(r)
            }
            None => Admit::Go,
        }
    }

    fn report(&self) -> StageReport {
        StageReport {
            kind: "fault".into(),
            counters: vec![
                StageCounter {
                    name: "failed".into(),
                    label: String::new(),
                    value: self.failed.load(Relaxed),
                },
                StageCounter {
                    name: "delayed".into(),
                    label: String::new(),
                    value: self.delayed.load(Relaxed),
                },
            ],
            latency: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: Op, sector: u64, len: u64, arrived: Instant) -> Request {
        Request {
            device: 1,
            op,
            sector,
            len,
            frame: None,
            arrived,
            vm_host: 0,
        }
    }

    #[test]
    fn fails_only_requests_that_touch_the_range() {
        let f = FaultStage::new(&FaultSpec {
            first_sector: 100,
            sectors: 8,
            ops: vec!["read".into()],
            error: Some("ioerr".into()),
            delay_ms: 0,
        })
        .expect("valid");
        let t = Instant::now();
        assert_eq!(f.admit(&req(Op::Read, 92, 4096, t), t), Admit::Go);
        assert!(matches!(
            f.admit(&req(Op::Read, 93, 4096, t), t),
            Admit::Refuse(_)
        ));
        assert!(matches!(
            f.admit(&req(Op::Read, 107, 512, t), t),
            Admit::Refuse(_)
        ));
        assert_eq!(f.admit(&req(Op::Read, 108, 4096, t), t), Admit::Go);
        assert_eq!(f.admit(&req(Op::Write, 100, 4096, t), t), Admit::Go);
        // A hostile sector number near the end of u64 does not wrap.
        assert_eq!(f.admit(&req(Op::Read, u64::MAX, 4096, t), t), Admit::Go);
    }

    #[test]
    fn delays_from_arrival_then_lets_through() {
        let f = FaultStage::new(&FaultSpec {
            first_sector: 0,
            sectors: 1,
            ops: vec![],
            error: None,
            delay_ms: 50,
        })
        .expect("valid");
        let t = Instant::now();
        let r = req(Op::Write, 0, 512, t);
        assert_eq!(f.admit(&r, t), Admit::Wait(t + Duration::from_millis(50)));
        assert_eq!(f.admit(&r, t + Duration::from_millis(50)), Admit::Go);
        assert_eq!(f.report().counter("delayed", ""), 1);
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = FaultSpec {
            first_sector: 0,
            sectors: 0,
            ops: vec![],
            error: Some("ioerr".into()),
            delay_ms: 0,
        };
        assert!(FaultStage::new(&s).is_err());
        s.sectors = 1;
        s.error = Some("boom".into());
        assert!(FaultStage::new(&s).is_err());
        s.error = None;
        assert!(FaultStage::new(&s).is_err());
        s.error = Some("ioerr".into());
        s.ops = vec!["transmit".into()];
        assert!(FaultStage::new(&s).is_err());
    }
}
