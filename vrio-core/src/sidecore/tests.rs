//! Deterministic tests of the scheduling state machine with fake queues and
//! a fake clock: no threads, no sockets.

use std::collections::VecDeque;
use std::os::fd::RawFd;
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
}

struct FakeQueue {
    name: String,
    s: Arc<Mutex<FakeState>>,
}

impl ServedQueue for FakeQueue {
    fn poll(&mut self, budget: usize) -> Result<PollOutcome, QueueFailure> {
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
        fn poll(&mut self, _budget: usize) -> Result<PollOutcome, QueueFailure> {
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
