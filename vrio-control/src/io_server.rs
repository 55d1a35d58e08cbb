//! The I/O-server side of the control plane: register, keep the lease with
//! load reports (registering again if it was lost), move queues between
//! this server's sidecores as the controller decides, apply every device's
//! interposition policy (and report the stages' counters with the load),
//! and optionally create the images of the controller's volumes
//! ([`JoinOptions::volume_dir`]). Moves between servers are the VM host's
//! to make ([`crate::vm_host`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::Code;
use vrio_core::interpose::PolicySpec;
use vrio_core::remote::{device_key, queue_name, IoServer, ServerError};
use vrio_core::tenancy::{image_path, valid_volume_name};

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
    client: Client,
    reg: pb::RegisterServerRequest,
    load: impl FnMut() -> Vec<pb::SidecoreLoad> + Send,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut load = load;
    lease_loop(client, reg, move || (load(), Vec::new()), shutdown, None).await
}

/// [`keep_registered`], `sample` giving the load and the stage reports of
/// each report, telling `renewed` after each registration and each renewal
/// that succeeded.
async fn lease_loop(
    mut client: Client,
    reg: pb::RegisterServerRequest,
    mut sample: impl FnMut() -> (Vec<pb::SidecoreLoad>, Vec<pb::DeviceStageReports>) + Send,
    shutdown: impl Future<Output = ()> + Send,
    renewed: Option<watch::Sender<()>>,
) {
    let renewed = || {
        if let Some(r) = &renewed {
            r.send_replace(());
        }
    };
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
                        renewed();
                    }
                    // Our previous incarnation's lease is still live: wait it out.
                    Err(s) if s.code() == Code::AlreadyExists => period = retry,
                    Err(s) => {
                        tracing::warn!(server = %reg.id, error = %s, "register failed");
                        period = retry;
                    }
                }
            } else {
                let (load, stage_reports) = sample();
                let req = pb::ReportLoadRequest {
                    server_id: reg.id.clone(),
                    load,
                    stage_reports,
                };
                match client.report_load(req).await {
                    Ok(_) => renewed(),
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

/// What [`join_as_server_with`] does besides what [`join_as_server`] does.
#[derive(Clone, Debug, Default)]
pub struct JoinOptions {
    /// The server's volume directory (`vrio-server --volume-dir`): at
    /// registration and after each lease renewal, every volume the
    /// controller records that has no image `<dir>/<name>.img` yet gets a
    /// sparse one of the volume's size. Images that exist are left as they
    /// are (a size that differs from the controller's is logged), and none
    /// is removed when the controller forgets a volume. None: no images
    /// are created.
    pub volume_dir: Option<PathBuf>,
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
    join_as_server_with(ctl, id, capacity, server, JoinOptions::default())
}

/// [`join_as_server`], and with [`JoinOptions::volume_dir`] also creating
/// the images of the controller's volumes there.
pub fn join_as_server_with(
    ctl: ControlOpts,
    id: String,
    capacity: u32,
    server: Arc<IoServer>,
    opts: JoinOptions,
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
        let (renewed, renewals) = watch::channel(());
        let provisioner = client.clone();
        let provision = async move {
            match opts.volume_dir {
                Some(dir) => provision_volumes(provisioner, dir, renewals).await,
                None => std::future::pending().await,
            }
        };
        let policies = server.policies().clone();
        let lease = lease_loop(
            client.clone(),
            reg,
            move || {
                (
                    sampler.sample(),
                    crate::policy::reports_to_pb(&policies.reports()),
                )
            },
            std::future::pending(),
            Some(renewed),
        );
        let policies = follow_policies(client.clone(), id.clone(), server.clone());
        let follow = follow_assignments(client, id, server);
        tokio::select! {
            _ = stop => {}
            _ = lease => {}
            _ = follow => {}
            _ = policies => {}
            _ = provision => {}
        }
    })?)
}

/// What [`create_missing_images`] did with one volume.
#[derive(Debug)]
pub enum ImageOutcome {
    /// A sparse image was created.
    Created,
    /// An image was there already, of this many bytes.
    Present(u64),
    /// The name is not a valid volume name: no path was built from it.
    BadName,
    /// Checking or creating the image failed.
    Failed(io::Error),
}

/// Creates a sparse image `<dir>/<name>.img` of `size_bytes` for each
/// (name, size_bytes) in `volumes` that has none; returns what happened to
/// each, in order. Blocking file I/O.
pub fn create_missing_images(dir: &Path, volumes: &[(String, u64)]) -> Vec<ImageOutcome> {
    volumes
        .iter()
        .map(|(name, size)| {
            if !valid_volume_name(name) {
                return ImageOutcome::BadName;
            }
            let path = image_path(dir, name);
            match std::fs::metadata(&path) {
                Ok(m) => return ImageOutcome::Present(m.len()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return ImageOutcome::Failed(e),
            }
            match vrio_core::blk::FileBackend::create(&path, *size) {
                Ok(_) => ImageOutcome::Created,
                Err(e) => ImageOutcome::Failed(e),
            }
        })
        .collect()
}

/// After each lease renewal, creates in `dir` the images of controller
/// volumes it lacks. Each problem is logged once until it changes.
async fn provision_volumes(mut client: Client, dir: PathBuf, mut renewals: watch::Receiver<()>) {
    // What was last said about each volume, and about listing them.
    let mut said: HashMap<String, String> = HashMap::new();
    let mut list_failed = false;
    while renewals.changed().await.is_ok() {
        let volumes = match client.list_volumes(pb::ListVolumesRequest {}).await {
            Ok(r) => {
                list_failed = false;
                r.into_inner().volumes
            }
            Err(s) => {
                if !list_failed {
                    tracing::warn!(error = %s, "cannot list the controller's volumes");
                }
                list_failed = true;
                continue;
            }
        };
        let wanted: Vec<(String, u64)> = volumes
            .into_iter()
            .map(|v| (v.name, v.size_bytes))
            .collect();
        let d = dir.clone();
        let w = wanted.clone();
        let outcomes =
            match tokio::task::spawn_blocking(move || create_missing_images(&d, &w)).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "volume provisioning task failed");
                    continue;
                }
            };
        said.retain(|name, _| wanted.iter().any(|(n, _)| n == name));
        for ((name, size), outcome) in wanted.iter().zip(outcomes) {
            let text = match &outcome {
                ImageOutcome::Created => {
                    tracing::info!(volume = %name, bytes = size, dir = %dir.display(), "created volume image");
                    said.remove(name);
                    continue;
                }
                ImageOutcome::Present(len) if len == size => {
                    said.remove(name);
                    continue;
                }
                ImageOutcome::Present(len) => {
                    format!("image is {len} bytes, the controller records {size}; left as it is")
                }
                ImageOutcome::BadName => "invalid volume name; no image created".to_string(),
                ImageOutcome::Failed(e) => format!("cannot create its image: {e}"),
            };
            if said.get(name) != Some(&text) {
                tracing::warn!(volume = %name, dir = %dir.display(), "{text}");
                said.insert(name.clone(), text);
            }
        }
    }
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

/// Applies every device's interposition policy as the controller keeps it,
/// watching again whenever the stream ends. Each watch starts with every
/// policy (so a server that joins late, or comes back, gets them all);
/// devices this loop applied a policy to that the new watch does not
/// replay were cleared meanwhile, and are cleared here too.
async fn follow_policies(mut client: Client, id: String, server: Arc<IoServer>) {
    // Devices that got a policy from the controller.
    let mut applied: HashSet<String> = HashSet::new();
    loop {
        let req = pb::WatchPoliciesRequest {
            server_id: id.clone(),
        };
        match client.watch_policies(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut replayed: HashSet<String> = HashSet::new();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            on_policy_event(&server, ev, &mut applied, &mut replayed);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "policy watch ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch policies"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies one event of the policy watch.
fn on_policy_event(
    server: &IoServer,
    ev: pb::PolicyEvent,
    applied: &mut HashSet<String>,
    replayed: &mut HashSet<String>,
) {
    match pb::PolicyEventKind::try_from(ev.kind) {
        Ok(pb::PolicyEventKind::Snapshot) => {
            replayed.insert(ev.device.clone());
            apply_policy(server, &ev.device, &ev.policy_json, ev.version, applied);
        }
        Ok(pb::PolicyEventKind::Set) => {
            apply_policy(server, &ev.device, &ev.policy_json, ev.version, applied);
        }
        Ok(pb::PolicyEventKind::Cleared) => {
            apply_policy(server, &ev.device, "", ev.version, applied);
        }
        Ok(pb::PolicyEventKind::Synced) => {
            let gone: Vec<String> = applied.difference(replayed).cloned().collect();
            for device in gone {
                apply_policy(server, &device, "", ev.version, applied);
            }
            replayed.clear();
        }
        _ => tracing::warn!(kind = ev.kind, device = %ev.device, "unknown policy event"),
    }
}

/// Puts `json` (empty: no stages) in force for `device`, unless it is in
/// force already. A policy that does not parse or build is logged (without
/// its keys) and the device keeps the one it has.
fn apply_policy(
    server: &IoServer,
    device: &str,
    json: &str,
    version: u64,
    applied: &mut HashSet<String>,
) {
    let key = device_key(device);
    let result = PolicySpec::parse(json).and_then(|spec| {
        // The same policy again (a watch replaying after a controller
        // restart) keeps the stages, and their counters, as they are.
        if server.policies().spec(key) != spec {
            server.policies().set(key, &spec)?;
        }
        Ok(spec)
    });
    match result {
        Ok(spec) if spec.stages.is_empty() => {
            applied.remove(device);
        }
        Ok(spec) => {
            tracing::debug!(device, version, stages = %spec.summary(), "policy applied");
            applied.insert(device.to_string());
        }
        Err(e) => tracing::error!(
            device,
            version,
            error = %crate::policy::scrub(&e.to_string(), json),
            "cannot apply the controller's policy; the device keeps its old one"
        ),
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
