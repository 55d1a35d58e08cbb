//! Trap-and-emulate baseline (vhost-style): one worker thread per device,
//! blocked on the kick eventfds and woken by every guest kick.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cputime::thread_cpu_ns;
use crate::sidecore::{ServedQueue, SidecoreStats};

/// A running vhost-style worker: one thread serving one device's queues,
/// blocked in epoll until a kick; each kick drains its queue. Stopped on
/// drop.
pub struct VhostWorker {
    stop: Arc<EventFd>,
    stats: Arc<SidecoreStats>,
    cpu_ns: Arc<AtomicU64>,
    join: Option<JoinHandle<()>>,
}

const STOP_TOKEN: u64 = u64::MAX;

impl VhostWorker {
    /// Starts the worker for one device's queues.
    pub fn spawn(name: &str, queues: Vec<Box<dyn ServedQueue>>) -> std::io::Result<Self> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let stats = Arc::new(SidecoreStats::default());
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, q) in queues.iter().enumerate() {
            if let Some(fd) = q.kick_fd() {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, i as u64),
                )?;
            }
        }
        let (st, c) = (stats.clone(), cpu_ns.clone());
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(queues, epoll, st, c))?;
        Ok(Self {
            stop,
            stats,
            cpu_ns,
            join: Some(join),
        })
    }

    /// The worker's counters (the same kind a sidecore keeps).
    pub fn stats(&self) -> &Arc<SidecoreStats> {
        &self.stats
    }

    /// CPU time of the worker thread, known after [`VhostWorker::stop`].
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Relaxed)
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for VhostWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    mut queues: Vec<Box<dyn ServedQueue>>,
    epoll: Epoll,
    stats: Arc<SidecoreStats>,
    cpu_ns: Arc<AtomicU64>,
) {
    let mut events = vec![EpollEvent::default(); 16];
    let mut dead = vec![false; queues.len()];
    for q in queues.iter_mut() {
        let _ = q.set_notifications(true);
    }
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "epoll failed; worker stops");
                break;
            }
        };
        stats.sleeps.fetch_add(1, Relaxed);
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                cpu_ns.store(thread_cpu_ns(), Relaxed);
                return;
            }
            let i = token as usize;
            let Some(q) = queues.get_mut(i) else { continue };
            if dead[i] || !q.take_kick() {
                continue;
            }
            if let Err(e) = serve_until_empty(q.as_mut(), &stats) {
                tracing::error!(error = %e, "queue failed; worker ignores it from now on");
                dead[i] = true;
            }
        }
    }
    cpu_ns.store(thread_cpu_ns(), Relaxed);
}

/// vhost's handle_kick: kicks off, drain, kicks on, re-check.
fn serve_until_empty(
    q: &mut dyn ServedQueue,
    stats: &SidecoreStats,
) -> Result<(), crate::sidecore::QueueFailure> {
    loop {
        q.set_notifications(false)?;
        loop {
            let out = q.poll(256, Instant::now())?;
            stats.polls.fetch_add(1, Relaxed);
            stats.requests.fetch_add(u64::from(out.requests), Relaxed);
            stats.errors.fetch_add(u64::from(out.errors), Relaxed);
            stats.bytes.fetch_add(out.bytes, Relaxed);
            if out.requests + out.errors + out.pending == 0 {
                stats.empty_polls.fetch_add(1, Relaxed);
                break;
            }
        }
        if !q.set_notifications(true)? {
            return Ok(());
        }
    }
}
