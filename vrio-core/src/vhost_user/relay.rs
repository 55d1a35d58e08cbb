//! A vhost-user relay between the VMM and the vhost-user daemon
//! (vhost-user-backend), for what that crate's handler does not do and
//! cannot be extended with:
//!
//! - SET_VRING_ENABLE sent before SET_FEATURES. QEMU's virtio-net enables
//!   the vrings of a vhost-user peer when it attaches it, before any
//!   SET_FEATURES; the vhost crate only takes SET_VRING_ENABLE once
//!   PROTOCOL_FEATURES is acked and ends the session otherwise. QEMU does
//!   not repeat them when it starts the device, so the relay holds the last
//!   state of each vring and replays it right after SET_FEATURES (as the
//!   spec orders: enable state applies once the features are known).
//! - Inflight I/O tracking (INFLIGHT_SHMFD), with [`RelayOptions::inflight`]:
//!   the relay adds the feature to the daemon's GET_PROTOCOL_FEATURES reply,
//!   strips it from SET_PROTOCOL_FEATURES, answers GET_INFLIGHT_FD itself
//!   (a fresh region, [`InflightRegion::create`]) and maps the region of
//!   SET_INFLIGHT_FD for the session's back-end.
//!
//! - Dirty logging (LOG_SHMFD), with [`RelayOptions::log`]: the relay adds
//!   the feature to the daemon's GET_PROTOCOL_FEATURES reply, strips it
//!   from SET_PROTOCOL_FEATURES, maps SET_LOG_BASE's log for the session's
//!   back-end and answers it (QEMU waits for that reply, although the spec
//!   lists none). The daemon's own handler would log only writes made
//!   through its memory objects, and never stop.
//!
//! When QEMU asks for an ack (NEED_REPLY) of a message the relay takes, the
//! relay answers itself; QEMU waits for one reply at a time, so it never
//! interleaves with the daemon's. Front-end messages are relayed whole with
//! their file descriptors; replies are relayed message by message.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures, MAX_MSG_SIZE};
use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::backend::VrioBackend;
use super::inflight::InflightRegion;
use crate::virtio::dirty_log::DirtyLog;

const HDR_LEN: usize = 12;
/// Header flags (vhost-user spec): protocol version 1, reply, need reply.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// Most descriptors one vhost-user message carries (SET_MEM_TABLE).
const MAX_FDS: usize = 32;
/// `struct VhostUserInflight` as QEMU sizes it (20 bytes, padded).
const INFLIGHT_MSG: usize = 24;
const INFLIGHT_SHMFD: u64 = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
const LOG_SHMFD: u64 = VhostUserProtocolFeatures::LOG_SHMFD.bits();
/// `struct VhostUserLog`: mmap_size, mmap_offset.
const LOG_MSG: usize = 16;

/// Why the relay refused bytes a peer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The header announces a body over `MAX_MSG_SIZE`.
    #[error("vhost-user message of {0} bytes")]
    Oversized(usize),
    /// Fewer bytes than the header or the body's fields need.
    #[error("vhost-user {what} of {len} bytes, {need} needed")]
    Short {
        /// What was being parsed.
        what: &'static str,
        /// Bytes there were.
        len: usize,
        /// Bytes it needs.
        need: usize,
    },
}

fn need(what: &'static str, b: &[u8], need: usize) -> Result<(), ParseError> {
    if b.len() < need {
        return Err(ParseError::Short {
            what,
            len: b.len(),
            need,
        });
    }
    Ok(())
}

/// A vhost-user message header, as the relay reads it from the VMM or the
/// daemon: request code, flags and the size of the body that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    /// The request code (`FrontendReq`).
    pub request: u32,
    /// Version and the REPLY / NEED_REPLY bits.
    pub flags: u32,
    /// Body bytes after the header (at most `MAX_MSG_SIZE`).
    pub size: usize,
}

impl MsgHeader {
    /// Bytes of every header.
    pub const LEN: usize = HDR_LEN;

    /// Parses the first [`Self::LEN`] bytes of `b`; refuses a body larger
    /// than the relay's buffer.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("header", b, HDR_LEN)?;
        let h = Self {
            request: word(b, 0),
            flags: word(b, 1),
            size: word(b, 2) as usize,
        };
        if h.size > MAX_MSG_SIZE {
            return Err(ParseError::Oversized(h.size));
        }
        Ok(h)
    }
}

/// A body carrying one u64 (GET/SET_PROTOCOL_FEATURES).
pub fn parse_u64_body(body: &[u8]) -> Result<u64, ParseError> {
    need("u64 body", body, 8)?;
    Ok(le_u64(body, 0))
}

/// SET_VRING_ENABLE's body: (vring index, enable).
pub fn parse_vring_state(body: &[u8]) -> Result<(u32, u32), ParseError> {
    need("vring state", body, 8)?;
    Ok((word(body, 0), word(body, 1)))
}

/// The body of GET_INFLIGHT_FD and SET_INFLIGHT_FD
/// (`struct VhostUserInflight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InflightMsg {
    /// Bytes of the region to map.
    pub mmap_size: u64,
    /// Where the region starts in the fd, in bytes.
    pub mmap_offset: u64,
    /// Queues the region covers.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
}

impl InflightMsg {
    /// Bytes that carry the fields (QEMU pads the struct to 24).
    pub const LEN: usize = 20;

    /// Parses the fields; refuses a body shorter than [`Self::LEN`].
    pub fn parse(body: &[u8]) -> Result<Self, ParseError> {
        need("inflight body", body, Self::LEN)?;
        Ok(Self::parse_lenient(body))
    }

    /// Like [`Self::parse`], but a field the body does not hold whole reads
    /// as zero (GET_INFLIGHT_FD answers whatever it is asked).
    pub fn parse_lenient(body: &[u8]) -> Self {
        Self {
            mmap_size: le_u64(body, 0),
            mmap_offset: le_u64(body, 8),
            num_queues: le_u16(body, 16),
            queue_size: le_u16(body, 18),
        }
    }
}

/// Who takes the inflight region of SET_INFLIGHT_FD (the session's
/// back-end).
pub type InflightSink = Arc<dyn Fn(InflightRegion) + Send + Sync>;

/// Who takes the dirty log of SET_LOG_BASE (the session's back-end).
pub type LogSink = Arc<dyn Fn(DirtyLog) + Send + Sync>;

/// What the relay adds to the daemon.
#[derive(Clone, Default)]
pub struct RelayOptions {
    /// Offer INFLIGHT_SHMFD and hand SET_INFLIGHT_FD's region here.
    pub inflight: Option<InflightSink>,
    /// Offer LOG_SHMFD and hand SET_LOG_BASE's log here.
    pub log: Option<LogSink>,
}

impl RelayOptions {
    /// The protocol features the relay serves itself.
    fn extra_features(&self) -> u64 {
        let mut f = 0;
        if self.inflight.is_some() {
            f |= INFLIGHT_SHMFD;
        }
        if self.log.is_some() {
            f |= LOG_SHMFD;
        }
        f
    }
}

/// Serves one VMM on `socket` through the relay: the daemon connects to a
/// private socket next to it (`<socket>.daemon`), the VMM's connection is
/// relayed to it until either side closes. With `inflight`, inflight
/// tracking is offered and its region goes to `backend`; the dirty log
/// goes there too when the back-end can log (see
/// [`VrioBackend::can_log`]).
pub fn serve_relayed(
    daemon: &mut VhostUserDaemon<Arc<VrioBackend>>,
    socket: &Path,
    backend: &Arc<VrioBackend>,
    inflight: bool,
) -> Result<(), String> {
    let e = |what: &str, err: io::Error| format!("{what}: {err}");
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|x| e("bind the socket", x))?;
    let (front, _) = listener.accept().map_err(|x| e("accept", x))?;
    drop(listener);
    let mut inner = socket.as_os_str().to_owned();
    inner.push(".daemon");
    let inner = std::path::PathBuf::from(inner);
    let _ = std::fs::remove_file(&inner);
    let il = UnixListener::bind(&inner).map_err(|x| e("bind the daemon socket", x))?;
    let started = daemon.start_client(&inner.to_string_lossy());
    let back = started
        .map_err(|x| x.to_string())
        .and_then(|()| il.accept().map_err(|x| e("accept the daemon", x)));
    let _ = std::fs::remove_file(&inner);
    let (back, _) = back?;
    let options = RelayOptions {
        inflight: inflight.then(|| {
            let b = backend.clone();
            let sink: InflightSink = Arc::new(move |r| b.set_inflight(r));
            sink
        }),
        log: backend.can_log().then(|| {
            let b = backend.clone();
            let sink: LogSink = Arc::new(move |l| b.set_dirty_log(l));
            sink
        }),
    };
    let relayed = relay(front, back, options);
    let waited = daemon.wait();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    relayed.map_err(|x| e("relay", x))?;
    match waited {
        // The VMM went away (it quit, or a migration ended): the usual end
        // of a session, not an error.
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {
            Ok(())
        }
        w => w.map_err(|x| x.to_string()),
    }
}

/// Relays `front` (QEMU) <-> `back` (the daemon) until either side closes.
pub fn relay(front: UnixStream, back: UnixStream, options: RelayOptions) -> io::Result<()> {
    let (mut front_r, mut back_w) = (front.try_clone()?, back.try_clone()?);
    let front_w = Arc::new(Mutex::new(front));
    let replies_to = front_w.clone();
    let mut back_r = back;
    let patch = options.extra_features();
    let replies = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            let r = forward_replies(&mut back_r, &replies_to, patch);
            if let Ok(f) = replies_to.lock() {
                let _ = f.shutdown(Shutdown::Both);
            }
            r
        })?;
    let r = forward_requests(&mut front_r, &mut back_w, &front_w, &options);
    let _ = back_w.shutdown(Shutdown::Both);
    let _ = front_r.shutdown(Shutdown::Both);
    let _ = replies.join();
    r
}

/// Writes one whole message to the VMM.
fn to_front(front: &Mutex<UnixStream>, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let f = front
        .lock()
        .map_err(|_| io::Error::other("the relay's front lock is poisoned"))?;
    let sent = f
        .send_with_fds(&[msg], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < msg.len() {
        (&*f).write_all(&msg[sent..])?;
    }
    Ok(())
}

/// Daemon replies back to the VMM, one message at a time;
/// GET_PROTOCOL_FEATURES replies gain the features in `patch`.
fn forward_replies(back: &mut UnixStream, front: &Mutex<UnixStream>, patch: u64) -> io::Result<()> {
    let mut buf = vec![0u8; HDR_LEN + MAX_MSG_SIZE];
    loop {
        let mut got = 0;
        while got < HDR_LEN {
            let n = back.read(&mut buf[got..HDR_LEN])?;
            if n == 0 {
                return if got == 0 {
                    Ok(())
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            got += n;
        }
        let MsgHeader { request, size, .. } = MsgHeader::parse(&buf[..HDR_LEN]).map_err(|e| {
            let what = match e {
                ParseError::Oversized(size) => format!("vhost-user reply of {size} bytes"),
                e => e.to_string(),
            };
            io::Error::new(io::ErrorKind::InvalidData, what)
        })?;
        back.read_exact(&mut buf[HDR_LEN..HDR_LEN + size])?;
        if patch != 0 && request == FrontendReq::GET_PROTOCOL_FEATURES as u32 {
            if let Ok(f) = parse_u64_body(&buf[HDR_LEN..HDR_LEN + size]) {
                let f = f | patch;
                buf[HDR_LEN..HDR_LEN + 8].copy_from_slice(&f.to_le_bytes());
                tracing::debug!(
                    features = format!("{f:#x}"),
                    "offering the relay's protocol features"
                );
            }
        }
        to_front(front, &buf[..HDR_LEN + size], &[])?;
    }
}

/// A reply message: header for `request` and `body`.
fn reply(request: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR_LEN + body.len());
    for w in [request, VERSION_1 | REPLY, body.len() as u32] {
        m.extend_from_slice(&w.to_le_bytes());
    }
    m.extend_from_slice(body);
    m
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|w| w.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .and_then(|w| w.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

/// GET_INFLIGHT_FD: a fresh region for the queues QEMU names; on failure
/// a zero size, which tells QEMU there is none.
fn get_inflight(body: &[u8], front: &Mutex<UnixStream>) -> io::Result<()> {
    let m = InflightMsg::parse_lenient(body);
    let (queues, queue_size) = (m.num_queues, m.queue_size);
    let mut out = [0u8; INFLIGHT_MSG];
    out[16..18].copy_from_slice(&queues.to_le_bytes());
    out[18..20].copy_from_slice(&queue_size.to_le_bytes());
    let msg = |o: &[u8]| reply(FrontendReq::GET_INFLIGHT_FD as u32, o);
    match InflightRegion::create(queues, queue_size) {
        Ok(region) => {
            out[0..8].copy_from_slice(&region.size().to_le_bytes());
            out[8..16].copy_from_slice(&region.offset().to_le_bytes());
            tracing::info!(
                queues,
                queue_size,
                bytes = region.size(),
                "inflight region created for the VMM (GET_INFLIGHT_FD)"
            );
            to_front(front, &msg(&out), &[region.fd().as_raw_fd()])
        }
        Err(e) => {
            tracing::error!(queues, queue_size, error = %e, "cannot create an inflight region");
            to_front(front, &msg(&out), &[])
        }
    }
}

/// SET_INFLIGHT_FD: maps the region (every field checked) for `sink`;
/// whether it was taken.
fn set_inflight(body: &[u8], fds: Vec<OwnedFd>, sink: &InflightSink) -> bool {
    let Some(fd) = (fds.len() == 1).then(|| fds.into_iter().next()).flatten() else {
        tracing::error!("SET_INFLIGHT_FD without exactly one fd; inflight tracking is off");
        return false;
    };
    let m = match InflightMsg::parse(body) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(
                bytes = body.len(),
                error = %e,
                "short SET_INFLIGHT_FD; inflight tracking is off"
            );
            return false;
        }
    };
    match InflightRegion::from_peer(fd, m.mmap_size, m.mmap_offset, m.num_queues, m.queue_size) {
        Ok(region) => {
            sink(region);
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "refusing the VMM's inflight region; inflight tracking is off");
            false
        }
    }
}

/// SET_LOG_BASE: maps the VMM's log (size and offset checked by the
/// mapping) for `sink`; whether it was taken.
fn set_log_base(body: &[u8], fds: Vec<OwnedFd>, sink: &LogSink) -> bool {
    let Some(fd) = (fds.len() == 1).then(|| fds.into_iter().next()).flatten() else {
        tracing::error!("SET_LOG_BASE without exactly one fd; the server's writes are not logged");
        return false;
    };
    if body.len() < LOG_MSG {
        tracing::error!(
            bytes = body.len(),
            "short SET_LOG_BASE; the server's writes are not logged"
        );
        return false;
    }
    let (size, offset) = (le_u64(body, 0), le_u64(body, 8));
    match DirtyLog::from_file(std::fs::File::from(fd), size, offset) {
        Ok(log) => {
            sink(log);
            true
        }
        Err(e) => {
            tracing::error!(size, offset, error = %e, "cannot map the VMM's dirty log; the server's writes are not logged");
            false
        }
    }
}

/// The `i`th little-endian u32 of `b` (within the header and body read).
fn word(b: &[u8], i: usize) -> u32 {
    b.get(4 * i..4 * i + 4)
        .and_then(|w| w.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn forward_requests(
    front: &mut UnixStream,
    back: &mut UnixStream,
    front_w: &Mutex<UnixStream>,
    options: &RelayOptions,
) -> io::Result<()> {
    // (vring index, enable) as last asked before SET_FEATURES.
    let mut held: Vec<(u32, u32)> = Vec::new();
    let mut features_set = false;
    let mut buf = vec![0u8; HDR_LEN + MAX_MSG_SIZE];
    let ack = |request: u32, ok: bool| {
        let status: u64 = if ok { 0 } else { 1 };
        to_front(front_w, &reply(request, &status.to_le_bytes()), &[])
    };
    loop {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: HDR_LEN,
        }];
        // SAFETY: the iovec covers the first HDR_LEN bytes of `buf`, which
        // lives, unborrowed elsewhere, across the call.
        let (n, nfds) = unsafe { front.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: recvmsg just gave us these descriptors: we own them.
        let fds: Vec<OwnedFd> = raw[..nfds.min(MAX_FDS)]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return Ok(());
        }
        front.read_exact(&mut buf[n..HDR_LEN])?;
        let MsgHeader {
            request,
            flags,
            size,
        } = MsgHeader::parse(&buf[..HDR_LEN])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        front.read_exact(&mut buf[HDR_LEN..HDR_LEN + size])?;
        tracing::trace!(request, flags, size, fds = fds.len(), "vhost-user request");
        let is_features = request == FrontendReq::SET_FEATURES as u32;
        if request == FrontendReq::SET_VRING_ENABLE as u32 && !features_set {
            tracing::debug!("holding a SET_VRING_ENABLE sent before SET_FEATURES");
            if let Ok((index, num)) = parse_vring_state(&buf[HDR_LEN..HDR_LEN + size]) {
                held.retain(|&(i, _)| i != index);
                held.push((index, num));
            }
            if flags & NEED_REPLY != 0 {
                ack(request, true)?;
            }
            continue;
        }
        if let Some(sink) = &options.log {
            let body = &buf[HDR_LEN..HDR_LEN + size];
            if request == FrontendReq::SET_LOG_BASE as u32 {
                let ok = set_log_base(body, fds, sink);
                // Always answered: QEMU reads a reply with LOG_SHMFD.
                ack(request, ok)?;
                continue;
            }
            if request == FrontendReq::SET_LOG_FD as u32 {
                // An eventfd to signal log updates; QEMU polls the log
                // anyway (and sends it only without LOG_SHMFD).
                if flags & NEED_REPLY != 0 {
                    ack(request, true)?;
                }
                continue;
            }
        }
        if let Some(sink) = &options.inflight {
            let body = &buf[HDR_LEN..HDR_LEN + size];
            if request == FrontendReq::GET_INFLIGHT_FD as u32 {
                get_inflight(body, front_w)?;
                continue;
            }
            if request == FrontendReq::SET_INFLIGHT_FD as u32 {
                let ok = set_inflight(body, fds, sink);
                if flags & NEED_REPLY != 0 {
                    ack(request, ok)?;
                }
                continue;
            }
        }
        let extra = options.extra_features();
        if extra != 0 && request == FrontendReq::SET_PROTOCOL_FEATURES as u32 {
            if let Ok(f) = parse_u64_body(&buf[HDR_LEN..HDR_LEN + size]) {
                // The daemon does not know these bits; the relay serves them.
                tracing::info!(
                    inflight = f & INFLIGHT_SHMFD != 0,
                    log = f & LOG_SHMFD != 0,
                    "the VMM acked the protocol features"
                );
                buf[HDR_LEN..HDR_LEN + 8].copy_from_slice(&(f & !extra).to_le_bytes());
            }
        }
        let raw_fds: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let msg = &buf[..HDR_LEN + size];
        let sent = back
            .send_with_fds(&[msg], &raw_fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if sent < msg.len() {
            back.write_all(&msg[sent..])?;
        }
        if is_features && !features_set {
            features_set = true;
            for (index, num) in held.drain(..) {
                let mut m = Vec::with_capacity(HDR_LEN + 8);
                for w in [
                    FrontendReq::SET_VRING_ENABLE as u32,
                    VERSION_1,
                    8,
                    index,
                    num,
                ] {
                    m.extend_from_slice(&w.to_le_bytes());
                }
                back.write_all(&m)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn msg(request: FrontendReq, body: &[u8]) -> Vec<u8> {
        msg_flags(request, VERSION_1, body)
    }

    fn msg_flags(request: FrontendReq, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(request as u32).to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn message_parsers_refuse_short_and_oversized_input() {
        let m = msg_flags(
            FrontendReq::SET_VRING_ENABLE,
            VERSION_1 | NEED_REPLY,
            &[0; 8],
        );
        assert_eq!(
            MsgHeader::parse(&m),
            Ok(MsgHeader {
                request: FrontendReq::SET_VRING_ENABLE as u32,
                flags: VERSION_1 | NEED_REPLY,
                size: 8,
            })
        );
        assert!(matches!(
            MsgHeader::parse(&m[..HDR_LEN - 1]),
            Err(ParseError::Short { len: 11, .. })
        ));
        let mut big = m.clone();
        big[8..12].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_le_bytes());
        assert_eq!(
            MsgHeader::parse(&big),
            Err(ParseError::Oversized(MAX_MSG_SIZE + 1))
        );
        big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(MsgHeader::parse(&big).is_err());

        assert_eq!(parse_vring_state(&[2, 0, 0, 0, 1, 0, 0, 0, 9]), Ok((2, 1)));
        assert!(parse_vring_state(&[2, 0, 0, 0, 1, 0, 0]).is_err());
        assert_eq!(parse_u64_body(&7u64.to_le_bytes()), Ok(7));
        assert!(parse_u64_body(&[1; 7]).is_err());

        let body = inflight_body(4096, 8192, 2, 128);
        let want = InflightMsg {
            mmap_size: 4096,
            mmap_offset: 8192,
            num_queues: 2,
            queue_size: 128,
        };
        assert_eq!(InflightMsg::parse(&body), Ok(want));
        assert_eq!(InflightMsg::parse(&body[..InflightMsg::LEN]), Ok(want));
        assert!(InflightMsg::parse(&body[..InflightMsg::LEN - 1]).is_err());
        // GET_INFLIGHT_FD's lenient reading: a partial field is zero.
        assert_eq!(
            InflightMsg::parse_lenient(&body[..19]),
            InflightMsg {
                queue_size: 0,
                ..want
            }
        );
        assert_eq!(InflightMsg::parse_lenient(&[]), InflightMsg::default());
    }

    #[test]
    fn early_enables_are_dropped_and_descriptors_pass() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, mut daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(front, back, RelayOptions::default()));
        let enable = msg(FrontendReq::SET_VRING_ENABLE, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let features = msg(FrontendReq::SET_FEATURES, &[0; 8]);
        let kick = msg(FrontendReq::SET_VRING_KICK, &[0; 8]);
        qemu.send_with_fds(&[&enable[..]], &[]).unwrap();
        let asking = msg_flags(
            FrontendReq::SET_VRING_ENABLE,
            VERSION_1 | NEED_REPLY,
            &[1, 0, 0, 0, 1, 0, 0, 0],
        );
        qemu.send_with_fds(&[&asking[..]], &[]).unwrap();
        let mut ack = [0u8; HDR_LEN + 8];
        (&qemu).read_exact(&mut ack).unwrap();
        assert_eq!(ack[..4], asking[..4], "the ack names the request");
        assert_eq!(
            u32::from_le_bytes(ack[4..8].try_into().unwrap()),
            VERSION_1 | REPLY
        );
        assert_eq!(ack[12..], [0; 8], "success");
        qemu.send_with_fds(&[&features[..]], &[]).unwrap();
        let ev = EventFd::new(0).unwrap();
        qemu.send_with_fds(&[&kick[..]], &[ev.as_raw_fd()]).unwrap();
        qemu.send_with_fds(&[&enable[..]], &[]).unwrap();

        let mut got = vec![0u8; features.len()];
        let mut fds = [-1; 4];
        let replayed = |index: u8| {
            let mut m = msg(FrontendReq::SET_VRING_ENABLE, &[index, 0, 0, 0, 1, 0, 0, 0]);
            m[4] = VERSION_1 as u8;
            m
        };
        let mut iov = [libc::iovec {
            iov_base: got.as_mut_ptr().cast(),
            iov_len: got.len(),
        }];
        // SAFETY: the iovec covers `got`, which lives across the call.
        let (n, nfds) = unsafe { daemon.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, nfds), (features.len(), 0));
        assert_eq!(got, features, "the early enables were held back");
        for index in [0u8, 1] {
            let mut got = vec![0u8; HDR_LEN + 8];
            daemon.read_exact(&mut got).unwrap();
            assert_eq!(
                got,
                replayed(index),
                "vring {index} enabled after SET_FEATURES"
            );
        }
        let mut got = vec![0u8; kick.len()];
        let mut iov = [libc::iovec {
            iov_base: got.as_mut_ptr().cast(),
            iov_len: got.len(),
        }];
        // SAFETY: the iovec covers `got`, which lives across the call.
        let (n, nfds) = unsafe { daemon.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, nfds), (kick.len(), 1), "the kick fd passed");
        assert_eq!(got, kick);
        // The relayed descriptor is the same eventfd.
        ev.write(5).unwrap();
        // SAFETY: recvmsg just handed us this descriptor; nothing else owns it.
        let relayed = unsafe { EventFd::from_raw_fd(fds[0]) };
        assert_eq!(relayed.read().unwrap(), 5);
        let mut got = vec![0u8; enable.len()];
        daemon.read_exact(&mut got).unwrap();
        assert_eq!(got, enable, "enables after SET_FEATURES pass");
        // Replies flow back.
        let r = reply(FrontendReq::GET_FEATURES as u32, &5u64.to_le_bytes());
        daemon.write_all(&r).unwrap();
        let mut got = vec![0u8; r.len()];
        (&qemu).read_exact(&mut got).unwrap();
        assert_eq!(got, r);
        drop(qemu);
        t.join().unwrap().unwrap();
    }

    /// Reads one message (header and body) and its descriptors.
    fn recv(s: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut hdr = [0u8; HDR_LEN];
        let mut raw = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: HDR_LEN,
        }];
        // SAFETY: the iovec covers `hdr`, which lives across the call.
        let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }.unwrap();
        assert_eq!(n, HDR_LEN);
        let size = word(&hdr, 2) as usize;
        let mut m = hdr.to_vec();
        m.resize(HDR_LEN + size, 0);
        (&*s).read_exact(&mut m[HDR_LEN..]).unwrap();
        // SAFETY: recvmsg just handed us these descriptors.
        let fds = raw[..nfds]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        (m, fds)
    }

    fn inflight_body(size: u64, offset: u64, queues: u16, queue_size: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&queues.to_le_bytes());
        b.extend_from_slice(&queue_size.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b
    }

    #[test]
    fn the_relay_serves_inflight_fds_and_patches_the_protocol_features() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, daemon) = UnixStream::pair().unwrap();
        let taken: Arc<Mutex<Vec<InflightRegion>>> = Arc::default();
        let t2 = taken.clone();
        let sink: InflightSink = Arc::new(move |r| t2.lock().unwrap().push(r));
        let options = RelayOptions {
            inflight: Some(sink),
            log: None,
        };
        let t = std::thread::spawn(move || relay(front, back, options));

        // GET_PROTOCOL_FEATURES passes; its reply gains bit 12.
        let get = msg(FrontendReq::GET_PROTOCOL_FEATURES, &[]);
        qemu.send_with_fds(&[&get[..]], &[]).unwrap();
        let (m, _) = recv(&daemon);
        assert_eq!(m, get);
        let offered = (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG).bits();
        let r = reply(
            FrontendReq::GET_PROTOCOL_FEATURES as u32,
            &offered.to_le_bytes(),
        );
        (&daemon).write_all(&r).unwrap();
        let (m, _) = recv(&qemu);
        assert_eq!(m[..HDR_LEN], r[..HDR_LEN]);
        assert_eq!(
            le_u64(&m, HDR_LEN),
            offered | (1 << 12),
            "INFLIGHT_SHMFD offered"
        );

        // SET_PROTOCOL_FEATURES reaches the daemon without bit 12.
        let acked = offered | (1 << 12);
        let set = msg(FrontendReq::SET_PROTOCOL_FEATURES, &acked.to_le_bytes());
        qemu.send_with_fds(&[&set[..]], &[]).unwrap();
        let (m, _) = recv(&daemon);
        assert_eq!(le_u64(&m, HDR_LEN), offered, "bit 12 stripped");

        // GET_INFLIGHT_FD: the relay answers with a sized, sealed memfd.
        let get = msg(FrontendReq::GET_INFLIGHT_FD, &inflight_body(0, 0, 2, 128));
        qemu.send_with_fds(&[&get[..]], &[]).unwrap();
        let (m, mut fds) = recv(&qemu);
        assert_eq!(word(&m, 0), FrontendReq::GET_INFLIGHT_FD as u32);
        assert_eq!(word(&m, 1), VERSION_1 | REPLY);
        assert_eq!(word(&m, 2) as usize, INFLIGHT_MSG);
        let size = le_u64(&m, HDR_LEN);
        assert_eq!(
            size,
            2 * (16 * 128 + 64),
            "split-ring layout, 64-byte aligned"
        );
        assert_eq!(le_u64(&m, HDR_LEN + 8), 0, "offset");
        assert_eq!(
            (le_u16(&m, HDR_LEN + 16), le_u16(&m, HDR_LEN + 18)),
            (2, 128)
        );
        assert_eq!(fds.len(), 1, "the region's fd");
        let fd = fds.pop().unwrap();
        // QEMU's view of it: version 1, zeroes; it writes an entry.
        let mine = InflightRegion::from_peer(fd.try_clone().unwrap(), size, 0, 2, 128).unwrap();
        assert_eq!(mine.queue(1, 128).unwrap().version().unwrap(), 1);
        assert_eq!(mine.inflight_entries(), 0);

        // SET_INFLIGHT_FD with NEED_REPLY: acked, mapped, handed over.
        let set = msg_flags(
            FrontendReq::SET_INFLIGHT_FD,
            VERSION_1 | NEED_REPLY,
            &inflight_body(size, 0, 2, 128),
        );
        qemu.send_with_fds(&[&set[..]], &[fd.as_raw_fd()]).unwrap();
        let (m, _) = recv(&qemu);
        assert_eq!(word(&m, 0), FrontendReq::SET_INFLIGHT_FD as u32);
        assert_eq!(le_u64(&m, HDR_LEN), 0, "success");
        assert_eq!(taken.lock().unwrap().len(), 1);
        assert_eq!(taken.lock().unwrap()[0].queue_size(), 128);

        // Hostile ones: a size past the file, a missing fd, a huge size;
        // each refused with a failure ack, the session goes on.
        for (body, with_fd) in [
            (inflight_body(size + 4096, 0, 2, 128), true),
            (inflight_body(size, 0, 2, 128), false),
            (inflight_body(u64::MAX, 4096, 2, 128), true),
            (inflight_body(size, 0, 9, 128), true),
        ] {
            let set = msg_flags(FrontendReq::SET_INFLIGHT_FD, VERSION_1 | NEED_REPLY, &body);
            let fds: &[RawFd] = if with_fd { &[fd.as_raw_fd()] } else { &[] };
            qemu.send_with_fds(&[&set[..]], fds).unwrap();
            let (m, _) = recv(&qemu);
            assert_ne!(le_u64(&m, HDR_LEN), 0, "failure acked");
        }
        assert_eq!(
            taken.lock().unwrap().len(),
            1,
            "nothing hostile handed over"
        );
        // Without NEED_REPLY no reply; the next message reaches the daemon.
        let set = msg(
            FrontendReq::SET_INFLIGHT_FD,
            &inflight_body(size, 0, 2, 128),
        );
        qemu.send_with_fds(&[&set[..]], &[fd.as_raw_fd()]).unwrap();
        let features = msg(FrontendReq::SET_FEATURES, &[0; 8]);
        qemu.send_with_fds(&[&features[..]], &[]).unwrap();
        let (m, _) = recv(&daemon);
        assert_eq!(m, features);
        assert_eq!(taken.lock().unwrap().len(), 2);
        drop(qemu);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn the_relay_offers_log_shmfd_and_maps_set_log_base() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, daemon) = UnixStream::pair().unwrap();
        let taken: Arc<Mutex<Vec<DirtyLog>>> = Arc::default();
        let t2 = taken.clone();
        let sink: LogSink = Arc::new(move |l| t2.lock().unwrap().push(l));
        let options = RelayOptions {
            inflight: None,
            log: Some(sink),
        };
        let t = std::thread::spawn(move || relay(front, back, options));

        // GET_PROTOCOL_FEATURES: the reply gains LOG_SHMFD (bit 1), and
        // SET_PROTOCOL_FEATURES reaches the daemon without it.
        let get = msg(FrontendReq::GET_PROTOCOL_FEATURES, &[]);
        qemu.send_with_fds(&[&get[..]], &[]).unwrap();
        let (m, _) = recv(&daemon);
        assert_eq!(m, get);
        let offered = VhostUserProtocolFeatures::MQ.bits();
        let r = reply(
            FrontendReq::GET_PROTOCOL_FEATURES as u32,
            &offered.to_le_bytes(),
        );
        (&daemon).write_all(&r).unwrap();
        let (m, _) = recv(&qemu);
        assert_eq!(le_u64(&m, HDR_LEN), offered | LOG_SHMFD);
        let set = msg(
            FrontendReq::SET_PROTOCOL_FEATURES,
            &(offered | LOG_SHMFD).to_le_bytes(),
        );
        qemu.send_with_fds(&[&set[..]], &[]).unwrap();
        let (m, _) = recv(&daemon);
        assert_eq!(le_u64(&m, HDR_LEN), offered, "LOG_SHMFD stripped");

        // SET_LOG_BASE (no NEED_REPLY, as QEMU sends it): mapped, handed
        // over, and answered anyway.
        let memfd = {
            let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
            f.set_len(8192).unwrap();
            f
        };
        let body = |size: u64, off: u64| {
            let mut b = size.to_le_bytes().to_vec();
            b.extend_from_slice(&off.to_le_bytes());
            b
        };
        let set = msg(FrontendReq::SET_LOG_BASE, &body(4096, 4096));
        qemu.send_with_fds(&[&set[..]], &[memfd.as_raw_fd()])
            .unwrap();
        let (m, _) = recv(&qemu);
        assert_eq!(word(&m, 0), FrontendReq::SET_LOG_BASE as u32);
        assert_eq!(le_u64(&m, HDR_LEN), 0, "success");
        {
            let logs = taken.lock().unwrap();
            assert_eq!(logs.len(), 1);
            assert_eq!(logs[0].len(), 4096);
            logs[0].mark(8 * 4096 * 3, 1);
        }
        let mut b = [0u8; 1];
        use std::os::unix::fs::FileExt;
        memfd.read_exact_at(&mut b, 4096 + 3).unwrap();
        assert_eq!(b[0], 1, "the mark is in the VMM's file");

        // Hostile ones: no fd, a short body, a zero size: a failure
        // answer each, nothing handed over, the session goes on.
        for (body, fd) in [
            (body(4096, 0), false),
            (vec![0u8; 8], true),
            (body(0, 0), true),
        ] {
            let set = msg(FrontendReq::SET_LOG_BASE, &body);
            let fds: &[RawFd] = if fd { &[memfd.as_raw_fd()] } else { &[] };
            qemu.send_with_fds(&[&set[..]], fds).unwrap();
            let (m, _) = recv(&qemu);
            assert_ne!(le_u64(&m, HDR_LEN), 0, "failure answered");
        }
        assert_eq!(taken.lock().unwrap().len(), 1);
        let features = msg(FrontendReq::SET_FEATURES, &[0; 8]);
        qemu.send_with_fds(&[&features[..]], &[]).unwrap();
        let (m, _) = recv(&daemon);
        assert_eq!(m, features);
        drop(qemu);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn without_inflight_the_messages_pass_untouched() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(front, back, RelayOptions::default()));
        let get = msg(FrontendReq::GET_INFLIGHT_FD, &inflight_body(0, 0, 2, 128));
        qemu.send_with_fds(&[&get[..]], &[]).unwrap();
        let (m, _) = recv(&daemon);
        assert_eq!(m, get, "the daemon answers (refuses) it");
        let r = reply(
            FrontendReq::GET_PROTOCOL_FEATURES as u32,
            &3u64.to_le_bytes(),
        );
        (&daemon).write_all(&r).unwrap();
        let (m, _) = recv(&qemu);
        assert_eq!(m, r, "no bit added");
        drop(qemu);
        t.join().unwrap().unwrap();
    }
}
