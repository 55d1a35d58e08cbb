//! A real Prometheus (Debian's `prometheus`, installed by scripts/setup.sh)
//! scraping `vrio-server --metrics-listen`, `vrio-client synthetic
//! --metrics-listen` and `vrio-controller --metrics-listen` (the server
//! registered with it) while a verified synthetic workload runs; the
//! assertions go through Prometheus's HTTP API:
//!
//! - every target is up;
//! - `rate()` of the requests is above 0 during the run;
//! - after the run, the server's request counter and the guests' own
//!   counter match the count the client verified (within 1%);
//! - the controller leads, counts its one server alive with a live lease,
//!   and counted the server's RegisterServer and lease calls.
//!
//! Also: a taken `--metrics-listen` address is a clear error, and a log
//! redirected to a file holds no escape sequences (and is JSON with
//! `--log-format json`).
//!
//! Without /usr/bin/prometheus the test fails (it does not skip): run
//! `scripts/setup.sh` as root.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{soft_server, synthetic_client};
use vrio_integration::rxe;

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Prometheus scrapes every target this often (and times out after it).
const SCRAPE: &str = "400ms";
/// The workload: guests x 1 queue x requests each.
const GUESTS: u32 = 2;
const REQUESTS: u64 = 20_000;

/// vrio-server, vrio-client and vrio-controller, built once for all the
/// tests here (in their profile).
struct Bins {
    server: PathBuf,
    client: PathBuf,
    controller: PathBuf,
}

/// The controller's token in these tests.
const TOKEN: &str = "prometheus-test-token";

/// `vrio-controller` in memory on a free loopback port, with [`TOKEN`];
/// the caller adds the rest.
fn controller_cmd(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args(["--memory", "--listen", "127.0.0.1:0"])
        .env("VRIO_TOKEN", TOKEN)
        .env_remove("VRIO_LOG_FORMAT");
    c
}

fn bins() -> &'static Bins {
    static BINS: std::sync::OnceLock<Bins> = std::sync::OnceLock::new();
    BINS.get_or_init(|| Bins {
        server: rxe::bin("vrio-examples", "vrio-server"),
        client: rxe::bin("vrio-examples", "vrio-client"),
        controller: rxe::bin("vrio-examples", "vrio-controller"),
    })
}

/// The prometheus binary, or a failure telling how to install it.
fn prometheus_bin() -> PathBuf {
    let p = PathBuf::from(PROMETHEUS);
    assert!(
        p.is_file(),
        "{PROMETHEUS} is not installed: run `scripts/setup.sh` as root \
         (it installs Debian's prometheus package), then run this test again"
    );
    p
}

/// A child process killed when the test ends, pass or fail, whose stdout
/// (and stderr, unless it goes to a file) lines arrive on a channel, with
/// the wall-clock time they came.
struct Proc {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<(SystemTime, String)>,
    seen: Vec<(SystemTime, String)>,
    cursor: usize,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, stderr_to: Option<File>) -> Proc {
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        match stderr_to {
            Some(f) => cmd.stderr(Stdio::from(f)),
            None => cmd.stderr(Stdio::piped()),
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let (tx, lines) = mpsc::channel();
        let mut outs: Vec<Box<dyn Read + Send>> = Vec::new();
        if let Some(o) = child.stdout.take() {
            outs.push(Box::new(o));
        }
        if let Some(e) = child.stderr.take() {
            outs.push(Box::new(e));
        }
        for out in outs {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    println!("  {name}| {l}");
                    if tx.send((SystemTime::now(), l)).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            name,
            child,
            lines,
            seen: Vec::new(),
            cursor: 0,
        }
    }

    /// The next line (after the last one a wait matched) containing
    /// `needle`, and when it came.
    fn wait_for(&mut self, needle: &str, within: Duration) -> (SystemTime, String) {
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
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{} closed its output (exited) before printing {needle:?}",
                        self.name
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{}: no line with {needle:?} within {within:?}", self.name)
                }
            }
        }
    }

    /// SIGTERM, then the exit status (SIGKILL if it does not exit in time).
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(within)
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(300)) {
                    self.seen.push(l);
                }
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("{} did not exit within {within:?}", self.name);
            }
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

/// A directory of this test's own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("vrio-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A plain HTTP/1.0 GET (the server closes after answering): the status
/// and the body.
fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let t = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&sa, t).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(t)).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}{path}: no HTTP header in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One Prometheus API call: its `data`.
fn api(prom: &str, path: &str) -> Result<serde_json::Value, String> {
    let (status, body) = http_get(prom, path)?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("{path}: HTTP {status}: {body}"));
    }
    Ok(v["data"].clone())
}

/// An instant query's samples: (labels, value).
fn query(prom: &str, expr: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
    let data = api(prom, &format!("/api/v1/query?query={}", encode(expr)))?;
    Ok(data["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| {
                    let v = s["value"][1].as_str()?.parse().ok()?;
                    Some((s["metric"].clone(), v))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The single value of an instant query, if it has exactly one sample.
fn query_one(prom: &str, expr: &str) -> Option<f64> {
    match query(prom, expr) {
        Ok(v) if v.len() == 1 => Some(v[0].1),
        _ => None,
    }
}

/// Every value of a range query, over all its series.
fn query_range(prom: &str, expr: &str, start: f64, end: f64, step: f64) -> Vec<f64> {
    let path = format!(
        "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step:.3}",
        encode(expr)
    );
    let data = api(prom, &path).unwrap_or_else(|e| panic!("{e}"));
    data["result"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p[1].as_str()?.parse().ok())
        .collect()
}

/// Polls `f` every 200 ms until it gives Some, or panics with `what`.
fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `http://ADDR/metrics` address on a "metrics listening on" line.
fn metrics_addr(line: &str) -> String {
    line.split("http://")
        .nth(1)
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
        .to_string()
}

/// A loopback port free now (for Prometheus's web listener, which has no
/// port 0 it would tell us about).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Prometheus on a free loopback port with `config`, data in `dir`; ready
/// to answer queries.
fn start_prometheus(bin: &Path, dir: &Path, config: &Path) -> (Proc, String) {
    for attempt in 0..3 {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = File::create(dir.join(format!("prometheus-{attempt}.log"))).expect("log file");
        let mut p = Proc::spawn(
            "prometheus",
            Command::new(bin).args([
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address={addr}"),
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ]),
            Some(log),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("prometheus-{attempt}.log")))
                    .unwrap_or_default();
                println!("prometheus exited ({st}) on {addr}:\n{log}");
                break;
            }
            if matches!(http_get(&addr, "/-/ready"), Ok((200, _))) {
                return (p, addr);
            }
            assert!(
                Instant::now() < deadline,
                "prometheus on {addr} not ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    panic!("prometheus did not start (see its logs above)");
}

#[test]
fn prometheus_scrapes_server_client_and_controller_during_a_verified_workload() {
    let t0 = Instant::now();
    let prom_bin = prometheus_bin();
    let (server_bin, client_bin) = (&bins().server, &bins().client);
    let controller_bin = &bins().controller;
    println!("binaries ready after {:.1} s", t0.elapsed().as_secs_f64());
    let dir = TempDir::new("prometheus");

    // The controller: its gRPC address first, then its metrics address.
    let mut controller = Proc::spawn(
        "controller",
        controller_cmd(controller_bin).args(["--metrics-listen", "127.0.0.1:0"]),
        None,
    );
    let (_, line) = controller.wait_for("127.0.0.1:", Duration::from_secs(60));
    let control_addr = line.trim().to_string();
    assert!(
        control_addr.parse::<SocketAddr>().is_ok(),
        "the controller's first line is not its address: {line:?}"
    );
    let (_, line) = controller.wait_for("metrics listening on", Duration::from_secs(30));
    let controller_metrics = metrics_addr(&line);
    // The endpoint is up before the controller has loaded its state and
    // leads (it says leader 0 meanwhile): wait for that, bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (status, body) = http_get(&controller_metrics, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        // The sample's own line: the HELP text also says "... 1 when".
        let leads = body.lines().any(|l| l == "vrio_controller_leader 1");
        if leads || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        body.lines().any(|l| l == "vrio_controller_leader 1"),
        "the controller did not lead within 30 s:\n{body}"
    );
    for family in [
        "vrio_controller_servers_alive 0",
        "# TYPE vrio_controller_rpcs_total counter",
        "vrio_controller_rpcs_total{method=\"RegisterServer\",code=\"OK\"} 0",
        "# TYPE vrio_controller_rpc_duration_seconds histogram",
        "vrio_controller_rpc_duration_seconds_bucket{method=\"RenewLease\",le=\"+Inf\"} 0",
        "vrio_build_info{binary=\"vrio-controller\"",
    ] {
        assert!(body.contains(family), "no {family:?} in:\n{body}");
    }

    // The server, registered with the controller as io-1; its log
    // (RUST_LOG=info: attaches are logged) in a file. The client reaches
    // it directly (--server), so the controller only keeps its lease.
    let server_log = dir.0.join("server.log");
    let mut server = Proc::spawn(
        "server",
        soft_server(server_bin)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--controller", &control_addr, "--server-id", "io-1"])
            .env("VRIO_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .env_remove("VRIO_LOG_FORMAT"),
        Some(File::create(&server_log).expect("server log")),
    );
    let (_, line) = server.wait_for("listening on", Duration::from_secs(60));
    let data_addr = line
        .split_whitespace()
        .nth(3)
        .expect("the server's address")
        .to_string();
    let (_, line) = server.wait_for("metrics listening on", Duration::from_secs(30));
    let server_metrics = metrics_addr(&line);

    // Its endpoint answers in the text format, with the families the
    // dashboards use.
    let (status, body) = http_get(&server_metrics, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    for family in [
        "# TYPE vrio_server_requests_total counter",
        "vrio_server_requests_total{device_type=\"blk\"} 0",
        "# TYPE vrio_sidecore_busy_seconds_total counter",
        "vrio_sidecore_polls_total{sidecore=\"1\"}",
        "# TYPE vrio_server_queues gauge",
        "vrio_server_attach_refusals_total{reason=\"unauthenticated\"} 0",
        "# TYPE vrio_net_port_drops_total counter",
        "vrio_build_info{binary=\"vrio-server\"",
    ] {
        assert!(body.contains(family), "no {family:?} in:\n{body}");
    }
    assert_eq!(http_get(&server_metrics, "/nothing").map(|r| r.0), Ok(404));

    // The client waits for Prometheus's first scrape before its guests
    // start, and serves its final counts until told to stop.
    let mut client = Proc::spawn(
        "client",
        synthetic_client(client_bin, "--server", &data_addr, GUESTS).args([
            "--queues",
            "1",
            "--requests",
            &REQUESTS.to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-wait",
            "120",
            "--metrics-linger",
            "300",
        ]),
        None,
    );
    let (_, line) = client.wait_for("metrics listening on", Duration::from_secs(60));
    let client_metrics = metrics_addr(&line);

    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: {SCRAPE}\n  scrape_timeout: {SCRAPE}\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: vrio-server\n    static_configs:\n      - targets: ['{server_metrics}']\n\
             \x20 - job_name: vrio-client\n    static_configs:\n      - targets: ['{client_metrics}']\n\
             \x20 - job_name: vrio-controller\n    static_configs:\n      - targets: ['{controller_metrics}']\n"
        ),
    )
    .expect("prometheus.yml");
    println!(
        "prometheus.yml:\n{}",
        std::fs::read_to_string(&config).unwrap_or_default()
    );
    let (_prometheus, prom) = start_prometheus(&prom_bin, &dir.0, &config);
    println!(
        "prometheus ready on {prom} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let (run_start, _) = client.wait_for("metrics scraped; starting", Duration::from_secs(120));

    // Every target up.
    let targets = eventually("all targets up", Duration::from_secs(60), || {
        let data = api(&prom, "/api/v1/targets").ok()?;
        let active = data["activeTargets"].as_array()?.clone();
        let up = |job: &str| {
            active
                .iter()
                .any(|t| t["labels"]["job"] == job && t["health"] == "up")
        };
        (active.len() == 3 && up("vrio-server") && up("vrio-client") && up("vrio-controller"))
            .then_some(active)
    });
    for t in &targets {
        println!(
            "target {} {}: {}",
            t["labels"]["job"], t["scrapeUrl"], t["health"]
        );
    }

    // The verdict.
    let (run_end, verdict) = client.wait_for("requests verified", Duration::from_secs(600));
    let expected = REQUESTS * u64::from(GUESTS);
    let nums: Vec<u64> = verdict
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(
        nums.get(..3),
        Some(&[expected, expected, 0][..]),
        "verdict: {verdict}"
    );
    let verified = nums[0];
    println!(
        "workload: {verified} requests in {:.1} s",
        run_end
            .duration_since(run_start)
            .unwrap_or_default()
            .as_secs_f64()
    );

    // Prometheus's latest samples reach the final counts: the guests' own
    // counter exactly, the server's within 1%.
    let guests = eventually(
        "vrio_guest_requests_completed_total at the verified count",
        Duration::from_secs(60),
        || {
            query_one(&prom, "vrio_guest_requests_completed_total")
                .filter(|&v| v as u64 == verified)
        },
    );
    let served = eventually(
        "vrio_server_requests_total within 1% of the verified count",
        Duration::from_secs(60),
        || {
            query_one(
                &prom,
                "vrio_server_requests_total{job=\"vrio-server\",device_type=\"blk\"}",
            )
            .filter(|&v| (v - verified as f64).abs() <= 0.01 * verified as f64)
        },
    );
    println!("prometheus: guests completed {guests}, server served {served}, verified {verified}");
    // Still up after the run (a scrape may time out on a loaded machine:
    // the next one counts).
    for job in ["vrio-server", "vrio-client", "vrio-controller"] {
        eventually(
            &format!("{job} up after the run"),
            Duration::from_secs(30),
            || (query_one(&prom, &format!("up{{job=\"{job}\"}}")) == Some(1.0)).then_some(()),
        );
    }

    // rate() above 0 during the run: evaluated from its start to 5 s (the
    // window) after its end, once Prometheus has scraped that far.
    let (start, end) = (unix_secs(run_start), unix_secs(run_end) + 5.0);
    eventually(
        "time past the run's last window",
        Duration::from_secs(30),
        || (unix_secs(SystemTime::now()) > end + 1.0).then_some(()),
    );
    let step = ((end - start) / 500.0).max(0.2);
    for expr in [
        "rate(vrio_server_requests_total{device_type=\"blk\"}[5s])",
        "rate(vrio_guest_requests_completed_total[5s])",
        "rate(vrio_sidecore_requests_total[5s])",
    ] {
        let values = query_range(&prom, expr, start, end, step);
        let max = values.iter().cloned().fold(0.0, f64::max);
        println!("{expr}: {} points, max {max:.0}/s", values.len());
        assert!(max > 0.0, "{expr} never above 0 during the run: {values:?}");
    }

    // The controller, through Prometheus: it leads, its one server is
    // alive with a live lease, and it counted the server's calls.
    for (expr, want) in [
        ("vrio_controller_leader", 1.0),
        ("vrio_controller_servers", 1.0),
        ("vrio_controller_servers_alive", 1.0),
        ("vrio_controller_servers_draining", 0.0),
        ("vrio_controller_server_alive{server=\"io-1\"}", 1.0),
        ("vrio_controller_failovers_total", 0.0),
    ] {
        eventually(
            &format!("{expr} == {want}"),
            Duration::from_secs(30),
            || (query_one(&prom, expr) == Some(want)).then_some(()),
        );
    }
    let lease = eventually("a live lease for io-1", Duration::from_secs(30), || {
        query_one(
            &prom,
            "vrio_controller_server_lease_remaining_seconds{server=\"io-1\"}",
        )
        .filter(|&s| s > 0.0)
    });
    let registered = eventually("RegisterServer counted", Duration::from_secs(30), || {
        query_one(
            &prom,
            "vrio_controller_rpcs_total{method=\"RegisterServer\",code=\"OK\"}",
        )
        .filter(|&n| n >= 1.0)
    });
    let renewals = eventually(
        "lease renewals or load reports counted",
        Duration::from_secs(30),
        || {
            query_one(
                &prom,
                "sum(vrio_controller_rpcs_total{method=~\"RenewLease|ReportLoad\",code=\"OK\"})",
            )
            .filter(|&n| n > 0.0)
        },
    );
    let timed = eventually("RPC latencies observed", Duration::from_secs(30), || {
        query_one(
            &prom,
            "sum(vrio_controller_rpc_duration_seconds_count{method=~\"RegisterServer|RenewLease|ReportLoad\"})",
        )
        .filter(|&n| n >= registered + renewals)
    });
    println!(
        "prometheus: controller lease {lease:.1} s left, {registered} RegisterServer, \
         {renewals} renewals/load reports, {timed} timed calls"
    );

    // The client stops lingering on SIGTERM, with the verdict's exit code.
    let st = client.terminate(Duration::from_secs(30));
    assert!(st.success(), "client exited with {st}");
    let st = server.terminate(Duration::from_secs(30));
    assert!(st.success(), "server exited with {st}");
    controller.terminate(Duration::from_secs(30));

    // The server's log, redirected to a file: lines, no escape sequences.
    let log = std::fs::read(&server_log).expect("server log");
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("queue attached"),
        "RUST_LOG=info logged no attach:\n{text}"
    );
    assert!(
        !log.contains(&0x1b),
        "escape sequences in a log redirected to a file:\n{text}"
    );
    println!("done in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn a_taken_metrics_address_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let want = format!("--metrics-listen {addr}: address in use");
    let (server, client) = (&bins().server, &bins().client);
    for (name, mut cmd) in [
        ("server", soft_server(server)),
        (
            "client",
            synthetic_client(client, "--server", "127.0.0.1:9", 1),
        ),
        ("controller", controller_cmd(&bins().controller)),
    ] {
        cmd.args(["--metrics-listen", &addr]);
        let mut p = Proc::spawn(name, &mut cmd, None);
        let st = p.wait_exit(Duration::from_secs(60));
        assert!(!st.success(), "{name} started on a taken metrics address");
        assert!(
            p.seen.iter().any(|(_, l)| l.contains(&want)),
            "{name} did not say {want:?}: {:?}",
            p.seen
        );
        assert!(
            !p.seen
                .iter()
                .any(|(_, l)| l.contains("listening on 127")
                    || l.trim().parse::<SocketAddr>().is_ok()),
            "{name} started serving before failing"
        );
    }
}

#[test]
fn logs_redirected_to_a_file_are_plain_text_or_json() {
    let server = &bins().server;
    let dir = TempDir::new("logs");
    for format in ["text", "json"] {
        let path = dir.0.join(format!("{format}.log"));
        let mut p = Proc::spawn(
            "server",
            soft_server(server)
                .args(["--duration", "0.5", "--log-format", format])
                .env("RUST_LOG", "info")
                .env_remove("VRIO_LOG_FORMAT"),
            Some(File::create(&path).expect("log file")),
        );
        let st = p.wait_exit(Duration::from_secs(60));
        assert!(st.success(), "server exited with {st}");
        let log = std::fs::read(&path).expect("log");
        let text = String::from_utf8_lossy(&log);
        assert!(
            !log.contains(&0x1b),
            "escape sequences in {format}:\n{text}"
        );
        // Without --key-file the server warns that its data plane is open.
        assert!(
            text.contains("data plane open"),
            "no warning logged ({format}):\n{text}"
        );
        if format == "json" {
            for l in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
                assert!(
                    v["level"].is_string() && v["message"].is_string(),
                    "no level or message in {l}"
                );
            }
        } else {
            assert!(text.contains(" WARN "), "no WARN line:\n{text}");
        }
    }
}
