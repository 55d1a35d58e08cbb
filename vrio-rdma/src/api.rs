//! Back-end independent types and traits of the fabric.

use std::fmt;
use std::os::fd::RawFd;

/// Access rights of a registered region (the `IBV_ACCESS_*` flags vrio uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub local_write: bool,
    pub remote_read: bool,
    pub remote_write: bool,
}

impl Access {
    /// What a VM host grants for guest RAM: the server may READ and WRITE.
    pub const GUEST_RAM: Access = Access {
        local_write: true,
        remote_read: true,
        remote_write: true,
    };
    pub const REMOTE_READ_ONLY: Access = Access {
        local_write: true,
        remote_read: true,
        remote_write: false,
    };
    pub const LOCAL_ONLY: Access = Access {
        local_write: true,
        remote_read: false,
        remote_write: false,
    };
}

/// What a peer needs to reach a registered region: serialisable, 20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

impl RemoteRegion {
    pub const WIRE_SIZE: usize = 20;

    pub fn to_bytes(&self) -> [u8; Self::WIRE_SIZE] {
        let mut b = [0u8; Self::WIRE_SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b
    }

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
    fn lkey(&self) -> u32;
    fn rkey(&self) -> u32;
    fn addr(&self) -> u64;
    fn len(&self) -> u64;
    fn access(&self) -> Access;
    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr(),
            len: self.len(),
            rkey: self.rkey(),
        }
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Local memory of a work request: `len` bytes at `addr` in region `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    pub lkey: u32,
    pub addr: u64,
    pub len: u32,
}

/// The operation of a send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Copy remote memory into `local`.
    Read { remote_addr: u64, rkey: u32 },
    /// Copy `local` into remote memory.
    Write { remote_addr: u64, rkey: u32 },
    /// Like `Write`, then consume a receive at the peer carrying `imm`.
    WriteWithImm {
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    },
    /// Two-sided: consume a posted receive at the peer.
    Send,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRequest {
    pub wr_id: u64,
    pub opcode: Opcode,
    pub local: Sge,
    /// Unsignalled requests produce a completion only on error.
    pub signaled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvRequest {
    pub wr_id: u64,
    pub local: Sge,
}

/// Work completion status (the subset of `ibv_wc_status` vrio distinguishes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
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
    pub fn is_ok(&self) -> bool {
        *self == WcStatus::Success
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    Read,
    Write,
    Send,
    Recv,
    /// A receive consumed by the peer's WRITE_WITH_IMM.
    RecvWithImm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes received (receives) or transferred.
    pub byte_len: u32,
    pub imm: Option<u32>,
}

impl Completion {
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
    #[error("no RDMA device on this host ({0})")]
    NoDevice(String),
    #[error("connection to {addr} failed: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the endpoint is in the error state")]
    EndpointDead,
    #[error("send or receive queue full ({0} slots)")]
    QueueFull(usize),
    #[error("registration failed: {0}")]
    Register(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("fabric protocol error: {0}")]
    Protocol(String),
    #[error("verbs: {0}")]
    Verbs(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Queue depths and limits asked for at connect or accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConfig {
    pub send_depth: u32,
    pub recv_depth: u32,
    /// Largest WRITE that goes inline (verbs `max_inline_data`).
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

    /// Listens for reliable connections on `addr` (`host:port` or a Unix path
    /// for `soft`, an IP address and port for `verbs`).
    fn listen(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Listener>, FabricError>;

    /// Connects to a listener.
    fn connect(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Endpoint>, FabricError>;
}

pub trait Listener: Send {
    /// Blocks until one peer connects.
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
    /// Short description of the peer.
    fn peer(&self) -> String;
}

/// Which back-end to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Soft,
    Verbs,
}
