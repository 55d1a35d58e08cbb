//! The conformance suite on the `shm` back-end: in one process, and across
//! two processes via the binary. `shm.rs` adds the shm-only cases (dead
//! and scribbling peers, fencing on close).

mod common;

use vrio_rdma::shm::ShmDomain;

#[test]
fn in_process_unix() {
    let path = std::env::temp_dir().join(format!("vrio-shmconf-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let addr = format!("unix:{}", path.display());
    common::in_process(&ShmDomain::new(), &ShmDomain::new(), &addr);
}

#[test]
fn two_processes_unix() {
    let path = std::env::temp_dir().join(format!("vrio-shmconf2-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    common::two_processes("shm", &format!("unix:{}", path.display()));
}
