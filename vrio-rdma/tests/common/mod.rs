//! The conformance suite's two drivers, shared by every back-end's test
//! file: in one process, and across two processes via the binary.

// Each test file uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vrio_rdma::{conformance, Domain};

/// Cases the suite runs: connect + 12.
pub const CASES: usize = 13;

/// Runs the suite with the target on a thread, over `addr`.
pub fn in_process(target: &dyn Domain, initiator: &dyn Domain, addr: &str) {
    let mut out = Vec::new();
    let sum = conformance::run_in_process(target, initiator, addr, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    print!("{text}");
    assert_eq!(sum.failed, 0, "failures: {:?}", sum.failures);
    // Every case ran and the closing line is exact.
    assert_eq!(sum.passed, CASES, "{text}");
    assert!(
        text.ends_with(&format!("{CASES} passed, 0 failed\n")),
        "{text}"
    );
}

pub fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Runs the suite with the target in another process on `backend`.
pub fn two_processes(backend: &str, listen: &str) {
    let bin = env!("CARGO_BIN_EXE_vrio-fabric-conformance");
    let mut target = Command::new(bin)
        .args(["--backend", backend, "--role", "target", "--addr", listen])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(target.stdout.take().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let out = Command::new(bin)
        .args(["--backend", backend, "--role", "initiator", "--addr", &addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    print!("{text}{}", String::from_utf8_lossy(&out.stderr));
    // The killed-peer case made the target exit on its own.
    let st = wait_exit(&mut target, Duration::from_secs(30));
    if st.is_none() {
        let _ = target.kill();
    }
    let mut rest = String::new();
    let _ = lines.read_to_string(&mut rest);
    assert!(out.status.success(), "initiator failed:\n{text}");
    assert!(
        text.ends_with(&format!("{CASES} passed, 0 failed\n")),
        "{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");
    assert_eq!(
        st.map(|s| s.success()),
        Some(true),
        "target did not exit when told to die"
    );
}
