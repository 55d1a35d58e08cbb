//! The gRPC `Control` service over a [`Controller`].

use crate::model::{mode_from_pb, CoreLoad, Device, QueueKey, Slot, Volume, VolumeGrant};
use crate::pb;
use crate::policy::{check, report_from_pb, report_to_pb};
use crate::state::{device_kind, Controller, Registration};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// The wall clock in Unix ms: the `now_ms` the service passes to the
/// controller (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The `Control` gRPC service; serve it with
/// `pb::control_server::ControlServer`, as the `serve` function of the
/// server module does.
#[derive(Clone, Debug)]
pub struct ControlService {
    ctrl: Arc<Controller>,
    started: std::time::Instant,
    /// True once the server shuts down: watch streams end.
    closing: Arc<watch::Sender<bool>>,
}

impl ControlService {
    /// Serves `ctrl`; the Stats RPC's uptime counts from this call.
    pub fn new(ctrl: Arc<Controller>) -> Self {
        ControlService {
            ctrl,
            started: std::time::Instant::now(),
            closing: Arc::new(watch::channel(false).0),
        }
    }

    /// Ends every watch stream, now and from now on: a graceful shutdown
    /// waits for open streams, and followers only hang up on theirs when
    /// it ends (they then watch again, elsewhere or after a restart).
    pub fn close_watches(&self) {
        self.closing.send_replace(true);
    }

    /// `s`, ending when it ends or once [`ControlService::close_watches`]
    /// is called.
    fn until_closed<T: Send + 'static>(
        &self,
        s: impl Stream<Item = T> + Send + 'static,
    ) -> impl Stream<Item = T> + Send + 'static {
        let stop = WatchStream::new(self.closing.subscribe())
            .filter(|closing| *closing)
            .map(|_| None);
        s.map(Some)
            .chain(tokio_stream::once(None))
            .merge(stop)
            .take_while(Option::is_some)
            .filter_map(|item| item)
    }
}

fn matches(a: &pb::Assignment, device: &str, server: &str) -> bool {
    (device.is_empty() || a.device_id == device) && (server.is_empty() || a.server_id == server)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AssignmentEvent, Status>> + Send>>;
type PolicyStream = Pin<Box<dyn Stream<Item = Result<pb::PolicyEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn register_server(
        &self,
        req: Request<pb::RegisterServerRequest>,
    ) -> Result<Response<pb::RegisterServerResponse>, Status> {
        let r = req.into_inner();
        let lease_ttl_ms = self.ctrl.register_server(
            Registration {
                id: r.id,
                address: r.address,
                sidecores: r.sidecores,
                capacity: r.capacity,
            },
            now_ms(),
        )?;
        Ok(Response::new(pb::RegisterServerResponse { lease_ttl_ms }))
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let lease_ttl_ms = self
            .ctrl
            .renew_lease(&req.into_inner().server_id, now_ms())?;
        Ok(Response::new(pb::RenewLeaseResponse { lease_ttl_ms }))
    }

    async fn report_load(
        &self,
        req: Request<pb::ReportLoadRequest>,
    ) -> Result<Response<pb::ReportLoadResponse>, Status> {
        let r = req.into_inner();
        let load: Vec<(u32, CoreLoad)> = r
            .load
            .iter()
            .map(|l| {
                (
                    l.sidecore,
                    CoreLoad {
                        busy: l.busy,
                        requests_per_sec: l.requests_per_sec,
                    },
                )
            })
            .collect();
        let now = now_ms();
        let lease_ttl_ms = self.ctrl.report_load(&r.server_id, &load, now)?;
        let reports = r
            .stage_reports
            .iter()
            .map(|d| (d.device_key, d.stages.iter().map(report_from_pb).collect()))
            .collect();
        // The lease is renewed: a report that cannot be kept must not fail
        // the call (report_load just found the server).
        if let Err(e) = self.ctrl.record_stage_reports(&r.server_id, reports, now) {
            tracing::warn!(server = %r.server_id, error = %e, "stage report dropped");
        }
        Ok(Response::new(pb::ReportLoadResponse { lease_ttl_ms }))
    }

    async fn attach_device(
        &self,
        req: Request<pb::AttachDeviceRequest>,
    ) -> Result<Response<pb::AttachDeviceResponse>, Status> {
        let d = req
            .into_inner()
            .device
            .ok_or_else(|| Status::invalid_argument("device is missing"))?;
        let device = Device {
            kind: device_kind(d.r#type)?,
            id: d.id,
            vm_id: d.vm_id,
            queues: d.queues,
            agent_address: d.agent_address,
            pinned_server: Some(d.pinned_server_id).filter(|p| !p.is_empty()),
        };
        let attached = self.ctrl.attach_device_with_credential(device, now_ms())?;
        Ok(Response::new(pb::AttachDeviceResponse {
            assignments: attached.assignments.iter().map(Into::into).collect(),
            credential: attached.credential.unwrap_or_default(),
        }))
    }

    async fn claim_device(
        &self,
        req: Request<pb::ClaimDeviceRequest>,
    ) -> Result<Response<pb::ClaimDeviceResponse>, Status> {
        let r = req.into_inner();
        let (agent, vm) = self
            .ctrl
            .claim_device(&r.device_id, &r.agent_address, &r.vm_id)?;
        Ok(Response::new(pb::ClaimDeviceResponse {
            previous_agent_address: agent,
            previous_vm_id: vm,
        }))
    }

    async fn detach_device(
        &self,
        req: Request<pb::DetachDeviceRequest>,
    ) -> Result<Response<pb::DetachDeviceResponse>, Status> {
        self.ctrl.detach_device(&req.into_inner().device_id)?;
        Ok(Response::new(pb::DetachDeviceResponse {}))
    }

    async fn list_servers(
        &self,
        _req: Request<pb::ListServersRequest>,
    ) -> Result<Response<pb::ListServersResponse>, Status> {
        let servers = self
            .ctrl
            .servers()
            .into_iter()
            .map(|(s, assigned_queues)| pb::IoServer {
                load: s
                    .load
                    .iter()
                    .enumerate()
                    .map(|(i, l)| pb::SidecoreLoad {
                        sidecore: i as u32,
                        busy: l.busy,
                        requests_per_sec: l.requests_per_sec,
                    })
                    .collect(),
                id: s.id,
                address: s.address,
                sidecores: s.sidecores,
                capacity: s.capacity,
                lease_expires_unix_ms: s.lease_expires_ms,
                alive: s.alive,
                draining: s.draining,
                assigned_queues,
            })
            .collect();
        Ok(Response::new(pb::ListServersResponse { servers }))
    }

    async fn list_devices(
        &self,
        _req: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let devices = self.ctrl.devices().iter().map(Into::into).collect();
        Ok(Response::new(pb::ListDevicesResponse { devices }))
    }

    async fn list_assignments(
        &self,
        req: Request<pb::ListAssignmentsRequest>,
    ) -> Result<Response<pb::ListAssignmentsResponse>, Status> {
        let r = req.into_inner();
        let assignments = self
            .ctrl
            .assignments()
            .iter()
            .map(pb::Assignment::from)
            .filter(|a| matches(a, &r.device_id, &r.server_id))
            .collect();
        Ok(Response::new(pb::ListAssignmentsResponse { assignments }))
    }

    async fn move_queue(
        &self,
        req: Request<pb::MoveQueueRequest>,
    ) -> Result<Response<pb::MoveQueueResponse>, Status> {
        let r = req.into_inner();
        let a = self.ctrl.move_queue(
            &QueueKey {
                device: r.device_id,
                queue: r.queue,
            },
            Slot {
                server: r.server_id,
                sidecore: r.sidecore,
            },
            now_ms(),
        )?;
        Ok(Response::new(pb::MoveQueueResponse {
            assignment: Some((&a).into()),
        }))
    }

    async fn drain_server(
        &self,
        req: Request<pb::DrainServerRequest>,
    ) -> Result<Response<pb::DrainServerResponse>, Status> {
        let moved = self
            .ctrl
            .drain_server(&req.into_inner().server_id, now_ms())?;
        Ok(Response::new(pb::DrainServerResponse {
            moved: moved.iter().map(Into::into).collect(),
        }))
    }

    async fn rebalance(
        &self,
        _req: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        let moved = self.ctrl.rebalance(now_ms())?;
        Ok(Response::new(pb::RebalanceResponse {
            moved: moved.iter().map(Into::into).collect(),
        }))
    }

    type WatchAssignmentsStream = EventStream;

    async fn watch_assignments(
        &self,
        req: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let r = req.into_inner();
        let (current, rx) = self.ctrl.subscribe();
        let snapshot: Vec<Result<pb::AssignmentEvent, Status>> = current
            .iter()
            .map(|a| pb::AssignmentEvent {
                kind: pb::EventKind::Snapshot as i32,
                assignment: Some(a.into()),
                previous: None,
                reason: "snapshot".into(),
            })
            .map(Ok)
            .collect();
        let (dev, srv) = (r.device_id.clone(), r.server_id.clone());
        let keep = move |e: &pb::AssignmentEvent| {
            e.assignment
                .as_ref()
                .is_some_and(|a| matches(a, &dev, &srv))
                || e.previous.as_ref().is_some_and(|a| matches(a, &dev, &srv))
        };
        let keep2 = keep.clone();
        let snapshot = tokio_stream::iter(snapshot).filter(move |e| match e {
            Ok(e) => keep2(e),
            Err(_) => true,
        });
        // A watcher that falls behind the channel must resync: end its stream
        // with an error instead of silently skipping changes.
        let live = BroadcastStream::new(rx)
            .map(|e| match e {
                Ok(e) => Ok(pb::AssignmentEvent::from(&e)),
                Err(BroadcastStreamRecvError::Lagged(n)) => Err(Status::data_loss(format!(
                    "watch fell {n} events behind; watch again to resync"
                ))),
            })
            .filter(move |e| match e {
                Ok(e) => keep(e),
                Err(_) => true,
            });
        Ok(Response::new(
            Box::pin(self.until_closed(snapshot.chain(live))) as EventStream,
        ))
    }

    async fn stats(
        &self,
        _req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let s = self.ctrl.stats();
        Ok(Response::new(pb::StatsResponse {
            servers: s.servers,
            alive_servers: s.alive_servers,
            devices: s.devices,
            queues: s.queues,
            unassigned_queues: s.unassigned_queues,
            moves: s.counters.moves,
            failovers: s.counters.failovers,
            rebalance_moves: s.counters.rebalance_moves,
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }))
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let v = self.ctrl.create_volume(Volume {
            name: r.name,
            size_bytes: r.size_bytes,
        })?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(pb::Volume {
                name: v.name,
                size_bytes: v.size_bytes,
                grants: Vec::new(),
            }),
        }))
    }

    async fn list_volumes(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let volumes = self
            .ctrl
            .volumes()
            .into_iter()
            .map(|(v, grants)| pb::Volume {
                name: v.name,
                size_bytes: v.size_bytes,
                grants: grants.iter().map(Into::into).collect(),
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let revoked = self.ctrl.delete_volume(&r.name, r.force)?;
        Ok(Response::new(pb::DeleteVolumeResponse {
            revoked: revoked.iter().map(Into::into).collect(),
        }))
    }

    async fn grant_volume(
        &self,
        req: Request<pb::GrantVolumeRequest>,
    ) -> Result<Response<pb::GrantVolumeResponse>, Status> {
        let r = req.into_inner();
        let mode = mode_from_pb(r.mode)
            .ok_or_else(|| Status::invalid_argument("mode must be RW, RO or SHARED"))?;
        let g = self.ctrl.grant_volume(VolumeGrant {
            volume: r.volume,
            device: r.device_id,
            mode,
            host: Some(r.host).filter(|h| !h.is_empty()),
        })?;
        Ok(Response::new(pb::GrantVolumeResponse {
            grant: Some((&g).into()),
        }))
    }

    async fn revoke_grant(
        &self,
        req: Request<pb::RevokeGrantRequest>,
    ) -> Result<Response<pb::RevokeGrantResponse>, Status> {
        let r = req.into_inner();
        let g = self.ctrl.revoke_grant(&r.volume, &r.device_id)?;
        Ok(Response::new(pb::RevokeGrantResponse {
            revoked: Some((&g).into()),
        }))
    }

    async fn issue_credential(
        &self,
        req: Request<pb::IssueCredentialRequest>,
    ) -> Result<Response<pb::IssueCredentialResponse>, Status> {
        let credential = self
            .ctrl
            .issue_credential(&req.into_inner().device_id, now_ms())?
            .unwrap_or_default();
        Ok(Response::new(pb::IssueCredentialResponse { credential }))
    }

    async fn set_device_policy(
        &self,
        req: Request<pb::SetDevicePolicyRequest>,
    ) -> Result<Response<pb::SetDevicePolicyResponse>, Status> {
        let r = req.into_inner();
        if r.device.is_empty() {
            return Err(Status::invalid_argument("device is empty"));
        }
        // Parsed and built as a server will build it (for a crypt stage,
        // an AES key schedule: microseconds, fine on a runtime thread).
        let spec = check(&r.device, &r.policy_json)?;
        let set = self.ctrl.set_device_policy(&r.device, spec)?;
        Ok(Response::new(pb::SetDevicePolicyResponse {
            version: set.version,
            cleared: set.policy.is_none(),
            policy_json: set
                .policy
                .as_ref()
                .map(|p| p.json_redacted())
                .unwrap_or_default(),
        }))
    }

    async fn get_device_policy(
        &self,
        req: Request<pb::GetDevicePolicyRequest>,
    ) -> Result<Response<pb::GetDevicePolicyResponse>, Status> {
        let device = req.into_inner().device;
        let p = self
            .ctrl
            .device_policy(&device)
            .ok_or_else(|| Status::not_found(format!("device {device} has no policy")))?;
        let reports = self
            .ctrl
            .stage_reports(&device)
            .into_iter()
            .map(|r| pb::ServerStageReports {
                server_id: r.server,
                reported_unix_ms: r.at_ms,
                stages: r.stages.iter().map(report_to_pb).collect(),
            })
            .collect();
        Ok(Response::new(pb::GetDevicePolicyResponse {
            policy_json: p.json_redacted(),
            version: p.version,
            device,
            reports,
        }))
    }

    type WatchPoliciesStream = PolicyStream;

    async fn watch_policies(
        &self,
        req: Request<pb::WatchPoliciesRequest>,
    ) -> Result<Response<Self::WatchPoliciesStream>, Status> {
        let server = req.into_inner().server_id;
        let (current, rx) = self.ctrl.subscribe_policies();
        tracing::info!(server = %server, policies = current.len(), "policy watch started");
        let mut first: Vec<Result<pb::PolicyEvent, Status>> = current
            .iter()
            .map(|p| {
                Ok(pb::PolicyEvent {
                    kind: pb::PolicyEventKind::Snapshot as i32,
                    device: p.device.clone(),
                    policy_json: p.json_with_keys(),
                    version: p.version,
                })
            })
            .collect();
        first.push(Ok(pb::PolicyEvent {
            kind: pb::PolicyEventKind::Synced as i32,
            device: String::new(),
            policy_json: String::new(),
            version: current.iter().map(|p| p.version).max().unwrap_or(0),
        }));
        // As for assignments: a watcher that falls behind must resync.
        let live = BroadcastStream::new(rx).map(|e| match e {
            Ok(e) => Ok(e.to_pb()),
            Err(BroadcastStreamRecvError::Lagged(n)) => Err(Status::data_loss(format!(
                "policy watch fell {n} events behind; watch again to resync"
            ))),
        });
        Ok(Response::new(
            Box::pin(self.until_closed(tokio_stream::iter(first).chain(live))) as PolicyStream,
        ))
    }
}
