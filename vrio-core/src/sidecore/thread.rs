//! The sidecore runtime: a thread that drives [`Sidecore`] rounds, sleeps
//! on the kick fds when every queue waits for kicks, and takes commands.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{RoundOutcome, ServedQueue, Sidecore, SidecoreConfig, SidecoreStats};
use crate::cputime::thread_cpu_ns;

enum Command {
    Add(Box<dyn ServedQueue>, mpsc::Sender<u64>),
    Remove(u64, mpsc::Sender<Option<Box<dyn ServedQueue>>>),
    Stop,
}

/// Control of a running sidecore thread.
pub struct SidecoreHandle {
    tx: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    stats: Arc<SidecoreStats>,
    cpu_ns: Arc<std::sync::atomic::AtomicU64>,
    join: Option<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SidecoreError {
    #[error("the sidecore thread has stopped")]
    Stopped,
    #[error("cannot start the sidecore: {0}")]
    Start(#[from] std::io::Error),
}

/// Starts sidecore threads (see [`SidecoreThread::spawn`]).
pub struct SidecoreThread;

impl SidecoreThread {
    /// Spawns a sidecore thread called `name`, without queues; add them
    /// with [`SidecoreHandle::add`].
    pub fn spawn(name: &str, cfg: SidecoreConfig) -> Result<SidecoreHandle, SidecoreError> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let core = Sidecore::new(cfg);
        let stats = core.stats().clone();
        let cpu_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let epoll = Epoll::new()?;
        let (w, c) = (wake.clone(), cpu_ns.clone());
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(core, rx, w, epoll, c))?;
        Ok(SidecoreHandle {
            tx,
            wake,
            stats,
            cpu_ns,
            join: Some(join),
        })
    }
}

impl SidecoreHandle {
    fn send(&self, c: Command) -> Result<(), SidecoreError> {
        self.tx.send(c).map_err(|_| SidecoreError::Stopped)?;
        self.wake.write(1).map_err(|_| SidecoreError::Stopped)
    }

    /// Hands a queue to the sidecore; returns its id there.
    pub fn add(&self, q: Box<dyn ServedQueue>) -> Result<u64, SidecoreError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Add(q, tx))?;
        rx.recv().map_err(|_| SidecoreError::Stopped)
    }

    /// Takes a queue back (quiesced: the sidecore is between rounds).
    pub fn remove(&self, id: u64) -> Result<Option<Box<dyn ServedQueue>>, SidecoreError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Remove(id, tx))?;
        rx.recv().map_err(|_| SidecoreError::Stopped)
    }

    /// The sidecore's counters.
    pub fn stats(&self) -> &Arc<SidecoreStats> {
        &self.stats
    }

    /// CPU time the sidecore thread used, known once it stopped.
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Relaxed)
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.send(Command::Stop);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for SidecoreHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

const WAKE_TOKEN: u64 = u64::MAX;
/// How often the thread reads its CPU clock for the chooser.
const OBSERVE_EVERY: Duration = Duration::from_millis(2);

fn rebuild_epoll(epoll: &Epoll, registered: &mut Vec<RawFd>, core: &Sidecore, wake: RawFd) {
    for fd in registered.drain(..) {
        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
    for fd in std::iter::once(wake).chain(core.kick_fds()) {
        let token = if fd == wake { WAKE_TOKEN } else { fd as u64 };
        match epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            Ok(()) => registered.push(fd),
            Err(e) => tracing::warn!(fd, error = %e, "cannot watch fd"),
        }
    }
}

fn run(
    mut core: Sidecore,
    rx: mpsc::Receiver<Command>,
    wake: Arc<EventFd>,
    epoll: Epoll,
    cpu_ns: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut registered = Vec::new();
    rebuild_epoll(&epoll, &mut registered, &core, wake.as_raw_fd());
    let mut events = vec![EpollEvent::default(); 64];
    let mut observed = Instant::now();
    loop {
        let mut changed = false;
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                Command::Add(q, reply) => {
                    let _ = reply.send(core.add(q, Instant::now()));
                    changed = true;
                }
                Command::Remove(id, reply) => {
                    let _ = reply.send(core.remove(id));
                    changed = true;
                }
                Command::Stop => {
                    cpu_ns.store(thread_cpu_ns(), Relaxed);
                    return;
                }
            }
        }
        if changed {
            rebuild_epoll(&epoll, &mut registered, &core, wake.as_raw_fd());
        }
        let now = Instant::now();
        // The chooser's clock: a few readings per epoch, each a syscall,
        // and none while no queue is measured.
        if core.measures() && now.saturating_duration_since(observed) >= OBSERVE_EVERY {
            observed = now;
            core.observe_cpu(now, thread_cpu_ns());
        }
        match core.round(now) {
            RoundOutcome::Worked => {}
            RoundOutcome::InFlight => std::thread::yield_now(),
            RoundOutcome::Idle { sleep: None, .. } => std::hint::spin_loop(),
            RoundOutcome::Idle {
                sleep: Some(d),
                all_notify,
            } => {
                core.stats().sleeps.fetch_add(1, Relaxed);
                if all_notify {
                    // Every queue waits for a kick: block until one comes
                    // (or a command). The timeout is only a safety net.
                    let _ = epoll.wait(1000, &mut events);
                    let _ = wake.read();
                } else {
                    std::thread::sleep(d.min(Duration::from_millis(10)));
                }
            }
        }
    }
}
