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
//! the status in the trailers. The streaming calls (`WatchAssignments`,
//! `WatchPolicies`) last as long as their follower: their latency is the
//! time to the stream's start (its headers), and their code is the one the
//! stream ended with (its trailers' `grpc-status`; `Cancelled` when the
//! follower went away first), counted when it ends, so a stream the
//! controller ended with `DATA_LOSS` or `UNAVAILABLE` shows as such. A call
//! the client abandons before an answer counts as `Cancelled`.

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
    /// Set for a stream once its headers are out: the latency to record.
    started: Option<f64>,
}

impl Pending {
    fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            let secs = self
                .started
                .unwrap_or_else(|| self.start.elapsed().as_secs_f64());
            self.metrics.record(self.method, code, secs);
        }
    }
}

/// The methods whose answer is a stream that lasts as long as its
/// follower.
fn is_stream(method: &str) -> bool {
    matches!(method, "WatchAssignments" | "WatchPolicies")
}

/// A streaming response's body that records the call when the stream
/// ends: with its trailers' code, or `Cancelled` when dropped first.
struct EndObserved<B> {
    inner: B,
    pending: Pending,
}

impl<B> tonic::codegen::Body for EndObserved<B>
where
    B: tonic::codegen::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    this.pending.finish(code_of(t));
                }
            }
            Poll::Ready(Some(Err(_))) => this.pending.finish(Code::Unknown),
            // Ended without trailers: nothing said otherwise.
            Poll::Ready(None) => this.pending.finish(Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
    ResBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
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
            started: None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let out = fut.await;
            let code = match &out {
                Ok(resp) => code_of(resp.headers()),
                // The transport failed the call: no gRPC status was sent.
                Err(_) => Code::Unknown,
            };
            match out {
                // A stream that started: counted when it ends.
                Ok(resp) if is_stream(pending.method) && code == Code::Ok => {
                    pending.started = Some(pending.start.elapsed().as_secs_f64());
                    Ok(resp.map(|inner| tonic::body::Body::new(EndObserved { inner, pending })))
                }
                out => {
                    pending.finish(code);
                    out.map(|resp| resp.map(tonic::body::Body::new))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tonic::codegen::Bytes;

    type Frames = tonic::codegen::tokio_stream::Iter<
        std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
    >;

    /// A service answering every call with a stream of one message, then
    /// trailers with `code`.
    #[derive(Clone)]
    struct Streams(Code);

    impl Service<http::Request<()>> for Streams {
        type Response = http::Response<StreamBody<Frames>>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let mut trailers = http::HeaderMap::new();
            let code = (self.0 as i32).to_string();
            trailers.insert(
                "grpc-status",
                http::HeaderValue::from_str(&code).expect("digits"),
            );
            let frames = vec![
                Ok(Frame::data(Bytes::from_static(b"event"))),
                Ok(Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(tonic::codegen::tokio_stream::iter(frames));
            std::future::ready(Ok(http::Response::new(body)))
        }
    }

    fn call_of(m: &RpcSnapshot, method: &str, code: Code) -> u64 {
        m.calls
            .iter()
            .filter(|(n, c, _)| *n == method && *c == code)
            .map(|(_, _, k)| k)
            .sum()
    }

    #[tokio::test]
    async fn a_watch_stream_counts_when_it_ends_with_the_code_it_ended_with() {
        let m = Arc::new(RpcMetrics::new());
        let mut svc = Observed::new(Streams(Code::DataLoss), m.clone());
        let path = "/vrio.control.v1.Control/WatchPolicies";
        let req = || {
            http::Request::builder()
                .uri(path)
                .body(())
                .expect("request")
        };
        let resp = svc.call(req()).await.expect("infallible");
        // Started, not ended: not counted yet.
        assert_eq!(call_of(&m.snapshot(), "WatchPolicies", Code::Ok), 0);
        assert_eq!(call_of(&m.snapshot(), "WatchPolicies", Code::DataLoss), 0);
        resp.into_body().collect().await.expect("body");
        assert_eq!(call_of(&m.snapshot(), "WatchPolicies", Code::DataLoss), 1);
        // A follower that goes away mid-stream: Cancelled.
        let resp = svc.call(req()).await.expect("infallible");
        drop(resp);
        assert_eq!(call_of(&m.snapshot(), "WatchPolicies", Code::Cancelled), 1);
        // A unary call is counted at once, with its headers' code.
        let mut unary = Observed::new(Streams(Code::Ok), m.clone());
        let r = http::Request::builder()
            .uri("/vrio.control.v1.Control/Stats")
            .body(())
            .expect("request");
        let _resp = unary.call(r).await.expect("infallible");
        assert_eq!(call_of(&m.snapshot(), "Stats", Code::Ok), 1);
        let lat = m.snapshot().latency;
        assert_eq!(lat.get("WatchPolicies").map(|l| l.count), Some(2));
    }

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
