//! The dirty log of a migrating guest (vhost-user `SET_LOG_BASE`): one bit
//! per 4 KiB page of guest-physical memory, from address 0, which the VMM
//! reads while it copies the guest's RAM. A back-end that writes guest
//! memory behind the VMM's back (here: an I/O server's one-sided WRITEs)
//! marks each page it wrote, after the write and before the used index that
//! shows it to the guest, so the VMM sends the page again.
//!
//! The VMM shares the bitmap (a memfd); marking is an atomic OR, as the VMM
//! clears bits concurrently.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use vm_memory::{FileOffset, MmapRegion};

/// Bytes per logged page (vhost-user's `VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;

/// Why a log could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// A log of no bytes, or larger than this process can map.
    #[error("a dirty log of {0} bytes")]
    Size(u64),
    /// mmap refused the VMM's file.
    #[error("cannot map the dirty log: {0}")]
    Map(#[from] vm_memory::mmap::MmapRegionError),
}

/// A dirty-page bitmap shared with the VMM.
#[derive(Debug)]
pub struct DirtyLog {
    map: MmapRegion,
    /// Pages marked (each mark of a page counts once per call).
    marked: AtomicU64,
    /// Ranges that reached past the log: the VMM's log is too small for
    /// the guest's memory, which would lose writes. Counted and logged.
    beyond: AtomicU64,
}

impl DirtyLog {
    /// Maps `size` bytes of the VMM's log at `offset` in `file`.
    pub fn from_file(file: File, size: u64, offset: u64) -> Result<Self, DirtyLogError> {
        let len = usize::try_from(size)
            .ok()
            .filter(|&n| n > 0 && n <= isize::MAX as usize)
            .ok_or(DirtyLogError::Size(size))?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), len)?;
        Ok(Self::with(map))
    }

    /// A private, zeroed log of `bytes` bytes (tests, and a VMM that logs
    /// in its own memory).
    pub fn anonymous(bytes: usize) -> Result<Self, DirtyLogError> {
        if bytes == 0 {
            return Err(DirtyLogError::Size(0));
        }
        Ok(Self::with(MmapRegion::new(bytes)?))
    }

    fn with(map: MmapRegion) -> Self {
        Self {
            map,
            marked: AtomicU64::new(0),
            beyond: AtomicU64::new(0),
        }
    }

    /// Bytes of bitmap (it covers `8 * LOG_PAGE` guest bytes each).
    pub fn len(&self) -> usize {
        self.map.size()
    }

    /// Whether the log has no bytes (never: constructors refuse that).
    pub fn is_empty(&self) -> bool {
        self.map.size() == 0
    }

    fn byte(&self, i: usize) -> Option<&AtomicU8> {
        if i >= self.map.size() {
            return None;
        }
        // SAFETY: `i` is inside the mapping, which lives as long as `self`
        // and is only ever accessed atomically here (the VMM, on the other
        // side, uses atomics too); AtomicU8 has the size and alignment of u8.
        Some(unsafe { AtomicU8::from_ptr(self.map.as_ptr().add(i)) })
    }

    /// Marks every page that `[gpa, gpa + len)` touches. Returns false if
    /// part of the range lies beyond the log (that part is not marked).
    pub fn mark(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let mut whole = true;
        for page in first..=last {
            let Some(b) = usize::try_from(page / 8).ok().and_then(|i| self.byte(i)) else {
                whole = false;
                break;
            };
            b.fetch_or(1 << (page % 8), Ordering::Release);
        }
        self.marked.fetch_add(last - first + 1, Ordering::Relaxed);
        if !whole && self.beyond.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::error!(
                gpa = format_args!("{gpa:#x}"),
                len,
                log_bytes = self.len(),
                "a write beyond the VMM's dirty log: the log is too small for guest memory"
            );
        }
        whole
    }

    /// Whether the page holding `gpa` is marked.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE;
        usize::try_from(page / 8)
            .ok()
            .and_then(|i| self.byte(i))
            .is_some_and(|b| b.load(Ordering::Acquire) & (1 << (page % 8)) != 0)
    }

    /// Whether the page holding `gpa` is marked, clearing it (what the VMM
    /// does to each page it is about to copy).
    pub fn take(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE;
        let bit = 1u8 << (page % 8);
        usize::try_from(page / 8)
            .ok()
            .and_then(|i| self.byte(i))
            .is_some_and(|b| b.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    /// Clears the whole log (as the VMM does between passes).
    pub fn clear(&self) {
        for i in 0..self.len() {
            if let Some(b) = self.byte(i) {
                b.store(0, Ordering::Release);
            }
        }
    }

    /// Pages marked so far (a page marked twice counts twice).
    pub fn pages_marked(&self) -> u64 {
        self.marked.load(Ordering::Relaxed)
    }

    /// Ranges that reached past the log.
    pub fn beyond(&self) -> u64 {
        self.beyond.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    #[test]
    fn marks_every_page_a_range_touches_and_nothing_else() {
        let log = DirtyLog::anonymous(16).unwrap();
        assert!(log.mark(0x1fff, 2)); // pages 1 and 2
        assert!(!log.is_dirty(0));
        assert!(log.is_dirty(0x1000) && log.is_dirty(0x2fff));
        assert!(!log.is_dirty(0x3000));
        assert!(log.mark(9 * LOG_PAGE, 1));
        assert!(log.is_dirty(9 * LOG_PAGE));
        assert!(log.mark(5, 0));
        assert!(!log.is_dirty(5));
        assert!(log.take(9 * LOG_PAGE + 7));
        assert!(!log.take(9 * LOG_PAGE));
        assert!(!log.is_dirty(9 * LOG_PAGE));
        assert_eq!(log.pages_marked(), 3);
        log.clear();
        assert!(!log.is_dirty(0x1000));
    }

    #[test]
    fn a_range_past_the_log_is_reported_not_written_out_of_bounds() {
        let log = DirtyLog::anonymous(1).unwrap(); // 8 pages
        assert!(!log.mark(7 * LOG_PAGE, 2 * LOG_PAGE));
        assert!(log.is_dirty(7 * LOG_PAGE));
        assert!(!log.is_dirty(8 * LOG_PAGE));
        assert!(!log.mark(u64::MAX - 10, 100));
        assert_eq!(log.beyond(), 2);
        assert!(DirtyLog::anonymous(0).is_err());
    }

    #[test]
    fn the_vmm_sees_the_bits_in_its_file() {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.set_len(8192).unwrap();
        let log = DirtyLog::from_file(f.try_clone().unwrap(), 4096, 4096).unwrap();
        log.mark(3 * LOG_PAGE, 1); // byte 0, bit 3 of the mapped part
        log.mark(8 * LOG_PAGE * 10 + 1, 1); // byte 10, bit 0
        let mut b = vec![0u8; 8192];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut b).unwrap();
        assert_eq!(b[4096], 1 << 3);
        assert_eq!(b[4096 + 10], 1);
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(DirtyLog::from_file(f, 0, 0).is_err());
    }
}
