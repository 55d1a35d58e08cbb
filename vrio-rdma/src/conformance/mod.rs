//! The fabric conformance suite: one set of cases, written against
//! `&dyn Domain`, that every back-end must pass. It runs in one process
//! (target on a thread, [`run_in_process`]) or across two processes (the
//! `vrio-fabric-conformance` binary, [`run_target`] and [`run_initiator`]).
//!
//! The target registers a read-write and a read-only region of a memfd and
//! hands their [`RemoteRegion`](crate::api::RemoteRegion)s to the initiator
//! with SEND; the initiator then runs every case. See `docs/fabric.md` for
//! the expected semantics.

mod initiator;
pub mod memory;
mod proto;
mod target;

pub use initiator::{run_initiator, InitiatorOptions};
pub use target::{run_target, TargetOptions};

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::api::{Domain, EndpointConfig, FabricError};

/// Size of the target's read-write region in bytes (remote READ and WRITE).
pub const RW_LEN: usize = 2 << 20;
/// Size of the target's read-only region in bytes, filled with
/// `pattern(RO_SEED, i)`.
pub const RO_LEN: usize = (1 << 20) + 4096;
/// Seed of the pattern in the target's read-only region (see
/// [`memory::pattern`]).
pub const RO_SEED: u64 = 0x5eed;

/// The result of a suite run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Number of cases that passed.
    pub passed: usize,
    /// Number of cases that failed.
    pub failed: usize,
    /// One `"case: why"` line per failed case.
    pub failures: Vec<String>,
}

impl Summary {
    fn record(&mut self, name: &str, r: Result<(), String>, out: &mut dyn std::io::Write) {
        match r {
            Ok(()) => {
                self.passed += 1;
                let _ = writeln!(out, "PASS {name}");
            }
            Err(why) => {
                self.failed += 1;
                let _ = writeln!(out, "FAIL {name}: {why}");
                self.failures.push(format!("{name}: {why}"));
            }
        }
        let _ = out.flush();
    }
}

/// Runs the suite with the target on a thread of this process. The two
/// domains play two hosts; `listen_addr` may use port 0.
pub fn run_in_process(
    target_domain: &dyn Domain,
    initiator_domain: &dyn Domain,
    listen_addr: &str,
    out: &mut dyn std::io::Write,
) -> Result<Summary, FabricError> {
    let cfg = EndpointConfig {
        send_depth: 1024,
        recv_depth: 64,
        ..EndpointConfig::default()
    };
    let listener = target_domain.listen(listen_addr, cfg)?;
    let addr = listener.local_addr();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let target = s.spawn(|| {
            run_target(
                target_domain,
                listener,
                TargetOptions {
                    exit_process_on_die: false,
                },
                &stop,
            )
        });
        let sum = run_initiator(initiator_domain, InitiatorOptions::new(&addr, false), out);
        // Stop the target: set the flag, then connect until accept notices.
        stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !target.is_finished() && Instant::now() < deadline {
            let _ = initiator_domain.connect(&addr, cfg);
            std::thread::sleep(Duration::from_millis(50));
        }
        if !target.is_finished() {
            // Scope would join forever; a stuck target is a bug worth dying for.
            eprintln!("conformance target did not stop; aborting");
            std::process::abort();
        }
        let t = target
            .join()
            .map_err(|_| FabricError::Protocol("the conformance target panicked".into()))?;
        t?;
        sum
    })
}
