//! CPU by role from per-thread clocks: every role of a run is measured
//! (guests, device side, VM-host agents and fabric threads, the I/O
//! server's fabric threads), and the roles, being disjoint sets of threads
//! of this process, add up to no more than the process's CPU time.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use vrio_core::blk::{BlockConfig, MemoryBackend};
use vrio_core::remote::NotifyMode;
use vrio_core::sidecore::SidecoreConfig;
use vrio_rdma::Backend;
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::net::{run_net_remote, NetRunConfig};
use vrio_testkit::runner::{listen_addr_for, run_local, run_remote, LocalModel, RunConfig};

/// Slack for CPU counted from slightly different starts (the device side
/// counts from its spawn, the process clock from the run's start).
const SLACK_NS: u64 = 100_000_000;

fn rc() -> RunConfig {
    RunConfig {
        guests: 2,
        workload: WorkloadConfig {
            requests: 1_000,
            depth: 4,
            blocks: 64,
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    }
}

#[test]
fn a_local_run_measures_its_guests_and_device_side() {
    let model = LocalModel::Sidecore {
        cores: 1,
        cfg: SidecoreConfig::default(),
    };
    let backend = Arc::new(MemoryBackend::new(2 * 64 * 4096));
    let done = Arc::new(AtomicU64::new(0));
    let r = run_local(model, backend, BlockConfig::default(), &rc(), &done).unwrap();
    assert_eq!(r.io.failures(), 0);
    let c = &r.cost;
    assert!(c.guest_cpu_ns > 0 && c.device_cpu_ns > 0, "{c:?}");
    assert_eq!(c.guest_cpu_ns, r.io.cpu_ns);
    assert!(
        c.guest_cpu_ns + c.device_cpu_ns <= c.process_cpu_ns + SLACK_NS,
        "{c:?}"
    );
}

#[test]
fn a_remote_blk_run_measures_every_role() {
    let backend = Arc::new(MemoryBackend::new(2 * 64 * 4096));
    let done = Arc::new(AtomicU64::new(0));
    let (r, f) = run_remote(
        NotifyMode::Doorbell,
        1,
        Backend::Soft,
        backend,
        BlockConfig::default(),
        &rc(),
        &done,
    )
    .unwrap();
    assert_eq!(r.io.failures(), 0);
    let c = &r.cost;
    println!(
        "per request: sidecore {} ns, agents {} ns, VM-host fabric {} ns, server fabric {} ns, guests {} ns",
        c.device_cpu_ns / r.io.completed,
        f.vmhost_cpu_ns / r.io.completed,
        f.vmhost_fabric_cpu_ns / r.io.completed,
        f.server_fabric_cpu_ns / r.io.completed,
        c.guest_cpu_ns / r.io.completed,
    );
    // `soft` runs the "NIC" as threads on both sides.
    for (role, ns) in [
        ("sidecore", c.device_cpu_ns),
        ("agents", f.vmhost_cpu_ns),
        ("VM-host fabric", f.vmhost_fabric_cpu_ns),
        ("server fabric", f.server_fabric_cpu_ns),
        ("guests", c.guest_cpu_ns),
    ] {
        assert!(ns > 0, "{role}: no CPU measured");
    }
    let roles = c.device_cpu_ns
        + f.vmhost_cpu_ns
        + f.vmhost_fabric_cpu_ns
        + f.server_fabric_cpu_ns
        + c.guest_cpu_ns;
    assert!(
        roles <= c.process_cpu_ns + SLACK_NS,
        "roles {roles} ns > process {} ns",
        c.process_cpu_ns
    );
}

#[test]
fn a_remote_net_run_measures_every_role() {
    let rc = NetRunConfig {
        guests: 2,
        frames: 2_000,
        window: 64,
        ..NetRunConfig::default()
    };
    let done = Arc::new(AtomicU64::new(0));
    let (r, f) = run_net_remote(NotifyMode::Doorbell, 1, Backend::Soft, &rc, &done).unwrap();
    assert_eq!(r.failures(), 0);
    assert!(r.cost.guest_cpu_ns > 0, "{:?}", r.cost);
    assert!(f.vmhost_cpu_ns > 0 && f.vmhost_fabric_cpu_ns > 0 && f.server_fabric_cpu_ns > 0);
}

#[test]
fn socket_and_verbs_servers_listen_on_loopback_tcp() {
    assert_eq!(listen_addr_for(Backend::Soft), "127.0.0.1:0");
    assert_eq!(listen_addr_for(Backend::Verbs), "127.0.0.1:0");
}
