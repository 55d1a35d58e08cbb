//! Deterministic tests of the scheduling state machine with fake queues and
//! a fake clock: no threads, no sockets.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

#[derive(Default)]
struct FakeState {
    /// Requests waiting in the ring.
    pending: u32,
    notifications: bool,
    kicked: bool,
    /// Work that "arrives" exactly when notifications are re-enabled.
    race_on_enable: u32,
    served_batches: VecDeque<u32>,
    fail: bool,
    /// Takes the chooser's advice, and the advice it was given.
    adaptive: bool,
    remote_cheap: bool,
    advice: Vec<bool>,
}

struct FakeQueue {
    name: String,
    s: Arc<Mutex<FakeState>>,
}

impl ServedQueue for FakeQueue {
    fn poll(&mut self, budget: usize, _now: Instant) -> Result<PollOutcome, QueueFailure> {
        let mut s = self.s.lock().unwrap();
        if s.fail {
            return Err(QueueFailure {
                queue: self.name.clone(),
                reason: "broken".into(),
                routine: false,
            });
        }
        let n = s.pending.min(budget as u32);
        s.pending -= n;
        s.served_batches.push_back(n);
        Ok(PollOutcome {
            requests: n,
            bytes: u64::from(n) * 4096,
            errors: 0,
            pending: 0,
        })
    }
    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        let mut s = self.s.lock().unwrap();
        s.notifications = enabled;
        if enabled && s.race_on_enable > 0 {
            s.pending += s.race_on_enable;
            s.race_on_enable = 0;
        }
        Ok(enabled && s.pending > 0)
    }
    fn kick_fd(&self) -> Option<RawFd> {
        None
    }
    fn take_kick(&mut self) -> bool {
        std::mem::take(&mut self.s.lock().unwrap().kicked)
    }
    fn advise_remote_poll(&mut self, remote_poll: bool) -> Option<bool> {
        let mut s = self.s.lock().unwrap();
        s.advice.push(remote_poll);
        s.adaptive.then_some(s.remote_cheap)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

fn fake(name: &str) -> (Box<dyn ServedQueue>, Arc<Mutex<FakeState>>) {
    let s = Arc::new(Mutex::new(FakeState::default()));
    (
        Box::new(FakeQueue {
            name: name.into(),
            s: s.clone(),
        }),
        s,
    )
}

fn cfg() -> SidecoreConfig {
    SidecoreConfig {
        batch: 4,
        poll_idle: Duration::from_millis(10),
        backoff: Backoff {
            spin_rounds: 2,
            min_sleep: Duration::from_micros(10),
            max_sleep: Duration::from_micros(80),
        },
        ..SidecoreConfig::default()
    }
}

/// A sidecore serving fake queues "a" and "b", added at the returned time.
fn two_queues() -> (
    Sidecore,
    Instant,
    Arc<Mutex<FakeState>>,
    Arc<Mutex<FakeState>>,
) {
    let t0 = Instant::now();
    let mut sc = Sidecore::new(cfg());
    let (a, sa) = fake("a");
    let (b, sb) = fake("b");
    sc.add(a, t0);
    sc.add(b, t0);
    (sc, t0, sa, sb)
}

#[test]
fn round_robin_with_batch_budget() {
    let (mut sc, t0, sa, sb) = two_queues();
    sa.lock().unwrap().pending = 10;
    sb.lock().unwrap().pending = 3;
    assert_eq!(sc.round(t0), RoundOutcome::Worked);
    // a got only its budget, b all of its 3
    assert_eq!(sa.lock().unwrap().served_batches.back(), Some(&4));
    assert_eq!(sb.lock().unwrap().served_batches.back(), Some(&3));
    sc.round(t0);
    sc.round(t0);
    assert_eq!(sa.lock().unwrap().pending, 0);
    let st = sc.stats().snapshot();
    assert_eq!(st.requests, 13);
    assert_eq!(st.bytes, 13 * 4096);
    assert!(st.empty_polls >= 2);
    assert_eq!(st.polls, 6);
}

#[test]
fn poll_mode_switches_off_when_idle_and_back_on_with_work() {
    let t0 = Instant::now();
    let mut sc = Sidecore::new(cfg());
    let (a, sa) = fake("a");
    let id = sc.add(a, t0);
    // added in poll mode, kicks suppressed
    assert_eq!(sc.is_polling(id), Some(true));
    assert!(!sa.lock().unwrap().notifications);
    sc.round(t0 + Duration::from_millis(5));
    assert_eq!(sc.is_polling(id), Some(true));
    sc.round(t0 + Duration::from_millis(11));
    assert_eq!(sc.is_polling(id), Some(false));
    assert!(sa.lock().unwrap().notifications);
    // Not polled while in notify mode and not kicked.
    sa.lock().unwrap().pending = 2;
    let polls = sc.stats().snapshot().polls;
    let out = sc.round(t0 + Duration::from_millis(12));
    assert!(matches!(
        out,
        RoundOutcome::Idle {
            all_notify: true,
            ..
        }
    ));
    assert_eq!(sc.stats().snapshot().polls, polls);
    // A kick brings it back into poll mode.
    sa.lock().unwrap().kicked = true;
    assert_eq!(
        sc.round(t0 + Duration::from_millis(13)),
        RoundOutcome::Worked
    );
    assert_eq!(sc.is_polling(id), Some(true));
    assert!(!sa.lock().unwrap().notifications);
    let st = sc.stats().snapshot();
    assert_eq!((st.poll_mode_on, st.poll_mode_off), (1, 1));
}

#[test]
fn work_racing_with_the_switch_is_not_stranded() {
    let t0 = Instant::now();
    let mut sc = Sidecore::new(cfg());
    let (a, sa) = fake("a");
    let id = sc.add(a, t0);
    sa.lock().unwrap().race_on_enable = 1;
    sc.round(t0 + Duration::from_millis(20));
    // the enable saw pending work, so the queue stays in poll mode
    assert_eq!(sc.is_polling(id), Some(true));
    assert_eq!(
        sc.round(t0 + Duration::from_millis(21)),
        RoundOutcome::Worked
    );
    assert_eq!(sa.lock().unwrap().pending, 0);
}

#[test]
fn idle_backs_off_after_spinning() {
    let t0 = Instant::now();
    let mut sc = Sidecore::new(cfg());
    let (a, _sa) = fake("a");
    sc.add(a, t0);
    let sleeps: Vec<_> = (0..6)
        .map(|_| match sc.round(t0) {
            RoundOutcome::Idle { sleep, .. } => sleep,
            RoundOutcome::Worked | RoundOutcome::InFlight => panic!("no work was queued"),
        })
        .collect();
    assert_eq!(sleeps[0], None);
    assert_eq!(sleeps[1], Some(Duration::from_micros(10)));
    assert_eq!(sleeps[2], Some(Duration::from_micros(20)));
    assert_eq!(sleeps[4], Some(Duration::from_micros(80)));
    assert_eq!(sleeps[5], Some(Duration::from_micros(80)));
    assert_eq!(Backoff::spin().delay(1_000_000), None);
}

#[test]
fn failed_queue_is_dropped_and_others_continue() {
    let (mut sc, t0, sa, sb) = two_queues();
    sa.lock().unwrap().fail = true;
    sb.lock().unwrap().pending = 1;
    assert_eq!(sc.round(t0), RoundOutcome::Worked);
    assert_eq!(sc.len(), 1);
    assert_eq!(sb.lock().unwrap().pending, 0);
}

#[test]
fn removed_queue_gets_notifications_back() {
    let t0 = Instant::now();
    let mut sc = Sidecore::new(cfg());
    let (a, sa) = fake("a");
    let id = sc.add(a, t0);
    assert!(sc.remove(id).is_some());
    assert!(sa.lock().unwrap().notifications);
    assert!(sc.remove(id).is_none());
    assert!(sc.is_empty());
}

#[test]
fn spinning_out_hands_queues_back_to_kicks_before_poll_idle() {
    let t0 = Instant::now();
    let mut c = cfg();
    c.poll_idle = Duration::from_secs(3600);
    let mut sc = Sidecore::new(c);
    let (a, sa) = fake("a");
    let id = sc.add(a, t0);
    // spin_rounds = 2: two empty rounds keep polling...
    sc.round(t0);
    sc.round(t0);
    assert_eq!(sc.is_polling(id), Some(true));
    // ...the third switches to notifications, so the runtime may block.
    let out = sc.round(t0);
    assert_eq!(sc.is_polling(id), Some(false));
    assert!(sa.lock().unwrap().notifications);
    assert!(matches!(
        out,
        RoundOutcome::Idle {
            all_notify: true,
            ..
        }
    ));
}

#[test]
fn in_flight_work_keeps_the_queue_polled_without_counting_as_done() {
    struct InFlightQueue(u32);
    impl ServedQueue for InFlightQueue {
        fn poll(&mut self, _budget: usize, _now: Instant) -> Result<PollOutcome, QueueFailure> {
            self.0 += 1;
            // Two polls with a wave in flight, then the batch completes.
            Ok(if self.0 < 3 {
                PollOutcome {
                    pending: 1,
                    ..PollOutcome::default()
                }
            } else {
                PollOutcome {
                    requests: 4,
                    ..PollOutcome::default()
                }
            })
        }
        fn set_notifications(&mut self, _: bool) -> Result<bool, QueueFailure> {
            Ok(false)
        }
        fn kick_fd(&self) -> Option<RawFd> {
            None
        }
        fn name(&self) -> &str {
            "inflight"
        }
    }
    let t0 = Instant::now();
    let mut sc = Sidecore::new(cfg());
    let id = sc.add(Box::new(InFlightQueue(0)), t0);
    // Long after poll_idle, in-flight work still keeps the queue polled.
    let late = t0 + Duration::from_secs(1);
    assert_eq!(sc.round(late), RoundOutcome::InFlight);
    assert_eq!(sc.round(late), RoundOutcome::InFlight);
    assert_eq!(sc.is_polling(id), Some(true));
    assert_eq!(sc.round(late), RoundOutcome::Worked);
    let st = sc.stats().snapshot();
    assert_eq!(st.requests, 4);
    assert_eq!(st.empty_polls, 0);
}

/// A steady load through a chooser: `rate` requests per second, each
/// costing `ns(way)` of CPU in the way the chooser asks for, observed every
/// 2 ms from `t0` for `secs`. Returns the time spent in each way after
/// `from` seconds (doorbells, remote polls).
fn drive(
    c: &mut ModeChooser,
    t0: Instant,
    secs: f64,
    rate: f64,
    ns: impl Fn(Discovery, f64) -> f64,
    from: f64,
) -> (Duration, Duration) {
    let step = Duration::from_millis(2);
    let (mut cpu, mut reqs) = (0f64, 0f64);
    let (mut db, mut rp) = (Duration::ZERO, Duration::ZERO);
    let mut way = c.observe(t0, 0, 0);
    let steps = (secs / 0.002) as u32;
    for i in 1..=steps {
        let t = i as f64 * 0.002;
        let n = rate * 0.002;
        reqs += n;
        cpu += n * ns(way, t);
        if t > from {
            match way {
                Discovery::Doorbells => db += step,
                Discovery::RemotePoll => rp += step,
            }
        }
        way = c.observe(t0 + step * i, cpu as u64, reqs as u64);
    }
    (db, rp)
}

/// Costs per request that never change: doorbells 1,000 ns, remote polls
/// `remote` ns.
fn flat(remote: f64) -> impl Fn(Discovery, f64) -> f64 {
    move |w, _| match w {
        Discovery::Doorbells => 1_000.0,
        Discovery::RemotePoll => remote,
    }
}

#[test]
fn the_chooser_takes_remote_polls_when_they_cost_the_sidecore_less() {
    let mut c = ModeChooser::new(ChooserConfig::default());
    let cost = flat(700.0);
    // Chosen within the first comparison, then kept: probes of doorbells
    // take a small share of the time.
    let (db, rp) = drive(&mut c, Instant::now(), 10.0, 500_000.0, cost, 0.1);
    assert_eq!(c.chosen(), Discovery::RemotePoll);
    assert!(
        db.as_secs_f64() < 0.04 * rp.as_secs_f64(),
        "{db:?} in doorbells, {rp:?} in remote polls"
    );
    let (comparisons, switches) = c.counts();
    assert_eq!(switches, 1);
    assert!((3..=12).contains(&comparisons), "{comparisons} comparisons");
}

#[test]
fn the_chooser_keeps_doorbells_when_remote_polls_cost_more_or_about_the_same() {
    for remote in [1_500.0, 980.0] {
        let mut c = ModeChooser::new(ChooserConfig::default());
        let cost = flat(remote);
        let (db, rp) = drive(&mut c, Instant::now(), 10.0, 200_000.0, cost, 0.0);
        assert_eq!(c.chosen(), Discovery::Doorbells, "remote at {remote} ns");
        assert_eq!(c.counts().1, 0, "a choice within the margin flapped");
        assert!(
            rp.as_secs_f64() < 0.04 * db.as_secs_f64(),
            "{rp:?} probing remote polls at {remote} ns"
        );
    }
}

#[test]
fn a_tie_goes_to_remote_polls_when_they_cost_the_vm_host_nothing() {
    for (remote, want) in [
        (1_030.0, Discovery::RemotePoll),
        (900.0, Discovery::RemotePoll),
        (1_200.0, Discovery::Doorbells),
    ] {
        let mut c = ModeChooser::new(ChooserConfig::default());
        c.lean_remote(true);
        let cost = flat(remote);
        drive(&mut c, Instant::now(), 5.0, 200_000.0, cost, 0.0);
        assert_eq!(c.chosen(), want, "remote polls at {remote} ns");
    }
}

#[test]
fn the_chooser_keeps_doorbells_under_too_little_load_to_tell() {
    let mut c = ModeChooser::new(ChooserConfig::default());
    // 5,000 requests/s: 100 an epoch, under min_requests; remote polls
    // would look cheaper, but an idle queue pays for every empty poll.
    let cost = flat(100.0);
    let (_, rp) = drive(&mut c, Instant::now(), 5.0, 5_000.0, cost, 0.0);
    assert_eq!(rp, Duration::ZERO);
    assert_eq!(c.counts(), (0, 0));
}

#[test]
fn the_chooser_follows_a_change_of_load_within_its_longest_hold() {
    let mut c = ModeChooser::new(ChooserConfig::default());
    // Remote polls cheaper for 6 s, then doorbells (the load fell to
    // one request in flight, say).
    let cost = |w, t: f64| match (w, t < 6.0) {
        (Discovery::Doorbells, true) | (Discovery::RemotePoll, false) => 1_000.0,
        _ => 600.0,
    };
    let t0 = Instant::now();
    let max_hold = ChooserConfig::default().max_hold.as_secs_f64();
    let (db, rp) = drive(&mut c, t0, 6.0 + max_hold + 0.2, 300_000.0, cost, 6.0);
    assert_eq!(c.chosen(), Discovery::Doorbells);
    assert!(rp.as_secs_f64() <= max_hold + 0.1, "{rp:?} {db:?}");
    assert_eq!(c.counts().1, 2);
}

/// A sidecore with an adaptive queue (whose remote polls cost its VM host
/// nothing when `cheap`) and a doorbell queue, driven for 400 ms where
/// remote polls cost the sidecore 600 ns a request and doorbells 1,000.
fn advised(cheap: bool) -> (Sidecore, Clock, Vec<bool>, Vec<bool>) {
    advised_with(cfg(), cheap, 600)
}

/// [`advised`] with `config` and remote polls at `remote` ns a request.
fn advised_with(
    config: SidecoreConfig,
    cheap: bool,
    remote: u64,
) -> (Sidecore, Clock, Vec<bool>, Vec<bool>) {
    let mut sc = Sidecore::new(config);
    let mut clock = (Instant::now(), 0);
    let (a, sa) = fake("adaptive");
    sa.lock().unwrap().adaptive = true;
    sa.lock().unwrap().remote_cheap = cheap;
    let (b, sb) = fake("doorbell");
    sc.add(a, clock.0);
    sc.add(b, clock.0);
    feed_costs(&mut sc, &mut clock, 200, remote);
    let a = sa.lock().unwrap().advice.clone();
    let b = sb.lock().unwrap().advice.clone();
    (sc, clock, a, b)
}

/// The time and the sidecore thread's CPU clock, both fake.
type Clock = (Instant, u64);

/// `steps` of 2 ms at 1,000 requests each, costing the sidecore 600 ns a
/// request with remote polls and 1,000 with doorbells.
fn feed(sc: &mut Sidecore, clock: &mut Clock, steps: u32) {
    feed_costs(sc, clock, steps, 600);
}

/// [`feed`] with remote polls at `remote_ns` a request.
fn feed_costs(sc: &mut Sidecore, clock: &mut Clock, steps: u32, remote_ns: u64) {
    for _ in 0..steps {
        clock.0 += Duration::from_millis(2);
        let remote = sc.discovery() == Discovery::RemotePoll;
        clock.1 += 1_000 * if remote { remote_ns } else { 1_000 };
        sc.stats().requests.fetch_add(1_000, Relaxed);
        sc.observe_cpu(clock.0, clock.1);
    }
}

#[test]
fn adaptive_queues_take_the_sidecores_advice_and_others_are_left_alone() {
    let (sc, _, a, b) = advised(true);
    // Told doorbells when added, then remote polls once measured.
    assert_eq!(a.first(), Some(&false));
    assert_eq!(sc.discovery(), Discovery::RemotePoll);
    assert_eq!(a.last(), Some(&true), "{a:?}");
    // The doorbell queue was asked once, when added, and said no.
    assert_eq!(b, vec![false]);
    // The counters an operator sees follow.
    let st = sc.stats().snapshot();
    assert_eq!(st.remote_poll_advised, 1);
    assert!(
        st.discovery_comparisons >= 1 && st.discovery_switches == 1,
        "{st:?}"
    );
}

#[test]
fn a_queue_that_leaves_takes_its_fabrics_veto_with_it() {
    // Remote polls advised; a `soft` adaptive queue joins: doorbells for
    // all. It fails and is dropped in a round: measuring resumes.
    let (mut sc, mut clock, _, _) = advised(true);
    let (c, scq) = fake("soft");
    scq.lock().unwrap().adaptive = true;
    sc.add(c, clock.0);
    assert_eq!(sc.discovery(), Discovery::Doorbells);
    scq.lock().unwrap().fail = true;
    sc.round(clock.0);
    assert_eq!(sc.len(), 2);
    feed(&mut sc, &mut clock, 300);
    assert_eq!(sc.discovery(), Discovery::RemotePoll);
}

#[test]
fn a_tie_goes_to_doorbells_unless_the_configuration_says_otherwise() {
    // Remote polls 3% dearer than doorbells (a tie), where they cost the
    // VM host nothing: doorbells, one round trip a request, by default.
    let (sc, _, a, _) = advised_with(cfg(), true, 1_030);
    assert!(sc.discovery_counts().0 >= 1, "it compared");
    assert_eq!(sc.discovery(), Discovery::Doorbells);
    assert_eq!(a.last(), Some(&false), "{a:?}");
    // Asked to, the sidecore gives the tie to remote polls.
    let mut config = cfg();
    config.chooser.ties_to_remote_poll = true;
    let (sc, _, a, _) = advised_with(config, true, 1_030);
    assert_eq!(sc.discovery(), Discovery::RemotePoll);
    assert_eq!(a.last(), Some(&true), "{a:?}");
}

#[test]
fn queues_whose_remote_polls_cost_the_vm_host_cpu_keep_doorbells() {
    // Over `soft` the VM host's fabric threads serve every READ: no
    // comparison, however cheap remote polls look to the sidecore.
    let (sc, _, a, _) = advised(false);
    assert_eq!(sc.discovery(), Discovery::Doorbells);
    assert!(a.iter().all(|r| !r), "{a:?}");
    assert_eq!(sc.discovery_counts(), (0, 0));
}
