//! `vrio-ctl top`: one refresh of the view from the controller's
//! `ListServers` and `ListAssignments` and from the I/O servers' `/metrics`
//! endpoints (scraped with a plain HTTP/1.0 GET), rendered as text or JSON.
//!
//! Rates from the metrics are deltas between two scrapes of the same
//! endpoint divided by the time between them, so the first refresh has
//! none. A server started with `--metrics-listen` exports each queue's own
//! figures (`vrio_queue_*`): its req/s, its p99 latency over the interval
//! (from the difference of the cumulative histogram buckets) and its
//! requests in flight. Queues of servers without them are shown with their
//! sidecore's figures only.

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

/// One queue's own figures in one scrape (`vrio_queue_*`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueCounters {
    /// The `device` label (`dev<device id>`).
    pub device: String,
    /// `vrio_queue_requests_total`, summed over `op`.
    pub requests: f64,
    /// `vrio_queue_latency_seconds_bucket`: (upper bound in seconds,
    /// cumulative count), ascending by bound, `+Inf` (infinity) last.
    pub latency_buckets: Vec<(f64, f64)>,
    /// `vrio_queue_in_flight`.
    pub in_flight: Option<f64>,
}

impl QueueCounters {
    /// The largest finite bucket bound (10 s for the server's histograms).
    pub fn top_bound(&self) -> Option<f64> {
        self.latency_buckets
            .iter()
            .rev()
            .map(|(b, _)| *b)
            .find(|b| b.is_finite())
    }
}

/// What top uses from one scrape of a server's `/metrics`.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub at: Instant,
    pub sidecores: BTreeMap<u32, SidecoreCounters>,
    /// `vrio_server_queue_info`: (queue, sidecore), as the server names
    /// them (`dev<device id>.q<queue>`).
    pub queues: Vec<(String, u32)>,
    /// The queues' own figures, by queue name, for the queues that have
    /// them (a server with `--metrics-listen`; empty for older servers).
    pub queue_counters: BTreeMap<String, QueueCounters>,
}

impl Scrape {
    pub fn from_text(text: &str, at: Instant) -> Result<Scrape, String> {
        let mut sidecores: BTreeMap<u32, SidecoreCounters> = BTreeMap::new();
        let mut queues = Vec::new();
        let mut queue_counters: BTreeMap<String, QueueCounters> = BTreeMap::new();
        let mut seen = false;
        for s in parse_prometheus(text) {
            if s.name.starts_with("vrio_queue_") {
                add_queue_sample(&mut queue_counters, &s);
                continue;
            }
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
        for q in queue_counters.values_mut() {
            q.latency_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(Scrape {
            at,
            sidecores,
            queues,
            queue_counters,
        })
    }
}

/// Adds one `vrio_queue_*` sample to its queue's figures; samples without
/// a `queue` label, or buckets whose `le` is not a number, are skipped.
fn add_queue_sample(out: &mut BTreeMap<String, QueueCounters>, s: &PromSample) {
    let Some(queue) = s.label("queue") else {
        return;
    };
    let bound = match s.name.as_str() {
        "vrio_queue_latency_seconds_bucket" => match s.label("le") {
            Some("+Inf") => Some(f64::INFINITY),
            Some(le) => match le.parse::<f64>() {
                Ok(b) if !b.is_nan() => Some(b),
                _ => return,
            },
            None => return,
        },
        "vrio_queue_requests_total" | "vrio_queue_in_flight" => None,
        _ => return,
    };
    let q = out.entry(queue.to_string()).or_default();
    if q.device.is_empty() {
        if let Some(d) = s.label("device") {
            q.device = d.to_string();
        }
    }
    match (s.name.as_str(), bound) {
        ("vrio_queue_requests_total", _) => q.requests += s.value,
        ("vrio_queue_in_flight", _) => q.in_flight = Some(s.value),
        (_, Some(b)) => q.latency_buckets.push((b, s.value)),
        _ => {}
    }
}

/// A sidecore's figures between two scrapes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Busy fraction, 0.0 to 1.0.
    pub busy: f64,
    pub requests_per_sec: f64,
}

/// Whether a sidecore counter went back from `prev` to `cur`: the server
/// restarted.
fn restarted(prev: &Scrape, cur: &Scrape) -> bool {
    cur.sidecores.iter().any(|(i, c)| {
        prev.sidecores
            .get(i)
            .is_some_and(|p| c.busy_seconds < p.busy_seconds || c.requests < p.requests)
    })
}

/// Per-sidecore rates from `prev` to `cur`; a sidecore missing from
/// `prev` has none, and none has any when a counter went back (the server
/// restarted).
pub fn rates(prev: &Scrape, cur: &Scrape) -> BTreeMap<u32, Rate> {
    let dt = cur.at.saturating_duration_since(prev.at).as_secs_f64();
    let mut out = BTreeMap::new();
    if dt <= 0.0 || restarted(prev, cur) {
        // A restarted server: no rate for any sidecore this time.
        return out;
    }
    for (i, c) in &cur.sidecores {
        let Some(p) = prev.sidecores.get(i) else {
            continue;
        };
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

/// A queue's own figures between two scrapes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueueRate {
    /// Increase of its requests (summed over `op`) per second.
    pub requests_per_sec: f64,
    /// Requests its latency histogram counted in the interval.
    pub completed: f64,
    /// The interval's p99 latency, in seconds: the smallest bucket bound
    /// whose count reaches 99% of the interval's requests. None when no
    /// request completed in the interval (or the server exports no
    /// histogram), infinity when that is the `+Inf` bucket.
    pub p99: Option<f64>,
}

/// The smallest bound whose cumulative count in `buckets` ((bound,
/// cumulative count), ascending, `+Inf` last) reaches fraction `q` of the
/// total (the `+Inf` bucket's count): None when the total is 0 or there
/// is no `+Inf` bucket; infinity when only the `+Inf` bucket reaches it.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let &(last, total) = buckets.last()?;
    if last != f64::INFINITY || total.is_nan() || total <= 0.0 {
        return None;
    }
    // Counts are whole numbers: the rank of the request sought.
    let want = (total * q - 1e-9).ceil().max(1.0);
    buckets.iter().find(|(_, n)| *n >= want).map(|(b, _)| *b)
}

/// The bucket counts' increases from `prev` to `cur`, or None when the
/// bounds differ or a count went back (the series started over).
fn bucket_deltas(prev: &[(f64, f64)], cur: &[(f64, f64)]) -> Option<Vec<(f64, f64)>> {
    if prev.len() != cur.len() {
        return None;
    }
    prev.iter()
        .zip(cur)
        .map(|(&(pb, pn), &(cb, cn))| (pb == cb && cn >= pn).then_some((cb, cn - pn)))
        .collect()
}

/// Per-queue figures from `prev` to `cur`. A queue missing from `prev` (new
/// on the server) has none, nor has one whose counters went back (it left
/// and came back: its series started over); no queue has any when the
/// server restarted (a sidecore counter went back).
pub fn queue_rates(prev: &Scrape, cur: &Scrape) -> BTreeMap<String, QueueRate> {
    let dt = cur.at.saturating_duration_since(prev.at).as_secs_f64();
    let mut out = BTreeMap::new();
    if dt <= 0.0 || restarted(prev, cur) {
        return out;
    }
    for (name, c) in &cur.queue_counters {
        let Some(p) = prev.queue_counters.get(name) else {
            continue;
        };
        if c.requests < p.requests {
            continue;
        }
        let Some(deltas) = bucket_deltas(&p.latency_buckets, &c.latency_buckets) else {
            continue;
        };
        out.insert(
            name.clone(),
            QueueRate {
                requests_per_sec: (c.requests - p.requests) / dt,
                completed: deltas.last().map(|d| d.1).unwrap_or(0.0),
                p99: bucket_quantile(&deltas, 0.99),
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
    /// The queues' own figures between the last two good scrapes.
    pub queue_rates: BTreeMap<String, QueueRate>,
}

impl Target {
    pub fn new(url: String) -> Target {
        Target {
            url,
            prev: None,
            last: Err("not scraped yet".into()),
            rates: BTreeMap::new(),
            queue_rates: BTreeMap::new(),
        }
    }

    /// Records a scrape's outcome. A failure clears the rates (and the
    /// next good scrape starts over).
    pub fn record(&mut self, got: Result<Scrape, String>) {
        match got {
            Ok(s) => {
                self.rates = self.prev.as_ref().map(|p| rates(p, &s)).unwrap_or_default();
                self.queue_rates = self
                    .prev
                    .as_ref()
                    .map(|p| queue_rates(p, &s))
                    .unwrap_or_default();
                self.prev = Some(s.clone());
                self.last = Ok(s);
            }
            Err(e) => {
                self.prev = None;
                self.rates.clear();
                self.queue_rates.clear();
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

/// A queue's own figures from its server's last scrape.
struct OwnFigures {
    counters: QueueCounters,
    /// None before the second scrape, or when its counters started over.
    rate: Option<QueueRate>,
}

impl OwnFigures {
    fn requests_per_sec(&self) -> Option<f64> {
        self.rate.map(|r| r.requests_per_sec)
    }

    fn p99(&self) -> Option<f64> {
        self.rate.and_then(|r| r.p99)
    }

    fn p99_text(&self) -> String {
        latency_text(self.p99(), self.counters.top_bound())
    }
}

struct Row {
    device: String,
    queue: String,
    server: String,
    sidecore: u32,
    /// The sidecore's figures.
    rate: Option<Rate>,
    /// Where the sidecore's figures come from.
    source: &'static str,
    /// The queue's own figures, when its server's metrics have them.
    own: Option<OwnFigures>,
}

impl Row {
    /// What the row is ranked by: the queue's own req/s when known, else
    /// its sidecore's.
    fn ranked_by(&self) -> Option<(&'static str, f64)> {
        match (
            self.own.as_ref().and_then(OwnFigures::requests_per_sec),
            self.rate,
        ) {
            (Some(q), _) => Some(("queue", q)),
            (None, Some(r)) => Some(("sidecore", r.requests_per_sec)),
            (None, None) => None,
        }
    }
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
    /// controller's load reports) and their own figures (when the server's
    /// metrics have them), busiest first: by the queue's own req/s when
    /// known, else by its sidecore's.
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
                let target = scraped.get(&a.server_id);
                let key = queue_key(a);
                let own = target.and_then(|t| {
                    let s = t.last.as_ref().ok()?;
                    Some(OwnFigures {
                        counters: s.queue_counters.get(&key)?.clone(),
                        rate: t.queue_rates.get(&key).copied(),
                    })
                });
                let (rate, source) = match target {
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
                    own,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            let r = |x: &Row| x.ranked_by().map(|r| r.1).unwrap_or(-1.0);
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
                "\nQUEUES (busiest first: by the queue's req/s from its server's metrics, \
                 else by its sidecore's)\n",
            );
            let rows: Vec<Vec<String>> = self
                .queue_rows()
                .into_iter()
                .map(|r| {
                    let own = r.own.as_ref();
                    vec![
                        r.device,
                        r.queue,
                        if r.server.is_empty() {
                            "(unassigned)".into()
                        } else {
                            r.server
                        },
                        r.sidecore.to_string(),
                        own.and_then(OwnFigures::requests_per_sec)
                            .map(|q| format!("{q:.0}"))
                            .unwrap_or_else(|| "-".into()),
                        own.map(OwnFigures::p99_text).unwrap_or_else(|| "-".into()),
                        own.and_then(|o| o.counters.in_flight)
                            .map(|n| format!("{n:.0}"))
                            .unwrap_or_else(|| "-".into()),
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
                    "REQ/S",
                    "P99",
                    "IN FLIGHT",
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
                        let mut v = json!({
                            "queue": q, "sidecore": i,
                            "device": d.as_ref().map(|d| &d.0),
                            "device_queue": d.as_ref().map(|d| d.1),
                        });
                        let own = s.queue_counters.get(q).map(|c| OwnFigures {
                            counters: c.clone(),
                            rate: t.queue_rates.get(q).copied(),
                        });
                        v["queue_load"] = own_json(own.as_ref());
                        v
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
                    "queue_load": own_json(r.own.as_ref()),
                    "ranked_by": r.ranked_by().map(|r| r.0),
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

/// A queue's own figures as JSON: null when its server's metrics have
/// none. The rates are null before the second scrape; `p99_s` is null
/// when no request completed in the interval or the p99 is in the `+Inf`
/// bucket, `p99` (text: `250us`, `>10s`) only in the first case.
fn own_json(own: Option<&OwnFigures>) -> Value {
    match own {
        None => Value::Null,
        Some(o) => json!({
            "requests_total": o.counters.requests,
            "in_flight": o.counters.in_flight,
            "requests_per_sec": o.requests_per_sec(),
            "completed": o.rate.map(|r| r.completed),
            "p99_s": o.p99().filter(|p| p.is_finite()),
            "p99": o.p99().map(|_| o.p99_text()),
        }),
    }
}

/// A latency bucket bound as text (`10us`, `2.5ms`, `1s`); `-` for none,
/// `>10s` for the `+Inf` bucket (above the largest finite bound `top`).
fn latency_text(secs: Option<f64>, top: Option<f64>) -> String {
    let text = |s: f64| {
        let round = |x: f64| (x * 100.0).round() / 100.0;
        if s < 1e-3 {
            format!("{}us", round(s * 1e6))
        } else if s < 1.0 {
            format!("{}ms", round(s * 1e3))
        } else {
            format!("{}s", round(s))
        }
    };
    match secs {
        None => "-".into(),
        Some(s) if s.is_infinite() => match top {
            Some(t) => format!(">{}", text(t)),
            None => "+Inf".into(),
        },
        Some(s) => text(s),
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

    /// `vrio_queue_*` lines for queue `dev<dev>.q<q>`: `reads` and `writes`
    /// requests, per-bucket (not cumulative) latency counts over
    /// `LATENCY_BOUNDS` then `+Inf` (missing ones 0), `in_flight`.
    fn queue_text(
        dev: u64,
        q: u32,
        reads: u64,
        writes: u64,
        per_bucket: &[u64],
        in_flight: u64,
    ) -> String {
        let labels = format!("device=\"dev{dev}\",queue=\"dev{dev}.q{q}\"");
        let mut t = format!(
            "vrio_queue_requests_total{{{labels},op=\"read\"}} {reads}\n\
             vrio_queue_requests_total{{{labels},op=\"write\"}} {writes}\n\
             vrio_queue_requests_total{{{labels},op=\"flush\"}} 0\n\
             vrio_queue_bytes_total{{{labels},op=\"read\"}} {}\n",
            reads * 4096
        );
        let bounds = vrio_core::interpose::LATENCY_BOUNDS;
        let mut cumulative = 0;
        for i in 0..=bounds.len() {
            cumulative += per_bucket.get(i).copied().unwrap_or(0);
            // As prometheus-client writes them: 1e-05, 0.0001, 10, +Inf.
            let le = match bounds.get(i) {
                Some(b) if *b < 1e-4 => format!("{b:e}").replace("e-5", "e-05"),
                Some(b) => b.to_string(),
                None => "+Inf".into(),
            };
            t.push_str(&format!(
                "vrio_queue_latency_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}\n"
            ));
        }
        t.push_str(&format!(
            "vrio_queue_latency_seconds_sum{{{labels}}} 0.5\n\
             vrio_queue_latency_seconds_count{{{labels}}} {cumulative}\n\
             vrio_queue_in_flight{{{labels}}} {in_flight}\n"
        ));
        t
    }

    /// Per-bucket counts with `n` requests in the bucket of bound `le`
    /// (`None`: `+Inf`).
    fn bucket(le: Option<f64>, n: u64) -> Vec<u64> {
        let bounds = vrio_core::interpose::LATENCY_BOUNDS;
        let i = le
            .and_then(|le| bounds.iter().position(|b| *b == le))
            .unwrap_or(bounds.len());
        let mut v = vec![0; bounds.len() + 1];
        v[i] = n;
        v
    }

    fn add(a: &[u64], b: &[u64]) -> Vec<u64> {
        a.iter().zip(b).map(|(x, y)| x + y).collect()
    }

    #[test]
    fn parses_queue_figures() {
        let text = format!(
            "{TEXT}# TYPE vrio_queue_latency_seconds histogram\n{}",
            queue_text(7, 0, 30, 12, &bucket(Some(100e-6), 42), 3)
        );
        let s = Scrape::from_text(&text, Instant::now()).unwrap();
        let q = &s.queue_counters["dev7.q0"];
        assert_eq!(q.device, "dev7");
        assert_eq!(q.requests, 42.0, "summed over op, bytes not counted");
        assert_eq!(q.in_flight, Some(3.0));
        assert_eq!(q.latency_buckets.len(), 20);
        assert_eq!(q.latency_buckets[0], (10e-6, 0.0));
        assert_eq!(q.latency_buckets[3], (100e-6, 42.0));
        assert_eq!(q.latency_buckets[19], (f64::INFINITY, 42.0));
        assert_eq!(q.top_bound(), Some(10.0));
        assert_eq!(s.queue_counters.len(), 1);
        // The sidecores' figures are still there; a scrape without
        // vrio_queue_* lines has no queue figures.
        assert_eq!(s.sidecores[&0].requests, 1000.0);
        let old = Scrape::from_text(TEXT, Instant::now()).unwrap();
        assert!(old.queue_counters.is_empty());
        // Samples without a queue label, or with a bad bound, are skipped.
        let odd = format!(
            "{TEXT}vrio_queue_in_flight{{device=\"dev1\"}} 1\n\
             vrio_queue_latency_seconds_bucket{{queue=\"dev1.q0\",le=\"x\"}} 1\n"
        );
        let s = Scrape::from_text(&odd, Instant::now()).unwrap();
        assert!(s.queue_counters.is_empty(), "{:?}", s.queue_counters);
    }

    #[test]
    fn bucket_quantiles() {
        let b = [(1e-3, 98.0), (2e-3, 99.0), (f64::INFINITY, 100.0)];
        assert_eq!(bucket_quantile(&b, 0.99), Some(2e-3));
        assert_eq!(bucket_quantile(&b, 0.5), Some(1e-3));
        assert_eq!(bucket_quantile(&b, 1.0), Some(f64::INFINITY));
        assert_eq!(
            bucket_quantile(&[(1e-3, 0.0), (f64::INFINITY, 0.0)], 0.99),
            None
        );
        assert_eq!(bucket_quantile(&[(1e-3, 5.0)], 0.99), None, "no +Inf");
        assert_eq!(bucket_quantile(&[], 0.99), None);
        // One request: it is the p99.
        assert_eq!(
            bucket_quantile(&[(1e-3, 0.0), (5e-3, 1.0), (f64::INFINITY, 1.0)], 0.99),
            Some(5e-3)
        );
        assert_eq!(latency_text(Some(10e-6), Some(10.0)), "10us");
        assert_eq!(latency_text(Some(2.5e-3), Some(10.0)), "2.5ms");
        assert_eq!(latency_text(Some(2.5), Some(10.0)), "2.5s");
        assert_eq!(latency_text(Some(f64::INFINITY), Some(10.0)), ">10s");
        assert_eq!(latency_text(None, Some(10.0)), "-");
    }

    #[test]
    fn queue_rates_and_p99_between_scrapes() {
        let t0 = Instant::now();
        // Before: q0 had many slow requests (its cumulative p99 is in the
        // +Inf bucket), q3 will leave, q4 will start over.
        let slow = bucket(None, 1000);
        let before = [
            TEXT.to_string(),
            queue_text(7, 0, 600, 400, &slow, 0),
            queue_text(7, 1, 10, 0, &bucket(Some(50e-6), 10), 0),
            queue_text(7, 3, 5, 5, &bucket(Some(1e-3), 10), 0),
            queue_text(7, 4, 500, 0, &bucket(Some(1e-3), 500), 0),
            queue_text(7, 5, 0, 0, &[], 0),
        ]
        .concat();
        let a = Scrape::from_text(&before, t0).unwrap();
        // Two seconds later: q0 did 1000 more, 980 at or under 100us, 15 at
        // 1ms, 5 at 10ms: its p99 over the interval is 1ms. q1 did none;
        // q2 is new; q3 left; q4 started over; q5's were all over 10 s.
        let q0_new = add(
            &add(&bucket(Some(100e-6), 980), &bucket(Some(1e-3), 15)),
            &bucket(Some(10e-3), 5),
        );
        let later = TEXT
            .replace("} 1.5", "} 2.0")
            .replace("\"0\"} 1000", "\"0\"} 3000");
        let after = [
            later.clone(),
            queue_text(7, 0, 1100, 900, &add(&slow, &q0_new), 4),
            queue_text(7, 1, 10, 0, &bucket(Some(50e-6), 10), 0),
            queue_text(7, 2, 100, 0, &bucket(Some(50e-6), 100), 1),
            queue_text(7, 4, 20, 0, &bucket(Some(1e-3), 20), 0),
            queue_text(7, 5, 3, 0, &bucket(None, 3), 0),
        ]
        .concat();
        let b = Scrape::from_text(&after, t0 + Duration::from_secs(2)).unwrap();
        let r = queue_rates(&a, &b);
        assert_eq!(r["dev7.q0"].requests_per_sec, 500.0);
        assert_eq!(r["dev7.q0"].completed, 1000.0);
        assert_eq!(r["dev7.q0"].p99, Some(1e-3));
        assert_eq!(r["dev7.q1"].requests_per_sec, 0.0);
        assert_eq!(r["dev7.q1"].p99, None, "no request in the interval");
        assert!(!r.contains_key("dev7.q2"), "new: no rate yet");
        assert!(!r.contains_key("dev7.q3"), "gone");
        assert!(!r.contains_key("dev7.q4"), "started over: no rate");
        assert_eq!(r["dev7.q5"].p99, Some(f64::INFINITY));
        assert_eq!(r.len(), 3);
        // The sidecores' rates are unaffected by the queues.
        assert_eq!(rates(&a, &b)[&0].requests_per_sec, 1000.0);

        // Through a Target: the first scrape has no rates, the second has.
        let mut t = Target::new("http://x:1/metrics".into());
        t.record(Ok(a.clone()));
        assert!(t.queue_rates.is_empty());
        t.record(Ok(b.clone()));
        assert_eq!(t.queue_rates, r);
        // The server restarted (its sidecore counters went back) while q0's
        // count grew past the old one: no rate for any queue.
        let restarted = [
            TEXT.to_string(),
            queue_text(7, 0, 5000, 0, &bucket(Some(1e-3), 5000), 0),
        ]
        .concat();
        let c = Scrape::from_text(&restarted, t0 + Duration::from_secs(3)).unwrap();
        assert!(queue_rates(&b, &c).is_empty());
        t.record(Ok(c));
        assert!(t.queue_rates.is_empty() && t.rates.is_empty());
        // A failed scrape clears them too.
        t.record(Ok(a));
        t.record(Ok(b));
        assert!(!t.queue_rates.is_empty());
        t.record(Err("refused".into()));
        assert!(t.queue_rates.is_empty());
    }

    fn assignment(device: &str, queue: u32, server: &str, sidecore: u32) -> pb::Assignment {
        pb::Assignment {
            device_id: device.into(),
            queue,
            server_id: server.into(),
            sidecore,
            ..Default::default()
        }
    }

    #[test]
    fn queues_ranked_by_their_own_rate_else_their_sidecore() {
        let t0 = Instant::now();
        // io-1 is scraped, with per-queue figures for 7/0 and 7/1 (not for
        // 7/2); io-2 is not (its sidecore's figures are the controller's).
        // (TEXT has dev7.q0's.)
        let info = "vrio_server_queue_info{queue=\"dev7.q1\",sidecore=\"0\"} 1\n\
                    vrio_server_queue_info{queue=\"dev7.q2\",sidecore=\"1\"} 1\n";
        let scrape = |at: u64, q0: u64, q1: u64| {
            let text = [
                TEXT.replace("\"0\"} 1000", &format!("\"0\"}} {}", 1000 + q0 + q1)),
                info.to_string(),
                queue_text(7, 0, q0, 0, &bucket(Some(250e-6), q0), 1),
                queue_text(7, 1, q1, 0, &bucket(Some(2.5e-3), q1), 2),
            ]
            .concat();
            Scrape::from_text(&text, t0 + Duration::from_secs(at)).unwrap()
        };
        let mut target = Target::new("http://io-1:9100/metrics".into());
        target.record(Ok(scrape(0, 0, 0)));
        target.record(Ok(scrape(1, 100, 300)));
        let controller = Ok(ControllerView {
            servers: vec![
                pb::IoServer {
                    id: "io-1".into(),
                    sidecores: 2,
                    ..Default::default()
                },
                pb::IoServer {
                    id: "io-2".into(),
                    sidecores: 1,
                    load: vec![pb::SidecoreLoad {
                        sidecore: 0,
                        busy: 0.5,
                        requests_per_sec: 200.0,
                    }],
                    ..Default::default()
                },
            ],
            assignments: vec![
                assignment("7", 0, "io-1", 0),
                assignment("7", 1, "io-1", 0),
                assignment("7", 2, "io-1", 1),
                assignment("8", 0, "io-2", 0),
            ],
        });
        let targets = [target];
        let view = View {
            controller_addr: "ctl:7470",
            interval: Duration::from_secs(1),
            now_ms: 0,
            controller: &controller,
            targets: &targets,
            max_queues: 10,
        };
        let text = view.render_text();
        assert!(!text.contains('\x1b'));
        let queues = text.split("\nQUEUES").nth(1).unwrap();
        let rows: Vec<String> = queues
            .lines()
            .skip(2)
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        // DEVICE QUEUE SERVER SIDECORE REQ/S P99 IN-FLIGHT, then the
        // sidecore's BUSY REQ/S FROM.
        assert_eq!(
            rows,
            [
                "7 1 io-1 0 300 2.5ms 2 0% 400 metrics",
                "8 0 io-2 0 - - - 50% 200 controller",
                "7 0 io-1 0 100 250us 1 0% 400 metrics",
                "7 2 io-1 1 - - - 0% 0 metrics",
            ],
            "{text}"
        );
        let v = view.to_json();
        let q = &v["queues"];
        assert_eq!(q[0]["device"], "7", "{v}");
        assert_eq!(q[0]["ranked_by"], "queue");
        assert_eq!(q[0]["queue_load"]["requests_per_sec"], 300.0);
        assert_eq!(q[0]["queue_load"]["p99_s"], 2.5e-3);
        assert_eq!(q[0]["queue_load"]["p99"], "2.5ms");
        assert_eq!(q[0]["queue_load"]["in_flight"], 2.0);
        assert_eq!(q[0]["from"], "metrics");
        assert!(q[0]["sidecore_load"].is_object());
        assert_eq!(q[1]["ranked_by"], "sidecore");
        assert!(q[1]["queue_load"].is_null());
        assert_eq!(q[1]["sidecore_load"]["requests_per_sec"], 200.0);
        assert_eq!(q[3]["ranked_by"], "sidecore");
        assert!(q[3]["queue_load"].is_null());
        let m = &v["metrics"][0]["queues"];
        assert_eq!(m[0]["queue"], "dev7.q0", "{v}");
        assert_eq!(m[0]["queue_load"]["requests_per_sec"], 100.0);
        assert!(m[2]["queue_load"].is_null());
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
