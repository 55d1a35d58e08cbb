//! The I/O-server side of the lease: register, then report load (which
//! renews the lease) every third of the TTL, registering again if the lease
//! was lost. vrio-server can run this next to its sidecores.

use crate::client::Client;
use crate::pb;
use std::future::Future;
use std::time::Duration;
use tonic::Code;

/// Keeps `reg` registered until `shutdown` resolves. `load` is sampled once
/// per report. Transient errors are logged and retried, so a controller
/// restart or a network blip does not end the loop.
pub async fn keep_registered(
    mut client: Client,
    reg: pb::RegisterServerRequest,
    mut load: impl FnMut() -> Vec<pb::SidecoreLoad> + Send,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let retry = Duration::from_millis(200);
    let mut registered = false;
    let mut period = retry;
    loop {
        let step = async {
            if !registered {
                match client.register_server(reg.clone()).await {
                    Ok(r) => {
                        registered = true;
                        period = Duration::from_millis((r.into_inner().lease_ttl_ms / 3).max(1));
                        tracing::info!(server = %reg.id, "registered with controller");
                    }
                    // Our previous incarnation's lease is still live: wait it out.
                    Err(s) if s.code() == Code::AlreadyExists => period = retry,
                    Err(s) => {
                        tracing::warn!(server = %reg.id, error = %s, "register failed");
                        period = retry;
                    }
                }
            } else {
                let req = pb::ReportLoadRequest {
                    server_id: reg.id.clone(),
                    load: load(),
                };
                match client.report_load(req).await {
                    Ok(_) => {}
                    Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                        tracing::warn!(server = %reg.id, error = %s, "lease lost, registering again");
                        registered = false;
                        period = Duration::ZERO;
                    }
                    Err(s) => tracing::warn!(server = %reg.id, error = %s, "load report failed"),
                }
            }
            tokio::time::sleep(period).await;
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = step => {}
        }
    }
}
