//! Concurrent accept for the socket back-ends (`soft`, `shm`), so that no
//! connection can block or delay another's.
//!
//! A listener owns an acceptor thread. It takes raw connections off the
//! (non-blocking) listening socket and runs each one's handshake on a
//! short-lived thread of its own. Finished handshakes reach
//! [`Acceptor::accept`] through a channel, in the order they finish.
//!
//! - **Deadline.** Each handshake must finish within
//!   [`AcceptLimits::handshake_deadline`] of its accept, in total: at the
//!   deadline the acceptor shuts the socket down, which ends whatever read
//!   the handshake is blocked in. A peer trickling a byte at a time cannot
//!   renew it, as it could a per-read timeout.
//! - **Cap.** At most [`AcceptLimits::max_pending`] connections are in
//!   their handshake, or finished and waiting for `accept`, at once; more
//!   are closed at once.
//! - **Logs.** Refusals and failed handshakes are logged rate-limited, with
//!   a count of the lines suppressed.
//! - **Stop.** Dropping the acceptor wakes its thread (an eventfd), which
//!   shuts down every handshake still running, joins their threads and
//!   closes the listening socket.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::{AcceptLimits, FabricError};
use crate::eventfd::EventFd;
use crate::ratelimit::WarnLimiter;

/// How long the acceptor stops accepting when the process is out of file
/// descriptors or memory (accept would fail again at once).
const BACKOFF: Duration = Duration::from_millis(50);
/// Connections taken per wake-up, so that a flood of them cannot keep the
/// acceptor from its deadlines and from stopping.
const ACCEPT_BATCH: usize = 64;
/// Warnings per second a listener may log.
const WARNINGS_PER_SEC: u32 = 5;

/// Runs the handshake on an accepted socket; may block on it freely (the
/// acceptor ends the wait at the deadline).
pub(crate) type Handshake<T> = dyn Fn(OwnedFd) -> Result<T, FabricError> + Send + Sync;

/// A connection in its handshake.
struct Setup {
    /// A duplicate of its socket, to shut it down with.
    sock: OwnedFd,
    deadline: Instant,
    /// Shut down at the deadline (or because the listener stopped).
    cut: bool,
}

struct Shared {
    /// "soft fabric" or "shm fabric", for the logs.
    name: &'static str,
    limits: AcceptLimits,
    /// Signalled when the acceptor is dropped.
    stop: EventFd,
    stopping: AtomicBool,
    /// Connections in their handshake, or finished and not yet accepted.
    pending: AtomicUsize,
    setups: Mutex<HashMap<u64, Setup>>,
    warnings: WarnLimiter,
}

impl Shared {
    fn setups(&self) -> MutexGuard<'_, HashMap<u64, Setup>> {
        // Inserts and removes cannot leave the map torn: poison is harmless.
        self.setups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn warn(&self, msg: std::fmt::Arguments<'_>) {
        match self.warnings.allow("listener", Instant::now()) {
            Some(0) => tracing::warn!("{}: {msg}", self.name),
            Some(suppressed) => tracing::warn!(
                suppressed,
                "{}: {msg} ({suppressed} similar lines suppressed)",
                self.name
            ),
            None => {}
        }
    }

    /// Shuts down the handshakes past their deadline; returns the next
    /// deadline still to come.
    fn cut_expired(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for s in self.setups().values_mut().filter(|s| !s.cut) {
            if s.deadline <= now {
                shutdown(&s.sock);
                s.cut = true;
            } else {
                next = Some(next.map_or(s.deadline, |n| n.min(s.deadline)));
            }
        }
        next
    }
}

fn shutdown(sock: &OwnedFd) {
    // SAFETY: shutdown(2) on a descriptor we own; it touches no memory.
    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
}

/// What the acceptor hands to `accept`: a finished handshake, or the error
/// that stopped the acceptor.
type Item<T> = Result<T, FabricError>;

/// The accepting side of a listener; see the module docs.
pub(crate) struct Acceptor<T> {
    rx: Receiver<Item<T>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Acceptor<T> {
    /// Starts accepting on `listen` (bound and listening), running
    /// `handshake` on each connection.
    pub(crate) fn spawn(
        name: &'static str,
        listen: OwnedFd,
        limits: AcceptLimits,
        handshake: Arc<Handshake<T>>,
    ) -> Result<Self, FabricError> {
        set_nonblocking(&listen)?;
        let shared = Arc::new(Shared {
            name,
            limits,
            stop: EventFd::new()?,
            stopping: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            setups: Mutex::new(HashMap::new()),
            warnings: WarnLimiter::new(Duration::from_secs(1), WARNINGS_PER_SEC),
        });
        let (tx, rx) = mpsc::channel();
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vrio-acceptor".into())
            .spawn(move || AcceptLoop::new(sh, tx, handshake).run(&listen))?;
        Ok(Self {
            rx,
            shared,
            thread: Some(thread),
        })
    }

    /// Blocks until a peer has completed its handshake.
    pub(crate) fn accept(&self) -> Result<T, FabricError> {
        match self.rx.recv() {
            Ok(Ok(t)) => {
                self.shared.pending.fetch_sub(1, Ordering::SeqCst);
                Ok(t)
            }
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvError) => Err(FabricError::Io(std::io::Error::other(
                "the listener stopped accepting",
            ))),
        }
    }
}

impl<T> Drop for Acceptor<T> {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.stop.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor we own; no pointers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The acceptor thread's state.
struct AcceptLoop<T> {
    shared: Arc<Shared>,
    tx: Sender<Item<T>>,
    handshake: Arc<Handshake<T>>,
    threads: Vec<JoinHandle<()>>,
    next_id: u64,
    /// Accepting is paused until then (out of descriptors or memory).
    backoff: Option<Instant>,
}

/// Whether an accept error is the listening socket's own (nothing more
/// will be accepted) rather than one connection's or a passing shortage.
fn fatal(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT)
    )
}

fn short_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl<T: Send + 'static> AcceptLoop<T> {
    fn new(shared: Arc<Shared>, tx: Sender<Item<T>>, handshake: Arc<Handshake<T>>) -> Self {
        Self {
            shared,
            tx,
            handshake,
            threads: Vec::new(),
            next_id: 0,
            backoff: None,
        }
    }

    fn run(mut self, listen: &OwnedFd) {
        loop {
            self.reap();
            let now = Instant::now();
            let mut wake = self.shared.cut_expired(now);
            if self.backoff.is_some_and(|b| b <= now) {
                self.backoff = None;
            }
            if let Some(b) = self.backoff {
                wake = Some(wake.map_or(b, |w| w.min(b)));
            }
            let timeout_ms = wake.map_or(-1, |w| {
                // Rounded up, so that we never wake just before a deadline.
                let us = w.saturating_duration_since(now).as_micros();
                i32::try_from(us.div_ceil(1000)).unwrap_or(i32::MAX)
            });
            let mut fds = [
                libc::pollfd {
                    fd: listen.as_raw_fd(),
                    events: if self.backoff.is_some() {
                        0
                    } else {
                        libc::POLLIN
                    },
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.shared.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of two pollfds, its length given.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                let _ = self.tx.send(Err(e.into()));
                break;
            }
            if fds[1].revents != 0 || self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            if fds[0].revents != 0 {
                if let Err(e) = self.accept_all(listen) {
                    let _ = self.tx.send(Err(e.into()));
                    break;
                }
            }
        }
        // Stopping: end every handshake still running and wait for them.
        for s in self.shared.setups().values_mut() {
            shutdown(&s.sock);
            s.cut = true;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Joins the handshake threads that have finished.
    fn reap(&mut self) {
        let (done, live): (Vec<_>, Vec<_>) = self.threads.drain(..).partition(|t| t.is_finished());
        self.threads = live;
        for t in done {
            let _ = t.join();
        }
    }

    /// Accepts the connections queued on the listening socket (up to a
    /// batch); fails only if the listening socket itself is broken.
    fn accept_all(&mut self, listen: &OwnedFd) -> std::io::Result<()> {
        for _ in 0..ACCEPT_BATCH {
            // SAFETY: accept4 with no address buffers; the result is checked.
            let fd = unsafe {
                libc::accept4(
                    listen.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(());
                }
                if fatal(&e) {
                    return Err(e);
                }
                if short_of_resources(&e) {
                    self.shared
                        .warn(format_args!("cannot accept a connection: {e}; pausing"));
                    self.backoff = Some(Instant::now() + BACKOFF);
                    return Ok(());
                }
                // One connection's error (it was reset, say): go on.
                continue;
            }
            // SAFETY: accept4 returned a fresh descriptor nobody else owns.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            self.start(sock);
        }
        Ok(())
    }

    /// Starts the handshake of one connection, or refuses it.
    fn start(&mut self, sock: OwnedFd) {
        let sh = &self.shared;
        let pending = sh.pending.load(Ordering::SeqCst);
        if pending >= sh.limits.max_pending {
            sh.warn(format_args!(
                "refused a connection: {pending} are being set up or waiting for accept \
                 (limit {})",
                sh.limits.max_pending
            ));
            return;
        }
        let dup = match sock.try_clone() {
            Ok(d) => d,
            Err(e) => {
                sh.warn(format_args!("refused a connection: {e}"));
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        sh.setups().insert(
            id,
            Setup {
                sock: dup,
                deadline: Instant::now() + sh.limits.handshake_deadline,
                cut: false,
            },
        );
        sh.pending.fetch_add(1, Ordering::SeqCst);
        let (shared, tx, hs) = (
            Arc::clone(&self.shared),
            self.tx.clone(),
            Arc::clone(&self.handshake),
        );
        let spawned = std::thread::Builder::new()
            .name("vrio-handshake".into())
            .spawn(move || {
                let r = hs(sock);
                finish(&shared, id, r, &tx);
            });
        match spawned {
            Ok(t) => self.threads.push(t),
            Err(e) => {
                // The closure, and the socket with it, are gone already.
                sh.setups().remove(&id);
                sh.pending.fetch_sub(1, Ordering::SeqCst);
                sh.warn(format_args!(
                    "refused a connection: cannot start its handshake thread: {e}"
                ));
            }
        }
    }
}

/// Hands a finished handshake to `accept`, or logs and drops it.
fn finish<T>(shared: &Shared, id: u64, r: Result<T, FabricError>, tx: &Sender<Item<T>>) {
    let cut = shared.setups().remove(&id).is_some_and(|s| s.cut);
    let r = if cut {
        // It may even have finished just as it was cut; its socket is
        // shut down now, so it is of no use.
        drop(r);
        Err(FabricError::Protocol(format!(
            "no complete handshake within {:?}",
            shared.limits.handshake_deadline
        )))
    } else {
        r
    };
    match r {
        Ok(t) => {
            if tx.send(Ok(t)).is_err() {
                // The listener is gone; nobody will accept it.
                shared.pending.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Err(e) => {
            shared.pending.fetch_sub(1, Ordering::SeqCst);
            if !shared.stopping.load(Ordering::SeqCst) {
                shared.warn(format_args!(
                    "dropping a peer that failed the handshake: {e}"
                ));
            }
        }
    }
}
