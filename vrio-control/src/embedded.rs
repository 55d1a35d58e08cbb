//! A controller inside the caller's process, for demos and tests that want
//! the whole control plane without running `vrio-controller`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::background::Background;
use crate::error::GlueError;
use crate::placement::LeastLoaded;
use crate::server::{serve, ServeOptions};
use crate::state::{Controller, ControllerConfig, CredentialConfig};
use crate::store::FileStore;

/// Starts a controller on a background thread: the crash-safe file store in
/// `state_dir`, the default placement policy without periodic rebalancing
/// (so placement only changes when asked or when a lease expires), the gRPC
/// service on a free loopback port behind `token`. Returns it and its
/// `host:port` address.
pub fn embedded_controller(
    state_dir: &Path,
    token: &str,
    lease_ttl_ms: u64,
) -> Result<(Background, String), GlueError> {
    embedded_controller_with(state_dir, token, lease_ttl_ms, None)
}

/// [`embedded_controller`] that signs attach credentials with
/// `credentials` (as `vrio-controller --data-key` does).
pub fn embedded_controller_with(
    state_dir: &Path,
    token: &str,
    lease_ttl_ms: u64,
    credentials: Option<CredentialConfig>,
) -> Result<(Background, String), GlueError> {
    let store = FileStore::open(state_dir)?;
    let ctrl = Controller::open(
        ControllerConfig {
            lease_ttl_ms,
            credentials,
            ..ControllerConfig::default()
        },
        Box::new(store),
        Box::new(LeastLoaded::default()),
        crate::service::now_ms(),
    )?;
    // Bound here, not in the task, so the address is known on return.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?.to_string();
    let opts = ServeOptions {
        token: Some(token.to_string()),
        tick: Duration::from_millis(100),
        rebalance_every: None,
        tls: None,
    };
    let bg = Background::spawn("vrio-controller", move |stop| async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "embedded controller cannot listen");
                return;
            }
        };
        let shutdown = async {
            let _ = stop.await;
        };
        if let Err(e) = serve(listener, Arc::new(ctrl), opts, shutdown).await {
            tracing::error!(error = %e, "embedded controller failed");
        }
    })?;
    Ok((bg, addr))
}
