//! vrio-server and vrio-client as separate processes (an I/O server and a VM
//! host) over the software fabric on loopback.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::{soft_server, synthetic_client};
use vrio_integration::rxe;

#[test]
fn client_processes_verify_their_guests_through_a_server_process() {
    let server = rxe::bin("vrio-examples", "vrio-server");
    let client = rxe::bin("vrio-examples", "vrio-client");
    let mut srv = soft_server(&server)
        .args(["--duration", "300"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(srv.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    // Two VM hosts, on disjoint disk ranges, in two modes: guests, their
    // flags, and the verdict each must print.
    let hosts: [(u32, &[&str], &str); 2] = [
        (
            3,
            &["--queues", "2", "--requests", "2000", "--mode", "doorbell"],
            "12000 of 12000 requests verified, 0 errors",
        ),
        (
            2,
            &[
                "--requests",
                "1000",
                "--mode",
                "adaptive",
                "--first-block",
                "100000",
            ],
            "2000 of 2000 requests verified, 0 errors",
        ),
    ];
    let runs: Vec<_> = hosts
        .iter()
        .map(|(guests, flags, _)| {
            synthetic_client(&client, "--server", &addr, *guests)
                .args(*flags)
                .output()
                .unwrap()
        })
        .collect();
    let stdouts: Vec<_> = runs
        .iter()
        .map(|r| String::from_utf8_lossy(&r.stdout))
        .collect();
    println!("{}", stdouts.join("\n"));
    for (i, (run, (_, _, verdict))) in runs.iter().zip(&hosts).enumerate() {
        assert!(
            run.status.success(),
            "client {}: {}",
            i + 1,
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(stdouts[i].contains(verdict), "client {}: {verdict}", i + 1);
    }
    // SIGTERM: the server stops cleanly and reports what it served.
    // SAFETY: kill with a valid pid of our own child and a valid signal.
    unsafe {
        libc::kill(srv.id() as i32, libc::SIGTERM);
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(srv.wait().unwrap().success());
    println!("{rest}");
    assert!(
        rest.contains("final: 14000 requests (0 refused)"),
        "server final stats: {rest}"
    );
}
