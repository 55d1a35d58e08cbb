//! `vrio-ctl top`: one refresh of the view from the controller's
//! `ListServers` and `ListAssignments` and from the I/O servers' `/metrics`
//! endpoints (scraped with a plain HTTP/1.0 GET), rendered as text or JSON.
//!
//! Rates from the metrics are deltas between two scrapes of the same
//! endpoint divided by the time between them, so the first refresh has
//! none. The servers export no per-queue request counters or latencies
//! yet, so queues are shown with their sidecore's figures only.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vrio_control::pb;

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct PromSample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl PromSample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text format, minimally: comment lines are skipped,
/// label values may hold escaped quotes, timestamps are ignored. Lines that
/// do not parse are skipped.
pub fn parse_prometheus(text: &str) -> Vec<PromSample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<PromSample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let end: usize;
        loop {
            // Skip separators, then a key up to '='.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let &(start, c) = chars.peek()?;
            if c == '}' {
                end = start + 1;
                break;
            }
            let mut key_end = start;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = i;
                    break;
                }
            }
            let key = r[start..key_end].trim().to_string();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.push((key, value));
        }
        rest = &r[end..];
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(PromSample {
        name,
        labels,
        value,
    })
}

/// `http://HOST:PORT/PATH`, `HOST:PORT/PATH` or `HOST:PORT` (path
/// `/metrics`): the address and the path.
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{url}: only http:// metrics endpoints are supported, not {scheme}://"
            ))
        }
        None => url,
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if host.is_empty() || !host.contains(':') {
        return Err(format!(
            "{url}: give HOST:PORT, e.g. http://127.0.0.1:9100/metrics"
        ));
    }
    Ok((host.to_string(), path.to_string()))
}

/// GETs `url` (HTTP/1.0, so the server closes after the body) within
/// `timeout`: the body of a 200 answer.
pub fn http_get(url: &str, timeout: Duration) -> Result<String, String> {
    let (host, path) = split_url(url)?;
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{host}: {e}"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/plain\r\n\r\n"
    )
    .map_err(|e| format!("{host}: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{url}: no complete answer within {timeout:?}"));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("{url}: no complete answer within {timeout:?}"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{url}: {e}")),
        }
        if raw.len() > 64 << 20 {
            return Err(format!("{url}: answer larger than 64 MiB"));
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    Ok(body.to_string())
}

/// One sidecore's counters in one scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SidecoreCounters {
    pub busy_seconds: f64,
    pub requests: f64,
    pub queues: Option<f64>,
}

/// What top uses from one scrape of a server's `/metrics`.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub at: Instant,
    pub sidecores: BTreeMap<u32, SidecoreCounters>,
    /// `vrio_server_queue_info`: (queue, sidecore), as the server names
    /// them (`dev<device id>.q<queue>`).
    pub queues: Vec<(String, u32)>,
}

impl Scrape {
    pub fn from_text(text: &str, at: Instant) -> Result<Scrape, String> {
        let mut sidecores: BTreeMap<u32, SidecoreCounters> = BTreeMap::new();
        let mut queues = Vec::new();
        let mut seen = false;
        for s in parse_prometheus(text) {
            let sidecore = s.label("sidecore").and_then(|v| v.parse::<u32>().ok());
            match (s.name.as_str(), sidecore) {
                ("vrio_sidecore_busy_seconds_total", Some(i)) => {
                    seen = true;
                    sidecores.entry(i).or_default().busy_seconds = s.value;
                }
                ("vrio_sidecore_requests_total", Some(i)) => {
                    seen = true;
                    sidecores.entry(i).or_default().requests = s.value;
                }
                ("vrio_sidecore_queues", Some(i)) => {
                    sidecores.entry(i).or_default().queues = Some(s.value);
                }
                ("vrio_server_queue_info", Some(i)) => {
                    if let Some(q) = s.label("queue") {
                        queues.push((q.to_string(), i));
                    }
                }
                _ => {}
            }
        }
        if !seen {
            return Err("no vrio_sidecore_* metrics: is this a vrio-server's /metrics?".into());
        }
        queues.sort();
        Ok(Scrape {
            at,
            sidecores,
            queues,
        })
    }
}

/// A sidecore's figures between two scrapes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Busy fraction, 0.0 to 1.0.
    pub busy: f64,
    pub requests_per_sec: f64,
}

/// Per-sidecore rates from `prev` to `cur`; a sidecore missing from
/// `prev` has none, and none has any when a counter went back (the server
/// restarted).
pub fn rates(prev: &Scrape, cur: &Scrape) -> BTreeMap<u32, Rate> {
    let dt = cur.at.saturating_duration_since(prev.at).as_secs_f64();
    let mut out = BTreeMap::new();
    if dt <= 0.0 {
        return out;
    }
    for (i, c) in &cur.sidecores {
        let Some(p) = prev.sidecores.get(i) else {
            continue;
        };
        if c.busy_seconds < p.busy_seconds || c.requests < p.requests {
            // The server restarted: no rate for any sidecore this time.
            return BTreeMap::new();
        }
        out.insert(
            *i,
            Rate {
                busy: ((c.busy_seconds - p.busy_seconds) / dt).clamp(0.0, 1.0),
                requests_per_sec: (c.requests - p.requests) / dt,
            },
        );
    }
    out
}

/// One `--metrics` endpoint across refreshes.
#[derive(Debug)]
pub struct Target {
    pub url: String,
    prev: Option<Scrape>,
    /// The last scrape, or why it failed.
    pub last: Result<Scrape, String>,
    /// Rates between the last two good scrapes.
    pub rates: BTreeMap<u32, Rate>,
}

impl Target {
    pub fn new(url: String) -> Target {
        Target {
            url,
            prev: None,
            last: Err("not scraped yet".into()),
            rates: BTreeMap::new(),
        }
    }

    /// Records a scrape's outcome. A failure clears the rates (and the
    /// next good scrape starts over).
    pub fn record(&mut self, got: Result<Scrape, String>) {
        match got {
            Ok(s) => {
                self.rates = self.prev.as_ref().map(|p| rates(p, &s)).unwrap_or_default();
                self.prev = Some(s.clone());
                self.last = Ok(s);
            }
            Err(e) => {
                self.prev = None;
                self.rates.clear();
                self.last = Err(e);
            }
        }
    }

    /// Scrapes the endpoint once (blocking).
    pub fn scrape(url: &str, timeout: Duration) -> Result<Scrape, String> {
        let body = http_get(url, timeout)?;
        Scrape::from_text(&body, Instant::now()).map_err(|e| format!("{url}: {e}"))
    }
}

/// What the controller said in one refresh.
#[derive(Clone, Debug, Default)]
pub struct ControllerView {
    pub servers: Vec<pb::IoServer>,
    pub assignments: Vec<pb::Assignment>,
}

/// Everything one refresh shows.
pub struct View<'a> {
    pub controller_addr: &'a str,
    pub interval: Duration,
    pub now_ms: u64,
    /// The controller's answer, or why it failed.
    pub controller: &'a Result<ControllerView, String>,
    pub targets: &'a [Target],
    /// How many queues the QUEUES table lists.
    pub max_queues: usize,
}

/// The server's name for a controller assignment's queue.
fn queue_key(a: &pb::Assignment) -> String {
    format!(
        "dev{}.q{}",
        vrio_core::remote::device_key(&a.device_id),
        a.queue
    )
}

struct Row {
    device: String,
    queue: String,
    server: String,
    sidecore: u32,
    rate: Option<Rate>,
    source: &'static str,
}

impl View<'_> {
    fn assignments(&self) -> &[pb::Assignment] {
        match self.controller {
            Ok(c) => &c.assignments,
            Err(_) => &[],
        }
    }

    /// The controller server whose queues a target's scrape serves: the
    /// one most of its known queues are assigned to.
    fn target_server(&self, t: &Target) -> Option<String> {
        let Ok(s) = &t.last else { return None };
        let by_key: HashMap<String, &pb::Assignment> = self
            .assignments()
            .iter()
            .filter(|a| !a.server_id.is_empty())
            .map(|a| (queue_key(a), a))
            .collect();
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for (q, _) in &s.queues {
            if let Some(a) = by_key.get(q) {
                *votes.entry(a.server_id.as_str()).or_default() += 1;
            }
        }
        votes
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(s, _)| s.to_string())
    }

    /// The controller's assignments with their sidecore's figures (from
    /// the server's metrics when a target serves it, else from the
    /// controller's load reports), busiest sidecore first.
    fn queue_rows(&self) -> Vec<Row> {
        let Ok(c) = self.controller else {
            return Vec::new();
        };
        let mut scraped: HashMap<String, &Target> = HashMap::new();
        for t in self.targets {
            if let Some(s) = self.target_server(t) {
                scraped.insert(s, t);
            }
        }
        let mut rows: Vec<Row> = c
            .assignments
            .iter()
            .map(|a| {
                let (rate, source) = match scraped.get(&a.server_id) {
                    Some(t) => (t.rates.get(&a.sidecore).copied(), "metrics"),
                    None => (
                        c.servers
                            .iter()
                            .find(|s| s.id == a.server_id)
                            .and_then(|s| s.load.iter().find(|l| l.sidecore == a.sidecore))
                            .map(|l| Rate {
                                busy: l.busy,
                                requests_per_sec: l.requests_per_sec,
                            }),
                        "controller",
                    ),
                };
                Row {
                    device: a.device_id.clone(),
                    queue: a.queue.to_string(),
                    server: a.server_id.clone(),
                    sidecore: a.sidecore,
                    rate,
                    source,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            let r = |x: &Row| x.rate.map(|r| r.requests_per_sec).unwrap_or(-1.0);
            r(b).total_cmp(&r(a))
                .then_with(|| a.device.cmp(&b.device))
                .then_with(|| a.queue.cmp(&b.queue))
        });
        rows.truncate(self.max_queues);
        rows
    }

    /// The device name the controller knows for a server's queue name.
    fn device_of(&self, key: &str) -> Option<(String, u32)> {
        self.assignments()
            .iter()
            .find(|a| queue_key(a) == key)
            .map(|a| (a.device_id.clone(), a.queue))
    }

    /// The plain-text view (no escape sequences).
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let secs = self.now_ms / 1000;
        out.push_str(&format!(
            "vrio top: controller {}, every {:.1}s, {} UTC\n",
            self.controller_addr,
            self.interval.as_secs_f64(),
            utc_time(secs)
        ));
        match self.controller {
            Err(e) => out.push_str(&format!("\ncontroller: {e}\n")),
            Ok(c) => {
                out.push_str("\nSERVERS\n");
                let rows: Vec<Vec<String>> = c
                    .servers
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.clone(),
                            s.address.clone(),
                            yes_no(s.alive),
                            yes_no(s.draining),
                            format!("{}/{}", s.assigned_queues, s.capacity),
                            s.sidecores.to_string(),
                            lease_left(s, self.now_ms),
                        ]
                    })
                    .collect();
                table(
                    &mut out,
                    &[
                        "SERVER",
                        "ADDRESS",
                        "ALIVE",
                        "DRAINING",
                        "QUEUES",
                        "SIDECORES",
                        "LEASE LEFT",
                    ],
                    &rows,
                );
                out.push_str("\nSIDECORES (the servers' load reports to the controller)\n");
                let mut rows = Vec::new();
                for s in &c.servers {
                    for i in 0..s.sidecores {
                        let l = s.load.iter().find(|l| l.sidecore == i);
                        let queues = c
                            .assignments
                            .iter()
                            .filter(|a| a.server_id == s.id && a.sidecore == i)
                            .count();
                        rows.push(vec![
                            s.id.clone(),
                            i.to_string(),
                            l.map(|l| pct(l.busy)).unwrap_or_else(|| "-".into()),
                            l.map(|l| format!("{:.0}", l.requests_per_sec))
                                .unwrap_or_else(|| "-".into()),
                            queues.to_string(),
                        ]);
                    }
                }
                table(
                    &mut out,
                    &["SERVER", "SIDECORE", "BUSY", "REQ/S", "QUEUES"],
                    &rows,
                );
            }
        }
        for t in self.targets {
            let server = self
                .target_server(t)
                .map(|s| format!(" (server {s})"))
                .unwrap_or_default();
            out.push_str(&format!("\nMETRICS {}{server}\n", t.url));
            match &t.last {
                Err(e) => out.push_str(&format!("error: {e}\n")),
                Ok(s) => {
                    let rows: Vec<Vec<String>> = s
                        .sidecores
                        .iter()
                        .map(|(i, c)| {
                            let r = t.rates.get(i);
                            vec![
                                i.to_string(),
                                r.map(|r| pct(r.busy)).unwrap_or_else(|| "-".into()),
                                r.map(|r| format!("{:.0}", r.requests_per_sec))
                                    .unwrap_or_else(|| "-".into()),
                                format!("{:.0}", c.requests),
                                c.queues
                                    .map(|q| format!("{q:.0}"))
                                    .unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect();
                    table(
                        &mut out,
                        &["SIDECORE", "BUSY", "REQ/S", "REQUESTS", "QUEUES"],
                        &rows,
                    );
                    if t.rates.is_empty() {
                        out.push_str("(rates from the next refresh on)\n");
                    }
                    let served: Vec<String> = s
                        .queues
                        .iter()
                        .map(|(q, i)| match self.device_of(q) {
                            Some((d, n)) => format!("{d}/{n}@{i}"),
                            None => format!("{q}@{i}"),
                        })
                        .collect();
                    if !served.is_empty() {
                        out.push_str(&format!("queues@sidecore: {}\n", served.join(" ")));
                    }
                }
            }
        }
        if self.controller.is_ok() {
            out.push_str(
                "\nQUEUES (busiest sidecores first; per-queue req/s and p99 are not exported yet)\n",
            );
            let rows: Vec<Vec<String>> = self
                .queue_rows()
                .into_iter()
                .map(|r| {
                    vec![
                        r.device,
                        r.queue,
                        if r.server.is_empty() {
                            "(unassigned)".into()
                        } else {
                            r.server
                        },
                        r.sidecore.to_string(),
                        r.rate.map(|r| pct(r.busy)).unwrap_or_else(|| "-".into()),
                        r.rate
                            .map(|r| format!("{:.0}", r.requests_per_sec))
                            .unwrap_or_else(|| "-".into()),
                        r.source.into(),
                    ]
                })
                .collect();
            table(
                &mut out,
                &[
                    "DEVICE",
                    "QUEUE",
                    "SERVER",
                    "SIDECORE",
                    "SIDECORE BUSY",
                    "SIDECORE REQ/S",
                    "FROM",
                ],
                &rows,
            );
        }
        out
    }

    /// The view as one JSON object.
    pub fn to_json(&self) -> Value {
        let rate_json = |r: Option<Rate>| match r {
            Some(r) => json!({"busy": r.busy, "requests_per_sec": r.requests_per_sec}),
            None => json!({"busy": null, "requests_per_sec": null}),
        };
        let (servers, sidecores, error) = match self.controller {
            Err(e) => (Vec::new(), Vec::new(), json!(e)),
            Ok(c) => {
                let servers = c
                    .servers
                    .iter()
                    .map(|s| {
                        json!({
                            "id": s.id, "address": s.address, "alive": s.alive,
                            "draining": s.draining, "assigned_queues": s.assigned_queues,
                            "capacity": s.capacity, "sidecores": s.sidecores,
                            "lease_left_ms": s.alive.then(|| s.lease_expires_unix_ms as i64 - self.now_ms as i64),
                        })
                    })
                    .collect();
                let mut cores = Vec::new();
                for s in &c.servers {
                    for i in 0..s.sidecores {
                        let l = s.load.iter().find(|l| l.sidecore == i);
                        let mut v = rate_json(l.map(|l| Rate {
                            busy: l.busy,
                            requests_per_sec: l.requests_per_sec,
                        }));
                        v["server"] = json!(s.id);
                        v["sidecore"] = json!(i);
                        v["queues"] = json!(c
                            .assignments
                            .iter()
                            .filter(|a| a.server_id == s.id && a.sidecore == i)
                            .count());
                        cores.push(v);
                    }
                }
                (servers, cores, Value::Null)
            }
        };
        let metrics: Vec<Value> = self
            .targets
            .iter()
            .map(|t| match &t.last {
                Err(e) => json!({"url": t.url, "server": null, "error": e}),
                Ok(s) => json!({
                    "url": t.url,
                    "server": self.target_server(t),
                    "error": null,
                    "sidecores": s.sidecores.iter().map(|(i, c)| {
                        let mut v = rate_json(t.rates.get(i).copied());
                        v["sidecore"] = json!(i);
                        v["requests_total"] = json!(c.requests);
                        v["busy_seconds_total"] = json!(c.busy_seconds);
                        v["queues"] = json!(c.queues);
                        v
                    }).collect::<Vec<_>>(),
                    "queues": s.queues.iter().map(|(q, i)| {
                        let d = self.device_of(q);
                        json!({
                            "queue": q, "sidecore": i,
                            "device": d.as_ref().map(|d| &d.0),
                            "device_queue": d.as_ref().map(|d| d.1),
                        })
                    }).collect::<Vec<_>>(),
                }),
            })
            .collect();
        let queues: Vec<Value> = self
            .queue_rows()
            .into_iter()
            .map(|r| {
                json!({
                    "device": r.device, "queue": r.queue.parse::<u32>().ok(),
                    "server": if r.server.is_empty() { Value::Null } else { json!(r.server) },
                    "sidecore": r.sidecore,
                    "sidecore_load": rate_json(r.rate), "from": r.source,
                })
            })
            .collect();
        json!({
            "time_unix_ms": self.now_ms,
            "controller": self.controller_addr,
            "controller_error": error,
            "servers": servers,
            "sidecores": sidecores,
            "metrics": metrics,
            "queues": queues,
        })
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn pct(f: f64) -> String {
    format!("{:.0}%", f * 100.0)
}

fn lease_left(s: &pb::IoServer, now_ms: u64) -> String {
    if s.alive {
        format!(
            "{:.1}s",
            s.lease_expires_unix_ms.saturating_sub(now_ms) as f64 / 1e3
        )
    } else {
        "-".into()
    }
}

/// HH:MM:SS of a Unix time.
fn utc_time(secs: u64) -> String {
    let d = secs % 86_400;
    format!("{:02}:{:02}:{:02}", d / 3600, d / 60 % 60, d % 60)
}

/// Left-aligned columns, two spaces apart; "(none)" for no rows.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(s.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP vrio_sidecore_busy_seconds Time busy.\n\
        # TYPE vrio_sidecore_busy_seconds counter\n\
        vrio_sidecore_busy_seconds_total{sidecore=\"0\"} 1.5\n\
        vrio_sidecore_busy_seconds_total{sidecore=\"1\"} 0.25\n\
        vrio_sidecore_requests_total{sidecore=\"0\"} 1000\n\
        vrio_sidecore_requests_total{sidecore=\"1\"} 10\n\
        vrio_sidecore_queues{sidecore=\"0\"} 1\n\
        vrio_server_queue_info{queue=\"dev7.q0\",sidecore=\"0\"} 1\n\
        vrio_build_info{binary=\"vrio-server\",version=\"a \\\"q\\\" b\"} 1\n\
        # EOF\n";

    #[test]
    fn parses_the_text_format() {
        let s = parse_prometheus(TEXT);
        assert_eq!(s.len(), 7);
        assert_eq!(s[0].name, "vrio_sidecore_busy_seconds_total");
        assert_eq!(s[0].label("sidecore"), Some("0"));
        assert_eq!(s[0].value, 1.5);
        assert_eq!(s[6].label("version"), Some("a \"q\" b"));
        assert_eq!(parse_prometheus("up 1 1700000000000")[0].value, 1.0);
        assert!(parse_prometheus("broken{a=1} 2").is_empty());
    }

    #[test]
    fn rates_between_scrapes() {
        let t0 = Instant::now();
        let a = Scrape::from_text(TEXT, t0).unwrap();
        let later = TEXT
            .replace("} 1.5", "} 2.0")
            .replace("\"0\"} 1000", "\"0\"} 2000");
        let b = Scrape::from_text(&later, t0 + Duration::from_secs(1)).unwrap();
        let r = rates(&a, &b);
        assert_eq!(r[&0].busy, 0.5);
        assert_eq!(r[&0].requests_per_sec, 1000.0);
        assert_eq!(r[&1].requests_per_sec, 0.0);
        assert_eq!(a.queues, vec![("dev7.q0".to_string(), 0)]);
        // A restart (counters back to lower values) gives no rate.
        assert!(rates(
            &b,
            &Scrape::from_text(TEXT, t0 + Duration::from_secs(2)).unwrap()
        )
        .is_empty());
        assert!(Scrape::from_text("up 1\n", t0).is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:9100/metrics").unwrap(),
            ("127.0.0.1:9100".into(), "/metrics".into())
        );
        assert_eq!(
            split_url("io-1:9100").unwrap(),
            ("io-1:9100".into(), "/metrics".into())
        );
        assert!(split_url("https://x:1/metrics").is_err());
        assert!(split_url("http://nohost/metrics").is_err());
    }
}
