//! The fabric conformance suite over `verbs` between two QEMU (TCG) guests
//! with Soft-RoCE, linked by `-netdev dgram` on 127.0.0.1: real RoCE v2
//! packets on a wire, not rxe's loopback.

use vrio_integration::rxe;

#[test]
fn conformance_over_verbs_between_two_rxe_guests() {
    if let Err(e) = rxe::ensure_host() {
        panic!("cannot run the Soft-RoCE guests: {e}");
    }
    let bin =
        rxe::build_bin("vrio-rdma", "vrio-fabric-conformance").unwrap_or_else(|e| panic!("{e}"));
    let t0 = std::time::Instant::now();
    let run =
        rxe::run_two_guests("conformance-2guests.sh", &[&bin]).unwrap_or_else(|e| panic!("{e}"));
    println!("{}", run.output);
    println!(
        "two rxe guests took {:.1} s (TCG Soft-RoCE: correctness only)",
        t0.elapsed().as_secs_f64()
    );
    let fails = rxe::failures(&run.output);
    assert!(
        fails.is_empty(),
        "conformance failures over verbs: {fails:#?}"
    );
    let (passed, failed) =
        rxe::summary(&run.output).expect("no `N passed, M failed` line from the initiator guest");
    assert_eq!(failed, 0, "{failed} conformance cases failed over verbs");
    assert!(passed > 0, "no conformance case ran");
    assert_eq!(run.status, Some(0), "two-guest harness exit status");
}
