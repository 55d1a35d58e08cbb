//! The suite's target: owns the memory the initiator READs and WRITEs,
//! serves control messages, and dies on request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::memory::{checksum, pattern, MemfdMemory};
use super::proto::{self, Msg, MSG};
use super::{RO_LEN, RO_SEED, RW_LEN};
use crate::api::{
    Access, Completion, Domain, Endpoint, FabricError, Listener, MemoryRegion, Opcode, RecvRequest,
    SendRequest, Sge, WcOpcode,
};

const RECV_SLOTS: usize = 32;
const SEND_SLOTS: usize = 8;
const SEND_WR: u64 = 1 << 41;

/// How [`run_target`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetOptions {
    /// DIE exits the process (two-process mode) rather than dropping only
    /// that connection's endpoint (in-process mode).
    pub exit_process_on_die: bool,
}

// Field order is drop order: regions before the memory they cover.
struct Regions {
    rw: Box<dyn MemoryRegion>,
    ro: Box<dyn MemoryRegion>,
    mem: MemfdMemory,
}

fn setup(domain: &dyn Domain) -> Result<Regions, FabricError> {
    let mem = MemfdMemory::new("vrio-conformance-target", RW_LEN + RO_LEN)?;
    for i in 0..RO_LEN {
        mem.write(RW_LEN + i, &[pattern(RO_SEED, i)]);
    }
    // SAFETY: `mem` outlives both regions: `Regions` and `run_target` drop
    // the regions first.
    let rw = unsafe { domain.register(mem.ptr(), RW_LEN, Access::GUEST_RAM)? };
    // SAFETY: as above; the second range starts inside the same mapping.
    let ro = unsafe { domain.register(mem.ptr().add(RW_LEN), RO_LEN, Access::REMOTE_READ_ONLY)? };
    Ok(Regions { rw, ro, mem })
}

/// Accepts connections and serves each on its own thread until a QUIT
/// message arrives or `stop` is set (then one more connection, or the next
/// one, wakes the accept loop).
pub fn run_target(
    domain: &dyn Domain,
    mut listener: Box<dyn Listener>,
    opts: TargetOptions,
    stop: &AtomicBool,
) -> Result<(), FabricError> {
    let Regions { rw, ro, mem } = setup(domain)?;
    let quit = stop;
    let res = std::thread::scope(|s| loop {
        let ep = match listener.accept() {
            Ok(ep) => ep,
            Err(e) => {
                quit.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        if quit.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (rw, ro, mem) = (&*rw, &*ro, &mem);
        s.spawn(move || {
            if let Err(e) = serve(domain, ep, rw, ro, mem, quit, opts) {
                tracing::info!("conformance target: connection ended: {e}");
            }
        });
    });
    drop((rw, ro));
    drop(mem);
    res
}

// Field order is drop order: the region before its memory.
struct Ctrl {
    mr: Box<dyn MemoryRegion>,
    mem: MemfdMemory,
    next_send: usize,
}

impl Ctrl {
    fn recv_wr(&self, slot: usize) -> RecvRequest {
        RecvRequest {
            wr_id: slot as u64,
            local: Sge {
                lkey: self.mr.lkey(),
                addr: self.mem.addr() + (slot * MSG) as u64,
                len: MSG as u32,
            },
        }
    }

    fn send(&mut self, ep: &mut dyn Endpoint, m: &Msg) -> Result<(), FabricError> {
        let slot = RECV_SLOTS + self.next_send % SEND_SLOTS;
        self.next_send += 1;
        self.mem.write(slot * MSG, m);
        ep.post_send(&[SendRequest {
            wr_id: SEND_WR + slot as u64,
            opcode: Opcode::Send,
            local: Sge {
                lkey: self.mr.lkey(),
                addr: self.mem.addr() + (slot * MSG) as u64,
                len: MSG as u32,
            },
            signaled: true,
        }])
    }
}

fn serve(
    domain: &dyn Domain,
    mut ep: Box<dyn Endpoint>,
    rw: &dyn MemoryRegion,
    ro: &dyn MemoryRegion,
    mem: &MemfdMemory,
    quit: &AtomicBool,
    opts: TargetOptions,
) -> Result<(), FabricError> {
    let cmem = MemfdMemory::new("vrio-conformance-ctrl", (RECV_SLOTS + SEND_SLOTS) * MSG)?;
    // SAFETY: `cmem` outlives the region: `ctrl` drops `mr` before `mem`
    // (field order), and `ep` (declared later) is dropped before `ctrl`.
    let mr = unsafe { domain.register(cmem.ptr(), cmem.len(), Access::LOCAL_ONLY)? };
    let mut ctrl = Ctrl {
        mr,
        mem: cmem,
        next_send: 0,
    };
    let recvs: Vec<RecvRequest> = (0..RECV_SLOTS).map(|s| ctrl.recv_wr(s)).collect();
    ep.post_recv(&recvs)?;
    let mut expect: Option<proto::Expect> = None;
    let mut done = [Completion::EMPTY; 32];
    while !quit.load(Ordering::SeqCst) {
        ep.wait(Duration::from_millis(200))?;
        let n = ep.poll(&mut done)?;
        for c in &done[..n] {
            if c.wr_id >= SEND_WR {
                if !c.status.is_ok() {
                    return Err(FabricError::Protocol(format!(
                        "reply failed: {:?}",
                        c.status
                    )));
                }
                continue;
            }
            if !c.status.is_ok() {
                // The connection is in the error state (verbs semantics).
                return Err(FabricError::Protocol(format!(
                    "receive completed {:?}",
                    c.status
                )));
            }
            let slot = c.wr_id as usize;
            if slot >= RECV_SLOTS {
                return Err(FabricError::Protocol(format!("unknown wr_id {}", c.wr_id)));
            }
            if c.opcode == WcOpcode::RecvWithImm {
                let imm = c.imm.unwrap_or(0);
                let ok = expect.take().is_some_and(|e| {
                    e.imm == imm
                        && e.ranges.iter().all(|&(off, len, sum)| {
                            checksum(&mem.to_vec(off as usize, len as usize)) == sum
                        })
                });
                let mut m = proto::new(proto::IMM_RESULT);
                proto::put_u32(&mut m, 4, u32::from(ok));
                proto::put_u32(&mut m, 8, imm);
                ep.post_recv(&[ctrl.recv_wr(slot)])?;
                ctrl.send(ep.as_mut(), &m)?;
                continue;
            }
            let mut m = [0u8; MSG];
            ctrl.mem.read(slot * MSG, &mut m);
            ep.post_recv(&[ctrl.recv_wr(slot)])?;
            match proto::op(&m) {
                proto::HELLO => {
                    ctrl.send(ep.as_mut(), &proto::regions(rw.remote(), ro.remote()))?
                }
                proto::EXPECT => expect = Some(proto::parse_expect(&m)),
                proto::ECHO => {
                    proto::put_u32(&mut m, 0, proto::ECHO_REPLY);
                    ctrl.send(ep.as_mut(), &m)?;
                }
                proto::DIE => {
                    if opts.exit_process_on_die {
                        tracing::info!("conformance target: exiting hard as asked");
                        std::process::exit(0);
                    }
                    // Dropped without any goodbye.
                    return Ok(());
                }
                proto::QUIT => {
                    quit.store(true, Ordering::SeqCst);
                    ctrl.send(ep.as_mut(), &proto::new(proto::QUIT_ACK))?;
                    // Stay until the acknowledgement is out.
                    let deadline = std::time::Instant::now() + Duration::from_secs(30);
                    while std::time::Instant::now() < deadline {
                        ep.wait(Duration::from_millis(200))?;
                        let n = ep.poll(&mut done)?;
                        if done[..n].iter().any(|c| c.wr_id >= SEND_WR) {
                            break;
                        }
                    }
                    return Ok(());
                }
                other => {
                    return Err(FabricError::Protocol(format!("unknown control op {other}")));
                }
            }
        }
    }
    Ok(())
}
