//! Data-plane tenancy: an I/O server with keys admits only attaches whose
//! credential it can verify, and a blk device reaches only the volume its
//! credential names, in the mode it names. Each hostile attempt runs next to
//! a legitimate, verified workload that must end with zero errors.

use std::io::IoSliceMut;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vrio_core::blk::{BlockBackend, MemoryBackend};
use vrio_core::remote::{IoServer, IoServerConfig};
use vrio_core::tenancy::{AccessMode, Capability, Keyring, VolumeSet};

mod common;

use common::legit::{assert_clean, endless, rc, run, run_until, soft, Legit, BLOCK, BLOCKS};

/// A server with keys over `volumes`.
fn server(keys: &Arc<Keyring>, volumes: Arc<VolumeSet>) -> IoServer {
    IoServer::start(
        soft(),
        Arc::new(MemoryBackend::new(1 << 20)),
        IoServerConfig {
            keys: Some(keys.clone()),
            volumes,
            ..IoServerConfig::default()
        },
    )
    .unwrap()
}

/// Waits (at most 30 s, for a loaded machine) until `cond` holds.
fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn cap(device: u64, volume: &str, mode: AccessMode) -> Capability {
    Capability {
        device,
        volume: volume.into(),
        mode,
        host: String::new(),
        expires: now() + 600,
    }
}

/// Attaches one scratch guest as `device` with `credential`; the error.
fn hostile_attach(addr: &str, device: u64, credential: Option<String>) -> String {
    let creds: Vec<String> = credential.into_iter().collect();
    match run(addr, &rc(1, 0), &[device], &creds) {
        Ok(_) => panic!("device {device:#x} was attached"),
        Err(e) => e,
    }
}

#[test]
fn attaches_without_a_valid_credential_are_refused_and_counted_next_to_a_clean_guest() {
    let keys = Arc::new(Keyring::ephemeral().unwrap());
    let volumes = Arc::new(VolumeSet::new());
    volumes.add_memory("vol-a", BLOCKS * BLOCK).unwrap();
    let s = server(&keys, volumes);
    let addr = s.addr().to_string();
    let good = keys.sign(&cap(1, "vol-a", AccessMode::ReadWrite)).unwrap();
    let l = Legit::default();
    let legit = {
        let (addr, good, l) = (addr.clone(), good.clone(), l.clone());
        std::thread::spawn(move || run_until(&addr, &endless(1), &[1], &[good], &l))
    };

    let forger = Keyring::ephemeral().unwrap();
    let expired = Capability {
        expires: now() - 5,
        ..cap(2, "vol-a", AccessMode::ReadOnly)
    };
    let elsewhere = Capability {
        host: "192.0.2.7".into(),
        ..cap(2, "vol-a", AccessMode::ReadOnly)
    };
    let attempts: Vec<(&str, u64, Option<String>)> = vec![
        ("none", 2, None),
        ("garbage", 2, Some("not-a-credential".into())),
        (
            "forged",
            2,
            Some(
                forger
                    .sign(&cap(2, "vol-a", AccessMode::ReadWrite))
                    .unwrap(),
            ),
        ),
        ("expired", 2, Some(keys.sign(&expired).unwrap())),
        // The legitimate device's own credential, presented by another.
        ("stolen", 2, Some(good.clone())),
        ("other host", 2, Some(keys.sign(&elsewhere).unwrap())),
    ];
    for (what, device, credential) in &attempts {
        let e = hostile_attach(&addr, *device, credential.clone());
        assert!(
            e.contains("no valid credential") && e.contains("status 2"),
            "{what}: {e}"
        );
    }
    assert_eq!(
        s.refusals().unauthenticated.load(Relaxed),
        attempts.len() as u64
    );
    assert_eq!(s.refusals().forbidden.load(Relaxed), 0);

    l.finish_after(1000);
    let r = legit
        .join()
        .unwrap()
        .expect("the legitimate guest attaches");
    assert_clean(&r);
    s.stop();
}

/// Bytes of `backend` at block `b`.
fn block(backend: &MemoryBackend, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    backend
        .read_vectored_at(b * BLOCK, &mut [IoSliceMut::new(&mut v)])
        .unwrap();
    v
}

#[test]
fn a_device_reaches_only_the_volume_it_was_granted_and_writers_exclude_each_other() {
    let keys = Arc::new(Keyring::ephemeral().unwrap());
    let volumes = Arc::new(VolumeSet::new());
    // Two guests' worth of blocks each: guest g uses blocks g*64..(g+1)*64.
    let size = 2 * BLOCKS * BLOCK;
    let (a, b) = (
        Arc::new(MemoryBackend::new(size)),
        Arc::new(MemoryBackend::new(size)),
    );
    volumes.insert("vol-a", a.clone()).unwrap();
    volumes.insert("vol-b", b.clone()).unwrap();
    let s = server(&keys, volumes);
    let addr = s.addr().to_string();
    let ca = keys.sign(&cap(1, "vol-a", AccessMode::ReadWrite)).unwrap();
    let cb = keys.sign(&cap(2, "vol-b", AccessMode::ReadWrite)).unwrap();
    let l = Legit::default();
    let legit = {
        let (addr, l) = (addr.clone(), l.clone());
        std::thread::spawn(move || run_until(&addr, &endless(2), &[1, 2], &[ca, cb], &l))
    };
    // Wait until both devices hold their volumes (their queues are served).
    wait_until(|| s.queues().len() >= 2, "legit guests attached");

    // A volume nobody granted, one that does not exist, and a second writer.
    let e = hostile_attach(
        &addr,
        3,
        Some(keys.sign(&cap(3, "vol-c", AccessMode::ReadWrite)).unwrap()),
    );
    assert!(e.contains("no such volume"), "{e}");
    let e = hostile_attach(
        &addr,
        3,
        Some(keys.sign(&cap(3, "vol-a", AccessMode::ReadWrite)).unwrap()),
    );
    assert!(e.contains("does not allow"), "{e}");
    let e = hostile_attach(
        &addr,
        3,
        Some(keys.sign(&cap(3, "vol-b", AccessMode::Shared)).unwrap()),
    );
    assert!(e.contains("does not allow"), "{e}");
    assert_eq!(s.refusals().forbidden.load(Relaxed), 3);
    assert_eq!(s.refusals().unauthenticated.load(Relaxed), 0);

    l.finish_after(1000);
    let r = legit.join().unwrap().expect("the legitimate guests attach");
    assert_clean(&r);

    // Guest 0 (device 1) wrote only vol-a, in its own range; guest 1 only
    // vol-b. One shared disk would hold both ranges.
    let written = |v: &MemoryBackend, range: std::ops::Range<u64>| {
        range
            .filter(|&i| block(v, i).iter().any(|&x| x != 0))
            .count()
    };
    assert!(written(&a, 0..BLOCKS) > 0, "device 1 wrote vol-a");
    assert_eq!(
        written(&a, BLOCKS..2 * BLOCKS),
        0,
        "nothing else wrote vol-a"
    );
    assert!(written(&b, BLOCKS..2 * BLOCKS) > 0, "device 2 wrote vol-b");
    assert_eq!(written(&b, 0..BLOCKS), 0, "nothing else wrote vol-b");
    s.stop();
}

#[test]
fn a_read_only_grant_is_offered_as_ro_and_its_writes_fail() {
    let keys = Arc::new(Keyring::ephemeral().unwrap());
    let volumes = Arc::new(VolumeSet::new());
    let vol = Arc::new(MemoryBackend::new(BLOCKS * BLOCK));
    volumes.insert("golden", vol.clone()).unwrap();
    let s = server(&keys, volumes);
    let addr = s.addr().to_string();
    let ro = keys.sign(&cap(7, "golden", AccessMode::ReadOnly)).unwrap();
    // The probe sees the RO bit, as a VMM would before the guest starts.
    let d =
        vrio_core::vhost_user::fetch_config(soft(), &addr, 7, Some(ro.clone()), Default::default())
            .unwrap();
    assert!(d.read_only(), "features {:#x}", d.features);
    // A guest that writes anyway gets an error for every write, and the
    // volume stays untouched; its reads succeed.
    let mut c = rc(1, 400);
    c.workload.flush_pct = 0;
    let r = run(&addr, &c, &[7], &[ro]).unwrap();
    assert_eq!(r.completed, 400);
    assert!(r.writes > 0 && r.reads > 0);
    assert_eq!(r.io_errors, r.writes, "every write refused, no read");
    assert_eq!(vol.allocated_chunks(), 0, "the volume was not written");
    // A second read-only device shares it; a read-write one may too, as
    // readers never exclude writers.
    for (dev, mode) in [(8, AccessMode::ReadOnly), (9, AccessMode::ReadWrite)] {
        let t = keys.sign(&cap(dev, "golden", mode)).unwrap();
        let d =
            vrio_core::vhost_user::fetch_config(soft(), &addr, dev, Some(t), Default::default())
                .unwrap();
        assert_eq!(d.read_only(), mode == AccessMode::ReadOnly);
    }
    s.stop();
}

#[test]
fn one_vm_host_gets_at_most_its_share_of_queues() {
    let s = IoServer::start(
        soft(),
        Arc::new(MemoryBackend::new(1 << 20)),
        IoServerConfig {
            max_queues_per_peer: 2,
            ..IoServerConfig::default()
        },
    )
    .unwrap();
    let addr = s.addr().to_string();
    let attach = |device: u64| {
        vrio_core::vhost_user::fetch_config(soft(), &addr, device, None, Default::default())
    };
    // Two long-lived queues from this host...
    let l = Legit::default();
    let legit = {
        let (addr, l) = (addr.clone(), l.clone());
        std::thread::spawn(move || run_until(&addr, &endless(2), &[1, 2], &[], &l))
    };
    wait_until(|| s.queues().len() >= 2, "legit guests attached");
    // ...and a third is refused while they live.
    let e = attach(3).unwrap_err().to_string();
    assert!(e.contains("refused"), "{e}");
    l.finish_after(500);
    assert_clean(&legit.join().unwrap().unwrap());
    // Once they are gone, the host has room again.
    wait_until(|| s.queues().is_empty(), "legit queues detached");
    attach(3).unwrap();
    s.stop();
}

#[test]
fn a_peer_trickling_its_handshake_does_not_delay_another_attach() {
    let s = IoServer::start(
        soft(),
        Arc::new(MemoryBackend::new(1 << 20)),
        IoServerConfig::default(),
    )
    .unwrap();
    let addr = s.addr().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    // Four peers that connect and send their HELLO a byte at a time.
    let tricklers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop) = (addr.clone(), stop.clone());
            std::thread::spawn(move || {
                use std::io::Write;
                let mut t = std::net::TcpStream::connect(&addr).unwrap();
                while !stop.load(Relaxed) {
                    if t.write_all(&[0x56]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Connect, handshake, ATTACH, reply, detach: best of three, so that one
    // scheduling hiccup of a loaded machine is not taken for a stall.
    let best = (0..3)
        .map(|i| {
            let t = std::time::Instant::now();
            vrio_core::vhost_user::fetch_config(soft(), &addr, 100 + i, None, Default::default())
                .unwrap();
            t.elapsed()
        })
        .min()
        .unwrap();
    stop.store(true, Relaxed);
    for t in tricklers {
        t.join().unwrap();
    }
    assert!(
        best < Duration::from_millis(100),
        "an attach took {best:?} beside peers trickling their handshakes"
    );
    s.stop();
}
