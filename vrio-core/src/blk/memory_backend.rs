//! A sparse in-memory disk: only written 4 KiB chunks use memory, unwritten
//! bytes read as zeros. Chunks live in sharded maps so that several
//! sidecores hitting different blocks rarely contend on one lock.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use super::{ID_BYTES, SECTOR_SIZE};
use crate::virtio::blk::{check_range, id_from_str, read_only_error, BlockBackend};

const CHUNK: u64 = 4096;
const SHARDS: u64 = 64;

type Chunk = Box<[u8; CHUNK as usize]>;
type Shard = RwLock<HashMap<u64, Chunk>>;

/// A [`BlockBackend`] in process memory, sparse; its contents die with it.
pub struct MemoryBackend {
    shards: Vec<Shard>,
    size: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    allocated: AtomicU64,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("allocated_chunks", &self.allocated_chunks())
            .finish()
    }
}

/// Calls `f(chunk index, offset in chunk, offset in range, length)` for each
/// chunk-sized piece of `offset..offset+len`.
fn pieces(offset: u64, len: u64, mut f: impl FnMut(u64, usize, u64, usize)) {
    let mut done = 0;
    while done < len {
        let pos = offset + done;
        let in_chunk = pos % CHUNK;
        let n = (CHUNK - in_chunk).min(len - done);
        f(pos / CHUNK, in_chunk as usize, done, n as usize);
        done += n;
    }
}

impl MemoryBackend {
    /// A zero-filled disk of `size` bytes, rounded down to whole sectors.
    pub fn new(size: u64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            size: size - size % SECTOR_SIZE,
            read_only: false,
            id: id_from_str("vrio-mem"),
            allocated: AtomicU64::new(0),
        }
    }

    /// Sets the GET_ID serial (default `vrio-mem`), truncated to 20 bytes.
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = id_from_str(id);
        self
    }

    /// Makes the disk refuse writes, discards and write-zeroes.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// 4 KiB chunks holding data.
    pub fn allocated_chunks(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    fn shard(&self, idx: u64) -> &Shard {
        // SHARDS is the length of `shards`, so the index is in bounds.
        &self.shards[(idx % SHARDS) as usize]
    }

    fn zero_piece(&self, idx: u64, in_chunk: usize, n: usize) {
        let mut map = self
            .shard(idx)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if n as u64 == CHUNK {
            if map.remove(&idx).is_some() {
                self.allocated.fetch_sub(1, Ordering::Relaxed);
            }
        } else if let Some(c) = map.get_mut(&idx) {
            c[in_chunk..in_chunk + n].fill(0);
        }
    }

    /// Zeroes a checked range, freeing every chunk it fully covers.
    fn zero_range(&self, offset: u64, len: u64) {
        let end = offset + len;
        let (full_lo, full_hi) = (offset.div_ceil(CHUNK), end / CHUNK);
        // A huge range (a whole-disk discard) would visit mostly absent
        // chunks one by one: sweep the allocated ones instead.
        if full_lo < full_hi && full_hi - full_lo > self.allocated_chunks() {
            for shard in &self.shards {
                let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
                let before = map.len();
                map.retain(|&idx, _| !(full_lo..full_hi).contains(&idx));
                self.allocated
                    .fetch_sub((before - map.len()) as u64, Ordering::Relaxed);
            }
            let head_end = full_lo * CHUNK;
            pieces(offset, head_end - offset, |i, o, _, n| {
                self.zero_piece(i, o, n)
            });
            let tail = full_hi * CHUNK;
            pieces(tail, end - tail, |i, o, _, n| self.zero_piece(i, o, n));
        } else {
            pieces(offset, len, |i, o, _, n| self.zero_piece(i, o, n));
        }
    }
}

impl BlockBackend for MemoryBackend {
    fn capacity(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> [u8; ID_BYTES] {
        self.id
    }

    fn read_vectored_at(&self, mut offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        for buf in bufs.iter_mut() {
            let buf: &mut [u8] = buf;
            pieces(offset, buf.len() as u64, |idx, in_chunk, done, n| {
                let dst = &mut buf[done as usize..done as usize + n];
                let map = self
                    .shard(idx)
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                match map.get(&idx) {
                    Some(c) => dst.copy_from_slice(&c[in_chunk..in_chunk + n]),
                    None => dst.fill(0),
                }
            });
            offset += buf.len() as u64;
        }
        Ok(())
    }

    fn write_vectored_at(&self, mut offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        for buf in bufs {
            pieces(offset, buf.len() as u64, |idx, in_chunk, done, n| {
                let src = &buf[done as usize..done as usize + n];
                let mut map = self
                    .shard(idx)
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                let c = map.entry(idx).or_insert_with(|| {
                    self.allocated.fetch_add(1, Ordering::Relaxed);
                    Box::new([0u8; CHUNK as usize])
                });
                c[in_chunk..in_chunk + n].copy_from_slice(src);
            });
            offset += buf.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(offset, len, self.size)?;
        // Freeing is always the cheapest way to zero here.
        self.zero_range(offset, len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::tests::read_back as read;
    use std::sync::Arc;

    #[test]
    fn unwritten_reads_zero_and_uses_no_memory() {
        let b = MemoryBackend::new(1 << 40);
        assert_eq!(b.capacity(), (1 << 40) / 512);
        assert!(read(&b, (1 << 40) - 8192, 8192).iter().all(|&x| x == 0));
        assert_eq!(b.allocated_chunks(), 0);
    }

    #[test]
    fn vectored_write_across_chunks_round_trips() {
        let b = MemoryBackend::new(1 << 20);
        let a: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let c: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        b.write_vectored_at(4000, &[IoSlice::new(&a), IoSlice::new(&c)])
            .unwrap();
        // 4000..12000 touches chunks 0, 1 and 2.
        assert_eq!(b.allocated_chunks(), 3);
        let mut x = vec![0u8; 100];
        let mut y = vec![0u8; 7900];
        b.read_vectored_at(
            4000,
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
        )
        .unwrap();
        let mut all = x;
        all.extend_from_slice(&y);
        assert_eq!(&all[..5000], &a[..]);
        assert_eq!(&all[5000..], &c[..]);
        assert_eq!(read(&b, 3990, 10), vec![0; 10]);
    }

    #[test]
    fn zeroing_frees_whole_chunks_and_zeroes_partial_ones() {
        let b = MemoryBackend::new(1 << 20);
        b.write_vectored_at(0, &[IoSlice::new(&[0xab; 16384])])
            .unwrap();
        assert_eq!(b.allocated_chunks(), 4);
        // 2048..10240: half of chunk 0, all of chunk 1, half of chunk 2.
        b.discard(2048, 8192).unwrap();
        assert_eq!(b.allocated_chunks(), 3);
        let v = read(&b, 0, 16384);
        assert!(v[..2048].iter().all(|&x| x == 0xab));
        assert!(v[2048..10240].iter().all(|&x| x == 0));
        assert!(v[10240..].iter().all(|&x| x == 0xab));
        b.write_zeroes(0, 16384, false).unwrap();
        assert_eq!(b.allocated_chunks(), 0);
    }

    #[test]
    fn huge_discard_sweeps_allocated_chunks() {
        let size = 1u64 << 40;
        let b = MemoryBackend::new(size);
        for off in [0u64, 4096 * 1000 + 100, size - 4096] {
            b.write_vectored_at(off, &[IoSlice::new(&[1u8; 512])])
                .unwrap();
        }
        assert_eq!(b.allocated_chunks(), 3);
        // Starts mid-chunk 0, so chunk 0 keeps its first 256 bytes.
        b.discard(256, size - 256).unwrap();
        assert_eq!(b.allocated_chunks(), 1);
        assert!(read(&b, 0, 256).iter().all(|&x| x == 1));
        assert!(read(&b, 256, 256).iter().all(|&x| x == 0));
        assert!(read(&b, size - 4096, 512).iter().all(|&x| x == 0));
    }

    #[test]
    fn refuses_out_of_range_and_read_only_writes() {
        let b = MemoryBackend::new(8192);
        let e = b
            .write_vectored_at(8000, &[IoSlice::new(&[0; 512])])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(b
            .read_vectored_at(u64::MAX, &mut [IoSliceMut::new(&mut [0; 2])])
            .is_err());
        assert!(b.discard(4096, 8192).is_err());
        let ro = MemoryBackend::new(8192).with_read_only(true);
        assert_eq!(
            ro.write_vectored_at(0, &[IoSlice::new(&[0; 512])])
                .unwrap_err()
                .kind(),
            io::ErrorKind::PermissionDenied
        );
        assert!(ro.write_zeroes(0, 512, false).is_err());
    }

    #[test]
    fn two_threads_write_different_blocks_concurrently() {
        let b = Arc::new(MemoryBackend::new(64 << 20));
        let threads: Vec<_> = (0..2u8)
            .map(|t| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    // Interleaved blocks, so both threads share shards.
                    for i in 0..2000u64 {
                        let blk = i * 2 + u64::from(t);
                        let data = [t + 1; 4096];
                        b.write_vectored_at(blk * 4096, &[IoSlice::new(&data)])
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.allocated_chunks(), 4000);
        for blk in 0..4000u64 {
            let want = (blk % 2) as u8 + 1;
            assert!(
                read(&*b, blk * 4096, 4096).iter().all(|&x| x == want),
                "block {blk}"
            );
        }
    }
}
