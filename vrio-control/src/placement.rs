//! Queue placement: a pluggable [`PlacementPolicy`] over a plain [`ClusterView`],
//! and the default [`LeastLoaded`] policy. Everything here is pure and
//! deterministic (ties break by server id, then sidecore), so it is unit-tested
//! without a clock or a network.

use crate::model::{Assignment, QueueKey, Server, Slot};
use std::collections::{BTreeMap, BTreeSet};

/// One sidecore as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct CoreView {
    /// Reported busy fraction, 0.0 to 1.0.
    pub busy: f64,
    /// Reported requests per second.
    pub requests_per_sec: f64,
    /// Queues assigned to it now.
    pub queues: u32,
}

/// One server as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerView {
    /// The server id.
    pub id: String,
    /// Most queues it accepts.
    pub capacity: u32,
    /// Queues assigned to it now.
    pub assigned: u32,
    /// Alive and not draining.
    pub eligible: bool,
    /// One entry per sidecore, by index.
    pub cores: Vec<CoreView>,
}

impl ServerView {
    /// Eligible and below capacity: may take one more queue.
    pub fn has_room(&self) -> bool {
        self.eligible && self.assigned < self.capacity
    }
}

/// One queue as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueView {
    /// The queue.
    pub key: QueueKey,
    /// Where it runs now, if anywhere.
    pub slot: Option<Slot>,
    /// The server its device is pinned to, if any.
    pub pinned: Option<String>,
    /// When it last changed slot, in ms on the controller's clock.
    pub last_moved_ms: u64,
}

/// A snapshot of the cluster for one placement decision.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterView {
    /// Sorted by id.
    pub servers: Vec<ServerView>,
    /// Sorted by key.
    pub queues: Vec<QueueView>,
    /// The controller's clock at the decision, in ms.
    pub now_ms: u64,
}

/// A rebalance step: move `key` from one slot to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The queue to move.
    pub key: QueueKey,
    /// Where it runs now.
    pub from: Slot,
    /// Where it should go.
    pub to: Slot,
}

impl ClusterView {
    /// Builds a view; `pins` maps device id to its pinned server.
    pub fn build<'a>(
        servers: impl IntoIterator<Item = &'a Server>,
        assignments: impl IntoIterator<Item = &'a Assignment>,
        pins: &BTreeMap<String, String>,
        now_ms: u64,
    ) -> Self {
        let mut servers: Vec<ServerView> = servers
            .into_iter()
            .map(|s| ServerView {
                id: s.id.clone(),
                capacity: s.capacity,
                assigned: 0,
                eligible: s.eligible(),
                cores: (0..s.sidecores as usize)
                    .map(|i| {
                        let l = s.load.get(i).copied().unwrap_or_default();
                        CoreView {
                            busy: l.busy,
                            requests_per_sec: l.requests_per_sec,
                            queues: 0,
                        }
                    })
                    .collect(),
            })
            .collect();
        servers.sort_by(|a, b| a.id.cmp(&b.id));
        let mut view = ClusterView {
            servers,
            queues: Vec::new(),
            now_ms,
        };
        for a in assignments {
            if let Some(slot) = &a.slot {
                view.count(slot, 1);
            }
            view.queues.push(QueueView {
                key: a.key.clone(),
                slot: a.slot.clone(),
                pinned: pins.get(&a.key.device).cloned(),
                last_moved_ms: a.last_moved_ms,
            });
        }
        view.queues.sort_by(|a, b| a.key.cmp(&b.key));
        view
    }

    /// The server with this id, if known.
    pub fn server(&self, id: &str) -> Option<&ServerView> {
        self.servers.iter().find(|s| s.id == id)
    }

    fn count(&mut self, slot: &Slot, delta: i64) {
        if let Some(s) = self.servers.iter_mut().find(|s| s.id == slot.server) {
            s.assigned = (i64::from(s.assigned) + delta).max(0) as u32;
            if let Some(c) = s.cores.get_mut(slot.sidecore as usize) {
                c.queues = (i64::from(c.queues) + delta).max(0) as u32;
            }
        }
    }

    /// Records that `key` now sits in `to` (or nowhere), so the next decision
    /// in the same batch sees it.
    pub fn apply(&mut self, key: &QueueKey, to: Option<Slot>) {
        let Some(i) = self.queues.iter().position(|q| &q.key == key) else {
            return;
        };
        if let Some(old) = self.queues[i].slot.take() {
            self.count(&old, -1);
        }
        if let Some(new) = &to {
            self.count(new, 1);
        }
        self.queues[i].slot = to;
        self.queues[i].last_moved_ms = self.now_ms;
    }

    /// Adds a queue that is not placed yet (for attach).
    pub fn add_queue(&mut self, key: QueueKey, pinned: Option<String>) {
        if self.queues.iter().all(|q| q.key != key) {
            self.queues.push(QueueView {
                key,
                slot: None,
                pinned,
                last_moved_ms: 0,
            });
        }
    }
}

/// Decides where queues go. Implement this to plug in another policy.
pub trait PlacementPolicy: Send + Sync + std::fmt::Debug {
    /// A slot for `key`, or None when no eligible server has room. `pin`
    /// restricts the choice to one server.
    fn place(&self, view: &ClusterView, key: &QueueKey, pin: Option<&str>) -> Option<Slot>;

    /// Moves that even out load. Returns nothing when the imbalance is within
    /// the policy's hysteresis, so calling it periodically is cheap and stable.
    fn rebalance(&self, view: &ClusterView) -> Vec<Move>;
}

/// Least-loaded sidecore wins.
///
/// A sidecore's score is its reported busy fraction plus `queue_weight` per
/// queue on it (so queues placed since the last report count, and idle cores
/// spread queues evenly). Requests/s breaks ties.
#[derive(Clone, Debug)]
pub struct LeastLoaded {
    /// Score added per queue on a sidecore (in units of busy fraction).
    pub queue_weight: f64,
    /// Rebalance only when the busiest and idlest sidecores' scores differ
    /// by more.
    pub threshold: f64,
    /// A queue is not moved again by rebalance within this time, in ms.
    pub cooldown_ms: u64,
    /// Upper bound on moves per rebalance round.
    pub max_moves: usize,
}

impl Default for LeastLoaded {
    fn default() -> Self {
        LeastLoaded {
            queue_weight: 0.05,
            threshold: 0.2,
            cooldown_ms: 10_000,
            max_moves: 8,
        }
    }
}

impl LeastLoaded {
    fn score(&self, c: &CoreView) -> f64 {
        c.busy + self.queue_weight * f64::from(c.queues)
    }

    /// (score, rps, server, core) ordering: lower is better, fully deterministic.
    fn better(&self, a: (&ServerView, usize), b: (&ServerView, usize)) -> bool {
        let (ca, cb) = (&a.0.cores[a.1], &b.0.cores[b.1]);
        let (sa, sb) = (self.score(ca), self.score(cb));
        if sa != sb {
            return sa < sb;
        }
        if ca.requests_per_sec != cb.requests_per_sec {
            return ca.requests_per_sec < cb.requests_per_sec;
        }
        (&a.0.id, a.1) < (&b.0.id, b.1)
    }
}

impl PlacementPolicy for LeastLoaded {
    fn place(&self, view: &ClusterView, _key: &QueueKey, pin: Option<&str>) -> Option<Slot> {
        let mut best: Option<(&ServerView, usize)> = None;
        for s in &view.servers {
            if !s.has_room() || pin.is_some_and(|p| p != s.id) {
                continue;
            }
            for i in 0..s.cores.len() {
                if best.is_none_or(|b| self.better((s, i), b)) {
                    best = Some((s, i));
                }
            }
        }
        best.map(|(s, i)| Slot {
            server: s.id.clone(),
            sidecore: i as u32,
        })
    }

    fn rebalance(&self, view: &ClusterView) -> Vec<Move> {
        let mut view = view.clone();
        let mut moved: BTreeSet<QueueKey> = BTreeSet::new();
        let mut out = Vec::new();
        while out.len() < self.max_moves {
            // Busiest and idlest eligible sidecores; the target needs room
            // unless it is on the same server.
            let mut hi: Option<(&ServerView, usize)> = None;
            for s in view.servers.iter().filter(|s| s.eligible) {
                for i in 0..s.cores.len() {
                    if hi.is_none_or(|h| self.better(h, (s, i))) {
                        hi = Some((s, i));
                    }
                }
            }
            let Some((hs, hc)) = hi else { break };
            let mut lo: Option<(&ServerView, usize)> = None;
            for s in view.servers.iter().filter(|s| s.eligible) {
                if s.id != hs.id && !s.has_room() {
                    continue;
                }
                for i in 0..s.cores.len() {
                    if lo.is_none_or(|l| self.better((s, i), l)) {
                        lo = Some((s, i));
                    }
                }
            }
            let Some((ls, lc)) = lo else { break };
            let (hcore, lcore) = (&hs.cores[hc], &ls.cores[lc]);
            let gap = self.score(hcore) - self.score(lcore);
            if gap <= self.threshold || hcore.queues == 0 {
                break;
            }
            // Moving a queue shifts its share of the source's load; if that
            // share is not below the gap the move would only flip the imbalance.
            let share = hcore.busy / f64::from(hcore.queues) + self.queue_weight;
            if share >= gap {
                break;
            }
            let from = Slot {
                server: hs.id.clone(),
                sidecore: hc as u32,
            };
            let to = Slot {
                server: ls.id.clone(),
                sidecore: lc as u32,
            };
            let candidate = view.queues.iter().find(|q| {
                q.slot.as_ref() == Some(&from)
                    && !moved.contains(&q.key)
                    && q.pinned.as_ref().is_none_or(|p| *p == to.server)
                    && view.now_ms.saturating_sub(q.last_moved_ms) >= self.cooldown_ms
            });
            let Some(q) = candidate else { break };
            let key = q.key.clone();
            let busy_share = hcore.busy / f64::from(hcore.queues);
            view.apply(&key, Some(to.clone()));
            // Carry the estimated busy share along so the next step sees it.
            if let Some(c) = view
                .servers
                .iter_mut()
                .find(|s| s.id == from.server)
                .and_then(|s| s.cores.get_mut(from.sidecore as usize))
            {
                c.busy = (c.busy - busy_share).max(0.0);
            }
            if let Some(c) = view
                .servers
                .iter_mut()
                .find(|s| s.id == to.server)
                .and_then(|s| s.cores.get_mut(to.sidecore as usize))
            {
                c.busy += busy_share;
            }
            moved.insert(key.clone());
            out.push(Move { key, from, to });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CoreLoad;

    fn server(id: &str, cores: u32, cap: u32, busy: &[f64]) -> Server {
        Server {
            id: id.into(),
            address: format!("{id}:1"),
            sidecores: cores,
            capacity: cap,
            load: busy
                .iter()
                .map(|&b| CoreLoad {
                    busy: b,
                    requests_per_sec: b * 1000.0,
                })
                .collect(),
            lease_expires_ms: u64::MAX,
            alive: true,
            draining: false,
        }
    }

    fn key(d: &str, q: u32) -> QueueKey {
        QueueKey {
            device: d.into(),
            queue: q,
        }
    }

    fn at(d: &str, q: u32, s: &str, c: u32, moved: u64) -> Assignment {
        Assignment {
            key: key(d, q),
            slot: Some(Slot {
                server: s.into(),
                sidecore: c,
            }),
            generation: 1,
            last_moved_ms: moved,
        }
    }

    fn slot(s: &str, c: u32) -> Slot {
        Slot {
            server: s.into(),
            sidecore: c,
        }
    }

    #[test]
    fn places_on_least_busy_sidecore() {
        let servers = [
            server("a", 2, 8, &[0.9, 0.5]),
            server("b", 2, 8, &[0.3, 0.7]),
        ];
        let view = ClusterView::build(&servers, &[], &BTreeMap::new(), 0);
        let p = LeastLoaded::default();
        assert_eq!(p.place(&view, &key("d", 0), None), Some(slot("b", 0)));
    }

    #[test]
    fn spreads_queues_over_idle_sidecores() {
        let servers = [server("a", 2, 8, &[]), server("b", 2, 8, &[])];
        let mut view = ClusterView::build(&servers, &[], &BTreeMap::new(), 0);
        let p = LeastLoaded::default();
        let mut got = Vec::new();
        for q in 0..4 {
            view.add_queue(key("d", q), None);
            let s = p.place(&view, &key("d", q), None).unwrap();
            view.apply(&key("d", q), Some(s.clone()));
            got.push(s);
        }
        got.sort();
        assert_eq!(
            got,
            vec![slot("a", 0), slot("a", 1), slot("b", 0), slot("b", 1)]
        );
    }

    #[test]
    fn respects_capacity_liveness_and_draining() {
        let mut dead = server("a", 1, 8, &[0.0]);
        dead.alive = false;
        let mut draining = server("b", 1, 8, &[0.0]);
        draining.draining = true;
        let full = server("c", 1, 1, &[0.0]);
        let busy = server("d", 1, 8, &[0.99]);
        let servers = [dead, draining, full, busy];
        let existing = [at("x", 0, "c", 0, 0)];
        let view = ClusterView::build(&servers, &existing, &BTreeMap::new(), 0);
        let p = LeastLoaded::default();
        assert_eq!(p.place(&view, &key("d", 0), None), Some(slot("d", 0)));
    }

    #[test]
    fn no_room_gives_none() {
        let servers = [server("a", 1, 1, &[0.0])];
        let existing = [at("x", 0, "a", 0, 0)];
        let view = ClusterView::build(&servers, &existing, &BTreeMap::new(), 0);
        assert_eq!(
            LeastLoaded::default().place(&view, &key("d", 0), None),
            None
        );
    }

    #[test]
    fn pinning_restricts_to_one_server() {
        let servers = [server("a", 1, 8, &[0.0]), server("b", 2, 8, &[0.8, 0.6])];
        let view = ClusterView::build(&servers, &[], &BTreeMap::new(), 0);
        let p = LeastLoaded::default();
        assert_eq!(p.place(&view, &key("d", 0), Some("b")), Some(slot("b", 1)));
        assert_eq!(p.place(&view, &key("d", 0), Some("nope")), None);
    }

    #[test]
    fn rebalance_moves_from_hot_to_cold() {
        let servers = [server("a", 1, 8, &[0.9]), server("b", 1, 8, &[0.1])];
        let existing = [
            at("d", 0, "a", 0, 0),
            at("d", 1, "a", 0, 0),
            at("d", 2, "a", 0, 0),
            at("e", 0, "b", 0, 0),
        ];
        let view = ClusterView::build(&servers, &existing, &BTreeMap::new(), 100_000);
        let moves = LeastLoaded::default().rebalance(&view);
        assert_eq!(
            moves,
            vec![Move {
                key: key("d", 0),
                from: slot("a", 0),
                to: slot("b", 0)
            }]
        );
    }

    #[test]
    fn rebalance_hysteresis_leaves_small_imbalance() {
        let servers = [server("a", 1, 8, &[0.5]), server("b", 1, 8, &[0.4])];
        let existing = [at("d", 0, "a", 0, 0), at("e", 0, "b", 0, 0)];
        let view = ClusterView::build(&servers, &existing, &BTreeMap::new(), 100_000);
        assert!(LeastLoaded::default().rebalance(&view).is_empty());
    }

    #[test]
    fn rebalance_never_flips_a_single_hot_queue() {
        // One queue makes all the load: moving it would just move the hot spot.
        let servers = [server("a", 1, 8, &[0.9]), server("b", 1, 8, &[0.0])];
        let existing = [at("d", 0, "a", 0, 0)];
        let view = ClusterView::build(&servers, &existing, &BTreeMap::new(), 100_000);
        assert!(LeastLoaded::default().rebalance(&view).is_empty());
    }

    #[test]
    fn rebalance_respects_cooldown_and_pins() {
        let servers = [server("a", 1, 8, &[0.9]), server("b", 1, 8, &[0.0])];
        let existing = [
            at("d", 0, "a", 0, 95_000),
            at("p", 0, "a", 0, 0),
            at("p", 1, "a", 0, 0),
        ];
        let pins = BTreeMap::from([("p".to_string(), "a".to_string())]);
        let view = ClusterView::build(&servers, &existing, &pins, 100_000);
        // d/0 moved 5 s ago (cool-down 10 s), p is pinned to a: nothing moves.
        assert!(LeastLoaded::default().rebalance(&view).is_empty());
        let later = ClusterView::build(&servers, &existing, &pins, 105_000);
        let moves = LeastLoaded::default().rebalance(&later);
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].key, key("d", 0));
    }

    #[test]
    fn rebalance_converges_and_is_stable() {
        let servers = [
            server("a", 2, 16, &[0.8, 0.8]),
            server("b", 2, 16, &[0.0, 0.0]),
        ];
        let mut existing = Vec::new();
        for q in 0..8 {
            existing.push(at("d", q, "a", q % 2, 0));
        }
        let view = ClusterView::build(&servers, &existing, &BTreeMap::new(), 100_000);
        let p = LeastLoaded::default();
        let moves = p.rebalance(&view);
        assert!(!moves.is_empty());
        // Apply the moves with the same load model and check a second round is a no-op.
        let mut after = view.clone();
        for m in &moves {
            after.apply(&m.key, Some(m.to.clone()));
        }
        let share = 0.8 / 4.0;
        for s in &mut after.servers {
            for c in &mut s.cores {
                c.busy = share * f64::from(c.queues);
            }
        }
        let scores: Vec<f64> = after
            .servers
            .iter()
            .flat_map(|s| s.cores.iter().map(|c| p.score(c)))
            .collect();
        let spread = scores.iter().cloned().fold(f64::MIN, f64::max)
            - scores.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread <= p.threshold, "spread {spread} scores {scores:?}");
        assert!(p.rebalance(&after).is_empty());
    }
}
