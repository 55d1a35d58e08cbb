//! CPU time of the whole process, for the runners' "CPU per request".
//! (Per-thread figures come from the sidecores and agents themselves.)

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
