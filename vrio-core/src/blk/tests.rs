//! Spec-rule tests of the virtio-blk device, driven through real split
//! virtqueues (driver side adds, device side pops) on anonymous memory.

use std::io::{self, IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;

use super::*;
use crate::virtio::memory::{anonymous_memory, GuestMemory, LocalMemory, MemoryError, MemoryMap};
use crate::virtio::ring::{
    DescriptorChain, DeviceQueue, DriverQueue, IndirectArea, RingFeatures, RingLayout, Segment,
};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const QSIZE: u16 = 16;
const INDIRECT_BASE: u64 = 0x8000;
const BUF_BASE: u64 = 0x20000;
const MEM_SIZE: usize = 4 << 20;
/// Status bytes are pre-filled with this, to see whether the device wrote.
const UNTOUCHED: u8 = 0xee;

/// A unique file under the temp dir, removed on drop.
/// `len` bytes of `b` from `off` (poisoned first, so a read that writes
/// nothing shows).
pub(crate) fn read_back(b: &dyn BlockBackend, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0xeeu8; len];
    b.read_vectored_at(off, &mut [IoSliceMut::new(&mut v)])
        .unwrap();
    v
}

pub(crate) struct TempPath(pub PathBuf);

impl TempPath {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("vrio-blk-{}-{tag}-{n}.img", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A synthetic guest with one queue and a bump allocator for buffers.
struct Guest {
    mem: LocalMemory,
    map: MemoryMap,
    drv: DriverQueue,
    dev: DeviceQueue,
    next: u64,
    /// Interposition stages the device runs requests through.
    pipe: Option<Arc<crate::interpose::Pipeline>>,
}

fn hdr(t: u32, sector: u64) -> [u8; 16] {
    RequestHeader {
        request_type: t,
        sector,
    }
    .to_bytes()
}

fn range(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    b[12..].copy_from_slice(&flags.to_le_bytes());
    b
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

impl Guest {
    fn new() -> Self {
        let mem = anonymous_memory(MEM_SIZE).unwrap();
        let map = MemoryMap::of(&mem).unwrap();
        let (layout, _) = RingLayout::packed(QSIZE, 0x1000).unwrap();
        let f = RingFeatures {
            indirect: true,
            event_idx: false,
        };
        let area = IndirectArea {
            base: INDIRECT_BASE,
            max_entries: QSIZE,
        };
        let drv = DriverQueue::new(layout, f, Some(area));
        drv.init(&mem).unwrap();
        let dev = DeviceQueue::new(layout, f, &map).unwrap();
        Self {
            mem,
            map,
            drv,
            dev,
            next: BUF_BASE,
            pipe: None,
        }
    }

    fn reset(&mut self) {
        self.next = BUF_BASE;
    }

    fn alloc(&mut self, len: usize) -> Segment {
        let addr = self.next;
        // A gap between buffers, so overruns would land in untouched bytes.
        self.next = (addr + len as u64 + 64 + 15) & !15;
        assert!(self.next <= MEM_SIZE as u64, "test guest out of memory");
        self.mem.write(addr, &vec![UNTOUCHED; len + 64]).unwrap();
        Segment {
            addr,
            len: len as u32,
        }
    }

    fn put(&mut self, data: &[u8]) -> Segment {
        let s = self.alloc(data.len());
        self.mem.write(s.addr, data).unwrap();
        s
    }

    fn get(&self, s: Segment) -> Vec<u8> {
        let mut v = vec![0u8; s.len as usize];
        self.mem.read(s.addr, &mut v).unwrap();
        v
    }

    fn byte_at(&self, addr: u64) -> u8 {
        let mut b = [0u8];
        self.mem.read(addr, &mut b).unwrap();
        b[0]
    }

    /// Posts the chain, pops it on the device side, processes it and
    /// completes it as a sidecore would (length 0 on `Err`).
    fn run(
        &mut self,
        blk: &mut BlockDevice,
        r: &[Segment],
        w: &[Segment],
        indirect: bool,
    ) -> Result<u32, BlkError> {
        let head = self.drv.add(&self.mem, r, w, indirect).unwrap();
        self.drv.publish(&self.mem).unwrap();
        let mut chain = DescriptorChain::default();
        assert!(self.dev.pop(&self.mem, &self.map, &mut chain).unwrap());
        assert_eq!(chain.readable, r);
        assert_eq!(chain.writable, w);
        let res = match &self.pipe {
            Some(p) => {
                let req = BlockDevice::describe(&self.mem, &chain, 1, std::time::Instant::now())
                    .expect("a blk request");
                blk.process_interposed(&self.mem, &chain, Some((&req, p)))
                    .map(|(len, _)| len)
            }
            None => blk.process(&self.mem, &chain),
        };
        let len = *res.as_ref().unwrap_or(&0);
        self.dev.add_used(&self.mem, head, len).unwrap();
        assert_eq!(self.drv.pop_used(&self.mem).unwrap(), Some((head, len)));
        res
    }

    /// One request laid out the usual way: header, OUT data, IN buffer of
    /// `in_len` bytes, status. Returns (status, used length, IN bytes).
    fn request(
        &mut self,
        blk: &mut BlockDevice,
        t: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
    ) -> (u8, u32, Vec<u8>) {
        self.reset();
        let mut r = vec![self.put(&hdr(t, sector))];
        if !out.is_empty() {
            r.push(self.put(out));
        }
        let mut w = Vec::new();
        if in_len > 0 {
            w.push(self.alloc(in_len));
        }
        let status = self.alloc(1);
        w.push(status);
        let used = self.run(blk, &r, &w, false).unwrap();
        let data = if in_len > 0 {
            self.get(w[0])
        } else {
            Vec::new()
        };
        (self.byte_at(status.addr), used, data)
    }

    fn write(&mut self, blk: &mut BlockDevice, sector: u64, data: &[u8]) -> u8 {
        let (s, used, _) = self.request(blk, VIRTIO_BLK_T_OUT, sector, data, 0);
        assert_eq!(used, 1, "OUT writes only the status byte");
        s
    }

    fn read(&mut self, blk: &mut BlockDevice, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let (s, used, data) = self.request(blk, VIRTIO_BLK_T_IN, sector, &[], len);
        if s == OK {
            assert_eq!(used as usize, len + 1);
        } else {
            assert_eq!(used, 1);
        }
        (s, data)
    }

    /// DISCARD or WRITE_ZEROES with the given range entries.
    fn ranges(&mut self, blk: &mut BlockDevice, t: u32, ranges: &[[u8; 16]]) -> u8 {
        let payload = ranges.concat();
        let (s, used, _) = self.request(blk, t, 0, &payload, 0);
        assert_eq!(used, 1);
        s
    }
}

fn mem_device(sectors: u64, cfg: BlockConfig) -> (Arc<MemoryBackend>, BlockDevice) {
    let b = Arc::new(MemoryBackend::new(sectors * 512).with_id("vrio-test-serial-0123456789"));
    let d = BlockDevice::new(b.clone(), cfg);
    (b, d)
}

#[test]
fn out_then_in_round_trips() {
    let mut g = Guest::new();
    let (_, mut blk) = mem_device(1024, BlockConfig::default());
    let data = pattern(1, 8192);
    assert_eq!(g.write(&mut blk, 10, &data), OK);
    assert_eq!(g.read(&mut blk, 10, 8192), (OK, data.clone()));
    // Neighbours were not touched; unwritten sectors read as zeros.
    assert_eq!(g.read(&mut blk, 9, 512), (OK, vec![0; 512]));
    assert_eq!(g.read(&mut blk, 26, 512), (OK, vec![0; 512]));
    // The last sector of the disk is addressable; a zero-length read is fine.
    assert_eq!(g.write(&mut blk, 1023, &data[..512]), OK);
    assert_eq!(g.read(&mut blk, 1023, 512), (OK, data[..512].to_vec()));
    let (s, used, _) = g.request(&mut blk, VIRTIO_BLK_T_IN, 1024, &[], 0);
    assert_eq!((s, used), (OK, 1));
}

#[test]
fn header_data_and_status_split_across_descriptors() {
    let mut g = Guest::new();
    let (_, mut blk) = mem_device(1024, BlockConfig::default());
    let data = pattern(7, 1024);
    let h = hdr(VIRTIO_BLK_T_OUT, 3);
    // Header over two descriptors, the second also carrying data.
    let mut mid = h[7..].to_vec();
    mid.extend_from_slice(&data[..300]);
    let r = [g.put(&h[..7]), g.put(&mid), g.put(&data[300..])];
    let st = g.alloc(1);
    assert_eq!(g.run(&mut blk, &r, &[st], true), Ok(1));
    assert_eq!(g.byte_at(st.addr), OK);

    // IN through an indirect table: data in three pieces, the last also
    // holding the status byte; a zero-length descriptor at the end.
    g.reset();
    let h = hdr(VIRTIO_BLK_T_IN, 3);
    let r = [g.put(&h[..1]), g.put(&h[1..16])];
    let w = [g.alloc(100), g.alloc(412), g.alloc(513), g.alloc(0)];
    assert_eq!(g.run(&mut blk, &r, &w, true), Ok(1025));
    let mut got = g.get(w[0]);
    got.extend(g.get(w[1]));
    got.extend(g.get(w[2]));
    assert_eq!(&got[..1024], &data[..]);
    assert_eq!(got[1024], OK);
}

#[test]
fn flush_and_get_id() {
    let mut g = Guest::new();
    let (_, mut blk) = mem_device(64, BlockConfig::default());
    assert_eq!(g.request(&mut blk, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, OK);
    let (s, used, id) = g.request(&mut blk, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!((s, used), (OK, 21));
    assert_eq!(&id, b"vrio-test-serial-012");
    // A shorter buffer gets a truncated id; bytes past it stay untouched.
    let (s, used, id) = g.request(&mut blk, VIRTIO_BLK_T_GET_ID, 0, &[], 8);
    assert_eq!((s, used), (OK, 9));
    assert_eq!(&id, b"vrio-tes");
    // A longer one gets 20 bytes.
    let (s, used, id) = g.request(&mut blk, VIRTIO_BLK_T_GET_ID, 0, &[], 32);
    assert_eq!((s, used), (OK, 21));
    assert_eq!(&id[..20], b"vrio-test-serial-012");
    assert!(id[20..].iter().all(|&b| b == UNTOUCHED));
    // No room at all: only the status.
    assert_eq!(
        g.request(&mut blk, VIRTIO_BLK_T_GET_ID, 0, &[], 0),
        (OK, 1, vec![])
    );
    // A short id is zero-padded.
    let b = Arc::new(MemoryBackend::new(4096).with_id("ab"));
    let mut blk = BlockDevice::new(b, BlockConfig::default());
    let (_, _, id) = g.request(&mut blk, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!(&id[..3], b"ab\0");
    assert!(id[2..].iter().all(|&b| b == 0));
}

#[test]
fn unknown_types_are_unsupp() {
    let mut g = Guest::new();
    let (_, mut blk) = mem_device(64, BlockConfig::default());
    for t in [
        VIRTIO_BLK_T_SCSI_CMD,
        10, // GET_LIFETIME
        VIRTIO_BLK_T_SECURE_ERASE,
        VIRTIO_BLK_T_ZONE_REPORT,
        0xdead_beef,
    ] {
        let (s, used, data) = g.request(&mut blk, t, 0, &[1; 16], 64);
        assert_eq!((s, used), (UNSUPP, 1), "type {t}");
        assert!(data.iter().all(|&b| b == UNTOUCHED));
    }
}

#[test]
fn writes_on_a_read_only_device_are_unsupp() {
    let data = pattern(3, 512);
    let ro_backend = Arc::new(MemoryBackend::new(64 * 512));
    ro_backend
        .write_vectored_at(0, &[IoSlice::new(&data)])
        .unwrap();
    let ro_backend = Arc::new(
        Arc::try_unwrap(ro_backend)
            .map_err(|_| ())
            .unwrap()
            .with_read_only(true),
    );
    let rw_backend = Arc::new(MemoryBackend::new(64 * 512));
    rw_backend
        .write_vectored_at(0, &[IoSlice::new(&data)])
        .unwrap();
    let ro_cfg = BlockConfig {
        read_only: true,
        ..BlockConfig::default()
    };
    for mut blk in [
        BlockDevice::new(ro_backend, BlockConfig::default()),
        BlockDevice::new(rw_backend, ro_cfg),
    ] {
        let mut g = Guest::new();
        assert!(blk.read_only());
        assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(g.write(&mut blk, 0, &[9; 512]), UNSUPP);
        assert_eq!(
            g.ranges(&mut blk, VIRTIO_BLK_T_DISCARD, &[range(0, 1, 0)]),
            UNSUPP
        );
        assert_eq!(
            g.ranges(&mut blk, VIRTIO_BLK_T_WRITE_ZEROES, &[range(0, 1, 0)]),
            UNSUPP
        );
        assert_eq!(g.read(&mut blk, 0, 512), (OK, data.clone()));
        assert_eq!(g.request(&mut blk, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, OK);
    }
}

#[test]
fn out_of_range_overflow_and_bad_lengths_are_ioerr() {
    let mut g = Guest::new();
    let cfg = BlockConfig {
        max_request_bytes: 64 << 10,
        ..BlockConfig::default()
    };
    let (b, mut blk) = mem_device(256, cfg);
    let cases: [(u64, usize); 6] = [
        (256, 512),              // starts at capacity
        (255, 1024),             // straddles the end
        (u64::MAX, 512),         // sector * 512 overflows
        (u64::MAX / 512 + 1, 0), // overflows even with no data
        (u64::MAX / 512, 1024),  // offset + len overflows
        (1 << 60, 512),          // far beyond
    ];
    for (sector, len) in cases {
        let (s, d) = g.read(&mut blk, sector, len);
        assert_eq!(s, IOERR, "IN sector {sector} len {len}");
        assert!(d.iter().all(|&b| b == UNTOUCHED));
        assert_eq!(g.write(&mut blk, sector, &vec![1; len]), IOERR);
        assert_eq!(b.allocated_chunks(), 0, "sector {sector} len {len}");
    }
    // Not a multiple of 512.
    assert_eq!(g.read(&mut blk, 0, 511).0, IOERR);
    assert_eq!(g.read(&mut blk, 0, 513).0, IOERR);
    assert_eq!(g.write(&mut blk, 0, &[1; 100]), IOERR);
    // Over the per-request limit: refused before the bounce buffer grows.
    assert_eq!(g.read(&mut blk, 0, (64 << 10) + 512).0, IOERR);
    assert_eq!(g.write(&mut blk, 0, &vec![1; (64 << 10) + 512]), IOERR);
    assert_eq!(blk.bounce_len(), 0, "every request so far was refused");
    assert_eq!(g.read(&mut blk, 0, 64 << 10).0, OK);
    assert_eq!(blk.bounce_len(), 64 << 10);
    assert_eq!(b.allocated_chunks(), 0, "failed writes must not store data");
}

#[test]
fn unusable_chains_are_errors_and_complete_with_len_zero() {
    let mut g = Guest::new();
    let (_, mut blk) = mem_device(64, BlockConfig::default());
    // No writable descriptor at all.
    let r = [g.put(&hdr(VIRTIO_BLK_T_OUT, 0)), g.put(&[0; 512])];
    assert_eq!(g.run(&mut blk, &r, &[], false), Err(BlkError::NoStatusByte));
    // Only zero-length writable descriptors.
    let z = g.alloc(0);
    assert_eq!(
        g.run(&mut blk, &r, &[z], false),
        Err(BlkError::NoStatusByte)
    );
    // A 15-byte header, split.
    let h = hdr(VIRTIO_BLK_T_IN, 0);
    let r = [g.put(&h[..8]), g.put(&h[8..15])];
    let st = g.alloc(1);
    assert_eq!(
        g.run(&mut blk, &r, &[st], false),
        Err(BlkError::HeaderTooShort { len: 15 })
    );
    assert_eq!(g.byte_at(st.addr), UNTOUCHED);
    // No readable part.
    let w = [g.alloc(512), g.alloc(1)];
    assert_eq!(
        g.run(&mut blk, &[], &w, false),
        Err(BlkError::HeaderTooShort { len: 0 })
    );
}

/// Fails every write at `fail_at`, like a remote memory whose status page
/// cannot be written.
struct FaultyMemory<'a> {
    inner: &'a LocalMemory,
    fail_at: u64,
}

impl GuestMemory for FaultyMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        GuestMemory::read(self.inner, addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        if (addr..addr + buf.len() as u64).contains(&self.fail_at) {
            return Err(MemoryError::NotPresent {
                addr,
                len: buf.len() as u64,
            });
        }
        GuestMemory::write(self.inner, addr, buf)
    }
}

#[test]
fn memory_faults_on_status_are_errors_and_on_data_are_ioerr() {
    let mut g = Guest::new();
    let (_, mut blk) = mem_device(64, BlockConfig::default());
    let h = g.put(&hdr(VIRTIO_BLK_T_IN, 0));
    let data = g.alloc(512);
    let st = g.alloc(1);
    let chain = DescriptorChain {
        readable: vec![h],
        writable: vec![data, st],
        ..Default::default()
    };
    let bad_status = FaultyMemory {
        inner: &g.mem,
        fail_at: st.addr,
    };
    assert!(matches!(
        blk.process(&bad_status, &chain),
        Err(BlkError::Memory(MemoryError::NotPresent { .. }))
    ));
    let bad_data = FaultyMemory {
        inner: &g.mem,
        fail_at: data.addr + 100,
    };
    assert_eq!(blk.process(&bad_data, &chain), Ok(1));
    assert_eq!(g.byte_at(st.addr), IOERR);
}

/// A backend whose every operation fails with EIO.
struct FailingBackend;

impl BlockBackend for FailingBackend {
    fn capacity(&self) -> u64 {
        64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn id(&self) -> [u8; ID_BYTES] {
        [0; ID_BYTES]
    }
    fn read_vectored_at(&self, _: u64, _: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
    fn write_vectored_at(&self, _: u64, _: &[IoSlice<'_>]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
    fn flush(&self) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

#[test]
fn backend_errors_are_ioerr() {
    let mut g = Guest::new();
    let mut blk = BlockDevice::new(Arc::new(FailingBackend), BlockConfig::default());
    let (s, d) = g.read(&mut blk, 0, 512);
    assert_eq!(s, IOERR);
    assert!(d.iter().all(|&b| b == UNTOUCHED));
    assert_eq!(g.write(&mut blk, 0, &[0; 512]), IOERR);
    assert_eq!(g.request(&mut blk, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, IOERR);
    assert_eq!(
        g.ranges(&mut blk, VIRTIO_BLK_T_DISCARD, &[range(0, 1, 0)]),
        IOERR
    );
    assert_eq!(
        g.ranges(&mut blk, VIRTIO_BLK_T_WRITE_ZEROES, &[range(0, 1, 0)]),
        IOERR
    );
}

/// Writes sectors 0..32 with a pattern; returns it.
fn fill(g: &mut Guest, blk: &mut BlockDevice) -> Vec<u8> {
    let data = pattern(5, 32 * 512);
    assert_eq!(g.write(blk, 0, &data), OK);
    data
}

/// Asserts sectors 0..32 hold `data` except the zeroed sector ranges.
fn expect(g: &mut Guest, blk: &mut BlockDevice, data: &[u8], zeroed: &[(usize, usize)]) {
    let (s, got) = g.read(blk, 0, 32 * 512);
    assert_eq!(s, OK);
    for sec in 0..32 {
        let z = zeroed.iter().any(|&(a, n)| (a..a + n).contains(&sec));
        let want: Vec<u8> = if z {
            vec![0; 512]
        } else {
            data[sec * 512..(sec + 1) * 512].to_vec()
        };
        assert_eq!(&got[sec * 512..(sec + 1) * 512], &want[..], "sector {sec}");
    }
}

#[test]
fn discard_zeroes_its_ranges_and_follows_flag_and_limit_rules() {
    let mut g = Guest::new();
    let cfg = BlockConfig {
        max_discard_seg: 2,
        max_discard_sectors: 8,
        ..BlockConfig::default()
    };
    let (_, mut blk) = mem_device(64, cfg);
    let data = fill(&mut g, &mut blk);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let d = VIRTIO_BLK_T_DISCARD;
    // Each refused request has a valid first range: nothing may be applied.
    assert_eq!(
        g.ranges(&mut blk, d, &[range(0, 1, 0), range(2, 1, unmap)]),
        UNSUPP
    );
    assert_eq!(
        g.ranges(&mut blk, d, &[range(0, 1, 0), range(2, 1, 4)]),
        UNSUPP
    );
    assert_eq!(
        g.ranges(
            &mut blk,
            d,
            &[range(0, 1, 0), range(1, 1, 0), range(2, 1, 0)]
        ),
        IOERR,
        "more than max_discard_seg"
    );
    assert_eq!(
        g.ranges(&mut blk, d, &[range(0, 1, 0), range(8, 9, 0)]),
        IOERR
    );
    assert_eq!(
        g.ranges(&mut blk, d, &[range(0, 1, 0), range(60, 8, 0)]),
        IOERR
    );
    assert_eq!(
        g.ranges(&mut blk, d, &[range(0, 1, 0), range(u64::MAX / 256, 1, 0)]),
        IOERR
    );
    let (s, _, _) = g.request(&mut blk, d, 0, &[0; 17], 0);
    assert_eq!(s, IOERR, "payload not a multiple of 16");
    let (s, _, _) = g.request(&mut blk, d, 0, &[], 0);
    assert_eq!(s, IOERR, "no ranges");
    expect(&mut g, &mut blk, &data, &[]);

    // Two valid ranges, the second split across descriptors.
    g.reset();
    let (a, b) = (range(2, 2, 0), range(8, 4, 0));
    let r = [g.put(&hdr(d, 0)), g.put(&a), g.put(&b[..5]), g.put(&b[5..])];
    let st = g.alloc(1);
    assert_eq!(g.run(&mut blk, &r, &[st], false), Ok(1));
    assert_eq!(g.byte_at(st.addr), OK);
    expect(&mut g, &mut blk, &data, &[(2, 2), (8, 4)]);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let mut g = Guest::new();
    let cfg = BlockConfig {
        max_write_zeroes_seg: 3,
        max_write_zeroes_sectors: 16,
        ..BlockConfig::default()
    };
    let (backend, mut blk) = mem_device(64, cfg);
    let data = fill(&mut g, &mut blk);
    assert_eq!(backend.allocated_chunks(), 4);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let wz = VIRTIO_BLK_T_WRITE_ZEROES;
    assert_eq!(
        g.ranges(&mut blk, wz, &[range(0, 1, 2)]),
        UNSUPP,
        "unknown flag"
    );
    assert_eq!(g.ranges(&mut blk, wz, &[range(0, 17, 0)]), IOERR);
    assert_eq!(g.ranges(&mut blk, wz, &[range(0, 1, 0); 4]), IOERR);
    assert_eq!(g.ranges(&mut blk, wz, &[range(64, 1, 0)]), IOERR);
    expect(&mut g, &mut blk, &data, &[]);
    // Sectors 8..16 are chunk 1: with unmap it is freed.
    assert_eq!(
        g.ranges(
            &mut blk,
            wz,
            &[range(1, 1, 0), range(8, 8, unmap), range(30, 2, 0)]
        ),
        OK
    );
    expect(&mut g, &mut blk, &data, &[(1, 1), (8, 8), (30, 2)]);
    assert_eq!(backend.allocated_chunks(), 3);
}

#[test]
fn features_offer_the_spec_set() {
    let (_, blk) = mem_device(64, BlockConfig::default());
    let f = blk.features();
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    for bit in [
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_GEOMETRY,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_SCSI,
        VIRTIO_BLK_F_BARRIER,
        VIRTIO_BLK_F_SECURE_ERASE,
        VIRTIO_BLK_F_ZONED,
    ] {
        assert_eq!(f & (1 << bit), 0, "bit {bit}");
    }
    let with_size_max = BlockConfig {
        size_max: Some(65536),
        ..BlockConfig::default()
    };
    let (_, blk) = mem_device(64, with_size_max);
    assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_SIZE_MAX), 0);
}

#[test]
fn config_space_reports_backend_capacity_and_config() {
    let cfg = BlockConfig {
        num_queues: 4,
        ..BlockConfig::default()
    };
    let (_, blk) = mem_device(12345, cfg);
    let c = blk.config_space();
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 12345);
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
}

#[test]
fn file_backend_through_the_device() {
    let p = TempPath::new("device");
    let file = Arc::new(FileBackend::create(&p.0, 1 << 20).unwrap());
    let mut blk = BlockDevice::new(file, BlockConfig::default());
    let mut g = Guest::new();
    assert_eq!(blk.config_space()[..8], 2048u64.to_le_bytes());
    let data = fill(&mut g, &mut blk);
    assert_eq!(g.request(&mut blk, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, OK);
    assert_eq!(
        g.ranges(&mut blk, VIRTIO_BLK_T_DISCARD, &[range(4, 4, 0)]),
        OK
    );
    assert_eq!(
        g.ranges(
            &mut blk,
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[
                range(20, 1, 0),
                range(24, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            ]
        ),
        OK
    );
    expect(&mut g, &mut blk, &data, &[(4, 4), (20, 1), (24, 8)]);
    assert_eq!(g.read(&mut blk, 2048, 512).0, IOERR);
    // The id defaults to the file name, truncated to 20 bytes.
    let (_, _, id) = g.request(&mut blk, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    let name = p.0.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(&id[..], &name.as_bytes()[..20]);
    drop(blk);

    // Data persisted; reopened read-only, writes are UNSUPP.
    let ro = Arc::new(FileBackend::open(&p.0, true).unwrap());
    let mut blk = BlockDevice::new(ro, BlockConfig::default());
    assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(g.write(&mut blk, 0, &[0; 512]), UNSUPP);
    expect(&mut g, &mut blk, &data, &[(4, 4), (20, 1), (24, 8)]);
}

#[test]
fn two_devices_on_two_threads_share_one_backend() {
    let backend = Arc::new(MemoryBackend::new(8 << 20));
    let threads: Vec<_> = (0..2u8)
        .map(|t| {
            let backend = Arc::clone(&backend);
            std::thread::spawn(move || {
                let mut g = Guest::new();
                let mut blk = BlockDevice::new(backend, BlockConfig::default());
                for i in 0..500u64 {
                    // Interleaved 4 KiB blocks.
                    let sector = (i * 2 + u64::from(t)) * 8;
                    assert_eq!(
                        g.write(&mut blk, sector, &pattern(t.wrapping_add(i as u8), 4096)),
                        OK
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut g = Guest::new();
    let mut blk = BlockDevice::new(backend.clone(), BlockConfig::default());
    for blkno in 0..1000u64 {
        let (t, i) = ((blkno % 2) as u8, blkno / 2);
        let (s, got) = g.read(&mut blk, blkno * 8, 4096);
        assert_eq!(s, OK);
        assert_eq!(got, pattern(t.wrapping_add(i as u8), 4096), "block {blkno}");
    }
    assert_eq!(backend.allocated_chunks(), 1000);
}

#[test]
fn encryption_reaches_the_disk_as_ciphertext_and_write_zeroes_reads_back_zeroes() {
    let (disk, mut blk) = mem_device(64, BlockConfig::default());
    let key = "aa".repeat(32) + &"bb".repeat(32);
    let spec = crate::interpose::PolicySpec::parse(&format!(
        r#"{{"stages":[{{"stage":"crypt","key":"{key}"}}]}}"#
    ))
    .unwrap();
    let mut g = Guest::new();
    g.pipe = Some(Arc::new(spec.build(1).unwrap()));
    let data = pattern(3, 4096);
    assert_eq!(g.write(&mut blk, 8, &data), OK);
    let raw = read_back(&*disk, 8 * 512, 4096);
    assert_ne!(raw, data, "plaintext on the disk");
    assert_eq!(g.read(&mut blk, 8, 4096), (OK, data.clone()));
    // The same bytes at another sector encrypt differently (the tweak).
    assert_eq!(g.write(&mut blk, 16, &data), OK);
    assert_ne!(read_back(&*disk, 16 * 512, 4096), raw);

    // WRITE_ZEROES zeroes the disk (it stays sparse), and the guest
    // reads zeroes, not the decryption of zeroes; so does a fresh sector.
    let wz = VIRTIO_BLK_T_WRITE_ZEROES;
    assert_eq!(g.ranges(&mut blk, wz, &[range(8, 8, 0)]), OK);
    assert!(read_back(&*disk, 8 * 512, 4096).iter().all(|&b| b == 0));
    assert_eq!(g.read(&mut blk, 8, 4096), (OK, vec![0u8; 4096]));
    assert_eq!(g.read(&mut blk, 40, 4096), (OK, vec![0u8; 4096]));
    // Untouched sectors around it kept their data.
    assert_eq!(g.read(&mut blk, 16, 4096), (OK, data));
}
