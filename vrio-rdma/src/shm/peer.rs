//! The peer's registered regions as this side reaches them: a file mapped
//! on first use, or the peer's address space through CMA
//! (`process_vm_readv`/`writev`).
//!
//! Every READ and WRITE this side initiates is a copy done here, after the
//! rkey, bounds and access checks against what the peer announced. What
//! the peer announced is hostile input too: a lie can only deny the peer
//! its own service, never open memory it did not hand us.

use rustc_hash::FxHashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use super::channel::{file_size, Mapping};
use super::socket::Msg;
use crate::access::{permits, Need};
use crate::api::{Access, WcStatus};

/// Most regions one peer may announce (each holds a descriptor).
pub(crate) const MAX_PEER_REGIONS: usize = 4096;

/// How a region is reached.
#[derive(Debug)]
enum Backing {
    /// Through the peer's address space with CMA.
    Cma,
    /// A shared mapping of the peer's file, made on first use.
    File {
        fd: OwnedFd,
        offset: u64,
        map: Option<(Mapping, usize)>,
    },
}

#[derive(Debug)]
struct PeerRegion {
    addr: u64,
    len: u64,
    access: Access,
    backing: Backing,
}

/// A region announcement, as the socket carries it (`Kind::Region`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Announce {
    pub key: u32,
    pub access: Access,
    pub addr: u64,
    pub len: u64,
    /// Offset of `addr` in the file, when there is one.
    pub offset: Option<u64>,
}

impl Announce {
    pub(crate) fn encode(&self) -> Msg {
        let mut m = Msg::new(super::socket::Kind::Region);
        m.put_u32(8, self.key);
        let a = u32::from(self.access.local_write)
            | u32::from(self.access.remote_read) << 1
            | u32::from(self.access.remote_write) << 2;
        m.put_u32(12, a);
        m.put_u64(16, self.addr);
        m.put_u64(24, self.len);
        m.put_u64(32, self.offset.unwrap_or(0));
        m.put_u32(40, u32::from(self.offset.is_some()));
        m
    }

    pub(crate) fn decode(m: &Msg) -> Self {
        let a = m.u32_at(12);
        Self {
            key: m.u32_at(8),
            access: Access {
                local_write: a & 1 != 0,
                remote_read: a & 2 != 0,
                remote_write: a & 4 != 0,
            },
            addr: m.u64_at(16),
            len: m.u64_at(24),
            offset: (m.u32_at(40) != 0).then(|| m.u64_at(32)),
        }
    }
}

/// Whether process `pid` can be reached with CMA, probed by reading the
/// 8-byte `magic` it said lives at `addr`.
pub(crate) fn cma_probe(pid: i32, addr: u64, magic: u64) -> bool {
    let mut v = 0u64;
    cma(pid, addr, (&mut v as *mut u64).cast(), 8, false).is_ok() && v == magic
}

/// One CMA copy of `len` bytes between local `buf` and `raddr` in `pid`
/// (`write`: local to remote). Partial transfers are continued.
fn cma(pid: i32, raddr: u64, buf: *mut u8, len: usize, write: bool) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let local = libc::iovec {
            // SAFETY: done < len, inside the caller's checked buffer.
            iov_base: unsafe { buf.add(done) }.cast(),
            iov_len: len - done,
        };
        let remote = libc::iovec {
            iov_base: (raddr + done as u64) as usize as *mut libc::c_void,
            iov_len: len - done,
        };
        // SAFETY: the local iovec covers memory the caller checked against
        // its own registration; the remote one is checked by the kernel
        // against the peer's address space (a bad address is an error, not
        // a fault here).
        let n = unsafe {
            if write {
                libc::process_vm_writev(pid, &local, 1, &remote, 1, 0)
            } else {
                libc::process_vm_readv(pid, &local, 1, &remote, 1, 0)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::other("CMA copied nothing"));
        }
        done += n as usize;
    }
    Ok(())
}

/// The peer's regions, keyed by rkey.
#[derive(Debug)]
pub(crate) struct PeerRegions {
    regions: FxHashMap<u32, PeerRegion>,
    pid: i32,
    /// The peer's pidfd: readable once it has exited, so a CMA copy never
    /// lands in a process that reused its pid.
    pidfd: Option<OwnedFd>,
    cma_ok: bool,
    warned_cma: bool,
}

impl PeerRegions {
    pub(crate) fn new(pid: i32, cma_ok: bool) -> Self {
        // SAFETY: plain syscall; a failure leaves us without a pidfd, and
        // CMA is then refused.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = (fd >= 0).then(|| {
            use std::os::fd::FromRawFd;
            // SAFETY: a fresh descriptor nobody else owns.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        });
        Self {
            regions: FxHashMap::default(),
            pid,
            pidfd,
            cma_ok,
            warned_cma: false,
        }
    }

    /// Records an announced region (`file` is its descriptor, if any).
    pub(crate) fn announce(&mut self, a: Announce, file: Option<OwnedFd>) -> Result<(), String> {
        if a.addr.checked_add(a.len).is_none() || a.len == 0 {
            return Err(format!(
                "region {:#x} of {} bytes wraps or is empty",
                a.addr, a.len
            ));
        }
        if self.regions.len() >= MAX_PEER_REGIONS && !self.regions.contains_key(&a.key) {
            return Err(format!("more than {MAX_PEER_REGIONS} regions"));
        }
        let backing = match (a.offset, file) {
            (Some(offset), Some(fd)) => {
                if offset.checked_add(a.len).is_none() {
                    return Err("region's file offset wraps".into());
                }
                Backing::File {
                    fd,
                    offset,
                    map: None,
                }
            }
            (None, None) => Backing::Cma,
            _ => return Err("region announced without its file, or a file without offset".into()),
        };
        self.regions.insert(
            a.key,
            PeerRegion {
                addr: a.addr,
                len: a.len,
                access: a.access,
                backing,
            },
        );
        Ok(())
    }

    /// Whether the peer has announced region `rkey`.
    pub(crate) fn knows(&self, rkey: u32) -> bool {
        self.regions.contains_key(&rkey)
    }

    /// Forgets a region and unmaps it.
    pub(crate) fn revoke(&mut self, key: u32) {
        self.regions.remove(&key);
    }

    /// Forgets every region (close, peer death).
    pub(crate) fn clear(&mut self) {
        self.regions.clear();
    }

    fn peer_alive(&self) -> bool {
        let Some(fd) = &self.pidfd else { return false };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd without waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 0
    }

    /// Copies between local `buf` (checked by the caller) and `len` bytes at
    /// `raddr` in the peer's region `rkey`. `write`: local to remote.
    pub(crate) fn copy(
        &mut self,
        rkey: u32,
        raddr: u64,
        buf: *mut u8,
        len: usize,
        write: bool,
    ) -> Result<(), WcStatus> {
        if len == 0 {
            return Ok(());
        }
        let need = if write {
            Need::RemoteWrite
        } else {
            Need::RemoteRead
        };
        let Some(r) = self.regions.get_mut(&rkey) else {
            return Err(WcStatus::RemoteAccessError);
        };
        if !permits(r.addr, r.len, r.access, raddr, len as u64, need) {
            return Err(WcStatus::RemoteAccessError);
        }
        let delta = raddr - r.addr;
        match &mut r.backing {
            Backing::File { fd, offset, map } => {
                if map.is_none() {
                    *map = Some(map_region(fd, *offset, r.len, r.access.remote_write)?);
                }
                let Some((m, skew)) = map.as_ref() else {
                    return Err(WcStatus::RemoteAccessError);
                };
                // SAFETY: permits() put raddr..raddr+len inside the region,
                // and the mapping covers the whole region from `skew`.
                let peer = unsafe { m.ptr().add(*skew + delta as usize) };
                // SAFETY: `buf` is the caller's checked local range and
                // `peer` lies in our live mapping of the peer's file (sized
                // and checked in map_region). Both may be written by other
                // parties concurrently; only raw copies touch them.
                unsafe {
                    if write {
                        std::ptr::copy(buf, peer, len);
                    } else {
                        std::ptr::copy(peer, buf, len);
                    }
                }
                Ok(())
            }
            Backing::Cma => {
                if !self.cma_ok {
                    if !self.warned_cma {
                        self.warned_cma = true;
                        tracing::warn!(
                            "shm fabric: peer pid {} cannot be reached with process_vm_readv \
                             (ptrace rules); it must register memory from a file descriptor",
                            self.pid
                        );
                    }
                    return Err(WcStatus::RemoteAccessError);
                }
                if !self.peer_alive() {
                    return Err(WcStatus::RetryExceeded);
                }
                cma(self.pid, raddr, buf, len, write).map_err(|e| {
                    tracing::debug!("shm fabric: CMA copy failed: {e}");
                    if e.raw_os_error() == Some(libc::ESRCH) {
                        // The peer exited under us: a lost peer, as in verbs.
                        WcStatus::RetryExceeded
                    } else {
                        WcStatus::RemoteAccessError
                    }
                })
            }
        }
    }
}

/// Maps a peer region's file: the whole region, from the page its offset
/// falls in. Refuses a file too short for it (a later access would fault).
fn map_region(
    fd: &OwnedFd,
    offset: u64,
    len: u64,
    writable: bool,
) -> Result<(Mapping, usize), WcStatus> {
    let fail = |why: String| {
        tracing::warn!("shm fabric: cannot map a peer region: {why}");
        WcStatus::RemoteAccessError
    };
    let size = file_size(fd).map_err(|e| fail(e.to_string()))?;
    let end = offset
        .checked_add(len)
        .ok_or_else(|| fail("offset wraps".into()))?;
    if end > size {
        return Err(fail(format!(
            "region ends at {end} in a file of {size} bytes"
        )));
    }
    let page = 4096u64;
    let start = offset / page * page;
    let skew = (offset - start) as usize;
    let total = usize::try_from(end - start).map_err(|_| fail("region too large".into()))?;
    let m = Mapping::map(fd, start, total, writable).map_err(|e| fail(e.to_string()))?;
    Ok((m, skew))
}
