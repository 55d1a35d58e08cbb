//! RPC metrics of the Control service: calls by method and gRPC status
//! code, and a latency histogram by method.
//!
//! [`Observed`] wraps the Control service (outside the token check, so
//! refused calls count too) and records every call into an [`RpcMetrics`];
//! an exporter (`vrio-controller --metrics-listen`) reads
//! [`RpcMetrics::snapshot`] at scrape time. Nothing here depends on a
//! metrics library.
//!
//! The code is the response headers' `grpc-status`, or OK when they have
//! none. That is exact for unary calls: tonic answers an error as a
//! trailers-only response (the status in the headers) and success with
//! the status in the trailers. For the streaming calls
//! (`WatchAssignments`, `WatchPolicies`) the code and the latency are those
//! of the stream's start: its headers. A call the client abandons before an answer counts
//! as `Cancelled`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Code;

/// Upper bounds (seconds) of the latency histogram's buckets; a last
/// bucket, +Inf, takes the rest.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// The method label of a call to a method the service does not have.
pub const UNKNOWN_METHOD: &str = "unknown";

/// The Control service's methods, read from the .proto it is built from,
/// so the label set is bounded whatever paths clients send.
fn control_methods() -> Vec<&'static str> {
    include_str!("../proto/vrio.proto")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect()
}

/// One method's latency histogram.
#[derive(Clone, Debug, PartialEq)]
pub struct Latency {
    /// Calls per bucket of [`LATENCY_BUCKETS`] (not cumulative), plus one
    /// last for +Inf.
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of the latencies, in seconds.
    pub sum_secs: f64,
    /// Calls.
    pub count: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: [0; LATENCY_BUCKETS.len() + 1],
            sum_secs: 0.0,
            count: 0,
        }
    }
}

impl Latency {
    fn observe(&mut self, secs: f64) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum_secs += secs;
        self.count += 1;
    }
}

/// The counts at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RpcSnapshot {
    /// Calls by method and code, in that order.
    pub calls: Vec<(&'static str, Code, u64)>,
    /// Latency by method.
    pub latency: BTreeMap<&'static str, Latency>,
}

#[derive(Default)]
struct Counts {
    calls: BTreeMap<(&'static str, i32), u64>,
    latency: BTreeMap<&'static str, Latency>,
}

/// Calls of the Control service by method and code, and their latency.
pub struct RpcMetrics {
    methods: Vec<&'static str>,
    counts: Mutex<Counts>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        RpcMetrics {
            methods: control_methods(),
            counts: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMetrics").finish_non_exhaustive()
    }
}

impl RpcMetrics {
    /// Empty counts.
    pub fn new() -> Self {
        Self::default()
    }

    /// The Control service's methods (every label [`RpcMetrics::method`]
    /// gives, besides [`UNKNOWN_METHOD`]).
    pub fn methods(&self) -> &[&'static str] {
        &self.methods
    }

    /// The method label of a request path (`/vrio.control.v1.Control/Stats`
    /// gives `Stats`); [`UNKNOWN_METHOD`] for any other path.
    pub fn method(&self, path: &str) -> &'static str {
        let name = path.rsplit('/').next().unwrap_or("");
        self.methods
            .iter()
            .find(|&&m| m == name)
            .copied()
            .unwrap_or(UNKNOWN_METHOD)
    }

    /// Counts one call of `method` that ended with `code` after `secs`.
    pub fn record(&self, method: &'static str, code: Code, secs: f64) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.calls.entry((method, code as i32)).or_default() += 1;
        c.latency.entry(method).or_default().observe(secs);
    }

    /// The counts now.
    pub fn snapshot(&self) -> RpcSnapshot {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        RpcSnapshot {
            calls: c
                .calls
                .iter()
                .map(|(&(m, code), &n)| (m, Code::from_i32(code), n))
                .collect(),
            latency: c.latency.clone(),
        }
    }
}

/// The gRPC status of a response from its headers: `grpc-status` when
/// present (a trailers-only response, which is how tonic answers an
/// error), otherwise OK.
pub fn code_of(headers: &http::HeaderMap) -> Code {
    match headers.get("grpc-status") {
        None => Code::Ok,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .map(Code::from_i32)
            .unwrap_or(Code::Unknown),
    }
}

/// A service (the Control server) whose calls are recorded into an
/// [`RpcMetrics`]. Add it to a tonic router like the service it wraps.
#[derive(Clone, Debug)]
pub struct Observed<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S> Observed<S> {
    /// Records the calls of `inner` into `metrics`.
    pub fn new(inner: S, metrics: Arc<RpcMetrics>) -> Self {
        Observed { inner, metrics }
    }
}

impl<S: NamedService> NamedService for Observed<S> {
    const NAME: &'static str = S::NAME;
}

/// Records a call once: with the response's code, or as `Cancelled` when
/// dropped first (the client went away).
struct Pending {
    metrics: Arc<RpcMetrics>,
    method: &'static str,
    start: Instant,
    done: bool,
}

impl Pending {
    fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            let secs = self.start.elapsed().as_secs_f64();
            self.metrics.record(self.method, code, secs);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Observed<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let mut pending = Pending {
            method: self.metrics.method(req.uri().path()),
            metrics: self.metrics.clone(),
            start: Instant::now(),
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let out = fut.await;
            pending.finish(match &out {
                Ok(resp) => code_of(resp.headers()),
                // The transport failed the call: no gRPC status was sent.
                Err(_) => Code::Unknown,
            });
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_proto_and_unknown_paths_share_a_label() {
        let m = RpcMetrics::new();
        assert!(m.methods().contains(&"RegisterServer"));
        assert!(m.methods().contains(&"WatchAssignments"));
        assert_eq!(
            m.method("/vrio.control.v1.Control/RenewLease"),
            "RenewLease"
        );
        assert_eq!(m.method("/vrio.control.v1.Control/Nope"), UNKNOWN_METHOD);
        assert_eq!(m.method(""), UNKNOWN_METHOD);
    }

    #[test]
    fn codes_come_from_the_headers_or_are_ok() {
        let mut h = http::HeaderMap::new();
        assert_eq!(code_of(&h), Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("16"));
        assert_eq!(code_of(&h), Code::Unauthenticated);
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(code_of(&h), Code::Unknown);
    }

    #[test]
    fn calls_land_in_their_buckets() {
        let m = RpcMetrics::new();
        m.record("Stats", Code::Ok, 0.0002);
        m.record("Stats", Code::Ok, 20.0);
        m.record("Stats", Code::NotFound, 0.003);
        let s = m.snapshot();
        assert_eq!(
            s.calls,
            vec![("Stats", Code::Ok, 2), ("Stats", Code::NotFound, 1)]
        );
        let l = &s.latency["Stats"];
        assert_eq!(l.count, 3);
        assert_eq!(l.buckets.iter().sum::<u64>(), 3);
        assert_eq!(l.buckets[1], 1); // <= 0.00025
        assert_eq!(l.buckets[LATENCY_BUCKETS.len()], 1); // +Inf
    }

    /// Over the wire: successes, errors from the service and refusals by
    /// the token check, each under its method and code.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_served_controller_counts_calls_by_method_and_code() {
        use crate::pb;
        use crate::placement::LeastLoaded;
        use crate::server::{serve_observed, ServeOptions};
        use crate::store::MemoryStore;
        use crate::{Controller, ControllerConfig};

        let ctrl = Controller::open(
            ControllerConfig::default(),
            Box::new(MemoryStore::default()),
            Box::new(LeastLoaded::default()),
            crate::service::now_ms(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let rpc = Arc::new(RpcMetrics::new());
        let opts = ServeOptions {
            token: Some("t".into()),
            rebalance_every: None,
            ..ServeOptions::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_observed(
            listener,
            Arc::new(ctrl),
            opts,
            rpc.clone(),
            async {
                let _ = rx.await;
            },
        ));

        let mut c = crate::client::connect(&addr, Some("t")).await.unwrap();
        c.register_server(pb::RegisterServerRequest {
            id: "io-1".into(),
            address: "io-1:7471".into(),
            sidecores: 1,
            capacity: 4,
        })
        .await
        .unwrap();
        let e = c
            .renew_lease(pb::RenewLeaseRequest {
                server_id: "nobody".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let mut anon = crate::client::connect(&addr, None).await.unwrap();
        let e = anon.stats(pb::StatsRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);

        let s = rpc.snapshot();
        for want in [
            ("RegisterServer", Code::Ok, 1),
            ("RenewLease", Code::NotFound, 1),
            ("Stats", Code::Unauthenticated, 1),
        ] {
            assert!(s.calls.contains(&want), "no {want:?} in {:?}", s.calls);
        }
        assert_eq!(s.calls.len(), 3, "{:?}", s.calls);
        for m in ["RegisterServer", "RenewLease", "Stats"] {
            assert_eq!(s.latency[m].count, 1, "{m}");
        }
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }
}
