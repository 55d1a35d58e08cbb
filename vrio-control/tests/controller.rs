//! Controller rules driven with an explicit clock: restart recovery, lease
//! failover, and bad requests that must leave state untouched.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vrio_control::model::{Assignment, Device, DeviceKind, EventKind, QueueKey, Slot};
use vrio_control::placement::LeastLoaded;
use vrio_control::state::Registration;
use vrio_control::store::{FileStore, MemoryStore, Snapshot, StateStore, StoreError};
use vrio_control::{ControlError, Controller, ControllerConfig};

const TTL: u64 = 1_000;

fn cfg() -> ControllerConfig {
    ControllerConfig {
        lease_ttl_ms: TTL,
        ..ControllerConfig::default()
    }
}

fn open(store: Box<dyn StateStore>, now: u64) -> Controller {
    Controller::open(cfg(), store, Box::new(LeastLoaded::default()), now).unwrap()
}

fn reg(id: &str, cores: u32, cap: u32) -> Registration {
    Registration {
        id: id.into(),
        address: format!("10.0.0.{}:7471", id.len()),
        sidecores: cores,
        capacity: cap,
    }
}

fn dev(id: &str, queues: u32) -> Device {
    Device {
        id: id.into(),
        vm_id: format!("vm-{id}"),
        kind: DeviceKind::Blk,
        queues,
        agent_address: "10.0.1.1:7000".into(),
        pinned_server: None,
    }
}

fn key(d: &str, q: u32) -> QueueKey {
    QueueKey {
        device: d.into(),
        queue: q,
    }
}

fn slot(s: &str, c: u32) -> Slot {
    Slot {
        server: s.into(),
        sidecore: c,
    }
}

/// Everything observable, to compare before and after a rejected request.
fn observe(c: &Controller) -> (String, Vec<Device>, Vec<Assignment>) {
    (format!("{:?}", c.servers()), c.devices(), c.assignments())
}

#[test]
fn restarted_controller_recovers_every_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let before;
    {
        let c = open(Box::new(FileStore::open(dir.path()).unwrap()), 0);
        c.register_server(reg("a", 2, 8), 0).unwrap();
        c.register_server(reg("b", 2, 8), 0).unwrap();
        c.attach_device(dev("disk0", 4), 0).unwrap();
        c.attach_device(dev("disk1", 2), 0).unwrap();
        c.move_queue(&key("disk0", 0), slot("b", 1), 10).unwrap();
        c.detach_device("disk1").unwrap();
        before = c.assignments();
        assert_eq!(before.len(), 4);
        // Dropped without any shutdown step, like a crash after the last reply.
    }
    let c = open(Box::new(FileStore::open(dir.path()).unwrap()), 50_000);
    assert_eq!(c.assignments(), before);
    assert_eq!(c.devices(), vec![dev("disk0", 4)]);
    assert_eq!(c.stats().counters.moves, 1);
    // Recovered servers get a fresh lease instead of expiring at once.
    assert!(c.expire_leases(50_000 + TTL - 1).unwrap().is_empty());
    assert!(c.servers().iter().all(|(s, _)| s.alive));
}

#[test]
fn expired_lease_moves_queues_to_survivors() {
    let c = open(Box::new(MemoryStore::default()), 0);
    c.register_server(reg("a", 2, 8), 0).unwrap();
    c.register_server(reg("b", 2, 8), 0).unwrap();
    c.attach_device(dev("disk0", 4), 0).unwrap();
    let (_, mut rx) = c.subscribe();
    let on_a: Vec<QueueKey> = c
        .assignments()
        .into_iter()
        .filter(|a| a.slot.as_ref().unwrap().server == "a")
        .map(|a| a.key)
        .collect();
    assert_eq!(on_a.len(), 2);
    // b keeps renewing, a goes silent.
    c.renew_lease("b", 600).unwrap();
    assert!(c.expire_leases(TTL - 1).unwrap().is_empty());
    assert_eq!(c.expire_leases(TTL).unwrap(), vec!["a".to_string()]);
    for a in c.assignments() {
        assert_eq!(a.slot.unwrap().server, "b", "{:?}", a.key);
    }
    let mut failed_over = Vec::new();
    while let Ok(e) = rx.try_recv() {
        assert_eq!(e.kind, EventKind::Moved);
        assert_eq!(e.reason, "failover");
        assert_eq!(e.previous.unwrap().slot.unwrap().server, "a");
        failed_over.push(e.assignment.key);
    }
    assert_eq!(failed_over, on_a);
    // The dead server can neither renew nor receive queues, but may re-register.
    assert!(matches!(
        c.renew_lease("a", TTL + 1),
        Err(ControlError::FailedPrecondition(_))
    ));
    assert!(matches!(
        c.move_queue(&key("disk0", 0), slot("a", 0), TTL + 1),
        Err(ControlError::FailedPrecondition(_))
    ));
    c.register_server(reg("a", 2, 8), TTL + 2).unwrap();
    assert_eq!(c.stats().counters.failovers, 1);
}

#[test]
fn queues_without_room_wait_and_are_placed_when_a_server_registers() {
    let c = open(Box::new(MemoryStore::default()), 0);
    c.register_server(reg("a", 1, 4), 0).unwrap();
    c.attach_device(dev("disk0", 3), 0).unwrap();
    assert_eq!(c.expire_leases(TTL).unwrap(), vec!["a".to_string()]);
    assert_eq!(c.stats().unassigned_queues, 3);
    assert!(c.assignments().iter().all(|a| a.slot.is_none()));
    c.register_server(reg("b", 2, 4), TTL + 1).unwrap();
    assert_eq!(c.stats().unassigned_queues, 0);
    assert!(c
        .assignments()
        .iter()
        .all(|a| a.slot.as_ref().unwrap().server == "b"));
}

#[test]
fn drain_moves_everything_or_nothing() {
    let c = open(Box::new(MemoryStore::default()), 0);
    c.register_server(reg("a", 2, 8), 0).unwrap();
    c.register_server(reg("b", 1, 2), 0).unwrap();
    c.attach_device(dev("disk0", 6), 0).unwrap();
    // b can take at most 2 of a's queues: the drain must fail and change nothing.
    let on_a = c
        .assignments()
        .iter()
        .filter(|a| a.slot.as_ref().unwrap().server == "a")
        .count();
    assert!(on_a > 2);
    let before = observe(&c);
    assert!(matches!(
        c.drain_server("a", 1),
        Err(ControlError::FailedPrecondition(_))
    ));
    assert_eq!(observe(&c), before);
    // With room elsewhere the drain empties the server and blocks new queues on it.
    c.register_server(reg("c", 4, 16), 2).unwrap();
    let moved = c.drain_server("a", 3).unwrap();
    assert_eq!(moved.len(), on_a);
    assert!(c
        .assignments()
        .iter()
        .all(|a| a.slot.as_ref().unwrap().server != "a"));
    let placed = c.attach_device(dev("disk1", 4), 4).unwrap();
    assert!(placed
        .iter()
        .all(|a| a.slot.as_ref().unwrap().server != "a"));
}

#[test]
fn pinned_device_stays_on_its_server() {
    let c = open(Box::new(MemoryStore::default()), 0);
    c.register_server(reg("a", 2, 8), 0).unwrap();
    c.register_server(reg("b", 2, 8), 0).unwrap();
    let mut d = dev("disk0", 3);
    d.pinned_server = Some("b".into());
    let placed = c.attach_device(d, 0).unwrap();
    assert!(placed
        .iter()
        .all(|a| a.slot.as_ref().unwrap().server == "b"));
    assert!(matches!(
        c.move_queue(&key("disk0", 0), slot("a", 0), 1),
        Err(ControlError::FailedPrecondition(_))
    ));
}

/// Name, outcome, and the error it must be.
type Case = (
    &'static str,
    Result<(), ControlError>,
    fn(&ControlError) -> bool,
);

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let c = open(Box::new(MemoryStore::default()), 0);
    c.register_server(reg("a", 2, 3), 0).unwrap();
    c.register_server(reg("b", 2, 8), 0).unwrap();
    c.attach_device(dev("disk0", 4), 0).unwrap();
    c.register_server(reg("full", 1, 1), 0).unwrap();
    c.attach_device(
        Device {
            pinned_server: Some("full".into()),
            ..dev("one", 1)
        },
        0,
    )
    .unwrap();
    c.register_server(reg("gone", 1, 8), 0).unwrap();
    for s in ["a", "b", "full"] {
        c.renew_lease(s, 500).unwrap();
    }
    assert_eq!(c.expire_leases(TTL).unwrap(), vec!["gone".to_string()]);
    let before = observe(&c);

    use ControlError as E;
    let cases: Vec<Case> = vec![
        (
            "duplicate registration",
            c.register_server(reg("a", 2, 8), 1).map(drop),
            |e| matches!(e, E::AlreadyExists(_)),
        ),
        (
            "zero sidecores",
            c.register_server(reg("z", 0, 8), 1).map(drop),
            |e| matches!(e, E::InvalidArgument(_)),
        ),
        (
            "duplicate device",
            c.attach_device(dev("disk0", 1), 1).map(drop),
            |e| matches!(e, E::AlreadyExists(_)),
        ),
        (
            "zero queues",
            c.attach_device(dev("new", 0), 1).map(drop),
            |e| matches!(e, E::InvalidArgument(_)),
        ),
        (
            "no room for all queues",
            c.attach_device(dev("huge", 100), 1).map(drop),
            |e| matches!(e, E::ResourceExhausted(_)),
        ),
        (
            "pinned to unknown server",
            c.attach_device(
                Device {
                    pinned_server: Some("nope".into()),
                    ..dev("p", 1)
                },
                1,
            )
            .map(drop),
            |e| matches!(e, E::NotFound(_)),
        ),
        ("detach unknown", c.detach_device("nope"), |e| {
            matches!(e, E::NotFound(_))
        }),
        (
            "move unknown device",
            c.move_queue(&key("nope", 0), slot("b", 0), 1).map(drop),
            |e| matches!(e, E::NotFound(_)),
        ),
        (
            "move unknown queue",
            c.move_queue(&key("disk0", 9), slot("b", 0), 1).map(drop),
            |e| matches!(e, E::InvalidArgument(_)),
        ),
        (
            "move to unknown server",
            c.move_queue(&key("disk0", 0), slot("nope", 0), 1).map(drop),
            |e| matches!(e, E::NotFound(_)),
        ),
        (
            "move to unknown sidecore",
            c.move_queue(&key("disk0", 0), slot("b", 7), 1).map(drop),
            |e| matches!(e, E::InvalidArgument(_)),
        ),
        (
            "move to dead server",
            c.move_queue(&key("disk0", 0), slot("gone", 0), 1).map(drop),
            |e| matches!(e, E::FailedPrecondition(_)),
        ),
        (
            "move to full server",
            c.move_queue(&key("disk0", 0), slot("full", 0), 1).map(drop),
            |e| matches!(e, E::FailedPrecondition(_)),
        ),
        ("renew unknown", c.renew_lease("nope", 1).map(drop), |e| {
            matches!(e, E::NotFound(_))
        }),
        (
            "load for unknown sidecore (after a valid one: no partial update)",
            c.report_load(
                "a",
                &[
                    (
                        0,
                        vrio_control::model::CoreLoad {
                            busy: 0.5,
                            requests_per_sec: 10.0,
                        },
                    ),
                    (5, Default::default()),
                ],
                1,
            )
            .map(drop),
            |e| matches!(e, E::InvalidArgument(_)),
        ),
        (
            "busy above 1",
            c.report_load(
                "a",
                &[(
                    0,
                    vrio_control::model::CoreLoad {
                        busy: 1.5,
                        requests_per_sec: 0.0,
                    },
                )],
                1,
            )
            .map(drop),
            |e| matches!(e, E::InvalidArgument(_)),
        ),
        ("drain unknown", c.drain_server("nope", 1).map(drop), |e| {
            matches!(e, E::NotFound(_))
        }),
        ("drain dead", c.drain_server("gone", 1).map(drop), |e| {
            matches!(e, E::FailedPrecondition(_))
        }),
    ];
    for (name, got, ok) in cases {
        let err = got.expect_err(name);
        assert!(ok(&err), "{name}: unexpected error {err:?}");
        assert_eq!(observe(&c), before, "{name} changed state");
    }
}

/// A store whose saves fail on demand.
#[derive(Default)]
struct FlakyStore {
    fail: Arc<AtomicBool>,
    inner: MemoryStore,
}

impl StateStore for FlakyStore {
    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load()
    }
    fn save(&self, s: &Snapshot) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Other("disk on fire".into()));
        }
        self.inner.save(s)
    }
}

#[test]
fn failed_save_leaves_state_and_watchers_untouched() {
    let fail = Arc::new(AtomicBool::new(false));
    let c = open(
        Box::new(FlakyStore {
            fail: fail.clone(),
            inner: MemoryStore::default(),
        }),
        0,
    );
    c.register_server(reg("a", 2, 8), 0).unwrap();
    c.register_server(reg("b", 2, 8), 0).unwrap();
    c.attach_device(dev("disk0", 2), 0).unwrap();
    let before = observe(&c);
    let (_, mut rx) = c.subscribe();
    fail.store(true, Ordering::SeqCst);
    let target = if c.assignments()[0].slot.as_ref().unwrap().server == "a" {
        "b"
    } else {
        "a"
    };
    assert!(matches!(
        c.move_queue(&key("disk0", 0), slot(target, 1), 1),
        Err(ControlError::Store(_))
    ));
    assert!(matches!(
        c.attach_device(dev("disk1", 1), 1),
        Err(ControlError::Store(_))
    ));
    assert_eq!(observe(&c), before);
    assert!(
        rx.try_recv().is_err(),
        "an uncommitted change was announced"
    );
    fail.store(false, Ordering::SeqCst);
    c.move_queue(&key("disk0", 0), slot(target, 1), 2).unwrap();
    assert_eq!(rx.try_recv().unwrap().kind, EventKind::Moved);
}

#[test]
fn rebalance_uses_reported_load_and_then_settles() {
    let c = open(Box::new(MemoryStore::default()), 0);
    c.register_server(reg("a", 1, 16), 0).unwrap();
    c.attach_device(dev("disk0", 4), 0).unwrap();
    c.register_server(reg("b", 1, 16), 0).unwrap();
    let hot = vrio_control::model::CoreLoad {
        busy: 0.9,
        requests_per_sec: 90_000.0,
    };
    let now = 60_000;
    for s in ["a", "b"] {
        c.renew_lease(s, now).unwrap();
    }
    c.report_load("a", &[(0, hot)], now).unwrap();
    let moved = c.rebalance(now).unwrap();
    // 0.9 over 4 queues: two move, leaving 0.45 + 2 queues on each side.
    assert_eq!(moved.len(), 2);
    assert!(moved.iter().all(|a| a.slot.as_ref().unwrap().server == "b"));
    // Same reports again: the moved queues are cooling down, nothing flaps back.
    assert!(c.rebalance(now + 1).unwrap().is_empty());
    assert_eq!(c.stats().counters.rebalance_moves, moved.len() as u64);
}

/// A live migration moves a device's guest to another VM host: the
/// controller records the new owner (across a restart), keeps every
/// assignment as it was, and refuses an unknown device or an empty owner
/// without changing anything.
#[test]
fn a_claimed_device_changes_vm_host_and_keeps_its_placement() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = open(Box::new(FileStore::open(dir.path()).unwrap()), 0);
        c.register_server(reg("a", 2, 8), 0).unwrap();
        c.attach_device(dev("disk0", 2), 0).unwrap();
        let placed = c.assignments();
        let before = c.claim_device("disk0", "10.0.1.2:7000", "").unwrap();
        assert_eq!(
            before,
            ("10.0.1.1:7000".to_string(), "vm-disk0".to_string())
        );
        let d = c.devices().into_iter().find(|d| d.id == "disk0").unwrap();
        assert_eq!(
            (d.agent_address.as_str(), d.vm_id.as_str()),
            ("10.0.1.2:7000", "vm-disk0")
        );
        assert_eq!(c.assignments(), placed, "placement unchanged");
        // Claiming again is a no-op that reports the current owner.
        let again = c.claim_device("disk0", "10.0.1.2:7000", "").unwrap();
        assert_eq!(again.0, "10.0.1.2:7000");
        let seen = observe(&c);
        assert!(matches!(
            c.claim_device("nope", "h", ""),
            Err(ControlError::NotFound(_))
        ));
        assert!(matches!(
            c.claim_device("disk0", "", "vm"),
            Err(ControlError::InvalidArgument(_))
        ));
        assert_eq!(observe(&c), seen);
    }
    let c = open(Box::new(FileStore::open(dir.path()).unwrap()), 10);
    let d = c.devices().into_iter().find(|d| d.id == "disk0").unwrap();
    assert_eq!(
        d.agent_address, "10.0.1.2:7000",
        "the claim survives a restart"
    );
}
