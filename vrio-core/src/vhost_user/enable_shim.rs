//! A relay between QEMU's vhost-user-net and the vhost-user daemon that
//! drops SET_VRING_ENABLE messages sent before SET_FEATURES.
//!
//! QEMU's virtio-net enables the vrings of a vhost-user peer when it
//! attaches it, before any SET_FEATURES; the vhost crate only takes
//! SET_VRING_ENABLE once PROTOCOL_FEATURES is acked and ends the session
//! otherwise. QEMU does not repeat them when it starts the device, so the
//! relay holds the last state of each vring and replays it right after
//! SET_FEATURES (as the spec orders: enable state applies once the
//! features are known). When QEMU
//! asks for an ack (NEED_REPLY), the relay answers success itself; QEMU
//! waits for one reply at a time, so it never interleaves with the
//! daemon's.
//!
//! Front-end messages are relayed whole with their file descriptors;
//! replies go back as a plain byte stream.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use std::sync::Arc;
use vhost::vhost_user::message::{FrontendReq, MAX_MSG_SIZE};

use vhost_user_backend::VhostUserDaemon;

use super::backend::VrioBlkBackend;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR_LEN: usize = 12;
/// Header flags (vhost-user spec): protocol version 1, reply, need reply.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// Most descriptors one vhost-user message carries (SET_MEM_TABLE).
const MAX_FDS: usize = 32;

/// Serves one VMM on `socket` through the relay: the daemon connects to a
/// private socket next to it (`<socket>.daemon`), the VMM's connection is
/// relayed to it until either side closes.
pub fn serve_relayed(
    daemon: &mut VhostUserDaemon<Arc<VrioBlkBackend>>,
    socket: &Path,
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
    let relayed = relay(front, back);
    let waited = daemon.wait();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    relayed.map_err(|x| e("relay", x))?;
    waited.map_err(|x| x.to_string())
}

/// Relays `front` (QEMU) <-> `back` (the daemon) until either side closes.
pub fn relay(front: UnixStream, back: UnixStream) -> io::Result<()> {
    let (mut front_r, mut back_w) = (front.try_clone()?, back.try_clone()?);
    let (mut back_r, mut front_w) = (back, front);
    let replies = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            let r = io::copy(&mut back_r, &mut front_w);
            let _ = front_w.shutdown(Shutdown::Both);
            r
        })?;
    let r = forward_requests(&mut front_r, &mut back_w);
    let _ = back_w.shutdown(Shutdown::Both);
    let _ = front_r.shutdown(Shutdown::Both);
    let _ = replies.join();
    r
}

/// The `i`th little-endian u32 of `b` (within the header and body read).
fn word(b: &[u8], i: usize) -> u32 {
    b.get(4 * i..4 * i + 4)
        .and_then(|w| w.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn forward_requests(front: &mut UnixStream, back: &mut UnixStream) -> io::Result<()> {
    let mut acks = front.try_clone()?;
    // (vring index, enable) as last asked before SET_FEATURES.
    let mut held: Vec<(u32, u32)> = Vec::new();
    let mut features_set = false;
    let mut buf = vec![0u8; HDR_LEN + MAX_MSG_SIZE];
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
        let (request, flags, size) = (word(&buf, 0), word(&buf, 1), word(&buf, 2) as usize);
        if size > MAX_MSG_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message of {size} bytes"),
            ));
        }
        front.read_exact(&mut buf[HDR_LEN..HDR_LEN + size])?;
        tracing::trace!(request, flags, size, fds = fds.len(), "vhost-user request");
        let is_features = request == FrontendReq::SET_FEATURES as u32;
        if request == FrontendReq::SET_VRING_ENABLE as u32 && !features_set {
            tracing::debug!("holding a SET_VRING_ENABLE sent before SET_FEATURES");
            if size >= 8 {
                let (index, num) = (word(&buf, 3), word(&buf, 4));
                held.retain(|&(i, _)| i != index);
                held.push((index, num));
            }
            if flags & NEED_REPLY != 0 {
                let mut ack = Vec::with_capacity(HDR_LEN + 8);
                for w in [request, VERSION_1 | REPLY, 8] {
                    ack.extend_from_slice(&w.to_le_bytes());
                }
                ack.extend_from_slice(&0u64.to_le_bytes());
                acks.write_all(&ack)?;
            }
            continue;
        }
        let raw_fds: Vec<RawFd> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
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
    use std::os::fd::AsRawFd;
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
    fn early_enables_are_dropped_and_descriptors_pass() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, mut daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(front, back));
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
        daemon.write_all(b"reply").unwrap();
        let mut r = [0u8; 5];
        (&qemu).read_exact(&mut r).unwrap();
        assert_eq!(&r, b"reply");
        drop(qemu);
        t.join().unwrap().unwrap();
    }
}
