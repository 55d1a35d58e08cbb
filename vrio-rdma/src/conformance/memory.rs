//! Real external memory for the suite: a shared mapping of a memfd, like the
//! guest RAM a VMM hands to vhost-user. Registering it proves the fabric
//! works on memory it did not allocate.

use std::os::fd::{FromRawFd, OwnedFd};

/// A memfd mapped read-write and shared. Accessed only through raw copies,
/// because the fabric may write it at any time.
pub struct MemfdMemory {
    ptr: *mut u8,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory, valid until Drop; all access
// goes through raw copies, so it may be used from any thread.
unsafe impl Send for MemfdMemory {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for MemfdMemory {}

impl MemfdMemory {
    /// Creates a memfd named `name` of `len` bytes (zero-filled) and maps
    /// it. Fails when memfd_create, ftruncate or mmap does.
    pub fn new(name: &str, len: usize) -> std::io::Result<Self> {
        let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: plain syscall with a valid C string; result checked.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is fresh and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on our fd; result checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: maps `len` bytes of our memfd; result checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            _fd: fd,
        })
    }

    /// The memfd, for [`Domain::register_fd`](crate::api::Domain::register_fd).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self._fd.as_fd()
    }

    /// Start of the mapping, for registering it.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Start of the mapping as an address, for work requests.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clamp(&self, off: usize, n: usize) -> usize {
        n.min(self.len.saturating_sub(off))
    }

    /// Copies bytes out of the mapping (truncated at its end).
    pub fn read(&self, off: usize, out: &mut [u8]) {
        let n = self.clamp(off, out.len());
        // SAFETY: off..off+n is inside the live mapping (clamped above);
        // `out` is our own buffer. Only a raw copy touches the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), n) };
    }

    /// Copies bytes into the mapping (truncated at its end).
    pub fn write(&self, off: usize, data: &[u8]) {
        let n = self.clamp(off, data.len());
        // SAFETY: as in `read`, with the direction reversed.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), n) };
    }

    /// Copies up to `n` bytes at `off` into a new vector (truncated at the
    /// mapping's end).
    pub fn to_vec(&self, off: usize, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; self.clamp(off, n)];
        self.read(off, &mut v);
        v
    }
}

impl Drop for MemfdMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len.max(1)) };
    }
}

/// The byte the suite expects at offset `i` of a pattern seeded `seed`.
pub fn pattern(seed: u64, i: usize) -> u8 {
    let x = (i as u64).wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (x ^ (x >> 7) ^ (x >> 13)).wrapping_mul(31) as u8
}

/// Bytes `start..start + n` of the pattern seeded `seed`.
pub fn pattern_vec(seed: u64, start: usize, n: usize) -> Vec<u8> {
    (start..start + n).map(|i| pattern(seed, i)).collect()
}

/// FNV-1a, to compare memory across the connection.
pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}
