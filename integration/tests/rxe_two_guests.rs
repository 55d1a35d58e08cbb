//! The fabric conformance suite over `verbs` between two QEMU (TCG) guests
//! with Soft-RoCE, linked by `-netdev dgram` on 127.0.0.1: real RoCE v2
//! packets on a wire, not rxe's loopback.

use vrio_integration::rxe;

#[test]
fn conformance_over_verbs_between_two_rxe_guests() {
    rxe::require_host("the Soft-RoCE guests");
    let bin = rxe::bin("vrio-rdma", "vrio-fabric-conformance");
    let run = rxe::timed_run("two rxe guests", || {
        rxe::run_two_guests("conformance-2guests.sh", &[&bin])
    });
    rxe::assert_conformance_passed(&run.output, "the initiator guest");
    assert_eq!(run.status, Some(0), "two-guest harness exit status");
}
