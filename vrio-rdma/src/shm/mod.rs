//! The `shm` back-end: verbs RC semantics between processes on one host,
//! with one-sided operations that cost the target no CPU.
//!
//! - A connection is set up over a Unix `SOCK_SEQPACKET` socket
//!   (`unix:PATH`); each side hands the other a sealed memfd, its
//!   *channel* (a control block and an inbox of slots), and an eventfd.
//! - Regions registered from a file ([`Domain::register_fd`]) are announced
//!   to peers with their file; a peer maps each once, on first use. Other
//!   remote-reachable regions are reached with `process_vm_readv`/`writev`
//!   (CMA), which registration checks the ptrace rules allow.
//! - READ and WRITE are copies the initiator makes, after checking the
//!   rkey, bounds and access of what the target registered. SEND and
//!   WRITE_WITH_IMM's immediate go through the target's inbox; the target
//!   consumes them into posted receives whenever it calls into its endpoint.
//! - No threads: all work happens in the caller's `post_*`, `poll`, `wait`
//!   and `arm`. A sleeping side is woken by arm-then-eventfd, and the socket
//!   (in the same epoll set) reports a peer that died.
//!
//! See `docs/fabric.md` for the layout, the ordering rules and fencing.

mod channel;
mod endpoint;
mod peer;
mod socket;

use rustc_hash::FxHashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

pub use endpoint::ShmEndpoint;

use crate::accept::Acceptor;
use crate::api::{
    AcceptLimits, Access, Domain, Endpoint, EndpointConfig, FabricError, Listener, MemoryRegion,
};
use crate::soft::{Registry, SoftRegion};
use channel::{Channel, Ctrl};
use peer::Announce;
use socket::{Kind, Msg};

/// How long a deregistration or a close waits for a peer that is in the
/// middle of a copy into the memory being revoked.
const FENCE_WAIT: Duration = Duration::from_secs(2);

/// Opens a shm domain (always succeeds; kept fallible like `verbs`).
pub fn open_domain() -> Result<Box<dyn Domain>, FabricError> {
    Ok(Box::new(ShmDomain::new()))
}

/// One connection as its domain sees it: for announcing regions and for
/// fencing peers out of revoked memory.
#[derive(Debug)]
pub(crate) struct Conn {
    sock: OwnedFd,
    /// This side's channel (its control block is ours to write).
    mine: Channel,
    /// The peer's channel (its control block says whether it is copying).
    theirs: Channel,
    /// The endpoint closed or failed: no fencing needed any more.
    closed: AtomicBool,
}

impl Conn {
    /// Waits until the peer has left any copy it started before our last
    /// revocation (see `docs/fabric.md`, fencing).
    fn fence(&self) {
        let deadline = Instant::now() + FENCE_WAIT;
        let mut spins = 0u32;
        while self.theirs.u32_at(Ctrl::Busy).load(Ordering::SeqCst) != 0 {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    "shm fabric: peer stayed inside a copy for {FENCE_WAIT:?}; closing the connection"
                );
                socket::shutdown(&self.sock);
                return;
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// Tells the peer to forget `key` and waits until it cannot touch it.
    fn revoke(&self, key: u32) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut m = Msg::new(Kind::Revoke);
        m.put_u32(8, key);
        if socket::send(&self.sock, &m, &[]).is_err() {
            socket::shutdown(&self.sock);
        }
        self.mine.u64_at(Ctrl::Epoch).fetch_add(1, Ordering::SeqCst);
        self.fence();
    }
}

/// A remote-reachable region as peers are told of it.
#[derive(Debug)]
struct Shared {
    announce: Announce,
    file: Option<OwnedFd>,
}

#[derive(Debug, Default)]
struct DomainState {
    regions: FxHashMap<u32, Shared>,
    conns: Vec<Weak<Conn>>,
}

#[derive(Debug)]
pub(crate) struct DomainShared {
    reg: Arc<Registry>,
    state: Mutex<DomainState>,
}

impl DomainShared {
    fn lock(&self) -> MutexGuard<'_, DomainState> {
        // Updates are single inserts and removals: poison cannot tear it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `r` to `conn`; a peer whose socket is full is cut off.
    fn announce_to(conn: &Conn, r: &Shared) -> bool {
        let fds: Vec<RawFd> = r.file.iter().map(|f| f.as_raw_fd()).collect();
        match socket::send(&conn.sock, &r.announce.encode(), &fds) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("shm fabric: cannot announce a region to a peer ({e}); closing it");
                socket::shutdown(&conn.sock);
                false
            }
        }
    }

    /// Adds a connection and announces every remote-reachable region to it
    /// (under one lock, so no registration slips between).
    fn add_conn(&self, conn: &Arc<Conn>) -> Result<(), FabricError> {
        let mut st = self.lock();
        st.conns.retain(|w| w.strong_count() > 0);
        for r in st.regions.values() {
            if !Self::announce_to(conn, r) {
                return Err(FabricError::Protocol(
                    "peer does not take region announcements".into(),
                ));
            }
        }
        st.conns.push(Arc::downgrade(conn));
        Ok(())
    }

    fn add_region(&self, announce: Announce, file: Option<OwnedFd>) {
        let mut st = self.lock();
        let r = Shared { announce, file };
        for c in st.conns.iter().filter_map(Weak::upgrade) {
            Self::announce_to(&c, &r);
        }
        st.regions.insert(announce.key, r);
    }

    fn remove_region(&self, key: u32) {
        let conns: Vec<Arc<Conn>> = {
            let mut st = self.lock();
            st.regions.remove(&key);
            st.conns.iter().filter_map(Weak::upgrade).collect()
        };
        for c in conns {
            c.revoke(key);
        }
    }
}

/// A shm protection domain: its regions are reachable only through
/// endpoints created from it.
#[derive(Debug, Clone)]
pub struct ShmDomain {
    shared: Arc<DomainShared>,
}

impl ShmDomain {
    /// An empty domain with no regions.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(DomainShared {
                reg: Registry::new(),
                state: Mutex::new(DomainState::default()),
            }),
        }
    }

    fn register_inner(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
        file: Option<(OwnedFd, u64)>,
    ) -> Result<ShmRegion, FabricError> {
        let remote = access.remote_read || access.remote_write;
        if remote && file.is_none() {
            cma_allowed()?;
        }
        let inner = self.shared.reg.register(ptr, len, access)?;
        if !remote {
            return Ok(ShmRegion {
                inner,
                domain: None,
            });
        }
        let (offset, fd) = match file {
            Some((fd, off)) => (Some(off), Some(fd)),
            None => (None, None),
        };
        let announce = Announce {
            key: inner.rkey(),
            access,
            addr: inner.addr(),
            len: inner.len(),
            offset,
        };
        self.shared.add_region(announce, fd);
        Ok(ShmRegion {
            inner,
            domain: Some(Arc::clone(&self.shared)),
        })
    }
}

impl ShmDomain {
    /// [`Domain::connect`], returning the concrete endpoint (for its
    /// hostile-peer test hooks).
    pub fn connect_shm(&self, addr: &str, cfg: EndpointConfig) -> Result<ShmEndpoint, FabricError> {
        let sock = socket::connect(addr)?;
        ShmEndpoint::start(sock, Arc::clone(&self.shared), cfg).map_err(|e| match e {
            FabricError::Connect { .. } => e,
            other => FabricError::Connect {
                addr: addr.to_string(),
                reason: other.to_string(),
            },
        })
    }
}

impl ShmDomain {
    /// [`Domain::listen`] with limits other than the default on the
    /// connections being set up.
    pub fn listen_with(
        &self,
        addr: &str,
        cfg: EndpointConfig,
        limits: AcceptLimits,
    ) -> Result<ShmListener, FabricError> {
        let (sock, path) = socket::listen(addr)?;
        let domain = Arc::clone(&self.shared);
        let acceptor = Acceptor::spawn(
            "shm fabric",
            sock,
            limits,
            Arc::new(move |sock| ShmEndpoint::start(sock, Arc::clone(&domain), cfg)),
        );
        match acceptor {
            Ok(acceptor) => Ok(ShmListener { acceptor, path }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }
}

impl Default for ShmDomain {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether peers will be able to reach this process with CMA; registering
/// memory without a file fails here, with the reason, when they will not.
fn cma_allowed() -> Result<(), FabricError> {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok();
    // SAFETY: PR_GET_DUMPABLE takes no pointers and only returns a value.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) } != 0;
    cma_verdict(scope.as_deref(), dumpable)
}

/// The rule behind [`cma_allowed`]: Yama's `ptrace_scope` (absent: no
/// Yama) and whether the process is dumpable.
fn cma_verdict(scope: Option<&str>, dumpable: bool) -> Result<(), FabricError> {
    let scope: u32 = scope.and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    if scope >= 1 {
        return Err(FabricError::Register(format!(
            "shm reaches memory registered without a file descriptor with \
             process_vm_readv/writev, which kernel.yama.ptrace_scope={scope} forbids \
             between unrelated processes; register it with register_fd (a memfd) \
             or set ptrace_scope to 0"
        )));
    }
    if !dumpable {
        return Err(FabricError::Register(
            "shm reaches memory registered without a file descriptor with \
             process_vm_readv/writev, which this process forbids (it is not dumpable); \
             register it with register_fd (a memfd)"
                .into(),
        ));
    }
    Ok(())
}

impl Domain for ShmDomain {
    // SAFETY: the caller upholds `Domain::register`'s contract (api.rs).
    unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Box<dyn MemoryRegion>, FabricError> {
        Ok(Box::new(self.register_inner(ptr, len, access, None)?))
    }

    // SAFETY: the caller upholds `Domain::register_fd`'s contract (api.rs):
    // ptr..ptr+len maps `fd` from `offset`, so peers mapping the same file
    // range see the same memory.
    unsafe fn register_fd(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<Box<dyn MemoryRegion>, FabricError> {
        let fd = fd.try_clone_to_owned()?;
        Ok(Box::new(self.register_inner(
            ptr,
            len,
            access,
            Some((fd, offset)),
        )?))
    }

    fn listen(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Listener>, FabricError> {
        Ok(Box::new(self.listen_with(
            addr,
            cfg,
            AcceptLimits::default(),
        )?))
    }

    fn connect(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Endpoint>, FabricError> {
        Ok(Box::new(self.connect_shm(addr, cfg)?))
    }
}

/// A region registered with a shm domain. Dropping it revokes it from every
/// peer (which stops touching it before the drop returns) and then
/// deregisters it.
#[derive(Debug)]
pub struct ShmRegion {
    // Field order is drop order, but the revocation runs in Drop first.
    inner: SoftRegion,
    /// Set when peers were told of the region.
    domain: Option<Arc<DomainShared>>,
}

impl MemoryRegion for ShmRegion {
    fn lkey(&self) -> u32 {
        self.inner.lkey()
    }
    fn rkey(&self) -> u32 {
        self.inner.rkey()
    }
    fn addr(&self) -> u64 {
        self.inner.addr()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn access(&self) -> Access {
        self.inner.access()
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        if let Some(d) = self.domain.take() {
            d.remove_region(self.inner.rkey());
        }
    }
}

/// A shm listener: a bound Unix seqpacket socket. Handshakes run
/// concurrently on threads of the listener's own, each within a deadline
/// ([`AcceptLimits`]); peers that fail them are logged and dropped.
/// Dropping the listener stops those threads and removes its socket file.
pub struct ShmListener {
    acceptor: Acceptor<ShmEndpoint>,
    path: PathBuf,
}

impl Listener for ShmListener {
    fn accept(&mut self) -> Result<Box<dyn Endpoint>, FabricError> {
        Ok(Box::new(self.acceptor.accept()?))
    }

    fn local_addr(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

impl Drop for ShmListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cma_is_refused_with_the_reason_when_ptrace_rules_forbid_it() {
        assert!(cma_verdict(None, true).is_ok());
        assert!(cma_verdict(Some("0\n"), true).is_ok());
        for scope in ["1\n", "2", "3"] {
            let e = cma_verdict(Some(scope), true).unwrap_err().to_string();
            assert!(e.contains("ptrace_scope"), "{e}");
            assert!(e.contains("register_fd"), "{e}");
        }
        let e = cma_verdict(None, false).unwrap_err().to_string();
        assert!(e.contains("not dumpable"), "{e}");
    }

    #[test]
    fn memory_with_a_file_needs_no_cma() {
        let d = ShmDomain::new();
        let mut buf = vec![0u8; 4096];
        // Local-only memory is never announced, so CMA does not matter.
        // SAFETY: `buf` outlives the region (dropped first, below).
        let r = unsafe { d.register(buf.as_mut_ptr(), buf.len(), Access::LOCAL_ONLY) }.unwrap();
        assert_eq!(r.len(), 4096);
        drop(r);
    }
}
