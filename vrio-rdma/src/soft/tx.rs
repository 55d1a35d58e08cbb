//! The sending half of a soft connection.
//!
//! Both the application (`post_send`) and the endpoint's receive thread
//! (responses) append frames here; appends are cheap and never block. Frames
//! queue as segments: header bytes (and small payloads copied inline) in one
//! reused buffer, large payloads as references `(key, addr, len)` to
//! registered memory that the kernel copies straight out of with `sendmsg`,
//! so payloads are never copied in user space. Sends use `MSG_DONTWAIT`:
//! whatever the socket does not take stays queued for the flusher thread,
//! which waits for `POLLOUT`. So a peer that stops reading stalls only its
//! own connection, never the caller.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::region::Registry;
use super::wire::Header;
use crate::access::Need;

/// Payloads up to this size are copied into the header buffer: one iovec
/// entry less is worth more than a copy this small.
pub(crate) const INLINE_COPY: usize = 512;
/// A peer that leaves this much unread is treated as dead (it would
/// otherwise make us queue without bound).
const MAX_BACKLOG_BYTES: usize = 256 << 20;
const MAX_BACKLOG_SEGS: usize = 1 << 20;
/// Segments handed to one `sendmsg`.
const IOV_BATCH: usize = 64;
/// Backlog capacity a connection keeps once drained (more is given back).
const KEEP_BYTES: usize = 64 << 10;
const KEEP_SEGS: usize = 256;
static ZEROS: [u8; 65536] = [0; 65536];

#[derive(Debug, Clone, Copy)]
enum Seg {
    Bytes { start: usize, len: usize },
    Mem { key: u32, addr: u64, len: usize },
}

impl Seg {
    fn len(&self) -> usize {
        match *self {
            Seg::Bytes { len, .. } | Seg::Mem { len, .. } => len,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct TxState {
    bytes: Vec<u8>,
    segs: VecDeque<Seg>,
    /// Bytes of `segs[0]` already sent.
    head_done: usize,
    broken: bool,
    closed: bool,
    /// Send FIN once everything queued is out (after an error response).
    fin_when_drained: bool,
}

impl TxState {
    fn push_bytes(&mut self, b: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        self.extend_bytes_seg(start, b.len());
    }

    fn extend_bytes_seg(&mut self, start: usize, len: usize) {
        if let Some(Seg::Bytes { start: s, len: l }) = self.segs.back_mut() {
            if *s + *l == start {
                *l += len;
                return;
            }
        }
        self.segs.push_back(Seg::Bytes { start, len });
    }

    pub(crate) fn header(&mut self, h: &Header) {
        self.push_bytes(&h.encode());
    }

    /// Queues `len` bytes of registered memory as payload: small ones are
    /// copied now, large ones are referenced and read at send time (and
    /// replaced by zeros if the region is gone by then).
    pub(crate) fn payload(&mut self, reg: &Registry, key: u32, addr: u64, len: usize) {
        if len == 0 {
            return;
        }
        if len <= INLINE_COPY {
            let guard = reg.read();
            let start = self.bytes.len();
            match guard.check(key, addr, len as u64, Need::LocalRead) {
                Some(src) => {
                    self.bytes.reserve(len);
                    // SAFETY: `check` proved src..src+len lies in a live
                    // registration that `guard` keeps registered; the
                    // destination is spare capacity reserved just above, and
                    // `set_len` only covers the bytes just copied. No
                    // reference to the registered memory is created.
                    unsafe {
                        std::ptr::copy_nonoverlapping(src, self.bytes.as_mut_ptr().add(start), len);
                        self.bytes.set_len(start + len);
                    }
                }
                None => self.bytes.resize(start + len, 0),
            }
            self.extend_bytes_seg(start, len);
        } else {
            self.segs.push_back(Seg::Mem { key, addr, len });
        }
    }
}

pub(crate) struct Tx {
    state: Mutex<TxState>,
    cv: Condvar,
    sock: Arc<OwnedFd>,
}

impl Tx {
    pub(crate) fn new(sock: Arc<OwnedFd>) -> Self {
        Self {
            state: Mutex::new(TxState {
                bytes: Vec::with_capacity(KEEP_BYTES),
                segs: VecDeque::with_capacity(KEEP_SEGS),
                ..TxState::default()
            }),
            cv: Condvar::new(),
            sock,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, TxState> {
        // Every TxState update leaves it consistent, so poison is harmless.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends what the socket takes now; hands the rest to the flusher.
    pub(crate) fn flush(&self, st: &mut TxState, reg: &Registry) {
        if st.broken || st.closed {
            st.segs.clear();
            st.bytes.clear();
            st.head_done = 0;
            return;
        }
        self.send_now(st, reg);
        if !st.segs.is_empty() {
            if st.bytes.len() > MAX_BACKLOG_BYTES || st.segs.len() > MAX_BACKLOG_SEGS {
                tracing::warn!("soft fabric: peer is not reading, dropping the connection");
                self.break_now(st);
            } else {
                self.cv.notify_one();
            }
        }
    }

    fn break_now(&self, st: &mut TxState) {
        st.broken = true;
        st.segs.clear();
        st.bytes.clear();
        st.head_done = 0;
        shutdown(&self.sock, libc::SHUT_RDWR);
    }

    fn send_now(&self, st: &mut TxState, reg: &Registry) {
        let fd = self.sock.as_raw_fd();
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; IOV_BATCH];
        while !st.segs.is_empty() {
            let guard = reg.read();
            let mut n_iov = 0;
            for (i, seg) in st.segs.iter().take(IOV_BATCH).enumerate() {
                let skip = if i == 0 { st.head_done } else { 0 };
                let left = seg.len() - skip;
                let (base, len) = match *seg {
                    Seg::Bytes { start, .. } => {
                        // SAFETY: start + skip + left is within `bytes` (the
                        // segment was appended from it and `bytes` is only
                        // cleared when `segs` is empty).
                        (unsafe { st.bytes.as_ptr().add(start + skip) }, left)
                    }
                    Seg::Mem { key, addr, .. } => {
                        let a = addr + skip as u64;
                        match guard.check(key, a, left as u64, Need::LocalRead) {
                            Some(p) => (p as *const u8, left),
                            None => (ZEROS.as_ptr(), left.min(ZEROS.len())),
                        }
                    }
                };
                iov[i] = libc::iovec {
                    iov_base: base as *mut libc::c_void,
                    iov_len: len,
                };
                n_iov = i + 1;
            }
            // SAFETY: a zeroed msghdr is valid; we then point it at `iov`,
            // whose entries point into `st.bytes` (locked by `st`), into
            // registered memory checked under `guard` (held across the call),
            // or into ZEROS. The kernel only reads them.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = n_iov as _;
                libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            drop(guard);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => return,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        tracing::debug!("soft fabric: send failed: {e}");
                        self.break_now(st);
                        return;
                    }
                }
            }
            let mut n = n as usize;
            while n > 0 {
                let Some(front) = st.segs.front() else { break };
                let left = front.len() - st.head_done;
                if n >= left {
                    n -= left;
                    st.segs.pop_front();
                    st.head_done = 0;
                } else {
                    st.head_done += n;
                    n = 0;
                }
            }
        }
        st.bytes.clear();
        st.head_done = 0;
        // Give back what a burst grew (a slow peer can make it reach
        // MAX_BACKLOG_BYTES), or every connection keeps its high-water mark.
        if st.bytes.capacity() > KEEP_BYTES {
            st.bytes.shrink_to(KEEP_BYTES);
        }
        if st.segs.capacity() > KEEP_SEGS {
            st.segs.shrink_to(KEEP_SEGS);
        }
        if st.fin_when_drained {
            st.fin_when_drained = false;
            shutdown(&self.sock, libc::SHUT_WR);
        }
    }

    /// Sends FIN after everything queued so far.
    pub(crate) fn finish(&self, reg: &Registry) {
        let mut st = self.lock();
        st.fin_when_drained = true;
        self.flush(&mut st, reg);
        if st.segs.is_empty() && st.fin_when_drained {
            st.fin_when_drained = false;
            shutdown(&self.sock, libc::SHUT_WR);
        }
    }

    /// Stops the flusher; queued data is dropped.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        self.cv.notify_all();
    }

    /// The flusher thread: drains the backlog whenever the socket has room.
    pub(crate) fn run_flusher(&self, reg: &Registry) {
        loop {
            let mut st = self.lock();
            while !st.closed && (st.segs.is_empty() || st.broken) {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.closed {
                return;
            }
            drop(st);
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the fd stays open (we hold an Arc).
            unsafe { libc::poll(&mut pfd, 1, Duration::from_millis(200).as_millis() as i32) };
            let mut st = self.lock();
            self.flush(&mut st, reg);
        }
    }
}

pub(crate) fn shutdown(sock: &OwnedFd, how: libc::c_int) {
    // SAFETY: shutdown on an fd we own; failure (already shut) is harmless.
    unsafe { libc::shutdown(sock.as_raw_fd(), how) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_drained_backlog_gives_its_burst_back() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let tx = Tx::new(Arc::new(OwnedFd::from(a)));
        let reg = super::super::region::Registry::new();
        // A burst far beyond what the socket takes at once.
        let burst = vec![7u8; 8 << 20];
        let reader = std::thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            while got < 8 << 20 {
                got += b.read(&mut buf).unwrap();
            }
            got
        });
        {
            let mut st = tx.lock();
            for chunk in burst.chunks(4096) {
                st.push_bytes(chunk);
            }
            assert!(st.bytes.capacity() >= 8 << 20);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut st = tx.lock();
            tx.send_now(&mut st, &reg);
            if st.segs.is_empty() {
                assert!(st.bytes.capacity() <= KEEP_BYTES, "{}", st.bytes.capacity());
                assert!(st.segs.capacity() <= KEEP_SEGS.next_power_of_two());
                break;
            }
            drop(st);
            assert!(std::time::Instant::now() < deadline, "backlog drained");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(reader.join().unwrap(), 8 << 20);
    }
}
