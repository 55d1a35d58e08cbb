//! vrio-server and vrio-client as separate processes (an I/O server and a VM
//! host) over the software fabric on loopback.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use vrio_integration::rxe;

#[test]
fn client_processes_verify_their_guests_through_a_server_process() {
    let server = rxe::build_bin("vrio-examples", "vrio-server").unwrap_or_else(|e| panic!("{e}"));
    let client = rxe::build_bin("vrio-examples", "vrio-client").unwrap_or_else(|e| panic!("{e}"));
    let mut srv = Command::new(&server)
        .args([
            "--fabric",
            "soft",
            "--listen",
            "127.0.0.1:0",
            "--sidecores",
            "2",
            "--stats-every",
            "0",
            "--duration",
            "300",
        ])
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
    // Two VM hosts at once, on disjoint disk ranges, in two modes.
    let c1 = Command::new(&client)
        .args([
            "synthetic",
            "--fabric",
            "soft",
            "--server",
            &addr,
            "--guests",
            "3",
            "--queues",
            "2",
        ])
        .args(["--requests", "2000", "--mode", "doorbell"])
        .output()
        .unwrap();
    let c2 = Command::new(&client)
        .args([
            "synthetic",
            "--fabric",
            "soft",
            "--server",
            &addr,
            "--guests",
            "2",
        ])
        .args([
            "--requests",
            "1000",
            "--mode",
            "adaptive",
            "--first-block",
            "100000",
        ])
        .output()
        .unwrap();
    let s1 = String::from_utf8_lossy(&c1.stdout);
    let s2 = String::from_utf8_lossy(&c2.stdout);
    println!("{s1}\n{s2}");
    assert!(
        c1.status.success(),
        "client 1: {}",
        String::from_utf8_lossy(&c1.stderr)
    );
    assert!(
        c2.status.success(),
        "client 2: {}",
        String::from_utf8_lossy(&c2.stderr)
    );
    assert!(s1.contains("12000 of 12000 requests verified, 0 errors"));
    assert!(s2.contains("2000 of 2000 requests verified, 0 errors"));
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
