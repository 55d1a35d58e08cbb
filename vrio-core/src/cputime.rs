//! CPU time of the calling thread, for the per-role "CPU per request"
//! figures that sidecores and agents report.

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock ids used here
    // exist on every Linux; clock_gettime writes only into `ts`.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time used by the calling thread, in nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time used so far by the thread of `handle`, in nanoseconds; `None`
/// once it has exited (its clock is gone).
pub(crate) fn clock_of<T>(handle: &std::thread::JoinHandle<T>) -> Option<u64> {
    use std::os::unix::thread::JoinHandleExt;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the handle is not joined (we borrow it), so its pthread_t
    // still names the thread or, if it exited, a zombie that the kernel
    // reports as such; the call writes only `clock`.
    let rc = unsafe { libc::pthread_getcpuclockid(handle.as_pthread_t(), &mut clock) };
    if rc != 0 {
        return None;
    }
    Some(clock_ns(clock)).filter(|&ns| ns != 0)
}
