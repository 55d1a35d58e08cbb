//! The vRIO data path end to end, in one process: synthetic guests, the
//! VM-host agent (one thread for all of them), and an I/O server with remote sidecores, over
//! the software fabric on loopback TCP.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vrio_core::blk::{BlockConfig, MemoryBackend};
use vrio_core::memory::GuestMemory;
use vrio_core::remote::{
    attach, Agent, AgentConfig, DeviceAttach, IoServer, IoServerConfig, NotifyMode, QueueAttach,
};
use vrio_core::ring::layout::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vrio_core::ring::{Descriptor, RingFeatures};
use vrio_rdma::{Backend, Domain};
use vrio_testkit::guest::{GuestConfig, SyntheticGuest, WorkloadConfig};
use vrio_testkit::runner::{run_remote, run_remote_with, ModelReport, RemoteFigures, RunConfig};

fn soft() -> Arc<dyn Domain> {
    Arc::from(vrio_rdma::open(Backend::Soft, None).unwrap())
}

/// 8 guests x 2 queues on 2 sidecores, 100,000+ mixed requests, every
/// block verified: zero lost, zero duplicated, zero corrupt.
fn exactly_once_under_load(
    mode: NotifyMode,
    fabric: Backend,
    requests_per_queue: u64,
) -> (ModelReport, RemoteFigures) {
    let rc = RunConfig {
        guests: 8,
        queues_per_guest: 2,
        workload: WorkloadConfig {
            requests: requests_per_queue,
            depth: 16,
            read_pct: 45,
            flush_pct: 5,
            blocks: 256,
            stall_timeout: Duration::from_secs(60),
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let backend = Arc::new(MemoryBackend::new(16 * 256 * 4096));
    let done = Arc::new(AtomicU64::new(0));
    let (r, fig) =
        run_remote(mode, 2, fabric, backend, BlockConfig::default(), &rc, &done).unwrap();
    let expected = 16 * requests_per_queue;
    println!(
        "{} over {fabric:?}: {} requests, {} reads {} writes {} flushes, {:.2} ops/req, {:.2} RTT/req, {} mode switches",
        r.model,
        r.io.completed,
        r.io.reads,
        r.io.writes,
        r.io.flushes,
        fig.fabric.ops_per_request(),
        fig.fabric.rtts_per_request(),
        fig.fabric.mode_switches
    );
    assert_eq!(r.io.completed, expected, "every request completes once");
    assert_eq!(r.io.lost, 0, "lost requests");
    assert_eq!(r.io.protocol_errors, 0, "duplicate or unknown completions");
    assert_eq!(r.io.corrupt, 0, "corrupt blocks");
    assert_eq!(r.io.io_errors, 0, "failed requests");
    assert!(r.io.reads > 0 && r.io.writes > 0 && r.io.flushes > 0);
    assert_eq!(
        fig.fabric.requests, expected,
        "server saw each request once"
    );
    assert_eq!(fig.fabric.bad_requests, 0);
    (r, fig)
}

#[test]
fn doorbell_mode_is_exactly_once_under_load() {
    exactly_once_under_load(NotifyMode::Doorbell, Backend::Soft, 6_250);
}

#[test]
fn remote_poll_and_adaptive_modes_are_exactly_once() {
    exactly_once_under_load(NotifyMode::RemotePoll, Backend::Soft, 1_000);
    exactly_once_under_load(NotifyMode::Adaptive, Backend::Soft, 1_000);
    // Over shm the sidecores measure both ways and advise their queues,
    // which switch mid-run (over soft they keep doorbells). They first
    // compare after a warm-up and an epoch of doorbells (70 ms), which a
    // fast machine may not need to finish the workload: it grows until
    // they have, within a bound. Every run is checked exactly-once.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut per_queue = 3_000;
    loop {
        let (_, fig) = exactly_once_under_load(NotifyMode::Adaptive, Backend::Shm, per_queue);
        if fig.fabric.mode_switches > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecores never compared (last run: {per_queue} requests per queue)"
        );
        per_queue *= 2;
    }
}

/// A send queue far smaller than a batch's work requests (32 requests in
/// flight, each a few READs and WRITEs, against 8 slots): the server posts
/// its waves in parts instead of failing the queue with "queue full".
#[test]
fn a_small_send_queue_splits_waves_instead_of_failing_the_queue() {
    let rc = RunConfig {
        guests: 2,
        queues_per_guest: 1,
        workload: WorkloadConfig {
            requests: 3_000,
            depth: 32,
            read_pct: 50,
            flush_pct: 5,
            blocks: 256,
            stall_timeout: Duration::from_secs(60),
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let server = IoServerConfig {
        sidecores: 1,
        endpoint: vrio_rdma::EndpointConfig {
            send_depth: 8,
            ..vrio_rdma::EndpointConfig::default()
        },
        ..IoServerConfig::default()
    };
    let backend = Arc::new(MemoryBackend::new(2 * 256 * 4096));
    let done = Arc::new(AtomicU64::new(0));
    let (r, fig) = run_remote_with(
        NotifyMode::Doorbell,
        Backend::Soft,
        server,
        backend,
        &rc,
        &done,
    )
    .unwrap();
    assert_eq!(r.io.completed, 6_000, "every request completes once");
    assert_eq!(
        (
            r.io.lost,
            r.io.protocol_errors,
            r.io.corrupt,
            r.io.io_errors
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(fig.fabric.requests, 6_000);
    assert_eq!(fig.fabric.bad_requests, 0);
}

/// `rc` (64 blocks per queue) on one remote sidecore over `fabric`.
fn one_sidecore(
    mode: NotifyMode,
    fabric: Backend,
    rc: &RunConfig,
) -> (
    vrio_testkit::runner::ModelReport,
    vrio_testkit::runner::RemoteFigures,
) {
    let blocks = u64::from(rc.guests) * u64::from(rc.queues_per_guest) * 64;
    let backend = Arc::new(MemoryBackend::new(blocks * 4096));
    let done = Arc::new(AtomicU64::new(0));
    run_remote(mode, 1, fabric, backend, BlockConfig::default(), rc, &done).unwrap()
}

/// Threads of this process whose name is `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end() == name)
        .count()
}

/// `guests` guests of one queue, each `requests` half reads and half
/// writes at depth `depth` over 64 blocks of its own.
fn mixed_guests(guests: u32, requests: u64, depth: u16) -> RunConfig {
    RunConfig {
        guests,
        queues_per_guest: 1,
        workload: WorkloadConfig {
            requests,
            depth,
            read_pct: 50,
            flush_pct: 0,
            blocks: 64,
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    }
}

/// Attaches queue 0 of each guest (guest `g` as device `g`) to `server`
/// through `agent`, over the soft fabric.
fn attach_all(
    agent: &Agent,
    guests: &[SyntheticGuest],
    server: &str,
    cfg: AgentConfig,
) -> Vec<vrio_core::remote::AttachedDevice> {
    guests
        .iter()
        .enumerate()
        .map(|(g, guest)| {
            let side = guest.device_side(0).unwrap();
            let dev = DeviceAttach {
                device_id: g as u64,
                mem: guest.memory().clone(),
                queues: vec![vrio_testkit::runner::queue_attach(side)],
                credential: None,
            };
            agent.attach(soft(), server, dev, cfg).unwrap()
        })
        .collect()
}

#[test]
fn one_agent_thread_serves_many_devices_and_lets_them_go_one_by_one() {
    // A VM host's agent is one thread, as its local sidecore would be: the
    // devices share its wakes. A device that detaches takes only its own
    // queues away; the thread ends with the last handle.
    let backend = Arc::new(MemoryBackend::new(3 * 64 * 4096));
    let server = IoServer::start(
        soft(),
        backend,
        IoServerConfig {
            listen: "127.0.0.1:0".into(),
            sidecores: 1,
            ..IoServerConfig::default()
        },
    )
    .unwrap();
    let rc = mixed_guests(3, 1000, 8);
    let mut guests = vrio_testkit::runner::make_guests(&rc).unwrap();
    const NAME: &str = "vrio-agent-test";
    let agent = Agent::new(NAME).unwrap();
    let devs = attach_all(&agent, &guests, server.addr(), AgentConfig::default());
    assert_eq!(threads_named(NAME), 1, "one thread for three devices");
    // Device 0 leaves before any request; the others must not notice.
    devs[0].detach();
    assert!(devs[0]
        .move_queue(0, devs[1].queues()[0].target.clone())
        .is_err());
    guests.remove(0);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = vrio_testkit::runner::drive_guests(guests, &rc, &done, &stop);
    assert_eq!(io.completed, 2 * 1000);
    assert_eq!((io.lost, io.corrupt, io.io_errors), (0, 0, 0));
    let doorbells = |d: &vrio_core::remote::AttachedDevice| {
        d.stats()
            .doorbells
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(doorbells(&devs[0]), 0);
    assert!(doorbells(&devs[1]) > 0 && doorbells(&devs[2]) > 0);
    assert!(agent.cpu_ns() > 0);
    // The devices' handles go; the agent's keeps the thread.
    drop(devs);
    assert_eq!(threads_named(NAME), 1);
    drop(agent);
    assert_eq!(
        threads_named(NAME),
        0,
        "the thread ended with its last handle"
    );
}

#[test]
fn a_server_that_does_not_answer_stalls_only_its_own_device() {
    // Two devices on one agent thread. Device 0 moves to a "server" that
    // takes the connection and never answers its ATTACH: the agent makes
    // that link off its thread, so device 1's requests go on meanwhile.
    let server = IoServer::start(
        soft(),
        Arc::new(MemoryBackend::new(2 * 64 * 4096)),
        IoServerConfig {
            listen: "127.0.0.1:0".into(),
            sidecores: 1,
            ..IoServerConfig::default()
        },
    )
    .unwrap();
    let mut mute = soft()
        .listen("127.0.0.1:0", vrio_rdma::EndpointConfig::default())
        .unwrap();
    let mute_addr = mute.local_addr();
    // Takes connections and keeps them, reading nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok(ep) = mute.accept() {
            held.push(ep);
        }
    });
    let rc = mixed_guests(2, 1_000_000, 4);
    let mut guests = vrio_testkit::runner::make_guests(&rc).unwrap();
    let agent = Agent::new("vrio-agent-mute").unwrap();
    let answer_within = Duration::from_secs(5);
    let cfg = AgentConfig {
        timeout: answer_within,
        ..AgentConfig::default()
    };
    let devs = attach_all(&agent, &guests, server.addr(), cfg);
    guests.remove(0);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|s| {
        let moving =
            s.spawn(|| devs[0].move_queue(0, vrio_core::remote::QueueTarget::any(&mute_addr)));
        let (rc2, d2, s2) = (&rc, done.clone(), stop.clone());
        let io = s.spawn(move || vrio_testkit::runner::drive_guests(guests, rc2, &d2, &s2));
        // Device 1 serves a few hundred requests while device 0's ATTACH
        // waits for its answer.
        let started = Instant::now();
        while done.load(std::sync::atomic::Ordering::Relaxed) < 300 && !moving.is_finished() {
            assert!(started.elapsed() < 4 * answer_within, "device 1 stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !moving.is_finished(),
            "device 1 served only {} requests while device 0's attach hung for {answer_within:?}",
            done.load(std::sync::atomic::Ordering::Relaxed)
        );
        // The mute server never answers: the move fails within the
        // timeout, and device 0 waits for another placement.
        let r = moving.join().unwrap();
        assert!(r.is_err(), "a move to a mute server failed: {r:?}");
        assert_eq!(
            devs[0].queues()[0].state,
            vrio_core::remote::LinkState::Orphaned
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let io = io.join().unwrap();
        assert_eq!((io.lost, io.corrupt, io.io_errors), (0, 0, 0));
    });
    // Device 0 is placed again, on the real server, and serves.
    let to = vrio_core::remote::QueueTarget::any(server.addr());
    devs[0].move_queue(0, to).unwrap();
    assert_eq!(
        devs[0].queues()[0].state,
        vrio_core::remote::LinkState::Serving
    );
}

#[test]
fn doorbell_mode_meets_the_round_trip_target() {
    // Counts, not times: a doorbell carries a request's header, and a 4 KiB
    // write's payload, inline, so 4 KiB reads and writes take one round
    // trip on the critical path (the reply wave), on both fabrics.
    for (fabric, read_pct) in [
        (Backend::Soft, 100u8),
        (Backend::Soft, 0),
        (Backend::Shm, 100),
        (Backend::Shm, 0),
    ] {
        let rc = RunConfig {
            guests: 1,
            queues_per_guest: 1,
            workload: WorkloadConfig {
                requests: 500,
                depth: 4,
                read_pct,
                flush_pct: 0,
                blocks: 64,
                ..WorkloadConfig::default()
            },
            ..RunConfig::default()
        };
        let (r, fig) = one_sidecore(NotifyMode::Doorbell, fabric, &rc);
        assert_eq!(r.io.failures(), 0);
        assert!(
            fig.fabric.rtts_per_request() <= 1.0,
            "{} RTT per request ({fabric:?}, read_pct {read_pct})",
            fig.fabric.rtts_per_request()
        );
        // Every request's header (and a write's payload) came inline.
        let inline_per_req = fig.fabric.inline_bytes as f64 / fig.fabric.requests as f64;
        let want = if read_pct == 100 { 16.0 } else { 16.0 + 4096.0 };
        assert!(
            inline_per_req >= want,
            "{inline_per_req} inline bytes per request ({fabric:?}, read_pct {read_pct})"
        );
        // At least the WRITE of each request's data or status.
        assert!(fig.fabric.ops_per_request() >= 1.0);
    }
}

#[test]
fn a_busy_remote_poll_brings_the_descriptor_table_with_the_ring() {
    // Direct chains at QD 32: the polls that find work read the table right
    // after the ring in the same wave, so chains need no fetch of their own:
    // poll, READ wave, reply wave.
    let mut rc = RunConfig::one_queue(2_000, 32, 64);
    rc.workload.indirect_pct = 0;
    rc.workload.read_pct = 100;
    let (r, fig) = one_sidecore(NotifyMode::RemotePoll, Backend::Shm, &rc);
    assert_eq!(r.io.failures(), 0);
    let f = &fig.fabric;
    // Only polls long after any work lack the table (the first ones; on a
    // loaded machine, a few after long pauses): far fewer fetches than
    // batches, where every batch used to fetch it.
    assert!(
        f.fetches * 4 <= f.batches,
        "{} descriptor fetches for {} batches",
        f.fetches,
        f.batches
    );
    assert!(
        f.rtts_per_request() <= 3.3,
        "{} RTT per request",
        f.rtts_per_request()
    );
}

#[test]
fn writes_beyond_the_inline_limit_read_their_payload_in_one_wave() {
    // 4 KiB writes with the inline limit at 512 bytes: only the header
    // comes inline, the payload is one READ wave: two round trips.
    let rc = RunConfig {
        guests: 1,
        queues_per_guest: 1,
        workload: WorkloadConfig {
            requests: 300,
            depth: 4,
            read_pct: 0,
            flush_pct: 0,
            blocks: 64,
            ..WorkloadConfig::default()
        },
        inline_max: 512,
        ..RunConfig::default()
    };
    let (r, fig) = one_sidecore(NotifyMode::Doorbell, Backend::Shm, &rc);
    assert_eq!(r.io.failures(), 0);
    let rtt = fig.fabric.rtts_per_request();
    assert!((1.9..=2.0).contains(&rtt), "{rtt} RTT per request");
    let inline_per_req = fig.fabric.inline_bytes as f64 / fig.fabric.requests as f64;
    assert!(
        inline_per_req < 100.0,
        "{inline_per_req} inline bytes per request"
    );
}

/// Writes one chain straight into the ring, bypassing the driver.
fn post_raw(
    mem: &impl GuestMemory,
    g: &GuestConfig,
    layout: &vrio_core::ring::RingLayout,
    avail: u16,
    descs: &[(u16, Descriptor)],
    head: u16,
) {
    let _ = g;
    for (i, d) in descs {
        mem.write(layout.desc_addr(*i), &d.to_bytes()).unwrap();
    }
    mem.write(layout.avail_ring(avail), &head.to_le_bytes())
        .unwrap();
    mem.store_u16(layout.avail_idx(), avail.wrapping_add(1))
        .unwrap();
}

#[test]
fn hostile_guest_cannot_hurt_the_server_or_other_guests() {
    let server_domain = soft();
    let backend = Arc::new(MemoryBackend::new(64 << 20));
    let server = IoServer::start(
        server_domain,
        backend.clone(),
        IoServerConfig {
            sidecores: 1,
            ..IoServerConfig::default()
        },
    )
    .unwrap();

    // The hostile guest, with rings but without a well-behaved driver.
    let hcfg = GuestConfig {
        id: 99,
        queues: 1,
        queue_size: 16,
        depth: 4,
        features: RingFeatures {
            indirect: true,
            event_idx: false,
        },
    };
    let hostile = SyntheticGuest::new(hcfg).unwrap();
    let side = hostile.device_side(0).unwrap();
    let layout = side.layout;
    let hmem = hostile.memory().clone();
    let hdev = attach(
        soft(),
        server.addr(),
        DeviceAttach {
            device_id: 99,
            mem: hmem.clone(),
            queues: vec![QueueAttach {
                layout: side.layout,
                features: side.features,
                kick: side.kick.try_clone().unwrap(),
                call: side.call.try_clone().unwrap(),
                start: 0,
            }],
            credential: None,
        },
        AgentConfig::default(),
    )
    .unwrap();

    // A well-behaved guest runs a verified workload at the same time.
    let rc = RunConfig {
        guests: 1,
        queues_per_guest: 1,
        workload: WorkloadConfig {
            requests: 3000,
            depth: 8,
            blocks: 128,
            first_block: 0,
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let good = vrio_testkit::runner::make_guests(&rc).unwrap();
    let gmem = good[0].memory().clone();
    let gside = good[0].device_side(0).unwrap();
    let gdev = attach(
        soft(),
        server.addr(),
        DeviceAttach {
            device_id: 1,
            mem: good[0].memory().clone(),
            queues: vec![QueueAttach {
                layout: gside.layout,
                features: gside.features,
                kick: gside.kick,
                call: gside.call,
                start: 0,
            }],
            credential: None,
        },
        AgentConfig::default(),
    )
    .unwrap();
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rc2 = rc;
    let (p2, s2) = (progress.clone(), stop.clone());
    let worker =
        std::thread::spawn(move || vrio_testkit::runner::drive_guests(good, &rc2, &p2, &s2));

    let size = vrio_core::memory::MemoryMap::of(&*hmem).unwrap().size();
    let other_host_addr = {
        use vm_memory::GuestMemoryBackend;
        // A host address of the other guest's RAM, as a hostile gpa.
        gmem.iter().next().unwrap().as_ptr() as u64
    };
    let hdr = 0x40000u64.min(size - 0x1000);
    let bad_chains: Vec<(&str, Vec<(u16, Descriptor)>)> = vec![
        (
            "outside memory",
            vec![(
                0,
                Descriptor {
                    addr: size + 0x1000,
                    len: 16,
                    flags: 0,
                    next: 0,
                },
            )],
        ),
        (
            "other guest's memory",
            vec![(
                0,
                Descriptor {
                    addr: other_host_addr,
                    len: 4096,
                    flags: 0,
                    next: 0,
                },
            )],
        ),
        (
            "addr+len overflow",
            vec![(
                0,
                Descriptor {
                    addr: u64::MAX - 8,
                    len: 64,
                    flags: 0,
                    next: 0,
                },
            )],
        ),
        (
            "huge length",
            vec![(
                0,
                Descriptor {
                    addr: 0x1000,
                    len: u32::MAX,
                    flags: 0,
                    next: 0,
                },
            )],
        ),
        (
            "loop",
            vec![
                (
                    0,
                    Descriptor {
                        addr: hdr,
                        len: 16,
                        flags: VRING_DESC_F_NEXT,
                        next: 1,
                    },
                ),
                (
                    1,
                    Descriptor {
                        addr: hdr,
                        len: 16,
                        flags: VRING_DESC_F_NEXT,
                        next: 0,
                    },
                ),
            ],
        ),
        (
            "nested indirect",
            vec![(
                0,
                Descriptor {
                    addr: hdr,
                    len: 16,
                    flags: VRING_DESC_F_INDIRECT,
                    next: 0,
                },
            )],
        ),
        (
            "readable after writable",
            vec![
                (
                    0,
                    Descriptor {
                        addr: hdr,
                        len: 1,
                        flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                        next: 1,
                    },
                ),
                (
                    1,
                    Descriptor {
                        addr: hdr,
                        len: 16,
                        flags: 0,
                        next: 0,
                    },
                ),
            ],
        ),
    ];
    // The nested-indirect case needs an indirect table that itself holds an
    // indirect descriptor.
    hmem.write(
        hdr,
        &Descriptor {
            addr: hdr,
            len: 16,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        }
        .to_bytes(),
    )
    .unwrap();
    let mut last_used = 0u16;
    for (i, (what, descs)) in bad_chains.iter().enumerate() {
        post_raw(&*hmem, &hcfg, &layout, i as u16, descs, 0);
        let _ = side.kick.write(1);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let used = hmem.load_u16(layout.used_idx()).unwrap();
            if used != last_used {
                let mut e = [0u8; 8];
                hmem.read(layout.used_ring(last_used), &mut e).unwrap();
                let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                assert_eq!(len, 0, "{what}: a bad chain completes with length 0");
                last_used = used;
                break;
            }
            assert!(Instant::now() < deadline, "{what}: no completion");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(
        server.stats().snapshot().bad_requests,
        bad_chains.len() as u64,
        "each hostile request refused"
    );
    // An avail index jump past the queue size: the queue needs a reset, the
    // server stays up.
    hmem.store_u16(layout.avail_idx(), 1000).unwrap();
    let _ = side.kick.write(1);

    let report = worker.join().unwrap();
    assert_eq!(report.completed, 3000);
    assert_eq!(report.failures(), 0, "the other guest is untouched");
    hdev.detach();
    gdev.detach();

    // The server still serves a new guest.
    let rc3 = RunConfig {
        guests: 1,
        queues_per_guest: 1,
        workload: WorkloadConfig {
            requests: 500,
            depth: 4,
            blocks: 64,
            first_block: 1024,
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let g3 = vrio_testkit::runner::make_guests(&rc3).unwrap();
    let s3 = g3[0].device_side(0).unwrap();
    let d3 = attach(
        soft(),
        server.addr(),
        DeviceAttach {
            device_id: 3,
            mem: g3[0].memory().clone(),
            queues: vec![QueueAttach {
                layout: s3.layout,
                features: s3.features,
                kick: s3.kick,
                call: s3.call,
                start: 0,
            }],
            credential: None,
        },
        AgentConfig::default(),
    )
    .unwrap();
    let r3 = vrio_testkit::runner::drive_guests(g3, &rc3, &progress, &stop);
    assert_eq!(r3.completed, 500);
    assert_eq!(r3.failures(), 0);
    d3.detach();
    server.stop();
}

#[test]
fn oversized_request_fails_with_an_error_status_not_silently() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vrio_core::ring::{DriverQueue, RingLayout, Segment};
    let server = IoServer::start(
        soft(),
        Arc::new(MemoryBackend::new(16 << 20)),
        IoServerConfig::default(),
    )
    .unwrap();
    let mem = Arc::new(vrio_core::memory::anonymous_memory(2 << 20).unwrap());
    let features = RingFeatures {
        indirect: false,
        event_idx: true,
    };
    let (layout, _) = RingLayout::packed(16, 0x1000).unwrap();
    let mut drv = DriverQueue::new(layout, features, None);
    drv.init(&*mem).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let dev = attach(
        soft(),
        server.addr(),
        DeviceAttach {
            device_id: 5,
            mem: mem.clone(),
            queues: vec![QueueAttach {
                layout,
                features,
                kick: kick.try_clone().unwrap(),
                call: call.try_clone().unwrap(),
                start: 0,
            }],
            credential: None,
        },
        AgentConfig::default(),
    )
    .unwrap();
    // A 256 KiB read: twice the server's default staging limit.
    let (hdr, data, status) = (0x10000u64, 0x20000u64, 0x1f000u64);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&0u32.to_le_bytes()); // VIRTIO_BLK_T_IN
    mem.write(hdr, &h).unwrap();
    mem.write(status, &[0xff]).unwrap();
    let head = drv
        .add(
            &*mem,
            &[Segment { addr: hdr, len: 16 }],
            &[
                Segment {
                    addr: data,
                    len: 256 << 10,
                },
                Segment {
                    addr: status,
                    len: 1,
                },
            ],
            false,
        )
        .unwrap();
    drv.publish(&*mem).unwrap();
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (id, len) = loop {
        if let Some(x) = drv.pop_used(&*mem).unwrap() {
            break x;
        }
        assert!(Instant::now() < deadline, "no completion");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(id, head);
    assert_eq!(len, 1, "only the status byte is written");
    let mut st = [0u8];
    mem.read(status, &mut st).unwrap();
    assert_eq!(st[0], 1, "VIRTIO_BLK_S_IOERR, not a silent success");
    dev.detach();
    server.stop();
}
