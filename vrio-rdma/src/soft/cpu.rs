//! CPU accounting of the soft fabric's own threads (the "NIC" threads each
//! endpoint runs), for [`Domain::fabric_cpu_ns`](crate::api::Domain::fabric_cpu_ns).
//!
//! Every thread a soft endpoint spawns registers with its domain's
//! [`FabricCpu`] from inside the thread: its CPU clock id
//! (`pthread_getcpuclockid`) while it runs, and its final CPU time, added
//! to the domain's total, as it exits. Both happen under one lock, and a
//! thread leaves the live list before it exits, so a reader never reads the
//! clock of a thread that is gone and never counts a thread twice or not
//! at all.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// CPU time the calling thread has used, in nanoseconds (0 if the clock
/// cannot be read, which Linux never refuses for this clock). The clock
/// the soft fabric accounts its threads with; benchmarks use it for their
/// own threads.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0)
}

/// Reads `clock`; None if the kernel refuses (a thread clock whose thread
/// is gone).
fn clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and clock_gettime writes
    // only into it; an invalid clock id is reported as an error, not UB.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

#[derive(Debug, Default)]
struct Inner {
    /// Threads running now: (token, their CPU clock).
    live: Vec<(u64, libc::clockid_t)>,
    /// Final CPU time of the threads that exited.
    exited_ns: u64,
    next_token: u64,
}

/// The CPU time of one domain's fabric threads, live and exited.
#[derive(Debug, Default)]
pub(crate) struct FabricCpu {
    inner: Mutex<Inner>,
}

impl FabricCpu {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a push, a remove or an add: poison is harmless.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// CPU time used so far by every thread ever accounted here.
    pub(crate) fn total_ns(&self) -> u64 {
        let inner = self.lock();
        // The live threads cannot exit past `ThreadAccount::drop` while we
        // hold the lock, so each clock still names its running thread.
        let live: u64 = inner
            .live
            .iter()
            .map(|&(_, clock)| clock_ns(clock).unwrap_or(0))
            .sum();
        inner.exited_ns + live
    }

    /// Accounts the calling thread here until the returned guard drops
    /// (which must happen on this thread: it reads the thread's own clock).
    fn enter(self: &Arc<Self>) -> ThreadAccount {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is the calling, running thread, and `clock`
        // is a valid place for the id; the call writes nothing else.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        let token = (rc == 0).then(|| {
            let mut inner = self.lock();
            let t = inner.next_token;
            inner.next_token += 1;
            inner.live.push((t, clock));
            t
        });
        if rc != 0 {
            tracing::debug!("soft fabric: no CPU clock for a fabric thread (error {rc})");
        }
        ThreadAccount {
            cpu: Arc::clone(self),
            token,
        }
    }

    /// Spawns a fabric thread named `name` that runs `f`, accounted here.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let cpu = Arc::clone(self);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _account = cpu.enter();
                f()
            })
    }
}

/// A thread's membership of a [`FabricCpu`]; dropping it (on that thread)
/// moves the thread's CPU time to the exited total.
struct ThreadAccount {
    cpu: Arc<FabricCpu>,
    token: Option<u64>,
}

impl Drop for ThreadAccount {
    fn drop(&mut self) {
        let mut inner = self.cpu.lock();
        inner.exited_ns += thread_cpu_ns();
        if let Some(t) = self.token {
            inner.live.retain(|&(x, _)| x != t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns `ms` of this thread's CPU time (not wall time: on a loaded
    /// machine a wall-time spin gets only a share of a core), giving up
    /// after 30 s of wall time.
    fn spin(ms: u64) {
        let t0 = std::time::Instant::now();
        let start = thread_cpu_ns();
        let mut x = 0u64;
        while thread_cpu_ns() - start < ms * 1_000_000
            && t0.elapsed() < std::time::Duration::from_secs(30)
        {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn live_and_exited_threads_are_counted_once() {
        let cpu = FabricCpu::new();
        assert_eq!(cpu.total_ns(), 0);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (spun_tx, spun_rx) = std::sync::mpsc::channel::<()>();
        let t = cpu
            .spawn("test-fabric", move || {
                spin(30);
                let _ = spun_tx.send(());
                let _ = go_rx.recv();
            })
            .unwrap();
        spun_rx.recv().unwrap();
        let live = cpu.total_ns();
        assert!(live >= 30_000_000, "a live thread's 30 ms spin: {live} ns");
        go_tx.send(()).unwrap();
        t.join().unwrap();
        let done = cpu.total_ns();
        assert!(done >= live, "exited total {done} < live reading {live}");
        assert!(done < live + 20_000_000, "counted twice? {done} vs {live}");
        assert!(cpu.lock().live.is_empty());
    }
}
