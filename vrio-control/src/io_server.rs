//! The I/O-server side of the control plane: register, keep the lease with
//! load reports (registering again if it was lost), and move queues between
//! this server's sidecores as the controller decides. Moves between servers
//! are the VM host's to make ([`crate::vm_host`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use vrio_core::remote::{device_key, queue_name, IoServer, ServerError};

use crate::background::Background;
use crate::client::{Client, ControlOpts};
use crate::error::GlueError;
use crate::pb;

/// Keeps `reg` registered until `shutdown` resolves. `load` is sampled once
/// per report, and every report renews the lease; reports go every third of
/// the TTL so one lost report does not let the lease lapse. Transient
/// errors are logged and retried, so a controller restart or a network blip
/// does not end the loop.
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

/// Per-sidecore load since the previous sample: the controller places by
/// recent load, not by totals since start.
struct LoadSampler {
    server: Arc<IoServer>,
    last: Vec<(u64, u64)>,
    at: Instant,
}

impl LoadSampler {
    fn sample(&mut self) -> Vec<pb::SidecoreLoad> {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let loads = self.server.sidecore_loads();
        let mut out = Vec::with_capacity(loads.len());
        self.last.resize(loads.len(), (0, 0));
        for (i, (s, _)) in loads.iter().enumerate() {
            let (busy0, req0) = self.last[i];
            let busy = (s.busy_ns.saturating_sub(busy0) as f64 / 1e9 / dt).clamp(0.0, 1.0);
            let rps = s.requests.saturating_sub(req0) as f64 / dt;
            out.push(pb::SidecoreLoad {
                sidecore: i as u32,
                busy,
                requests_per_sec: rps,
            });
            self.last[i] = (s.busy_ns, s.requests);
        }
        self.at = now;
        out
    }
}

/// Registers `server` as `id` with room for `capacity` queues, renews its
/// lease with load reports, and moves its queues between its sidecores as
/// the controller decides, on a background thread until stopped. An
/// unreachable controller is retried, not an error: servers may start
/// first.
pub fn join_as_server(
    ctl: ControlOpts,
    id: String,
    capacity: u32,
    server: Arc<IoServer>,
) -> Result<Background, GlueError> {
    let reg = pb::RegisterServerRequest {
        id: id.clone(),
        address: server.addr().to_string(),
        sidecores: server.sidecore_count() as u32,
        capacity,
    };
    Ok(Background::spawn("vrio-control", move |stop| async move {
        let client = loop {
            match ctl.connect().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "controller unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let mut sampler = LoadSampler {
            server: server.clone(),
            last: Vec::new(),
            at: Instant::now(),
        };
        let lease = keep_registered(
            client.clone(),
            reg,
            move || sampler.sample(),
            std::future::pending(),
        );
        let follow = follow_assignments(client, id, server);
        tokio::select! {
            _ = stop => {}
            _ = lease => {}
            _ = follow => {}
        }
    })?)
}

/// Applies every assignment of this server to its sidecores, watching again
/// whenever the stream ends (a controller restart ends it).
async fn follow_assignments(mut client: Client, id: String, server: Arc<IoServer>) {
    loop {
        let req = pb::WatchAssignmentsRequest {
            device_id: String::new(),
            server_id: id.clone(),
        };
        match client.watch_assignments(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            let Some(a) = ev.assignment else { continue };
                            if a.server_id == id {
                                apply(&server, &a).await;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "assignment watch ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch assignments"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Moves the assigned queue to its sidecore, off the runtime thread: a
/// move waits for the sidecores to hand the queue over.
async fn apply(server: &Arc<IoServer>, a: &pb::Assignment) {
    let Ok(queue) = u16::try_from(a.queue) else {
        tracing::warn!(device = %a.device_id, queue = a.queue, "queue index out of range");
        return;
    };
    let name = queue_name(device_key(&a.device_id), queue);
    let (s, k) = (server.clone(), a.sidecore as usize);
    let n = name.clone();
    match tokio::task::spawn_blocking(move || s.move_queue(&n, k)).await {
        Ok(Ok(())) => {}
        // Not attached here (yet): the VM-host agent's ATTACH carries the
        // sidecore.
        Ok(Err(ServerError::NoSuchQueue(_))) => {}
        Ok(Err(e)) => tracing::warn!(queue = %name, error = %e, "cannot follow a move"),
        Err(e) => tracing::error!(error = %e, "move task failed"),
    }
}
