//! The whole simulated network behind one lock: the domains' key tables,
//! the endpoints, named listeners, and the step machinery.
//!
//! A *step* is one of the actions [`Net::actions`] lists, in a fixed order
//! (endpoints by id; execute before retire), so that the harness's rng is
//! the only source of choice.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::memory::{Keys, RegionKeys, MAX_DOMAINS};
use super::qp::{execute, Exec, Qp};
use super::trace::{SimEndpointId, SimEvent, SimOp, SimStats};
use crate::api::{
    Access, Completion, EndpointConfig, FabricError, RecvRequest, SendRequest, WcStatus,
};
use crate::eventfd::EventFd;
use crate::soft::wire::MAX_MESSAGE;

/// The handle every sim object shares.
pub(crate) type Shared = Arc<Mutex<Net>>;

/// Locks the network. No update leaves it torn, so poison is ignored.
pub(crate) fn lock(net: &Shared) -> MutexGuard<'_, Net> {
    net.lock().unwrap_or_else(|e| e.into_inner())
}

/// RNR NAKs a SEND or WRITE_WITH_IMM survives by default.
pub(crate) const DEFAULT_RNR_RETRIES: u32 = 7;

/// One schedulable step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Execute the endpoint's oldest unexecuted request.
    Execute(u32),
    /// Retire its oldest executed request, or notice a broken connection.
    Retire(u32),
}

/// What a new endpoint's handle needs.
#[derive(Debug, Clone)]
pub(crate) struct NewEndpoint {
    pub(crate) id: u32,
    pub(crate) peer: u32,
    pub(crate) notify: Arc<EventFd>,
}

#[derive(Debug)]
struct Listening {
    domain: usize,
    cfg: EndpointConfig,
    /// Accepted-side endpoints waiting for `accept`.
    backlog: VecDeque<NewEndpoint>,
}

/// The network's state.
#[derive(Debug)]
pub(crate) struct Net {
    keys: Vec<Keys>,
    eps: BTreeMap<u32, Qp>,
    next_ep: u32,
    listeners: BTreeMap<String, Listening>,
    trace: Vec<SimEvent>,
    stats: SimStats,
    rnr_retries: u32,
}

fn no_such(id: u32) -> FabricError {
    FabricError::InvalidRequest(format!("no simulated endpoint ep{id}"))
}

impl Net {
    pub(crate) fn new() -> Self {
        Self {
            keys: Vec::new(),
            eps: BTreeMap::new(),
            next_ep: 0,
            listeners: BTreeMap::new(),
            trace: Vec::new(),
            stats: SimStats::default(),
            rnr_retries: DEFAULT_RNR_RETRIES,
        }
    }

    pub(crate) fn new_domain(&mut self) -> Result<usize, FabricError> {
        let d = self.keys.len();
        if d >= MAX_DOMAINS {
            return Err(FabricError::InvalidRequest(format!(
                "a simulated network holds at most {MAX_DOMAINS} domains"
            )));
        }
        self.keys.push(Keys::new(d));
        Ok(d)
    }

    pub(crate) fn register(
        &mut self,
        domain: usize,
        addr: u64,
        len: u64,
        access: Access,
    ) -> Result<RegionKeys, FabricError> {
        self.keys
            .get_mut(domain)
            .ok_or_else(|| FabricError::Register(format!("no simulated domain {domain}")))?
            .register(addr, len, access)
    }

    pub(crate) fn deregister(&mut self, domain: usize, lkey: u32) {
        if let Some(k) = self.keys.get_mut(domain) {
            k.deregister(lkey);
        }
    }

    /// Two connected endpoints, in domains `a` and `b`.
    pub(crate) fn new_pair(
        &mut self,
        (a, cfg_a): (usize, EndpointConfig),
        (b, cfg_b): (usize, EndpointConfig),
    ) -> Result<(NewEndpoint, NewEndpoint), FabricError> {
        if a >= self.keys.len() || b >= self.keys.len() {
            return Err(FabricError::InvalidRequest(
                "the domain belongs to another simulated network".into(),
            ));
        }
        let ia = self.next_ep;
        let (Some(ib), Some(next)) = (ia.checked_add(1), ia.checked_add(2)) else {
            return Err(FabricError::InvalidRequest(
                "the simulated network ran out of endpoint ids".into(),
            ));
        };
        let qa = Qp::new(a, ib, cfg_a)?;
        let qb = Qp::new(b, ia, cfg_b)?;
        let na = NewEndpoint {
            id: ia,
            peer: ib,
            notify: Arc::clone(&qa.notify),
        };
        let nb = NewEndpoint {
            id: ib,
            peer: ia,
            notify: Arc::clone(&qb.notify),
        };
        self.eps.insert(ia, qa);
        self.eps.insert(ib, qb);
        self.next_ep = next;
        Ok((na, nb))
    }

    /// The application dropped endpoint `id`: the peer notices at a later
    /// step, as it would see a closed socket.
    pub(crate) fn close(&mut self, id: u32) {
        let Some(q) = self.eps.remove(&id) else {
            return;
        };
        if let Some(p) = q.peer.and_then(|p| self.eps.get_mut(&p)) {
            p.peer = None;
            p.link_down = true;
        }
    }

    pub(crate) fn listen(
        &mut self,
        name: &str,
        domain: usize,
        cfg: EndpointConfig,
    ) -> Result<(), FabricError> {
        if self.listeners.contains_key(name) {
            return Err(FabricError::Connect {
                addr: name.into(),
                reason: "address in use".into(),
            });
        }
        self.listeners.insert(
            name.into(),
            Listening {
                domain,
                cfg,
                backlog: VecDeque::new(),
            },
        );
        Ok(())
    }

    pub(crate) fn unlisten(&mut self, name: &str) {
        if let Some(l) = self.listeners.remove(name) {
            for e in l.backlog {
                self.close(e.id);
            }
        }
    }

    pub(crate) fn connect(
        &mut self,
        name: &str,
        domain: usize,
        cfg: EndpointConfig,
    ) -> Result<NewEndpoint, FabricError> {
        let (ldom, lcfg) = match self.listeners.get(name) {
            Some(l) => (l.domain, l.cfg),
            None => {
                return Err(FabricError::Connect {
                    addr: name.into(),
                    reason: "connection refused (no simulated listener by that name)".into(),
                })
            }
        };
        let (mine, theirs) = self.new_pair((domain, cfg), (ldom, lcfg))?;
        if let Some(l) = self.listeners.get_mut(name) {
            l.backlog.push_back(theirs);
        }
        Ok(mine)
    }

    pub(crate) fn accept(&mut self, name: &str) -> Result<NewEndpoint, FabricError> {
        self.listeners
            .get_mut(name)
            .and_then(|l| l.backlog.pop_front())
            .ok_or_else(|| FabricError::Connect {
                addr: name.into(),
                reason: "no pending connection (the simulated fabric never blocks)".into(),
            })
    }

    fn qp(&mut self, id: u32) -> Result<&mut Qp, FabricError> {
        self.eps.get_mut(&id).ok_or_else(|| no_such(id))
    }

    pub(crate) fn post_send(&mut self, id: u32, wrs: &[SendRequest]) -> Result<(), FabricError> {
        if let Some(wr) = wrs.iter().find(|wr| wr.local.len > MAX_MESSAGE) {
            return Err(FabricError::InvalidRequest(format!(
                "wr {}: {} bytes exceeds the {MAX_MESSAGE} byte message limit",
                wr.wr_id, wr.local.len
            )));
        }
        let q = self.qp(id)?;
        let r = q.post_send(wrs);
        q.wake();
        r
    }

    pub(crate) fn post_recv(&mut self, id: u32, wrs: &[RecvRequest]) -> Result<(), FabricError> {
        let q = self.qp(id)?;
        let r = q.post_recv(wrs);
        q.wake();
        r
    }

    pub(crate) fn poll(&mut self, id: u32, out: &mut [Completion]) -> Result<usize, FabricError> {
        Ok(self.qp(id)?.poll(out))
    }

    pub(crate) fn wait(&mut self, id: u32) -> Result<(), FabricError> {
        self.qp(id)?.wait()
    }

    pub(crate) fn arm(&mut self, id: u32) -> Result<(), FabricError> {
        self.qp(id)?.arm();
        Ok(())
    }

    pub(crate) fn set_paused(&mut self, id: u32, paused: bool) -> Result<(), FabricError> {
        self.qp(id)?.paused = paused;
        Ok(())
    }

    pub(crate) fn set_rnr_retries(&mut self, n: u32) {
        self.rnr_retries = n;
    }

    pub(crate) fn trace(&self) -> &[SimEvent] {
        &self.trace
    }

    pub(crate) fn clear_trace(&mut self) {
        self.trace.clear();
    }

    pub(crate) fn stats(&self) -> SimStats {
        self.stats
    }

    /// Endpoint `id` enters the error state; its peer's link goes down.
    fn fail(&mut self, id: u32, head: Option<WcStatus>) {
        let peer = match self.eps.get_mut(&id) {
            Some(q) if !q.dead => {
                q.enter_error(head);
                q.wake();
                q.peer
            }
            _ => return,
        };
        if let Some(p) = peer.and_then(|p| self.eps.get_mut(&p)) {
            p.link_down = true;
        }
    }

    /// Cuts `id`'s connection at once: both ends enter the error state, the
    /// oldest outstanding request of each completing `RetryExceeded` (even
    /// one that executed: its acknowledgement is lost) and the rest
    /// `Flushed`.
    pub(crate) fn disconnect(&mut self, id: u32) -> Result<(), FabricError> {
        let peer = self.qp(id)?.peer;
        self.fail(id, Some(WcStatus::RetryExceeded));
        if let Some(p) = peer {
            self.fail(p, Some(WcStatus::RetryExceeded));
        }
        self.stats.disconnects += 1;
        self.trace.push(SimEvent::Disconnect {
            ep: SimEndpointId(id),
        });
        Ok(())
    }

    /// Every step that may run now, in a fixed order.
    pub(crate) fn actions(&self) -> Vec<Action> {
        let mut out = Vec::new();
        for (&id, q) in &self.eps {
            if q.can_execute() {
                out.push(Action::Execute(id));
            }
            if q.can_retire() {
                out.push(Action::Retire(id));
            }
        }
        out
    }

    /// Runs one step.
    pub(crate) fn apply(&mut self, a: Action) {
        self.stats.steps += 1;
        match a {
            Action::Execute(id) => self.execute(id),
            Action::Retire(id) => self.retire(id),
        }
    }

    fn execute(&mut self, id: u32) {
        let Net {
            keys,
            eps,
            rnr_retries,
            ..
        } = self;
        let Some(q) = eps.get(&id) else { return };
        let (Some(idx), Some(peer)) = (q.first_pending(), q.peer) else {
            return;
        };
        let (domain, e) = (q.domain, q.sq[idx]);
        let Some(pq) = eps.get_mut(&peer) else { return };
        let r = execute(keys, domain, pq, &e.wr, e.rnr >= *rnr_retries);
        pq.wake();
        let (ep, wr_id, op) = (SimEndpointId(id), e.wr.wr_id, SimOp::of(&e.wr.opcode));
        let Some(q) = self.eps.get_mut(&id) else {
            return;
        };
        let status = match r {
            Exec::Rnr => {
                q.sq[idx].rnr += 1;
                self.stats.rnr_naks += 1;
                self.trace.push(SimEvent::RnrNak { ep, wr_id });
                return;
            }
            Exec::Done(s) | Exec::Refused(s) => s,
        };
        q.sq[idx].outcome = Some(status);
        if status.is_ok() {
            self.stats.executed(op);
        } else {
            q.halted = true;
            self.stats.faults += 1;
        }
        self.trace.push(SimEvent::Execute {
            ep,
            wr_id,
            op,
            status,
        });
        if let Exec::Refused(_) = r {
            // The responder sent an error response: RC puts it in the
            // error state too.
            self.fail(peer, None);
        }
    }

    fn retire(&mut self, id: u32) {
        let ep = SimEndpointId(id);
        let Some(q) = self.eps.get_mut(&id) else {
            return;
        };
        match q.retire_head() {
            Some((wr_id, status)) => {
                q.wake();
                self.stats.retired += 1;
                self.trace.push(SimEvent::Retire { ep, wr_id, status });
                if !status.is_ok() {
                    self.fail(id, None);
                }
            }
            None if q.link_down => {
                self.stats.peers_lost += 1;
                self.trace.push(SimEvent::PeerLost { ep });
                self.fail(id, Some(WcStatus::RetryExceeded));
            }
            None => {}
        }
    }
}
