//! The VM-host side of the control plane: attach devices where the
//! controller places their queues ([`place_devices`]), then follow its moves
//! and failovers ([`follow_placement`]) by moving the queues of vrio-core's
//! data-path agents ([`AttachedDevice`]). Every completed move or failover
//! is handed to the caller as a [`QueueMoved`]; what to do with it (log,
//! count, print) is the caller's choice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use vrio_core::remote::{AttachedDevice, LinkState, MoveReport, QueueTarget};

use crate::background::{runtime, Background};
use crate::client::{server_addresses, Client, ControlOpts};
use crate::error::GlueError;
use crate::pb;

/// Where the controller placed one device's queues.
#[derive(Debug, Clone)]
pub struct Placed {
    /// The device's id at the controller.
    pub device_id: String,
    /// Queue q is served at `targets[q]`.
    pub targets: Vec<QueueTarget>,
    /// The credential the device's agent presents with each ATTACH (for
    /// I/O servers started with `--key-file`); None when the controller
    /// signs none (it runs without `--data-key`).
    pub credential: Option<String>,
}

/// Where assignment `a` of `device` says to serve its queue: the named
/// server must be registered, and the sidecore must fit a queue target.
fn target_of(
    device: &str,
    a: &pb::Assignment,
    servers: &HashMap<String, (String, bool)>,
) -> Result<QueueTarget, GlueError> {
    let (addr, _) = servers
        .get(&a.server_id)
        .ok_or_else(|| GlueError::NoLiveServer {
            device: device.to_string(),
            queue: a.queue,
        })?;
    let sidecore = u16::try_from(a.sidecore).map_err(|_| GlueError::SidecoreOutOfRange {
        device: device.to_string(),
        queue: a.queue,
        sidecore: a.sidecore,
    })?;
    Ok(QueueTarget {
        server: addr.clone(),
        sidecore,
    })
}

/// Turns the controller's assignments of one device into a target per
/// queue, refusing a placement with a gap: an agent cannot attach a queue
/// that has nowhere to go.
fn targets(
    n: u16,
    assignments: &[pb::Assignment],
    servers: &HashMap<String, (String, bool)>,
    device: &str,
) -> Result<Vec<QueueTarget>, GlueError> {
    (0..u32::from(n))
        .map(|q| {
            let a = assignments.iter().find(|a| a.queue == q).ok_or_else(|| {
                GlueError::NoAssignment {
                    device: device.to_string(),
                    queue: q,
                }
            })?;
            target_of(device, a, servers)
        })
        .collect()
}

/// Attaches `devices` (id, queues) of VM `vm_id` with the controller and
/// returns where each queue goes, and the credential to attach with, in the
/// order given. `agent_address` names this VM host to operators. A device
/// the controller already knows (an agent that restarted) keeps its
/// placement and gets a fresh credential. A controller that signs
/// credentials refuses a blk device without a volume grant
/// (`FAILED_PRECONDITION`, as [`GlueError::Rpc`]).
///
/// Blocks on a runtime of its own: call it outside any tokio runtime.
pub fn place_devices(
    ctl: &ControlOpts,
    vm_id: &str,
    agent_address: &str,
    devices: &[(String, u16)],
) -> Result<Vec<Placed>, GlueError> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut client = ctl.connect().await?;
        let mut assigned = Vec::new();
        for (id, queues) in devices {
            let req = pb::AttachDeviceRequest {
                device: Some(pb::Device {
                    id: id.clone(),
                    vm_id: vm_id.to_string(),
                    r#type: pb::DeviceType::Blk as i32,
                    queues: u32::from(*queues),
                    agent_address: agent_address.to_string(),
                    pinned_server_id: String::new(),
                }),
            };
            let (a, credential) = match client.attach_device(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    (r.assignments, r.credential)
                }
                Err(s) if s.code() == Code::AlreadyExists => {
                    tracing::info!(device = %id, "device known to the controller; keeping its placement");
                    let a = client
                        .list_assignments(pb::ListAssignmentsRequest {
                            device_id: id.clone(),
                            server_id: String::new(),
                        })
                        .await?
                        .into_inner()
                        .assignments;
                    let credential = match client
                        .issue_credential(pb::IssueCredentialRequest {
                            device_id: id.clone(),
                        })
                        .await
                    {
                        Ok(r) => r.into_inner().credential,
                        // A controller from before credentials signs none.
                        Err(s) if s.code() == Code::Unimplemented => String::new(),
                        Err(s) => return Err(s.into()),
                    };
                    (a, credential)
                }
                Err(s) => return Err(s.into()),
            };
            let credential = Some(credential).filter(|c| !c.is_empty());
            assigned.push((id.clone(), *queues, a, credential));
        }
        let servers = server_addresses(&mut client).await?;
        assigned
            .into_iter()
            .map(|(id, n, a, credential)| {
                Ok(Placed {
                    targets: targets(n, &a, &servers, &id)?,
                    device_id: id,
                    credential,
                })
            })
            .collect()
    })
}

/// Tells the controller that this VM host's agent (`agent_address`) owns
/// device `device`'s rings now: a live migration brought its guest here.
/// The placement stays. Returns the owner before (agent address, VM id),
/// equal to this one when nothing moved.
///
/// Blocks on a runtime of its own: call it outside any tokio runtime.
pub fn claim_device(
    ctl: &ControlOpts,
    device: &str,
    agent_address: &str,
    vm_id: &str,
) -> Result<(String, String), GlueError> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut client = ctl.connect().await?;
        let r = client
            .claim_device(pb::ClaimDeviceRequest {
                device_id: device.to_string(),
                agent_address: agent_address.to_string(),
                vm_id: vm_id.to_string(),
            })
            .await?
            .into_inner();
        Ok((r.previous_agent_address, r.previous_vm_id))
    })
}

/// What a VM host follows: controller device ids, and for each of their
/// queues the attached device serving it now (if its ring runs) and that
/// queue's index there. A trait, because a VMM may attach rings late (a
/// vhost-user front attaches each vring when the guest enables it) or
/// split one controller device over several agents.
pub trait Followed: Send + Sync + 'static {
    /// The controller device ids to follow.
    fn devices(&self) -> Vec<String>;
    /// The agent serving `queue` of `device` now, and the queue's index in
    /// that agent; None while the ring is not attached.
    fn queue(&self, device: &str, queue: u16) -> Option<(Arc<AttachedDevice>, u16)>;
    /// Where the controller wants `queue` now, called before any move, so
    /// a ring that is not attached yet can attach there later.
    fn placed(&self, _device: &str, _queue: u16, _to: &QueueTarget) {}
}

/// Devices attached once, queue q of device d being queue q of its agent:
/// the simple case, where every ring was attached before following.
pub struct AttachedSet(pub Vec<(String, Arc<AttachedDevice>)>);

impl Followed for AttachedSet {
    fn devices(&self) -> Vec<String> {
        self.0.iter().map(|(id, _)| id.clone()).collect()
    }
    fn queue(&self, device: &str, queue: u16) -> Option<(Arc<AttachedDevice>, u16)> {
        let (_, d) = self.0.iter().find(|(id, _)| id == device)?;
        Some((d.clone(), queue))
    }
}

/// A queue the follower moved to another server, live or after its server
/// was lost.
#[derive(Debug, Clone)]
pub struct QueueMoved {
    /// The device's id at the controller.
    pub device: String,
    /// The queue's index in the controller's device.
    pub queue: u16,
    /// Where it is served now.
    pub to: QueueTarget,
    /// What the agent's move did (its `queue` is the agent's index).
    pub report: MoveReport,
}

impl QueueMoved {
    /// A failover (the old server was lost) rather than a live handover;
    /// then `report.down` says how long the queue had no server.
    pub fn is_failover(&self) -> bool {
        self.report.down.is_some()
    }
}

/// Where completed moves go: the caller's callback, run on the follower's
/// thread.
type OnMove = dyn FnMut(QueueMoved) + Send;

/// Moves `queue` of `device` to where the controller says if that is
/// another server, or if the queue lost its server. Sidecore changes within
/// one server are the server's to make.
async fn apply(
    f: &Arc<dyn Followed>,
    on_move: &mut OnMove,
    device: &str,
    queue: u16,
    to: QueueTarget,
) {
    f.placed(device, queue, &to);
    let Some((dev, index)) = f.queue(device, queue) else {
        return;
    };
    let Some(now) = dev.queues().into_iter().find(|q| q.queue == index) else {
        tracing::warn!(
            device,
            queue,
            "the controller names a queue this agent lacks"
        );
        return;
    };
    if now.state != LinkState::Orphaned && now.target.server == to.server {
        return;
    }
    let t = to.clone();
    // Off the runtime thread: a move waits for the old server's batch.
    match tokio::task::spawn_blocking(move || dev.move_queue(index, t)).await {
        Ok(Ok(report)) => on_move(QueueMoved {
            device: device.to_string(),
            queue,
            to,
            report,
        }),
        Ok(Err(e)) => {
            tracing::warn!(device, queue, server = %to.server, error = %e, "move failed; will retry")
        }
        Err(e) => tracing::error!(error = %e, "move task failed"),
    }
}

/// Follows the controller for `followed` on a background thread until
/// stopped: moves and failovers the watch stream announces, plus a
/// reconciliation every second for what the watch could not do (a move
/// that failed or raced another, a queue that lost its server while its
/// assignment stayed). `on_move` gets every completed move, in order; it
/// runs on the follower's thread, so it should not block for long (send it
/// to a channel to handle it elsewhere).
pub fn follow_placement(
    ctl: ControlOpts,
    followed: Arc<dyn Followed>,
    mut on_move: impl FnMut(QueueMoved) + Send + 'static,
) -> Result<Background, GlueError> {
    Ok(Background::spawn("vrio-follow", move |stop| async move {
        let run = async {
            loop {
                let mut client = match ctl.connect().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "controller unreachable; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if let Err(e) = follow_once(&mut client, &followed, &mut on_move).await {
                    tracing::warn!(error = %e, "lost the controller; reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        };
        tokio::select! {
            _ = stop => {}
            _ = run => {}
        }
    })?)
}

/// The queue and target a followed assignment names, if it can be
/// followed now; a server not (yet) known is waited for silently, the rest
/// is logged.
fn followable(
    a: &pb::Assignment,
    servers: &HashMap<String, (String, bool)>,
) -> Option<(u16, QueueTarget)> {
    let Ok(queue) = u16::try_from(a.queue) else {
        tracing::warn!(device = %a.device_id, queue = a.queue, "queue index out of range");
        return None;
    };
    match target_of(&a.device_id, a, servers) {
        Ok(to) => Some((queue, to)),
        Err(GlueError::NoLiveServer { .. }) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow an assignment");
            None
        }
    }
}

/// Follows one watch stream until it ends or fails.
async fn follow_once(
    client: &mut Client,
    f: &Arc<dyn Followed>,
    on_move: &mut OnMove,
) -> Result<(), tonic::Status> {
    let mut stream = client
        .watch_assignments(pb::WatchAssignmentsRequest {
            device_id: String::new(),
            server_id: String::new(),
        })
        .await?
        .into_inner();
    let mut servers = server_addresses(client).await?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            m = stream.message() => {
                let Some(ev) = m? else { return Ok(()) };
                let Some(a) = ev.assignment else { continue };
                if !f.devices().contains(&a.device_id) {
                    continue;
                }
                if a.server_id.is_empty() {
                    tracing::warn!(device = %a.device_id, queue = a.queue, "no live server has room; the queue waits");
                    continue;
                }
                if !servers.contains_key(&a.server_id) {
                    servers = server_addresses(client).await?;
                }
                if let Some((queue, to)) = followable(&a, &servers) {
                    apply(f, on_move, &a.device_id, queue, to).await;
                }
            }
            _ = check.tick() => reconcile(client, f, on_move, &mut servers).await?,
        }
    }
}

/// Brings every followed queue to where the controller says.
async fn reconcile(
    client: &mut Client,
    f: &Arc<dyn Followed>,
    on_move: &mut OnMove,
    servers: &mut HashMap<String, (String, bool)>,
) -> Result<(), tonic::Status> {
    let assigned = client
        .list_assignments(pb::ListAssignmentsRequest::default())
        .await?
        .into_inner()
        .assignments;
    *servers = server_addresses(client).await?;
    let ours = f.devices();
    for a in assigned.iter().filter(|a| ours.contains(&a.device_id)) {
        // Only a live server: a dead one's queues move on lease expiry.
        if !matches!(servers.get(&a.server_id), Some((_, true))) {
            continue;
        }
        if let Some((queue, to)) = followable(a, servers) {
            apply(f, on_move, &a.device_id, queue, to).await;
        }
    }
    Ok(())
}
