//! An I/O server admits each connection on its own: agents that connect and
//! never send their ATTACH (slow, stuck or hostile) hold up no other
//! guest's attach, which must finish well inside the 10 s a silent
//! connection is given.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vrio_core::blk::MemoryBackend;
use vrio_core::remote::{IoServer, IoServerConfig, NotifyMode};
use vrio_rdma::{Backend, EndpointConfig};
use vrio_testkit::runner::{attach_guests, drive_guests, make_guests, RunConfig};

#[test]
fn silent_connections_do_not_hold_up_an_attach() {
    let domain: Arc<dyn vrio_rdma::Domain> =
        Arc::from(vrio_rdma::open(Backend::Soft, None).unwrap());
    let server = IoServer::start(
        domain.clone(),
        Arc::new(MemoryBackend::new(64 << 20)),
        IoServerConfig::default(),
    )
    .unwrap();
    // Three agents connect and say nothing.
    let silent: Vec<_> = (0..3)
        .map(|_| {
            domain
                .connect(server.addr(), EndpointConfig::default())
                .unwrap()
        })
        .collect();

    let rc = RunConfig::one_queue(500, 4, 64);
    let guests = make_guests(&rc).unwrap();
    let t0 = Instant::now();
    let agents = attach_guests(
        &guests,
        server.addr(),
        Backend::Soft,
        None,
        NotifyMode::Doorbell,
    )
    .unwrap();
    let took = t0.elapsed();
    // A server that waited for the silent ones first would take 10 s each.
    assert!(
        took < Duration::from_secs(5),
        "attach took {took:?} behind {} silent connections",
        silent.len()
    );
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let io = drive_guests(guests, &rc, &progress, &stop);
    drop(agents);
    assert_eq!(io.completed, 500);
    assert_eq!(io.failures(), 0, "{io:?}");
    drop(silent);
}
