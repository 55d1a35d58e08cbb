//! The control plane driving the data path, across processes:
//! vrio-controller, two vrio-server processes registered with it (sharing
//! one disk image, as servers on one block store do), and a vrio-client
//! whose verified synthetic guests are placed by the controller.
//!
//! - SIGKILL one server mid-workload: its lease expires, the controller
//!   fails its queues over, the client re-attaches them, in-flight requests
//!   are served again, and every block still verifies.
//! - MoveQueue every 100 ms while the workload runs: nothing lost, nothing
//!   duplicated.
//! - A second server joining a loaded one: rebalancing converges.
//! - A device's interposition policy, set at the controller, follows it to
//!   the server that takes over its queue when the first one dies.
//!
//! Credentials are on throughout: the controller signs them with a data
//! key the servers check (`--data-key`, `--key-file`), for the `default`
//! volume (the shared image) that every guest is granted `shared`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{soft_server, synthetic_client};
use vrio_control::client::connect;
use vrio_control::pb;
use vrio_integration::rxe;

const TOKEN: &str = "failover-test-token";

/// A child process killed when the test ends, pass or fail, whose stdout
/// lines arrive (with their arrival time) on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    /// Lines before it were matched by a wait already.
    cursor: usize,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .env("VRIO_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        // Both streams: stderr carries the client's progress lines.
        let out: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for (out, mark) in out.into_iter().zip(["|", "!"]) {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    println!("  {mark} {l}");
                    if tx.send((Instant::now(), l)).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            child,
            lines,
            seen: Vec::new(),
            cursor: 0,
        }
    }

    /// Waits for the next line (after the last one a wait matched) that
    /// contains `needle`; returns it and when it came.
    fn wait_for(&mut self, needle: &str, within: Duration) -> (Instant, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.seen[self.cursor..]
                .iter()
                .position(|(_, l)| l.contains(needle))
            {
                self.cursor += i + 1;
                return self.seen[self.cursor - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no line with {needle:?} within {within:?}"),
            }
        }
    }

    /// Waits until the client's progress line (every 2 s on stderr) shows
    /// at least `n` completed requests.
    fn wait_requests(&mut self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (_, l) = self.wait_for("remote guests:", left);
            let done = l
                .split("remote guests:")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no request count in {l:?}"));
            if done >= n {
                return;
            }
        }
    }

    /// Lines containing `needle` printed so far (takes what has arrived).
    fn count(&mut self, needle: &str) -> usize {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.iter().filter(|(_, l)| l.contains(needle)).count()
    }

    /// Sends SIGTERM: servers print their final counts and exit, clients
    /// stop issuing, drain and print their verdict.
    fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Asks the process to stop (SIGTERM) and returns the line with `needle`
    /// it prints on the way out.
    fn terminate(&mut self, needle: &str) -> String {
        self.sigterm();
        self.wait_for(needle, Duration::from_secs(30)).1
    }

    /// Everything printed until the process exits; its exit status.
    fn finish(&mut self, within: Duration) -> (bool, Vec<(Instant, String)>) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
                    self.seen.push(l);
                }
                return (st.success(), self.seen.clone());
            }
            assert!(Instant::now() < deadline, "process did not finish");
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Bins {
    controller: PathBuf,
    server: PathBuf,
    client: PathBuf,
}

fn bins() -> Bins {
    let b = |n| rxe::bin("vrio-examples", n);
    Bins {
        controller: b("vrio-controller"),
        server: b("vrio-server"),
        client: b("vrio-client"),
    }
}

fn controller(bin: &Path, key: &Path, lease_ms: u64, rebalance_secs: u64) -> (Proc, String) {
    let mut p = Proc::spawn(Command::new(bin).args([
        "--data-key",
        key.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--memory",
        "--lease-ttl-ms",
        &lease_ms.to_string(),
        "--tick-ms",
        "100",
        "--rebalance-secs",
        &rebalance_secs.to_string(),
        "--rebalance-cooldown-secs",
        "1",
    ]));
    let (_, line) = p.wait_for("127.0.0.1:", Duration::from_secs(30));
    (p, line.trim().to_string())
}

fn server(bin: &Path, ctl: &str, id: &str, image: &Path, key: &Path) -> Proc {
    let mut p = Proc::spawn(soft_server(bin).args([
        "--key-file",
        key.to_str().unwrap(),
        "--disk",
        "file",
        "--file",
        image.to_str().unwrap(),
        "--size-mib",
        "64",
        "--controller",
        ctl,
        "--server-id",
        id,
    ]));
    p.wait_for("listening on", Duration::from_secs(30));
    p
}

/// The longest a client's workload runs. Tests end it with SIGTERM once
/// the events they assert have happened, so that a fast machine cannot
/// finish a fixed amount of work first; this only bounds a stuck run.
const CLIENT_SECONDS: u32 = 300;

/// How long a test waits for the events it drives (moves, handovers,
/// convergence) before it fails: generous, for a loaded machine.
const EVENT_DEADLINE: Duration = Duration::from_secs(180);

fn client(bin: &Path, ctl: &str, guests: u32) -> Proc {
    Proc::spawn(synthetic_client(bin, "--controller", ctl, guests).args([
        "--queues",
        "2",
        "--seconds",
        &CLIENT_SECONDS.to_string(),
        "--depth",
        "8",
        "--blocks",
        "128",
    ]))
}

/// What every test starts from: the binaries, a controller on loopback
/// (`lease_ms`, rebalancing every `rebalance_secs`, 0: never) and the disk
/// image its servers share, in a directory of the test's own (`name`).
struct Setup {
    b: Bins,
    dir: PathBuf,
    image: PathBuf,
    key: PathBuf,
    _ctl: Proc,
    addr: String,
    rt: tokio::runtime::Runtime,
}

fn setup(name: &str, lease_ms: u64, rebalance_secs: u64) -> Setup {
    let b = bins();
    let dir = std::env::temp_dir().join(format!("vrio-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    let key = dir.join("data.key");
    std::fs::write(
        &key,
        vrio_core::tenancy::Keyring::generate_file_text("k1").unwrap(),
    )
    .unwrap();
    let (ctl, addr) = controller(&b.controller, &key, lease_ms, rebalance_secs);
    let rt = rt();
    rt.block_on(async {
        let mut c = connect(&addr, Some(TOKEN)).await.unwrap();
        c.create_volume(pb::CreateVolumeRequest {
            name: "default".into(),
            size_bytes: 64 << 20,
        })
        .await
        .unwrap();
    });
    Setup {
        b,
        dir,
        image,
        key,
        _ctl: ctl,
        addr,
        rt,
    }
}

impl Setup {
    /// Starts I/O server `id`, registered with the controller.
    fn server(&self, id: &str) -> Proc {
        server(&self.b.server, &self.addr, id, &self.image, &self.key)
    }

    /// Starts a client with `guests` guests placed by the controller, and
    /// waits until they are attached.
    fn client(&self, guests: u32) -> Proc {
        // The devices it will attach (`synthetic-d<g>`) may use the image.
        self.rt.block_on(async {
            let mut c = connect(&self.addr, Some(TOKEN)).await.unwrap();
            for g in 0..guests {
                c.grant_volume(pb::GrantVolumeRequest {
                    volume: "default".into(),
                    device_id: format!("synthetic-d{g}"),
                    mode: pb::AccessMode::Shared as i32,
                    host: String::new(),
                })
                .await
                .unwrap();
            }
        });
        let mut c = client(&self.b.client, &self.addr, guests);
        c.wait_for("attached to", Duration::from_secs(30));
        c
    }

    /// Waits until `n` servers are alive at the controller.
    fn wait_servers(&self, n: usize) {
        wait_servers(&self.rt, &self.addr, n);
    }

    fn assignments(&self) -> Vec<pb::Assignment> {
        assignments(&self.rt, &self.addr)
    }

    /// Removes the test's directory (after a pass; a failed run leaves it).
    fn remove_dir(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How many of `lines` contain `needle`.
fn count(lines: &[(Instant, String)], needle: &str) -> usize {
    lines.iter().filter(|(_, l)| l.contains(needle)).count()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn servers_alive(rt: &tokio::runtime::Runtime, ctl: &str) -> Vec<pb::IoServer> {
    rt.block_on(async {
        let mut c = connect(ctl, Some(TOKEN)).await.unwrap();
        c.list_servers(pb::ListServersRequest {})
            .await
            .unwrap()
            .into_inner()
            .servers
            .into_iter()
            .filter(|s| s.alive)
            .collect()
    })
}

fn assignments(rt: &tokio::runtime::Runtime, ctl: &str) -> Vec<pb::Assignment> {
    rt.block_on(async {
        let mut c = connect(ctl, Some(TOKEN)).await.unwrap();
        c.list_assignments(pb::ListAssignmentsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .assignments
    })
}

fn wait_servers(rt: &tokio::runtime::Runtime, ctl: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while servers_alive(rt, ctl).len() < n {
        assert!(Instant::now() < deadline, "servers did not register");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many requests the client's verdict line says it completed.
fn verdict_total(lines: &[(Instant, String)]) -> u64 {
    lines
        .iter()
        .find_map(|(_, l)| {
            l.strip_prefix("vrio-client: ")?
                .split(" of ")
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no verdict from the client"))
}

/// The client's verdict line: every request verified, none failed.
fn assert_verified(ok: bool, lines: &[(Instant, String)], total: u64) {
    let verdict = lines
        .iter()
        .find(|(_, l)| l.contains("requests verified"))
        .map(|(_, l)| l.clone())
        .unwrap_or_else(|| panic!("no verdict from the client"));
    assert!(ok, "client failed: {verdict}");
    assert!(
        verdict.contains(&format!("{total} of {total} requests verified, 0 errors")),
        "{verdict}"
    );
}

#[test]
fn a_killed_server_fails_over_and_every_request_verifies() {
    let lease_ms = 1500;
    let s = setup("failover", lease_ms, 0);
    let mut a = s.server("io-a");
    let _b = s.server("io-b");
    s.wait_servers(2);
    let guests = 3u32;
    let mut c = s.client(guests);
    let on_a = s
        .assignments()
        .iter()
        .filter(|x| x.server_id == "io-a")
        .count();
    assert!(on_a > 0, "the controller put nothing on io-a");
    // Let I/O flow on both servers, then kill one without warning.
    std::thread::sleep(Duration::from_millis(800));
    a.child.kill().unwrap();
    let killed = Instant::now();
    a.child.wait().unwrap();
    // Every queue io-a served comes back on io-b.
    let mut last = killed;
    let mut downs = Vec::new();
    for _ in 0..on_a {
        let (t, l) = c.wait_for("failover:", Duration::from_secs(30));
        last = last.max(t);
        let ms: u64 = l
            .split(" after ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no down time in {l:?}"));
        downs.push(ms);
    }
    let recovery = last.duration_since(killed);
    // The queues serve on io-b until the run is as long as it was when it
    // had a fixed size, then the guests drain.
    let at_least = u64::from(guests) * 2 * 6_000;
    c.wait_requests(at_least, EVENT_DEADLINE);
    c.sigterm();
    let (ok, lines) = c.finish(Duration::from_secs(120));
    let failovers = count(&lines, "failover:");
    println!(
        "RECOVERY: {on_a} queue(s) failed over; lease {lease_ms} ms; kill -> last queue serving again: {} ms; per-queue time without a server: {downs:?} ms",
        recovery.as_millis()
    );
    assert_eq!(failovers, on_a, "each of io-a's queues failed over once");
    let total = verdict_total(&lines);
    assert!(total >= at_least, "only {total} requests");
    assert_verified(ok, &lines, total);
    assert!(s.assignments().iter().all(|x| x.server_id == "io-b"));
    s.remove_dir();
}

#[test]
fn move_queue_every_100ms_loses_and_duplicates_nothing() {
    let s = setup("moves", 60_000, 0);
    let mut srv = [s.server("io-a"), s.server("io-b")];
    s.wait_servers(2);
    // The guests run until the moves asserted below have happened.
    let mut c = s.client(2);
    // Two of every four moves change the server (the agents hand the
    // queue over), two only the sidecore (the server moves it).
    let slots = [("io-a", 0u32), ("io-a", 1), ("io-b", 0), ("io-b", 1)];
    let mut moves = 0u64;
    let mut tick = 0usize;
    let started = Instant::now();
    s.rt.block_on(async {
        let mut ctl = connect(&s.addr, Some(TOKEN)).await.unwrap();
        while c.child.try_wait().unwrap().is_none()
            && (moves < 20 || c.count("moved:") < 8)
            && started.elapsed() < EVENT_DEADLINE
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tick += 1;
            let all = ctl
                .list_assignments(pb::ListAssignmentsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .assignments;
            // Each queue in turn; each visit takes it to the next slot.
            let a = &all[tick % all.len()];
            let (server, sidecore) = slots[(tick / all.len()) % slots.len()];
            let r = ctl
                .move_queue(pb::MoveQueueRequest {
                    device_id: a.device_id.clone(),
                    queue: a.queue,
                    server_id: server.into(),
                    sidecore,
                })
                .await;
            if r.is_ok() {
                moves += 1;
            }
        }
    });
    c.sigterm();
    let (ok, lines) = c.finish(Duration::from_secs(120));
    let handovers = count(&lines, "moved:");
    let failovers = count(&lines, "failover:");
    println!("MOVES: {moves} MoveQueue calls, {handovers} handovers between servers, {failovers} failovers");
    assert!(moves >= 20, "only {moves} moves were made");
    assert!(handovers >= 8, "only {handovers} handovers between servers");
    assert_eq!(failovers, 0, "a live move must never fail over");
    let total = verdict_total(&lines);
    assert!(total > 0);
    assert_verified(ok, &lines, total);
    // Across both servers, each request was served exactly once.
    let finals: Vec<String> = srv.iter_mut().map(|p| p.terminate("final:")).collect();
    let count = |l: &str, after: &str, before: &str| -> u64 {
        l.split(after)
            .nth(1)
            .and_then(|s| s.split(before).next())
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {before:?} count in {l:?}"))
    };
    let served: u64 = finals.iter().map(|l| count(l, "final: ", "requests")).sum();
    let sidecore_moves: u64 = finals
        .iter()
        .map(|l| count(l, "handed back, ", "sidecore moves"))
        .sum();
    println!("SERVERS: served {served}, {sidecore_moves} moves between sidecores");
    assert_eq!(served, total, "requests served by the two servers");
    assert!(
        sidecore_moves >= 2,
        "servers moved only {sidecore_moves} queues between sidecores"
    );
    s.remove_dir();
}

/// io-a serves every queue; io-b joins. The controller's periodic
/// rebalance, driven by the sidecore load the servers report, spreads the
/// queues, the agents follow, and the placement settles. Prints how long
/// it took from io-b's registration to the last move.
#[test]
fn rebalancing_converges_when_a_server_joins() {
    let s = setup("rebalance", 3_000, 1);
    let _a = s.server("io-a");
    s.wait_servers(1);
    let mut c = s.client(4);
    // Load reports from io-a under load, then the newcomer.
    std::thread::sleep(Duration::from_secs(2));
    let _b = s.server("io-b");
    s.wait_servers(2);
    let joined = Instant::now();
    let snapshot = || {
        let mut v: Vec<(String, u32, String, u32)> = s
            .assignments()
            .into_iter()
            .map(|a| (a.device_id, a.queue, a.server_id, a.sidecore))
            .collect();
        v.sort();
        v
    };
    let mut last = snapshot();
    let mut changed = joined;
    let mut converged = None;
    while joined.elapsed() < EVENT_DEADLINE {
        std::thread::sleep(Duration::from_millis(100));
        let now = snapshot();
        if now != last {
            changed = Instant::now();
            last = now;
        }
        let on_b = last.iter().filter(|a| a.2 == "io-b").count();
        // Settled: both servers used, nothing moved for 3 s.
        if on_b > 0 && changed.elapsed() > Duration::from_secs(3) {
            converged = Some(changed.duration_since(joined));
            break;
        }
    }
    let on_b = last.iter().filter(|a| a.2 == "io-b").count();
    c.sigterm();
    let (ok, lines) = c.finish(Duration::from_secs(120));
    let moved = count(&lines, "moved:");
    let converged = converged.unwrap_or_else(|| panic!("placement did not settle: {last:?}"));
    println!(
        "CONVERGENCE: io-b joined io-a (8 queues); placement settled {} ms after io-b registered, {on_b} queue(s) on io-b, {moved} agent handover(s)",
        converged.as_millis()
    );
    assert!(
        (2..=6).contains(&on_b),
        "unbalanced: {on_b} of 8 queues on io-b"
    );
    assert!(
        moved >= on_b,
        "agents followed only {moved} of {on_b} moves"
    );
    let verdict = lines
        .iter()
        .find(|(_, l)| l.contains("requests verified"))
        .map(|(_, l)| l.clone())
        .unwrap_or_default();
    assert!(ok && verdict.contains(", 0 errors"), "client: {verdict}");
    s.remove_dir();
}

/// The `meter` stage's request count that `server` last reported for
/// `device` (None: no report from it yet).
fn metered(rt: &tokio::runtime::Runtime, ctl: &str, device: &str, server: &str) -> Option<u64> {
    rt.block_on(async {
        let mut c = connect(ctl, Some(TOKEN)).await.unwrap();
        let r = c
            .get_device_policy(pb::GetDevicePolicyRequest {
                device: device.into(),
            })
            .await
            .unwrap()
            .into_inner();
        r.reports
            .iter()
            .find(|s| s.server_id == server)
            .and_then(|s| s.stages.iter().find(|st| st.kind == "meter"))
            .map(|st| {
                st.counters
                    .iter()
                    .filter(|c| c.name == "requests")
                    .map(|c| c.value)
                    .sum()
            })
    })
}

/// Waits (bounded) until `cond` holds, asking every 100 ms.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENT_DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_policy_follows_its_device_through_failover() {
    let s = setup("policy-failover", 1500, 0);
    let mut servers = [("io-a", s.server("io-a")), ("io-b", s.server("io-b"))];
    s.wait_servers(2);
    // Set before the device exists: it applies when it attaches, wherever.
    s.rt.block_on(async {
        let mut c = connect(&s.addr, Some(TOKEN)).await.unwrap();
        c.set_device_policy(pb::SetDevicePolicyRequest {
            device: "synthetic-d0".into(),
            policy_json: r#"{"stages":[{"stage":"meter"}]}"#.into(),
        })
        .await
        .unwrap();
    });
    let mut c = s.client(1);
    // Kill the server of the device's first queue, once its meter counts.
    let victim = s
        .assignments()
        .into_iter()
        .find(|x| x.device_id == "synthetic-d0" && x.queue == 0)
        .expect("queue 0 placed")
        .server_id;
    let k = servers
        .iter()
        .position(|(id, _)| *id == victim)
        .unwrap_or_else(|| panic!("queue 0 on an unknown server {victim:?}"));
    let survivor = servers[1 - k].0;
    wait_until("the victim's meter counts the device's requests", || {
        metered(&s.rt, &s.addr, "synthetic-d0", &victim).is_some_and(|n| n > 0)
    });
    let before = metered(&s.rt, &s.addr, "synthetic-d0", survivor).unwrap_or(0);
    let victim_proc = &mut servers[k].1;
    victim_proc.child.kill().unwrap();
    victim_proc.child.wait().unwrap();
    c.wait_for("failover:", Duration::from_secs(60));
    // The survivor applied the policy to the queue it took over: its meter
    // for the device counts on.
    wait_until("the survivor's meter counts the failed-over queue", || {
        metered(&s.rt, &s.addr, "synthetic-d0", survivor).is_some_and(|n| n > before + 100)
    });
    c.sigterm();
    let (ok, lines) = c.finish(Duration::from_secs(120));
    let total = verdict_total(&lines);
    assert_verified(ok, &lines, total);
    s.remove_dir();
}
