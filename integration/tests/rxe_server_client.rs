//! vrio-server and vrio-client over the real `verbs` back-end inside a QEMU
//! (TCG) guest with Soft-RoCE: the remote data path on real one-sided verbs,
//! with a verified workload.

use vrio_integration::rxe;

#[test]
fn server_and_client_over_verbs_in_rxe_guest() {
    if let Err(e) = rxe::ensure_host() {
        panic!("cannot run the Soft-RoCE guest: {e}");
    }
    let server = rxe::build_bin("vrio-examples", "vrio-server").unwrap_or_else(|e| panic!("{e}"));
    let client = rxe::build_bin("vrio-examples", "vrio-client").unwrap_or_else(|e| panic!("{e}"));
    let t0 = std::time::Instant::now();
    let run = rxe::run_in_guest("server-client.sh", &[&server, &client])
        .unwrap_or_else(|e| panic!("{e}"));
    println!("{}", run.output);
    println!(
        "rxe guest run took {:.1} s (TCG Soft-RoCE: correctness only)",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        run.output.contains("(fabric verbs"),
        "the client did not use real verbs"
    );
    assert!(
        run.output
            .contains("vrio-client: 600 of 600 requests verified, 0 errors"),
        "doorbell-mode client did not verify every request"
    );
    assert!(
        run.output
            .contains("vrio-client: 300 of 300 requests verified, 0 errors"),
        "remote-poll client did not verify every request"
    );
    assert_eq!(run.status, Some(0), "guest script exit status");
}
