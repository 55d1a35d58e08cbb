//! The fabric conformance suite over the real `verbs` back-end, between two
//! processes inside a QEMU (TCG) guest with Soft-RoCE (rdma_rxe).
//!
//! Needs QEMU, a Debian kernel and rdma-core on the host; when they are
//! missing it runs `scripts/setup.sh`, and fails loudly if that does not help.

use vrio_integration::rxe;

#[test]
fn conformance_over_verbs_in_rxe_guest() {
    if let Err(e) = rxe::ensure_host() {
        panic!("cannot run the Soft-RoCE guest: {e}");
    }
    let bin =
        rxe::build_bin("vrio-rdma", "vrio-fabric-conformance").unwrap_or_else(|e| panic!("{e}"));
    let t0 = std::time::Instant::now();
    let smoke = rxe::build_example("vrio-rdma", "verbs_smoke").unwrap_or_else(|e| panic!("{e}"));
    let run =
        rxe::run_in_guest("conformance.sh", &[&bin, &smoke]).unwrap_or_else(|e| panic!("{e}"));
    println!("{}", run.output);
    println!(
        "rxe guest run took {:.1} s (TCG Soft-RoCE: correctness only)",
        t0.elapsed().as_secs_f64()
    );
    let fails = rxe::failures(&run.output);
    assert!(
        fails.is_empty(),
        "conformance failures over verbs: {fails:#?}"
    );
    let (passed, failed) =
        rxe::summary(&run.output).expect("no `N passed, M failed` line from the guest");
    assert_eq!(failed, 0, "{failed} conformance cases failed over verbs");
    assert!(passed > 0, "no conformance case ran");
    assert!(
        run.output.contains("smoke: SMOKE OK"),
        "verbs smoke example (async notify_fd path) did not finish"
    );
    assert_eq!(run.status, Some(0), "guest harness exit status");
}
