//! The control plane end to end: the vrio-controller binary on 127.0.0.1:0,
//! servers and a device registered through the client library, and vrio-ctl
//! for tables, JSON, move, drain, watch, auth rejection and restart recovery.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use vrio_control::client::connect;
use vrio_control::pb;
use vrio_integration::rxe;

const TOKEN: &str = "ctl-test-token";

/// Kills the controller it started when the test ends, pass or fail.
struct Controller {
    child: Child,
    addr: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_controller(bin: &Path, state: &[&str]) -> Controller {
    let mut child = Command::new(bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--lease-ttl-ms",
            "600000",
            "--rebalance-secs",
            "0",
        ])
        .args(state)
        .env("VRIO_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().to_string();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "first stdout line should be the bound address, got {line:?}"
    );
    Controller { child, addr }
}

fn ctl(bin: &Path, addr: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.arg("--addr")
        .arg(addr)
        .args(args)
        .env_remove("VRIO_TOKEN");
    if let Some(t) = token {
        cmd.env("VRIO_TOKEN", t);
    }
    cmd.output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "vrio-ctl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "vrio-ctl should fail, stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains(needle),
        "stderr {err:?} should mention {needle:?}"
    );
}

fn json(out: Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn slot_of(assignments: &Value, device: &str, queue: u64) -> (String, u64, u64) {
    let a = assignments
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["device"] == device && a["queue"] == queue)
        .unwrap_or_else(|| panic!("no {device}/{queue} in {assignments}"));
    (
        a["server"].as_str().unwrap().to_string(),
        a["sidecore"].as_u64().unwrap(),
        a["generation"].as_u64().unwrap(),
    )
}

fn bins() -> (PathBuf, PathBuf) {
    let controller =
        rxe::build_bin("vrio-examples", "vrio-controller").unwrap_or_else(|e| panic!("{e}"));
    let ctl = rxe::build_bin("vrio-examples", "vrio-ctl").unwrap_or_else(|e| panic!("{e}"));
    (controller, ctl)
}

async fn populate(addr: &str) {
    let mut c = connect(addr, Some(TOKEN)).await.unwrap();
    for id in ["io-a", "io-b"] {
        c.register_server(pb::RegisterServerRequest {
            id: id.into(),
            address: format!("{id}.rack1:7471"),
            sidecores: 2,
            capacity: 8,
        })
        .await
        .unwrap();
    }
    c.attach_device(pb::AttachDeviceRequest {
        device: Some(pb::Device {
            id: "disk0".into(),
            vm_id: "vm7".into(),
            r#type: pb::DeviceType::Blk as i32,
            queues: 2,
            agent_address: "host3:7000".into(),
            pinned_server_id: String::new(),
        }),
    })
    .await
    .unwrap();
}

fn read_event(lines: &mut std::io::Lines<BufReader<ChildStdout>>) -> Value {
    let line = lines.next().expect("watch ended early").unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn ctl_moves_drains_watches_and_rejects_bad_tokens() {
    let (controller_bin, ctl_bin) = bins();
    let ctrl = start_controller(&controller_bin, &["--memory"]);
    let addr = ctrl.addr.as_str();
    populate(addr).await;

    // Tables.
    let servers = ok(ctl(&ctl_bin, addr, Some(TOKEN), &["servers"]));
    let lines: Vec<&str> = servers.lines().collect();
    assert!(
        lines[0].starts_with("SERVER") && lines[0].contains("QUEUES"),
        "{servers}"
    );
    assert_eq!(lines.len(), 3, "{servers}");
    assert!(
        lines[1].starts_with("io-a") && lines[1].contains("alive"),
        "{servers}"
    );
    let devices = ok(ctl(&ctl_bin, addr, Some(TOKEN), &["devices"]));
    assert!(
        devices
            .lines()
            .any(|l| l.starts_with("disk0") && l.contains("vm7") && l.contains("blk")),
        "{devices}"
    );

    // Move a queue to a sidecore it is not on, check table and JSON.
    let before = json(ctl(&ctl_bin, addr, Some(TOKEN), &["--json", "assignments"]));
    let (server, core, generation) = slot_of(&before, "disk0", 0);
    let target = if server == "io-b" && core == 1 {
        ("io-a", 0)
    } else {
        ("io-b", 1)
    };
    let moved = ok(ctl(
        &ctl_bin,
        addr,
        Some(TOKEN),
        &["move", "disk0", "0", target.0, &target.1.to_string()],
    ));
    assert!(
        moved
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("disk0") && l.contains(target.0)),
        "{moved}"
    );
    let after = json(ctl(&ctl_bin, addr, Some(TOKEN), &["--json", "assignments"]));
    assert_eq!(
        slot_of(&after, "disk0", 0),
        (target.0.to_string(), target.1, generation + 1)
    );
    assert_eq!(slot_of(&after, "disk0", 1), slot_of(&before, "disk0", 1));
    let table = ok(ctl(
        &ctl_bin,
        addr,
        Some(TOKEN),
        &["assignments", "--device", "disk0"],
    ));
    assert_eq!(table.lines().count(), 3, "{table}");

    // Clear errors for impossible requests; state unchanged.
    fails(
        ctl(
            &ctl_bin,
            addr,
            Some(TOKEN),
            &["move", "disk0", "0", "nope", "0"],
        ),
        "not found",
    );
    fails(
        ctl(
            &ctl_bin,
            addr,
            Some(TOKEN),
            &["move", "disk0", "0", "io-a", "9"],
        ),
        "invalid request",
    );
    fails(
        ctl(
            &ctl_bin,
            addr,
            Some(TOKEN),
            &["move", "disk9", "0", "io-a", "0"],
        ),
        "not found",
    );
    assert_eq!(
        json(ctl(&ctl_bin, addr, Some(TOKEN), &["--json", "assignments"])),
        after
    );

    // Auth: no token and a wrong token are both rejected, by the CLI and the library.
    fails(ctl(&ctl_bin, addr, None, &["servers"]), "not authenticated");
    fails(
        ctl(
            &ctl_bin,
            addr,
            Some("wrong"),
            &["move", "disk0", "0", "io-a", "0"],
        ),
        "not authenticated",
    );
    let mut bad = connect(addr, Some("wrong")).await.unwrap();
    assert_eq!(
        bad.list_servers(pb::ListServersRequest {})
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        json(ctl(&ctl_bin, addr, Some(TOKEN), &["--json", "assignments"])),
        after
    );

    // Watch: two snapshot events, then the drain's moves.
    let mut watch = Command::new(&ctl_bin)
        .args(["--addr", addr, "--json", "watch", "--count", "4"])
        .env("VRIO_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        assert_eq!(read_event(&mut lines)["kind"], "snapshot");
    }
    let on_b = after
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["server"] == "io-b")
        .count();
    let drained = json(ctl(
        &ctl_bin,
        addr,
        Some(TOKEN),
        &["--json", "drain", "io-a"],
    ));
    let drained = drained.as_array().unwrap();
    assert_eq!(drained.len(), 2 - on_b);
    assert!(drained.iter().all(|a| a["server"] == "io-b"));
    let mut moves = 0;
    while moves < drained.len() {
        let e = read_event(&mut lines);
        assert_eq!(e["kind"], "moved", "{e}");
        assert_eq!(e["reason"], "drain");
        assert_eq!(e["previous"]["server"], "io-a");
        assert_eq!(e["assignment"]["server"], "io-b");
        moves += 1;
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let servers = json(ctl(&ctl_bin, addr, Some(TOKEN), &["--json", "servers"]));
    assert_eq!(servers[0]["id"], "io-a");
    assert_eq!(servers[0]["draining"], true);
    assert_eq!(servers[0]["assigned_queues"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_controller_restarts_with_every_assignment() {
    let (controller_bin, ctl_bin) = bins();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("control-plane-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = ["--state-dir", dir.to_str().unwrap()];
    let before;
    {
        let ctrl = start_controller(&controller_bin, &state);
        populate(&ctrl.addr).await;
        let a = json(ctl(
            &ctl_bin,
            &ctrl.addr,
            Some(TOKEN),
            &["--json", "assignments"],
        ));
        let (server, _, _) = slot_of(&a, "disk0", 1);
        let other = if server == "io-a" { "io-b" } else { "io-a" };
        ok(ctl(
            &ctl_bin,
            &ctrl.addr,
            Some(TOKEN),
            &["move", "disk0", "1", other, "1"],
        ));
        before = json(ctl(
            &ctl_bin,
            &ctrl.addr,
            Some(TOKEN),
            &["--json", "assignments"],
        ));
        // Dropping the guard SIGKILLs the controller: no clean shutdown.
    }
    let ctrl = start_controller(&controller_bin, &state);
    let after = json(ctl(
        &ctl_bin,
        &ctrl.addr,
        Some(TOKEN),
        &["--json", "assignments"],
    ));
    assert_eq!(after, before);
    let stats = json(ctl(&ctl_bin, &ctrl.addr, Some(TOKEN), &["--json", "stats"]));
    assert_eq!(stats["moves"], 1);
    assert_eq!(stats["alive_servers"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a CA and two leaves it signs (the controller for localhost, an
/// operator) as PEM files; returns (ca, controller cert, key, operator cert, key).
fn write_pki(dir: &Path) -> [PathBuf; 5] {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
    let paths = ["ca.pem", "ctl.pem", "ctl.key", "op.pem", "op.key"].map(|n| dir.join(n));
    std::fs::write(&paths[0], ca.pem()).unwrap();
    for (i, sans) in [
        (1, vec!["localhost".to_string()]),
        (3, vec!["operator".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(&paths[i], cert.pem()).unwrap();
        std::fs::write(&paths[i + 1], key.serialize_pem()).unwrap();
    }
    paths
}

/// The binaries over mutual TLS: vrio-ctl with a certificate from the
/// controller's CA gets in; without one, or in plaintext, it is refused
/// with an error that says so.
#[test]
fn ctl_talks_to_the_controller_over_mutual_tls() {
    let (controller, ctl_bin) = bins();
    let dir = std::env::temp_dir().join(format!("vrio-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let [ca, cert, key, op_cert, op_key] = write_pki(&dir);
    let c = start_controller(
        &controller,
        &[
            "--memory",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-client-ca",
            ca.to_str().unwrap(),
        ],
    );
    let tls = [
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        op_cert.to_str().unwrap(),
        "--tls-key",
        op_key.to_str().unwrap(),
    ];
    let args: Vec<&str> = tls.iter().copied().chain(["stats", "--json"]).collect();
    let stats = json(ctl(&ctl_bin, &c.addr, Some(TOKEN), &args));
    assert_eq!(stats["servers"], 0, "{stats}");
    // Plaintext to the TLS port.
    let out = ctl(&ctl_bin, &c.addr, Some(TOKEN), &["stats"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-ca"), "should point at TLS: {err}");
    // TLS, but no client certificate: only the CA.
    let out = ctl(
        &ctl_bin,
        &c.addr,
        Some(TOKEN),
        &["--tls-ca", ca.to_str().unwrap(), "stats"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls-cert"),
        "should say what is missing: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
