//! A shm reliable-connected endpoint.
//!
//! There is no "NIC" thread: the caller's own calls do all the work.
//! `post_send` executes requests at once, in order: READ and WRITE are
//! copies into or out of the peer's memory, SEND and WRITE_WITH_IMM's
//! immediate are pushed into the peer's inbox. Every call also makes
//! progress: it consumes the own inbox into posted receives, retires
//! requests whose messages the peer has taken, and notices a dead peer.
//! Completions still retire strictly in posting order, as RC's do.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::channel::{
    self, stamp_of, Channel, Ctrl, SlotHeader, CHANNEL_LEN, ERR_CLOSED, ERR_REMOTE_OP, FIRST,
    KIND_IMM, KIND_SEND, LAST, MAX_SEND, SLOT, SLOTS, SLOT_DATA, SLOT_HDR,
};
use super::peer::{self, Announce, PeerRegions};
use super::socket::{self, Kind, Msg, Recv};
use super::{Conn, DomainShared};
use crate::access::Need;
use crate::api::{
    Completion, Endpoint, EndpointConfig, FabricError, Opcode, RecvRequest, SendRequest, WcOpcode,
    WcStatus,
};
use crate::eventfd::EventFd;

/// How long a SEND or WRITE_WITH_IMM waits for the peer to post a receive
/// (verbs: RNR retries) before it fails with `RnrRetryExceeded`.
const RNR_WAIT: Duration = Duration::from_secs(5);
/// How long the handshake waits for the peer's HELLO.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a busy-polling caller checks the socket when nothing else made
/// it look. Only a crashed peer's EOF needs it: announcements are read when
/// an unknown key is used, revocations when the epoch moves, and a peer
/// that closes also says so in shared memory. A `recvmsg` costs about as
/// much as serving a request, and a sidecore polls many endpoints.
const SOCKET_CHECK: Duration = Duration::from_millis(5);
/// How often `arm` reads the socket when the eventfd did not fire: the
/// longest a sleeper can spin on a socket message it has not read.
const ARM_SOCKET_CHECK: Duration = Duration::from_millis(1);
/// Polls between two reads of the clock for [`SOCKET_CHECK`]: most polls
/// find nothing, and a clock read costs as much as an empty poll. Small
/// enough that an endpoint polled every 10 ms still checks within 100 ms.
const CLOCK_EVERY: u32 = 8;
/// `arm` reads our eventfd only when the armed flag was taken (the peer
/// signals only after taking it), and at least every this many arms: a
/// count written unasked (a peer's close, a hostile peer) then keeps the
/// notify fd readable for at most this many wakes.
const DRAIN_EVERY: u32 = 8;
/// `ibv_wc_status` IBV_WC_LOC_LEN_ERR: a message longer than the receive.
const LOC_LEN_ERR: u32 = 1;
/// A word the peer reads with CMA at connect time, to learn whether CMA
/// works between the two processes.
static PROBE: u64 = 0x7672_696f_2d73_686d;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not executed yet (the inbox was full, or a fault is ahead).
    Pending,
    /// Its message is in the peer's inbox up to slot sequence `last`
    /// (exclusive); it is the peer's `msg`-th receive-consuming message.
    Sent { last: u64, msg: u64 },
    /// Executed with this outcome.
    Done(WcStatus),
}

#[derive(Debug, Clone, Copy)]
struct SqEntry {
    wr: SendRequest,
    state: State,
}

/// A shm-fabric endpoint; see the module docs.
pub struct ShmEndpoint {
    conn: Arc<Conn>,
    domain: Arc<DomainShared>,
    peers: PeerRegions,
    peer_desc: String,
    /// The notify fd: an epoll set of `wake` and the socket.
    epoll: OwnedFd,
    /// Ours; the peer signals it when we are armed.
    wake: EventFd,
    peer_wake: EventFd,
    sq: VecDeque<SqEntry>,
    /// Entries at the front of `sq` that have been executed.
    executed: usize,
    sq_depth: usize,
    /// A request failed at execution: nothing after it executes.
    faulted: bool,
    rq: VecDeque<RecvRequest>,
    rq_depth: usize,
    /// Receives posted in total (published for the peer's RNR test).
    posted: u64,
    cq: VecDeque<Completion>,
    /// Next slot sequence in the peer's inbox.
    tail: u64,
    /// Receive-consuming messages sent so far.
    msgs: u64,
    /// The peer's inbox head as last read (validated).
    peer_head: u64,
    /// Our inbox's head: slots consumed.
    head: u64,
    /// The peer's revocation epoch we have caught up with.
    seen_epoch: u64,
    dead: bool,
    last_check: Instant,
    /// Polls and posts since the clock was last read for the socket check.
    unclocked: u32,
    /// Arms since our eventfd was last read.
    undrained: u32,
    /// The owner watches `notify_fd` edge-triggered: `arm` never reads
    /// the eventfd.
    edge: bool,
    rnr_since: Option<Instant>,
}

impl std::fmt::Debug for ShmEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmEndpoint")
            .field("peer", &self.peer_desc)
            .field("dead", &self.dead)
            .finish()
    }
}

fn proto(why: impl Into<String>) -> FabricError {
    FabricError::Protocol(why.into())
}

/// Checks that a descriptor the peer passed as its wake-up is an eventfd
/// (a pipe or socket could block or misbehave when we write to it).
fn check_eventfd(fd: &OwnedFd) -> Result<(), FabricError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if link.to_string_lossy() != "anon_inode:[eventfd]" {
        return Err(proto(format!(
            "peer's wake-up fd is {}, not an eventfd",
            link.display()
        )));
    }
    Ok(())
}

fn epoll_of(fds: &[(i32, u32)]) -> Result<OwnedFd, FabricError> {
    // SAFETY: plain syscall; result checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for &(fd, events) in fds {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: adds a live descriptor to our epoll set with a valid event.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(ep)
}

impl ShmEndpoint {
    /// Runs the handshake on a connected socket and builds the endpoint.
    pub(crate) fn start(
        sock: OwnedFd,
        domain: Arc<DomainShared>,
        cfg: EndpointConfig,
    ) -> Result<Self, FabricError> {
        socket::set_recv_timeout(&sock, Some(HANDSHAKE_TIMEOUT))?;
        let (mine, mine_fd) = Channel::create()?;
        mine.u64_at(Ctrl::WantAck)
            .store(u64::MAX, Ordering::Relaxed);
        let wake = EventFd::new()?;
        let mut hello = Msg::new(Kind::Hello);
        hello.put_u32(8, SLOTS as u32);
        hello.put_u32(12, SLOT as u32);
        hello.put_u64(16, CHANNEL_LEN as u64);
        hello.put_u64(24, &PROBE as *const u64 as u64);
        hello.put_u64(32, PROBE);
        socket::send(&sock, &hello, &[mine_fd.as_raw_fd(), wake.as_raw_fd()])?;
        let (m, mut fds) = match socket::recv(&sock, true) {
            Recv::Msg(m, fds) => (m, fds),
            Recv::Empty => return Err(proto("no HELLO from the peer in time")),
            Recv::Eof => return Err(proto("the peer closed during the handshake")),
            Recv::Bad(why) => return Err(proto(format!("bad HELLO: {why}"))),
        };
        if m.kind != Kind::Hello || fds.len() != 2 {
            return Err(proto(format!(
                "expected HELLO with 2 descriptors, got {:?} with {}",
                m.kind,
                fds.len()
            )));
        }
        if (m.u32_at(8), m.u32_at(12), m.u64_at(16))
            != (SLOTS as u32, SLOT as u32, CHANNEL_LEN as u64)
        {
            return Err(proto("peer uses another inbox geometry"));
        }
        let (Some(peer_wake), Some(chan)) = (fds.pop(), fds.pop()) else {
            return Err(proto("HELLO without its descriptors"));
        };
        let theirs = Channel::open_peer(&chan)?;
        check_eventfd(&peer_wake)?;
        let pid = socket::peer_pid(&sock)?;
        let cma_ok = peer::cma_probe(pid, m.u64_at(24), m.u64_at(32));
        socket::set_recv_timeout(&sock, None)?;
        let epoll = epoll_of(&[
            (wake.as_raw_fd(), libc::EPOLLIN as u32),
            (sock.as_raw_fd(), (libc::EPOLLIN | libc::EPOLLRDHUP) as u32),
        ])?;
        let conn = Arc::new(Conn {
            sock,
            mine,
            theirs,
            closed: AtomicBool::new(false),
        });
        domain.add_conn(&conn)?;
        let sq_depth = cfg.send_depth.max(1) as usize;
        let rq_depth = cfg.recv_depth.max(1) as usize;
        Ok(Self {
            conn,
            domain,
            peers: PeerRegions::new(pid, cma_ok),
            peer_desc: format!("shm:pid {pid}"),
            epoll,
            wake,
            peer_wake: EventFd::from_owned(peer_wake),
            sq: VecDeque::with_capacity(sq_depth),
            executed: 0,
            sq_depth,
            faulted: false,
            rq: VecDeque::with_capacity(rq_depth),
            rq_depth,
            posted: 0,
            cq: VecDeque::with_capacity(sq_depth + rq_depth),
            tail: 0,
            msgs: 0,
            peer_head: 0,
            head: 0,
            seen_epoch: 0,
            dead: false,
            last_check: Instant::now(),
            unclocked: 0,
            undrained: 0,
            edge: false,
            rnr_since: None,
        })
    }

    fn mine(&self) -> &Channel {
        &self.conn.mine
    }

    fn theirs(&self) -> &Channel {
        &self.conn.theirs
    }

    /// Writes pseudo-random bytes (from `seed`) over everything this side
    /// can write in the shared channels: the peer's inbox and control
    /// block as we map them, and our own. It is what a hostile peer can do;
    /// the peer must fail its endpoint cleanly. For tests.
    pub fn scribble_shared_memory(&self, seed: u64) {
        let mut x = seed | 1;
        for ch in [self.theirs(), self.mine()] {
            let (p, len) = ch.raw();
            for i in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // SAFETY: i < len, inside our live mapping of the channel;
                // bytes are written one at a time, no reference is made.
                unsafe { p.add(i).write_volatile(x as u8) };
            }
        }
        // The peer must notice even if it sleeps. Our own fencing promises
        // are void now: do not wait on a control block we wrecked.
        self.conn.closed.store(true, Ordering::SeqCst);
        self.peer_wake.signal();
    }

    /// Fills the peer's next `n` inbox slots with pseudo-random headers and
    /// data under *valid* stamps, so that the peer takes them for messages
    /// and must reject them by their contents. For tests, like
    /// [`ShmEndpoint::scribble_shared_memory`].
    pub fn forge_messages(&mut self, seed: u64, n: u64) {
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..n {
            let seq = self.tail + i;
            let slot = self.theirs().slot(seq);
            for b in 4..SLOT {
                let v = next() as u8;
                // SAFETY: b < SLOT, inside a slot of our live mapping of the
                // peer's channel.
                unsafe { slot.add(b).write_volatile(v) };
            }
            self.theirs()
                .stamp(seq)
                .store(stamp_of(seq), Ordering::Release);
        }
        self.tail += n;
        self.conn.closed.store(true, Ordering::SeqCst);
        self.peer_wake.signal();
    }

    // ---- the socket -------------------------------------------------------

    /// Handles everything queued on the socket: announcements,
    /// revocations, the peer's goodbye or death.
    fn service_socket(&mut self) {
        self.last_check = Instant::now();
        loop {
            match socket::recv(&self.conn.sock, false) {
                Recv::Empty => return,
                Recv::Eof => return self.peer_gone("the peer closed the connection"),
                Recv::Bad(why) => return self.peer_gone(&format!("bad control message: {why}")),
                Recv::Msg(m, mut fds) => match m.kind {
                    Kind::Region => {
                        let a = Announce::decode(&m);
                        let file = fds.pop();
                        if !fds.is_empty() {
                            return self.peer_gone("region announced with extra descriptors");
                        }
                        if let Err(why) = self.peers.announce(a, file) {
                            return self.peer_gone(&format!("bad region announcement: {why}"));
                        }
                    }
                    Kind::Revoke => self.peers.revoke(m.u32_at(8)),
                    Kind::Close => return self.peer_gone("the peer closed its endpoint"),
                    Kind::Hello => return self.peer_gone("HELLO after the handshake"),
                },
            }
        }
    }

    /// The peer is gone or broke the rules: the head request fails as a
    /// lost peer does in verbs, the rest flush, and its memory is unmapped.
    fn peer_gone(&mut self, why: &str) {
        if !self.dead {
            tracing::debug!("shm fabric: endpoint to {} failed: {why}", self.peer_desc);
        }
        self.peers.clear();
        self.enter_error(Some(WcStatus::RetryExceeded));
    }

    // ---- errors -----------------------------------------------------------

    /// Enters the RC error state: executed requests keep their outcome up
    /// to the first failure; the first unfinished one gets `head` (or
    /// Flushed); everything after flushes, and so do the receives.
    fn enter_error(&mut self, head: Option<WcStatus>) {
        if self.dead {
            return;
        }
        self.dead = true;
        self.conn.closed.store(true, Ordering::SeqCst);
        let code = if head == Some(WcStatus::RemoteOperationError) {
            ERR_REMOTE_OP
        } else {
            ERR_CLOSED
        };
        self.mine()
            .u32_at(Ctrl::Error)
            .store(code, Ordering::SeqCst);
        self.peer_wake.signal();
        let mut head = head;
        let mut failed = false;
        while let Some(e) = self.sq.pop_front() {
            let status = match (failed, e.state) {
                (false, State::Done(s)) => s,
                (false, _) => head.take().unwrap_or(WcStatus::Flushed),
                (true, _) => WcStatus::Flushed,
            };
            failed |= !status.is_ok();
            self.complete_sq(&e.wr, status);
        }
        self.executed = 0;
        while let Some(r) = self.rq.pop_front() {
            self.complete_recv(&r, WcStatus::Flushed, WcOpcode::Recv, 0, None);
        }
    }

    fn complete_sq(&mut self, wr: &SendRequest, status: WcStatus) {
        self.cq.extend(Completion::of_request(wr, status));
    }

    fn complete_recv(
        &mut self,
        r: &RecvRequest,
        status: WcStatus,
        opcode: WcOpcode,
        len: u32,
        imm: Option<u32>,
    ) {
        self.cq.push_back(Completion {
            wr_id: r.wr_id,
            status,
            opcode,
            byte_len: len,
            imm,
        });
    }

    // ---- progress ---------------------------------------------------------

    /// Whether the periodic socket check is due; reads the clock only
    /// every [`CLOCK_EVERY`] calls.
    fn socket_due(&mut self) -> bool {
        self.unclocked += 1;
        if self.unclocked < CLOCK_EVERY {
            return false;
        }
        self.unclocked = 0;
        self.last_check.elapsed() >= SOCKET_CHECK
    }

    /// One round of everything that can move without waiting.
    fn progress(&mut self) {
        if self.socket_due() {
            self.service_socket();
        }
        if self.dead {
            return;
        }
        self.execute();
        self.consume();
        self.retire();
        if !self.dead {
            let err = self.theirs().u32_at(Ctrl::Error).load(Ordering::SeqCst);
            if err != 0 {
                // Whatever the peer took before it failed has completed.
                self.retire();
                let status = if err == ERR_REMOTE_OP {
                    WcStatus::RemoteOperationError
                } else {
                    WcStatus::RetryExceeded
                };
                self.peers.clear();
                self.enter_error(Some(status));
            }
        }
    }

    /// Reads and checks the peer's inbox head: it only moves forward, and
    /// never past what we produced.
    fn read_peer_head(&mut self) -> bool {
        let h = self.theirs().u64_at(Ctrl::Head).load(Ordering::Acquire);
        if h < self.peer_head || h > self.tail {
            self.peer_gone(&format!(
                "peer's inbox head {h} outside {}..={}",
                self.peer_head, self.tail
            ));
            return false;
        }
        self.peer_head = h;
        true
    }

    /// Sets our busy flag, then makes sure every revocation the peer made
    /// is applied before we copy (see docs/fabric.md, fencing). Returns
    /// false if the endpoint died meanwhile.
    fn enter_copy(&mut self) -> bool {
        loop {
            self.mine().u32_at(Ctrl::Busy).store(1, Ordering::SeqCst);
            let e = self.theirs().u64_at(Ctrl::Epoch).load(Ordering::SeqCst);
            if e == self.seen_epoch {
                return true;
            }
            self.mine().u32_at(Ctrl::Busy).store(0, Ordering::SeqCst);
            // Revocations are on the socket before the epoch moves.
            self.service_socket();
            self.seen_epoch = e;
            if self.dead {
                return false;
            }
        }
    }

    fn leave_copy(&self) {
        self.mine().u32_at(Ctrl::Busy).store(0, Ordering::Release);
    }

    /// Executes pending requests in order, until one cannot run yet (the
    /// peer's inbox is full) or one fails.
    fn execute(&mut self) {
        if self.executed == self.sq.len() || self.faulted {
            return;
        }
        if !self.enter_copy() {
            return;
        }
        let mut pushed = false;
        let reg = Arc::clone(&self.domain.reg);
        let guard = reg.read();
        while self.executed < self.sq.len() {
            let wr = self.sq[self.executed].wr;
            let rkey = match wr.opcode {
                Opcode::Read { rkey, .. }
                | Opcode::Write { rkey, .. }
                | Opcode::WriteWithImm { rkey, .. } => Some(rkey),
                Opcode::Send => None,
            };
            if rkey.is_some_and(|k| !self.peers.knows(k)) {
                // Its announcement may be queued on the socket still.
                self.service_socket();
                if self.dead {
                    break;
                }
            }
            let len = wr.local.len as usize;
            let need = match wr.opcode {
                Opcode::Read { .. } => Need::LocalWrite,
                _ => Need::LocalRead,
            };
            let Some(local) =
                guard.check(wr.local.lkey, wr.local.addr, u64::from(wr.local.len), need)
            else {
                self.fail_at_execute(WcStatus::LocalProtectionError);
                break;
            };
            let state = match wr.opcode {
                Opcode::Read { remote_addr, rkey } => {
                    // RC: a READ sees every WRITE posted before it. Our
                    // copies are plain stores and loads, which the CPU may
                    // reorder (store, then load elsewhere): fence them.
                    fence(Ordering::SeqCst);
                    match self.peers.copy(rkey, remote_addr, local, len, false) {
                        Ok(()) => State::Done(WcStatus::Success),
                        Err(s) => State::Done(s),
                    }
                }
                Opcode::Write { remote_addr, rkey } => {
                    match self.peers.copy(rkey, remote_addr, local, len, true) {
                        Ok(()) => State::Done(WcStatus::Success),
                        Err(s) => State::Done(s),
                    }
                }
                Opcode::WriteWithImm {
                    remote_addr,
                    rkey,
                    imm,
                } => {
                    if !self.room(1) {
                        break;
                    }
                    match self.peers.copy(rkey, remote_addr, local, len, true) {
                        // The data is in place before the slot is stamped.
                        Ok(()) => self.push(KIND_IMM, imm, wr.local.len, None),
                        Err(s) => State::Done(s),
                    }
                }
                Opcode::Send => {
                    if !self.room(channel::slots_for(KIND_SEND, wr.local.len)) {
                        break;
                    }
                    self.push(KIND_SEND, 0, wr.local.len, Some(local))
                }
            };
            pushed |= matches!(state, State::Sent { .. });
            self.sq[self.executed].state = state;
            self.executed += 1;
            if let State::Done(s) = state {
                if !s.is_ok() {
                    self.faulted = true;
                    break;
                }
            }
        }
        drop(guard);
        self.leave_copy();
        if pushed {
            self.signal_peer(false);
        }
    }

    fn fail_at_execute(&mut self, s: WcStatus) {
        self.sq[self.executed].state = State::Done(s);
        self.executed += 1;
        self.faulted = true;
    }

    /// Whether the peer's inbox has `n` free slots.
    fn room(&mut self, n: u64) -> bool {
        if self.tail + n - self.peer_head <= SLOTS {
            return true;
        }
        self.read_peer_head() && self.tail + n - self.peer_head <= SLOTS
    }

    /// Pushes a message into the peer's inbox (room was checked). `src`
    /// holds `total` bytes of SEND payload (checked local memory).
    fn push(&mut self, kind: u8, imm: u32, total: u32, src: Option<*mut u8>) -> State {
        let n = channel::slots_for(kind, total);
        for i in 0..n {
            let seq = self.tail + i;
            let slot = self.theirs().slot(seq);
            let off = i as usize * SLOT_DATA;
            let len = if kind == KIND_SEND {
                (total as usize - off.min(total as usize)).min(SLOT_DATA)
            } else {
                0
            };
            let mut flags = 0;
            if i == 0 {
                flags |= FIRST;
            }
            if i == n - 1 {
                flags |= LAST;
            }
            let h = SlotHeader {
                kind,
                flags,
                len: len as u16,
                imm,
                total,
            };
            // SAFETY: `slot` is a slot of our live mapping of the peer's
            // channel; `src + off .. + len` lies in the checked local range
            // (off + len <= total = its length).
            unsafe {
                h.store(slot);
                if let Some(src) = src {
                    std::ptr::copy_nonoverlapping(src.add(off), slot.add(SLOT_HDR), len);
                }
            }
            // Payload and header before the stamp that publishes them.
            self.theirs()
                .stamp(seq)
                .store(stamp_of(seq), Ordering::Release);
        }
        self.tail += n;
        let msg = self.msgs;
        self.msgs += 1;
        State::Sent {
            last: self.tail,
            msg,
        }
    }

    /// Wakes the peer if it sleeps: always for new messages (`ack` false);
    /// for acknowledgements only if it waits for one this far.
    fn signal_peer(&self, ack: bool) {
        fence(Ordering::SeqCst);
        let theirs = self.theirs();
        if ack && self.head < theirs.u64_at(Ctrl::WantAck).load(Ordering::SeqCst) {
            return;
        }
        if theirs
            .u32_at(Ctrl::Armed)
            .compare_exchange(1, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.peer_wake.signal();
        }
    }

    /// The message at our inbox head, if a whole one is there: its first
    /// header (checked) and its slot count.
    fn next_message(&self) -> Result<Option<(SlotHeader, u64)>, String> {
        let mine = self.mine();
        if mine.stamp(self.head).load(Ordering::Acquire) != stamp_of(self.head) {
            return Ok(None);
        }
        // SAFETY: a slot of our live channel mapping.
        let h = unsafe { SlotHeader::load(mine.slot(self.head)) };
        if h.flags & FIRST == 0 {
            return Err("message does not start with a first slot".into());
        }
        let n = match h.kind {
            KIND_SEND if h.total <= MAX_SEND => channel::slots_for(KIND_SEND, h.total),
            KIND_SEND => return Err(format!("SEND of {} bytes over {MAX_SEND}", h.total)),
            KIND_IMM => 1,
            k => return Err(format!("unknown slot kind {k}")),
        };
        let last = self.head + n - 1;
        if mine.stamp(last).load(Ordering::Acquire) != stamp_of(last) {
            return Ok(None);
        }
        Ok(Some((h, n)))
    }

    /// Delivers whole messages from our inbox into posted receives, in
    /// order, while there are receives for them.
    fn consume(&mut self) {
        let start = self.head;
        while !self.dead && !self.rq.is_empty() {
            let (h, n) = match self.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(why) => {
                    tracing::warn!(
                        "shm fabric: peer {} wrote a bad message: {why}",
                        self.peer_desc
                    );
                    self.enter_error(Some(WcStatus::RemoteOperationError));
                    return;
                }
            };
            let Some(r) = self.rq.pop_front() else { break };
            if h.kind == KIND_IMM {
                self.complete_recv(
                    &r,
                    WcStatus::Success,
                    WcOpcode::RecvWithImm,
                    h.total,
                    Some(h.imm),
                );
            } else if let Err(status) = self.deliver(&r, h.total, n) {
                self.complete_recv(&r, status, WcOpcode::Recv, 0, None);
                // The peer's request fails too (as soft's NAK does).
                self.enter_error(Some(WcStatus::RemoteOperationError));
                return;
            } else {
                self.complete_recv(&r, WcStatus::Success, WcOpcode::Recv, h.total, None);
            }
            self.head += n;
            self.mine()
                .u64_at(Ctrl::Head)
                .store(self.head, Ordering::Release);
        }
        if self.head != start {
            self.signal_peer(true);
        }
    }

    /// Copies a SEND's `n` slots into receive `r`, checking every slot.
    fn deliver(&self, r: &RecvRequest, total: u32, n: u64) -> Result<(), WcStatus> {
        if r.local.len < total {
            return Err(WcStatus::Other(LOC_LEN_ERR));
        }
        let guard = self.domain.reg.read();
        let dst = guard
            .check(
                r.local.lkey,
                r.local.addr,
                u64::from(total),
                Need::LocalWrite,
            )
            .ok_or(WcStatus::LocalProtectionError)?;
        let mine = self.mine();
        for i in 0..n {
            let seq = self.head + i;
            let slot = mine.slot(seq);
            let off = i as usize * SLOT_DATA;
            let want_len = (total as usize - off).min(SLOT_DATA);
            let want_flags = (u8::from(i == 0) * FIRST) | (u8::from(i == n - 1) * LAST);
            // SAFETY: a slot of our live channel mapping.
            let h = unsafe { SlotHeader::load(slot) };
            if mine.stamp(seq).load(Ordering::Acquire) != stamp_of(seq)
                || h.kind != KIND_SEND
                || h.flags != want_flags
                || usize::from(h.len) != want_len
                || h.total != total
            {
                tracing::warn!(
                    "shm fabric: peer {} wrote an inconsistent message",
                    self.peer_desc
                );
                return Err(WcStatus::RemoteOperationError);
            }
            // SAFETY: `dst + off .. + want_len` lies in the receive buffer
            // `check` proved (off + want_len <= total), kept registered by
            // `guard`; the source is the slot's data area in our mapping.
            // The peer may rewrite the slot meanwhile: we copy bytes, which
            // is all a SEND promises.
            unsafe { std::ptr::copy_nonoverlapping(slot.add(SLOT_HDR), dst.add(off), want_len) };
        }
        Ok(())
    }

    /// Retires executed requests from the head, in order.
    fn retire(&mut self) {
        if self.dead || !self.read_peer_head() {
            return;
        }
        while let Some(e) = self.sq.front().copied() {
            match e.state {
                State::Pending => break,
                State::Done(s) if !s.is_ok() => {
                    self.enter_error(None);
                    return;
                }
                State::Done(s) => self.complete_sq(&e.wr, s),
                State::Sent { last, msg } => {
                    if self.peer_head < last {
                        if !self.rnr_expired(msg) {
                            break;
                        }
                        self.enter_error(Some(WcStatus::RnrRetryExceeded));
                        return;
                    }
                    self.rnr_since = None;
                    self.complete_sq(&e.wr, WcStatus::Success);
                }
            }
            self.sq.pop_front();
            self.executed -= 1;
        }
    }

    /// Whether message `msg`, still not taken, has waited RNR_WAIT without
    /// the peer having a receive posted for it.
    fn rnr_expired(&mut self, msg: u64) -> bool {
        let posted = self.theirs().u64_at(Ctrl::Posted).load(Ordering::Acquire);
        if posted > msg {
            self.rnr_since = None;
            return false;
        }
        let since = *self.rnr_since.get_or_insert_with(Instant::now);
        since.elapsed() >= RNR_WAIT
    }

    /// Whether a call to `poll` would find something (for arming).
    fn ready(&mut self) -> bool {
        if !self.cq.is_empty() || self.dead {
            return true;
        }
        if !self.rq.is_empty() && matches!(self.next_message(), Ok(Some(_)) | Err(_)) {
            return true;
        }
        if self.theirs().u32_at(Ctrl::Error).load(Ordering::SeqCst) != 0 {
            return true;
        }
        match self.sq.front() {
            Some(SqEntry {
                state: State::Sent { last, .. },
                ..
            }) => {
                let last = *last;
                self.read_peer_head() && self.peer_head >= last
            }
            Some(SqEntry {
                state: State::Done(_),
                ..
            }) => true,
            _ => false,
        }
    }

    /// Asks the peer to wake us for new messages and for the
    /// acknowledgement of our first signalled message; then re-checks, so
    /// nothing that arrived meanwhile is missed.
    fn arm_inner(&mut self) -> bool {
        let want = self
            .sq
            .iter()
            .find_map(|e| match e.state {
                State::Sent { last, .. } if e.wr.signaled => Some(last),
                _ => None,
            })
            .unwrap_or(u64::MAX);
        self.mine()
            .u64_at(Ctrl::WantAck)
            .store(want, Ordering::SeqCst);
        self.mine().u32_at(Ctrl::Armed).store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.ready() {
            self.mine().u32_at(Ctrl::Armed).store(0, Ordering::SeqCst);
            return true;
        }
        false
    }
}

impl Endpoint for ShmEndpoint {
    fn post_send(&mut self, wrs: &[SendRequest]) -> Result<(), FabricError> {
        if wrs.is_empty() {
            return Ok(());
        }
        if let Some(wr) = wrs
            .iter()
            .find(|wr| matches!(wr.opcode, Opcode::Send) && wr.local.len > MAX_SEND)
        {
            return Err(FabricError::InvalidRequest(format!(
                "wr {}: SEND of {} bytes exceeds the shm limit of {MAX_SEND}",
                wr.wr_id, wr.local.len
            )));
        }
        if self.dead {
            // Posting to a QP in the error state flushes, as verbs does.
            self.cq.extend(wrs.iter().map(Completion::flushed));
            return Ok(());
        }
        if self.socket_due() {
            // A dead peer fails new requests, not only polls.
            self.service_socket();
            if self.dead {
                self.cq.extend(wrs.iter().map(Completion::flushed));
                return Ok(());
            }
        }
        self.retire();
        if self.sq.len() + wrs.len() > self.sq_depth {
            return Err(FabricError::QueueFull(self.sq_depth));
        }
        self.sq.extend(wrs.iter().map(|&wr| SqEntry {
            wr,
            state: State::Pending,
        }));
        self.execute();
        Ok(())
    }

    fn post_recv(&mut self, wrs: &[RecvRequest]) -> Result<(), FabricError> {
        if self.dead {
            for r in wrs {
                self.complete_recv(r, WcStatus::Flushed, WcOpcode::Recv, 0, None);
            }
            return Ok(());
        }
        if self.rq.len() + wrs.len() > self.rq_depth {
            return Err(FabricError::QueueFull(self.rq_depth));
        }
        self.rq.extend(wrs.iter().copied());
        self.posted += wrs.len() as u64;
        self.mine()
            .u64_at(Ctrl::Posted)
            .store(self.posted, Ordering::Release);
        // Messages may be waiting for exactly these receives.
        self.consume();
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        self.progress();
        let n = out.len().min(self.cq.len());
        for (slot, c) in out.iter_mut().zip(self.cq.drain(..n)) {
            *slot = c;
        }
        Ok(n)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), FabricError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.progress();
            if !self.cq.is_empty() {
                return Ok(());
            }
            if self.dead {
                return Err(FabricError::EndpointDead);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            if self.arm_inner() {
                continue;
            }
            let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // A short cap keeps the RNR clock and the socket check running.
            let ms = left.as_millis().clamp(1, 100) as i32;
            // SAFETY: waits on our epoll fd into a live, correctly sized array.
            unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ev.as_mut_ptr(), 2, ms) };
            self.mine().u32_at(Ctrl::Armed).store(0, Ordering::SeqCst);
            self.wake.drain();
            self.service_socket();
        }
    }

    fn notify_fd(&self) -> std::os::fd::RawFd {
        self.epoll.as_raw_fd()
    }

    fn arm(&mut self) -> Result<(), FabricError> {
        // An agent arms at every wake, and a `recvmsg` costs as much as
        // the rest of the wake: the socket is read only when due. Sooner
        // when the peer's signal did not wake us (the socket may have: a
        // message, a hang-up, which keep the notify set readable, so a
        // sleeper re-arms in a loop until it reads them).
        //
        // Nor is the eventfd read while our armed flag is still up: then
        // nobody signalled since the last arm (the peer takes the flag
        // before it signals, and so do we), and a kick woke us.
        //
        // An edge-triggered watcher is not woken again by an old count, so
        // the eventfd is never read: a taken flag is the signal.
        let taken = self.mine().u32_at(Ctrl::Armed).load(Ordering::SeqCst) == 0;
        let signalled = if self.edge {
            taken
        } else if taken || self.undrained >= DRAIN_EVERY {
            self.undrained = 0;
            self.wake.drain()
        } else {
            self.undrained += 1;
            false
        };
        let due = if signalled {
            SOCKET_CHECK
        } else {
            ARM_SOCKET_CHECK
        };
        if self.last_check.elapsed() >= due {
            self.service_socket();
        }
        if self.arm_inner() {
            // Something is ready already: fire at once, as soft does.
            self.wake.signal();
        }
        Ok(())
    }

    /// The eventfd is then never read. A peer that dies without a word
    /// shows only on the socket, which `arm` reads at most every
    /// millisecond: its one edge, if it comes sooner, is noticed at the
    /// owner's next arm (the agent's sweep arms every queue every 100 ms).
    fn set_edge_triggered(&mut self) {
        self.edge = true;
    }

    fn peer(&self) -> String {
        self.peer_desc.clone()
    }
}

impl Drop for ShmEndpoint {
    fn drop(&mut self) {
        let conn = &self.conn;
        if !conn.closed.swap(true, Ordering::SeqCst) {
            let _ = socket::send(&conn.sock, &Msg::new(Kind::Close), &[]);
            conn.mine
                .u32_at(Ctrl::Error)
                .store(ERR_CLOSED, Ordering::SeqCst);
            conn.mine.u64_at(Ctrl::Epoch).fetch_add(1, Ordering::SeqCst);
            self.peer_wake.signal();
            // The peer stops touching our memory before we return: after a
            // close, as after verbs' QP destroy, it cannot reach us.
            let deadline = Instant::now() + super::FENCE_WAIT;
            while conn.theirs.u32_at(Ctrl::Busy).load(Ordering::SeqCst) != 0
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        socket::shutdown(&conn.sock);
    }
}
