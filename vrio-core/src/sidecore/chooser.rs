//! How a sidecore's adaptive remote queues learn of requests: by the VM
//! host's doorbells, or by polling the guest's rings over the fabric. The
//! better one depends on the fabric and the load, so the sidecore measures:
//! its own CPU time per request, in one way and then the other, and keeps
//! the cheaper. A state machine that does no I/O: the runtime feeds it the
//! thread's CPU clock and the request count, it answers with the way to use.
//!
//! Why measure instead of fixed thresholds (`vrio-bench blk`, 4 KiB reads,
//! medians of five runs over `shm`, two sets): remote polling costs the
//! sidecore within 10% of doorbells (either way) at 1 x 32, 4 x 1 and
//! 4 x 32, 5-30% more at 16 x 1 and 16 x 32, and 45-60% more at 1 x 1 (a
//! queue with one request in flight pays for empty polls), while it
//! halves the VM host's CPU per request under load and takes three or
//! four round trips per request to doorbells' one. The ratios move with the machine,
//! the guests and the run; no batch-size threshold tells them apart, the
//! sidecore's CPU clock does. (Over `soft` remote
//! polling costs more at every load, and the engine does not measure it;
//! see [`super::Sidecore::observe_cpu`].)

use std::time::{Duration, Instant};

/// The way a sidecore's adaptive queues learn of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    /// The VM host announces each kick's requests in a doorbell.
    Doorbells,
    /// The sidecore READs the guest's avail ring itself, while busy.
    RemotePoll,
}

impl Discovery {
    fn other(self) -> Self {
        match self {
            Discovery::Doorbells => Discovery::RemotePoll,
            Discovery::RemotePoll => Discovery::Doorbells,
        }
    }
}

/// How the chooser measures and how long it keeps a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChooserConfig {
    /// Queues that just arrived are measured only after this long: a
    /// guest ramping up and cold caches make their first milliseconds
    /// cost more per request in either way, which says nothing of either.
    pub warmup: Duration,
    /// One measurement. 20 ms holds thousands of requests at the loads
    /// where the choice matters (tens of thousands of requests per second
    /// and up), so one epoch's CPU per request is steady to a few percent.
    pub epoch: Duration,
    /// Left out after a switch: the queues switch at their next batch and
    /// the VM host re-announces what it had, so the first moments cost
    /// neither way's price.
    pub settle: Duration,
    /// An epoch with fewer requests cannot tell the two ways apart: it
    /// keeps doorbells, which cost nothing while a queue is idle, where an
    /// empty remote poll costs a READ, and measures again at once.
    pub min_requests: u64,
    /// Two ways within this many percent of each other cost the sidecore
    /// the same (5: the spread of two epochs of one way under a steady
    /// load), and the tie goes by [`ModeChooser::lean_remote`] (doorbells
    /// unless [`Self::ties_to_remote_poll`]), so noise does not make the
    /// queues flap.
    pub margin_percent: u8,
    /// A new choice is kept this long before the next comparison. Short,
    /// because a choice just made is the one most likely to be wrong
    /// (the load may have been changing).
    pub first_hold: Duration,
    /// A confirmed choice is kept four times longer each time, up to
    /// this long: each comparison spends an epoch in the worse way and
    /// costs two switches, so they grow rarer (about 1.4% of the time at
    /// this hold) while the load stays alike.
    pub max_hold: Duration,
    /// Where remote polls cost the VM host nothing (an RNIC, `shm`),
    /// whether a tie goes to them, which halves the VM host's CPU per
    /// request under load, rather than to doorbells, which keep a 4 KiB
    /// request at one round trip instead of three or four (the avail
    /// ring's READ, an indirect table's, the header's, then the reply).
    /// Off: latency first; a queue in remote-poll mode makes the other
    /// trade for whoever asks.
    pub ties_to_remote_poll: bool,
}

impl Default for ChooserConfig {
    fn default() -> Self {
        Self {
            warmup: Duration::from_millis(50),
            epoch: Duration::from_millis(20),
            settle: Duration::from_millis(2),
            min_requests: 256,
            margin_percent: 5,
            first_hold: Duration::from_millis(200),
            max_hold: Duration::from_millis(1600),
            ties_to_remote_poll: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    cpu_ns: u64,
    requests: u64,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Queues just came (or left): wait before measuring.
    Warmup,
    /// Measuring the way in use.
    Current,
    /// Switched to the other way: waiting for it to settle, then measuring
    /// it. `cost`: CPU ns per request of the way in use.
    Probe { cost: f64, settled: bool },
    /// Keeping the choice until then.
    Hold(Instant),
}

/// Chooses between doorbells and remote polling by measured CPU per
/// request (see the module's documentation).
#[derive(Debug)]
pub struct ModeChooser {
    cfg: ChooserConfig,
    chosen: Discovery,
    phase: Phase,
    mark: Option<Mark>,
    hold: Duration,
    comparisons: u64,
    switches: u64,
    lean_remote: bool,
    /// Queues changed during a hold: warm up again when it ends.
    rewarm: bool,
}

impl ModeChooser {
    /// A chooser that starts with doorbells and compares after the
    /// warm-up.
    pub fn new(cfg: ChooserConfig) -> Self {
        Self {
            cfg,
            chosen: Discovery::Doorbells,
            phase: Phase::Warmup,
            mark: None,
            hold: cfg.first_hold,
            comparisons: 0,
            switches: 0,
            lean_remote: false,
            rewarm: false,
        }
    }

    /// Whether a tie within the margin goes to remote polls. The engine
    /// says so only where they cost the VM host nothing (its fabric's
    /// one-sided operations take none of its CPU, as with an RNIC or
    /// `shm`, where doorbells cost it a message per kick) and its
    /// configuration asks for it ([`ChooserConfig::ties_to_remote_poll`]).
    /// Over `soft` the VM host's fabric threads serve every READ.
    pub fn lean_remote(&mut self, on: bool) {
        self.lean_remote = on;
    }

    /// The way the queues should use now.
    pub fn current(&self) -> Discovery {
        match self.phase {
            Phase::Probe { .. } => self.chosen.other(),
            _ => self.chosen,
        }
    }

    /// The way chosen by the last comparison (not the one being probed).
    pub fn chosen(&self) -> Discovery {
        self.chosen
    }

    /// Comparisons made, and how many times the choice changed (a
    /// comparison, or too little load sending it back to doorbells).
    pub fn counts(&self) -> (u64, u64) {
        (self.comparisons, self.switches)
    }

    /// Forgets the measurement under way (the queues changed: what was
    /// measured no longer describes them) and measures again after a
    /// warm-up; a hold under way is kept, and the warm-up follows it.
    pub fn restart(&mut self) {
        self.mark = None;
        match self.phase {
            // The choice stands; the warm-up comes when the hold ends.
            Phase::Hold(_) => self.rewarm = true,
            _ => self.phase = Phase::Warmup,
        }
    }

    /// The thread's CPU clock and the requests it has served so far (both
    /// only grow), at `now`. Returns the way the queues should use.
    pub fn observe(&mut self, now: Instant, cpu_ns: u64, requests: u64) -> Discovery {
        let here = Mark {
            at: now,
            cpu_ns,
            requests,
        };
        match self.phase {
            Phase::Warmup => self.phase = Phase::Hold(now + self.cfg.warmup),
            Phase::Hold(until) => {
                if now >= until && std::mem::take(&mut self.rewarm) {
                    self.phase = Phase::Hold(now + self.cfg.warmup);
                } else if now >= until {
                    self.phase = Phase::Current;
                    self.mark = Some(here);
                }
            }
            Phase::Probe {
                cost,
                settled: false,
            } => {
                let started = self.mark.map_or(now, |m| m.at);
                if now.saturating_duration_since(started) >= self.cfg.settle {
                    self.phase = Phase::Probe {
                        cost,
                        settled: true,
                    };
                    self.mark = Some(here);
                }
            }
            Phase::Current | Phase::Probe { settled: true, .. } => {
                let Some(m) = self.mark else {
                    self.mark = Some(here);
                    return self.current();
                };
                if now.saturating_duration_since(m.at) < self.cfg.epoch {
                    return self.current();
                }
                let served = requests.saturating_sub(m.requests);
                if served < self.cfg.min_requests.max(1) {
                    // Too little load to tell: doorbells, and measure on
                    // (measuring the way in use costs nothing).
                    if self.chosen != Discovery::Doorbells {
                        self.switches += 1;
                        self.chosen = Discovery::Doorbells;
                        self.hold = self.cfg.first_hold;
                    }
                    self.phase = Phase::Current;
                    self.mark = Some(here);
                    return self.current();
                }
                let cost = cpu_ns.saturating_sub(m.cpu_ns) as f64 / served as f64;
                match self.phase {
                    Phase::Current => {
                        self.phase = Phase::Probe {
                            cost,
                            settled: false,
                        };
                        self.mark = Some(here);
                    }
                    Phase::Probe { cost: current, .. } => {
                        let (doorbell, remote) = match self.chosen {
                            Discovery::Doorbells => (current, cost),
                            Discovery::RemotePoll => (cost, current),
                        };
                        let m = f64::from(self.cfg.margin_percent.min(100)) / 100.0;
                        let remote_wins = if self.lean_remote {
                            remote <= doorbell * (1.0 + m)
                        } else {
                            remote < doorbell * (1.0 - m)
                        };
                        tracing::debug!(
                            doorbell_ns_per_request = doorbell,
                            remote_poll_ns_per_request = remote,
                            lean_remote = self.lean_remote,
                            remote_wins,
                            "compared doorbells and remote polling"
                        );
                        let pick = if remote_wins {
                            Discovery::RemotePoll
                        } else {
                            Discovery::Doorbells
                        };
                        self.decide(pick, now);
                    }
                    Phase::Hold(_) | Phase::Warmup => {}
                }
            }
        }
        self.current()
    }

    fn decide(&mut self, pick: Discovery, now: Instant) {
        self.comparisons += 1;
        if pick == self.chosen {
            self.hold = (self.hold * 4).min(self.cfg.max_hold);
        } else {
            self.switches += 1;
            self.chosen = pick;
            self.hold = self.cfg.first_hold;
        }
        self.phase = Phase::Hold(now + self.hold);
        self.mark = None;
    }
}
