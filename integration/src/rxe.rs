//! Run vrio binaries inside a Soft-RoCE (rdma_rxe) QEMU guest.
//!
//! The scripts live in `integration/rxe/`; these helpers make sure the host
//! has what they need (installing it with `scripts/setup.sh` if not), build
//! workspace binaries in the caller's profile, and read the guest's result.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `integration/rxe`.
pub fn scripts_dir() -> PathBuf {
    workspace_root().join("integration").join("rxe")
}

/// What the guest harness needs on the host, or why it is missing.
pub fn host_missing() -> Option<String> {
    let mut missing = Vec::new();
    for tool in [
        "qemu-system-x86_64",
        "busybox",
        "cpio",
        "depmod",
        "ibv_devices",
        "rdma",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push(tool.to_string());
        }
    }
    let kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("vmlinuz-")
                    && e.file_name().to_string_lossy().ends_with("-amd64")
            })
        })
        .unwrap_or(false);
    if !kernel {
        missing.push("/boot/vmlinuz-*-amd64".into());
    }
    for lib in ["libibverbs.so.1", "librdmacm.so.1"] {
        if !Path::new("/usr/lib/x86_64-linux-gnu").join(lib).exists() {
            missing.push(lib.into());
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Makes sure QEMU, the guest kernel and rdma-core are installed, running
/// `scripts/setup.sh` (idempotent) when something is missing.
pub fn ensure_host() -> Result<(), String> {
    let Some(missing) = host_missing() else {
        return Ok(());
    };
    eprintln!("rxe: missing on host: {missing}; running scripts/setup.sh");
    let setup = workspace_root().join("scripts").join("setup.sh");
    let st = Command::new("bash")
        .arg(&setup)
        .arg("all")
        .status()
        .map_err(|e| format!("cannot run {}: {e}", setup.display()))?;
    if !st.success() {
        return Err(format!("{} failed ({st})", setup.display()));
    }
    match host_missing() {
        None => Ok(()),
        Some(m) => Err(format!("still missing after scripts/setup.sh: {m}")),
    }
}

/// [`ensure_host`] for a test: panics saying that `what` cannot run.
pub fn require_host(what: &str) {
    if let Err(e) = ensure_host() {
        panic!("cannot run {what}: {e}");
    }
}

/// The profile directory the calling test binary was built in
/// (`target/debug` or `target/release`).
pub fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("unexpected test binary path {}", exe.display()))
}

/// Builds `bin` of `package` in the caller's profile and returns its path.
pub fn build_bin(package: &str, bin: &str) -> Result<PathBuf, String> {
    build(package, "--bin", bin)
}

/// [`build_bin`] for a test: panics if the build fails.
pub fn bin(package: &str, bin: &str) -> PathBuf {
    build_bin(package, bin).unwrap_or_else(|e| panic!("{e}"))
}

/// Builds example `name` of `package` in the caller's profile.
pub fn build_example(package: &str, name: &str) -> Result<PathBuf, String> {
    build(package, "--example", name)
}

fn build(package: &str, kind: &str, bin: &str) -> Result<PathBuf, String> {
    let dir = profile_dir()?;
    let release = dir.file_name().is_some_and(|n| n == "release");
    let target_dir = dir.parent().ok_or("no target dir")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-p", package, kind, bin])
        .env("CARGO_TARGET_DIR", target_dir);
    if package == "vrio-rdma" && kind == "--bin" {
        // The fabric tools are behind vrio-rdma's "tools" feature.
        cmd.args(["--features", "tools"]);
    }
    if release {
        cmd.arg("--release");
    }
    let st = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err(format!(
            "cargo build -p {package} {kind} {bin} failed ({st})"
        ));
    }
    let path = if kind == "--example" {
        dir.join("examples").join(bin)
    } else {
        dir.join(bin)
    };
    path.is_file()
        .then_some(path.clone())
        .ok_or_else(|| format!("{} not found after build", path.display()))
}

/// One guest run: the script's exit status (None if the guest never
/// reported) and everything the harness printed, serial log included.
#[derive(Debug)]
pub struct GuestRun {
    pub status: Option<i32>,
    pub output: String,
}

/// Runs `script` (a file in `integration/rxe/` or a path) in a fresh guest
/// with `bins` in its `/usr/bin`.
pub fn run_in_guest(script: &str, bins: &[&Path]) -> Result<GuestRun, String> {
    run_script("run-in-guest.sh", script, bins)
}

fn run_script(runner: &str, script: &str, bins: &[&Path]) -> Result<GuestRun, String> {
    let script = if Path::new(script).is_absolute() {
        PathBuf::from(script)
    } else {
        scripts_dir().join(script)
    };
    let out = Command::new("bash")
        .arg(scripts_dir().join(runner))
        .arg(&script)
        .args(bins)
        .output()
        .map_err(|e| format!("{runner}: {e}"))?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(GuestRun {
        status: out.status.code(),
        output,
    })
}

/// Runs `script` in two guests linked by `-netdev dgram` (see
/// `run-2guests.sh`): ROLE=target on 10.0.4.1, ROLE=initiator on 10.0.4.2.
pub fn run_two_guests(script: &str, bins: &[&Path]) -> Result<GuestRun, String> {
    run_script("run-2guests.sh", script, bins)
}

/// Runs a guest harness with `run` (which may build what it needs first)
/// for a test: panics if it cannot run, prints its output and how long it
/// took (`{what} took N s`).
pub fn timed_run(what: &str, run: impl FnOnce() -> Result<GuestRun, String>) -> GuestRun {
    let t0 = std::time::Instant::now();
    let run = run().unwrap_or_else(|e| panic!("{e}"));
    println!("{}", run.output);
    println!(
        "{what} took {:.1} s (TCG Soft-RoCE: correctness only)",
        t0.elapsed().as_secs_f64()
    );
    run
}

/// Asserts that the conformance suite passed in `output`: no failed case,
/// and a summary line (printed by `whose`) with cases run and none failed.
pub fn assert_conformance_passed(output: &str, whose: &str) {
    let fails = failures(output);
    assert!(
        fails.is_empty(),
        "conformance failures over verbs: {fails:#?}"
    );
    let (passed, failed) =
        summary(output).unwrap_or_else(|| panic!("no `N passed, M failed` line from {whose}"));
    assert_eq!(failed, 0, "{failed} conformance cases failed over verbs");
    assert!(passed > 0, "no conformance case ran");
}

/// The conformance summary line `N passed, M failed`, if present (the last
/// one wins).
pub fn summary(output: &str) -> Option<(u32, u32)> {
    output.lines().rev().find_map(|l| {
        let l = l.trim();
        let (p, rest) = l.split_once(" passed, ")?;
        let f = rest.strip_suffix(" failed")?;
        Some((p.trim().parse().ok()?, f.trim().parse().ok()?))
    })
}

/// Lines that report a failed case (`FAIL name: reason`).
pub fn failures(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| l.trim_start().starts_with("FAIL"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_parses_last_line() {
        let out = "PASS a\nFAIL b: boom\n1 passed, 1 failed\nnoise\n12 passed, 0 failed\r\n";
        assert_eq!(summary(out), Some((12, 0)));
        assert_eq!(summary("nothing here"), None);
        assert_eq!(summary("x passed, 0 failed"), None);
    }

    #[test]
    fn failures_found() {
        let out = "PASS a\nFAIL b: boom\n  FAIL c: x\n";
        assert_eq!(failures(out), vec!["FAIL b: boom", "  FAIL c: x"]);
        assert!(failures("PASS a\n").is_empty());
        // A retried attempt's lines (conformance-2guests.sh) do not count.
        let retried = "attempt 1: rc=1\n  retried: FAIL connect: refused\n  retried: 0 passed, 1 failed\nPASS connect\n12 passed, 0 failed\n";
        assert!(failures(retried).is_empty());
        assert_eq!(summary(retried), Some((12, 0)));
    }

    #[test]
    fn scripts_are_there() {
        for s in [
            "run-in-guest.sh",
            "run-2guests.sh",
            "lib.sh",
            "build-initramfs.sh",
            "init.sh",
            "conformance.sh",
        ] {
            assert!(scripts_dir().join(s).is_file(), "{s} missing");
        }
    }
}
