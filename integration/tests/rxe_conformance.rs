//! The fabric conformance suite over the real `verbs` back-end, between two
//! processes inside a QEMU (TCG) guest with Soft-RoCE (rdma_rxe).
//!
//! Needs QEMU, a Debian kernel and rdma-core on the host; when they are
//! missing it runs `scripts/setup.sh`, and fails loudly if that does not help.

use vrio_integration::rxe;

#[test]
fn conformance_over_verbs_in_rxe_guest() {
    rxe::require_host("the Soft-RoCE guest");
    let bin = rxe::bin("vrio-rdma", "vrio-fabric-conformance");
    let run = rxe::timed_run("rxe guest run", || {
        let smoke = rxe::build_example("vrio-rdma", "verbs_smoke")?;
        rxe::run_in_guest("conformance.sh", &[&bin, &smoke])
    });
    rxe::assert_conformance_passed(&run.output, "the guest");
    assert!(
        run.output.contains("smoke: SMOKE OK"),
        "verbs smoke example (async notify_fd path) did not finish"
    );
    assert_eq!(run.status, Some(0), "guest harness exit status");
}
