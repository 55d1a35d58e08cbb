//! A connected RC endpoint: one QP, one CQ for both queues, a completion
//! channel, and the rdma_cm identifier that set the connection up.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_mummy_sys::{
    ibv_ack_cq_events, ibv_cq, ibv_get_cq_event, ibv_poll_cq, ibv_post_recv, ibv_recv_wr,
    ibv_req_notify_cq, ibv_sge, ibv_wc,
};
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue};
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState, SetInlineData,
    SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;
use sideway::rdmacm::communication_manager::Identifier;

use super::cm::{CmEvent, CmHub};
use super::region::contains;
use super::status::map_status;
use super::DomainInner;
use crate::api::{
    Completion, Endpoint, EndpointConfig, FabricError, Opcode, RecvRequest, SendRequest, WcOpcode,
    WcStatus,
};

/// ACK timeout exponent: 4.096 µs * 2^17 = 0.54 s. Soft-RoCE under TCG
/// takes milliseconds per operation and retransmits; this stays far above
/// that while a dead peer is still found in a few seconds (7 retries).
const ACK_TIMEOUT: u8 = 17;
const RETRY_COUNT: u8 = 7;
/// 7 = retry forever on "receiver not ready".
const RNR_RETRY: u8 = 7;
const POLL_BATCH: usize = 32;

/// Reused receive WR list (no allocation per post).
struct RecvScratch {
    wrs: Vec<ibv_recv_wr>,
    sges: Vec<ibv_sge>,
}

// SAFETY: the raw pointers inside only point into the two vectors themselves;
// they are rebuilt on every post and never dereferenced outside `post_recv`.
unsafe impl Send for RecvScratch {}

#[derive(Debug, Clone, Copy)]
struct Posted {
    wr_id: u64,
    op: WcOpcode,
    len: u32,
    signaled: bool,
}

/// A verbs RC endpoint: one QP, its completion queue and completion
/// channel, connected through rdma_cm.
pub struct VerbsEndpoint {
    // Field order is drop order: the QP before its CQ, the CQ before its
    // channel, all of them before the PD (held by `domain`).
    qp: ExtendedQueuePair,
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    id: Arc<Identifier>,
    token: u64,
    hub: Arc<CmHub>,
    epoll: OwnedFd,
    domain: Arc<DomainInner>,
    max_inline: u32,
    /// Send WRs not yet known complete, in post order (RC completes in order).
    sq: VecDeque<Posted>,
    rq: VecDeque<Posted>,
    /// Completions read by `wait` and not yet handed out by `poll`.
    pending: VecDeque<Completion>,
    wcs: Vec<ibv_wc>,
    recv: RecvScratch,
    dead: bool,
    disconnected: bool,
    empty_polls: u32,
    peer: String,
}

/// Creates the CQ, its channel and the QP, and moves the QP to INIT.
pub(super) struct Parts {
    qp: ExtendedQueuePair,
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    max_inline: u32,
    cfg: EndpointConfig,
}

fn verr(what: &str, e: impl std::fmt::Display) -> FabricError {
    FabricError::Verbs(format!("{what}: {e}"))
}

pub(super) fn create_parts(
    domain: &DomainInner,
    id: &Identifier,
    cfg: EndpointConfig,
) -> Result<Parts, FabricError> {
    let channel = domain
        .ctx
        .create_comp_channel()
        .map_err(|e| verr("ibv_create_comp_channel", e))?;
    channel
        .set_nonblocking(true)
        .map_err(|e| verr("completion channel non-blocking", e))?;
    let cqe = cfg.send_depth.saturating_add(cfg.recv_depth).max(16);
    let cq = domain
        .ctx
        .create_cq_builder()
        .setup_cqe(cqe)
        .setup_comp_channel(&channel, 0)
        .build()
        .map_err(|e| verr("ibv_create_cq", e))?;
    let max_inline = cfg.max_inline.min(domain.max_inline_cap);
    let mut qp = domain
        .pd
        .create_qp_builder()
        .setup_max_send_wr(cfg.send_depth.max(1))
        .setup_max_recv_wr(cfg.recv_depth.max(1))
        .setup_max_send_sge(1)
        .setup_max_recv_sge(1)
        .setup_max_inline_data(max_inline)
        .setup_send_cq(cq.clone())
        .setup_recv_cq(cq.clone())
        .build_ex()
        .map_err(|e| verr("ibv_create_qp_ex", e))?;
    let mut attr = id
        .get_qp_attr(QueuePairState::Init)
        .map_err(|e| verr("rdma_init_qp_attr(INIT)", e))?;
    attr.setup_access_flags(
        AccessFlags::LocalWrite | AccessFlags::RemoteRead | AccessFlags::RemoteWrite,
    );
    qp.modify(&attr).map_err(|e| verr("modify QP to INIT", e))?;
    Ok(Parts {
        qp,
        cq,
        channel,
        max_inline,
        cfg,
    })
}

/// RTR then RTS, with attributes from rdma_cm plus vrio's timeouts.
pub(super) fn to_rts(parts: &mut Parts, id: &Identifier, rd_atomic: u8) -> Result<(), FabricError> {
    let mut attr = id
        .get_qp_attr(QueuePairState::ReadyToReceive)
        .map_err(|e| verr("rdma_init_qp_attr(RTR)", e))?;
    // rdma_cm negotiates 1 outstanding READ (sideway's fixed conn params);
    // both vrio sides raise it to the same device-bounded value.
    attr.setup_max_dest_read_atomic(rd_atomic);
    parts
        .qp
        .modify(&attr)
        .map_err(|e| verr("modify QP to RTR", e))?;
    let mut attr = id
        .get_qp_attr(QueuePairState::ReadyToSend)
        .map_err(|e| verr("rdma_init_qp_attr(RTS)", e))?;
    attr.setup_timeout(ACK_TIMEOUT)
        .setup_retry_cnt(RETRY_COUNT)
        .setup_rnr_retry(RNR_RETRY)
        .setup_max_read_atomic(rd_atomic);
    parts
        .qp
        .modify(&attr)
        .map_err(|e| verr("modify QP to RTS", e))?;
    Ok(())
}

pub(super) fn qp_number(parts: &Parts) -> u32 {
    parts.qp.qp_number()
}

impl VerbsEndpoint {
    pub(super) fn new(
        parts: Parts,
        id: Arc<Identifier>,
        token: u64,
        hub: Arc<CmHub>,
        domain: Arc<DomainInner>,
        peer: String,
    ) -> Result<Self, FabricError> {
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if efd < 0 {
            return Err(FabricError::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(efd) };
        for fd in [parts.channel.as_raw_fd(), hub.fd()] {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: fd as u64,
            };
            // SAFETY: both fds are open (owned by the channel and the hub,
            // which this endpoint keeps alive); `ev` lives across the call.
            let r = unsafe { libc::epoll_ctl(efd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            if r < 0 {
                return Err(FabricError::Io(std::io::Error::last_os_error()));
            }
        }
        let depth = parts.cfg.send_depth.max(1) as usize;
        let rdepth = parts.cfg.recv_depth.max(1) as usize;
        let mut ep = Self {
            qp: parts.qp,
            cq: parts.cq,
            channel: parts.channel,
            id,
            token,
            hub,
            epoll,
            domain,
            max_inline: parts.max_inline,
            sq: VecDeque::with_capacity(depth),
            rq: VecDeque::with_capacity(rdepth),
            pending: VecDeque::with_capacity(POLL_BATCH),
            // SAFETY: ibv_wc is plain old data; all-zero is a valid value.
            wcs: vec![unsafe { std::mem::zeroed::<ibv_wc>() }; POLL_BATCH],
            recv: RecvScratch {
                wrs: Vec::with_capacity(64),
                sges: Vec::with_capacity(64),
            },
            dead: false,
            disconnected: false,
            empty_polls: 0,
            peer,
        };
        ep.req_notify()?;
        Ok(ep)
    }

    fn raw_cq(&self) -> *mut ibv_cq {
        // SAFETY: the pointer is only used while `self.cq` is alive.
        unsafe { self.cq.cq().as_ptr() }
    }

    fn req_notify(&mut self) -> Result<(), FabricError> {
        // SAFETY: the CQ is alive (owned by self).
        let r = unsafe { ibv_req_notify_cq(self.raw_cq(), 0) };
        if r != 0 {
            return Err(verr(
                "ibv_req_notify_cq",
                std::io::Error::from_raw_os_error(r),
            ));
        }
        Ok(())
    }

    /// Reads and acks every pending completion-channel event.
    fn drain_channel(&mut self) {
        loop {
            let mut cq: *mut ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the channel is alive and non-blocking; the out
            // pointers point to locals.
            let r = unsafe {
                ibv_get_cq_event(self.channel.comp_channel().as_ptr(), &mut cq, &mut ctx)
            };
            if r != 0 {
                return;
            }
            // SAFETY: `cq` was just returned by ibv_get_cq_event: it is our
            // CQ (the only one on this channel), and the event is acked once.
            unsafe { ibv_ack_cq_events(cq, 1) };
        }
    }

    /// Looks for rdma_cm events; a disconnect moves the QP to the error
    /// state, which flushes every outstanding request.
    fn check_cm(&mut self) {
        if self.disconnected {
            return;
        }
        loop {
            match self.hub.poll_event(self.token) {
                Ok(Some(CmEvent::Disconnected)) | Ok(Some(CmEvent::Failed(..))) => {
                    tracing::debug!(peer = %self.peer, "peer disconnected: flushing");
                    self.disconnected = true;
                    self.enter_error_state();
                    return;
                }
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "rdma_cm poll failed");
                    return;
                }
            }
        }
    }

    fn enter_error_state(&mut self) {
        self.dead = true;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        if let Err(e) = self.qp.modify(&attr) {
            tracing::warn!(error = %e, "modify QP to ERR failed");
        }
    }

    fn complete_send(&mut self, wr_id: u64, ok: bool) -> (WcOpcode, u32) {
        // RC completes in post order: unsignalled requests ahead of this one
        // finished successfully without a completion of their own.
        while let Some(p) = self.sq.pop_front() {
            if p.wr_id == wr_id && (p.signaled || !ok) {
                return (p.op, p.len);
            }
        }
        (WcOpcode::Send, 0)
    }

    fn convert(&mut self, wc: &ibv_wc) -> Completion {
        use rdma_mummy_sys::ibv_wc_opcode as o;
        let status = map_status(wc.status);
        let ok = status == WcStatus::Success;
        let imm = if ok && wc.wc_flags & rdma_mummy_sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
            // SAFETY: IBV_WC_WITH_IMM says the union holds imm_data.
            Some(u32::from_be(unsafe {
                wc.imm_data_invalidated_rkey_union.imm_data
            }))
        } else {
            None
        };
        // On success the opcode says which queue; on error it is undefined,
        // so a receive is recognised by the head of the receive queue.
        let is_recv = if ok {
            wc.opcode & o::IBV_WC_RECV != 0
        } else {
            self.rq.front().is_some_and(|p| p.wr_id == wc.wr_id)
        };
        let (opcode, byte_len) = if is_recv {
            self.rq.pop_front();
            let op = if ok && wc.opcode == o::IBV_WC_RECV_RDMA_WITH_IMM {
                WcOpcode::RecvWithImm
            } else {
                WcOpcode::Recv
            };
            (op, if ok { wc.byte_len } else { 0 })
        } else {
            self.complete_send(wc.wr_id, ok)
        };
        if !ok {
            // Any error completion puts an RC QP in the error state.
            self.dead = true;
        }
        Completion {
            wr_id: wc.wr_id,
            status,
            opcode,
            byte_len,
            imm,
        }
    }

    fn poll_cq(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        let want = out.len().min(self.wcs.len());
        if want == 0 {
            return Ok(0);
        }
        // SAFETY: `wcs` has room for `want` entries; the CQ is alive.
        let n = unsafe { ibv_poll_cq(self.raw_cq(), want as i32, self.wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(verr("ibv_poll_cq", std::io::Error::from_raw_os_error(-n)));
        }
        for (i, slot) in out.iter_mut().take(n as usize).enumerate() {
            let wc = self.wcs[i];
            *slot = self.convert(&wc);
        }
        Ok(n as usize)
    }

    fn fill_pending(&mut self) -> Result<usize, FabricError> {
        let mut buf = [Completion::EMPTY; POLL_BATCH];
        let n = self.poll_cq(&mut buf)?;
        self.pending.extend(buf[..n].iter().copied());
        Ok(n)
    }
}

impl Drop for VerbsEndpoint {
    fn drop(&mut self) {
        if !self.disconnected {
            let _ = self.id.disconnect();
        }
        self.drain_channel();
        self.hub.forget(self.token);
    }
}

impl Endpoint for VerbsEndpoint {
    fn post_send(&mut self, wrs: &[SendRequest]) -> Result<(), FabricError> {
        if self.dead {
            return Err(FabricError::EndpointDead);
        }
        if wrs.is_empty() {
            return Ok(());
        }
        let table = Arc::clone(&self.domain.regions);
        let regions = table.read();
        let max_inline = self.max_inline;
        let mut guard = self.qp.start_post_send();
        for wr in wrs {
            let mut flags = WorkRequestFlags::none();
            if wr.signaled {
                flags |= WorkRequestFlags::Signaled;
            }
            let s = wr.local;
            // Inline only what provably lies in a live region of ours: the
            // copy happens here, and the NIC skips its lkey check for it.
            let inline = !matches!(wr.opcode, Opcode::Read { .. })
                && s.len <= max_inline
                && contains(&regions, s.lkey, s.addr, u64::from(s.len));
            if inline {
                flags |= WorkRequestFlags::Inline;
            }
            let h = guard.construct_wr(wr.wr_id, flags);
            let h = match wr.opcode {
                Opcode::Read { remote_addr, rkey } => h.setup_read(rkey, remote_addr),
                Opcode::Write { remote_addr, rkey } => h.setup_write(rkey, remote_addr),
                Opcode::WriteWithImm {
                    remote_addr,
                    rkey,
                    imm,
                } => h.setup_write_imm(rkey, remote_addr, imm.to_be()),
                Opcode::Send => h.setup_send(),
            };
            if inline {
                // SAFETY: `contains` checked under the table's read lock
                // (held until after posting) that addr..addr+len lies in a
                // registered region, whose memory the `register` contract
                // keeps mapped while the region is registered.
                let data =
                    unsafe { std::slice::from_raw_parts(s.addr as *const u8, s.len as usize) };
                h.setup_inline_data(data);
            } else {
                // SAFETY: the NIC checks lkey and bounds; a bad sge becomes
                // a LocalProtectionError completion, not memory unsafety.
                unsafe { h.setup_sge(s.lkey, s.addr, s.len) };
            }
        }
        let res = guard.post();
        drop(regions);
        match res {
            Ok(()) => {}
            Err(sideway::ibverbs::queue_pair::PostSendError::NotEnoughResources(_)) => {
                return Err(FabricError::QueueFull(self.sq.capacity()))
            }
            Err(e) => return Err(verr("ibv_wr_complete", e)),
        }
        for wr in wrs {
            self.sq.push_back(Posted {
                wr_id: wr.wr_id,
                op: wr.opcode.completion_opcode(),
                len: wr.local.len,
                signaled: wr.signaled,
            });
        }
        Ok(())
    }

    fn post_recv(&mut self, wrs: &[RecvRequest]) -> Result<(), FabricError> {
        if self.dead {
            return Err(FabricError::EndpointDead);
        }
        if wrs.is_empty() {
            return Ok(());
        }
        self.recv.wrs.clear();
        self.recv.sges.clear();
        for wr in wrs {
            self.recv.sges.push(ibv_sge {
                addr: wr.local.addr,
                length: wr.local.len,
                lkey: wr.local.lkey,
            });
        }
        for (i, wr) in wrs.iter().enumerate() {
            self.recv.wrs.push(ibv_recv_wr {
                wr_id: wr.wr_id,
                next: std::ptr::null_mut(),
                sg_list: &mut self.recv.sges[i],
                num_sge: 1,
            });
        }
        for i in 0..self.recv.wrs.len().saturating_sub(1) {
            let next: *mut ibv_recv_wr = &mut self.recv.wrs[i + 1];
            self.recv.wrs[i].next = next;
        }
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the WR list and its sges live in `self` for the call; the
        // QP is alive. The NIC checks each sge's lkey and bounds.
        let r =
            unsafe { ibv_post_recv(self.qp.qp().as_ptr(), self.recv.wrs.as_mut_ptr(), &mut bad) };
        if r != 0 {
            // Part of the list may have gone in; count those.
            let posted = if bad.is_null() {
                0
            } else {
                // SAFETY: `bad` points into `recv_wrs` (libibverbs contract).
                unsafe { bad.offset_from(self.recv.wrs.as_ptr()) }.max(0) as usize
            };
            self.note_recvs(&wrs[..posted.min(wrs.len())]);
            return Err(if r == libc::ENOMEM {
                FabricError::QueueFull(self.rq.capacity())
            } else {
                verr("ibv_post_recv", std::io::Error::from_raw_os_error(r))
            });
        }
        self.note_recvs(wrs);
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        let mut n = 0;
        while n < out.len() {
            match self.pending.pop_front() {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        while n < out.len() {
            let k = self.poll_cq(&mut out[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            // rdma_cm costs a syscall: look only now and then when idle.
            self.empty_polls = self.empty_polls.wrapping_add(1);
            if self.empty_polls % 64 == 0 {
                self.check_cm();
            }
        }
        Ok(n)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), FabricError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.pending.is_empty() || self.fill_pending()? > 0 {
                return Ok(());
            }
            self.check_cm();
            // Dead with nothing outstanding: no completion can come any more.
            if self.dead && self.sq.is_empty() && self.rq.is_empty() && self.fill_pending()? == 0 {
                return Err(FabricError::EndpointDead);
            }
            self.drain_channel();
            self.req_notify()?;
            // A completion may have landed before the CQ was armed.
            if self.fill_pending()? > 0 {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            super::cm::wait_readable(self.epoll.as_raw_fd(), left)?;
        }
    }

    fn notify_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn arm(&mut self) -> Result<(), FabricError> {
        self.drain_channel();
        self.check_cm();
        self.req_notify()
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}

impl VerbsEndpoint {
    fn note_recvs(&mut self, wrs: &[RecvRequest]) {
        for wr in wrs {
            self.rq.push_back(Posted {
                wr_id: wr.wr_id,
                op: WcOpcode::Recv,
                len: wr.local.len,
                signaled: true,
            });
        }
    }
}
