//! The CPU clocks the runners' "CPU per request by role" read: the whole
//! process, one thread (guest drivers, timed from inside their threads),
//! and the fabric threads of a set of protection domains. (Sidecores,
//! workers and agents measure their own threads.)

use std::sync::Arc;
use std::thread::JoinHandle;

/// CPU time the calling thread has used, in nanoseconds.
pub use vrio_rdma::soft::thread_cpu_ns;

/// CPU time used by the whole process, in nanoseconds (0 if the clock
/// cannot be read, which Linux never refuses for this clock).
pub fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec, CLOCK_PROCESS_CPUTIME_ID
    // exists on every Linux, and clock_gettime writes only into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Spawns a thread that runs `f` and returns what it returned with the CPU
/// time the thread used meanwhile (its own thread clock).
pub fn spawn_timed<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<(T, u64)> {
    std::thread::spawn(move || {
        let cpu0 = thread_cpu_ns();
        let out = f();
        (out, thread_cpu_ns().saturating_sub(cpu0))
    })
}

/// The fabric threads' CPU of a remote run's two sides (the I/O server's
/// domain and the VM host's, one per guest), counted from [`Self::start`].
/// Zero on back-ends that run no fabric threads of their own.
pub struct FabricCpuClock {
    server: Arc<dyn vrio_rdma::Domain>,
    vmhost: Vec<Arc<dyn vrio_rdma::Domain>>,
    server0: u64,
    vmhost0: u64,
}

impl FabricCpuClock {
    /// Starts counting now.
    pub fn start(
        server: &Arc<dyn vrio_rdma::Domain>,
        vmhost: &[Arc<dyn vrio_rdma::Domain>],
    ) -> Self {
        let mut c = Self {
            server: Arc::clone(server),
            vmhost: vmhost.to_vec(),
            server0: 0,
            vmhost0: 0,
        };
        (c.vmhost0, c.server0) = c.totals();
        c
    }

    fn totals(&self) -> (u64, u64) {
        let vmhost = self.vmhost.iter().map(|d| d.fabric_cpu_ns()).sum();
        (vmhost, self.server.fabric_cpu_ns())
    }

    /// (VM host's, I/O server's) fabric CPU since the start, in ns.
    pub fn elapsed(&self) -> (u64, u64) {
        let (vmhost, server) = self.totals();
        (
            vmhost.saturating_sub(self.vmhost0),
            server.saturating_sub(self.server0),
        )
    }
}
