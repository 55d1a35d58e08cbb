//! The shm fabric's Unix sockets: `SOCK_SEQPACKET`, one 64-byte control
//! message per packet, file descriptors passed with SCM_RIGHTS.
//!
//! The socket carries the handshake (each side's channel and eventfd), the
//! regions a side registers for peers (with their files), revocations and
//! the goodbye. Its hang-up is how a side learns that its peer died.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

use crate::api::FabricError;

/// Bytes of a control message.
pub(crate) const MSG_LEN: usize = 64;
/// Most descriptors one message may carry.
const MAX_FDS: usize = 2;
const MAGIC: u32 = u32::from_le_bytes(*b"VSHM");
const VERSION: u16 = 1;

/// Kinds of control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Channel and eventfd (fds), inbox geometry, CMA probe address.
    Hello = 1,
    /// A region peers may reach (its file as an fd, or none for CMA).
    Region = 2,
    /// A region peers may no longer reach.
    Revoke = 3,
    /// The sender closed its endpoint.
    Close = 4,
}

/// A control message: the kind and a little-endian body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg {
    pub kind: Kind,
    pub body: [u8; MSG_LEN],
}

impl Msg {
    pub(crate) fn new(kind: Kind) -> Self {
        let mut body = [0u8; MSG_LEN];
        body[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        body[4..6].copy_from_slice(&VERSION.to_le_bytes());
        body[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
        Self { kind, body }
    }

    pub(crate) fn put_u32(&mut self, at: usize, v: u32) {
        self.body[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn put_u64(&mut self, at: usize, v: u64) {
        self.body[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u32_at(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.body[at..at + 4]);
        u32::from_le_bytes(b)
    }

    pub(crate) fn u64_at(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.body[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() != MSG_LEN {
            return Err(format!("control message of {} bytes", b.len()));
        }
        let mut body = [0u8; MSG_LEN];
        body.copy_from_slice(b);
        let m = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let v = u16::from_le_bytes([b[4], b[5]]);
        if m != MAGIC || v != VERSION {
            return Err(format!("bad magic {m:#x} or version {v}"));
        }
        let kind = match u16::from_le_bytes([b[6], b[7]]) {
            1 => Kind::Hello,
            2 => Kind::Region,
            3 => Kind::Revoke,
            4 => Kind::Close,
            k => return Err(format!("unknown control message kind {k}")),
        };
        Ok(Self { kind, body })
    }
}

/// What a non-blocking receive found.
pub(crate) enum Recv {
    /// A message and the descriptors that came with it.
    Msg(Msg, Vec<OwnedFd>),
    /// Nothing queued.
    Empty,
    /// The peer closed or died.
    Eof,
    /// The peer sent something that is not a control message.
    Bad(String),
}

fn path_of(addr: &str) -> Result<PathBuf, FabricError> {
    let p = addr
        .strip_prefix("unix:")
        .or_else(|| addr.starts_with('/').then_some(addr))
        .ok_or_else(|| {
            FabricError::InvalidRequest(format!(
                "shm addresses are unix:PATH (a Unix socket path), got {addr:?}"
            ))
        })?;
    Ok(PathBuf::from(p))
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn connect_err(addr: &str, e: impl std::fmt::Display) -> FabricError {
    FabricError::Connect {
        addr: addr.to_string(),
        reason: e.to_string(),
    }
}

/// Binds and listens on `unix:PATH`. A stale socket file nobody listens on
/// is replaced; a live one is an error.
pub(crate) fn listen(addr: &str) -> Result<(OwnedFd, PathBuf), FabricError> {
    let path = path_of(addr)?;
    let sock = seqpacket().map_err(|e| connect_err(addr, e))?;
    let ua = UnixAddr::new(&path).map_err(|e| connect_err(addr, e))?;
    if let Err(e) = socket::bind(sock.as_raw_fd(), &ua) {
        if e != nix::errno::Errno::EADDRINUSE || connect_path(&path).is_ok() {
            return Err(connect_err(addr, format!("bind: {e}")));
        }
        // Nobody answers there: a socket file left by a process that died.
        let _ = std::fs::remove_file(&path);
        socket::bind(sock.as_raw_fd(), &ua).map_err(|e| connect_err(addr, format!("bind: {e}")))?;
    }
    socket::listen(&sock, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| connect_err(addr, format!("listen: {e}")))?;
    Ok((sock, path))
}

fn connect_path(path: &Path) -> nix::Result<OwnedFd> {
    let sock = seqpacket()?;
    let ua = UnixAddr::new(path)?;
    socket::connect(sock.as_raw_fd(), &ua)?;
    Ok(sock)
}

/// Connects to a listener at `unix:PATH`.
pub(crate) fn connect(addr: &str) -> Result<OwnedFd, FabricError> {
    let path = path_of(addr)?;
    connect_path(&path).map_err(|e| connect_err(addr, e))
}

/// The pid of the process at the other end (from the kernel, not from
/// anything the peer says).
pub(crate) fn peer_pid(sock: &OwnedFd) -> Result<i32, FabricError> {
    let cred = socket::getsockopt(sock, sockopt::PeerCredentials)
        .map_err(|e| FabricError::Protocol(format!("SO_PEERCRED: {e}")))?;
    Ok(cred.pid())
}

/// Sets (or clears, with `None`) the receive timeout.
pub(crate) fn set_recv_timeout(sock: &OwnedFd, t: Option<Duration>) -> Result<(), FabricError> {
    let tv = nix::sys::time::TimeVal::from(libc::timeval {
        tv_sec: t.map_or(0, |t| t.as_secs() as libc::time_t),
        tv_usec: t.map_or(0, |t| t.subsec_micros() as libc::suseconds_t),
    });
    socket::setsockopt(sock, sockopt::ReceiveTimeout, &tv).map_err(|e| FabricError::Io(e.into()))
}

/// Sends one message with `fds`. Never blocks: a peer that does not drain
/// its socket gets an error here, not a stuck sender.
pub(crate) fn send(sock: &OwnedFd, m: &Msg, fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(&m.body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message. `block` waits for it (up to the socket's receive
/// timeout); otherwise an empty socket gives [`Recv::Empty`]. Descriptors
/// that arrive are owned at once, so a peer cannot leak them into us.
pub(crate) fn recv(sock: &OwnedFd, block: bool) -> Recv {
    let mut buf = [0u8; MSG_LEN + 1];
    let mut cspace = nix::cmsg_space!([RawFd; MAX_FDS]);
    let flags = if block {
        MsgFlags::MSG_CMSG_CLOEXEC
    } else {
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT
    };
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let r = socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cspace), flags);
        let msg = match r {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Recv::Empty,
            Err(e) => {
                tracing::debug!("shm fabric: socket receive failed: {e}");
                return Recv::Eof;
            }
        };
        let mut fds = Vec::new();
        let mut truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(v) = c {
                    // SAFETY: SCM_RIGHTS installed these descriptors in our
                    // table for us; nothing else owns them.
                    fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
        } else {
            truncated = true;
        }
        let n = msg.bytes;
        if n == 0 && fds.is_empty() {
            return Recv::Eof;
        }
        if truncated || msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Recv::Bad("oversized control message or too many descriptors".into());
        }
        return match Msg::decode(&buf[..n]) {
            Ok(m) => Recv::Msg(m, fds),
            Err(e) => Recv::Bad(e),
        };
    }
}

/// Shuts both directions down (wakes a peer blocked on the socket).
pub(crate) fn shutdown(sock: &OwnedFd) {
    let _ = socket::shutdown(sock.as_raw_fd(), socket::Shutdown::Both);
}
