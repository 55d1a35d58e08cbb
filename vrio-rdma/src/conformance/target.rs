//! The suite's target: owns the memory the initiator READs and WRITEs,
//! serves control messages, and dies on request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
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
    // The read-write region is registered with its file and the read-only
    // one without, so back-ends that treat the two differently (shm maps
    // the first and reaches the second with CMA) run every case on both.
    // SAFETY: `mem` outlives both regions: `Regions` and `run_target` drop
    // the regions first; `mem` maps its memfd from offset 0.
    let rw = unsafe { domain.register_fd(mem.ptr(), RW_LEN, Access::GUEST_RAM, mem.fd(), 0)? };
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
    // The memory of the fencing case's region, shared by all connections:
    // it outlives its registration, so writes after it can be caught.
    let temp: Mutex<Option<MemfdMemory>> = Mutex::new(None);
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
        let t = Target {
            domain,
            rw: &*rw,
            ro: &*ro,
            mem: &mem,
            temp: &temp,
            quit,
            opts,
        };
        s.spawn(move || {
            if let Err(e) = serve(t, ep) {
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

/// What every connection of the target shares.
#[derive(Clone, Copy)]
struct Target<'a> {
    domain: &'a dyn Domain,
    rw: &'a dyn MemoryRegion,
    ro: &'a dyn MemoryRegion,
    mem: &'a MemfdMemory,
    temp: &'a Mutex<Option<MemfdMemory>>,
    quit: &'a AtomicBool,
    opts: TargetOptions,
}

const TEMP_LEN: usize = 4 * 4096;

fn temp_sum(temp: &Mutex<Option<MemfdMemory>>) -> u64 {
    let t = temp.lock().unwrap_or_else(|e| e.into_inner());
    t.as_ref().map_or(0, |m| checksum(&m.to_vec(0, m.len())))
}

fn serve(t: Target<'_>, mut ep: Box<dyn Endpoint>) -> Result<(), FabricError> {
    let Target {
        domain,
        rw,
        ro,
        mem,
        temp,
        quit,
        opts,
    } = t;
    // The fencing case's registration, on this connection.
    let mut temp_mr: Option<Box<dyn MemoryRegion>> = None;
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
                proto::TEMP => {
                    let tm = MemfdMemory::new("vrio-conformance-temp", TEMP_LEN)?;
                    // SAFETY: the memory is kept in `temp` (never dropped
                    // while the target runs), and `tm` maps its memfd from 0.
                    let mr = unsafe {
                        domain.register_fd(tm.ptr(), TEMP_LEN, Access::GUEST_RAM, tm.fd(), 0)?
                    };
                    let mut r = proto::new(proto::TEMP_REGION);
                    r[4..24].copy_from_slice(&mr.remote().to_bytes());
                    temp_mr = Some(mr);
                    // Replacing an older one is fine: its region is gone.
                    *temp.lock().unwrap_or_else(|e| e.into_inner()) = Some(tm);
                    ctrl.send(ep.as_mut(), &r)?;
                }
                proto::TEMP_DROP | proto::TEMP_CHECK => {
                    if proto::op(&m) == proto::TEMP_DROP {
                        // Deregistration fences the peer out before it returns.
                        drop(temp_mr.take());
                    }
                    let mut r = proto::new(proto::TEMP_SUM);
                    proto::put_u64(&mut r, 8, temp_sum(temp));
                    ctrl.send(ep.as_mut(), &r)?;
                }
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
