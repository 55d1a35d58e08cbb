//! Verified traffic for synthetic net guests: a sender that numbers its
//! frames and checksums their payload, a receiver that reassembles
//! mergeable buffers and counts lost, duplicate and corrupt frames.
//!
//! Sender and receiver of one direction share a [`Link`]: the receiver's
//! count opens the sender's window, so that a test can ask for zero loss
//! without the switch's bounded backlogs dropping anything (the window is a
//! test harness's flow control, not the device's).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::driver::{add_chain, kick_added, next_used, wait_counted, Slots};
use crate::net::guest::NetGuestQueue;
use vrio_core::memory::{GuestMemory, LocalMemory};
use vrio_core::net::header::{NetHeader, HDR_LEN};
use vrio_core::net::mac::MacAddr;
use vrio_core::ring::Segment;

/// IEEE "local experimental" EtherType.
pub const ETHERTYPE_TEST: u16 = 0x88b5;
const SEQ: usize = 14;
const LEN: usize = 22;
const SUM: usize = 24;
const DATA: usize = 28;
/// Smallest test frame: Ethernet header, sequence, length, checksum.
pub const MIN_TEST_FRAME: usize = DATA;
/// Sequence numbers beyond this are corrupt (bounds the seen-set).
const MAX_SEQ: u64 = 1 << 32;

fn fnv1a(seed: u64, b: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5 ^ (seed as u32) ^ ((seed >> 32) as u32);
    for &x in b {
        h ^= u32::from(x);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A test frame of `len` bytes (at least [`MIN_TEST_FRAME`]).
pub fn build_frame(dst: MacAddr, src: MacAddr, seq: u64, len: usize) -> Vec<u8> {
    let len = len.max(MIN_TEST_FRAME);
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f[SEQ..LEN].copy_from_slice(&seq.to_le_bytes());
    f[LEN..SUM].copy_from_slice(&(len as u16).to_le_bytes());
    for (i, b) in f[DATA..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i * 7) as u8;
    }
    let sum = fnv1a(seq, &f[DATA..]);
    f[SUM..DATA].copy_from_slice(&sum.to_le_bytes());
    f
}

/// Checks a received test frame: `(dst, src, seq)` when intact.
pub fn check_frame(f: &[u8]) -> Option<(MacAddr, MacAddr, u64)> {
    if f.len() < DATA || u16::from_be_bytes([f[12], f[13]]) != ETHERTYPE_TEST {
        return None;
    }
    let seq = u64::from_le_bytes(f[SEQ..LEN].try_into().ok()?);
    let len = u16::from_le_bytes([f[LEN], f[LEN + 1]]);
    let sum = u32::from_le_bytes(f[SUM..DATA].try_into().ok()?);
    if usize::from(len) != f.len() || sum != fnv1a(seq, &f[DATA..]) {
        return None;
    }
    Some((MacAddr::from_slice(f)?, MacAddr::from_slice(&f[6..])?, seq))
}

/// One direction between two guests.
#[derive(Debug, Default)]
pub struct Link {
    pub sent: AtomicU64,
    /// Frames the receiver got from this sender (intact or corrupt).
    pub received: AtomicU64,
    pub sender_done: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
pub struct SendConfig {
    pub dst: MacAddr,
    /// Frames to send (0: until `duration` or the stop flag).
    pub frames: u64,
    pub duration: Option<Duration>,
    pub frame_len: usize,
    /// Most frames sent but not yet received.
    pub window: u64,
    pub stall_timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct SendReport {
    pub sent: u64,
    pub bytes: u64,
    pub protocol_errors: u64,
    pub stalled: bool,
    pub elapsed: Duration,
}

/// Sends test frames from `src` until the config says stop. Every fourth
/// frame goes as two descriptors (header, frame), and every eighth through
/// an indirect table when negotiated, so the device's gather is exercised.
pub fn run_sender(
    q: &mut NetGuestQueue,
    mem: &LocalMemory,
    src: MacAddr,
    cfg: &SendConfig,
    link: &Link,
    stop: &AtomicBool,
) -> SendReport {
    let mut r = SendReport::default();
    let mut free = Slots::new(q.slots, q.driver.layout().size);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut seq: u64 = 0;
    let hdr = NetHeader::default().to_bytes();
    let frame_len = cfg.frame_len.max(MIN_TEST_FRAME);
    loop {
        let mut reaped = 0;
        loop {
            let Ok(used) = next_used(&mut q.driver, mem, "TX ", &mut r.protocol_errors) else {
                r.elapsed = started.elapsed();
                link.sender_done.store(true, SeqCst);
                return r;
            };
            let Some((head, _)) = used else { break };
            if free.complete(head).is_none() {
                r.protocol_errors += 1;
            }
            reaped += 1;
        }
        let done = stop.load(Relaxed)
            || (cfg.frames > 0 && seq >= cfg.frames)
            || cfg.duration.is_some_and(|d| started.elapsed() >= d);
        let mut added = 0;
        loop {
            if done
                || (cfg.frames > 0 && seq >= cfg.frames)
                || seq.saturating_sub(link.received.load(Relaxed)) >= cfg.window
            {
                break;
            }
            let Some(si) = free.next_free() else { break };
            let addr = q.slot(si);
            let f = build_frame(cfg.dst, src, seq, frame_len);
            if mem.write(addr, &hdr).is_err() || mem.write(addr + HDR_LEN as u64, &f).is_err() {
                r.protocol_errors += 1;
                break;
            }
            let whole = [Segment {
                addr,
                len: (HDR_LEN + f.len()) as u32,
            }];
            let split = [
                Segment {
                    addr,
                    len: HDR_LEN as u32,
                },
                Segment {
                    addr: addr + HDR_LEN as u64,
                    len: f.len() as u32,
                },
            ];
            let segs: &[Segment] = if seq % 4 == 3 { &split } else { &whole };
            let Ok(head) = add_chain(&mut q.driver, mem, segs, &[], seq % 8 == 7) else {
                break;
            };
            free.take(head);
            seq += 1;
            r.bytes += f.len() as u64;
            link.sent.store(seq, SeqCst);
            added += 1;
        }
        if !kick_added(&mut q.driver, mem, &q.kick, added, &mut r.protocol_errors) {
            break;
        }
        let outstanding = q.driver.outstanding();
        if done && outstanding == 0 {
            break;
        }
        if added > 0 || reaped > 0 {
            last_progress = Instant::now();
            continue;
        }
        if outstanding > 0 && (free.free() == 0 || done) {
            let called = wait_counted(&mut q.driver, mem, &q.call, 1, &mut r.protocol_errors);
            let Some(look_again) = called else { break };
            if look_again {
                continue;
            }
        } else {
            // Window closed: the peer has not caught up yet.
            std::thread::sleep(Duration::from_micros(20));
            if link.received.load(Relaxed) + cfg.window > seq {
                last_progress = Instant::now();
            }
        }
        if last_progress.elapsed() > cfg.stall_timeout {
            tracing::error!(outstanding, seq, "TX side stalled; giving up");
            r.stalled = true;
            break;
        }
    }
    r.sent = seq;
    r.elapsed = started.elapsed();
    link.sender_done.store(true, SeqCst);
    r
}

#[derive(Debug, Clone, Copy)]
pub struct RecvConfig {
    /// The only source frames are expected from.
    pub peer: MacAddr,
    /// Give up after this long without a frame while frames are missing.
    pub stall_timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct RecvReport {
    /// Intact frames from the peer, each counted once.
    pub received: u64,
    pub bytes: u64,
    /// Frames whose content does not check out.
    pub corrupt: u64,
    pub duplicate: u64,
    /// Sent but never received.
    pub lost: u64,
    /// Intact frames to us from someone other than the peer.
    pub unexpected: u64,
    /// Intact frames for another guest, seen because the switch flooded
    /// them (its destination was not learned yet): legitimate, not counted.
    pub flooded: u64,
    /// Frames that arrived in more than one buffer.
    pub merged: u64,
    /// Wrong used entries or headers.
    pub protocol_errors: u64,
    pub elapsed: Duration,
}

impl RecvReport {
    pub fn merge(&mut self, o: &RecvReport) {
        self.received += o.received;
        self.bytes += o.bytes;
        self.corrupt += o.corrupt;
        self.duplicate += o.duplicate;
        self.lost += o.lost;
        self.unexpected += o.unexpected;
        self.flooded += o.flooded;
        self.merged += o.merged;
        self.protocol_errors += o.protocol_errors;
        self.elapsed = self.elapsed.max(o.elapsed);
    }
    pub fn failures(&self) -> u64 {
        self.corrupt + self.duplicate + self.lost + self.unexpected + self.protocol_errors
    }
}

struct Assembly {
    left: u16,
    buffers: u16,
    data: Vec<u8>,
}

/// Keeps the RX ring full of buffers and verifies what arrives, until the
/// peer's sender is done and everything it sent arrived (or stalls).
pub fn run_receiver(
    q: &mut NetGuestQueue,
    mem: &LocalMemory,
    me: MacAddr,
    cfg: &RecvConfig,
    link: &Link,
    progress: &AtomicU64,
) -> RecvReport {
    let mut r = RecvReport::default();
    let mut free = Slots::new(q.slots, q.driver.layout().size);
    let mut seen: Vec<u64> = Vec::new();
    let mut asm: Option<Assembly> = None;
    let mut buf = vec![0u8; q.slot_len as usize];
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut counted: u64 = 0;
    'outer: loop {
        // Post every free buffer.
        let mut added = 0;
        while let Some(si) = free.next_free() {
            let seg = Segment {
                addr: q.slot(si),
                len: q.slot_len as u32,
            };
            let Ok(head) = q.driver.add(mem, &[], &[seg], false) else {
                break;
            };
            free.take(head);
            added += 1;
        }
        if !kick_added(&mut q.driver, mem, &q.kick, added, &mut r.protocol_errors) {
            break;
        }
        let mut reaped = 0;
        loop {
            let Ok(used) = next_used(&mut q.driver, mem, "RX ", &mut r.protocol_errors) else {
                break 'outer;
            };
            let Some((head, len)) = used else { break };
            reaped += 1;
            let Some(si) = free.complete(head) else {
                r.protocol_errors += 1;
                continue;
            };
            let len = len as usize;
            if len > buf.len() || mem.read(q.slot(si), &mut buf[..len]).is_err() {
                r.protocol_errors += 1;
                asm = None;
                continue;
            }
            let a = match asm.as_mut() {
                Some(a) => {
                    a.data.extend_from_slice(&buf[..len]);
                    a
                }
                None => {
                    if len < HDR_LEN {
                        r.protocol_errors += 1;
                        continue;
                    }
                    let mut hb = [0u8; HDR_LEN];
                    hb.copy_from_slice(&buf[..HDR_LEN]);
                    let h = NetHeader::from_bytes(&hb);
                    if h.num_buffers == 0 || h.flags != 0 || h.gso_type != 0 {
                        r.protocol_errors += 1;
                        continue;
                    }
                    asm.insert(Assembly {
                        left: h.num_buffers,
                        buffers: h.num_buffers,
                        data: buf[HDR_LEN..len].to_vec(),
                    })
                }
            };
            a.left -= 1;
            if a.left > 0 {
                continue;
            }
            let Some(a) = asm.take() else { continue };
            if a.buffers > 1 {
                r.merged += 1;
            }
            match check_frame(&a.data) {
                None => {
                    r.corrupt += 1;
                    counted += 1;
                }
                Some((dst, _, _)) if dst != me => r.flooded += 1,
                Some((_, src, _)) if src != cfg.peer => r.unexpected += 1,
                Some((_, _, seq)) if seq >= MAX_SEQ => {
                    r.corrupt += 1;
                    counted += 1;
                }
                Some((_, _, seq)) => {
                    let (w, b) = ((seq / 64) as usize, seq % 64);
                    if seen.len() <= w {
                        seen.resize(w + 1, 0);
                    }
                    if seen[w] & (1 << b) != 0 {
                        r.duplicate += 1;
                    } else {
                        seen[w] |= 1 << b;
                        r.received += 1;
                        r.bytes += a.data.len() as u64;
                        counted += 1;
                        progress.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        link.received.store(counted, SeqCst);
        if link.sender_done.load(SeqCst) && counted >= link.sent.load(SeqCst) && asm.is_none() {
            break;
        }
        if reaped > 0 {
            last_progress = Instant::now();
            continue;
        }
        if last_progress.elapsed() > cfg.stall_timeout {
            tracing::error!(
                counted,
                sent = link.sent.load(SeqCst),
                "RX side stalled; giving up"
            );
            break;
        }
        let called = wait_counted(&mut q.driver, mem, &q.call, 1, &mut r.protocol_errors);
        let Some(look_again) = called else { break };
        if look_again {
            continue;
        }
    }
    r.lost = link.sent.load(SeqCst).saturating_sub(counted);
    r.elapsed = started.elapsed();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_check_and_corruption_is_caught() {
        let (a, b) = (MacAddr::local(1), MacAddr::local(2));
        for len in [MIN_TEST_FRAME, 64, 1514] {
            let f = build_frame(b, a, 42, len);
            assert_eq!(f.len(), len);
            assert_eq!(check_frame(&f), Some((b, a, 42)));
            for i in SEQ..len {
                let mut g = f.clone();
                g[i] ^= 0x10;
                assert_eq!(check_frame(&g), None, "flip at {i} of {len}");
            }
            assert_eq!(check_frame(&f[..len - 1]), None);
        }
    }
}
