//! A raw disk image in a file (or a host block device): positional vectored
//! I/O with `preadv`/`pwritev`, `fdatasync` on FLUSH, and discard by punching
//! holes, falling back to writing zeros where the filesystem cannot.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{ID_BYTES, SECTOR_SIZE};
use crate::virtio::blk::{check_range, id_from_str, read_only_error, BlockBackend};

/// iovecs passed to one `preadv`/`pwritev` call (well under IOV_MAX).
const IOV_BATCH: usize = 64;
/// Source of zeros for the write-zeros fallback.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A [`BlockBackend`] over a raw image file or host block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// Cleared once the filesystem refused PUNCH_HOLE, to stop asking.
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

impl FileBackend {
    /// Opens an existing image; its size, rounded down to whole sectors, is
    /// the capacity.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| with_path(e, "opening", path))?;
        Self::from_file(file, path, read_only)
    }

    /// Opens `path` read-write, creating it, and extends it to `size` bytes
    /// if it is smaller (never shrinks: that would destroy data).
    pub fn create(path: impl AsRef<Path>, size: u64) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| with_path(e, "creating", path))?;
        let len = file.metadata()?.len();
        if len < size {
            file.set_len(size)
                .map_err(|e| with_path(e, "extending", path))?;
        }
        Self::from_file(file, path, false)
    }

    fn from_file(mut file: File, path: &Path, read_only: bool) -> io::Result<Self> {
        // Seeking to the end also sizes block devices, whose metadata says 0.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| with_path(e, "sizing", path))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            file,
            size: len - len % SECTOR_SIZE,
            read_only,
            id: id_from_str(&name),
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
        })
    }

    /// Sets the GET_ID serial (default: the file's name), truncated to 20
    /// bytes.
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = id_from_str(id);
        self
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `fallocate(mode)`; `Ok(false)` when the filesystem does not support it.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
        let (off, n) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            (Ok(o), Ok(n)) => (o, n),
            _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        };
        loop {
            // SAFETY: fallocate takes no pointers; the fd is owned by `self.file`.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
            if r == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => return Ok(false),
                _ => return Err(e),
            }
        }
    }

    /// Tries `fallocate(mode)` once per backend; writes zeros if unsupported.
    fn zero_with(
        &self,
        flag: &AtomicBool,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        // fallocate refuses len 0 with EINVAL, which would read as "unsupported".
        if len == 0 {
            return Ok(());
        }
        if flag.load(Ordering::Relaxed) {
            if self.fallocate(mode, offset, len)? {
                return Ok(());
            }
            flag.store(false, Ordering::Relaxed);
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            self.write_vectored_at(offset + done, &[IoSlice::new(&ZEROS[..n])])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Repeats `preadv`/`pwritev` until all of `iov` is transferred, resuming
/// after short transfers and EINTR. `iov` points at live buffers.
fn positional_io(
    fd: libc::c_int,
    mut offset: u64,
    iov: &[libc::iovec],
    write: bool,
) -> io::Result<()> {
    let (mut idx, mut skip) = (0usize, 0usize);
    while idx < iov.len() {
        if iov[idx].iov_len == skip {
            idx += 1;
            skip = 0;
            continue;
        }
        let mut batch = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; IOV_BATCH];
        let mut count = 0;
        for (k, v) in iov[idx..].iter().take(IOV_BATCH).enumerate() {
            let s = if k == 0 { skip } else { 0 };
            batch[k] = libc::iovec {
                // `skip` < iov_len, so this stays inside the buffer.
                iov_base: v.iov_base.cast::<u8>().wrapping_add(s).cast(),
                iov_len: v.iov_len - s,
            };
            count = k + 1;
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `batch[..count]` describes sub-ranges of the caller's
        // buffers, which outlive this call; for reads they are exclusively
        // borrowed by the caller (IoSliceMut), so the kernel may write them.
        let r = unsafe {
            if write {
                libc::pwritev(fd, batch.as_ptr(), count as libc::c_int, off)
            } else {
                libc::preadv(fd, batch.as_ptr(), count as libc::c_int, off)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(if write {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "image shorter than its capacity",
                )
            });
        }
        let mut n = r as usize;
        offset += n as u64;
        // The kernel never reports more than asked; the bound is defensive.
        while n > 0 && idx < iov.len() {
            let left = iov[idx].iov_len - skip;
            if n < left {
                skip += n;
                n = 0;
            } else {
                n -= left;
                idx += 1;
                skip = 0;
            }
        }
    }
    Ok(())
}

impl BlockBackend for FileBackend {
    fn capacity(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> [u8; ID_BYTES] {
        self.id
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        // SAFETY: std guarantees IoSliceMut is ABI-compatible with iovec on
        // Unix, and the slice is borrowed mutably for the whole call.
        let iov =
            unsafe { std::slice::from_raw_parts(bufs.as_ptr().cast::<libc::iovec>(), bufs.len()) };
        positional_io(self.file.as_raw_fd(), offset, iov, false)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        // SAFETY: std guarantees IoSlice is ABI-compatible with iovec on Unix;
        // pwritev only reads through these pointers.
        let iov =
            unsafe { std::slice::from_raw_parts(bufs.as_ptr().cast::<libc::iovec>(), bufs.len()) };
        positional_io(self.file.as_raw_fd(), offset, iov, true)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(offset, len, self.size)?;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.zero_with(&self.punch_hole, mode, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if may_unmap {
            return self.discard(offset, len);
        }
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(offset, len, self.size)?;
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        self.zero_with(&self.zero_range, mode, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::tests::read_back as read;
    use crate::blk::tests::TempPath;
    use std::sync::Arc;

    #[test]
    fn create_extends_but_never_shrinks() {
        let p = TempPath::new("extend");
        std::fs::write(&p.0, [7u8; 1000]).unwrap();
        let b = FileBackend::create(&p.0, 1 << 20).unwrap();
        assert_eq!(b.capacity(), (1 << 20) / 512);
        assert_eq!(read(&b, 0, 1000), vec![7u8; 1000]);
        assert!(read(&b, 1000, 4096).iter().all(|&x| x == 0));
        drop(b);
        let b = FileBackend::create(&p.0, 4096).unwrap();
        assert_eq!(b.size(), 1 << 20);
        assert_eq!(std::fs::metadata(&p.0).unwrap().len(), 1 << 20);
        // 1000 bytes round down to one sector.
        let q = TempPath::new("odd");
        std::fs::write(&q.0, [0u8; 1000]).unwrap();
        assert_eq!(FileBackend::open(&q.0, true).unwrap().capacity(), 1);
    }

    #[test]
    fn vectored_io_round_trips_many_slices() {
        let p = TempPath::new("vectored");
        let b = FileBackend::create(&p.0, 1 << 20).unwrap();
        // More slices than one syscall batch, odd sizes, an empty one.
        let parts: Vec<Vec<u8>> = (0..150u32)
            .map(|i| vec![i as u8; (i as usize * 13) % 97])
            .collect();
        let slices: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        b.write_vectored_at(12345, &slices).unwrap();
        let want: Vec<u8> = parts.concat();
        let mut back: Vec<Vec<u8>> = parts.iter().map(|p| vec![0u8; p.len()]).collect();
        let mut ms: Vec<IoSliceMut> = back.iter_mut().map(|p| IoSliceMut::new(p)).collect();
        b.read_vectored_at(12345, &mut ms).unwrap();
        assert_eq!(back.concat(), want);
        assert_eq!(read(&b, 12345, want.len()), want);
        b.flush().unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zero() {
        let p = TempPath::new("zero");
        let b = FileBackend::create(&p.0, 1 << 20).unwrap();
        b.write_vectored_at(0, &[IoSlice::new(&[0x5a; 65536])])
            .unwrap();
        b.flush().unwrap();
        let blocks = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&p.0).unwrap());
        let before = blocks();
        // A zero-length range is a no-op and must not disable hole punching.
        b.discard(4096, 0).unwrap();
        assert!(b.punch_hole.load(Ordering::Relaxed));
        b.discard(4096, 8192).unwrap();
        if b.punch_hole.load(Ordering::Relaxed) {
            assert!(blocks() < before, "a punched hole frees blocks");
        } else {
            eprintln!(
                "note: {} cannot punch holes; zeros were written",
                p.0.display()
            );
        }
        b.write_zeroes(20480, 512, false).unwrap();
        b.write_zeroes(30000 - 30000 % 512, 1024, true).unwrap();
        let v = read(&b, 0, 65536);
        for (i, &x) in v.iter().enumerate() {
            let zero = (4096..12288).contains(&i)
                || (20480..20992).contains(&i)
                || (29696..30720).contains(&i);
            assert_eq!(x, if zero { 0 } else { 0x5a }, "byte {i}");
        }
        // The size is kept (KEEP_SIZE) and out-of-range is refused.
        assert_eq!(std::fs::metadata(&p.0).unwrap().len(), 1 << 20);
        assert!(b.discard((1 << 20) - 512, 1024).is_err());
    }

    #[test]
    fn fallback_zeroing_works_when_fallocate_is_unavailable() {
        let p = TempPath::new("fallback");
        let b = FileBackend::create(&p.0, 1 << 20).unwrap();
        b.write_vectored_at(0, &[IoSlice::new(&[0x11; 200_000])])
            .unwrap();
        b.punch_hole.store(false, Ordering::Relaxed);
        b.zero_range.store(false, Ordering::Relaxed);
        b.discard(512, 100_000).unwrap();
        b.write_zeroes(150_016, 1024, false).unwrap();
        let v = read(&b, 0, 200_000);
        assert!(v[..512].iter().all(|&x| x == 0x11));
        assert!(v[512..100_512].iter().all(|&x| x == 0));
        assert!(v[100_512..150_016].iter().all(|&x| x == 0x11));
        assert!(v[150_016..151_040].iter().all(|&x| x == 0));
        assert!(v[151_040..].iter().all(|&x| x == 0x11));
    }

    #[test]
    fn read_only_open_refuses_writes() {
        let p = TempPath::new("ro");
        drop(FileBackend::create(&p.0, 8192).unwrap());
        let b = FileBackend::open(&p.0, true).unwrap();
        assert!(b.read_only());
        for e in [
            b.write_vectored_at(0, &[IoSlice::new(&[1; 512])])
                .unwrap_err(),
            b.discard(0, 512).unwrap_err(),
            b.write_zeroes(0, 512, false).unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        }
        assert_eq!(read(&b, 0, 512), vec![0; 512]);
        assert!(FileBackend::open(p.0.with_extension("missing"), true).is_err());
    }

    #[test]
    fn two_threads_write_different_blocks_concurrently() {
        let p = TempPath::new("threads");
        let b = Arc::new(FileBackend::create(&p.0, 4 << 20).unwrap());
        let threads: Vec<_> = (0..2u8)
            .map(|t| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    for i in 0..256u64 {
                        let blk = i * 2 + u64::from(t);
                        b.write_vectored_at(blk * 4096, &[IoSlice::new(&[t + 1; 4096])])
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for blk in 0..512u64 {
            let want = (blk % 2) as u8 + 1;
            assert!(
                read(&*b, blk * 4096, 4096).iter().all(|&x| x == want),
                "block {blk}"
            );
        }
    }
}
