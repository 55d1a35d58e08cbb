//! Back-end independent types and traits of the fabric.

use std::fmt;
use std::os::fd::RawFd;

/// Access rights of a registered region (the `IBV_ACCESS_*` flags vrio uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// The local side may write the region (READ results, receive buffers).
    pub local_write: bool,
    /// Peers may READ the region through its rkey.
    pub remote_read: bool,
    /// Peers may WRITE (and WRITE_WITH_IMM) into the region through its rkey.
    pub remote_write: bool,
}

impl Access {
    /// What a VM host grants for guest RAM: the server may READ and WRITE.
    pub const GUEST_RAM: Access = Access {
        local_write: true,
        remote_read: true,
        remote_write: true,
    };
    /// Peers may READ but not WRITE; the local side may still write it.
    pub const REMOTE_READ_ONLY: Access = Access {
        local_write: true,
        remote_read: true,
        remote_write: false,
    };
    /// Not reachable by peers: only usable as the local side of requests.
    pub const LOCAL_ONLY: Access = Access {
        local_write: true,
        remote_read: false,
        remote_write: false,
    };
}

/// What a peer needs to reach a registered region: serialisable, 20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteRegion {
    /// Start address of the region in the owner's address space.
    pub addr: u64,
    /// Length of the region in bytes.
    pub len: u64,
    /// The key a peer names the region with in READ and WRITE requests.
    pub rkey: u32,
}

impl RemoteRegion {
    /// Size of the encoding in bytes.
    pub const WIRE_SIZE: usize = 20;

    /// Encodes as `addr`, `len`, `rkey`, little-endian.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_SIZE] {
        let mut b = [0u8; Self::WIRE_SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b
    }

    /// Decodes what [`RemoteRegion::to_bytes`] wrote; extra bytes are
    /// ignored. Fails with [`FabricError::Protocol`] if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Result<Self, FabricError> {
        if b.len() < Self::WIRE_SIZE {
            return Err(FabricError::Protocol(format!(
                "remote region needs {} bytes, got {}",
                Self::WIRE_SIZE,
                b.len()
            )));
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Ok(Self {
            addr: u64_at(0),
            len: u64_at(8),
            rkey: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        })
    }

    /// The remote address at `offset`, if `offset + len` fits.
    pub fn at(&self, offset: u64, len: u64) -> Option<u64> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| self.addr + offset)
    }
}

/// A locally registered region. Dropping it deregisters the memory.
pub trait MemoryRegion: Send + Sync + fmt::Debug {
    /// The key local work requests name the region with (in an [`Sge`]).
    fn lkey(&self) -> u32;
    /// The key peers name the region with (in READ and WRITE requests).
    fn rkey(&self) -> u32;
    /// Start address of the registered memory.
    fn addr(&self) -> u64;
    /// Length of the registered memory in bytes.
    fn len(&self) -> u64;
    /// The access rights it was registered with.
    fn access(&self) -> Access;
    /// What a peer needs to reach this region, to send it.
    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr(),
            len: self.len(),
            rkey: self.rkey(),
        }
    }
    /// Whether the region is zero bytes long.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Local memory of a work request: `len` bytes at `addr` in region `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// The local region's key ([`MemoryRegion::lkey`]).
    pub lkey: u32,
    /// Start address, inside the region.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// The operation of a send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Copy remote memory into `local`.
    Read {
        /// Where to read in the peer's region.
        remote_addr: u64,
        /// The peer region's key.
        rkey: u32,
    },
    /// Copy `local` into remote memory.
    Write {
        /// Where to write in the peer's region.
        remote_addr: u64,
        /// The peer region's key.
        rkey: u32,
    },
    /// Like `Write`, then consume a receive at the peer carrying `imm`.
    WriteWithImm {
        /// Where to write in the peer's region.
        remote_addr: u64,
        /// The peer region's key.
        rkey: u32,
        /// The immediate value the peer's receive completion carries.
        imm: u32,
    },
    /// Two-sided: consume a posted receive at the peer.
    Send,
}

impl Opcode {
    /// The [`WcOpcode`] of this request's completion at the requester.
    pub fn completion_opcode(&self) -> WcOpcode {
        match self {
            Opcode::Read { .. } => WcOpcode::Read,
            Opcode::Write { .. } | Opcode::WriteWithImm { .. } => WcOpcode::Write,
            Opcode::Send => WcOpcode::Send,
        }
    }
}

/// A send-queue work request (READ, WRITE, WRITE_WITH_IMM or SEND).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRequest {
    /// Caller's identifier, echoed in the request's [`Completion`].
    pub wr_id: u64,
    /// What to do.
    pub opcode: Opcode,
    /// Local memory: the source of WRITE and SEND, the destination of READ.
    pub local: Sge,
    /// Unsignalled requests produce a completion only on error.
    pub signaled: bool,
}

/// A receive-queue work request: a buffer for one SEND (or one
/// WRITE_WITH_IMM's immediate) from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvRequest {
    /// Caller's identifier, echoed in the receive's [`Completion`].
    pub wr_id: u64,
    /// Where the SEND's payload goes; must be local-writable.
    pub local: Sge,
}

/// Work completion status (the subset of `ibv_wc_status` vrio distinguishes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    /// The request completed.
    Success,
    /// Bad rkey, out of bounds, or missing permission at the peer.
    RemoteAccessError,
    /// The peer could not carry out the request (e.g. receive too small).
    RemoteOperationError,
    /// The local sge is outside or not writable in its region.
    LocalProtectionError,
    /// The peer did not post a receive (RNR retries exhausted).
    RnrRetryExceeded,
    /// The peer is gone or the connection broke.
    RetryExceeded,
    /// The endpoint entered the error state; outstanding requests are flushed.
    Flushed,
    /// Anything else, with the provider's code.
    Other(u32),
}

impl WcStatus {
    /// Whether this is [`WcStatus::Success`].
    pub fn is_ok(&self) -> bool {
        *self == WcStatus::Success
    }
}

/// What kind of request a [`Completion`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// An RDMA READ this side posted.
    Read,
    /// An RDMA WRITE or WRITE_WITH_IMM this side posted.
    Write,
    /// A SEND this side posted.
    Send,
    /// A receive consumed by the peer's SEND.
    Recv,
    /// A receive consumed by the peer's WRITE_WITH_IMM.
    RecvWithImm,
}

/// The outcome of one work request, as [`Endpoint::poll`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The `wr_id` of the request it completes.
    pub wr_id: u64,
    /// Success or why it failed.
    pub status: WcStatus,
    /// The kind of request it completes.
    pub opcode: WcOpcode,
    /// Bytes received (receives) or transferred.
    pub byte_len: u32,
    /// The immediate of a [`WcOpcode::RecvWithImm`] completion.
    pub imm: Option<u32>,
}

impl Completion {
    /// What a request posted to an endpoint in the error state completes
    /// with, as verbs does.
    pub fn flushed(wr: &SendRequest) -> Self {
        Completion {
            wr_id: wr.wr_id,
            status: WcStatus::Flushed,
            opcode: wr.opcode.completion_opcode(),
            byte_len: 0,
            imm: None,
        }
    }

    /// The completion `wr` reports on finishing with `status`: none for an
    /// unsignalled success, as in verbs (unsignalled requests report only
    /// errors).
    pub fn of_request(wr: &SendRequest, status: WcStatus) -> Option<Self> {
        (wr.signaled || !status.is_ok()).then(|| Completion {
            wr_id: wr.wr_id,
            status,
            opcode: wr.opcode.completion_opcode(),
            byte_len: if status.is_ok() { wr.local.len } else { 0 },
            imm: None,
        })
    }

    /// A blank entry, to size the buffers `poll` fills.
    pub const EMPTY: Completion = Completion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Send,
        byte_len: 0,
        imm: None,
    };
}

/// Errors of fabric calls (as opposed to per-request completion errors).
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// No RDMA device (or no RDMA support) here; callers may fall back to
    /// the `soft` back-end.
    #[error("no RDMA device on this host ({0})")]
    NoDevice(String),
    /// Connecting, or a peer's handshake, failed.
    #[error("connection to {addr} failed: {reason}")]
    Connect {
        /// The address connected to or listened on.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The endpoint is in the error state; drop it and reconnect.
    #[error("the endpoint is in the error state")]
    EndpointDead,
    /// The batch does not fit in the send or receive queue (its depth).
    #[error("send or receive queue full ({0} slots)")]
    QueueFull(usize),
    /// Memory registration failed.
    #[error("registration failed: {0}")]
    Register(String),
    /// The call was misused (bad argument, wrong context).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A peer sent something malformed.
    #[error("fabric protocol error: {0}")]
    Protocol(String),
    /// A verbs or rdma_cm call failed.
    #[error("verbs: {0}")]
    Verbs(String),
    /// An OS call (socket, eventfd, poll) failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Queue depths and limits asked for at connect or accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Send-queue slots: the most send requests outstanding at once.
    pub send_depth: u32,
    /// Receive-queue slots: the most receives posted at once.
    pub recv_depth: u32,
    /// Largest WRITE that goes inline, in bytes (verbs `max_inline_data`).
    pub max_inline: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            send_depth: 1024,
            recv_depth: 1024,
            max_inline: 64,
        }
    }
}

/// Limits on the connections a `soft` or `shm` listener is setting up, so
/// that no peer can block or delay another's accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptLimits {
    /// The whole handshake must finish within this, counted from the
    /// connection's accept; a slower peer (even one that keeps sending a
    /// byte now and then) is cut off.
    pub handshake_deadline: std::time::Duration,
    /// The most connections in their handshake, or finished and waiting
    /// for [`Listener::accept`], at once; more are closed at once.
    pub max_pending: usize,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            handshake_deadline: std::time::Duration::from_secs(10),
            max_pending: 64,
        }
    }
}

/// A protection domain: registered regions and the endpoints that may use
/// them. vrio makes one per guest, so one guest's rkeys never open another
/// guest's memory.
pub trait Domain: Send + Sync {
    /// Registers existing memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and valid for as long as the returned
    /// region lives; peers may read and write it concurrently, as the access
    /// flags allow.
    unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Box<dyn MemoryRegion>, FabricError>;

    /// Registers memory that is a shared mapping of `fd` at `offset` (guest
    /// RAM from a memfd, say). Back-ends that can share the file with peers
    /// (`shm`) hand it to them, so their READs and WRITEs become plain
    /// copies; the others register `ptr` as [`Domain::register`] does.
    ///
    /// # Safety
    /// As [`Domain::register`]; in addition `ptr..ptr+len` must be a
    /// `MAP_SHARED` mapping of `fd` starting at `offset`.
    unsafe fn register_fd(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
    ) -> Result<Box<dyn MemoryRegion>, FabricError> {
        let _ = (fd, offset);
        // SAFETY: the caller upholds `register`'s contract, which this one
        // extends.
        unsafe { self.register(ptr, len, access) }
    }

    /// CPU time, in nanoseconds, used so far by the threads this domain runs
    /// on its endpoints' behalf (the `soft` back-end's "NIC" threads); 0 for
    /// back-ends that run none (`verbs`, `shm`, `sim`). For CPU per request
    /// by role in the benchmarks.
    fn fabric_cpu_ns(&self) -> u64 {
        0
    }

    /// Listens for reliable connections on `addr` (`host:port` or a Unix path
    /// for `soft`, an IP address and port for `verbs`).
    fn listen(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Listener>, FabricError>;

    /// Connects to a listener.
    fn connect(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Endpoint>, FabricError>;
}

/// The passive side of connections: hands out one endpoint per peer.
pub trait Listener: Send {
    /// Blocks until one peer has connected and completed the handshake.
    fn accept(&mut self) -> Result<Box<dyn Endpoint>, FabricError>;
    /// The bound address (useful with port 0).
    fn local_addr(&self) -> String;
}

/// A reliable connected endpoint (a QP and its completion queue).
///
/// Requests on one endpoint execute and complete in order, as RC does.
pub trait Endpoint: Send {
    /// Posts a batch of send-queue requests. Fails only for local misuse
    /// (queue full, dead endpoint); access faults arrive as completions.
    fn post_send(&mut self, wrs: &[SendRequest]) -> Result<(), FabricError>;
    /// Posts a batch of receives, consumed in order by the peer's SEND and
    /// WRITE_WITH_IMM. Fails only for local misuse, as `post_send`.
    fn post_recv(&mut self, wrs: &[RecvRequest]) -> Result<(), FabricError>;
    /// Non-blocking: fills `out` with what completed, returns how many.
    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError>;
    /// Blocks until at least one completion is ready or `timeout` passes.
    fn wait(&mut self, timeout: std::time::Duration) -> Result<(), FabricError>;
    /// A file descriptor that becomes readable when completions may be ready
    /// (verbs: the completion channel). Drive it with tokio's `AsyncFd`; after
    /// it fires, call [`Endpoint::arm`] and then [`Endpoint::poll`].
    fn notify_fd(&self) -> RawFd;
    /// Re-arms `notify_fd` (verbs: `ibv_req_notify_cq` and ack events).
    fn arm(&mut self) -> Result<(), FabricError>;
    /// Tells the endpoint that its owner watches `notify_fd`
    /// edge-triggered (`EPOLLET`), which reports each new signal once: `arm`
    /// then need not clear the signals already seen, and back-ends that
    /// can save that system call do. A level-triggered watcher must not
    /// call this: the fd would stay readable and wake it in a loop.
    fn set_edge_triggered(&mut self) {}
    /// Short description of the peer.
    fn peer(&self) -> String;
    /// Whether the peer's CPU serves this endpoint's one-sided operations
    /// (the software fabric's threads do; an RNIC and `shm` do not), so
    /// that a protocol can weigh a READ against a message.
    fn one_sided_costs_peer_cpu(&self) -> bool {
        false
    }
}

/// Which back-end to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The software fabric over TCP or Unix sockets.
    Soft,
    /// Real RDMA verbs (needs a device and the `verbs` feature).
    Verbs,
    /// Shared memory between processes on one host (`unix:PATH`
    /// addresses): READ and WRITE are copies by the initiator.
    Shm,
}
