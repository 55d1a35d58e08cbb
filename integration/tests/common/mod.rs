//! Command lines shared by the cross-process tests, and a legitimate
//! workload for the hostile-peer tests ([`legit`]). Each test binary uses
//! some of it.
#![allow(dead_code)]

pub mod legit;

use std::path::Path;
use std::process::Command;

/// `vrio-server` on the soft fabric, on a free loopback port, with two
/// sidecores and no periodic stats; the caller adds the rest.
pub fn soft_server(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--fabric",
        "soft",
        "--listen",
        "127.0.0.1:0",
        "--sidecores",
        "2",
        "--stats-every",
        "0",
    ]);
    c
}

/// `vrio-client synthetic` on the soft fabric with `guests` guests, reaching
/// its servers through `via` (`--server` or `--controller`) at `addr`; the
/// caller adds the rest.
pub fn synthetic_client(bin: &Path, via: &str, addr: &str, guests: u32) -> Command {
    let mut c = Command::new(bin);
    c.args(["synthetic", "--fabric", "soft", via, addr])
        .args(["--guests", &guests.to_string()]);
    c
}
