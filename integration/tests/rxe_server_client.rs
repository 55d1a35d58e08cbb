//! vrio-server and vrio-client over the real `verbs` back-end inside a QEMU
//! (TCG) guest with Soft-RoCE: the remote data path on real one-sided verbs,
//! with a verified workload.

use vrio_integration::rxe;

#[test]
fn server_and_client_over_verbs_in_rxe_guest() {
    rxe::require_host("the Soft-RoCE guest");
    let server = rxe::bin("vrio-examples", "vrio-server");
    let client = rxe::bin("vrio-examples", "vrio-client");
    let run = rxe::timed_run("rxe guest run", || {
        rxe::run_in_guest("server-client.sh", &[&server, &client])
    });
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
