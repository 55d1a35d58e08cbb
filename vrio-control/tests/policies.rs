//! Device interposition policies through the control plane: an embedded
//! controller (file store) and in-process I/O servers joined with
//! `join_as_server`. A policy set at the controller reaches a joined server
//! live, a bad one is refused and changes nothing, policies survive a
//! controller restart and reach servers that join later (what keeps a
//! policy across a failover), keys never come back to an operator, and the
//! stages' counters travel from the servers to GetDevicePolicy.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use vrio_control::client::{connect, Client};
use vrio_control::{embedded_controller, join_as_server, pb, wait_for_servers, ControlOpts};
use vrio_core::blk::{BlockConfig, MemoryBackend};
use vrio_core::interpose::{Op, PolicySpec, Request, LATENCY_BOUNDS};
use vrio_core::remote::{device_key, IoServer, IoServerConfig};

const TOKEN: &str = "policies-test-token";
/// How long a step may take on a loaded machine before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);
/// How soon a policy set at the controller must be in force at a server
/// whose watch is running.
const LIVE: Duration = Duration::from_secs(1);
/// Two AES-256 keys (distinct halves), as 128 hex digits.
const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                   f0e0d0c0b0a090807060504030201000ffeeddccbbaa99887766554433221100";

fn io_server() -> Arc<IoServer> {
    let domain = Arc::from(vrio_rdma::open(vrio_rdma::Backend::Soft, None).unwrap());
    Arc::new(
        IoServer::start(
            domain,
            Arc::new(MemoryBackend::new(1 << 20)),
            IoServerConfig {
                sidecores: 1,
                blk: BlockConfig::default(),
                ..IoServerConfig::default()
            },
        )
        .unwrap(),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn opts(addr: &str) -> ControlOpts {
    ControlOpts {
        addr: addr.to_string(),
        token: Some(TOKEN.into()),
        tls: None,
    }
}

fn client(rt: &tokio::runtime::Runtime, addr: &str) -> Client {
    rt.block_on(connect(addr, Some(TOKEN))).unwrap()
}

fn set(
    rt: &tokio::runtime::Runtime,
    c: &mut Client,
    device: &str,
    json: &str,
) -> Result<pb::SetDevicePolicyResponse, tonic::Status> {
    rt.block_on(c.set_device_policy(pb::SetDevicePolicyRequest {
        device: device.into(),
        policy_json: json.into(),
    }))
    .map(|r| r.into_inner())
}

fn get(
    rt: &tokio::runtime::Runtime,
    c: &mut Client,
    device: &str,
) -> Result<pb::GetDevicePolicyResponse, tonic::Status> {
    rt.block_on(c.get_device_policy(pb::GetDevicePolicyRequest {
        device: device.into(),
    }))
    .map(|r| r.into_inner())
}

/// Polls until `server` has `want` in force for `device`; returns how long
/// it took, or panics after `within`.
fn wait_for_policy(
    server: &IoServer,
    device: &str,
    want: &PolicySpec,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        if server.policies().spec(device_key(device)) == *want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "device {device}'s policy did not reach the server within {within:?}: it has {}",
            server.policies().spec(device_key(device)).summary()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn meter() -> String {
    r#"{"stages":[{"stage":"meter"}]}"#.into()
}

fn meter_and_crypt() -> String {
    format!(r#"{{"stages":[{{"stage":"meter"}},{{"stage":"crypt","key":"{KEY}"}}]}}"#)
}

fn spec(json: &str) -> PolicySpec {
    PolicySpec::parse(json).unwrap()
}

/// True if `text` holds any 16-digit run of [`KEY`].
fn leaks_key(text: &str) -> bool {
    (0..KEY.len() - 16).any(|i| text.contains(&KEY[i..i + 16]))
}

fn start_controller(dir: &Path) -> (vrio_control::Background, String) {
    embedded_controller(dir, TOKEN, 1_500).unwrap()
}

#[test]
fn a_policy_reaches_a_joined_server_live_and_bad_ones_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_ctrl, addr) = start_controller(dir.path());
    let server = io_server();
    let _member = join_as_server(opts(&addr), "s1".into(), 16, server.clone()).unwrap();
    wait_for_servers(&opts(&addr), 1, DEADLINE).unwrap();
    let rt = rt();
    let mut c = client(&rt, &addr);

    // The device need not be attached: a policy waits for it.
    let first = set(&rt, &mut c, "disk0", &meter()).unwrap();
    assert!(!first.cleared);
    // The first one also waits for the server's watch to start.
    wait_for_policy(&server, "disk0", &spec(&meter()), DEADLINE);

    // (a) With the watch running, a change is in force within a second.
    let second = set(&rt, &mut c, "disk0", &meter_and_crypt()).unwrap();
    assert!(second.version > first.version);
    let took = wait_for_policy(&server, "disk0", &spec(&meter_and_crypt()), LIVE);
    eprintln!("policy in force at the server {took:?} after SetDevicePolicy returned");
    // (e) The answer to Set shows no key either.
    assert!(!leaks_key(&second.policy_json), "{}", second.policy_json);

    // (e) GetDevicePolicy shows the policy with its key redacted.
    let got = get(&rt, &mut c, "disk0").unwrap();
    assert_eq!(got.version, second.version);
    assert!(
        got.policy_json.contains("\"redacted\""),
        "{}",
        got.policy_json
    );
    assert!(!leaks_key(&format!("{got:?}")), "{got:?}");
    assert_eq!(spec(&got.policy_json), spec(&meter_and_crypt()).redacted());

    // (b) Bad policies are refused with InvalidArgument, say why without
    // the key, and leave the policy in force everywhere.
    let equal_halves = format!(
        r#"{{"stages":[{{"stage":"crypt","key":"{0}{0}"}}]}}"#,
        &KEY[..64]
    );
    let short_key = format!(
        r#"{{"stages":[{{"stage":"crypt","key":"{}"}}]}}"#,
        &KEY[..120]
    );
    let not_hex = format!(
        r#"{{"stages":[{{"stage":"crypt","key":"{}zz"}}]}}"#,
        &KEY[..126]
    );
    let unknown_field =
        format!(r#"{{"stages":[{{"stage":"crypt","key":"{KEY}","colour":"{KEY}"}}]}}"#);
    for (bad, why) in [
        (
            r#"{"stages":[{"stage":"teleport"}]}"#.to_string(),
            "teleport",
        ),
        (short_key, "128 hex digits"),
        (equal_halves, "halves"),
        (not_hex, "hex"),
        (unknown_field, "colour"),
        ("{\"stages\": [".to_string(), "bad policy"),
        (
            r#"{"stages":[{"stage":"qos","rw_ios_per_sec":"many"}]}"#.to_string(),
            "bad policy",
        ),
    ] {
        let e = set(&rt, &mut c, "disk0", &bad).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e}");
        assert!(e.message().contains(why), "{bad}: {}", e.message());
        assert!(!leaks_key(e.message()), "{}", e.message());
    }
    let e = set(&rt, &mut c, "", &meter()).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(get(&rt, &mut c, "disk0").unwrap().version, second.version);
    // Give a wrongly sent change time to arrive before looking.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.policies().spec(device_key("disk0")),
        spec(&meter_and_crypt())
    );

    // The same policy again changes nothing (the stages keep counting).
    let again = set(&rt, &mut c, "disk0", &meter_and_crypt()).unwrap();
    assert_eq!(again.version, second.version);

    // An empty policy clears it, at the controller and at the server.
    let cleared = set(&rt, &mut c, "disk0", "").unwrap();
    assert!(cleared.cleared);
    assert!(cleared.version > second.version);
    wait_for_policy(&server, "disk0", &PolicySpec::default(), LIVE);
    assert_eq!(
        get(&rt, &mut c, "disk0").unwrap_err().code(),
        Code::NotFound
    );

    // Without the token, neither Set nor Watch answers.
    let mut stranger = rt.block_on(connect(&addr, Some("wrong"))).unwrap();
    let e = set(&rt, &mut stranger, "disk0", &meter()).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = rt
        .block_on(stranger.watch_policies(pb::WatchPoliciesRequest::default()))
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[test]
fn policies_survive_a_controller_restart_and_reach_servers_that_join_later() {
    let dir = tempfile::tempdir().unwrap();
    let (v0, v1);
    {
        let (_ctrl, addr) = start_controller(dir.path());
        let rt1 = rt();
        let mut c = client(&rt1, &addr);
        v0 = set(&rt1, &mut c, "disk0", &meter_and_crypt())
            .unwrap()
            .version;
        v1 = set(&rt1, &mut c, "net0", &meter()).unwrap().version;
        set(&rt1, &mut c, "gone", &meter()).unwrap();
        set(&rt1, &mut c, "gone", "").unwrap();
        // The file holds the key (servers need it), and only its owner may
        // read it.
        use std::os::unix::fs::PermissionsExt;
        let state = dir.path().join("state.json");
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // An idle connection on a runtime nobody drives would hold up the
        // controller's graceful shutdown: close it first.
        drop(c);
        drop(rt1);
    }

    // (c) A new controller on the same state directory has them all.
    let (_ctrl, addr) = start_controller(dir.path());
    let rt = rt();
    let mut c = client(&rt, &addr);
    let got = get(&rt, &mut c, "disk0").unwrap();
    assert_eq!(got.version, v0);
    assert_eq!(spec(&got.policy_json), spec(&meter_and_crypt()).redacted());
    assert_eq!(get(&rt, &mut c, "net0").unwrap().version, v1);
    assert_eq!(get(&rt, &mut c, "gone").unwrap_err().code(), Code::NotFound);
    // Versions keep growing after the restart.
    let v2 = set(
        &rt,
        &mut c,
        "net0",
        r#"{"stages":[{"stage":"meter"},{"stage":"net_rate","frames_per_sec":1000}]}"#,
    )
    .unwrap()
    .version;
    assert!(v2 > v0 && v2 > v1, "{v2} after {v0}, {v1}");

    // A server that joins gets every policy, keys included.
    let s1 = io_server();
    let _m1 = join_as_server(opts(&addr), "s1".into(), 16, s1.clone()).unwrap();
    wait_for_policy(&s1, "disk0", &spec(&meter_and_crypt()), DEADLINE);
    let net0 = get(&rt, &mut c, "net0").unwrap();
    wait_for_policy(&s1, "net0", &spec(&net0.policy_json), DEADLINE);

    // (d) So does one that joins later (a device that fails over or moves
    // to it finds its policy there), and a change reaches both.
    let s2 = io_server();
    let _m2 = join_as_server(opts(&addr), "s2".into(), 16, s2.clone()).unwrap();
    wait_for_policy(&s2, "disk0", &spec(&meter_and_crypt()), DEADLINE);
    wait_for_policy(&s2, "net0", &spec(&net0.policy_json), DEADLINE);
    assert_eq!(
        s2.policies().spec(device_key("gone")),
        PolicySpec::default()
    );
    // Once s2 is registered its watch has had time to start; a change
    // then reaches both servers.
    wait_for_servers(&opts(&addr), 2, DEADLINE).unwrap();
    set(&rt, &mut c, "disk0", &meter()).unwrap();
    for s in [&s1, &s2] {
        wait_for_policy(s, "disk0", &spec(&meter()), DEADLINE);
    }
}

#[test]
fn a_server_that_reconnects_drops_policies_cleared_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let server = io_server();
    let (ctrl, addr) = start_controller(dir.path());
    let rt = rt();
    let mut c = client(&rt, &addr);
    set(&rt, &mut c, "disk0", &meter()).unwrap();
    set(&rt, &mut c, "disk1", &meter()).unwrap();
    let _member = join_as_server(opts(&addr), "s1".into(), 16, server.clone()).unwrap();
    wait_for_policy(&server, "disk1", &spec(&meter()), DEADLINE);
    // See policies_survive_a_controller_restart...: close our connection
    // before stopping the controller.
    drop(c);
    drop(rt);
    drop(ctrl);

    // While the controller is down nobody watches; it comes back on the
    // same port with disk1's policy cleared (an operator edited it
    // through another controller of the same store, as after a leader
    // change).
    let port_addr = addr.clone();
    let store = vrio_control::store::FileStore::open(dir.path()).unwrap();
    let ctrl = Arc::new(
        vrio_control::Controller::open(
            vrio_control::ControllerConfig {
                lease_ttl_ms: 1_500,
                ..Default::default()
            },
            Box::new(store),
            Box::new(vrio_control::placement::LeastLoaded::default()),
            vrio_control::service::now_ms(),
        )
        .unwrap(),
    );
    ctrl.set_device_policy("disk1", PolicySpec::default())
        .unwrap();
    let rebind = Instant::now();
    let listener = loop {
        // The old listener's port may take a moment to be free again.
        match std::net::TcpListener::bind(&port_addr) {
            Ok(l) => break l,
            Err(e) => {
                assert!(rebind.elapsed() < DEADLINE, "rebind: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    listener.set_nonblocking(true).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = std::thread::spawn(move || {
        let own = self::rt();
        own.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            vrio_control::server::serve(
                l,
                ctrl,
                vrio_control::server::ServeOptions {
                    token: Some(TOKEN.into()),
                    rebalance_every: None,
                    ..Default::default()
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
            .unwrap();
        })
    });
    wait_for_policy(&server, "disk1", &PolicySpec::default(), DEADLINE);
    assert_eq!(server.policies().spec(device_key("disk0")), spec(&meter()));
    let _ = stop_tx.send(());
    serving.join().unwrap();
}

#[test]
fn stage_counters_travel_from_the_servers_to_get_device_policy() {
    let dir = tempfile::tempdir().unwrap();
    // A short lease: servers report (and renew) every 200 ms.
    let (_ctrl, addr) = embedded_controller(dir.path(), TOKEN, 600).unwrap();
    let server = io_server();
    let _member = join_as_server(opts(&addr), "s1".into(), 16, server.clone()).unwrap();
    let rt = rt();
    let mut c = client(&rt, &addr);
    let json = r#"{"stages":[{"stage":"meter"},{"stage":"qos","rw_ios_per_sec":100000}]}"#;
    set(&rt, &mut c, "disk0", json).unwrap();
    wait_for_policy(&server, "disk0", &spec(json), DEADLINE);

    // Three reads complete through the device's pipeline, as its queues
    // would report them.
    let key = device_key("disk0");
    let pipeline = server.policies().interposer(key).pipeline();
    for (i, us) in [30u64, 30, 4_000].into_iter().enumerate() {
        let req = Request {
            device: key,
            op: Op::Read,
            sector: i as u64 * 8,
            len: 4096,
            frame: None,
            arrived: Instant::now(),
            vm_host: 0,
        };
        pipeline.completed(&req, 0, Duration::from_micros(us));
    }

    // (f) The next load report carries them to the controller.
    let start = Instant::now();
    let report = loop {
        let got = get(&rt, &mut c, "disk0").unwrap();
        let meter = got
            .reports
            .iter()
            .find(|r| r.server_id == "s1")
            .and_then(|r| r.stages.first().cloned());
        match meter {
            Some(m)
                if m.counters
                    .iter()
                    .any(|c| c.name == "requests" && c.value == 3) =>
            {
                assert_eq!(got.reports[0].stages.len(), 2);
                assert_eq!(got.reports[0].stages[1].kind, "qos");
                assert!(got.reports[0].reported_unix_ms > 0);
                break m;
            }
            _ => {
                assert!(start.elapsed() < DEADLINE, "no stage report: {got:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let r = vrio_control::policy::report_from_pb(&report);
    assert_eq!(r.kind, "meter");
    assert_eq!(r.counter("requests", "read"), 3);
    assert_eq!(r.counter("bytes", "read"), 3 * 4096);
    assert_eq!(r.counter("errors", "read"), 0);
    let h = r.latency.expect("meter keeps a histogram");
    assert_eq!(h.bounds, LATENCY_BOUNDS.to_vec());
    assert_eq!(h.count(), 3);
    assert_eq!(h.quantile(0.5), Some(50e-6));
    assert_eq!(h.quantile(0.99), Some(5e-3));

    // A device without a policy has nothing to show.
    assert_eq!(
        get(&rt, &mut c, "disk9").unwrap_err().code(),
        Code::NotFound
    );
}

#[test]
fn stage_reports_are_kept_per_live_server_in_memory() {
    use vrio_control::placement::LeastLoaded;
    use vrio_control::state::Registration;
    use vrio_control::store::MemoryStore;
    use vrio_control::{Controller, ControllerConfig};
    use vrio_core::interpose::{StageCounter, StageReport};

    let c = Controller::open(
        ControllerConfig {
            lease_ttl_ms: 1_000,
            ..ControllerConfig::default()
        },
        Box::new(MemoryStore::default()),
        Box::new(LeastLoaded::default()),
        0,
    )
    .unwrap();
    let report = |n: u64| {
        vec![(
            device_key("disk0"),
            vec![StageReport {
                kind: "meter".into(),
                counters: vec![StageCounter {
                    name: "requests".into(),
                    label: "read".into(),
                    value: n,
                }],
                latency: None,
            }],
        )]
    };
    let e = c.record_stage_reports("nobody", report(1), 0).unwrap_err();
    assert!(e.to_string().contains("nobody"), "{e}");
    for (id, at) in [("a", 0), ("b", 500)] {
        c.register_server(
            Registration {
                id: id.into(),
                address: format!("{id}:1"),
                sidecores: 1,
                capacity: 4,
            },
            at,
        )
        .unwrap();
    }
    c.record_stage_reports("a", report(1), 10).unwrap();
    c.record_stage_reports("b", report(7), 20).unwrap();
    // The latest report replaces the previous one.
    c.record_stage_reports("a", report(3), 30).unwrap();
    let got = c.stage_reports("disk0");
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].server.as_str(), got[0].at_ms), ("a", 30));
    assert_eq!(got[0].stages[0].counter("requests", "read"), 3);
    assert_eq!(got[1].stages[0].counter("requests", "read"), 7);
    assert!(c.stage_reports("disk1").is_empty());
    // A server whose lease expired no longer counts.
    c.expire_leases(1_200).unwrap();
    let got = c.stage_reports("disk0");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].server, "b");
    // Nothing of it is persisted: a policy change saves no report.
    c.set_device_policy("disk0", spec(&meter())).unwrap();
    assert!(c.device_policy("disk0").is_some());
}
