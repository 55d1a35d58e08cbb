//! Live queue moves and failover, in one process: verified synthetic guests
//! keep doing I/O while their queues move between sidecores and between two
//! I/O servers (both on one shared block store), and while a server dies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vrio_core::blk::{BlockConfig, MemoryBackend};
use vrio_core::remote::{
    AttachedDevice, IoServer, IoServerConfig, LinkState, NotifyMode, QueueTarget,
};
use vrio_rdma::{Backend, Domain};
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::runner::{attach_guests, drive_guests, make_guests, RunConfig};

fn soft() -> Arc<dyn Domain> {
    Arc::from(vrio_rdma::open(Backend::Soft, None).unwrap())
}

fn server(backend: &Arc<MemoryBackend>) -> IoServer {
    IoServer::start(
        soft(),
        backend.clone(),
        IoServerConfig {
            sidecores: 2,
            blk: BlockConfig::default(),
            ..IoServerConfig::default()
        },
    )
    .unwrap()
}

fn run_config(requests: u64) -> RunConfig {
    RunConfig {
        guests: 3,
        queues_per_guest: 2,
        workload: WorkloadConfig {
            requests,
            depth: 16,
            read_pct: 45,
            flush_pct: 5,
            blocks: 128,
            stall_timeout: Duration::from_secs(60),
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    }
}

/// Every queue of every device, with its device.
fn all_queues(devs: &[AttachedDevice]) -> Vec<(usize, u16)> {
    devs.iter()
        .enumerate()
        .flat_map(|(d, dev)| dev.queues().into_iter().map(move |q| (d, q.queue)))
        .collect()
}

/// Sets the flag when dropped, also while unwinding from a panic.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// How long a move test may drive its workload before it gives up on
/// seeing the moves it asserts: generous, for a loaded machine.
const MOVE_DEADLINE: Duration = Duration::from_secs(120);

/// Moves every queue every 100 ms, alternating agent-driven handovers
/// (to the other server, or to the other sidecore of the same one) with
/// moves a server makes between its own sidecores, while every block the
/// guests write is verified on read-back. The guests run until at least
/// `min_requests` per queue have completed *and* the asserted moves have
/// happened, so a fast machine cannot finish the work before the moves.
fn moves_lose_and_duplicate_nothing(mode: NotifyMode, min_requests: u64) {
    let backend = Arc::new(MemoryBackend::new(6 * 128 * 4096));
    let servers = [server(&backend), server(&backend)];
    // 0 requests: the guests issue until `stop`.
    let rc = run_config(0);
    let guests = make_guests(&rc).unwrap();
    let devs = attach_guests(&guests, servers[0].addr(), Backend::Soft, None, mode).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (mut agent_moves, mut server_moves, mut longest) = (0u64, 0u64, Duration::ZERO);
    let min_total = 6 * min_requests;
    let enough = |a: u64, s: u64, d: u64| a >= 6 && s >= 6 && d >= min_total;
    let started = Instant::now();
    let report = std::thread::scope(|s| {
        let work = s.spawn(|| drive_guests(guests, &rc, &done, &stop));
        // A failed assertion below must not leave the scope waiting for
        // guests that only `stop` ends.
        let _stop = StopOnDrop(&stop);
        let mut tick = 0usize;
        while !work.is_finished()
            && !enough(agent_moves, server_moves, done.load(Relaxed))
            && started.elapsed() < MOVE_DEADLINE
        {
            std::thread::sleep(Duration::from_millis(100));
            tick += 1;
            for (i, (d, q)) in all_queues(&devs).into_iter().enumerate() {
                if work.is_finished() {
                    break;
                }
                if tick % 2 == 0 {
                    // Round robin over (server, sidecore), shifted per queue.
                    let k = (tick / 2 + i) % 4;
                    let to = QueueTarget {
                        server: servers[k / 2].addr().to_string(),
                        sidecore: (k % 2) as u16,
                    };
                    let r = devs[d].move_queue(q, to).expect("live move");
                    assert!(!r.failover, "a live move must not fail over");
                    longest = longest.max(r.took);
                    agent_moves += 1;
                } else {
                    let name = format!("dev{d}.q{q}");
                    for srv in &servers {
                        if let Some((_, sc)) = srv.queues().into_iter().find(|(n, _)| *n == name) {
                            srv.move_queue(&name, 1 - sc).expect("sidecore move");
                            server_moves += 1;
                        }
                    }
                }
            }
        }
        // The moves are in (or the deadline passed): let the guests drain.
        stop.store(true, Relaxed);
        work.join().unwrap()
    });
    let served: u64 = servers.iter().map(|s| s.stats().snapshot().requests).sum();
    let handovers: u64 = servers.iter().map(|s| s.stats().snapshot().handovers).sum();
    let agent_side: u64 = devs.iter().map(|d| d.stats().moves.load(Relaxed)).sum();
    println!(
        "{}: {} requests, {agent_moves} handovers (longest {longest:?}), {server_moves} sidecore moves, served {served}",
        mode.name(),
        report.completed
    );
    assert!(
        enough(agent_moves, server_moves, report.completed),
        "after {:?}: {agent_moves} handovers, {server_moves} sidecore moves and {} \
         requests; wanted at least 6, 6 and {min_total}",
        started.elapsed(),
        report.completed
    );
    assert_eq!(report.lost, 0, "lost requests");
    assert_eq!(
        report.protocol_errors, 0,
        "duplicate or unknown completions"
    );
    assert_eq!(report.corrupt, 0, "corrupt blocks");
    assert_eq!(report.io_errors, 0, "failed requests");
    assert_eq!(
        served, report.completed,
        "a live handover serves nothing twice and drops nothing"
    );
    // Moves that went nowhere (same place) are not handovers.
    assert!(agent_side <= agent_moves && agent_side >= agent_moves / 2);
    assert_eq!(handovers, agent_side, "every handover was quiesced");
}

#[test]
fn doorbell_queues_move_every_100ms_without_loss_or_duplicates() {
    moves_lose_and_duplicate_nothing(NotifyMode::Doorbell, 3_000);
}

#[test]
fn polled_and_adaptive_queues_move_every_100ms_without_loss_or_duplicates() {
    moves_lose_and_duplicate_nothing(NotifyMode::RemotePoll, 1_500);
    moves_lose_and_duplicate_nothing(NotifyMode::Adaptive, 1_500);
}

/// A server dies mid-workload: its queues lose their link, wait in the
/// ring, and resume on the survivor at the used index; requests that were
/// in flight are served again and the workload still verifies.
#[test]
fn failover_re_serves_in_flight_requests_and_loses_nothing() {
    let backend = Arc::new(MemoryBackend::new(6 * 128 * 4096));
    let dying = server(&backend);
    let survivor = server(&backend);
    let rc = run_config(3_000);
    let guests = make_guests(&rc).unwrap();
    let devs = attach_guests(
        &guests,
        dying.addr(),
        Backend::Soft,
        None,
        NotifyMode::Doorbell,
    )
    .unwrap();
    // Each queue's used index in guest memory, to watch while orphaned.
    let used_of: Vec<_> = guests
        .iter()
        .flat_map(|g| {
            (0..usize::from(g.cfg.queues))
                .map(|q| (g.memory().clone(), g.device_side(q).unwrap().layout))
        })
        .collect();
    let published = || -> Vec<u16> {
        used_of
            .iter()
            .map(|(m, l)| vrio_core::memory::GuestMemory::load_u16(&**m, l.used_idx()).unwrap())
            .collect()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (report, recovered) = std::thread::scope(|s| {
        let work = s.spawn(|| drive_guests(guests, &rc, &done, &stop));
        while done.load(Relaxed) < 2_000 {
            assert!(!work.is_finished(), "the workload ended early");
            std::thread::sleep(Duration::from_millis(5));
        }
        let killed = Instant::now();
        dying.stop();
        // Every queue notices on its own, from its endpoint.
        let deadline = Instant::now() + Duration::from_secs(20);
        while devs
            .iter()
            .flat_map(|d| d.queues())
            .any(|q| q.state != LinkState::Orphaned)
        {
            assert!(Instant::now() < deadline, "queues did not notice");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The servers publish used entries themselves: once every link is
        // closed (fenced), nothing more is published, though the guests
        // may still be catching up with what was.
        let at_kill = published();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(published(), at_kill, "nothing is published while orphaned");
        for (d, q) in all_queues(&devs) {
            let r = devs[d]
                .move_queue(q, QueueTarget::any(survivor.addr()))
                .expect("failover");
            assert!(r.failover);
        }
        let recovered = killed.elapsed();
        (work.join().unwrap(), recovered)
    });
    let expected = 6 * 3_000;
    let survivor_served = survivor.stats().snapshot().requests;
    println!(
        "failover: {} requests, survivor served {survivor_served}, all queues back after {recovered:?}",
        report.completed
    );
    assert_eq!(report.completed, expected);
    assert_eq!(report.failures(), 0, "{report:?}");
    let failovers: u64 = devs.iter().map(|d| d.stats().failovers.load(Relaxed)).sum();
    assert_eq!(failovers, 6);
    assert!(survivor_served > 0 && survivor_served <= expected);
    for q in devs.iter().flat_map(|d| d.queues()) {
        assert_eq!(q.state, LinkState::Serving);
        assert_eq!(q.target.server, survivor.addr());
    }
}

/// Moving a queue that does not exist, or to a server that does not
/// answer, is a clear error; the queue stays usable.
#[test]
fn bad_moves_are_refused_and_the_queue_survives() {
    let backend = Arc::new(MemoryBackend::new(6 * 128 * 4096));
    let a = server(&backend);
    let b = server(&backend);
    let rc = run_config(2_000);
    let guests = make_guests(&rc).unwrap();
    let devs = attach_guests(&guests, a.addr(), Backend::Soft, None, NotifyMode::Doorbell).unwrap();
    let err = devs[0]
        .move_queue(9, QueueTarget::any(b.addr()))
        .unwrap_err();
    assert!(err.to_string().contains("no queue 9"), "{err}");
    // Nobody listens there: the queue is quiesced, then orphaned...
    let err = devs[0]
        .move_queue(0, QueueTarget::any("127.0.0.1:1"))
        .unwrap_err();
    println!("move to a dead address: {err}");
    assert_eq!(devs[0].queues()[0].state, LinkState::Orphaned);
    // ...and a later move places it again; the workload then verifies.
    devs[0].move_queue(0, QueueTarget::any(b.addr())).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let report = drive_guests(guests, &rc, &done, &stop);
    assert_eq!(report.completed, 6 * 2_000);
    assert_eq!(report.failures(), 0, "{report:?}");
}
