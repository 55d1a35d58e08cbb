//! One simulated RC queue pair: its send, receive and completion queues, the
//! RC error state, and the execution of one request against the peer.
//!
//! A send-queue entry lives through two steps: *execute* (the responder
//! does the work: data moves, the peer's receive is consumed, or the
//! request is refused) and *retire* (the requester learns the outcome and,
//! if signalled or failed, gets a completion). Between the two the request
//! is done at the peer but not yet known done here, as on a real fabric.

use std::collections::VecDeque;
use std::sync::Arc;

use super::memory::{copy, Keys};
use crate::access::Need;
use crate::api::{
    Completion, EndpointConfig, FabricError, Opcode, RecvRequest, SendRequest, WcOpcode, WcStatus,
};
use crate::eventfd::EventFd;

/// `ibv_wc_status` IBV_WC_LOC_LEN_ERR: a message longer than the receive
/// (what `soft` reports too).
const LOC_LEN_ERR: u32 = 1;

#[derive(Debug, Clone, Copy)]
pub(crate) struct SqEntry {
    pub(crate) wr: SendRequest,
    /// Set once executed: the status its completion will carry.
    pub(crate) outcome: Option<WcStatus>,
    /// RNR NAKs it received so far.
    pub(crate) rnr: u32,
}

/// What executing one request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exec {
    /// Ran (or failed locally, without the peer noticing): the requester's
    /// outcome.
    Done(WcStatus),
    /// The responder refused it and must enter the error state.
    Refused(WcStatus),
    /// No receive at the responder; retry later.
    Rnr,
}

/// The state of one endpoint.
#[derive(Debug)]
pub(crate) struct Qp {
    pub(crate) domain: usize,
    /// The other end; `None` once it was dropped.
    pub(crate) peer: Option<u32>,
    pub(crate) sq: VecDeque<SqEntry>,
    sq_depth: usize,
    pub(crate) rq: VecDeque<RecvRequest>,
    rq_depth: usize,
    cq: VecDeque<Completion>,
    /// RC error state: everything outstanding was flushed.
    pub(crate) dead: bool,
    /// One of our requests failed to execute: execute no more, flush them
    /// when the failure retires.
    pub(crate) halted: bool,
    /// The peer broke or closed the connection; we notice at a later step.
    pub(crate) link_down: bool,
    /// The harness stopped our send queue (a slow peer).
    pub(crate) paused: bool,
    armed: bool,
    pub(crate) notify: Arc<EventFd>,
}

impl Qp {
    pub(crate) fn new(domain: usize, peer: u32, cfg: EndpointConfig) -> Result<Self, FabricError> {
        Ok(Self {
            domain,
            peer: Some(peer),
            sq: VecDeque::new(),
            sq_depth: cfg.send_depth.max(1) as usize,
            rq: VecDeque::new(),
            rq_depth: cfg.recv_depth.max(1) as usize,
            cq: VecDeque::new(),
            dead: false,
            halted: false,
            link_down: false,
            paused: false,
            armed: false,
            notify: Arc::new(EventFd::new()?),
        })
    }

    /// Index of the oldest request not executed yet.
    pub(crate) fn first_pending(&self) -> Option<usize> {
        self.sq.iter().position(|e| e.outcome.is_none())
    }

    /// Whether an execute step applies to this endpoint.
    pub(crate) fn can_execute(&self) -> bool {
        !self.dead
            && !self.paused
            && !self.halted
            && !self.link_down
            && self.peer.is_some()
            && self.first_pending().is_some()
    }

    /// Whether a retire step applies (an executed request at the head, or a
    /// broken connection to notice).
    pub(crate) fn can_retire(&self) -> bool {
        !self.dead
            && !self.paused
            && (self.link_down || self.sq.front().is_some_and(|e| e.outcome.is_some()))
    }

    fn complete_sq(&mut self, wr: &SendRequest, status: WcStatus) {
        self.cq.extend(Completion::of_request(wr, status));
    }

    fn complete_recv(
        &mut self,
        r: RecvRequest,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u32,
        imm: Option<u32>,
    ) {
        self.cq.push_back(Completion {
            wr_id: r.wr_id,
            status,
            opcode,
            byte_len,
            imm,
        });
    }

    /// Pops the head request (which must be executed) and completes it;
    /// returns its `wr_id` and status.
    pub(crate) fn retire_head(&mut self) -> Option<(u64, WcStatus)> {
        let status = self.sq.front()?.outcome?;
        let e = self.sq.pop_front()?;
        self.complete_sq(&e.wr, status);
        Some((e.wr.wr_id, status))
    }

    /// Enters the RC error state as `soft` does: the head request gets
    /// `head` (if given), every other request and receive `Flushed`.
    pub(crate) fn enter_error(&mut self, head: Option<WcStatus>) {
        if self.dead {
            return;
        }
        self.dead = true;
        if let Some(s) = head {
            if let Some(e) = self.sq.pop_front() {
                self.complete_sq(&e.wr, s);
            }
        }
        while let Some(e) = self.sq.pop_front() {
            self.complete_sq(&e.wr, WcStatus::Flushed);
        }
        while let Some(r) = self.rq.pop_front() {
            self.complete_recv(r, WcStatus::Flushed, WcOpcode::Recv, 0, None);
        }
    }

    /// Queues a batch of requests, with `soft`'s rules: a dead endpoint
    /// flushes them, a batch that does not fit is refused whole.
    pub(crate) fn post_send(&mut self, wrs: &[SendRequest]) -> Result<(), FabricError> {
        if self.dead {
            // Posting to a QP in the error state flushes, as verbs does.
            for wr in wrs {
                self.cq.push_back(Completion::flushed(wr));
            }
            return Ok(());
        }
        if self.sq.len() + wrs.len() > self.sq_depth {
            return Err(FabricError::QueueFull(self.sq_depth));
        }
        self.sq.extend(wrs.iter().map(|&wr| SqEntry {
            wr,
            outcome: None,
            rnr: 0,
        }));
        Ok(())
    }

    /// Queues receives, with the same rules as [`Qp::post_send`].
    pub(crate) fn post_recv(&mut self, wrs: &[RecvRequest]) -> Result<(), FabricError> {
        if self.dead {
            for r in wrs {
                self.complete_recv(*r, WcStatus::Flushed, WcOpcode::Recv, 0, None);
            }
            return Ok(());
        }
        if self.rq.len() + wrs.len() > self.rq_depth {
            return Err(FabricError::QueueFull(self.rq_depth));
        }
        self.rq.extend(wrs.iter().copied());
        Ok(())
    }

    /// Moves up to `out.len()` completions out, oldest first.
    pub(crate) fn poll(&mut self, out: &mut [Completion]) -> usize {
        let n = out.len().min(self.cq.len());
        for (slot, c) in out.iter_mut().zip(self.cq.drain(..n)) {
            *slot = c;
        }
        n
    }

    /// What a non-blocking `wait` reports: `soft` fails a wait on a dead
    /// endpoint with nothing left to poll.
    pub(crate) fn wait(&self) -> Result<(), FabricError> {
        if self.cq.is_empty() && self.dead {
            return Err(FabricError::EndpointDead);
        }
        Ok(())
    }

    /// Re-arms the notify fd; completions already queued fire it at once.
    pub(crate) fn arm(&mut self) {
        self.notify.drain();
        self.armed = true;
        self.wake();
    }

    /// Fires the notify fd if armed and completions are queued.
    pub(crate) fn wake(&mut self) {
        if self.armed && !self.cq.is_empty() {
            self.armed = false;
            self.notify.signal();
        }
    }
}

/// Executes `wr` of an endpoint in domain `local_domain` against its peer
/// `peer`, as `soft`'s responder does: local sge first (a failure there is
/// `LocalProtectionError` and the peer never hears of it), then the remote
/// key, range and access (`RemoteAccessError`), then the peer's receive for
/// SEND and WRITE_WITH_IMM (none: RNR, `RnrRetryExceeded` once
/// `rnr_exhausted`; too small or invalid: `RemoteOperationError`, the
/// receive completing `Other(1)` or `LocalProtectionError`).
pub(crate) fn execute(
    keys: &[Keys],
    local_domain: usize,
    peer: &mut Qp,
    wr: &SendRequest,
    rnr_exhausted: bool,
) -> Exec {
    let (Some(lkeys), Some(rkeys)) = (keys.get(local_domain), keys.get(peer.domain)) else {
        return Exec::Done(WcStatus::LocalProtectionError);
    };
    let len = u64::from(wr.local.len);
    let need = match wr.opcode {
        Opcode::Read { .. } => Need::LocalWrite,
        _ => Need::LocalRead,
    };
    let Some(local) = lkeys.check(wr.local.lkey, wr.local.addr, len, need) else {
        return Exec::Done(WcStatus::LocalProtectionError);
    };
    let rnr = if rnr_exhausted {
        Exec::Refused(WcStatus::RnrRetryExceeded)
    } else {
        Exec::Rnr
    };
    let remote_access = Exec::Refused(WcStatus::RemoteAccessError);
    match wr.opcode {
        Opcode::Read { remote_addr, rkey } => {
            let Some(remote) = rkeys.check(rkey, remote_addr, len, Need::RemoteRead) else {
                return remote_access;
            };
            copy(remote, local);
        }
        Opcode::Write { remote_addr, rkey } => {
            let Some(remote) = rkeys.check(rkey, remote_addr, len, Need::RemoteWrite) else {
                return remote_access;
            };
            copy(local, remote);
        }
        Opcode::WriteWithImm {
            remote_addr,
            rkey,
            imm,
        } => {
            let Some(remote) = rkeys.check(rkey, remote_addr, len, Need::RemoteWrite) else {
                return remote_access;
            };
            let Some(r) = peer.rq.pop_front() else {
                return rnr;
            };
            // The data is in place before the immediate is visible.
            copy(local, remote);
            let imm = Some(imm);
            peer.complete_recv(
                r,
                WcStatus::Success,
                WcOpcode::RecvWithImm,
                wr.local.len,
                imm,
            );
        }
        Opcode::Send => {
            let Some(r) = peer.rq.pop_front() else {
                return rnr;
            };
            let dst = if r.local.len < wr.local.len {
                Err(WcStatus::Other(LOC_LEN_ERR))
            } else {
                rkeys
                    .check(r.local.lkey, r.local.addr, len, Need::LocalWrite)
                    .ok_or(WcStatus::LocalProtectionError)
            };
            match dst {
                Ok(dst) => {
                    copy(local, dst);
                    peer.complete_recv(r, WcStatus::Success, WcOpcode::Recv, wr.local.len, None);
                }
                Err(s) => {
                    peer.complete_recv(r, s, WcOpcode::Recv, 0, None);
                    return Exec::Refused(WcStatus::RemoteOperationError);
                }
            }
        }
    }
    Exec::Done(WcStatus::Success)
}
