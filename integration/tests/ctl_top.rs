//! `vrio-ctl top` against a real `vrio-controller --memory` and a
//! `vrio-server` registered with it and serving `--metrics-listen`, while a
//! `vrio-client synthetic` the controller placed on it runs: with stdout
//! piped, it prints plain snapshots (no escape sequences) naming the server
//! and its sidecores and the scraped endpoint, and the client's queues with
//! their own req/s and p99 from the server's `vrio_queue_*` figures; a
//! metrics URL that fails is shown, not fatal; `--json` prints one object
//! per refresh, with the queues' own figures; an unreachable controller is
//! a clear error.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{soft_server, synthetic_client};
use vrio_integration::rxe;

const TOKEN: &str = "ctl-top-test-token";

struct Bins {
    server: PathBuf,
    controller: PathBuf,
    client: PathBuf,
    ctl: PathBuf,
}

fn bins() -> &'static Bins {
    static BINS: std::sync::OnceLock<Bins> = std::sync::OnceLock::new();
    BINS.get_or_init(|| Bins {
        server: rxe::bin("vrio-examples", "vrio-server"),
        controller: rxe::bin("vrio-examples", "vrio-controller"),
        client: rxe::bin("vrio-examples", "vrio-client"),
        ctl: rxe::bin("vrio-examples", "vrio-ctl"),
    })
}

/// A child killed when the test ends, whose output lines arrive on a
/// channel.
struct Proc {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let (tx, lines) = mpsc::channel();
        let outs: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for out in outs {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    println!("  {name}| {l}");
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
        }
        Proc { name, child, lines }
    }

    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!(
                    "{}: no line with {needle:?} within {within:?} ({e})",
                    self.name
                ),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs vrio-ctl with `args` and stdout piped, killed after `within`.
fn ctl(bin: &Path, args: &[&str], within: Duration) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .env("VRIO_TOKEN", TOKEN)
        .env_remove("VRIO_CONTROLLER")
        .env_remove("VRIO_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vrio-ctl");
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("vrio-ctl output");
            panic!(
                "vrio-ctl {args:?} did not exit within {within:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("vrio-ctl output");
    println!(
        "vrio-ctl {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn top_shows_servers_sidecores_and_scraped_metrics() {
    let b = bins();
    let mut controller = Proc::spawn(
        "controller",
        Command::new(&b.controller)
            .args(["--memory", "--listen", "127.0.0.1:0"])
            .env("VRIO_TOKEN", TOKEN)
            .env_remove("VRIO_LOG_FORMAT"),
    );
    let control_addr = controller
        .wait_for("127.0.0.1:", Duration::from_secs(60))
        .trim()
        .to_string();
    let mut server = Proc::spawn(
        "server",
        soft_server(&b.server)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--controller", &control_addr, "--server-id", "io-top"])
            .env("VRIO_TOKEN", TOKEN)
            .env_remove("VRIO_LOG_FORMAT"),
    );
    let line = server.wait_for("metrics listening on", Duration::from_secs(60));
    let metrics_url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();

    // Wait until the controller lists the server (it registers after
    // printing its addresses).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ctl(
            &b.ctl,
            &["--addr", &control_addr, "servers"],
            Duration::from_secs(30),
        );
        if String::from_utf8_lossy(&out.stdout).contains("io-top") {
            break;
        }
        assert!(Instant::now() < deadline, "io-top never registered");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A workload on the server: one guest with two queues, placed by the
    // controller (so top knows the queues' devices), running until the
    // test ends (Drop kills it).
    let mut client = Proc::spawn(
        "client",
        synthetic_client(&b.client, "--controller", &control_addr, 1)
            .args(["--queues", "2", "--seconds", "600", "--depth", "4"])
            .env("VRIO_TOKEN", TOKEN)
            .env_remove("VRIO_LOG_FORMAT"),
    );
    client.wait_for("attached to", Duration::from_secs(60));

    // Piped: two plain snapshots, a blank line between them.
    let dead_url = "http://127.0.0.1:1/metrics";
    let out = ctl(
        &b.ctl,
        &[
            "--addr",
            &control_addr,
            "top",
            "--count",
            "2",
            "--interval",
            "0.5",
            "--metrics",
            &metrics_url,
            "--metrics",
            dead_url,
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "vrio-ctl top failed: {}", out.status);
    assert!(!out.stdout.contains(&0x1b), "escape bytes in piped output");
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert_eq!(
        text.matches("vrio top: controller").count(),
        2,
        "not two snapshots:\n{text}"
    );
    assert!(text.contains("\n\nvrio top: controller"), "{text}");
    for needle in [
        "SERVERS",
        "SIDECORES",
        "QUEUES",
        &format!("METRICS {metrics_url}"),
        &format!("METRICS {dead_url}"),
        "error: ",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    // The server, alive, and its two sidecores in the controller's table.
    let server_row = text
        .lines()
        .find(|l| l.starts_with("io-top ") && l.contains("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no server row in:\n{text}"));
    assert!(server_row.contains(" yes "), "not alive: {server_row}");
    for i in ["0", "1"] {
        assert!(
            text.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.first() == Some(&"io-top") && w.get(1) == Some(&i)
            }),
            "no sidecore {i} row in:\n{text}"
        );
    }
    // The second snapshot has rates from the scrapes: a busy % for both
    // sidecores of the endpoint.
    let last = text
        .rsplit("vrio top: controller")
        .next()
        .unwrap_or_default();
    let scraped = last
        .split(&format!("METRICS {metrics_url}"))
        .nth(1)
        .unwrap_or_default();
    for i in ["0", "1"] {
        assert!(
            scraped.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.first() == Some(&i) && w.get(1).is_some_and(|b| b.ends_with('%'))
            }),
            "no rate for sidecore {i} in:\n{last}"
        );
    }
    // The client's queues, on io-top, with their own req/s (> 0) and p99
    // (a bound of the server's latency histogram) from vrio_queue_*.
    let queues = last.split("\nQUEUES").nth(1).unwrap_or_default();
    assert!(
        queues
            .lines()
            .nth(1)
            .is_some_and(|h| h.contains("REQ/S") && h.contains("P99") && h.contains("IN FLIGHT")),
        "no REQ/S and P99 columns in:\n{last}"
    );
    let bounds = [
        "10us", "25us", "50us", "100us", "250us", "500us", "1ms", "2.5ms", "5ms", "10ms", "25ms",
        "50ms", "100ms", "250ms", "500ms", "1s", "2.5s", "5s", "10s", ">10s",
    ];
    for q in ["0", "1"] {
        let row: Vec<&str> = queues
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.first() == Some(&"synthetic-d0") && w.get(1) == Some(&q))
            .unwrap_or_else(|| panic!("no row for synthetic-d0 queue {q} in:\n{last}"));
        // DEVICE QUEUE SERVER SIDECORE REQ/S P99 IN-FLIGHT, then the
        // sidecore's BUSY REQ/S FROM.
        assert_eq!(row.len(), 10, "{row:?}");
        assert_eq!(row[2], "io-top", "{row:?}");
        let rps: f64 = row[4]
            .parse()
            .unwrap_or_else(|_| panic!("no req/s for queue {q}: {row:?}\n{last}"));
        assert!(rps > 0.0, "queue {q} did no requests: {row:?}\n{last}");
        assert!(bounds.contains(&row[5]), "no p99 for queue {q}: {row:?}");
        assert!(row[6].parse::<u64>().is_ok(), "no in flight: {row:?}");
        assert_eq!(row[9], "metrics", "{row:?}");
    }

    // --json: one object per refresh.
    let out = ctl(
        &b.ctl,
        &[
            "--addr",
            &control_addr,
            "--json",
            "top",
            "--count",
            "1",
            "--metrics",
            &metrics_url,
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "vrio-ctl --json top failed");
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert_eq!(text.lines().count(), 1, "not one line:\n{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON object");
    assert_eq!(v["servers"][0]["id"], "io-top", "{v}");
    assert_eq!(v["servers"][0]["alive"], true, "{v}");
    assert_eq!(v["sidecores"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["metrics"][0]["url"], metrics_url.as_str(), "{v}");
    assert!(v["metrics"][0]["error"].is_null(), "{v}");
    assert_eq!(
        v["metrics"][0]["sidecores"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    // The queues' own figures: counts from the first scrape, no rates yet.
    let queues = v["queues"].as_array().cloned().unwrap_or_default();
    assert_eq!(queues.len(), 2, "{v}");
    for q in &queues {
        assert!(
            q["queue_load"]["requests_total"].as_f64() > Some(0.0),
            "{q}"
        );
        assert!(q["queue_load"]["requests_per_sec"].is_null(), "{q}");
        assert_eq!(q["from"], "metrics", "{q}");
    }

    // --json, two refreshes: the second has the queues' rates and p99s,
    // ranked by them.
    let out = ctl(
        &b.ctl,
        &[
            "--addr",
            &control_addr,
            "--json",
            "top",
            "--count",
            "2",
            "--interval",
            "0.5",
            "--metrics",
            &metrics_url,
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "vrio-ctl --json top failed");
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert_eq!(text.lines().count(), 2, "not two lines:\n{text}");
    let v: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or_default()).expect("a JSON object");
    let queues = v["queues"].as_array().cloned().unwrap_or_default();
    assert_eq!(queues.len(), 2, "{v}");
    let mut last_rps = f64::INFINITY;
    for q in &queues {
        let load = &q["queue_load"];
        let rps = load["requests_per_sec"].as_f64().unwrap_or(0.0);
        assert!(rps > 0.0, "{q}");
        assert!(rps <= last_rps, "not ranked by req/s: {v}");
        last_rps = rps;
        assert!(load["p99_s"].as_f64() > Some(0.0), "{q}");
        assert!(load["p99"].as_str().is_some(), "{q}");
        assert_eq!(q["ranked_by"], "queue", "{q}");
    }

    // An unreachable controller: a clear error, exit status 1.
    let out = ctl(
        &b.ctl,
        &["--addr", "127.0.0.1:1", "top", "--count", "1"],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach controller at 127.0.0.1:1"),
        "{err}"
    );
}
