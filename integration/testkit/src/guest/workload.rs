//! A verified random read/write/flush workload on one virtio-blk queue.
//!
//! Every block written gets a versioned pattern; every read is checked
//! against the last completed write of that block. Only one request per
//! block is in flight at a time, so the expected content is always known.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

use super::{fill_pattern, pattern_matches, GuestQueue, BLOCK};
use crate::driver::{add_chain, kick_added, next_used, wait_counted, Slots};
use vrio_core::memory::{GuestMemory, LocalMemory};
use vrio_core::ring::Segment;

#[derive(Debug, Clone, Copy)]
pub struct WorkloadConfig {
    /// Requests to complete on this queue (0: until `duration`).
    pub requests: u64,
    pub duration: Option<Duration>,
    /// Requests in flight (at most the guest's slot depth).
    pub depth: u16,
    pub read_pct: u8,
    pub flush_pct: u8,
    /// Disk blocks this queue owns: `first_block..first_block + blocks`.
    pub first_block: u64,
    pub blocks: u64,
    pub seed: u64,
    /// Share of chains sent through an indirect table, in percent.
    pub indirect_pct: u8,
    /// Give up on a silent device after this long.
    pub stall_timeout: Duration,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            requests: 10_000,
            duration: None,
            depth: 32,
            read_pct: 50,
            flush_pct: 5,
            first_block: 0,
            blocks: 1024,
            seed: 1,
            indirect_pct: 25,
            stall_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QueueReport {
    pub completed: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes: u64,
    /// Completions with a status other than OK.
    pub io_errors: u64,
    /// Reads whose data did not match the last write.
    pub corrupt: u64,
    /// Requests still outstanding when the device went silent.
    pub lost: u64,
    /// Used entries that were wrong: duplicate or unknown ids, bad lengths.
    pub protocol_errors: u64,
    pub elapsed: Duration,
    /// Request latency in nanoseconds.
    pub latency: Histogram<u64>,
    /// CPU time of the guest threads that drove the queues, from their
    /// thread clocks ([`crate::runner::drive_guests`] sets it; 0 from
    /// [`run_queue`] alone).
    pub cpu_ns: u64,
}

impl QueueReport {
    fn new() -> Self {
        Self {
            completed: 0,
            reads: 0,
            writes: 0,
            flushes: 0,
            bytes: 0,
            io_errors: 0,
            corrupt: 0,
            lost: 0,
            protocol_errors: 0,
            elapsed: Duration::ZERO,
            // 3 significant digits up to 100 s: cannot fail.
            latency: Histogram::new_with_bounds(1, 100_000_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).expect("3 sigfigs is valid")),
            cpu_ns: 0,
        }
    }

    pub fn empty() -> Self {
        Self::new()
    }

    /// Errors of any kind: must be 0 for a correct device.
    pub fn failures(&self) -> u64 {
        self.io_errors + self.corrupt + self.lost + self.protocol_errors
    }

    pub fn merge(&mut self, o: &QueueReport) {
        self.completed += o.completed;
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.bytes += o.bytes;
        self.io_errors += o.io_errors;
        self.corrupt += o.corrupt;
        self.lost += o.lost;
        self.protocol_errors += o.protocol_errors;
        self.elapsed = self.elapsed.max(o.elapsed);
        let _ = self.latency.add(&o.latency);
        self.cpu_ns += o.cpu_ns;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    op: Op,
    block: u64,
    version: u32,
    start: Instant,
}

/// Drives one queue until the workload is done; never panics on device
/// misbehaviour, it counts it.
pub fn run_queue(
    q: &mut GuestQueue,
    mem: &LocalMemory,
    cfg: &WorkloadConfig,
    progress: &AtomicU64,
    stop: &AtomicBool,
) -> QueueReport {
    let mut r = QueueReport::new();
    let depth = cfg.depth.min(q.slots.depth).max(1);
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let mut versions = vec![0u32; cfg.blocks as usize];
    let mut busy_block = vec![false; cfg.blocks as usize];
    let mut slots = vec![
        Slot {
            busy: false,
            op: Op::Flush,
            block: 0,
            version: 0,
            start: Instant::now(),
        };
        usize::from(depth)
    ];
    let mut free = Slots::new(depth, q.driver.layout().size);
    let mut buf = vec![0u8; BLOCK as usize];
    let started = Instant::now();
    let mut issued: u64 = 0;
    let mut last_progress = Instant::now();

    let done_issuing = |issued: u64| {
        stop.load(Relaxed)
            || (cfg.requests > 0 && issued >= cfg.requests)
            || cfg.duration.is_some_and(|d| started.elapsed() >= d)
    };

    loop {
        // Issue as many as the depth allows.
        let mut added = 0;
        while !done_issuing(issued) {
            let Some(si) = free.next_free() else { break };
            let roll = rng.gen_range(0..100u8);
            let op = if roll < cfg.read_pct {
                Op::Read
            } else if roll < cfg.read_pct.saturating_add(cfg.flush_pct) {
                Op::Flush
            } else {
                Op::Write
            };
            let mut block = 0;
            if op != Op::Flush && cfg.blocks > 0 {
                let mut found = None;
                for _ in 0..8 {
                    let b = rng.gen_range(0..cfg.blocks);
                    if !busy_block[b as usize] {
                        found = Some(b);
                        break;
                    }
                }
                let Some(b) = found else { break };
                block = b;
            }
            let disk_block = cfg.first_block + block;
            let (kind, version) = match op {
                Op::Read => (VIRTIO_BLK_T_IN, versions[block as usize]),
                Op::Write => (VIRTIO_BLK_T_OUT, versions[block as usize] + 1),
                Op::Flush => (VIRTIO_BLK_T_FLUSH, 0),
            };
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&kind.to_le_bytes());
            let sector = if op == Op::Flush {
                0
            } else {
                disk_block * (BLOCK / 512)
            };
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            let s = &q.slots;
            let ok = mem
                .write(s.header(si), &hdr)
                .and_then(|_| mem.write(s.status(si), &[0xff]));
            let ok = ok.and_then(|_| match op {
                Op::Write => {
                    fill_pattern(&mut buf, cfg.seed, disk_block, version);
                    mem.write(s.data(si), &buf)
                }
                // Poison, so that a device that does not write is caught.
                Op::Read => mem.write(s.data(si), &[0xa5; BLOCK as usize]),
                Op::Flush => Ok(()),
            });
            if ok.is_err() {
                r.protocol_errors += 1;
                break;
            }
            let hdr_seg = Segment {
                addr: s.header(si),
                len: 16,
            };
            let data_seg = Segment {
                addr: s.data(si),
                len: BLOCK as u32,
            };
            let status_seg = Segment {
                addr: s.status(si),
                len: 1,
            };
            let indirect = rng.gen_range(0..100u8) < cfg.indirect_pct;
            let (readable, writable): (&[Segment], &[Segment]) = match op {
                Op::Read => (&[hdr_seg], &[data_seg, status_seg]),
                Op::Write => (&[hdr_seg, data_seg], &[status_seg]),
                Op::Flush => (&[hdr_seg], &[status_seg]),
            };
            let res = add_chain(&mut q.driver, mem, readable, writable, indirect);
            let head = match res {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(error = %e, "ring full");
                    break;
                }
            };
            free.take(head);
            if op != Op::Flush {
                busy_block[block as usize] = true;
            }
            slots[usize::from(si)] = Slot {
                busy: true,
                op,
                block,
                version,
                start: Instant::now(),
            };
            issued += 1;
            added += 1;
        }
        if !kick_added(&mut q.driver, mem, &q.kick, added, &mut r.protocol_errors) {
            break;
        }
        let outstanding = usize::from(depth) - free.free();
        if outstanding == 0 && done_issuing(issued) {
            break;
        }

        // Reap what completed.
        let mut reaped = 0;
        loop {
            let Ok(used) = next_used(&mut q.driver, mem, "", &mut r.protocol_errors) else {
                r.lost += (usize::from(depth) - free.free()) as u64;
                r.elapsed = started.elapsed();
                return r;
            };
            let Some((head, len)) = used else { break };
            reaped += 1;
            let Some((si, slot)) = free.complete(head).and_then(|si| {
                let slot = slots.get_mut(usize::from(si))?;
                slot.busy = false;
                Some((si, *slot))
            }) else {
                r.protocol_errors += 1;
                continue;
            };
            r.completed += 1;
            progress.fetch_add(1, Relaxed);
            let lat = slot.start.elapsed().as_nanos() as u64;
            let _ = r.latency.record(lat.max(1));
            let mut status = [0xffu8];
            let ok = mem.read(q.slots.status(si), &mut status).is_ok()
                && u32::from(status[0]) == VIRTIO_BLK_S_OK;
            if !ok {
                r.io_errors += 1;
            }
            // A failed read returns its status alone.
            let expect_len = match slot.op {
                Op::Read if ok => BLOCK as u32 + 1,
                _ => 1,
            };
            if len != expect_len {
                r.protocol_errors += 1;
            }
            let disk_block = cfg.first_block + slot.block;
            match slot.op {
                Op::Write => {
                    r.writes += 1;
                    r.bytes += BLOCK;
                    versions[slot.block as usize] = slot.version;
                    busy_block[slot.block as usize] = false;
                }
                Op::Read => {
                    r.reads += 1;
                    r.bytes += BLOCK;
                    busy_block[slot.block as usize] = false;
                    // A failed read (counted above) has no data to check.
                    if ok
                        && (mem.read(q.slots.data(si), &mut buf).is_err()
                            || !pattern_matches(&buf, cfg.seed, disk_block, slot.version))
                    {
                        tracing::error!(
                            block = disk_block,
                            version = slot.version,
                            "corrupt block read back"
                        );
                        r.corrupt += 1;
                    }
                }
                Op::Flush => r.flushes += 1,
            }
        }
        if reaped > 0 {
            last_progress = Instant::now();
            continue;
        }
        let outstanding = usize::from(depth) - free.free();
        if outstanding > 0 && (free.free() == 0 || done_issuing(issued) || added == 0) {
            // Wait for an interrupt.
            let called = wait_counted(&mut q.driver, mem, &q.call, 100, &mut r.protocol_errors);
            let Some(look_again) = called else { break };
            if look_again {
                continue;
            }
            if last_progress.elapsed() > cfg.stall_timeout {
                tracing::error!(outstanding, "device stalled; giving up");
                r.lost += outstanding as u64;
                break;
            }
        }
    }
    r.elapsed = started.elapsed();
    r
}
