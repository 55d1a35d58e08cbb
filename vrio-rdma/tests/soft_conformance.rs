//! The conformance suite on the `soft` back-end: in one process over TCP and
//! over a Unix socket, and across two processes via the binary.

mod common;

use vrio_rdma::soft::SoftDomain;

fn in_process(addr: &str) {
    common::in_process(&SoftDomain::new(), &SoftDomain::new(), addr);
}

#[test]
fn in_process_tcp() {
    in_process("127.0.0.1:0");
}

#[test]
fn in_process_unix() {
    let path = std::env::temp_dir().join(format!("vrio-conf-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    in_process(&format!("unix:{}", path.display()));
}

#[test]
fn two_processes_tcp() {
    common::two_processes("soft", "127.0.0.1:0");
}

#[test]
fn two_processes_unix() {
    let path = std::env::temp_dir().join(format!("vrio-conf2-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    common::two_processes("soft", &format!("unix:{}", path.display()));
}
