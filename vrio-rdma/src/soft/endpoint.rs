//! A soft reliable-connected endpoint: send, receive and completion queues
//! shared between the application and the endpoint's receive thread.
//!
//! The receive thread is the "NIC": it answers the peer's READs and applies
//! its WRITEs against this domain's registered memory (the application is
//! not involved), places data for this side's READs and SENDs, and retires
//! this side's requests in order as responses arrive. Responses arrive in
//! request order because both sides process one stream in order, which is
//! exactly RC's ordering guarantee.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cpu::FabricCpu;
use super::region::Registry;
use super::tx::{shutdown, Tx};
use super::wire::{Header, Kind, Status, HEADER_LEN, MAX_MESSAGE};
use crate::access::Need;
use crate::api::{
    Completion, Endpoint, EndpointConfig, FabricError, Opcode, RecvRequest, SendRequest, Sge,
    WcOpcode, WcStatus,
};
use crate::eventfd::EventFd;

/// How long a SEND or WRITE_WITH_IMM waits for the application to post a
/// receive (verbs: RNR retries) before it fails with `RnrRetryExceeded`.
const RNR_WAIT: Duration = Duration::from_secs(5);
const RX_BUF: usize = 256 << 10;
/// `ibv_wc_status` IBV_WC_LOC_LEN_ERR: a message longer than the receive.
const LOC_LEN_ERR: u32 = 1;

#[derive(Debug, Clone, Copy)]
struct SqEntry {
    wr_id: u64,
    op: WcOpcode,
    local: Sge,
    signaled: bool,
    /// Transmitted to the peer (else it waits for a local fault ahead).
    sent: bool,
    /// Failed local checks at post time.
    fault: bool,
}

struct State {
    /// RC error state: everything outstanding was flushed.
    dead: bool,
    /// The application dropped the endpoint.
    closing: bool,
    sq: VecDeque<SqEntry>,
    sq_depth: usize,
    rq: VecDeque<RecvRequest>,
    rq_depth: usize,
    cq: VecDeque<Completion>,
    armed: bool,
    waiters: usize,
    rnr_waiting: bool,
}

struct Shared {
    st: Mutex<State>,
    cq_cv: Condvar,
    rq_cv: Condvar,
    /// eventfd, written when completions arrive while armed.
    notify: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // State updates never leave it torn, so poison is ignored.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes whoever waits for completions (call after pushing some).
    fn wake(&self, st: &mut State) {
        if st.cq.is_empty() {
            return;
        }
        if st.waiters > 0 {
            self.cq_cv.notify_all();
        }
        if st.armed {
            st.armed = false;
            self.notify.signal();
        }
    }
}

fn wc_status(s: Status) -> WcStatus {
    match s {
        Status::Ok => WcStatus::Success,
        Status::RemoteAccess => WcStatus::RemoteAccessError,
        Status::RemoteOp => WcStatus::RemoteOperationError,
        Status::Rnr => WcStatus::RnrRetryExceeded,
    }
}

impl State {
    fn complete_sq(&mut self, e: SqEntry, status: WcStatus) {
        // Unsignalled requests complete only on error, as in verbs.
        if e.signaled || !status.is_ok() {
            self.cq.push_back(Completion {
                wr_id: e.wr_id,
                status,
                opcode: e.op,
                byte_len: e.local.len,
                imm: None,
            });
        }
    }

    fn complete_recv(
        &mut self,
        r: RecvRequest,
        status: WcStatus,
        op: WcOpcode,
        len: u32,
        imm: Option<u32>,
    ) {
        self.cq.push_back(Completion {
            wr_id: r.wr_id,
            status,
            opcode: op,
            byte_len: len,
            imm,
        });
    }

    /// Enters the RC error state: the head request (if `head` is given) gets
    /// that status, everything else outstanding is flushed.
    fn enter_error(&mut self, head: Option<WcStatus>) {
        if self.dead {
            return;
        }
        self.dead = true;
        if let Some(s) = head {
            if let Some(e) = self.sq.pop_front() {
                self.complete_sq(e, s);
            }
        }
        while let Some(e) = self.sq.pop_front() {
            self.complete_sq(e, WcStatus::Flushed);
        }
        while let Some(r) = self.rq.pop_front() {
            self.complete_recv(r, WcStatus::Flushed, WcOpcode::Recv, 0, None);
        }
    }

    /// Retires the head request; then, if a request that failed local
    /// checks reached the head, fails it and enters the error state
    /// (returns true).
    fn retire(&mut self, status: WcStatus) -> bool {
        if let Some(e) = self.sq.pop_front() {
            self.complete_sq(e, status);
        }
        if !status.is_ok() {
            self.enter_error(None);
            return true;
        }
        self.advance()
    }

    fn advance(&mut self) -> bool {
        match self.sq.front() {
            Some(e) if e.fault => {
                self.enter_error(Some(WcStatus::LocalProtectionError));
                true
            }
            _ => false,
        }
    }
}

/// A soft-fabric endpoint; see the module docs.
pub struct SoftEndpoint {
    shared: Arc<Shared>,
    tx: Arc<Tx>,
    reg: Arc<Registry>,
    sock: Arc<OwnedFd>,
    peer: String,
    threads: Vec<JoinHandle<()>>,
    /// Per request of the batch being posted: transmit it? (reused)
    plan: Vec<bool>,
    /// The owner watches `notify_fd` edge-triggered: `arm` does not read
    /// the eventfd.
    edge: bool,
}

impl std::fmt::Debug for SoftEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftEndpoint")
            .field("peer", &self.peer)
            .finish()
    }
}

impl SoftEndpoint {
    pub(crate) fn start(
        sock: OwnedFd,
        peer: String,
        reg: Arc<Registry>,
        cpu: &Arc<FabricCpu>,
        cfg: EndpointConfig,
    ) -> Result<Self, FabricError> {
        let notify = EventFd::new()?;
        let sq_depth = cfg.send_depth.max(1) as usize;
        let rq_depth = cfg.recv_depth.max(1) as usize;
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                dead: false,
                closing: false,
                sq: VecDeque::with_capacity(sq_depth),
                sq_depth,
                rq: VecDeque::with_capacity(rq_depth),
                rq_depth,
                cq: VecDeque::with_capacity(sq_depth + rq_depth),
                armed: false,
                waiters: 0,
                rnr_waiting: false,
            }),
            cq_cv: Condvar::new(),
            rq_cv: Condvar::new(),
            notify,
        });
        let sock = Arc::new(sock);
        let tx = Arc::new(Tx::new(Arc::clone(&sock)));
        let mut rx = Rx {
            shared: Arc::clone(&shared),
            tx: Arc::clone(&tx),
            reg: Arc::clone(&reg),
            sock: Arc::clone(&sock),
            buf: vec![0; RX_BUF],
            pos: 0,
            end: 0,
            cur: None,
        };
        // Both threads are the domain's "NIC": their CPU is its fabric CPU.
        let rx_thread = cpu.spawn("vrio-soft-rx", move || rx.run())?;
        let (tx2, reg2) = (Arc::clone(&tx), Arc::clone(&reg));
        let tx_thread = cpu.spawn("vrio-soft-tx", move || tx2.run_flusher(&reg2));
        let tx_thread = match tx_thread {
            Ok(t) => t,
            Err(e) => {
                shutdown(&sock, libc::SHUT_RDWR);
                let _ = rx_thread.join();
                return Err(e.into());
            }
        };
        Ok(Self {
            shared,
            tx,
            reg,
            sock,
            peer,
            threads: vec![rx_thread, tx_thread],
            plan: Vec::with_capacity(sq_depth),
            edge: false,
        })
    }
}

impl Endpoint for SoftEndpoint {
    fn post_send(&mut self, wrs: &[SendRequest]) -> Result<(), FabricError> {
        if wrs.is_empty() {
            return Ok(());
        }
        if let Some(wr) = wrs.iter().find(|wr| wr.local.len > MAX_MESSAGE) {
            return Err(FabricError::InvalidRequest(format!(
                "wr {}: {} bytes exceeds the {MAX_MESSAGE} byte message limit",
                wr.wr_id, wr.local.len
            )));
        }
        let mut st = self.shared.lock();
        if st.dead {
            // Posting to a QP in the error state flushes, as verbs does.
            for wr in wrs {
                st.cq.push_back(Completion::flushed(wr));
            }
            self.shared.wake(&mut st);
            return Ok(());
        }
        if st.sq.len() + wrs.len() > st.sq_depth {
            return Err(FabricError::QueueFull(st.sq_depth));
        }
        // Requests behind one that failed local checks are not transmitted:
        // they will be flushed when that one reaches the head.
        let mut blocked = st.sq.back().is_some_and(|e| !e.sent);
        self.plan.clear();
        {
            let guard = self.reg.read();
            for wr in wrs {
                let need = match wr.opcode {
                    Opcode::Read { .. } => Need::LocalWrite,
                    _ => Need::LocalRead,
                };
                let ok = guard
                    .check(wr.local.lkey, wr.local.addr, u64::from(wr.local.len), need)
                    .is_some();
                let sent = !blocked && ok;
                let fault = !blocked && !ok;
                blocked |= fault;
                st.sq.push_back(SqEntry {
                    wr_id: wr.wr_id,
                    op: wr.opcode.completion_opcode(),
                    local: wr.local,
                    signaled: wr.signaled,
                    sent,
                    fault,
                });
                self.plan.push(sent);
            }
        }
        let failed = st.advance();
        self.shared.wake(&mut st);
        drop(st);
        if failed {
            self.tx.finish(&self.reg);
            return Ok(());
        }
        let mut tx = self.tx.lock();
        for (wr, _) in wrs.iter().zip(&self.plan).filter(|(_, s)| **s) {
            let len = wr.local.len;
            let h = match wr.opcode {
                Opcode::Read { remote_addr, rkey } => {
                    Header::request(Kind::Read, 0, remote_addr, rkey, len)
                }
                Opcode::Write { remote_addr, rkey } => {
                    Header::request(Kind::Write, len, remote_addr, rkey, 0)
                }
                Opcode::WriteWithImm {
                    remote_addr,
                    rkey,
                    imm,
                } => Header::request(Kind::WriteImm, len, remote_addr, rkey, imm),
                Opcode::Send => Header::request(Kind::Send, len, 0, 0, 0),
            };
            tx.header(&h);
            if h.payload_len > 0 {
                tx.payload(&self.reg, wr.local.lkey, wr.local.addr, len as usize);
            }
        }
        self.tx.flush(&mut tx, &self.reg);
        Ok(())
    }

    fn post_recv(&mut self, wrs: &[RecvRequest]) -> Result<(), FabricError> {
        let mut st = self.shared.lock();
        if st.dead {
            for r in wrs {
                st.complete_recv(*r, WcStatus::Flushed, WcOpcode::Recv, 0, None);
            }
            self.shared.wake(&mut st);
            return Ok(());
        }
        if st.rq.len() + wrs.len() > st.rq_depth {
            return Err(FabricError::QueueFull(st.rq_depth));
        }
        st.rq.extend(wrs.iter().copied());
        if st.rnr_waiting {
            self.shared.rq_cv.notify_all();
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        let mut st = self.shared.lock();
        let n = out.len().min(st.cq.len());
        for (slot, c) in out.iter_mut().zip(st.cq.drain(..n)) {
            *slot = c;
        }
        Ok(n)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), FabricError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.cq.is_empty() {
            if st.dead {
                return Err(FabricError::EndpointDead);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st.waiters += 1;
            st = self
                .shared
                .cq_cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.waiters -= 1;
        }
        Ok(())
    }

    fn notify_fd(&self) -> RawFd {
        self.shared.notify.as_raw_fd()
    }

    fn arm(&mut self) -> Result<(), FabricError> {
        if !self.edge {
            self.shared.notify.drain();
        }
        let mut st = self.shared.lock();
        st.armed = true;
        // Completions that are already queued fire at once, so a caller that
        // arms and then waits on the fd cannot miss them.
        self.shared.wake(&mut st);
        Ok(())
    }

    fn set_edge_triggered(&mut self) {
        self.edge = true;
    }

    fn one_sided_costs_peer_cpu(&self) -> bool {
        // The target's fabric thread executes every READ and WRITE.
        true
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}

impl Drop for SoftEndpoint {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.closing = true;
            self.shared.rq_cv.notify_all();
        }
        shutdown(&self.sock, libc::SHUT_RDWR);
        self.tx.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Why the receive loop stopped.
enum Stop {
    /// The peer closed or reset the connection, or we are closing.
    Eof,
    /// The peer broke the protocol.
    Broken(String),
    /// This endpoint entered the error state (an error response went out or
    /// came in); drain the connection until the peer closes it.
    Fault,
}

/// Where the payload of the frame being received goes.
#[derive(Debug, Clone, Copy)]
enum Sink {
    /// The peer's WRITE into our region `key` (needs remote_write).
    Remote { key: u32, addr: u64 },
    /// The peer's SEND into our posted receive.
    Recv { key: u32, addr: u64 },
    /// The response to our READ, into its local sge.
    Local { key: u32, addr: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Payload {
    hdr: Header,
    remaining: u32,
    sink: Sink,
    /// Some region vanished mid-transfer (deregistered); the rest is dropped.
    failed: bool,
    recv: Option<RecvRequest>,
}

/// Completes the posted receive a half-received SEND or WRITE_WITH_IMM
/// holds (no longer in `rq`, so `enter_error` cannot flush it) as flushed,
/// and drops the rest of that payload.
fn flush_cur(cur: &mut Option<Payload>, st: &mut State) {
    if let Some(r) = cur.take().and_then(|p| p.recv) {
        st.complete_recv(r, WcStatus::Flushed, WcOpcode::Recv, 0, None);
    }
}

struct Rx {
    shared: Arc<Shared>,
    tx: Arc<Tx>,
    reg: Arc<Registry>,
    sock: Arc<OwnedFd>,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    cur: Option<Payload>,
}

impl Rx {
    fn run(&mut self) {
        let stop = self.serve();
        self.wake();
        match stop {
            Stop::Eof | Stop::Broken(_) => {
                if let Stop::Broken(why) = &stop {
                    tracing::warn!("soft fabric: peer broke the protocol: {why}");
                }
                let mut st = self.shared.lock();
                // The receive in progress is older than those still queued,
                // so it flushes first.
                flush_cur(&mut self.cur, &mut st);
                // A dead peer: the head request times out, the rest flush.
                st.enter_error(Some(WcStatus::RetryExceeded));
                self.shared.wake(&mut st);
                drop(st);
                shutdown(&self.sock, libc::SHUT_RDWR);
                self.tx.close();
            }
            Stop::Fault => {
                {
                    // The error state flushed the queued receives already;
                    // this thread no longer writes into the one in
                    // progress, so it can go back to the owner too.
                    let mut st = self.shared.lock();
                    flush_cur(&mut self.cur, &mut st);
                    self.shared.wake(&mut st);
                }
                self.tx.finish(&self.reg);
                // Read and drop until the peer closes too, so it sees our
                // error response before any reset.
                while !self.shared.lock().closing {
                    match self.read_more() {
                        Ok(_) => self.pos = self.end,
                        Err(_) => break,
                    }
                }
                shutdown(&self.sock, libc::SHUT_RDWR);
                self.tx.close();
            }
        }
    }

    /// Blocks for more bytes; compacts the buffer first.
    fn read_more(&mut self) -> Result<(), Stop> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        loop {
            let room = &mut self.buf[self.end..];
            // SAFETY: receives into our own buffer's unused tail.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    room.as_mut_ptr().cast(),
                    room.len(),
                    0,
                )
            };
            if n > 0 {
                self.end += n as usize;
                return Ok(());
            }
            if n == 0 {
                return Err(Stop::Eof);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::debug!("soft fabric: receive failed: {e}");
                return Err(Stop::Eof);
            }
        }
    }

    /// Wakes the application once per batch of input, not per completion,
    /// so it reaps (and reposts) in batches too.
    fn wake(&self) {
        let mut st = self.shared.lock();
        self.shared.wake(&mut st);
    }

    fn serve(&mut self) -> Stop {
        loop {
            let r = self.process();
            // One flush for all responses to this batch of requests, before
            // the application hears of it (a NIC acks before it completes).
            {
                let mut tx = self.tx.lock();
                self.tx.flush(&mut tx, &self.reg);
            }
            self.wake();
            if let Err(s) = r {
                return s;
            }
            {
                let st = self.shared.lock();
                if st.closing {
                    return Stop::Eof;
                }
                if st.dead {
                    // A local fault put us in the error state: serve no more.
                    return Stop::Fault;
                }
            }
            if let Err(s) = self.read_more() {
                return s;
            }
        }
    }

    /// Handles every complete frame (and payload chunk) in the buffer.
    fn process(&mut self) -> Result<(), Stop> {
        loop {
            if let Some(mut p) = self.cur {
                if self.pos == self.end {
                    return Ok(());
                }
                let n = (p.remaining as usize).min(self.end - self.pos);
                let chunk = &self.buf[self.pos..self.pos + n];
                if !p.failed {
                    let guard = self.reg.read();
                    let ok = match &mut p.sink {
                        Sink::Remote { key, addr } => {
                            let ok = guard.copy_in(*key, *addr, chunk, Need::RemoteWrite);
                            *addr += n as u64;
                            ok
                        }
                        Sink::Recv { key, addr } | Sink::Local { key, addr } => {
                            let ok = guard.copy_in(*key, *addr, chunk, Need::LocalWrite);
                            *addr += n as u64;
                            ok
                        }
                    };
                    p.failed = !ok;
                }
                self.pos += n;
                p.remaining -= n as u32;
                if p.remaining == 0 {
                    self.cur = None;
                    self.finish(p)?;
                } else {
                    self.cur = Some(p);
                }
                continue;
            }
            if self.end - self.pos < HEADER_LEN {
                return Ok(());
            }
            let mut hb = [0u8; HEADER_LEN];
            hb.copy_from_slice(&self.buf[self.pos..self.pos + HEADER_LEN]);
            self.pos += HEADER_LEN;
            let h = Header::decode(&hb).map_err(|e| Stop::Broken(e.to_string()))?;
            self.on_header(h)?;
        }
    }

    /// Sends an error response and enters the error state.
    fn nak(&self, kind: Kind, status: Status) -> Stop {
        {
            // Out before the application can see the error and drop us.
            let mut tx = self.tx.lock();
            tx.header(&Header::response(kind, status, 0));
            self.tx.flush(&mut tx, &self.reg);
        }
        let mut st = self.shared.lock();
        st.enter_error(None);
        Stop::Fault
    }

    /// Takes the next posted receive, waiting up to RNR_WAIT for one.
    fn take_recv(&self) -> Option<RecvRequest> {
        {
            // Let the peer see our earlier responses while we wait.
            let mut tx = self.tx.lock();
            self.tx.flush(&mut tx, &self.reg);
        }
        // The application may need its completions to post that receive.
        self.wake();
        let deadline = Instant::now() + RNR_WAIT;
        let mut st = self.shared.lock();
        while st.rq.is_empty() && !st.closing && !st.dead {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st.rnr_waiting = true;
            st = self
                .shared
                .rq_cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.rnr_waiting = false;
        st.rq.pop_front()
    }

    fn start_payload(
        &mut self,
        hdr: Header,
        sink: Sink,
        recv: Option<RecvRequest>,
    ) -> Result<(), Stop> {
        let p = Payload {
            hdr,
            remaining: hdr.payload_len,
            sink,
            failed: false,
            recv,
        };
        if p.remaining == 0 {
            self.finish(p)
        } else {
            self.cur = Some(p);
            Ok(())
        }
    }

    fn on_header(&mut self, h: Header) -> Result<(), Stop> {
        match h.kind {
            Kind::Hello => Err(Stop::Broken("HELLO after the handshake".into())),
            Kind::Read => {
                // RC: this READ sees the WRITEs applied before it; make our
                // earlier stores visible before these loads on any CPU.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                let len = h.aux;
                let ok = self
                    .reg
                    .read()
                    .check(h.rkey, h.addr, u64::from(len), Need::RemoteRead)
                    .is_some();
                if !ok {
                    return Err(self.nak(Kind::ReadResp, Status::RemoteAccess));
                }
                let mut tx = self.tx.lock();
                tx.header(&Header::response(Kind::ReadResp, Status::Ok, len));
                tx.payload(&self.reg, h.rkey, h.addr, len as usize);
                Ok(())
            }
            Kind::Write | Kind::WriteImm => {
                let ok = self
                    .reg
                    .read()
                    .check(h.rkey, h.addr, u64::from(h.payload_len), Need::RemoteWrite)
                    .is_some();
                if !ok {
                    return Err(self.nak(Kind::Ack, Status::RemoteAccess));
                }
                let recv = if h.kind == Kind::WriteImm {
                    match self.take_recv() {
                        Some(r) => Some(r),
                        None => return Err(self.nak(Kind::Ack, Status::Rnr)),
                    }
                } else {
                    None
                };
                let sink = Sink::Remote {
                    key: h.rkey,
                    addr: h.addr,
                };
                self.start_payload(h, sink, recv)
            }
            Kind::Send => {
                let Some(r) = self.take_recv() else {
                    return Err(self.nak(Kind::Ack, Status::Rnr));
                };
                let status = if r.local.len < h.payload_len {
                    Some(WcStatus::Other(LOC_LEN_ERR))
                } else if self
                    .reg
                    .read()
                    .check(
                        r.local.lkey,
                        r.local.addr,
                        u64::from(h.payload_len),
                        Need::LocalWrite,
                    )
                    .is_none()
                {
                    Some(WcStatus::LocalProtectionError)
                } else {
                    None
                };
                if let Some(s) = status {
                    let mut st = self.shared.lock();
                    st.complete_recv(r, s, WcOpcode::Recv, 0, None);
                    drop(st);
                    return Err(self.nak(Kind::Ack, Status::RemoteOp));
                }
                let sink = Sink::Recv {
                    key: r.local.lkey,
                    addr: r.local.addr,
                };
                self.start_payload(h, sink, Some(r))
            }
            Kind::ReadResp | Kind::Ack => {
                let mut st = self.shared.lock();
                let head = match st.sq.front() {
                    Some(e) if e.sent => *e,
                    _ => {
                        return Err(Stop::Broken(format!(
                            "{:?} with no request outstanding",
                            h.kind
                        )))
                    }
                };
                let is_read = head.op == WcOpcode::Read;
                if is_read != (h.kind == Kind::ReadResp) {
                    return Err(Stop::Broken(format!(
                        "{:?} answers a {:?}",
                        h.kind, head.op
                    )));
                }
                if h.status != Status::Ok {
                    st.enter_error(Some(wc_status(h.status)));
                    return Err(Stop::Fault);
                }
                if is_read && h.payload_len != head.local.len {
                    return Err(Stop::Broken(format!(
                        "READ response of {} bytes for a {} byte READ",
                        h.payload_len, head.local.len
                    )));
                }
                drop(st);
                let sink = Sink::Local {
                    key: head.local.lkey,
                    addr: head.local.addr,
                };
                self.start_payload(h, sink, None)
            }
        }
    }

    /// Called when a frame's payload has fully arrived.
    fn finish(&mut self, p: Payload) -> Result<(), Stop> {
        match p.sink {
            Sink::Remote { .. } => {
                if p.failed {
                    // The region was deregistered mid-WRITE.
                    return Err(self.nak(Kind::Ack, Status::RemoteAccess));
                }
                if let Some(r) = p.recv {
                    // The data is in place before the immediate is visible.
                    let mut st = self.shared.lock();
                    st.complete_recv(
                        r,
                        WcStatus::Success,
                        WcOpcode::RecvWithImm,
                        p.hdr.payload_len,
                        Some(p.hdr.aux),
                    );
                }
                self.tx
                    .lock()
                    .header(&Header::response(Kind::Ack, Status::Ok, 0));
                Ok(())
            }
            Sink::Recv { .. } => {
                let mut st = self.shared.lock();
                if let Some(r) = p.recv {
                    let status = if p.failed {
                        WcStatus::LocalProtectionError
                    } else {
                        WcStatus::Success
                    };
                    st.complete_recv(r, status, WcOpcode::Recv, p.hdr.payload_len, None);
                }
                drop(st);
                if p.failed {
                    return Err(self.nak(Kind::Ack, Status::RemoteOp));
                }
                self.tx
                    .lock()
                    .header(&Header::response(Kind::Ack, Status::Ok, 0));
                Ok(())
            }
            Sink::Local { .. } => {
                let mut st = self.shared.lock();
                let status = if p.failed {
                    WcStatus::LocalProtectionError
                } else {
                    WcStatus::Success
                };
                let fault = st.retire(status);
                if fault {
                    Err(Stop::Fault)
                } else {
                    Ok(())
                }
            }
        }
    }
}
