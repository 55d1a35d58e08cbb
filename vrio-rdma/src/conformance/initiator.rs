//! The suite's initiator: every case, written once against `&dyn Domain`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::memory::{checksum, pattern_vec, MemfdMemory};
use super::proto::{self, Msg, MSG};
use super::{Summary, RO_SEED};
use crate::api::{
    Access, Completion, Domain, Endpoint, EndpointConfig, FabricError, MemoryRegion, Opcode,
    RecvRequest, RemoteRegion, SendRequest, Sge, WcStatus,
};

// Layout of the initiator's local memory.
const L_SRC: usize = 0;
const L_DST: usize = (1 << 20) + (64 << 10);
const L_BULK: usize = 9 << 18;
const L_CTRL: usize = 3 << 20;
const LOCAL_LEN: usize = 4 << 20;
/// The last page is mapped but not registered (for the local fault case).
const LOCAL_REG: usize = LOCAL_LEN - 4096;

const RECV_SLOTS: usize = 32;
const SEND_SLOTS: usize = 8;
const RECV_WR: u64 = 1 << 40;
const SEND_WR: u64 = 1 << 41;

const SIZES: [usize; 6] = [1, 7, 64, 4096, 65536, 1 << 20];
const MANY: usize = 1000;

/// How the initiator reaches its target.
#[derive(Debug, Clone)]
pub struct InitiatorOptions {
    /// The target's listening address.
    pub addr: String,
    /// The target is another process; DIE kills all its connections.
    pub target_is_process: bool,
    /// Longest wait for any one step (generous: Soft-RoCE under TCG is slow).
    pub timeout: Duration,
    /// Longest wait for a dead peer's requests to be flushed (verbs waits
    /// for transport retries).
    pub dead_peer_timeout: Duration,
}

impl InitiatorOptions {
    /// Options for `addr` with the default timeouts (60 s per step, 180 s
    /// for a dead peer's flush).
    pub fn new(addr: &str, target_is_process: bool) -> Self {
        Self {
            addr: addr.to_string(),
            target_is_process,
            timeout: Duration::from_secs(60),
            dead_peer_timeout: Duration::from_secs(180),
        }
    }
}

struct Conn {
    ep: Box<dyn Endpoint>,
    rw: RemoteRegion,
    ro: RemoteRegion,
    data: VecDeque<Completion>,
    recvs: VecDeque<Completion>,
    next_send: usize,
    /// The peer is being killed: a control SEND may fail with it.
    dying: bool,
}

struct Initiator<'a> {
    domain: &'a dyn Domain,
    opts: InitiatorOptions,
    // Field order is drop order: the region before its memory.
    mr: Box<dyn MemoryRegion>,
    mem: MemfdMemory,
}

type CaseResult = Result<(), String>;

fn err(e: FabricError) -> String {
    e.to_string()
}

fn first_diff(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!("byte {i}: got {:#04x}, want {:#04x}", got[i], want[i]),
        None => format!("length {} vs {}", got.len(), want.len()),
    }
}

impl<'a> Initiator<'a> {
    fn new(domain: &'a dyn Domain, opts: InitiatorOptions) -> Result<Self, FabricError> {
        let mem = MemfdMemory::new("vrio-conformance-initiator", LOCAL_LEN)?;
        // SAFETY: `mem` outlives `mr` (field order in `Initiator`).
        let mr = unsafe { domain.register(mem.ptr(), LOCAL_REG, Access::LOCAL_ONLY)? };
        Ok(Self {
            domain,
            opts,
            mr,
            mem,
        })
    }

    fn cfg(&self) -> EndpointConfig {
        EndpointConfig {
            send_depth: 1024,
            recv_depth: 64,
            ..EndpointConfig::default()
        }
    }

    fn sge(&self, off: usize, len: usize) -> Sge {
        Sge {
            lkey: self.mr.lkey(),
            addr: self.mem.addr() + off as u64,
            len: len as u32,
        }
    }

    fn recv_wr(&self, slot: usize) -> RecvRequest {
        RecvRequest {
            wr_id: RECV_WR + slot as u64,
            local: self.sge(L_CTRL + slot * MSG, MSG),
        }
    }

    /// Connects, posts control receives, and learns the target's regions.
    /// Retries a few times: the first SEND can race the target's first
    /// posted receive on verbs if RNR retries are limited.
    fn connect(&self) -> Result<Conn, String> {
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            match self.try_connect() {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(format!("connect to {}: {last}", self.opts.addr))
    }

    fn try_connect(&self) -> Result<Conn, String> {
        let mut ep = self
            .domain
            .connect(&self.opts.addr, self.cfg())
            .map_err(err)?;
        let recvs: Vec<RecvRequest> = (0..RECV_SLOTS).map(|s| self.recv_wr(s)).collect();
        ep.post_recv(&recvs).map_err(err)?;
        let mut c = Conn {
            ep,
            rw: RemoteRegion::default(),
            ro: RemoteRegion::default(),
            data: VecDeque::new(),
            recvs: VecDeque::new(),
            next_send: 0,
            dying: false,
        };
        self.send_msg(&mut c, &proto::new(proto::HELLO))?;
        let m = self.recv_msg(&mut c)?;
        if proto::op(&m) != proto::REGIONS {
            return Err(format!("expected REGIONS, got op {}", proto::op(&m)));
        }
        c.rw = RemoteRegion::from_bytes(&m[4..24]).map_err(err)?;
        c.ro = RemoteRegion::from_bytes(&m[24..44]).map_err(err)?;
        Ok(c)
    }

    /// Moves whatever completed into the per-kind queues; waits a little if
    /// nothing did.
    fn pump(&self, c: &mut Conn) -> Result<(), String> {
        let mut buf = [Completion::EMPTY; 64];
        let mut n = c.ep.poll(&mut buf).map_err(err)?;
        if n == 0 {
            c.ep.wait(Duration::from_millis(100)).map_err(err)?;
            n = c.ep.poll(&mut buf).map_err(err)?;
        }
        for x in &buf[..n] {
            // Error completions only guarantee wr_id and status (verbs), so
            // sort by wr_id range.
            if x.wr_id >= SEND_WR {
                if !x.status.is_ok() && !c.dying {
                    return Err(format!("control SEND completed {:?}", x.status));
                }
            } else if x.wr_id >= RECV_WR {
                c.recvs.push_back(*x);
            } else {
                c.data.push_back(*x);
            }
        }
        Ok(())
    }

    /// Waits for `n` data completions.
    fn wait_data(
        &self,
        c: &mut Conn,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Completion>, String> {
        let deadline = Instant::now() + timeout;
        while c.data.len() < n {
            if Instant::now() > deadline {
                return Err(format!(
                    "timed out with {} of {n} completions",
                    c.data.len()
                ));
            }
            if let Err(e) = self.pump(c) {
                if c.data.len() < n {
                    return Err(format!("{e} after {} of {n} completions", c.data.len()));
                }
            }
        }
        Ok(c.data.drain(..n).collect())
    }

    fn send_msg(&self, c: &mut Conn, m: &Msg) -> Result<(), String> {
        let slot = RECV_SLOTS + c.next_send % SEND_SLOTS;
        c.next_send += 1;
        self.mem.write(L_CTRL + slot * MSG, m);
        c.ep.post_send(&[SendRequest {
            wr_id: SEND_WR + slot as u64,
            opcode: Opcode::Send,
            local: self.sge(L_CTRL + slot * MSG, MSG),
            signaled: true,
        }])
        .map_err(err)
    }

    fn recv_msg(&self, c: &mut Conn) -> Result<Msg, String> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            if let Some(r) = c.recvs.pop_front() {
                if !r.status.is_ok() {
                    return Err(format!("control receive completed {:?}", r.status));
                }
                let slot = (r.wr_id - RECV_WR) as usize;
                let mut m = [0u8; MSG];
                self.mem.read(L_CTRL + slot * MSG, &mut m);
                c.ep.post_recv(&[self.recv_wr(slot)]).map_err(err)?;
                return Ok(m);
            }
            if Instant::now() > deadline {
                return Err("timed out waiting for a control message".into());
            }
            self.pump(c)?;
        }
    }

    fn op(&self, wr_id: u64, opcode: Opcode, local_off: usize, len: usize) -> SendRequest {
        SendRequest {
            wr_id,
            opcode,
            local: self.sge(local_off, len),
            signaled: true,
        }
    }

    fn read_op(r: &RemoteRegion, off: usize) -> Opcode {
        Opcode::Read {
            remote_addr: r.addr + off as u64,
            rkey: r.rkey,
        }
    }

    fn write_op(r: &RemoteRegion, off: usize) -> Opcode {
        Opcode::Write {
            remote_addr: r.addr + off as u64,
            rkey: r.rkey,
        }
    }

    /// Posts and expects every request to succeed, in order.
    fn run_ok(&self, c: &mut Conn, wrs: &[SendRequest]) -> CaseResult {
        c.ep.post_send(wrs).map_err(err)?;
        let n = wrs.iter().filter(|w| w.signaled).count();
        let done = self.wait_data(c, n, self.opts.timeout)?;
        for (w, d) in wrs.iter().filter(|w| w.signaled).zip(&done) {
            if d.wr_id != w.wr_id {
                return Err(format!(
                    "completion for wr {} arrived where wr {} was due",
                    d.wr_id, w.wr_id
                ));
            }
            if !d.status.is_ok() {
                return Err(format!("wr {} completed {:?}", d.wr_id, d.status));
            }
        }
        Ok(())
    }

    fn read_sizes(&self, c: &mut Conn) -> CaseResult {
        for (i, &size) in SIZES.iter().enumerate() {
            let off = 3 + i * 500;
            self.mem.write(L_DST, &vec![0xEE; size]);
            self.run_ok(
                c,
                &[self.op(i as u64, Self::read_op(&c.ro, off), L_DST, size)],
            )?;
            let got = self.mem.to_vec(L_DST, size);
            let want = pattern_vec(RO_SEED, off, size);
            if got != want {
                return Err(format!("READ of {size} B: {}", first_diff(&got, &want)));
            }
        }
        Ok(())
    }

    fn write_sizes(&self, c: &mut Conn) -> CaseResult {
        for (i, &size) in SIZES.iter().enumerate() {
            let off = 5 + i * 777;
            let want = pattern_vec(size as u64, 0, size);
            self.mem.write(L_SRC, &want);
            self.mem.write(L_DST, &vec![0xEE; size]);
            self.run_ok(
                c,
                &[
                    self.op(10 + i as u64, Self::write_op(&c.rw, off), L_SRC, size),
                    self.op(20 + i as u64, Self::read_op(&c.rw, off), L_DST, size),
                ],
            )?;
            let got = self.mem.to_vec(L_DST, size);
            if got != want {
                return Err(format!(
                    "WRITE of {size} B read back: {}",
                    first_diff(&got, &want)
                ));
            }
        }
        Ok(())
    }

    /// Unsignalled WRITEs to one place, then a READ in the same batch: RC
    /// executes in order, so the READ sees the last WRITE and is the only
    /// completion. Then a mixed batch completes in posting order.
    fn ordering(&self, c: &mut Conn) -> CaseResult {
        let (off, len) = (4096, 256);
        let mut wrs = Vec::new();
        for k in 0..16u64 {
            let src = L_SRC + k as usize * len;
            self.mem.write(src, &pattern_vec(100 + k, 0, len));
            let mut w = self.op(100 + k, Self::write_op(&c.rw, off), src, len);
            w.signaled = false;
            wrs.push(w);
        }
        wrs.push(self.op(200, Self::read_op(&c.rw, off), L_DST, len));
        self.run_ok(c, &wrs)?;
        let got = self.mem.to_vec(L_DST, len);
        let want = pattern_vec(115, 0, len);
        if got != want {
            return Err(format!("READ after 16 WRITEs: {}", first_diff(&got, &want)));
        }
        if let Some(extra) = c.data.front() {
            return Err(format!(
                "unsignalled wr {} produced a completion",
                extra.wr_id
            ));
        }
        let mixed: Vec<SendRequest> = (0..24u64)
            .map(|k| {
                let o = 8192 + k as usize * 64;
                if k % 3 == 2 {
                    self.op(300 + k, Self::read_op(&c.ro, o), L_DST + o, 64)
                } else {
                    self.op(300 + k, Self::write_op(&c.rw, o), L_SRC, 64)
                }
            })
            .collect();
        self.run_ok(c, &mixed)
    }

    /// A WRITE and then a WRITE_WITH_IMM: when the target sees the immediate
    /// both WRITEs' data must already be in its memory.
    fn write_with_imm(&self, c: &mut Conn) -> CaseResult {
        let (o1, l1, o2, l2) = (65536usize, 4096usize, 131072usize, 65536usize);
        let d1 = pattern_vec(7001, 0, l1);
        let d2 = pattern_vec(7002, 0, l2);
        self.mem.write(L_SRC, &d1);
        self.mem.write(L_SRC + l1, &d2);
        let imm = 0xC0FF_EE01;
        self.send_msg(
            c,
            &proto::expect(&proto::Expect {
                imm,
                ranges: [
                    (o1 as u64, l1 as u64, checksum(&d1)),
                    (o2 as u64, l2 as u64, checksum(&d2)),
                ],
            }),
        )?;
        let remote_addr = c.rw.addr + o2 as u64;
        self.run_ok(
            c,
            &[
                self.op(400, Self::write_op(&c.rw, o1), L_SRC, l1),
                self.op(
                    401,
                    Opcode::WriteWithImm {
                        remote_addr,
                        rkey: c.rw.rkey,
                        imm,
                    },
                    L_SRC + l1,
                    l2,
                ),
            ],
        )?;
        let m = self.recv_msg(c)?;
        if proto::op(&m) != proto::IMM_RESULT {
            return Err(format!("expected IMM_RESULT, got op {}", proto::op(&m)));
        }
        let seen = proto::get_u32(&m, 8);
        if seen != imm {
            return Err(format!("target saw immediate {seen:#x}, sent {imm:#x}"));
        }
        if proto::get_u32(&m, 4) != 1 {
            return Err("target saw the immediate before the data was in place".into());
        }
        Ok(())
    }

    fn send_recv(&self, c: &mut Conn) -> CaseResult {
        for k in 0..10u64 {
            let mut m = proto::new(proto::ECHO);
            m[4..].copy_from_slice(&pattern_vec(900 + k, 0, MSG - 4));
            self.send_msg(c, &m)?;
            let r = self.recv_msg(c)?;
            if proto::op(&r) != proto::ECHO_REPLY || r[4..] != m[4..] {
                return Err(format!("echo {k} came back different"));
            }
        }
        Ok(())
    }

    /// 1,000 WRITEs outstanding at once, then 1,000 READs.
    fn outstanding(&self, c: &mut Conn) -> CaseResult {
        let len = 64;
        for k in 0..MANY {
            self.mem
                .write(L_BULK + k * len, &pattern_vec(k as u64, 0, len));
        }
        let base = 262_144;
        let writes: Vec<SendRequest> = (0..MANY)
            .map(|k| {
                self.op(
                    k as u64,
                    Self::write_op(&c.rw, base + k * len),
                    L_BULK + k * len,
                    len,
                )
            })
            .collect();
        self.run_ok(c, &writes)?;
        self.mem.write(L_DST, &vec![0u8; MANY * len]);
        let reads: Vec<SendRequest> = (0..MANY)
            .map(|k| {
                self.op(
                    5000 + k as u64,
                    Self::read_op(&c.rw, base + k * len),
                    L_DST + k * len,
                    len,
                )
            })
            .collect();
        self.run_ok(c, &reads)?;
        let got = self.mem.to_vec(L_DST, MANY * len);
        let want = self.mem.to_vec(L_BULK, MANY * len);
        if got != want {
            return Err(format!("1000 READs: {}", first_diff(&got, &want)));
        }
        Ok(())
    }

    /// Posts `bad` followed by three good READs on a fresh connection:
    /// `bad` completes with `want`, the rest are flushed, the endpoint is in
    /// the error state (new requests flush or are refused), and a new
    /// connection works.
    fn fault_case(&self, want: WcStatus, bad: impl Fn(&Conn) -> SendRequest) -> CaseResult {
        let mut c = self.connect()?;
        let mut wrs = vec![bad(&c)];
        for k in 1..4u64 {
            wrs.push(self.op(k, Self::read_op(&c.ro, 0), L_DST + 64 * k as usize, 64));
        }
        c.ep.post_send(&wrs).map_err(err)?;
        let done = self.wait_data(&mut c, wrs.len(), self.opts.timeout)?;
        if done[0].wr_id != wrs[0].wr_id || done[0].status != want {
            return Err(format!(
                "faulting wr completed as wr {} {:?}, want {:?}",
                done[0].wr_id, done[0].status, want
            ));
        }
        for d in &done[1..] {
            if d.status != WcStatus::Flushed {
                return Err(format!(
                    "wr {} after the fault completed {:?}, want Flushed",
                    d.wr_id, d.status
                ));
            }
        }
        // The endpoint is in the error state now.
        match c
            .ep
            .post_send(&[self.op(9, Self::read_op(&c.ro, 0), L_DST, 64)])
        {
            Err(FabricError::EndpointDead) => {}
            Err(e) => return Err(format!("post after the fault failed oddly: {e}")),
            Ok(()) => {
                let d = self.wait_data(&mut c, 1, self.opts.timeout)?;
                if d[0].status != WcStatus::Flushed {
                    return Err(format!(
                        "request posted after the fault completed {:?}, want Flushed",
                        d[0].status
                    ));
                }
            }
        }
        drop(c);
        // Reconnecting gives a working endpoint.
        let mut c = self
            .connect()
            .map_err(|e| format!("reconnect after the fault: {e}"))?;
        self.mem.write(L_DST, &[0u8; 64]);
        let wr = self.op(20, Self::read_op(&c.ro, 64), L_DST, 64);
        self.run_ok(&mut c, &[wr])?;
        if self.mem.to_vec(L_DST, 64) != pattern_vec(RO_SEED, 64, 64) {
            return Err("READ on the new connection returned wrong data".into());
        }
        Ok(())
    }

    fn bad_rkey(&self) -> CaseResult {
        self.fault_case(WcStatus::RemoteAccessError, |c| {
            let mut rkey = c.ro.rkey ^ 0x00A5_5A00;
            if rkey == c.rw.rkey {
                rkey ^= 0x0100_0000;
            }
            self.op(
                0,
                Opcode::Read {
                    remote_addr: c.ro.addr,
                    rkey,
                },
                L_DST,
                64,
            )
        })
    }

    fn out_of_bounds(&self) -> CaseResult {
        self.fault_case(WcStatus::RemoteAccessError, |c| {
            self.op(0, Self::read_op(&c.rw, c.rw.len as usize - 32), L_DST, 64)
        })
    }

    fn write_read_only(&self) -> CaseResult {
        self.fault_case(WcStatus::RemoteAccessError, |c| {
            self.op(0, Self::write_op(&c.ro, 0), L_SRC, 64)
        })
    }

    /// The local sge runs past the end of its region.
    fn local_protection(&self) -> CaseResult {
        self.fault_case(WcStatus::LocalProtectionError, |c| {
            self.op(0, Self::write_op(&c.rw, 0), LOCAL_REG - 32, 64)
        })
    }

    /// Fencing: once the target has deregistered a region, a WRITE into it
    /// fails with RemoteAccessError and changes nothing, even though the
    /// target keeps the memory.
    fn deregistered_region(&self) -> CaseResult {
        let mut c = self.connect()?;
        self.send_msg(&mut c, &proto::new(proto::TEMP))?;
        let m = self.recv_msg(&mut c)?;
        if proto::op(&m) != proto::TEMP_REGION {
            return Err(format!("expected TEMP_REGION, got op {}", proto::op(&m)));
        }
        let r = RemoteRegion::from_bytes(&m[4..24]).map_err(err)?;
        let len = 4096;
        self.mem.write(L_SRC, &pattern_vec(31, 0, len));
        self.run_ok(
            &mut c,
            &[
                self.op(700, Self::write_op(&r, 4096), L_SRC, len),
                self.op(701, Self::read_op(&r, 4096), L_DST, len),
            ],
        )?;
        if self.mem.to_vec(L_DST, len) != pattern_vec(31, 0, len) {
            return Err("WRITE to the fresh region did not read back".into());
        }
        self.send_msg(&mut c, &proto::new(proto::TEMP_DROP))?;
        let m = self.recv_msg(&mut c)?;
        if proto::op(&m) != proto::TEMP_SUM {
            return Err(format!("expected TEMP_SUM, got op {}", proto::op(&m)));
        }
        let before = proto::get_u64(&m, 8);
        self.mem.write(L_SRC, &pattern_vec(32, 0, len));
        c.ep.post_send(&[self.op(702, Self::write_op(&r, 0), L_SRC, len)])
            .map_err(err)?;
        let d = self.wait_data(&mut c, 1, self.opts.timeout)?;
        if d[0].status != WcStatus::RemoteAccessError {
            return Err(format!(
                "WRITE to a deregistered region completed {:?}, want RemoteAccessError",
                d[0].status
            ));
        }
        drop(c);
        let mut c = self.connect()?;
        self.send_msg(&mut c, &proto::new(proto::TEMP_CHECK))?;
        let m = self.recv_msg(&mut c)?;
        if proto::op(&m) != proto::TEMP_SUM || proto::get_u64(&m, 8) != before {
            return Err("the deregistered region's memory changed after deregistration".into());
        }
        Ok(())
    }

    /// The peer dies while READs are outstanding: keep up to 64 in flight
    /// until errors appear, then everything completes (nothing hangs):
    /// successes only before the first error, which is RetryExceeded or
    /// Flushed, and Flushed after it, all in posting order.
    fn killed_peer(&self) -> CaseResult {
        let mut c = self.connect()?;
        c.dying = true;
        self.send_msg(&mut c, &proto::new(proto::DIE))?;
        let deadline = Instant::now() + self.opts.dead_peer_timeout;
        let (mut next, mut outstanding, mut dead) = (0u64, 0usize, false);
        let mut done: Vec<Completion> = Vec::new();
        loop {
            if !dead && outstanding < 64 && next < 1_000_000 {
                let wrs: Vec<SendRequest> = (next..next + 16)
                    .map(|k| {
                        self.op(
                            k,
                            Self::read_op(&c.ro, 0),
                            L_DST + (k as usize % 16) * 4096,
                            4096,
                        )
                    })
                    .collect();
                match c.ep.post_send(&wrs) {
                    Ok(()) => {
                        next += 16;
                        outstanding += 16;
                    }
                    Err(FabricError::EndpointDead) => dead = true,
                    Err(e) => return Err(format!("post while the peer dies: {e}")),
                }
            }
            if dead && outstanding == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("timed out: {outstanding} requests never completed"));
            }
            // An endpoint that reports itself dead has nothing left to give.
            if let Err(e) = self.pump(&mut c) {
                if outstanding > 0 {
                    return Err(format!("{e} with {outstanding} requests outstanding"));
                }
            }
            while let Some(d) = c.data.pop_front() {
                outstanding = outstanding.saturating_sub(1);
                dead |= !d.status.is_ok();
                done.push(d);
            }
        }
        let Some(i) = done.iter().position(|d| !d.status.is_ok()) else {
            return Err("the peer died but no request failed".into());
        };
        if !matches!(done[i].status, WcStatus::RetryExceeded | WcStatus::Flushed) {
            return Err(format!(
                "first error is {:?}, want RetryExceeded or Flushed",
                done[i].status
            ));
        }
        if let Some(d) = done[i + 1..].iter().find(|d| d.status != WcStatus::Flushed) {
            return Err(format!(
                "wr {} after the first error completed {:?}, want Flushed",
                d.wr_id, d.status
            ));
        }
        if let Some((k, d)) = done.iter().enumerate().find(|(k, d)| d.wr_id != *k as u64) {
            return Err(format!("completions out of order at {k}: wr {}", d.wr_id));
        }
        Ok(())
    }
}

/// Runs every case against the target at `opts.addr`, printing one line per
/// case and the closing `N passed, M failed` line to `out`.
pub fn run_initiator(
    domain: &dyn Domain,
    opts: InitiatorOptions,
    out: &mut dyn std::io::Write,
) -> Result<Summary, FabricError> {
    let ini = Initiator::new(domain, opts)?;
    let mut sum = Summary::default();
    let mut report = |name: &str, r: CaseResult| {
        sum.record(name, r, out);
    };
    match ini.connect() {
        Err(e) => report("connect", Err(e)),
        Ok(mut c) => {
            report("connect", Ok(()));
            report("read_sizes", ini.read_sizes(&mut c));
            report("write_sizes", ini.write_sizes(&mut c));
            report("ordering", ini.ordering(&mut c));
            report("write_with_imm", ini.write_with_imm(&mut c));
            report("send_recv", ini.send_recv(&mut c));
            report("outstanding_1000", ini.outstanding(&mut c));
            report("bad_rkey", ini.bad_rkey());
            report("out_of_bounds", ini.out_of_bounds());
            report("write_read_only", ini.write_read_only());
            report("local_protection", ini.local_protection());
            report("deregistered_region", ini.deregistered_region());
            report("killed_peer", ini.killed_peer());
        }
    }
    let _ = writeln!(out, "{} passed, {} failed", sum.passed, sum.failed);
    Ok(sum)
}
