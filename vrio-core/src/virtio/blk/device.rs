//! [`BlockDevice`]: executes one virtio-blk request (§5.2.6) on a backend.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use tracing::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use super::backend::BlockBackend;
use super::config::{config_space, BlockConfig};
use super::error::{BlkError, RequestError, Status};
use super::features::device_features;
use super::request::{read_segments, write_segments, RequestLayout, HEADER_SIZE};
use super::{ID_BYTES, SECTOR_SIZE};
use crate::interpose::{Op, Pipeline, Request};
use crate::virtio::memory::GuestMemory;
use crate::virtio::ring::DescriptorChain;

/// `struct virtio_blk_discard_write_zeroes`: le64 sector, le32 num_sectors,
/// le32 flags.
const RANGE_SIZE: u64 = 16;

/// One virtio-blk device as one queue sees it. Create one per queue; they
/// share the backend. Holds a bounce buffer that grows to the largest request
/// seen (at most `max_request_bytes`) so the hot path does not allocate.
pub struct BlockDevice {
    backend: Arc<dyn BlockBackend>,
    cfg: BlockConfig,
    bounce: Vec<u8>,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("cfg", &self.cfg)
            .field("capacity", &self.backend.capacity())
            .field("bounce", &self.bounce.len())
            .finish()
    }
}

impl BlockDevice {
    /// A device over `backend` that advertises and enforces `cfg`.
    pub fn new(backend: Arc<dyn BlockBackend>, cfg: BlockConfig) -> Self {
        Self {
            backend,
            cfg,
            bounce: Vec::new(),
        }
    }

    /// The storage requests run on.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// What the device advertises and enforces.
    pub fn config(&self) -> &BlockConfig {
        &self.cfg
    }

    #[cfg(test)]
    pub(crate) fn bounce_len(&self) -> usize {
        self.bounce.len()
    }

    /// Read-only by configuration or because the backend is.
    pub fn read_only(&self) -> bool {
        self.cfg.read_only || self.backend.read_only()
    }

    /// Offered features, VERSION_1 and ring features included.
    pub fn features(&self) -> u64 {
        device_features(&self.cfg, self.read_only())
    }

    /// `struct virtio_blk_config`, little-endian.
    pub fn config_space(&self) -> Vec<u8> {
        config_space(&self.cfg, self.backend.capacity())
    }

    /// Executes one request whose chain was already validated. Reads the
    /// header and data from guest memory through `mem`, does the I/O on the
    /// backend, writes data and the status byte through `mem`. Returns the
    /// used length (bytes written into the writable part, status included).
    ///
    /// `Err` only when the chain is unusable for virtio-blk (no room for a
    /// status byte, header too short, status not writable): nothing can be
    /// reported to the guest and the caller completes it with length 0.
    pub fn process<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<u32, BlkError> {
        self.process_interposed(mem, chain, None)
            .map(|(len, _)| len)
    }

    /// [`process`](Self::process) with `req`'s data passing `pipe`'s
    /// stages: writes on their way to the backend, reads on their way
    /// back. DISCARD and WRITE_ZEROES go to the backend as they are (an
    /// encrypting stage reads zeroed sectors back as zeroes). Returns the used
    /// length and the status byte written.
    pub fn process_interposed<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
        interposed: Option<(&Request, &Pipeline)>,
    ) -> Result<(u32, u8), BlkError> {
        let req = match RequestLayout::parse(mem, chain) {
            Ok(r) => r,
            Err(e) => {
                debug!(head = chain.head, error = %e, "unusable virtio-blk chain");
                return Err(e);
            }
        };
        let (status, written) = match self.execute(mem, chain, &req, interposed) {
            Ok(n) => (Status::Ok, n),
            Err(e) => {
                debug!(
                    head = chain.head,
                    request_type = req.header.request_type,
                    sector = req.header.sector,
                    status = ?e.status(),
                    error = %e,
                    "virtio-blk request failed"
                );
                (e.status(), 0)
            }
        };
        mem.write(req.status_addr, &[status.byte()])?;
        // `written` <= in_len < writable_len, which fits u32 for any chain the
        // walker accepts; saturate rather than trust that.
        Ok((
            u32::try_from(written + 1).unwrap_or(u32::MAX),
            status.byte(),
        ))
    }

    /// What the interposition stages see of the request in `chain`: None
    /// when it is not a virtio-blk request at all (the device fails it).
    /// DISCARD and WRITE_ZEROES are described by their header's sector
    /// (their ranges are inside the payload) and no data length.
    pub fn describe<M: GuestMemory + ?Sized>(
        mem: &M,
        chain: &DescriptorChain,
        device: u64,
        arrived: std::time::Instant,
    ) -> Option<Request> {
        let req = RequestLayout::parse(mem, chain).ok()?;
        let op = Op::from_blk_type(req.header.request_type);
        let len = match op {
            Op::Read => req.in_len,
            Op::Write => req.out_len,
            _ => 0,
        };
        Some(Request {
            device,
            op,
            sector: req.header.sector,
            len,
            frame: None,
            arrived,
            vm_host: 0,
        })
    }

    /// Completes the request in `chain` with `status` without running it
    /// (a policy refused it). Returns the used length.
    pub fn reject<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
        status: u8,
    ) -> Result<u32, BlkError> {
        let req = RequestLayout::parse(mem, chain)?;
        mem.write(req.status_addr, &[status])?;
        Ok(1)
    }

    /// Runs the request; returns the data bytes written into the writable part.
    fn execute<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
        req: &RequestLayout,
        interposed: Option<(&Request, &Pipeline)>,
    ) -> Result<u64, RequestError> {
        let sector = req.header.sector;
        match req.header.request_type {
            VIRTIO_BLK_T_IN => {
                let len = req.in_len;
                let offset = self.check_io(sector, len)?;
                // Straight into the server's staging buffer when the memory
                // lends it (no bounce copy).
                let mut done = Ok(());
                let backend = &self.backend;
                let lent = mem.lend_chain_part(true, 0, len, &mut |buf| {
                    done = backend
                        .read_vectored_at(offset, &mut [IoSliceMut::new(buf)])
                        .map_err(RequestError::from)
                        .and_then(|_| match interposed {
                            Some((r, p)) => p.read_data(r, buf).map_err(RequestError::Refused),
                            None => Ok(()),
                        });
                    if done.is_err() {
                        // Lent bytes are sent back whatever happens: none
                        // may hold a partial read, or a refused one.
                        buf.fill(0);
                    }
                });
                if lent {
                    return done.map(|()| len);
                }
                let buf = grow(&mut self.bounce, len);
                self.backend
                    .read_vectored_at(offset, &mut [IoSliceMut::new(buf)])?;
                if let Some((r, p)) = interposed {
                    p.read_data(r, buf).map_err(RequestError::Refused)?;
                }
                write_segments(mem, &chain.writable, 0, buf)?;
                Ok(len)
            }
            VIRTIO_BLK_T_OUT => {
                self.check_writable()?;
                let len = req.out_len;
                let offset = self.check_io(sector, len)?;
                let mut done = Ok(());
                let backend = &self.backend;
                let lent = mem.lend_chain_part(false, HEADER_SIZE, len, &mut |buf| {
                    done = match interposed {
                        Some((r, p)) => p.write_data(r, buf).map_err(RequestError::Refused),
                        None => Ok(()),
                    }
                    .and_then(|()| {
                        backend
                            .write_vectored_at(offset, &[IoSlice::new(buf)])
                            .map(|_| ())
                            .map_err(RequestError::from)
                    });
                });
                if lent {
                    return done.map(|()| 0);
                }
                let buf = grow(&mut self.bounce, len);
                read_segments(mem, &chain.readable, HEADER_SIZE, buf)?;
                if let Some((r, p)) = interposed {
                    p.write_data(r, buf).map_err(RequestError::Refused)?;
                }
                self.backend
                    .write_vectored_at(offset, &[IoSlice::new(buf)])?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.backend.flush()?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                // A shorter buffer gets a truncated id (§5.2.6.1).
                let id = self.backend.id();
                let n = req.in_len.min(ID_BYTES as u64) as usize;
                write_segments(mem, &chain.writable, 0, &id[..n])?;
                Ok(n as u64)
            }
            t @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
                self.check_writable()?;
                self.discard_or_zero(mem, chain, req, t == VIRTIO_BLK_T_DISCARD)?;
                Ok(0)
            }
            t => Err(RequestError::UnsupportedType(t)),
        }
    }

    fn check_writable(&self) -> Result<(), RequestError> {
        if self.read_only() {
            Err(RequestError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Byte offset of `sector` after checking that `len` bytes from it are
    /// whole sectors, within the request limit and within the capacity.
    fn check_io(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned { len });
        }
        let limit = u64::from(self.cfg.max_request_bytes);
        if len > limit {
            return Err(RequestError::TooLarge { len, limit });
        }
        range_offset(self.backend.capacity(), sector, len)
    }

    /// DISCARD and WRITE_ZEROES (§5.2.6): the readable part after the header
    /// is an array of ranges. All ranges are checked before any is executed.
    fn discard_or_zero<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
        req: &RequestLayout,
        discard: bool,
    ) -> Result<(), RequestError> {
        let len = req.out_len;
        if len == 0 || len % RANGE_SIZE != 0 {
            return Err(RequestError::BadSegmentPayload { len });
        }
        let (max_seg, max_sectors) = if discard {
            (self.cfg.max_discard_seg, self.cfg.max_discard_sectors)
        } else {
            (
                self.cfg.max_write_zeroes_seg,
                self.cfg.max_write_zeroes_sectors,
            )
        };
        let count = len / RANGE_SIZE;
        if count > u64::from(max_seg) {
            return Err(RequestError::TooManySegments {
                count,
                max: max_seg,
            });
        }
        let capacity = self.backend.capacity();
        let ranges = grow(&mut self.bounce, len);
        read_segments(mem, &chain.readable, HEADER_SIZE, ranges)?;
        let parse = |r: &[u8]| {
            let mut s = [0u8; 8];
            s.copy_from_slice(&r[0..8]);
            (
                u64::from_le_bytes(s),
                u32::from_le_bytes([r[8], r[9], r[10], r[11]]),
                u32::from_le_bytes([r[12], r[13], r[14], r[15]]),
            )
        };
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        for r in ranges.chunks_exact(RANGE_SIZE as usize) {
            let (sector, num_sectors, flags) = parse(r);
            // Discard must not carry the unmap flag; any unknown flag is UNSUPP.
            if flags & !unmap != 0 || (discard && flags & unmap != 0) {
                return Err(RequestError::UnsupportedFlags { flags });
            }
            if num_sectors > max_sectors {
                return Err(RequestError::SegmentTooLarge {
                    num_sectors,
                    max: max_sectors,
                });
            }
            range_offset(capacity, sector, u64::from(num_sectors) * SECTOR_SIZE)?;
        }
        for r in ranges.chunks_exact(RANGE_SIZE as usize) {
            let (sector, num_sectors, flags) = parse(r);
            let (offset, bytes) = (sector * SECTOR_SIZE, u64::from(num_sectors) * SECTOR_SIZE);
            if discard {
                self.backend.discard(offset, bytes)?;
            } else {
                let may_unmap = flags & unmap != 0 && self.cfg.write_zeroes_may_unmap;
                self.backend.write_zeroes(offset, bytes, may_unmap)?;
            }
        }
        Ok(())
    }
}

/// Byte offset of `sector` if `len` bytes from it fit in `capacity` sectors;
/// every multiplication and addition is checked (a hostile sector number).
fn range_offset(capacity: u64, sector: u64, len: u64) -> Result<u64, RequestError> {
    let size = capacity.saturating_mul(SECTOR_SIZE);
    sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|off| Some((off, off.checked_add(len)?)))
        .filter(|&(_, end)| end <= size)
        .map(|(off, _)| off)
        .ok_or(RequestError::OutOfRange {
            sector,
            len,
            capacity,
        })
}

/// The first `len` bytes of the bounce buffer, grown if needed. Callers
/// bounded `len` by `max_request_bytes` (or 16 bytes per allowed range).
fn grow(bounce: &mut Vec<u8>, len: u64) -> &mut [u8] {
    let len = len as usize;
    if bounce.len() < len {
        bounce.resize(len, 0);
    }
    &mut bounce[..len]
}
