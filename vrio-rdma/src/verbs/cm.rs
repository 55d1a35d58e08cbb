//! rdma_cm event channel shared by a listener and the endpoints it accepts.
//!
//! sideway cannot migrate an accepted `rdma_cm_id` to its own channel, so the
//! events of every accepted connection arrive on the listener's channel. The
//! hub reads them (non-blocking) and sorts them per identifier; whoever pumps
//! first files the events for the others.

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sideway::rdmacm::communication_manager::{
    EventChannel, EventType, GetEventErrorKind, Identifier,
};

use crate::api::FabricError;

/// The connection events vrio cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmEvent {
    /// `rdma_resolve_addr` finished.
    AddrResolved,
    /// `rdma_resolve_route` finished.
    RouteResolved,
    /// The passive side answered a connect request.
    ConnectResponse,
    /// The connection is up.
    Established,
    /// The connection went down (disconnect or time-wait exit).
    Disconnected,
    /// Address, route, connect errors, unreachable, rejected, device removal.
    Failed(&'static str, i32),
    /// An event vrio does not act on.
    Other,
}

fn classify(t: EventType, status: i32) -> CmEvent {
    match t {
        EventType::AddressResolved => CmEvent::AddrResolved,
        EventType::RouteResolved => CmEvent::RouteResolved,
        EventType::ConnectResponse => CmEvent::ConnectResponse,
        EventType::Established => CmEvent::Established,
        EventType::Disconnected | EventType::TimewaitExit => CmEvent::Disconnected,
        EventType::AddressError => CmEvent::Failed("address resolution failed", status),
        EventType::RouteError => CmEvent::Failed("route resolution failed", status),
        EventType::ConnectError => CmEvent::Failed("connect error", status),
        EventType::Unreachable => CmEvent::Failed("peer unreachable", status),
        EventType::Rejected => CmEvent::Failed("rejected by peer (nobody listening?)", status),
        EventType::DeviceRemoval => CmEvent::Failed("RDMA device removed", status),
        _ => CmEvent::Other,
    }
}

#[derive(Default)]
struct HubState {
    requests: VecDeque<Arc<Identifier>>,
    /// Tokens of identifiers whose events are still wanted.
    live: HashSet<u64>,
    /// (identifier token, event)
    events: Vec<(u64, CmEvent)>,
}

/// Identifier tokens are never reused, so a late event of a closed
/// connection can never be taken for one of a new connection.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// One rdma_cm event channel and the events read from it, filed per
/// identifier token (see the module docs).
pub struct CmHub {
    channel: Arc<EventChannel>,
    state: Mutex<HubState>,
}

fn token_of(id: &Identifier) -> Option<u64> {
    id.get_context::<u64>().map(|t| *t)
}

/// Maps an rdma_cm/ibverbs errno to a fabric error; ENODEV and ENOSYS mean
/// "no RDMA device here".
pub fn os_error(what: &str, e: &std::io::Error) -> FabricError {
    match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::ENOSYS) => FabricError::NoDevice(format!(
            "{what}: {e}; this host has no RDMA device (load rdma_rxe and `rdma link add` for Soft-RoCE, or use the soft back-end)"
        )),
        // rdma-mummy-sys stubs answer EOPNOTSUPP when librdmacm.so.1 or
        // libibverbs.so.1 cannot be loaded.
        Some(libc::EOPNOTSUPP) => FabricError::NoDevice(format!(
            "{what}: {e}; librdmacm.so.1/libibverbs.so.1 not loadable (install rdma-core and ibverbs-providers)"
        )),
        _ => FabricError::Verbs(format!("{what}: {e}")),
    }
}

impl CmHub {
    /// Creates a non-blocking event channel. Fails with
    /// [`FabricError::NoDevice`] when rdma_cm is unavailable.
    pub fn new() -> Result<Arc<Self>, FabricError> {
        let channel = EventChannel::new().map_err(|e| {
            let io = match &e.0 {
                sideway::rdmacm::communication_manager::CreateEventChannelErrorKind::Rdmacm(io) => {
                    std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(libc::EIO))
                }
                #[allow(unreachable_patterns)]
                _ => std::io::Error::other(e.to_string()),
            };
            os_error("rdma_create_event_channel", &io)
        })?;
        channel
            .set_nonblocking(true)
            .map_err(|e| FabricError::Verbs(format!("cm channel non-blocking: {e}")))?;
        Ok(Arc::new(Self {
            channel,
            state: Mutex::new(HubState::default()),
        }))
    }

    /// The channel, to create identifiers on.
    pub fn channel(&self) -> &Arc<EventChannel> {
        &self.channel
    }

    /// The channel's fd; readable when events are queued.
    pub fn fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads every queued event without blocking and files it.
    fn pump(&self, st: &mut HubState) -> Result<(), FabricError> {
        loop {
            let ev = match self.channel.get_cm_event() {
                Ok(ev) => ev,
                Err(e) => match e.0 {
                    GetEventErrorKind::NoEvent => return Ok(()),
                    GetEventErrorKind::Rdmacm(io) => {
                        return Err(FabricError::Verbs(format!("rdma_get_cm_event: {io}")))
                    }
                    #[allow(unreachable_patterns)]
                    _ => return Err(FabricError::Verbs("rdma_get_cm_event failed".into())),
                },
            };
            let t = ev.event_type();
            let status = ev.status();
            tracing::debug!(event = ?t, status, "rdma_cm event");
            if t == EventType::ConnectRequest {
                if let Some(id) = ev.cm_id() {
                    st.requests.push_back(id);
                }
            } else if let Some(tok) = ev.cm_id().and_then(|id| token_of(&id)) {
                if st.live.contains(&tok) {
                    st.events.push((tok, classify(t, status)));
                }
            }
            // Ack drops the event's references to the identifiers.
            ev.ack()
                .map_err(|e| FabricError::Verbs(format!("rdma_ack_cm_event: {e}")))?;
        }
    }

    /// Starts filing events for `id`; returns its token.
    pub fn track(&self, id: &Identifier) -> u64 {
        let tok = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        id.setup_context(tok);
        self.lock().live.insert(tok);
        tok
    }

    /// Takes the first filed event of `tok`, after reading new ones.
    pub fn poll_event(&self, tok: u64) -> Result<Option<CmEvent>, FabricError> {
        let mut st = self.lock();
        self.pump(&mut st)?;
        let pos = st.events.iter().position(|(t, _)| *t == tok);
        Ok(pos.map(|p| st.events.remove(p).1))
    }

    /// Stops filing events for an identifier that is going away.
    pub fn forget(&self, tok: u64) {
        let mut st = self.lock();
        st.live.remove(&tok);
        st.events.retain(|(t, _)| *t != tok);
    }

    /// Blocks until `id` gets an event other than `Other`.
    pub fn wait_event(&self, tok: u64, timeout: Duration) -> Result<CmEvent, FabricError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.poll_event(tok)? {
                Some(CmEvent::Other) => continue,
                Some(ev) => return Ok(ev),
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FabricError::Verbs(format!(
                    "no rdma_cm event within {timeout:?}"
                )));
            }
            wait_readable(self.fd(), left.min(Duration::from_millis(100)))?;
        }
    }

    /// The next connection request, waiting at most `timeout`; None if
    /// none came.
    pub fn next_request(&self, timeout: Duration) -> Result<Option<Arc<Identifier>>, FabricError> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut st = self.lock();
                self.pump(&mut st)?;
                if let Some(id) = st.requests.pop_front() {
                    return Ok(Some(id));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            wait_readable(self.fd(), left.min(Duration::from_millis(200)))?;
        }
    }
}

/// `poll(2)` on one fd for readability; `Ok(false)` on timeout.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> Result<bool, FabricError> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one valid pollfd on our stack and nfds is 1.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(FabricError::Io(e));
    }
    Ok(r > 0)
}
