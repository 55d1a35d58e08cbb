//! `--metrics-listen ADDR`: a `/metrics` endpoint in the Prometheus text
//! format (0.0.4), written by the official `prometheus-client` crate and
//! served by hyper on one thread of its own.
//!
//! Nothing here touches the data path: the collectors ([`ServerMetrics`],
//! [`ClientMetrics`]) read the counters the I/O server, its sidecores and
//! the VM-host agents keep anyway, at scrape time. The metric reference is
//! `docs/observability.md`.

use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use vrio_core::net::{DropReason, PortKind};
use vrio_core::remote::{AttachedDevice, IoServer, LinkState, RemoteSnapshot, ANY_SIDECORE};
use vrio_core::sidecore::{SidecoreStats, StatsSnapshot};
use vrio_core::vhost_user::Placement;

use crate::LogFormat;

/// The observability flags of `vrio-server` and of every `vrio-client`
/// subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct ObsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT; port 0
    /// picks a free one, printed at start). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Log format on stderr: `text` (coloured only on a terminal) or
    /// `json` (one object per line). RUST_LOG picks what is logged
    /// (default: warn).
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "VRIO_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

impl ObsArgs {
    /// Binds `--metrics-listen`, if given, so that a taken address fails
    /// before anything else starts.
    pub fn bind_metrics(&self) -> Result<Option<MetricsListener>, MetricsError> {
        self.metrics_listen
            .as_deref()
            .map(MetricsListener::bind)
            .transpose()
    }
}

/// Why the metrics endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address is not HOST:PORT, or does not resolve.
    #[error("--metrics-listen {addr}: want HOST:PORT, like 127.0.0.1:9100 ({why})")]
    Address {
        /// The address given.
        addr: String,
        /// What resolving it said.
        why: String,
    },
    /// Another socket has the address.
    #[error("--metrics-listen {0}: address in use")]
    AddrInUse(String),
    /// Binding failed otherwise (permission, no such local address...).
    #[error("--metrics-listen {addr}: {source}")]
    Bind {
        /// The address given.
        addr: String,
        /// The bind error.
        source: std::io::Error,
    },
    /// The server's runtime or thread did not start.
    #[error("metrics endpoint: {0}")]
    Start(#[from] std::io::Error),
}

/// A bound, not yet serving, metrics socket.
#[derive(Debug)]
pub struct MetricsListener {
    listener: std::net::TcpListener,
}

impl MetricsListener {
    /// Binds `listen` (HOST:PORT).
    pub fn bind(listen: &str) -> Result<Self, MetricsError> {
        let addrs: Vec<SocketAddr> = listen
            .to_socket_addrs()
            .map_err(|e| MetricsError::Address {
                addr: listen.to_string(),
                why: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(MetricsError::Address {
                addr: listen.to_string(),
                why: "it resolves to no address".into(),
            });
        }
        let listener = std::net::TcpListener::bind(&addrs[..]).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => MetricsError::AddrInUse(listen.to_string()),
            _ => MetricsError::Bind {
                addr: listen.to_string(),
                source: e,
            },
        })?;
        Ok(Self { listener })
    }

    /// The address bound (the port chosen, for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, MetricsError> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves `/metrics` from a registry with `collector` (and
    /// `vrio_build_info` for `binary`) on a thread of its own, until the
    /// returned server is dropped.
    pub fn serve(
        self,
        binary: &'static str,
        collector: impl Collector,
    ) -> Result<MetricsServer, MetricsError> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(BuildInfo { binary }));
        registry.register_collector(Box::new(collector));
        MetricsServer::start(self.listener, registry)
    }
}

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 8;
/// How long a client may take to send a request's headers (and how long
/// an idle keep-alive connection stays open).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection; then it closes after its current
/// request.
const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(300);

/// The running endpoint: one thread with a single-threaded tokio runtime
/// and hyper's HTTP/1 server. Stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    scrapes: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl MetricsServer {
    fn start(listener: std::net::TcpListener, registry: Registry) -> Result<Self, MetricsError> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let listener = {
            let _in_rt = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let scrapes = Arc::new(AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (registry, s) = (Arc::new(registry), scrapes.clone());
        let join = std::thread::Builder::new()
            .name("vrio-metrics".into())
            .spawn(move || rt.block_on(accept_loop(listener, registry, s, rx)))?;
        Ok(Self {
            addr,
            scrapes,
            shutdown: Some(tx),
            join: Some(join),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `/metrics` requests answered so far.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Relaxed)
    }

    /// CPU time the endpoint's thread (accepting, encoding, answering) has
    /// used so far, in ns, from its thread clock; 0 if it cannot be read.
    /// What the metrics cost the process, scrapers aside.
    pub fn cpu_ns(&self) -> u64 {
        use std::os::unix::thread::JoinHandleExt;
        let Some(j) = &self.join else { return 0 };
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the thread is joinable (joined only in drop, which needs
        // `&mut self`), so its pthread_t is valid; `clock` is writable.
        if unsafe { libc::pthread_getcpuclockid(j.as_pthread_t(), &mut clock) } != 0 {
            return 0;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock` is a CPU clock id just obtained, `ts` is writable.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return 0;
        }
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// Waits until more than `seen` scrapes were answered; false if
    /// `timeout` passed or `stop` was set first.
    pub fn wait_scraped_after(&self, seen: u64, timeout: Duration, stop: &AtomicBool) -> bool {
        let deadline = Instant::now() + timeout;
        while self.scrapes() <= seen {
            if stop.load(Relaxed) || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    scrapes: Arc<AtomicU64>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept:
                // back off a little rather than spin.
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics endpoint: too many connections; one refused");
            continue;
        };
        let (registry, scrapes) = (registry.clone(), scrapes.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                std::future::ready(Ok::<_, Infallible>(answer(&req, &registry, &scrapes)))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = tokio::time::sleep(MAX_CONNECTION_LIFE) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_TIMEOUT, conn).await;
                }
            }
            drop(slot);
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    registry: &Registry,
    scrapes: &AtomicU64,
) -> Response<Full<Bytes>> {
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    match (req.uri().path(), readable) {
        ("/metrics", true) => {
            let mut body = String::with_capacity(16 << 10);
            match prometheus_client::encoding::prometheus_text::encode(&mut body, registry) {
                Ok(()) => {
                    scrapes.fetch_add(1, Relaxed);
                    reply(
                        StatusCode::OK,
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        body,
                    )
                }
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    "encoding the metrics failed\n".into(),
                ),
            }
        }
        ("/", true) => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "vrio: Prometheus metrics are at /metrics\n".into(),
        ),
        ("/metrics" | "/", false) => {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET and HEAD\n".into(),
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A sample's labels.
type Labels = Vec<(&'static str, String)>;

/// A counter family read from one field of `T`: name, help, the field.
type Field<T> = (&'static str, &'static str, fn(&T) -> u64);

/// Writes one counter family: `name` (without `_total`, which the
/// encoder adds) with a sample per label set.
fn counters<N: prometheus_client::encoding::EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one gauge family.
fn gauges<N: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// `vrio_build_info{binary, version} 1`.
#[derive(Debug)]
struct BuildInfo {
    binary: &'static str,
}

impl Collector for BuildInfo {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        gauges(
            &mut enc,
            "vrio_build_info",
            "The binary and its version (always 1).",
            [(
                vec![
                    ("binary", self.binary.to_string()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
                1u64,
            )],
        )
    }
}

/// Per-sidecore counters: an I/O server's sidecores (by index), or the
/// local sidecore of `vrio-client vhost-user-blk --local-file`.
/// Idle time per sidecore: the time since the clock started, less the
/// busy time added since (the sidecores' stats count busy time only).
#[derive(Debug)]
struct IdleClock {
    t0: Instant,
    busy0: Vec<u64>,
}

impl IdleClock {
    fn start(loads: &[StatsSnapshot]) -> Self {
        Self {
            t0: Instant::now(),
            busy0: loads.iter().map(|s| s.busy_ns).collect(),
        }
    }

    /// Seconds each sidecore of `loads` was idle since the start.
    fn idle(&self, loads: &[(StatsSnapshot, Option<usize>)]) -> Vec<f64> {
        let wall = self.t0.elapsed().as_secs_f64();
        loads
            .iter()
            .enumerate()
            .map(|(i, (s, _))| {
                let busy = s
                    .busy_ns
                    .saturating_sub(self.busy0.get(i).copied().unwrap_or(0));
                (wall - secs(busy)).max(0.0)
            })
            .collect()
    }
}

fn encode_sidecores(
    enc: &mut DescriptorEncoder,
    loads: &[(StatsSnapshot, Option<usize>)],
    clock: &IdleClock,
) -> std::fmt::Result {
    let label = |i: usize| vec![("sidecore", i.to_string())];
    let each = |f: fn(&StatsSnapshot) -> u64| {
        loads
            .iter()
            .enumerate()
            .map(move |(i, (s, _))| (label(i), f(s)))
    };
    counters(
        enc,
        "vrio_sidecore_requests",
        "Requests the sidecore served.",
        each(|s| s.requests),
    )?;
    counters(
        enc,
        "vrio_sidecore_bytes",
        "Bytes in the buffers of the requests the sidecore served.",
        each(|s| s.bytes),
    )?;
    counters(
        enc,
        "vrio_sidecore_errors",
        "Requests the sidecore completed with an error.",
        each(|s| s.errors),
    )?;
    counters(
        enc,
        "vrio_sidecore_polls",
        "Queue polls.",
        each(|s| s.polls),
    )?;
    counters(
        enc,
        "vrio_sidecore_empty_polls",
        "Queue polls that found nothing.",
        each(|s| s.empty_polls),
    )?;
    counters(
        enc,
        "vrio_sidecore_busy_seconds",
        "Time spent in polling rounds that served at least one request; \
         1 - rate() of it is the idle fraction.",
        loads
            .iter()
            .enumerate()
            .map(|(i, (s, _))| (label(i), secs(s.busy_ns))),
    )?;
    counters(
        enc,
        "vrio_sidecore_idle_seconds",
        "Time since the metrics endpoint started that the sidecore spent \
         in rounds that served nothing (polling, sleeping or blocked).",
        clock
            .idle(loads)
            .into_iter()
            .enumerate()
            .map(|(i, v)| (label(i), v)),
    )?;
    counters(
        enc,
        "vrio_sidecore_sleeps",
        "Times the sidecore slept or blocked for lack of work.",
        each(|s| s.sleeps),
    )?;
    counters(
        enc,
        "vrio_sidecore_poll_mode_switches",
        "Queue switches into poll mode (to=\"poll\") and back to guest \
         notifications (to=\"notify\").",
        loads.iter().enumerate().flat_map(|(i, (s, _))| {
            [
                (
                    vec![("sidecore", i.to_string()), ("to", "poll".into())],
                    s.poll_mode_on,
                ),
                (
                    vec![("sidecore", i.to_string()), ("to", "notify".into())],
                    s.poll_mode_off,
                ),
            ]
        }),
    )?;
    counters(
        enc,
        "vrio_sidecore_discovery_comparisons",
        "Times the sidecore compared its CPU per request with doorbells \
         and with remote polls (adaptive queues).",
        each(|s| s.discovery_comparisons),
    )?;
    counters(
        enc,
        "vrio_sidecore_discovery_switches",
        "Changes of how the adaptive queues are advised to learn of requests.",
        each(|s| s.discovery_switches),
    )?;
    gauges(
        enc,
        "vrio_sidecore_remote_poll_advised",
        "1 while the sidecore advises its adaptive queues to poll the \
         guests' rings, 0 while it advises doorbells.",
        each(|s| s.remote_poll_advised),
    )?;
    if loads.iter().any(|(_, n)| n.is_some()) {
        gauges(
            enc,
            "vrio_sidecore_queues",
            "Queues the sidecore serves now.",
            loads
                .iter()
                .enumerate()
                .map(|(i, (_, n))| (label(i), n.unwrap_or(0) as u64)),
        )?;
    }
    Ok(())
}

/// What `vrio-server` exports: its fabric counters (blk and net), its
/// sidecores, its queues, its refused attaches and its switch ports.
pub struct ServerMetrics {
    server: Arc<IoServer>,
    clock: IdleClock,
}

impl ServerMetrics {
    /// The metrics of `server`, read at each scrape.
    pub fn new(server: Arc<IoServer>) -> Self {
        let loads: Vec<_> = server
            .sidecore_loads()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        Self {
            clock: IdleClock::start(&loads),
            server,
        }
    }
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerMetrics")
            .field("server", &self.server.addr())
            .finish()
    }
}

impl Collector for ServerMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.server;
        let kinds = [
            ("blk", s.stats().snapshot()),
            ("net", s.net_stats().snapshot()),
        ];
        encode_remote(&mut enc, &kinds)?;

        let loads: Vec<_> = s
            .sidecore_loads()
            .into_iter()
            .map(|(st, n)| (st, Some(n)))
            .collect();
        encode_sidecores(&mut enc, &loads, &self.clock)?;
        counters(
            &mut enc,
            "vrio_server_sidecore_moves",
            "Queues moved between this server's sidecores.",
            [(Labels::new(), s.sidecore_moves())],
        )?;

        let queues = s.queues();
        gauges(
            &mut enc,
            "vrio_server_queues",
            "Queues served now.",
            [(Labels::new(), queues.len() as u64)],
        )?;
        gauges(
            &mut enc,
            "vrio_server_queue_info",
            "A queue served now (dev<device>.q<queue>) and its sidecore (always 1).",
            queues
                .into_iter()
                .map(|(q, sc)| (vec![("queue", q), ("sidecore", sc.to_string())], 1u64)),
        )?;

        let r = s.refusals();
        counters(
            &mut enc,
            "vrio_server_attach_refusals",
            "Attaches refused: reason=\"unauthenticated\" (no or no valid \
             credential), reason=\"forbidden\" (volume not granted, missing \
             or busy).",
            [
                ("unauthenticated", r.unauthenticated.load(Relaxed)),
                ("forbidden", r.forbidden.load(Relaxed)),
            ]
            .map(|(why, n)| (vec![("reason", why.to_string())], n)),
        )?;

        encode_ports(&mut enc, s)?;
        encode_queues(&mut enc, s)?;
        encode_interposition(&mut enc, &s.policies().reports())
    }
}

/// Meter figures (requests, bytes, errors and status by op, latency) as
/// the families `{prefix}_requests_total`, `_bytes_total`,
/// `_errors_total`, `_status_total` and `_latency_seconds`, one sample set
/// per labelled report.
fn encode_meters(
    enc: &mut DescriptorEncoder,
    prefix: &str,
    whose: &str,
    items: &[(Labels, vrio_core::interpose::StageReport)],
) -> std::fmt::Result {
    for (name, label, help) in [
        ("requests", "op", "Requests completed, by op"),
        (
            "bytes",
            "op",
            "Data bytes of requests completed without error, by op",
        ),
        (
            "errors",
            "op",
            "Requests completed with a virtio status other than OK, by op",
        ),
        (
            "status",
            "status",
            "Requests completed, by virtio status (ok, ioerr, unsupp, other)",
        ),
    ] {
        counters(
            enc,
            &format!("{prefix}_{name}"),
            &format!("{help} ({whose})."),
            items.iter().flat_map(|(labels, r)| {
                r.counters
                    .iter()
                    .filter(move |c| c.name == name)
                    .map(move |c| {
                        let mut l = labels.clone();
                        l.push((label, c.label.clone()));
                        (l, c.value)
                    })
            }),
        )?;
    }
    let (name, help) = (
        format!("{prefix}_latency_seconds"),
        format!(
            "Request latency at the I/O server, from the batch's intake to its \
             reply being posted to the guest ({whose})."
        ),
    );
    let mut m = enc.encode_descriptor(&name, &help, None, MetricType::Histogram)?;
    for (labels, r) in items {
        let Some(h) = &r.latency else { continue };
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(h.counts.iter().copied())
            .collect();
        m.encode_family(labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum,
                h.count(),
                &buckets,
                None,
            )?;
    }
    Ok(())
}

/// Each queue's own figures (`vrio-server --metrics-listen` keeps them):
/// `vrio_queue_*`, labelled by device and queue.
fn encode_queues(enc: &mut DescriptorEncoder, server: &IoServer) -> std::fmt::Result {
    use vrio_core::interpose::Stage;
    let queues = server.queue_meters();
    let labels =
        |name: &str, d: u64| vec![("device", format!("dev{d}")), ("queue", name.to_string())];
    let items: Vec<_> = queues
        .iter()
        .map(|(name, d, m)| (labels(name, *d), m.meter.report()))
        .collect();
    encode_meters(enc, "vrio_queue", "blk and net TX queues", &items)?;
    gauges(
        enc,
        "vrio_queue_in_flight",
        "Requests the queue took from the guest and has not completed.",
        queues
            .iter()
            .map(|(name, d, m)| (labels(name, *d), m.in_flight.load(Relaxed))),
    )
}

/// The interposition stages' counters, for devices that have stages: the
/// `meter` stage's as `vrio_device_*` families, every other stage's as
/// `vrio_interpose_events_total`.
fn encode_interposition(
    enc: &mut DescriptorEncoder,
    reports: &[(u64, Vec<vrio_core::interpose::StageReport>)],
) -> std::fmt::Result {
    let dev = |d: u64| format!("dev{d}");
    let meters: Vec<(Labels, vrio_core::interpose::StageReport)> = reports
        .iter()
        .flat_map(|(d, rs)| {
            rs.iter()
                .filter(|r| r.kind == "meter")
                .map(move |r| (vec![("device", dev(*d))], r.clone()))
        })
        .collect();
    encode_meters(enc, "vrio_device", "devices with a `meter` stage", &meters)?;
    counters(
        enc,
        "vrio_interpose_events",
        "What interposition stages other than `meter` counted, by device, \
         stage (qos, crypt, fault, net_acl, net_rate), event (waits, failed, \
         delayed, drops) and reason (for drops: acl_mac, acl_ipv4, acl_short).",
        reports.iter().flat_map(|(d, rs)| {
            rs.iter().filter(|r| r.kind != "meter").flat_map(move |r| {
                r.counters.iter().map(move |c| {
                    (
                        vec![
                            ("device", dev(*d)),
                            ("stage", r.kind.clone()),
                            ("event", c.name.clone()),
                            ("reason", c.label.clone()),
                        ],
                        c.value,
                    )
                })
            })
        }),
    )
}

/// The fabric counters of the blk and net queues, by `device_type`.
fn encode_remote(
    enc: &mut DescriptorEncoder,
    kinds: &[(&str, RemoteSnapshot)],
) -> std::fmt::Result {
    let families: [Field<RemoteSnapshot>; 13] = [
        (
            "vrio_server_requests",
            "Requests completed (net: TX chains plus RX frames).",
            |r| r.requests,
        ),
        (
            "vrio_server_bad_requests",
            "Requests that failed validation (bad descriptor chains), completed as errors.",
            |r| r.bad_requests,
        ),
        ("vrio_server_batches", "Batches of requests served.", |r| {
            r.batches
        }),
        (
            "vrio_server_fabric_ops",
            "Fabric work requests the server posted (READ, WRITE, WRITE_WITH_IMM, SEND).",
            |r| r.fabric_ops,
        ),
        (
            "vrio_server_critical_round_trips",
            "Fabric round trips on the requests' critical paths, summed over requests.",
            |r| r.critical_rtts,
        ),
        (
            "vrio_server_idle_round_trips",
            "Fabric round trips spent only discovering work (remote polls that found none).",
            |r| r.idle_rtts,
        ),
        (
            "vrio_server_doorbells",
            "Doorbell messages received from VM-host agents.",
            |r| r.doorbells,
        ),
        (
            "vrio_server_remote_polls",
            "READs of a guest's avail ring (remote polling).",
            |r| r.remote_polls,
        ),
        (
            "vrio_server_descriptor_fetches",
            "READs of descriptors or indirect tables a doorbell did not carry.",
            |r| r.fetches,
        ),
        (
            "vrio_server_notify_mode_switches",
            "Switches between doorbells and remote polling (adaptive mode).",
            |r| r.mode_switches,
        ),
        (
            "vrio_server_handovers",
            "Queues handed back to their VM host (QUIESCE, for a move).",
            |r| r.handovers,
        ),
        (
            "vrio_server_inline_bytes",
            "Guest bytes taken from doorbells' inline copies instead of a READ.",
            |r| r.inline_bytes,
        ),
        (
            "vrio_server_interrupts",
            "Guest interrupts the server asked VM hosts for.",
            |r| r.interrupts,
        ),
    ];
    for (name, help, f) in families {
        counters(
            enc,
            name,
            help,
            kinds
                .iter()
                .map(|(k, r)| (vec![("device_type", k.to_string())], f(r))),
        )?;
    }
    type Kind = (&'static str, fn(&RemoteSnapshot) -> u64);
    let by_kind: [Kind; 4] = [
        ("read", |r| r.reads),
        ("write", |r| r.writes),
        ("write_imm", |r| r.write_imms),
        ("send", |r| r.sends),
    ];
    counters(
        enc,
        "vrio_server_fabric_work_requests",
        "Work requests the server posted, by kind: read, write, write_imm \
         (the waves), send (control messages to agents).",
        kinds.iter().flat_map(|(k, r)| {
            by_kind.iter().map(move |(kind, f)| {
                (
                    vec![("device_type", k.to_string()), ("kind", kind.to_string())],
                    f(r),
                )
            })
        }),
    )?;
    counters(
        enc,
        "vrio_server_fabric_bytes",
        "Bytes moved by one-sided operations: direction=\"read\" from guest \
         memory, direction=\"write\" into it.",
        kinds.iter().flat_map(|(k, r)| {
            [("read", r.read_bytes), ("write", r.write_bytes)].map(|(d, n)| {
                (
                    vec![("device_type", k.to_string()), ("direction", d.to_string())],
                    n,
                )
            })
        }),
    )?;
    counters(
        enc,
        "vrio_server_fabric_completion_errors",
        "Work requests that completed with an error status; each ends its \
         queue (its agent reconnects or fails over).",
        kinds
            .iter()
            .map(|(k, r)| (vec![("device_type", k.to_string())], r.completion_errors)),
    )?;
    Ok(())
}

/// Every port of the server's switch: its guests' net devices
/// (`dev<device>`) and the uplink TAP, if any.
fn encode_ports(enc: &mut DescriptorEncoder, server: &IoServer) -> std::fmt::Result {
    let ports: Vec<_> = server
        .net()
        .switch()
        .ports()
        .into_iter()
        .map(|p| {
            let kind = match p.kind() {
                PortKind::Guest { .. } => "guest",
                PortKind::Uplink(_) => "uplink",
            };
            let labels = vec![("port", p.name().to_string()), ("port_type", kind.into())];
            (labels, p.stats().snapshot(), p.backlog_len())
        })
        .collect();
    let each = |f: fn(&vrio_core::net::PortSnapshot) -> u64| {
        ports.iter().map(move |(l, s, _)| (l.clone(), f(s)))
    };
    counters(
        enc,
        "vrio_net_port_rx_frames",
        "Frames the switch accepted from the port (a guest's TX, or in from the uplink).",
        each(|s| s.rx_packets),
    )?;
    counters(
        enc,
        "vrio_net_port_rx_bytes",
        "Bytes of the frames the switch accepted from the port.",
        each(|s| s.rx_bytes),
    )?;
    counters(
        enc,
        "vrio_net_port_tx_frames",
        "Frames the switch delivered to the port (into a guest's RX ring, or out of the uplink).",
        each(|s| s.tx_packets),
    )?;
    counters(
        enc,
        "vrio_net_port_tx_bytes",
        "Bytes of the frames the switch delivered to the port.",
        each(|s| s.tx_bytes),
    )?;
    counters(
        enc,
        "vrio_net_port_checksummed_frames",
        "Frames from the port whose checksum the device completed (CSUM offload).",
        each(|s| s.checksummed),
    )?;
    counters(
        enc,
        "vrio_net_port_drops",
        "Frames dropped at the port, by reason.",
        ports.iter().flat_map(|(l, s, _)| {
            DropReason::ALL.iter().map(move |&r| {
                let mut l = l.clone();
                l.push(("reason", r.name().to_string()));
                (l, s.drops(r))
            })
        }),
    )?;
    gauges(
        enc,
        "vrio_net_port_backlog_frames",
        "Frames waiting in the port's backlog for the guest's RX buffers.",
        ports.iter().map(|(l, _, n)| (l.clone(), *n as u64)),
    )
}

/// The agents a `vrio-client` runs.
pub enum Agents {
    /// One agent per device, serving all its queues (`synthetic`):
    /// `(device, agent)`.
    Devices(Vec<(String, Arc<AttachedDevice>)>),
    /// One agent per vring of one device (`vhost-user-blk`,
    /// `vhost-user-net`), while the VMM has the vring running.
    Vrings {
        /// The device's label.
        device: String,
        /// Where the front keeps its vrings' agents.
        placement: Arc<Placement>,
    },
    /// No agent (the local model: `vhost-user-blk --local-file`).
    None,
}

/// What `vrio-client` exports: its agents' counters and where their
/// queues are served, the synthetic guests' completed requests, and the
/// local sidecore of the local model.
pub struct ClientMetrics {
    agents: Agents,
    completed: Option<Arc<AtomicU64>>,
    /// A local sidecore, and the clock of its idle time.
    sidecore: Option<(Arc<SidecoreStats>, IdleClock)>,
}

impl ClientMetrics {
    /// The metrics of `agents`.
    pub fn new(agents: Agents) -> Self {
        Self {
            agents,
            completed: None,
            sidecore: None,
        }
    }

    /// Also exports `completed` as `vrio_guest_requests_completed_total`
    /// (the synthetic guests' own count).
    pub fn with_completed(mut self, completed: Arc<AtomicU64>) -> Self {
        self.completed = Some(completed);
        self
    }

    /// Also exports a local sidecore as `vrio_sidecore_*{sidecore="0"}`.
    pub fn with_sidecore(mut self, stats: Arc<SidecoreStats>) -> Self {
        let clock = IdleClock::start(&[stats.snapshot()]);
        self.sidecore = Some((stats, clock));
        self
    }

    /// `(labels, agent)` for every agent running now.
    fn agents(&self) -> Vec<(Labels, Arc<AttachedDevice>)> {
        match &self.agents {
            Agents::Devices(d) => d
                .iter()
                .map(|(name, a)| (vec![("device", name.clone())], a.clone()))
                .collect(),
            Agents::Vrings { device, placement } => {
                let attached = placement
                    .attached
                    .lock()
                    .map(|v| v.clone())
                    .unwrap_or_default();
                attached
                    .into_iter()
                    .enumerate()
                    .filter_map(|(q, a)| {
                        a.map(|a| {
                            (
                                vec![("device", device.clone()), ("vring", q.to_string())],
                                a,
                            )
                        })
                    })
                    .collect()
            }
            Agents::None => Vec::new(),
        }
    }
}

impl std::fmt::Debug for ClientMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMetrics").finish_non_exhaustive()
    }
}

impl Collector for ClientMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        if let Some(done) = &self.completed {
            counters(
                &mut enc,
                "vrio_guest_requests_completed",
                "Requests the synthetic guests completed (and verified, when read back).",
                [(Labels::new(), done.load(Relaxed))],
            )?;
        }
        if let Some((sc, clock)) = &self.sidecore {
            encode_sidecores(&mut enc, &[(sc.snapshot(), None)], clock)?;
        }
        if matches!(self.agents, Agents::None) {
            return Ok(());
        }
        let agents = self.agents();
        let families: [Field<vrio_core::remote::AgentStats>; 7] = [
            (
                "vrio_agent_doorbells",
                "Doorbell messages the agent sent to I/O servers.",
                |s| s.doorbells.load(Relaxed),
            ),
            (
                "vrio_agent_completions",
                "Used-index updates the agent published to the guest.",
                |s| s.completions.load(Relaxed),
            ),
            (
                "vrio_agent_interrupts",
                "Guest interrupts the agent raised.",
                |s| s.interrupts.load(Relaxed),
            ),
            (
                "vrio_agent_kicks",
                "Guest kicks (queue notifications) the agent saw.",
                |s| s.kicks.load(Relaxed),
            ),
            (
                "vrio_agent_moves",
                "Queue handovers from a live I/O server to another.",
                |s| s.moves.load(Relaxed),
            ),
            (
                "vrio_agent_failovers",
                "Queue re-attachments after a lost I/O server.",
                |s| s.failovers.load(Relaxed),
            ),
            (
                "vrio_agent_orphaned_queues",
                "Times a queue lost its I/O server.",
                |s| s.orphaned.load(Relaxed),
            ),
        ];
        for (name, help, f) in families {
            counters(
                &mut enc,
                name,
                help,
                agents.iter().map(|(l, a)| (l.clone(), f(a.stats()))),
            )?;
        }
        counters(
            &mut enc,
            "vrio_agent_cpu_seconds",
            "CPU time of the agent's thread (recorded when the agent stops).",
            agents
                .iter()
                .map(|(l, a)| (l.clone(), secs(a.stats().cpu_ns.load(Relaxed)))),
        )?;
        gauges(
            &mut enc,
            "vrio_agent_queue_info",
            "Where each queue is (or was last) served: server, sidecore \
             (\"any\": the server's choice) and state (serving, moving, \
             orphaned); always 1.",
            agents.iter().flat_map(|(l, a)| {
                a.queues().into_iter().map(move |q| {
                    let mut l = l.clone();
                    l.push(("queue", q.queue.to_string()));
                    l.push(("server", q.target.server.clone()));
                    let sc = match q.target.sidecore {
                        ANY_SIDECORE => "any".to_string(),
                        n => n.to_string(),
                    };
                    l.push(("sidecore", sc));
                    let state = match q.state {
                        LinkState::Serving => "serving",
                        LinkState::Moving => "moving",
                        LinkState::Orphaned => "orphaned",
                    };
                    l.push(("state", state.into()));
                    (l, 1u64)
                })
            }),
        )
    }
}

/// Where `vrio-controller` puts its controller once it has one: at start
/// with a local store, once elected with etcd. Until then the endpoint
/// exports `vrio_controller_leader 0` and the RPC metrics only.
pub type ControllerSlot = Arc<std::sync::OnceLock<Arc<vrio_control::Controller>>>;

/// What `vrio-controller` exports: whether it leads, its servers and
/// their leases, its assignments, devices, volumes and grants, its moves
/// and failovers (read from the controller's state at scrape time), and
/// the Control service's calls by method and code with their latency.
pub struct ControllerMetrics {
    ctrl: ControllerSlot,
    rpc: Arc<vrio_control::metrics::RpcMetrics>,
}

impl ControllerMetrics {
    /// The metrics of the controller `ctrl` holds (or will), and of the
    /// calls recorded into `rpc` (`vrio_control::server::serve_observed`).
    pub fn new(ctrl: ControllerSlot, rpc: Arc<vrio_control::metrics::RpcMetrics>) -> Self {
        Self { ctrl, rpc }
    }
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics")
            .field("leader", &self.ctrl.get().is_some())
            .finish_non_exhaustive()
    }
}

/// A gRPC code as Prometheus labels usually spell it (`OK`, `NotFound`,
/// `Unauthenticated`...).
fn grpc_code_label(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".into(),
        c => format!("{c:?}"),
    }
}

impl Collector for ControllerMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let ctrl = self.ctrl.get();
        gauges(
            &mut enc,
            "vrio_controller_leader",
            "1 when this instance leads and serves; 0 while it starts (loads \
             its state) or waits for the etcd election.",
            [(Labels::new(), u64::from(ctrl.is_some()))],
        )?;
        if let Some(ctrl) = ctrl {
            encode_controller_state(&mut enc, ctrl)?;
        }
        encode_rpcs(&mut enc, &self.rpc.snapshot(), self.rpc.methods())
    }
}

fn encode_controller_state(
    enc: &mut DescriptorEncoder,
    ctrl: &vrio_control::Controller,
) -> std::fmt::Result {
    let stats = ctrl.stats();
    let servers = ctrl.servers();
    let now_ms = vrio_control::service::now_ms() as i64;
    let total = |name: &str, help: &str, v: u64| (name.to_string(), help.to_string(), v);
    let totals = [
        total(
            "vrio_controller_servers",
            "Servers the controller knows, dead ones included.",
            u64::from(stats.servers),
        ),
        total(
            "vrio_controller_servers_alive",
            "Servers whose lease is live.",
            u64::from(stats.alive_servers),
        ),
        total(
            "vrio_controller_servers_draining",
            "Servers being drained (they get no new queues).",
            servers.iter().filter(|(s, _)| s.draining).count() as u64,
        ),
        total(
            "vrio_controller_devices",
            "Attached devices.",
            u64::from(stats.devices),
        ),
        total(
            "vrio_controller_queues",
            "Queues of all attached devices, placed or not.",
            u64::from(stats.queues),
        ),
        total(
            "vrio_controller_unassigned_queues",
            "Queues waiting for a server with room.",
            u64::from(stats.unassigned_queues),
        ),
        total(
            "vrio_controller_volumes",
            "Volumes defined.",
            ctrl.volumes().len() as u64,
        ),
        total(
            "vrio_controller_grants",
            "Volume grants (a volume a device may attach).",
            ctrl.grants().len() as u64,
        ),
    ];
    for (name, help, v) in totals {
        gauges(enc, &name, &help, [(Labels::new(), v)])?;
    }
    let c = &stats.counters;
    counters(
        enc,
        "vrio_controller_queue_moves",
        "Queue moves of any cause (by hand, drain, failover, rebalance), kept \
         with the state (so across restarts).",
        [(Labels::new(), c.moves)],
    )?;
    counters(
        enc,
        "vrio_controller_failovers",
        "Servers whose lease expired and whose queues were failed over.",
        [(Labels::new(), c.failovers)],
    )?;
    counters(
        enc,
        "vrio_controller_rebalance_moves",
        "Queue moves made by rebalance rounds.",
        [(Labels::new(), c.rebalance_moves)],
    )?;

    let label = |s: &vrio_control::model::Server| vec![("server", s.id.clone())];
    gauges(
        enc,
        "vrio_controller_server_lease_remaining_seconds",
        "Seconds until the server's lease runs out unless renewed (negative: \
         it ran out that long ago).",
        servers.iter().map(|(s, _)| {
            let left_ms = (s.lease_expires_ms as i64).saturating_sub(now_ms);
            (label(s), left_ms as f64 / 1000.0)
        }),
    )?;
    gauges(
        enc,
        "vrio_controller_server_alive",
        "1 while the server's lease is live.",
        servers.iter().map(|(s, _)| (label(s), u64::from(s.alive))),
    )?;
    gauges(
        enc,
        "vrio_controller_server_draining",
        "1 while the server is being drained.",
        servers
            .iter()
            .map(|(s, _)| (label(s), u64::from(s.draining))),
    )?;
    gauges(
        enc,
        "vrio_controller_server_capacity_queues",
        "Most queues the server accepts (its registration).",
        servers
            .iter()
            .map(|(s, _)| (label(s), u64::from(s.capacity))),
    )?;
    gauges(
        enc,
        "vrio_controller_server_queues",
        "Queues assigned to the server.",
        servers.iter().map(|(s, n)| (label(s), u64::from(*n))),
    )
}

fn encode_rpcs(
    enc: &mut DescriptorEncoder,
    snap: &vrio_control::metrics::RpcSnapshot,
    methods: &[&'static str],
) -> std::fmt::Result {
    // Every method appears from the start (with code OK), so rate() and
    // absent series need no special case.
    let mut calls: Vec<(Labels, u64)> = methods
        .iter()
        .filter(|m| !snap.calls.iter().any(|(c, _, _)| c == *m))
        .map(|m| (vec![("method", m.to_string()), ("code", "OK".into())], 0u64))
        .collect();
    calls.extend(snap.calls.iter().map(|(m, code, n)| {
        (
            vec![("method", m.to_string()), ("code", grpc_code_label(*code))],
            *n,
        )
    }));
    counters(
        enc,
        "vrio_controller_rpcs",
        "Calls of the Control service by method and gRPC code (refused ones \
         included; method=\"unknown\": a method it does not have).",
        calls,
    )?;
    let mut m = enc.encode_descriptor(
        "vrio_controller_rpc_duration_seconds",
        "Time from a call's arrival to its response (for WatchAssignments: \
         to the stream's start), by method.",
        None,
        MetricType::Histogram,
    )?;
    let empty = vrio_control::metrics::Latency::default();
    let mut names: Vec<&str> = methods.to_vec();
    names.extend(snap.latency.keys().filter(|k| !methods.contains(k)));
    for name in names {
        let l = snap.latency.get(name).unwrap_or(&empty);
        let buckets: Vec<(f64, u64)> = vrio_control::metrics::LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(l.buckets.iter().copied())
            .collect();
        m.encode_family(&vec![("method", name.to_string())])?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            l.sum_secs, l.count, &buckets, None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrio_core::blk::MemoryBackend;
    use vrio_core::interpose::PolicySpec;
    use vrio_core::remote::{IoServerConfig, NotifyMode};
    use vrio_rdma::Backend;
    use vrio_testkit::runner::{
        any_placement, attach_guests_placed, drive_guests, make_guests, open_domain, RunConfig,
    };

    /// A metered device's figures and a QoS stage's counters reach the
    /// server's exposition, matching the guest's own counts.
    #[test]
    fn interposition_counters_are_exported() {
        let server = Arc::new(
            IoServer::start(
                open_domain(Backend::Soft, None).unwrap(),
                Arc::new(MemoryBackend::new(4 << 20)),
                IoServerConfig {
                    queue_metrics: true,
                    ..IoServerConfig::default()
                },
            )
            .unwrap(),
        );
        let spec = PolicySpec::parse(
            r#"{"stages":[{"stage":"meter"},{"stage":"qos","rw_ios_per_sec":100000}]}"#,
        )
        .unwrap();
        let rc = RunConfig::one_queue(500, 8, 64);
        let guests = make_guests(&rc).unwrap();
        let placed = any_placement(&guests, server.addr());
        for (dev, _) in &placed {
            server.policies().set(*dev, &spec).unwrap();
        }
        let agents =
            attach_guests_placed(&guests, &placed, Backend::Soft, None, NotifyMode::Doorbell)
                .unwrap();
        let r = drive_guests(guests, &rc, &Default::default(), &Default::default());
        assert_eq!(r.failures(), 0);
        // Scraped while the queues are still attached (their series end
        // when they leave).
        let mut reg = Registry::default();
        reg.register_collector(Box::new(ServerMetrics::new(server.clone())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        drop(agents);
        let dev = format!("dev{}", placed[0].0);
        let want = format!(
            "vrio_device_requests_total{{device=\"{dev}\",op=\"read\"}} {}",
            r.reads
        );
        assert!(text.contains(&want), "no {want:?} in:\n{text}");
        let want = format!(
            "vrio_device_latency_seconds_count{{device=\"{dev}\"}} {}",
            r.completed
        );
        assert!(text.contains(&want), "no {want:?} in:\n{text}");
        let want = format!(
            "vrio_interpose_events_total{{device=\"{dev}\",stage=\"qos\",event=\"waits\",reason=\"\"}}"
        );
        assert!(text.contains(&want), "no {want:?} in:\n{text}");
        assert!(text.contains("vrio_sidecore_idle_seconds_total{sidecore=\"0\"}"));
        // The queue's own figures agree with the device's.
        let want = format!(
            "vrio_queue_requests_total{{device=\"{dev}\",queue=\"{dev}.q0\",op=\"write\"}} {}",
            r.writes
        );
        assert!(text.contains(&want), "no {want:?} in:\n{text}");
        let want = format!(
            "vrio_queue_status_total{{device=\"{dev}\",queue=\"{dev}.q0\",status=\"ok\"}} {}",
            r.completed
        );
        assert!(text.contains(&want), "no {want:?} in:\n{text}");
        assert!(text.contains(&format!(
            "vrio_queue_in_flight{{device=\"{dev}\",queue=\"{dev}.q0\"}} 0"
        )));
        // Every read's 4 KiB was written into guest memory by a one-sided
        // write (plus status bytes and used elements).
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(
                    "vrio_server_fabric_bytes_total{device_type=\"blk\",direction=\"write\"}",
                )
            })
            .expect("fabric bytes");
        let written: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(written >= r.reads * 4096, "{line}");
        server.stop();
    }
}
