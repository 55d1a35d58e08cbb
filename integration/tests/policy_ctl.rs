//! `vrio-ctl policy` against a real `vrio-controller`: set a policy from a
//! file and from `--json`, refuse bad ones with a clear error that does not
//! repeat the key, and show the policy (key redacted) with the counters an
//! I/O server joined to the controller reports, meter latencies included.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vrio_control::{join_as_server, ControlOpts};
use vrio_core::blk::MemoryBackend;
use vrio_core::interpose::{Op, PolicySpec, Request};
use vrio_core::remote::{device_key, IoServer, IoServerConfig};
use vrio_integration::rxe;

const TOKEN: &str = "policy-ctl-test-token";
const DEADLINE: Duration = Duration::from_secs(60);
const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                   f0e0d0c0b0a090807060504030201000ffeeddccbbaa99887766554433221100";

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

fn start_controller(bin: &Path) -> Controller {
    let mut child = Command::new(bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--memory",
            "--rebalance-secs",
            "0",
            "--lease-ttl-ms",
            "900",
        ])
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
    assert!(addr.starts_with("127.0.0.1:"), "first line {line:?}");
    Controller { child, addr }
}

fn ctl(bin: &Path, addr: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(bin)
        .args(["--addr", addr])
        .args(args)
        .env("VRIO_TOKEN", TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
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

fn fails(out: Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "vrio-ctl should fail, stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains(needle),
        "stderr {err:?} should mention {needle:?}"
    );
    err
}

fn leaks_key(text: &str) -> bool {
    (0..KEY.len() - 16).any(|i| text.contains(&KEY[i..i + 16]))
}

fn scratch() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("policy-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn ctl_sets_and_shows_policies_with_the_servers_counters() {
    let (ctrl_bin, ctl_bin) = (
        rxe::bin("vrio-examples", "vrio-controller"),
        rxe::bin("vrio-examples", "vrio-ctl"),
    );
    let ctrl = start_controller(&ctrl_bin);
    let addr = ctrl.addr.as_str();
    let domain = Arc::from(vrio_rdma::open(vrio_rdma::Backend::Soft, None).unwrap());
    let server = Arc::new(
        IoServer::start(
            domain,
            Arc::new(MemoryBackend::new(1 << 20)),
            IoServerConfig {
                sidecores: 1,
                ..IoServerConfig::default()
            },
        )
        .unwrap(),
    );
    let _member = join_as_server(
        ControlOpts {
            addr: addr.to_string(),
            token: Some(TOKEN.into()),
            tls: None,
        },
        "io-a".into(),
        8,
        server.clone(),
    )
    .unwrap();

    // From a file: the way to pass a key.
    let dir = scratch();
    let file = dir.join("disk0.json");
    let with_key =
        format!(r#"{{"stages":[{{"stage":"meter"}},{{"stage":"crypt","key":"{KEY}"}}]}}"#);
    std::fs::write(&file, &with_key).unwrap();
    let said = ok(ctl(
        &ctl_bin,
        addr,
        &["policy", "set", "disk0", "--file", file.to_str().unwrap()],
        None,
    ));
    assert!(said.contains("meter,crypt"), "{said}");
    assert!(!leaks_key(&said), "{said}");

    // The server applies it, key included.
    let want = PolicySpec::parse(&with_key).unwrap();
    let start = Instant::now();
    while server.policies().spec(device_key("disk0")) != want {
        assert!(start.elapsed() < DEADLINE, "policy never reached io-a");
        std::thread::sleep(Duration::from_millis(10));
    }

    // --json JSON after `policy set`, and stdin with --file -.
    let said = ok(ctl(
        &ctl_bin,
        addr,
        &[
            "policy",
            "set",
            "net0",
            "--json",
            r#"{"stages":[{"stage":"net_rate","frames_per_sec":1000}]}"#,
        ],
        None,
    ));
    assert!(said.contains("net_rate"), "{said}");
    let v: Value = serde_json::from_str(&ok(ctl(
        &ctl_bin,
        addr,
        &["--json", "policy", "set", "disk1", "--file", "-"],
        Some(r#"{"stages":[{"stage":"qos","rw_ios_per_sec":500}]}"#),
    )))
    .unwrap();
    assert_eq!(v["policy"]["stages"][0]["rw_ios_per_sec"], 500);

    // Bad policies: a clear error, no key, and the old policy stays.
    let err = fails(
        ctl(
            &ctl_bin,
            addr,
            &["policy", "set", "disk0", "--file", "-"],
            Some(&format!(
                r#"{{"stages":[{{"stage":"crypt","key":"{}"}}]}}"#,
                &KEY[..126]
            )),
        ),
        "128 hex digits",
    );
    assert!(!leaks_key(&err), "{err}");
    fails(
        ctl(
            &ctl_bin,
            addr,
            &[
                "policy",
                "set",
                "disk0",
                "--json",
                r#"{"stages":[{"stage":"zip"}]}"#,
            ],
            None,
        ),
        "unknown variant `zip`",
    );
    fails(
        ctl(&ctl_bin, addr, &["policy", "set", "disk0"], None),
        "--file FILE or --json JSON",
    );
    fails(
        ctl(&ctl_bin, addr, &["policy", "show", "disk7"], None),
        "has no policy",
    );
    assert_eq!(server.policies().spec(device_key("disk0")), want);

    // Requests complete through the device's stages, as its queues would
    // report them: two fast reads, a slow write that failed.
    let key = device_key("disk0");
    let pipeline = server.policies().interposer(key).pipeline();
    for (op, status, us) in [(Op::Read, 0, 40), (Op::Read, 0, 40), (Op::Write, 1, 20_000)] {
        let req = Request {
            device: key,
            op,
            sector: 0,
            len: 4096,
            frame: None,
            arrived: Instant::now(),
            vm_host: 0,
        };
        pipeline.completed(&req, status, Duration::from_micros(us));
    }

    // `policy show --json` gets them with the next load report.
    let start = Instant::now();
    let shown = loop {
        let v: Value = serde_json::from_str(&ok(ctl(
            &ctl_bin,
            addr,
            &["policy", "show", "disk0", "--json"],
            None,
        )))
        .unwrap();
        let requests = &v["servers"][0]["stages"][0]["ops"]["read"]["requests"];
        if requests == 2 {
            break v;
        }
        assert!(start.elapsed() < DEADLINE, "no counters: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!leaks_key(&shown.to_string()), "{shown}");
    assert_eq!(shown["policy"]["stages"][1]["key"], "redacted");
    let s = &shown["servers"][0];
    assert_eq!(s["server"], "io-a");
    let meter = &s["stages"][0];
    assert_eq!(meter["kind"], "meter");
    assert_eq!(meter["ops"]["read"]["bytes"], 8192);
    assert_eq!(meter["ops"]["write"]["errors"], 1);
    assert_eq!(meter["latency"]["count"], 3);
    assert_eq!(meter["latency"]["p50_s"], 50e-6);
    assert_eq!(meter["latency"]["p99_s"], 25e-3);
    assert_eq!(s["stages"][1]["kind"], "crypt");

    // The table says the same.
    let text = ok(ctl(&ctl_bin, addr, &["policy", "show", "disk0"], None));
    assert!(!leaks_key(&text), "{text}");
    assert!(text.contains("\"redacted\""), "{text}");
    assert!(text.contains("server io-a"), "{text}");
    assert!(text.contains("p50 50us  p99 25ms  (3 requests)"), "{text}");
    let read_row = text
        .lines()
        .find(|l| l.trim_start().starts_with("read "))
        .unwrap_or_else(|| panic!("no read row: {text}"));
    let cells: Vec<&str> = read_row.split_whitespace().collect();
    assert_eq!(cells, ["read", "2", "8192", "0"], "{text}");

    // Clearing: nothing left to show, and the server interposes nothing.
    ok(ctl(&ctl_bin, addr, &["policy", "clear", "disk0"], None));
    fails(
        ctl(&ctl_bin, addr, &["policy", "show", "disk0"], None),
        "has no policy",
    );
    let start = Instant::now();
    while !server.policies().spec(key).stages.is_empty() {
        assert!(start.elapsed() < DEADLINE, "clear never reached io-a");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
