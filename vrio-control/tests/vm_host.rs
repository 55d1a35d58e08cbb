//! The control plane as a VMM uses it, through the library alone: an
//! embedded controller, two in-process I/O servers joined with
//! `join_as_server`, a guest's device placed with `place_devices` and
//! followed with `follow_placement`, and a move asked of the controller over
//! gRPC (as `vrio-ctl move` does) while the guest does verified I/O.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use vrio_control::client::connect;
use vrio_control::{
    embedded_controller, follow_placement, join_as_server, pb, place_devices, wait_for_servers,
    AttachedSet, ControlOpts, GlueError, QueueMoved,
};
use vrio_core::blk::{BlockConfig, MemoryBackend};
use vrio_core::remote::{
    device_key, queue_name, IoServer, IoServerConfig, LinkState, NotifyMode, QueueTarget,
};
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::runner::{attach_guests_placed, drive_guests, make_guests, RunConfig};

const TOKEN: &str = "vm-host-test-token";
/// How long any step may take on a loaded machine before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);
const DEVICE: &str = "disk0";

fn io_server(backend: &Arc<MemoryBackend>) -> Arc<IoServer> {
    let domain = Arc::from(vrio_rdma::open(vrio_rdma::Backend::Soft, None).unwrap());
    Arc::new(
        IoServer::start(
            domain,
            backend.clone(),
            IoServerConfig {
                sidecores: 2,
                blk: BlockConfig::default(),
                ..IoServerConfig::default()
            },
        )
        .unwrap(),
    )
}

/// Sets the flag when dropped, also while unwinding from a panic, so a
/// failed assertion does not leave the guests running forever.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// Asks the controller to move `queue` of [`DEVICE`], as `vrio-ctl move`
/// does.
fn request_move(ctl: &ControlOpts, queue: u32, server_id: &str, sidecore: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = connect(&ctl.addr, ctl.token.as_deref()).await.unwrap();
        c.move_queue(pb::MoveQueueRequest {
            device_id: DEVICE.into(),
            queue,
            server_id: server_id.into(),
            sidecore,
        })
        .await
        .unwrap();
    });
}

/// Waits for the follower's first report, which must be `queue` of
/// [`DEVICE`]: nothing else was asked to move.
fn next_move(moves: &mpsc::Receiver<QueueMoved>, queue: u16) -> QueueMoved {
    let m = moves
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|e| panic!("no move reported within {DEADLINE:?}: {e}"));
    assert_eq!(
        (m.device.as_str(), m.queue),
        (DEVICE, queue),
        "unexpected move {m:?}"
    );
    m
}

#[test]
fn a_vm_host_follows_a_move_asked_of_the_controller() {
    let state = tempfile::tempdir().unwrap();
    let (mut controller, addr) = embedded_controller(state.path(), TOKEN, 10_000).unwrap();
    let ctl = ControlOpts {
        addr,
        token: Some(TOKEN.into()),
        tls: None,
    };
    // Both servers on one disk, as two I/O servers in front of shared
    // storage would be.
    let backend = Arc::new(MemoryBackend::new(2 * 128 * 4096));
    let servers = [("io-1", io_server(&backend)), ("io-2", io_server(&backend))];
    let mut members: Vec<_> = servers
        .iter()
        .map(|(id, s)| join_as_server(ctl.clone(), id.to_string(), 16, s.clone()).unwrap())
        .collect();
    wait_for_servers(&ctl, 2, DEADLINE).unwrap();

    // 0 requests: the guest issues until told to stop.
    let rc = RunConfig {
        guests: 1,
        queues_per_guest: 2,
        workload: WorkloadConfig {
            requests: 0,
            depth: 8,
            blocks: 128,
            stall_timeout: DEADLINE,
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let guests = make_guests(&rc).unwrap();
    let placed = place_devices(&ctl, "vm1", "test-vm-host", &[(DEVICE.into(), 2)]).unwrap();
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].device_id, DEVICE);
    assert_eq!(placed[0].targets.len(), 2);
    let dev = attach_guests_placed(
        &guests,
        &[(device_key(DEVICE), placed[0].targets.clone())],
        vrio_rdma::Backend::Soft,
        None,
        NotifyMode::Doorbell,
    )
    .unwrap()
    .pop()
    .map(Arc::new)
    .unwrap();
    let (tx, moves) = mpsc::channel();
    let mut follower = follow_placement(
        ctl.clone(),
        Arc::new(AttachedSet(vec![(DEVICE.into(), dev.clone())])),
        move |m| {
            let _ = tx.send(m);
        },
    )
    .unwrap();

    // Queue 0 goes to sidecore 1 of the server it is not on.
    let from = &placed[0].targets[0].server;
    let (to_id, to) = servers
        .iter()
        .find(|(_, s)| s.addr() != from)
        .map(|(id, s)| (*id, s))
        .unwrap();
    let want = QueueTarget {
        server: to.addr().to_string(),
        sidecore: 1,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (moved, io) = std::thread::scope(|s| {
        let work = s.spawn(|| drive_guests(guests, &rc, &done, &stop));
        let _stop = StopOnDrop(&stop);
        request_move(&ctl, 0, to_id, 1);
        // The guest runs until the follower reports the move.
        let moved = next_move(&moves, 0);
        stop.store(true, Relaxed);
        (moved, work.join().unwrap())
    });

    assert_eq!(moved.to, want);
    assert!(!moved.is_failover(), "a live move must not fail over");
    let q0 = dev.queues().into_iter().find(|q| q.queue == 0).unwrap();
    assert_eq!(q0.target, want, "the agent's queue 0 did not move");
    assert_eq!(q0.state, LinkState::Serving);
    let name = queue_name(device_key(DEVICE), 0);
    assert!(
        to.queues().contains(&(name.clone(), 1)),
        "{to_id} does not serve {name} on sidecore 1: {:?}",
        to.queues()
    );
    assert!(io.completed > 0, "the guest did no I/O");
    assert_eq!(io.failures(), 0, "requests lost, failed or corrupt: {io:?}");

    follower.stop();
    dev.detach();
    for m in members.iter_mut() {
        m.stop();
    }
    for (_, s) in &servers {
        s.stop();
    }
    controller.stop();
}

#[test]
fn waiting_for_servers_that_never_register_says_so() {
    let state = tempfile::tempdir().unwrap();
    let (_controller, addr) = embedded_controller(state.path(), TOKEN, 10_000).unwrap();
    let ctl = ControlOpts {
        addr,
        token: Some(TOKEN.into()),
        tls: None,
    };
    match wait_for_servers(&ctl, 1, Duration::from_millis(300)) {
        Err(GlueError::ServersMissing { wanted: 1, .. }) => {}
        other => panic!("expected ServersMissing, got {other:?}"),
    }
}
