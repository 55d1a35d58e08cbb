//! The controller: servers, devices and assignments, and every rule that
//! changes them. Synchronous and clock-free (callers pass `now_ms`), so tests
//! drive leases deterministically.
//!
//! Each change runs on a copy of the state, is saved to the store, and only
//! then replaces the live state and is announced: a rejected request or a
//! failed save leaves nothing behind.
//!
//! Besides placement it records volumes and which device may attach which
//! ([`VolumeGrant`]s), and, given the data-plane key
//! ([`ControllerConfig::credentials`]), signs the credential each attached
//! device's agent presents to the I/O servers.
//!
//! It also keeps each device's interposition policy ([`DevicePolicy`],
//! persisted with the rest) and, in memory only, the stage counters the
//! servers last reported for them.

use crate::error::ControlError;
use crate::model::{
    Assignment, CoreLoad, Device, DeviceKind, Event, EventKind, QueueKey, Server, Slot, Volume,
    VolumeGrant,
};
use crate::placement::{ClusterView, PlacementPolicy};
use crate::policy::{DevicePolicy, PolicyEvent, MAX_REPORTED_DEVICES, MAX_REPORTED_ITEMS};
use crate::store::{Counters, Snapshot, StateStore, SNAPSHOT_VERSION};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;
use vrio_core::interpose::StageReport;
use vrio_core::tenancy::{valid_volume_name, AccessMode, Capability, Keyring};

/// Largest volume the controller records (1 EiB): guards against absurd
/// input, as the other limits do.
pub const MAX_VOLUME_BYTES: u64 = 1 << 60;

/// The volume named in a net device's credential (servers ignore it for net
/// queues).
pub const NET_CREDENTIAL_VOLUME: &str = "net";

/// How the controller signs attach credentials: with the data-plane key the
/// I/O servers check them with (`vrio-server --key-file`).
#[derive(Clone, Debug)]
pub struct CredentialConfig {
    /// The key file's keys; the first signs.
    pub keys: Arc<Keyring>,
    /// How long a credential is valid from when it is issued (whole
    /// seconds count). Servers check it at ATTACH time, so it bounds how
    /// long a revoked grant can still be used to attach.
    pub ttl: Duration,
}

impl CredentialConfig {
    /// Credentials signed with `keys`, valid for 24 hours.
    pub fn new(keys: Keyring) -> Self {
        CredentialConfig {
            keys: Arc::new(keys),
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// How long a server's lease lasts without renewal, in ms.
    pub lease_ttl_ms: u64,
    /// Most sidecores / queues a request may ask for (guards against absurd input).
    pub max_sidecores: u32,
    /// Most queues one device may have.
    pub max_queues: u32,
    /// Sign attach credentials: then a blk device attaches only with a
    /// volume grant. None: no credentials, and grants are only recorded.
    pub credentials: Option<CredentialConfig>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            lease_ttl_ms: 10_000,
            max_sidecores: 1024,
            max_queues: 1024,
            credentials: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct State {
    servers: BTreeMap<String, Server>,
    devices: BTreeMap<String, Device>,
    assignments: BTreeMap<QueueKey, Assignment>,
    counters: Counters,
    volumes: BTreeMap<String, Volume>,
    /// By (volume, device).
    grants: BTreeMap<(String, String), VolumeGrant>,
    /// Interposition policies by device name.
    policies: BTreeMap<String, DevicePolicy>,
    /// The version of the last policy change.
    policy_version: u64,
}

/// What setting a device's policy did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySet {
    /// The change's version (the current one when nothing changed).
    pub version: u64,
    /// The policy now in force; None when it was cleared.
    pub policy: Option<DevicePolicy>,
}

/// The stage counters one server last reported for one device.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerStageReport {
    /// The reporting server's id.
    pub server: String,
    /// When the controller received the report, in ms on its clock.
    pub at_ms: u64,
    /// The device's stages, in chain order.
    pub stages: Vec<StageReport>,
}

/// One server's latest report: device key to stages.
#[derive(Debug, Default)]
struct ServerReports {
    at_ms: u64,
    devices: BTreeMap<u64, Vec<StageReport>>,
}

/// What attaching a device gave: where its queues run, and the credential
/// its agent presents to the I/O servers.
#[derive(Clone, Debug, PartialEq)]
pub struct Attached {
    /// One per queue, in queue order.
    pub assignments: Vec<Assignment>,
    /// None when the controller signs no credentials.
    pub credential: Option<String>,
}

/// Totals for the Stats RPC.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Known servers, dead ones included.
    pub servers: u32,
    /// Servers whose lease is live.
    pub alive_servers: u32,
    /// Attached devices.
    pub devices: u32,
    /// Queues of all attached devices.
    pub queues: u32,
    /// Queues waiting for a server with room.
    pub unassigned_queues: u32,
    /// Moves and failovers since the state was created.
    pub counters: Counters,
}

/// A new server's registration.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Unique server id.
    pub id: String,
    /// Where agents reach the server's data path.
    pub address: String,
    /// Number of sidecores, at least 1.
    pub sidecores: u32,
    /// Most queues the server accepts, at least 1.
    pub capacity: u32,
}

/// The controller: every server, device and assignment, and the rules that
/// change them. Thread-safe; each change is saved to its [`StateStore`]
/// before it takes effect, then announced to subscribers
/// ([`Controller::subscribe`]). Errors are [`ControlError`]s, which map to
/// gRPC status codes.
pub struct Controller {
    state: Mutex<State>,
    store: Box<dyn StateStore>,
    policy: Box<dyn PlacementPolicy>,
    events: broadcast::Sender<Event>,
    policy_events: broadcast::Sender<PolicyEvent>,
    /// The servers' latest stage reports, by server id; not persisted.
    stage_reports: Mutex<BTreeMap<String, ServerReports>>,
    cfg: ControllerConfig,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("policy", &self.policy)
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn bad(msg: impl Into<String>) -> ControlError {
    ControlError::InvalidArgument(msg.into())
}

fn check_volume_name(name: &str) -> Result<(), ControlError> {
    if valid_volume_name(name) {
        Ok(())
    } else {
        Err(bad(format!(
            "volume name {name:?}: 1 to 64 of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

fn check_device_name(id: &str) -> Result<(), ControlError> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(bad(format!(
            "device id {id:?}: 1 to 256 bytes, no control characters"
        )));
    }
    Ok(())
}

/// A grant's host as the I/O servers compare it with a connection's
/// source: an IP address in canonical form, or `local`; None for empty.
fn canonical_host(host: Option<&str>) -> Result<Option<String>, ControlError> {
    match host.map(str::trim) {
        None | Some("") => Ok(None),
        Some("local") => Ok(Some("local".into())),
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map(|ip| Some(ip.to_string()))
            .map_err(|_| {
                bad(format!(
                    "host {h:?}: the VM host's IP address, or `local` for Unix-socket fabrics"
                ))
            }),
    }
}

impl State {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: SNAPSHOT_VERSION,
            servers: self.servers.values().cloned().collect(),
            devices: self.devices.values().cloned().collect(),
            assignments: self.assignments.values().cloned().collect(),
            counters: self.counters.clone(),
            volumes: self.volumes.values().cloned().collect(),
            grants: self.grants.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            policy_version: self.policy_version,
        }
    }

    fn grants_of(&self, device: &str) -> Vec<&VolumeGrant> {
        self.grants
            .values()
            .filter(|g| g.device == device)
            .collect()
    }

    /// The credential `d`'s agent presents, signed with `cfg`'s key, valid
    /// from `now_ms`: a blk device's names its one granted volume; a net
    /// device's names no real volume and reads only. Fails with
    /// `FailedPrecondition` for a blk device with no grant or several.
    fn credential(
        &self,
        cfg: &CredentialConfig,
        d: &Device,
        now_ms: u64,
    ) -> Result<String, ControlError> {
        let (volume, mode, host) = match d.kind {
            DeviceKind::Net => (
                NET_CREDENTIAL_VOLUME.to_string(),
                AccessMode::ReadOnly,
                None,
            ),
            DeviceKind::Blk => match self.grants_of(&d.id).as_slice() {
                [] => {
                    return Err(ControlError::FailedPrecondition(format!(
                        "device {0} has no volume grant (vrio-ctl volume grant VOLUME {0})",
                        d.id
                    )))
                }
                [g] => (g.volume.clone(), g.mode, g.host.clone()),
                many => {
                    let names: Vec<&str> = many.iter().map(|g| g.volume.as_str()).collect();
                    return Err(ControlError::FailedPrecondition(format!(
                        "device {0} is granted volumes {1}, but a blk device serves one \
                         (vrio-ctl volume revoke VOLUME {0})",
                        d.id,
                        names.join(", ")
                    )));
                }
            },
        };
        let cap = Capability {
            device: vrio_core::remote::device_key(&d.id),
            volume,
            mode,
            host: host.unwrap_or_default(),
            expires: (now_ms / 1000).saturating_add(cfg.ttl.as_secs()),
        };
        Ok(cfg.keys.sign(&cap)?)
    }

    fn view(&self, now_ms: u64) -> ClusterView {
        let pins: BTreeMap<String, String> = self
            .devices
            .values()
            .filter_map(|d| d.pinned_server.clone().map(|p| (d.id.clone(), p)))
            .collect();
        ClusterView::build(
            self.servers.values(),
            self.assignments.values(),
            &pins,
            now_ms,
        )
    }

    fn pin_of(&self, device: &str) -> Option<String> {
        self.devices
            .get(device)
            .and_then(|d| d.pinned_server.clone())
    }

    /// Moves one queue and records the event.
    fn set_slot(
        &mut self,
        key: &QueueKey,
        to: Option<Slot>,
        now_ms: u64,
        reason: &'static str,
        events: &mut Vec<Event>,
    ) {
        let from = match self.assignments.get(key) {
            Some(a) => a.slot.clone(),
            None => return,
        };
        if let (Some(from), Some(to)) = (&from, &to) {
            self.shift_load(from, to);
        }
        let Some(a) = self.assignments.get_mut(key) else {
            return;
        };
        let previous = a.clone();
        a.slot = to;
        a.generation += 1;
        a.last_moved_ms = now_ms;
        let kind = if previous.slot.is_none() {
            EventKind::Assigned
        } else {
            EventKind::Moved
        };
        events.push(Event {
            kind,
            assignment: a.clone(),
            previous: Some(previous),
            reason,
        });
    }

    /// Until the servers' next load report, assume a moved queue takes its
    /// share of the source sidecore's load along; otherwise the stale report
    /// would make the next rebalance round move even more queues away.
    fn shift_load(&mut self, from: &Slot, to: &Slot) {
        let queues = self
            .assignments
            .values()
            .filter(|a| a.slot.as_ref() == Some(from))
            .count()
            .max(1) as f64;
        let Some(src) = self
            .servers
            .get_mut(&from.server)
            .and_then(|s| s.load.get_mut(from.sidecore as usize))
        else {
            return;
        };
        let share = CoreLoad {
            busy: src.busy / queues,
            requests_per_sec: src.requests_per_sec / queues,
        };
        src.busy = (src.busy - share.busy).max(0.0);
        src.requests_per_sec = (src.requests_per_sec - share.requests_per_sec).max(0.0);
        if let Some(dst) = self
            .servers
            .get_mut(&to.server)
            .and_then(|s| s.load.get_mut(to.sidecore as usize))
        {
            dst.busy = (dst.busy + share.busy).min(1.0);
            dst.requests_per_sec += share.requests_per_sec;
        }
    }

    /// Places every queue that has no slot, where room allows.
    fn place_pending(
        &mut self,
        policy: &dyn PlacementPolicy,
        now_ms: u64,
        reason: &'static str,
        events: &mut Vec<Event>,
    ) {
        let pending: Vec<QueueKey> = self
            .assignments
            .values()
            .filter(|a| a.slot.is_none())
            .map(|a| a.key.clone())
            .collect();
        let mut view = self.view(now_ms);
        for key in pending {
            let pin = self.pin_of(&key.device);
            if let Some(slot) = policy.place(&view, &key, pin.as_deref()) {
                view.apply(&key, Some(slot.clone()));
                self.set_slot(&key, Some(slot), now_ms, reason, events);
            }
        }
    }

    /// Takes every queue off `server` and places it elsewhere. With
    /// `all_or_nothing`, fails if any queue finds no room.
    fn evacuate(
        &mut self,
        policy: &dyn PlacementPolicy,
        server: &str,
        now_ms: u64,
        reason: &'static str,
        all_or_nothing: bool,
        events: &mut Vec<Event>,
    ) -> Result<Vec<Assignment>, ControlError> {
        let victims: Vec<QueueKey> = self
            .assignments
            .values()
            .filter(|a| a.slot.as_ref().is_some_and(|s| s.server == server))
            .map(|a| a.key.clone())
            .collect();
        let mut view = self.view(now_ms);
        let mut moved = Vec::new();
        for key in victims {
            let pin = self.pin_of(&key.device);
            let to = policy.place(&view, &key, pin.as_deref());
            if to.is_none() && all_or_nothing {
                return Err(ControlError::FailedPrecondition(format!(
                    "no other server has room for {}/{}",
                    key.device, key.queue
                )));
            }
            view.apply(&key, to.clone());
            self.set_slot(&key, to, now_ms, reason, events);
            if let Some(a) = self.assignments.get(&key) {
                moved.push(a.clone());
            }
        }
        self.counters.moves += moved.len() as u64;
        Ok(moved)
    }
}

impl Controller {
    /// Opens the controller, recovering state from `store`. Recovered servers
    /// get a fresh lease: the controller was down, not them.
    pub fn open(
        cfg: ControllerConfig,
        store: Box<dyn StateStore>,
        policy: Box<dyn PlacementPolicy>,
        now_ms: u64,
    ) -> Result<Self, ControlError> {
        let mut state = State::default();
        if let Some(snap) = store.load()? {
            for mut s in snap.servers {
                if s.alive {
                    s.lease_expires_ms = now_ms.saturating_add(cfg.lease_ttl_ms);
                }
                state.servers.insert(s.id.clone(), s);
            }
            for d in snap.devices {
                state.devices.insert(d.id.clone(), d);
            }
            for a in snap.assignments {
                state.assignments.insert(a.key.clone(), a);
            }
            state.counters = snap.counters;
            for v in snap.volumes {
                state.volumes.insert(v.name.clone(), v);
            }
            for g in snap.grants {
                state.grants.insert((g.volume.clone(), g.device.clone()), g);
            }
            for p in snap.policies {
                state.policy_version = state.policy_version.max(p.version);
                state.policies.insert(p.device.clone(), p);
            }
            state.policy_version = state.policy_version.max(snap.policy_version);
            tracing::info!(
                servers = state.servers.len(),
                devices = state.devices.len(),
                assignments = state.assignments.len(),
                volumes = state.volumes.len(),
                grants = state.grants.len(),
                policies = state.policies.len(),
                "recovered controller state"
            );
        }
        let (events, _) = broadcast::channel(1024);
        let (policy_events, _) = broadcast::channel(1024);
        Ok(Controller {
            state: Mutex::new(state),
            store,
            policy,
            events,
            policy_events,
            stage_reports: Mutex::new(BTreeMap::new()),
            cfg,
        })
    }

    /// The settings it runs with.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Changes are applied by swapping in a finished copy, so a panic while
        // the lock was held cannot have left the state half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mutate<R>(
        &self,
        f: impl FnOnce(&mut State, &dyn PlacementPolicy, &mut Vec<Event>) -> Result<R, ControlError>,
    ) -> Result<R, ControlError> {
        let mut live = self.lock();
        let mut next = live.clone();
        let mut events = Vec::new();
        let out = f(&mut next, self.policy.as_ref(), &mut events)?;
        self.store.save(&next.snapshot())?;
        *live = next;
        // Sent under the lock so watchers see changes in commit order.
        for e in events {
            let _ = self.events.send(e);
        }
        Ok(out)
    }

    /// Registers a server with a fresh lease (a dead server may come back
    /// under its id, empty), then places queues that were waiting for room.
    /// Returns the lease TTL in ms. Fails with `AlreadyExists` while the id's
    /// lease is live, `InvalidArgument` for an empty id or out-of-range
    /// sidecores or capacity.
    pub fn register_server(&self, r: Registration, now_ms: u64) -> Result<u64, ControlError> {
        if r.id.is_empty() {
            return Err(bad("server id is empty"));
        }
        if r.sidecores == 0 || r.sidecores > self.cfg.max_sidecores {
            return Err(bad(format!(
                "sidecores must be 1..={}",
                self.cfg.max_sidecores
            )));
        }
        if r.capacity == 0 {
            return Err(bad("capacity must be at least 1"));
        }
        let ttl = self.cfg.lease_ttl_ms;
        self.mutate(|st, policy, events| {
            if let Some(old) = st.servers.get(&r.id) {
                if old.alive {
                    return Err(ControlError::AlreadyExists(format!(
                        "server {} is registered and its lease is live",
                        r.id
                    )));
                }
            }
            // A dead server may come back under its id: it starts empty.
            st.servers.insert(
                r.id.clone(),
                Server {
                    id: r.id.clone(),
                    address: r.address.clone(),
                    sidecores: r.sidecores,
                    capacity: r.capacity,
                    load: vec![CoreLoad::default(); r.sidecores as usize],
                    lease_expires_ms: now_ms.saturating_add(ttl),
                    alive: true,
                    draining: false,
                },
            );
            st.place_pending(policy, now_ms, "register", events);
            tracing::info!(server = %r.id, address = %r.address, "server registered");
            Ok(ttl)
        })
    }

    fn live_server<'a>(st: &'a mut State, id: &str) -> Result<&'a mut Server, ControlError> {
        let s = st
            .servers
            .get_mut(id)
            .ok_or_else(|| ControlError::NotFound(format!("server {id}")))?;
        if !s.alive {
            return Err(ControlError::FailedPrecondition(format!(
                "server {id}: lease expired, register again"
            )));
        }
        Ok(s)
    }

    /// Extends a live server's lease to `now_ms` plus the TTL; returns the
    /// TTL in ms. Fails with `NotFound` for an unknown server and
    /// `FailedPrecondition` once its lease has expired (register again).
    pub fn renew_lease(&self, id: &str, now_ms: u64) -> Result<u64, ControlError> {
        let ttl = self.cfg.lease_ttl_ms;
        // Leases are not persisted (a restarted controller grants fresh ones)
        // and this is the hot path, so no copy of the state: one field changes.
        let mut st = self.lock();
        Self::live_server(&mut st, id)?.lease_expires_ms = now_ms.saturating_add(ttl);
        Ok(ttl)
    }

    /// Records load per sidecore (index, load) and renews the lease, as
    /// [`Controller::renew_lease`]. Fails with `InvalidArgument` for a busy
    /// fraction outside 0..=1, a negative or non-finite rate, or an unknown
    /// sidecore, and then records nothing.
    pub fn report_load(
        &self,
        id: &str,
        load: &[(u32, CoreLoad)],
        now_ms: u64,
    ) -> Result<u64, ControlError> {
        for (core, l) in load {
            if !(0.0..=1.0).contains(&l.busy)
                || !l.requests_per_sec.is_finite()
                || l.requests_per_sec < 0.0
            {
                return Err(bad(format!(
                    "sidecore {core}: busy must be in 0..=1 and requests/s >= 0"
                )));
            }
        }
        let ttl = self.cfg.lease_ttl_ms;
        // Like renew_lease: in place, after every check has passed.
        let mut st = self.lock();
        let s = Self::live_server(&mut st, id)?;
        if let Some((core, _)) = load.iter().find(|(c, _)| *c >= s.sidecores) {
            return Err(bad(format!("server {id} has no sidecore {core}")));
        }
        for (core, l) in load {
            if let Some(slot) = s.load.get_mut(*core as usize) {
                *slot = *l;
            }
        }
        s.lease_expires_ms = now_ms.saturating_add(ttl);
        Ok(ttl)
    }

    /// Adds a device and places each of its queues; returns their
    /// assignments. All or nothing: fails with `ResourceExhausted` if a queue
    /// finds no room, `AlreadyExists` for a known id, `NotFound` for an
    /// unknown pinned server, `InvalidArgument` for a bad id or queue count,
    /// and, when the controller signs credentials, `FailedPrecondition` for
    /// a blk device without exactly one volume grant.
    pub fn attach_device(&self, d: Device, now_ms: u64) -> Result<Vec<Assignment>, ControlError> {
        self.attach_device_with_credential(d, now_ms)
            .map(|a| a.assignments)
    }

    /// [`Controller::attach_device`], also returning the credential the
    /// device's agent presents to the I/O servers (when the controller has
    /// [`ControllerConfig::credentials`]).
    pub fn attach_device_with_credential(
        &self,
        d: Device,
        now_ms: u64,
    ) -> Result<Attached, ControlError> {
        if d.id.is_empty() {
            return Err(bad("device id is empty"));
        }
        if d.queues == 0 || d.queues > self.cfg.max_queues {
            return Err(bad(format!("queues must be 1..={}", self.cfg.max_queues)));
        }
        self.mutate(|st, policy, events| {
            if st.devices.contains_key(&d.id) {
                return Err(ControlError::AlreadyExists(format!("device {}", d.id)));
            }
            if let Some(p) = &d.pinned_server {
                if !st.servers.contains_key(p) {
                    return Err(ControlError::NotFound(format!("pinned server {p}")));
                }
            }
            let credential = match &self.cfg.credentials {
                Some(c) => Some(st.credential(c, &d, now_ms)?),
                None => None,
            };
            let mut view = st.view(now_ms);
            let mut out = Vec::new();
            for q in 0..d.queues {
                let key = QueueKey {
                    device: d.id.clone(),
                    queue: q,
                };
                view.add_queue(key.clone(), d.pinned_server.clone());
                let slot = policy
                    .place(&view, &key, d.pinned_server.as_deref())
                    .ok_or_else(|| {
                        ControlError::ResourceExhausted(format!(
                            "no live server has room for queue {q} of device {}",
                            d.id
                        ))
                    })?;
                view.apply(&key, Some(slot.clone()));
                let a = Assignment {
                    key: key.clone(),
                    slot: Some(slot),
                    generation: 1,
                    last_moved_ms: now_ms,
                };
                events.push(Event {
                    kind: EventKind::Assigned,
                    assignment: a.clone(),
                    previous: None,
                    reason: "attach",
                });
                st.assignments.insert(key, a.clone());
                out.push(a);
            }
            tracing::info!(
                device = %d.id,
                vm = %d.vm_id,
                queues = d.queues,
                credential = credential.is_some(),
                "device attached"
            );
            st.devices.insert(d.id.clone(), d.clone());
            Ok(Attached {
                assignments: out,
                credential,
            })
        })
    }

    /// A fresh credential for attached device `id` (an agent that restarted
    /// and found its device attached already), valid from `now_ms`; None
    /// when the controller signs no credentials. Fails with `NotFound` for
    /// an unknown device and as [`Controller::attach_device`] does for a
    /// blk device without exactly one grant (it may have been revoked).
    pub fn issue_credential(&self, id: &str, now_ms: u64) -> Result<Option<String>, ControlError> {
        let st = self.lock();
        let d = st
            .devices
            .get(id)
            .ok_or_else(|| ControlError::NotFound(format!("device {id}")))?;
        match &self.cfg.credentials {
            Some(c) => Ok(Some(st.credential(c, d, now_ms)?)),
            None => Ok(None),
        }
    }

    /// Records a new volume. Fails with `InvalidArgument` for a bad name or
    /// a size that is not a positive multiple of 512 up to
    /// [`MAX_VOLUME_BYTES`], `AlreadyExists` for a known name.
    pub fn create_volume(&self, v: Volume) -> Result<Volume, ControlError> {
        check_volume_name(&v.name)?;
        if v.size_bytes == 0 || v.size_bytes % 512 != 0 || v.size_bytes > MAX_VOLUME_BYTES {
            return Err(bad(format!(
                "volume size {} bytes: a positive multiple of 512, at most {MAX_VOLUME_BYTES}",
                v.size_bytes
            )));
        }
        self.mutate(|st, _, _| {
            if st.volumes.contains_key(&v.name) {
                return Err(ControlError::AlreadyExists(format!("volume {}", v.name)));
            }
            st.volumes.insert(v.name.clone(), v.clone());
            tracing::info!(volume = %v.name, bytes = v.size_bytes, "volume created");
            Ok(v)
        })
    }

    /// Forgets volume `name`; returns the grants it revoked. While the
    /// volume is granted to any device, fails with `FailedPrecondition`
    /// unless `force`, which revokes those grants too (credentials already
    /// issued stay valid until they expire). `NotFound` for an unknown
    /// volume. Images on the I/O servers are not touched.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<Vec<VolumeGrant>, ControlError> {
        self.mutate(|st, _, _| {
            if st.volumes.remove(name).is_none() {
                return Err(ControlError::NotFound(format!("volume {name}")));
            }
            let granted: Vec<VolumeGrant> = st
                .grants
                .values()
                .filter(|g| g.volume == name)
                .cloned()
                .collect();
            if !granted.is_empty() && !force {
                let devices: Vec<&str> = granted.iter().map(|g| g.device.as_str()).collect();
                return Err(ControlError::FailedPrecondition(format!(
                    "volume {name} is granted to {} (revoke the grants, or delete with force)",
                    devices.join(", ")
                )));
            }
            st.grants.retain(|(v, _), _| v != name);
            tracing::info!(volume = %name, revoked = granted.len(), "volume deleted");
            Ok(granted)
        })
    }

    /// Lets `g.device` attach `g.volume` in `g.mode` (from `g.host`, if
    /// given: an IP address or `local`, stored in canonical form); returns
    /// the grant as recorded. Granting the same volume to the same device
    /// again replaces mode and host. Fails with `NotFound` for an unknown
    /// volume, `FailedPrecondition` when the device holds a grant of
    /// another volume (a blk device serves one), `InvalidArgument` for a
    /// bad name or host. The device need not be attached yet.
    pub fn grant_volume(&self, g: VolumeGrant) -> Result<VolumeGrant, ControlError> {
        check_volume_name(&g.volume)?;
        check_device_name(&g.device)?;
        let g = VolumeGrant {
            host: canonical_host(g.host.as_deref())?,
            ..g
        };
        self.mutate(|st, _, _| {
            if !st.volumes.contains_key(&g.volume) {
                return Err(ControlError::NotFound(format!("volume {}", g.volume)));
            }
            if let Some(other) = st
                .grants_of(&g.device)
                .iter()
                .find(|o| o.volume != g.volume)
            {
                return Err(ControlError::FailedPrecondition(format!(
                    "device {0} is granted volume {1} already, and a device attaches one volume \
                     (vrio-ctl volume revoke {1} {0} first)",
                    g.device, other.volume
                )));
            }
            st.grants
                .insert((g.volume.clone(), g.device.clone()), g.clone());
            tracing::info!(
                volume = %g.volume,
                device = %g.device,
                mode = %g.mode,
                host = g.host.as_deref().unwrap_or("any"),
                "volume granted"
            );
            Ok(g)
        })
    }

    /// Takes back `device`'s grant of `volume`; returns it. Credentials
    /// already issued stay valid until they expire. Fails with `NotFound`
    /// when there is no such grant.
    pub fn revoke_grant(&self, volume: &str, device: &str) -> Result<VolumeGrant, ControlError> {
        self.mutate(|st, _, _| {
            let g = st
                .grants
                .remove(&(volume.to_string(), device.to_string()))
                .ok_or_else(|| {
                    ControlError::NotFound(format!("grant of volume {volume} to device {device}"))
                })?;
            tracing::info!(volume, device, "volume grant revoked");
            Ok(g)
        })
    }

    /// Every volume with its grants, by name.
    pub fn volumes(&self) -> Vec<(Volume, Vec<VolumeGrant>)> {
        let st = self.lock();
        st.volumes
            .values()
            .map(|v| {
                let grants = st
                    .grants
                    .range((v.name.clone(), String::new())..)
                    .take_while(|((name, _), _)| *name == v.name)
                    .map(|(_, g)| g.clone())
                    .collect();
                (v.clone(), grants)
            })
            .collect()
    }

    /// Every grant, by volume then device.
    pub fn grants(&self) -> Vec<VolumeGrant> {
        self.lock().grants.values().cloned().collect()
    }

    /// Removes a device and its queues' assignments. Fails with `NotFound`
    /// for an unknown device.
    pub fn detach_device(&self, id: &str) -> Result<(), ControlError> {
        self.mutate(|st, _, events| {
            let d = st
                .devices
                .remove(id)
                .ok_or_else(|| ControlError::NotFound(format!("device {id}")))?;
            for q in 0..d.queues {
                let key = QueueKey {
                    device: d.id.clone(),
                    queue: q,
                };
                if let Some(a) = st.assignments.remove(&key) {
                    events.push(Event {
                        kind: EventKind::Removed,
                        assignment: a,
                        previous: None,
                        reason: "detach",
                    });
                }
            }
            Ok(())
        })
    }

    /// A live migration moved device `id`'s guest to the VM host whose
    /// agent is `agent_address` (and, if not empty, to VM id `vm_id`): that
    /// agent owns its rings now. The placement stays as it is. Returns the
    /// owner before, (agent address, VM id). Fails with `NotFound` for an
    /// unknown device, `InvalidArgument` for an empty agent address.
    pub fn claim_device(
        &self,
        id: &str,
        agent_address: &str,
        vm_id: &str,
    ) -> Result<(String, String), ControlError> {
        if agent_address.is_empty() {
            return Err(bad("agent address is empty"));
        }
        self.mutate(|st, _, _| {
            let d = st
                .devices
                .get_mut(id)
                .ok_or_else(|| ControlError::NotFound(format!("device {id}")))?;
            let before = (d.agent_address.clone(), d.vm_id.clone());
            d.agent_address = agent_address.to_string();
            if !vm_id.is_empty() {
                d.vm_id = vm_id.to_string();
            }
            if before != (d.agent_address.clone(), d.vm_id.clone()) {
                tracing::info!(
                    device = %id,
                    from = %before.0,
                    to = %d.agent_address,
                    vm = %d.vm_id,
                    "device moved VM hosts (live migration); its placement stays"
                );
            }
            Ok(before)
        })
    }

    /// Moves one queue to `to` by hand; returns its new assignment (the
    /// current one if it is already there). Fails when the queue, server or
    /// sidecore does not exist, the device is pinned elsewhere, or the target
    /// server is dead, draining or full.
    pub fn move_queue(
        &self,
        key: &QueueKey,
        to: Slot,
        now_ms: u64,
    ) -> Result<Assignment, ControlError> {
        self.mutate(|st, _, events| {
            let dev = st
                .devices
                .get(&key.device)
                .ok_or_else(|| ControlError::NotFound(format!("device {}", key.device)))?;
            if key.queue >= dev.queues {
                return Err(bad(format!(
                    "device {} has {} queues, no queue {}",
                    dev.id, dev.queues, key.queue
                )));
            }
            if let Some(p) = &dev.pinned_server {
                if *p != to.server {
                    return Err(ControlError::FailedPrecondition(format!(
                        "device {} is pinned to server {p}",
                        dev.id
                    )));
                }
            }
            let server = st
                .servers
                .get(&to.server)
                .ok_or_else(|| ControlError::NotFound(format!("server {}", to.server)))?;
            if to.sidecore >= server.sidecores {
                return Err(bad(format!(
                    "server {} has {} sidecores, no sidecore {}",
                    server.id, server.sidecores, to.sidecore
                )));
            }
            if !server.eligible() {
                return Err(ControlError::FailedPrecondition(format!(
                    "server {} is {}",
                    server.id,
                    if server.alive { "draining" } else { "dead" }
                )));
            }
            let current = st.assignments.get(key).ok_or_else(|| {
                ControlError::NotFound(format!("queue {}/{}", key.device, key.queue))
            })?;
            if current.slot.as_ref() == Some(&to) {
                return Ok(current.clone());
            }
            let same_server = current.slot.as_ref().is_some_and(|s| s.server == to.server);
            let used = st
                .assignments
                .values()
                .filter(|a| a.slot.as_ref().is_some_and(|s| s.server == to.server))
                .count() as u32;
            if !same_server && used >= server.capacity {
                return Err(ControlError::FailedPrecondition(format!(
                    "server {} is full ({} queues)",
                    server.id, server.capacity
                )));
            }
            st.set_slot(key, Some(to), now_ms, "move", events);
            st.counters.moves += 1;
            st.assignments.get(key).cloned().ok_or_else(|| {
                ControlError::NotFound(format!("queue {}/{}", key.device, key.queue))
            })
        })
    }

    /// Marks a live server draining and moves all its queues elsewhere;
    /// returns the moved assignments. All or nothing: fails with
    /// `FailedPrecondition` (changing nothing) if any queue finds no room.
    pub fn drain_server(&self, id: &str, now_ms: u64) -> Result<Vec<Assignment>, ControlError> {
        self.mutate(|st, policy, events| {
            let s = Self::live_server(st, id)?;
            s.draining = true;
            st.evacuate(policy, id, now_ms, "drain", true, events)
        })
    }

    /// One rebalance round of the policy.
    pub fn rebalance(&self, now_ms: u64) -> Result<Vec<Assignment>, ControlError> {
        // Cheap check first, so a balanced cluster costs no snapshot write.
        let moves = self.policy.rebalance(&self.lock().view(now_ms));
        if moves.is_empty() {
            return Ok(Vec::new());
        }
        self.mutate(|st, policy, events| {
            let moves = policy.rebalance(&st.view(now_ms));
            let mut out = Vec::new();
            for m in moves {
                st.set_slot(&m.key, Some(m.to), now_ms, "rebalance", events);
                if let Some(a) = st.assignments.get(&m.key) {
                    out.push(a.clone());
                }
            }
            st.counters.moves += out.len() as u64;
            st.counters.rebalance_moves += out.len() as u64;
            Ok(out)
        })
    }

    /// Marks servers whose lease ran out as dead and moves their queues to
    /// survivors (queues with no room wait, unassigned). Returns dead server ids.
    pub fn expire_leases(&self, now_ms: u64) -> Result<Vec<String>, ControlError> {
        let any = self
            .lock()
            .servers
            .values()
            .any(|s| s.alive && s.lease_expires_ms <= now_ms);
        if !any {
            return Ok(Vec::new());
        }
        self.mutate(|st, policy, events| {
            let dead: Vec<String> = st
                .servers
                .values()
                .filter(|s| s.alive && s.lease_expires_ms <= now_ms)
                .map(|s| s.id.clone())
                .collect();
            for id in &dead {
                if let Some(s) = st.servers.get_mut(id) {
                    s.alive = false;
                    s.load.iter_mut().for_each(|l| *l = CoreLoad::default());
                }
                tracing::warn!(server = %id, "lease expired, failing over its queues");
            }
            for id in &dead {
                st.evacuate(policy, id, now_ms, "failover", false, events)?;
                st.counters.failovers += 1;
            }
            Ok(dead)
        })
    }

    /// Every known server (dead ones included) with the number of queues
    /// assigned to it.
    pub fn servers(&self) -> Vec<(Server, u32)> {
        let st = self.lock();
        st.servers
            .values()
            .map(|s| {
                let n = st
                    .assignments
                    .values()
                    .filter(|a| a.slot.as_ref().is_some_and(|x| x.server == s.id))
                    .count() as u32;
                (s.clone(), n)
            })
            .collect()
    }

    /// Every attached device.
    pub fn devices(&self) -> Vec<Device> {
        self.lock().devices.values().cloned().collect()
    }

    /// Every queue's assignment, unplaced ones included.
    pub fn assignments(&self) -> Vec<Assignment> {
        self.lock().assignments.values().cloned().collect()
    }

    /// Current totals.
    pub fn stats(&self) -> Stats {
        let st = self.lock();
        Stats {
            servers: st.servers.len() as u32,
            alive_servers: st.servers.values().filter(|s| s.alive).count() as u32,
            devices: st.devices.len() as u32,
            queues: st.assignments.len() as u32,
            unassigned_queues: st.assignments.values().filter(|a| a.slot.is_none()).count() as u32,
            counters: st.counters.clone(),
        }
    }

    /// Current assignments plus a receiver for every later change, taken
    /// atomically so a watcher misses nothing and sees nothing twice.
    pub fn subscribe(&self) -> (Vec<Assignment>, broadcast::Receiver<Event>) {
        let st = self.lock();
        let rx = self.events.subscribe();
        (st.assignments.values().cloned().collect(), rx)
    }

    /// Sets device `device`'s interposition policy to `spec`, already
    /// checked ([`crate::policy::check`]); no stages clears it. Saved
    /// before it takes effect, then announced to policy watchers
    /// ([`Controller::subscribe_policies`]). Setting the policy in force
    /// again, or clearing none, changes nothing (the stages' counters on the
    /// servers keep counting). The device need not be attached: its queues
    /// pick the policy up when they attach, and detaching a device keeps
    /// its policy. Fails with `InvalidArgument` for a bad device name.
    pub fn set_device_policy(
        &self,
        device: &str,
        spec: vrio_core::interpose::PolicySpec,
    ) -> Result<PolicySet, ControlError> {
        check_device_name(device)?;
        let mut live = self.lock();
        let current = live.policies.get(device);
        let unchanged = match current {
            Some(p) => p.spec == spec,
            None => spec.stages.is_empty(),
        };
        if unchanged {
            return Ok(PolicySet {
                version: current.map_or(live.policy_version, |p| p.version),
                policy: current.cloned(),
            });
        }
        let mut next = live.clone();
        next.policy_version += 1;
        let version = next.policy_version;
        let (event, policy) = if spec.stages.is_empty() {
            next.policies.remove(device);
            let e = PolicyEvent::Cleared {
                device: device.to_string(),
                version,
            };
            (e, None)
        } else {
            let p = DevicePolicy {
                device: device.to_string(),
                version,
                spec,
            };
            next.policies.insert(device.to_string(), p.clone());
            (PolicyEvent::Set(p.clone()), Some(p))
        };
        self.store.save(&next.snapshot())?;
        *live = next;
        match &policy {
            Some(p) => tracing::info!(
                device,
                version,
                stages = %p.spec.summary(),
                "interposition policy set"
            ),
            None => tracing::info!(device, version, "interposition policy cleared"),
        }
        // Sent under the lock so watchers see changes in commit order.
        let _ = self.policy_events.send(event);
        Ok(PolicySet { version, policy })
    }

    /// Device `device`'s policy, keys included; None when it has none.
    pub fn device_policy(&self, device: &str) -> Option<DevicePolicy> {
        self.lock().policies.get(device).cloned()
    }

    /// Every device's policy, keys included, by device name.
    pub fn policies(&self) -> Vec<DevicePolicy> {
        self.lock().policies.values().cloned().collect()
    }

    /// Every current policy plus a receiver for every later change, taken
    /// atomically as [`Controller::subscribe`] does.
    pub fn subscribe_policies(&self) -> (Vec<DevicePolicy>, broadcast::Receiver<PolicyEvent>) {
        let st = self.lock();
        let rx = self.policy_events.subscribe();
        (st.policies.values().cloned().collect(), rx)
    }

    /// Keeps `reports` (device key to its stages, as the server's
    /// `Policies::reports()`) as server `server`'s latest, received at
    /// `now_ms`, replacing its previous report. In memory only. Reports
    /// beyond [`MAX_REPORTED_DEVICES`] devices or [`MAX_REPORTED_ITEMS`]
    /// stages are dropped. Fails with `NotFound` for an unknown server.
    pub fn record_stage_reports(
        &self,
        server: &str,
        reports: Vec<(u64, Vec<StageReport>)>,
        now_ms: u64,
    ) -> Result<(), ControlError> {
        if !self.lock().servers.contains_key(server) {
            return Err(ControlError::NotFound(format!("server {server}")));
        }
        if reports.len() > MAX_REPORTED_DEVICES {
            tracing::warn!(
                server,
                devices = reports.len(),
                kept = MAX_REPORTED_DEVICES,
                "stage report too large; dropping the rest"
            );
        }
        let devices = reports
            .into_iter()
            .take(MAX_REPORTED_DEVICES)
            .map(|(k, mut stages)| {
                stages.truncate(MAX_REPORTED_ITEMS);
                (k, stages)
            })
            .collect();
        self.stage_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                server.to_string(),
                ServerReports {
                    at_ms: now_ms,
                    devices,
                },
            );
        Ok(())
    }

    /// What each live server last reported for device `device`'s stages,
    /// by server id.
    pub fn stage_reports(&self, device: &str) -> Vec<ServerStageReport> {
        let key = vrio_core::remote::device_key(device);
        let alive: Vec<String> = self
            .lock()
            .servers
            .values()
            .filter(|s| s.alive)
            .map(|s| s.id.clone())
            .collect();
        let reports = self.stage_reports.lock().unwrap_or_else(|p| p.into_inner());
        alive
            .into_iter()
            .filter_map(|id| {
                let r = reports.get(&id)?;
                let stages = r.devices.get(&key)?.clone();
                Some(ServerStageReport {
                    server: id,
                    at_ms: r.at_ms,
                    stages,
                })
            })
            .collect()
    }
}

/// Parses the wire device type.
pub fn device_kind(t: i32) -> Result<DeviceKind, ControlError> {
    match crate::pb::DeviceType::try_from(t) {
        Ok(crate::pb::DeviceType::Blk) => Ok(DeviceKind::Blk),
        Ok(crate::pb::DeviceType::Net) => Ok(DeviceKind::Net),
        _ => Err(bad("device type must be BLK or NET")),
    }
}
