//! Runs the controller as a gRPC server: the Control service behind the
//! token check, plus gRPC health and reflection (open, so probes and grpcurl
//! `list`/`describe` work without a token), plus the lease and rebalance timer.

use crate::auth::ServerAuth;
use crate::metrics::{Observed, RpcMetrics};
use crate::pb;
use crate::service::{now_ms, ControlService};
use crate::state::Controller;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TLS setup or serving failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How [`serve`] runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// None turns authentication off.
    pub token: Option<String>,
    /// How often leases are checked.
    pub tick: Duration,
    /// How often the placement policy may rebalance; None disables it.
    pub rebalance_every: Option<Duration>,
    /// Mutual TLS; None serves plain HTTP/2 (loopback and test setups).
    pub tls: Option<crate::tls::ServerTls>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            token: None,
            tick: Duration::from_millis(500),
            rebalance_every: Some(Duration::from_secs(5)),
            tls: None,
        }
    }
}

/// Expires leases every tick and rebalances on its own period, until dropped.
pub fn spawn_maintenance(
    ctrl: Arc<Controller>,
    opts: &ServeOptions,
) -> tokio::task::JoinHandle<()> {
    let tick = opts.tick;
    let rebalance_every = opts.rebalance_every;
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_rebalance = tokio::time::Instant::now();
        loop {
            interval.tick().await;
            if let Err(e) = ctrl.expire_leases(now_ms()) {
                tracing::error!(error = %e, "lease expiry failed");
            }
            if let Some(every) = rebalance_every {
                if last_rebalance.elapsed() >= every {
                    last_rebalance = tokio::time::Instant::now();
                    match ctrl.rebalance(now_ms()) {
                        Ok(m) if !m.is_empty() => tracing::info!(moves = m.len(), "rebalanced"),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "rebalance failed"),
                    }
                }
            }
        }
    })
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    ctrl: Arc<Controller>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_inner(listener, ctrl, opts, None, shutdown).await
}

/// [`serve`], recording every call of the Control service (refused ones
/// included) into `rpc`: by method and gRPC code, with its latency.
pub async fn serve_observed(
    listener: TcpListener,
    ctrl: Arc<Controller>,
    opts: ServeOptions,
    rpc: Arc<RpcMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_inner(listener, ctrl, opts, Some(rpc), shutdown).await
}

async fn serve_inner(
    listener: TcpListener,
    ctrl: Arc<Controller>,
    opts: ServeOptions,
    rpc: Option<Arc<RpcMetrics>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let maintenance = spawn_maintenance(ctrl.clone(), &opts);
    let svc = ControlService::new(ctrl);
    let closer = svc.clone();
    // Watch streams never end on their own: end them, or the graceful
    // shutdown would wait for the followers forever.
    let shutdown = async move {
        shutdown.await;
        closer.close_watches();
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &opts.tls {
        builder = builder.tls_config(t.config())?;
    } else if listener.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
        tracing::info!("TLS is off (loopback only)");
    } else {
        tracing::warn!("TLS is off: tokens and placement travel in the clear");
    }
    if opts.token.is_none() {
        tracing::warn!("authentication is off: anyone who reaches the port controls placement");
    }
    health_reporter
        .set_serving::<pb::control_server::ControlServer<ControlService>>()
        .await;
    let control = pb::control_server::ControlServer::with_interceptor(
        svc,
        ServerAuth::new(opts.token.as_deref()),
    );
    let router = builder.add_service(health).add_service(reflection);
    let router = match rpc {
        Some(rpc) => router.add_service(Observed::new(control, rpc)),
        None => router.add_service(control),
    };
    let out = router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    maintenance.abort();
    Ok(out?)
}
