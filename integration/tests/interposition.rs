//! Interposition on the I/O server, end to end over the soft fabric with
//! verified synthetic guests: encryption at rest, QoS limits (IOPS and
//! bandwidth, a fair neighbour, a live change), fault injection, and the
//! metering stage's counts against the guests' own.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vrio_core::blk::{BlockBackend, MemoryBackend};
use vrio_core::interpose::{PolicySpec, XtsStage};
use vrio_core::remote::{IoServer, IoServerConfig};
use vrio_testkit::guest::QueueReport;
use vrio_testkit::runner::RunConfig;

mod common;

use common::legit::{assert_clean, rc, run_until, soft, Legit, BLOCK, BLOCKS};

/// The timing tests (rates within 5%, a neighbour's throughput) must not
/// share the machine with each other: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                   f0e0d0c0b0a090807060504030201000f1e1d1c1b1a191817161514131211101";

/// An open server over one 16 MiB memory disk. The synthetic guests
/// expect never-written blocks to read as zeroes, so every run takes
/// blocks of its own (`first_block`).
fn server() -> (IoServer, Arc<MemoryBackend>) {
    let disk = Arc::new(MemoryBackend::new(16 << 20));
    let s = IoServer::start(soft(), disk.clone(), IoServerConfig::default()).unwrap();
    (s, disk)
}

fn policy(json: &str) -> PolicySpec {
    PolicySpec::parse(json).unwrap()
}

/// A workload of `secs` seconds on `device` (one guest, one queue, its own
/// `first_block`), started on a thread.
fn timed(
    addr: &str,
    device: u64,
    first_block: u64,
    secs: u64,
    legit: &Legit,
) -> std::thread::JoinHandle<Result<QueueReport, String>> {
    let mut c: RunConfig = rc(1, 0);
    c.workload.duration = Some(Duration::from_secs(secs));
    c.workload.first_block = first_block;
    c.workload.depth = 16;
    let (addr, l) = (addr.to_string(), legit.clone());
    std::thread::spawn(move || run_until(&addr, &c, &[device], &[], &l))
}

/// The synthetic guest's pattern for disk block `b`: little-endian words
/// that, XORed with `b`, count up by one. Plaintext blocks have it;
/// ciphertext does not.
fn is_pattern(block: &[u8], b: u64) -> bool {
    let w: Vec<u64> = block
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()) ^ b)
        .collect();
    w.windows(2).all(|p| p[1] == p[0].wrapping_add(1))
}

#[test]
fn encrypted_blocks_reach_the_disk_as_ciphertext_and_read_back_as_written() {
    let _one_at_a_time = serial();
    let (s, disk) = server();
    let spec = policy(&format!(
        r#"{{"stages":[{{"stage":"crypt","key":"{KEY}"}}]}}"#
    ));
    s.policies().set(1, &spec).unwrap();
    let r = run_until(s.addr(), &rc(1, 3000), &[1], &[], &Legit::default()).unwrap();
    assert_clean(&r);
    assert!(r.writes > 100, "{} writes", r.writes);

    let key: Vec<u8> = (0..64)
        .map(|i| u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let xts = XtsStage::new(&key.try_into().unwrap()).unwrap();
    let mut written = 0;
    for b in 0..BLOCKS {
        let mut raw = vec![0u8; BLOCK as usize];
        disk.read_vectored_at(b * BLOCK, &mut [std::io::IoSliceMut::new(&mut raw)])
            .unwrap();
        if raw.iter().all(|&x| x == 0) {
            continue;
        }
        written += 1;
        assert!(!is_pattern(&raw, b), "block {b} is plaintext on the disk");
        xts.decrypt(b * BLOCK / 512, &mut raw);
        assert!(
            is_pattern(&raw, b),
            "block {b} does not decrypt to the guest's data"
        );
    }
    assert!(written > BLOCKS / 2, "only {written} blocks written");

    // A second attach of the device, with the key still in force, runs
    // clean on blocks of its own, and the first run's blocks are intact.
    let mut c = rc(1, 2000);
    c.workload.first_block = BLOCKS;
    let r = run_until(s.addr(), &c, &[1], &[], &Legit::default()).unwrap();
    assert_clean(&r);
    for b in 0..BLOCKS {
        let mut raw = vec![0u8; BLOCK as usize];
        disk.read_vectored_at(b * BLOCK, &mut [std::io::IoSliceMut::new(&mut raw)])
            .unwrap();
        if raw.iter().any(|&x| x != 0) {
            xts.decrypt(b * BLOCK / 512, &mut raw);
            assert!(is_pattern(&raw, b), "block {b} changed");
        }
    }
}

/// Requests per second of `r` over `secs`.
fn iops(r: &QueueReport, secs: f64) -> f64 {
    r.completed as f64 / secs
}

#[test]
fn an_iops_limit_holds_within_five_percent_over_ten_seconds() {
    let _one_at_a_time = serial();
    let (s, _) = server();
    let limit = 400.0;
    s.policies()
        .set(
            1,
            &policy(r#"{"stages":[{"stage":"qos","rw_ios_per_sec":400}]}"#),
        )
        .unwrap();
    let r = timed(s.addr(), 1, 0, 10, &Legit::default())
        .join()
        .unwrap()
        .unwrap();
    assert_eq!((r.io_errors, r.corrupt, r.lost), (0, 0, 0));
    // Flushes pass free, as in SPDK: only reads and writes count.
    let rw = (r.reads + r.writes) as f64 / 10.0;
    assert!(
        (limit * 0.95..=limit * 1.05).contains(&rw),
        "{rw:.0} reads+writes/s against a limit of {limit}"
    );
    assert!(iops(&r, 10.0) >= rw);
}

#[test]
fn a_bandwidth_limit_holds_within_five_percent() {
    let _one_at_a_time = serial();
    let (s, _) = server();
    // 1 MiB/s of 4 KiB blocks: 256 reads and writes a second.
    s.policies()
        .set(
            1,
            &policy(r#"{"stages":[{"stage":"qos","rw_mbytes_per_sec":1}]}"#),
        )
        .unwrap();
    let r = timed(s.addr(), 1, 0, 6, &Legit::default())
        .join()
        .unwrap()
        .unwrap();
    assert_eq!((r.io_errors, r.corrupt, r.lost), (0, 0, 0));
    let mib_s = (r.reads + r.writes) as f64 * BLOCK as f64 / 6.0 / (1 << 20) as f64;
    assert!((0.95..=1.05).contains(&mib_s), "{mib_s:.3} MiB/s against 1");
}

#[test]
fn an_unlimited_neighbour_on_the_same_sidecore_keeps_its_throughput() {
    let _one_at_a_time = serial();
    let (s, _) = server();
    s.policies()
        .set(
            1,
            &policy(r#"{"stages":[{"stage":"qos","rw_ios_per_sec":200}]}"#),
        )
        .unwrap();
    // Alone and beside the limited device, in ABBA pairs: each pair's two
    // runs share the machine's load of the moment. What the claim is about
    // (a held queue costing its sidecore's neighbours) would lower every
    // pair; other load on the machine lowers some pairs, by chance, so the
    // least disturbed pair is compared.
    // Fresh blocks for every run: the guests expect unwritten blocks.
    let mut next = (0..).map(|i| i * BLOCKS);
    let mut fresh = move || next.next().unwrap();
    let mut run_neighbour = |with_limited: bool| -> f64 {
        let limited = with_limited.then(|| timed(s.addr(), 1, fresh(), 3, &Legit::default()));
        if limited.is_some() {
            std::thread::sleep(Duration::from_millis(300));
        }
        let r = timed(s.addr(), 2, fresh(), 2, &Legit::default())
            .join()
            .unwrap()
            .unwrap();
        assert_eq!((r.io_errors, r.corrupt, r.lost), (0, 0, 0));
        if let Some(l) = limited {
            let l = l.join().unwrap().unwrap();
            assert_eq!((l.io_errors, l.corrupt, l.lost), (0, 0, 0));
        }
        iops(&r, 2.0)
    };
    let mut ratios = Vec::new();
    for pair in 0..4 {
        let (alone, beside) = if pair % 2 == 0 {
            let a = run_neighbour(false);
            (a, run_neighbour(true))
        } else {
            let b = run_neighbour(true);
            (run_neighbour(false), b)
        };
        ratios.push((beside / alone.max(1.0), beside, alone));
    }
    assert_eq!(s.sidecore_count(), 1, "both devices share the one sidecore");
    let best = ratios.iter().map(|r| r.0).fold(0.0, f64::max);
    assert!(
        best >= 0.9,
        "neighbour beside the limited device / alone, per pair (ratio, beside/s, alone/s): {ratios:.2?}"
    );
}

#[test]
fn a_limit_changed_live_takes_effect_within_a_second() {
    let _one_at_a_time = serial();
    let (s, _) = server();
    s.policies()
        .set(
            1,
            &policy(r#"{"stages":[{"stage":"qos","rw_ios_per_sec":100}]}"#),
        )
        .unwrap();
    let l = Legit::default();
    let run = timed(s.addr(), 1, 0, 60, &l);
    let rate = |secs: f64| {
        let a = l.done.load(Relaxed);
        std::thread::sleep(Duration::from_secs_f64(secs));
        (l.done.load(Relaxed) - a) as f64 / secs
    };
    // Wait for the guest to be attached and running at its limit.
    let deadline = Instant::now() + Duration::from_secs(30);
    while l.done.load(Relaxed) < 50 {
        assert!(Instant::now() < deadline, "the guest never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = rate(1.0);
    assert!(
        before < 150.0,
        "{before:.0}/s under a limit of 100 (flushes are free)"
    );
    s.policies()
        .set(
            1,
            &policy(r#"{"stages":[{"stage":"qos","rw_ios_per_sec":1000}]}"#),
        )
        .unwrap();
    // Within a second of the change the new limit is in force: the second
    // that starts then runs well above the old limit.
    let after = rate(1.0);
    l.stop.store(true, Relaxed);
    let r = run.join().unwrap().unwrap();
    assert_eq!((r.io_errors, r.corrupt, r.lost), (0, 0, 0));
    assert!(
        after > 500.0,
        "{after:.0}/s in the second after raising the limit to 1000"
    );
}

#[test]
fn injected_errors_reach_the_guest_and_the_meter_counts_what_the_guest_saw() {
    let _one_at_a_time = serial();
    let (s, _) = server();
    s.policies()
        .set(1, &policy(r#"{"stages":[{"stage":"meter"}]}"#))
        .unwrap();
    let r = run_until(s.addr(), &rc(1, 2000), &[1], &[], &Legit::default()).unwrap();
    assert_clean(&r);
    let reports = s.policies().reports();
    let meter = &reports[0].1[0];
    let (reads, writes, flushes) = (
        meter.counter("requests", "read"),
        meter.counter("requests", "write"),
        meter.counter("requests", "flush"),
    );
    assert_eq!((reads, writes, flushes), (r.reads, r.writes, r.flushes));
    assert_eq!(meter.counter("bytes", "read"), r.reads * BLOCK);
    assert_eq!(meter.latency.as_ref().unwrap().count(), r.completed);

    // Now fail reads of the first block of a fresh range: the guest sees
    // I/O errors, and nothing else goes wrong.
    let first = BLOCK / 512 * BLOCKS;
    s.policies()
        .set(
            1,
            &policy(&format!(
                r#"{{"stages":[{{"stage":"meter"}},
                    {{"stage":"fault","first_sector":{first},"sectors":8,"ops":["read"],"error":"ioerr"}}]}}"#
            )),
        )
        .unwrap();
    let mut c = rc(1, 2000);
    c.workload.first_block = BLOCKS;
    let r = run_until(s.addr(), &c, &[1], &[], &Legit::default()).unwrap();
    assert!(r.io_errors > 0, "no injected error reached the guest");
    assert_eq!((r.corrupt, r.lost, r.protocol_errors), (0, 0, 0));
    let reports = s.policies().reports();
    let (meter, fault) = (&reports[0].1[0], &reports[0].1[1]);
    assert_eq!(fault.counter("failed", ""), r.io_errors);
    assert_eq!(meter.counter("errors", "read"), r.io_errors);
}

/// A stage of the test's own, put in with `Interposer::replace`: it sees
/// every request with its device, VM host, op and length.
#[derive(Debug, Default)]
struct Seen(std::sync::Mutex<Vec<vrio_core::interpose::Request>>);

#[derive(Debug)]
struct Recorder(Arc<Seen>);

impl vrio_core::interpose::Stage for Recorder {
    fn kind(&self) -> &'static str {
        "recorder"
    }
    fn completed(&self, req: &vrio_core::interpose::Request, _status: u8, _latency: Duration) {
        self.0 .0.lock().unwrap().push(*req);
    }
}

#[test]
fn a_stage_of_ones_own_sees_device_vm_host_op_and_length() {
    use vrio_core::interpose::{Op, Pipeline};
    let _one_at_a_time = serial();
    let (s, _) = server();
    let seen = Arc::new(Seen::default());
    s.policies().interposer(5).replace(Pipeline::new(
        PolicySpec::default(),
        vec![Box::new(Recorder(seen.clone()))],
    ));
    let r = run_until(s.addr(), &rc(1, 500), &[5], &[], &Legit::default()).unwrap();
    assert_clean(&r);
    let seen = seen.0.lock().unwrap();
    assert_eq!(seen.len() as u64, r.completed);
    // The agent connects from loopback.
    let host = vrio_core::proto::device_key("127.0.0.1");
    assert!(seen.iter().all(|q| q.device == 5 && q.vm_host == host));
    let reads = seen.iter().filter(|q| q.op == Op::Read).count() as u64;
    assert_eq!(reads, r.reads);
    assert!(seen
        .iter()
        .filter(|q| matches!(q.op, Op::Read | Op::Write))
        .all(|q| q.len == BLOCK && q.sector % 8 == 0));
}
