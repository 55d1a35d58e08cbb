//! What the tests that boot guests through `integration/vhost/` share:
//! host tool checks, the binaries, and running a script with its output
//! made plain.

use std::path::PathBuf;
use std::process::Command;

/// Whether `tool` is an executable file on PATH (or in /usr/sbin, /sbin,
/// where e2fsprogs lives on Debian).
pub fn on_path(tool: &str) -> bool {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(tool).is_file())
}

/// The log without terminal colour codes (tracing colours `key=value`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Checks the host for the guests of `what` (QEMU, the kernel, busybox:
/// `rxe::require_host`) and for `tools`; a host where scripts/setup.sh
/// could not install them fails here, loudly.
pub fn require_tools(what: &str, tools: &[&str]) {
    crate::rxe::require_host(what);
    for tool in tools {
        assert!(
            on_path(tool),
            "{tool} is missing on the host, needed by {what} (run scripts/setup.sh)"
        );
    }
}

/// vrio-server and vrio-client, built in the caller's profile, and
/// vrio-ctl and vrio-controller next to them (the scripts find those
/// beside vrio-server).
pub fn vrio_binaries() -> (PathBuf, PathBuf) {
    let server = crate::rxe::bin("vrio-examples", "vrio-server");
    let client = crate::rxe::bin("vrio-examples", "vrio-client");
    for bin in ["vrio-controller", "vrio-ctl"] {
        crate::rxe::bin("vrio-examples", bin);
    }
    (server, client)
}

/// Runs `integration/vhost/SCRIPT VRIO-SERVER VRIO-CLIENT GUEST` with
/// `env`; prints and returns its whole output (colour codes removed) and
/// whether it exited successfully.
pub fn run_script(
    script: &str,
    guest: &str,
    bins: &(PathBuf, PathBuf),
    env: &[(&str, &str)],
) -> (String, bool) {
    let dir = crate::rxe::workspace_root()
        .join("integration")
        .join("vhost");
    let (script, guest) = (dir.join(script), dir.join(guest));
    for f in [&script, &guest] {
        assert!(f.is_file(), "{} missing", f.display());
    }
    let t0 = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&bins.0)
        .arg(&bins.1)
        .arg(&guest)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    let log = strip_ansi(&log);
    println!("{log}");
    println!(
        "{} with {} took {:.1} s (TCG: correctness only)",
        script.display(),
        guest.display(),
        t0.elapsed().as_secs_f64()
    );
    (log, out.status.success())
}

#[cfg(test)]
mod tests {
    #[test]
    fn colour_codes_go_and_the_text_stays() {
        assert_eq!(super::strip_ansi("\u{1b}[2mkey\u{1b}[0m=v ok"), "key=v ok");
        assert!(super::on_path("sh"));
        assert!(!super::on_path("no-such-tool-vrio"));
    }
}
