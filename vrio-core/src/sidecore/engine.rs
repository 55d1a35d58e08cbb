//! The sidecore's scheduling state machine: one round visits every queue
//! once, round-robin, with a bounded batch each (no queue starves others).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::chooser::{ChooserConfig, Discovery, ModeChooser};
use super::{Backoff, ServedQueue, SidecoreStats};

/// How a sidecore batches, when its queues go back to kicks, and how it
/// idles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SidecoreConfig {
    /// Requests served from one queue per visit.
    pub batch: usize,
    /// A polled queue idle this long goes back to guest notifications.
    /// Elvis used 3 s; a shorter default keeps idle guests cheap.
    pub poll_idle: Duration,
    /// How the sidecore waits when no queue has work.
    pub backoff: Backoff,
    /// How adaptive remote queues choose between doorbells and remote
    /// polling (see [`ModeChooser`]).
    pub chooser: ChooserConfig,
}

impl Default for SidecoreConfig {
    fn default() -> Self {
        Self {
            batch: 32,
            poll_idle: Duration::from_millis(100),
            backoff: Backoff::default(),
            chooser: ChooserConfig::default(),
        }
    }
}

/// What a round did, and what the runtime should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundOutcome {
    /// At least one request was served: go again at once.
    Worked,
    /// Nothing completed, but fabric operations are in flight: go again
    /// soon, yielding the CPU to whoever completes them.
    InFlight,
    /// Nothing to do. `sleep`: back off this long (None: spin on).
    /// `all_notify`: every queue waits for kicks, so blocking on the kick
    /// fds is safe.
    Idle {
        /// How long to back off.
        sleep: Option<Duration>,
        /// Every queue waits for kicks.
        all_notify: bool,
    },
}

struct Slot {
    id: u64,
    queue: Box<dyn ServedQueue>,
    polling: bool,
    last_work: Instant,
    /// Takes the chooser's advice (an adaptive remote queue), and
    /// whether its remote polls cost the VM host no CPU.
    adaptive: Option<bool>,
}

/// The scheduling state of one sidecore: its queues, each in poll or
/// notification mode, and the idle count behind the back-off. Driven by
/// [`Sidecore::round`]; owns no thread.
pub struct Sidecore {
    cfg: SidecoreConfig,
    /// Warnings of failed queues.
    failures: vrio_rdma::WarnLimiter,
    slots: Vec<Slot>,
    stats: Arc<SidecoreStats>,
    empty_rounds: u32,
    next_id: u64,
    chooser: ModeChooser,
    /// The way the adaptive queues were last advised to use.
    advice: Discovery,
    /// An adaptive queue's remote polls cost its VM host CPU.
    doorbells_only: bool,
}

impl Sidecore {
    /// A sidecore without queues.
    pub fn new(cfg: SidecoreConfig) -> Self {
        Self {
            cfg,
            failures: vrio_rdma::WarnLimiter::new(Duration::from_secs(10), 5),
            slots: Vec::new(),
            stats: Arc::default(),
            empty_rounds: 0,
            next_id: 1,
            chooser: ModeChooser::new(cfg.chooser),
            advice: Discovery::Doorbells,
            doorbells_only: false,
        }
    }

    /// The sidecore's counters.
    pub fn stats(&self) -> &Arc<SidecoreStats> {
        &self.stats
    }
    /// Its configuration.
    pub fn config(&self) -> &SidecoreConfig {
        &self.cfg
    }
    /// Queues served.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// No queue served.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// Whether queue `id` is in poll mode (kicks suppressed).
    pub fn is_polling(&self, id: u64) -> Option<bool> {
        self.slots.iter().find(|s| s.id == id).map(|s| s.polling)
    }
    /// The kick fds of the queues that have one (to block on when every
    /// queue waits for kicks).
    pub fn kick_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.slots
            .iter()
            .filter_map(|s| s.queue.kick_fd())
            .collect()
    }

    /// Adds a queue. It starts in poll mode, so work posted before it
    /// arrived is found without waiting for a kick.
    pub fn add(&mut self, mut queue: Box<dyn ServedQueue>, now: Instant) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if let Err(e) = queue.set_notifications(false) {
            tracing::warn!(queue = queue.name(), error = %e, "cannot suppress kicks");
        }
        // Told the current advice at once; a queue whose remote polls cost
        // its VM host CPU makes it doorbells for all (restart_chooser).
        let adaptive = queue.advise_remote_poll(self.advice == Discovery::RemotePoll);
        self.slots.push(Slot {
            id,
            queue,
            polling: true,
            last_work: now,
            adaptive,
        });
        self.empty_rounds = 0;
        self.restart_chooser();
        id
    }

    /// The queues changed: what the chooser measured no longer describes
    /// them, and the tie may go the other way.
    fn restart_chooser(&mut self) {
        let mut adaptive = self.slots.iter().filter_map(|s| s.adaptive).peekable();
        let any = adaptive.peek().is_some();
        let cheap = adaptive.all(|c| c);
        self.chooser
            .lean_remote(any && cheap && self.cfg.chooser.ties_to_remote_poll);
        // Where a queue's remote polls cost its VM host CPU (`soft`: the
        // host's fabric threads serve every READ), doorbells, unmeasured:
        // remote polls cost the sidecore more there too, at every load of
        // the bench grid (0.3-0.8x the per-core rate), and each comparison
        // would spend an epoch in them.
        self.doorbells_only = any && !cheap;
        self.chooser.restart();
        // No adaptive queue left, or one that must keep doorbells: the
        // advice is doorbells from now on (a later queue starts there).
        if !any || self.doorbells_only {
            self.advise(Discovery::Doorbells);
        }
    }

    /// Advises every adaptive queue to use `d`, if it is not the advice
    /// already.
    fn advise(&mut self, d: Discovery) {
        if d == self.advice {
            return;
        }
        self.advice = d;
        let on = d == Discovery::RemotePoll;
        self.stats.remote_poll_advised.store(u64::from(on), Relaxed);
        for s in self.slots.iter_mut().filter(|s| s.adaptive.is_some()) {
            s.queue.advise_remote_poll(on);
        }
    }

    /// Whether [`Sidecore::observe_cpu`] has anything to measure (an
    /// adaptive queue, none of whose remote polls cost its VM host CPU):
    /// the runtime reads its CPU clock only then.
    pub fn measures(&self) -> bool {
        !self.doorbells_only && self.slots.iter().any(|s| s.adaptive.is_some())
    }

    /// The way adaptive remote queues are advised to use now.
    pub fn discovery(&self) -> Discovery {
        self.advice
    }

    /// The chooser's comparisons so far, and how many changed its choice.
    pub fn discovery_counts(&self) -> (u64, u64) {
        self.chooser.counts()
    }

    /// The runtime's CPU clock (`cpu_ns`, of the thread that drives the
    /// rounds) at `now`: feeds the chooser, and advises the adaptive queues
    /// when its answer changes. Call it every few milliseconds; it does
    /// nothing while no queue is adaptive. An adaptive queue whose remote
    /// polls cost its VM host CPU (`soft`) keeps every queue here on
    /// doorbells without measuring.
    pub fn observe_cpu(&mut self, now: Instant, cpu_ns: u64) {
        // Otherwise restart_chooser has advised doorbells already.
        if !self.measures() {
            return;
        }
        let requests = self.stats.requests.load(Relaxed);
        let d = self.chooser.observe(now, cpu_ns, requests);
        let (comparisons, switches) = self.chooser.counts();
        self.stats.discovery_comparisons.store(comparisons, Relaxed);
        self.stats.discovery_switches.store(switches, Relaxed);
        self.advise(d);
    }

    /// Removes a queue (to move it elsewhere or detach it). Guest kicks are
    /// turned back on, so the queue's next owner sees them.
    pub fn remove(&mut self, id: u64) -> Option<Box<dyn ServedQueue>> {
        let i = self.slots.iter().position(|s| s.id == id)?;
        let mut slot = self.slots.remove(i);
        self.restart_chooser();
        if let Err(e) = slot.queue.set_notifications(true) {
            tracing::warn!(queue = slot.queue.name(), error = %e, "cannot re-enable kicks");
        }
        Some(slot.queue)
    }

    /// One round over all queues.
    pub fn round(&mut self, now: Instant) -> RoundOutcome {
        let started = Instant::now();
        let (batch, poll_idle) = (self.cfg.batch, self.cfg.poll_idle);
        let stats = &self.stats;
        let failures = &self.failures;
        let mut worked = false;
        let mut completed = false;
        // Spun long enough without work: hand every queue back to guest
        // kicks now (as NAPI does), so that the runtime can block on the
        // kick fds instead of sleeping blind and adding latency.
        let spun_out = self.empty_rounds >= self.cfg.backoff.spin_rounds;
        let before = self.slots.len();
        // The queues' clock: the round's, moved on after each poll that
        // worked (which may have blocked on a disk), so that a queue's
        // deadlines do not count time the sidecore spent on other queues.
        // Empty polls read no clock.
        let mut poll_now = now;
        self.slots.retain_mut(|slot| {
            if !slot.polling && !slot.queue.take_kick() {
                return true;
            }
            stats.polls.fetch_add(1, Relaxed);
            let out = match slot.queue.poll(batch, poll_now) {
                Ok(o) => o,
                Err(e) if e.routine => {
                    tracing::info!(queue = %e.queue, reason = %e.reason, "queue left the sidecore");
                    return false;
                }
                Err(e) => {
                    // A peer can make queues fail at will: a few lines,
                    // then a count.
                    if let Some(suppressed) = failures.allow("queue failed", now) {
                        tracing::warn!(queue = %e.queue, error = %e.reason, suppressed, "queue failed; dropped from its sidecore");
                    }
                    return false;
                }
            };
            let served = out.requests + out.errors + out.pending;
            if served > 0 {
                poll_now = now + started.elapsed();
            }
            stats.requests.fetch_add(u64::from(out.requests), Relaxed);
            stats.errors.fetch_add(u64::from(out.errors), Relaxed);
            stats.bytes.fetch_add(out.bytes, Relaxed);
            if served > 0 {
                worked = true;
                completed |= out.requests + out.errors > 0;
                slot.last_work = now;
                if !slot.polling {
                    match slot.queue.set_notifications(false) {
                        Ok(_) => {
                            slot.polling = true;
                            stats.poll_mode_on.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "queue failed; dropping it");
                            return false;
                        }
                    }
                }
                return true;
            }
            stats.empty_polls.fetch_add(1, Relaxed);
            if slot.polling
                && (spun_out || now.saturating_duration_since(slot.last_work) >= poll_idle)
            {
                match slot.queue.set_notifications(true) {
                    // Work raced in while we switched: keep polling.
                    Ok(true) => slot.last_work = now,
                    Ok(false) => {
                        slot.polling = false;
                        stats.poll_mode_off.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "queue failed; dropping it");
                        return false;
                    }
                }
            }
            true
        });
        if self.slots.len() != before {
            // Queues that failed or left: the chooser's view changed too.
            self.restart_chooser();
        }
        if worked {
            self.empty_rounds = 0;
            self.stats
                .busy_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
            if completed {
                RoundOutcome::Worked
            } else {
                RoundOutcome::InFlight
            }
        } else {
            self.empty_rounds = self.empty_rounds.saturating_add(1);
            RoundOutcome::Idle {
                sleep: self.cfg.backoff.delay(self.empty_rounds),
                all_notify: self.slots.iter().all(|s| !s.polling),
            }
        }
    }
}
