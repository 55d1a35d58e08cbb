//! Runs the fabric conformance suite.
//!
//! Two processes:  `--role target --addr A` in one, `--role initiator --addr A`
//! in the other. One process: `--role local --addr A` (the target on a thread).
//! Prints `PASS name` / `FAIL name: reason` per case and `N passed, M failed`;
//! exits non-zero on any failure.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use clap::{Parser, ValueEnum};
use vrio_rdma::conformance::{self, InitiatorOptions, TargetOptions};
use vrio_rdma::{Backend, EndpointConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Soft,
    Verbs,
    Shm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Serve the suite's target on --addr (prints "listening on ADDR").
    Target,
    /// Run every case against the target at --addr.
    Initiator,
    /// Run target and initiator in this process.
    Local,
    /// Connect to --addr, print "connected", then keep the endpoint open
    /// until killed (a peer for dead-peer tests).
    Hold,
}

#[derive(Debug, Parser)]
#[command(about = "vrio fabric conformance suite")]
struct Args {
    #[arg(long, value_enum)]
    backend: BackendArg,
    #[arg(long, value_enum)]
    role: Role,
    /// `host:port` (soft, verbs) or `unix:/path` (soft, shm). The target may use
    /// port 0 and prints the address it listens on.
    #[arg(long)]
    addr: String,
    /// RDMA device for verbs (default: the first).
    #[arg(long)]
    device: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vrio-fabric-conformance: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<bool, vrio_rdma::FabricError> {
    let backend = match args.backend {
        BackendArg::Soft => Backend::Soft,
        BackendArg::Verbs => Backend::Verbs,
        BackendArg::Shm => Backend::Shm,
    };
    let device = args.device.as_deref();
    let mut out = std::io::stdout();
    match args.role {
        Role::Target => {
            let domain = vrio_rdma::open(backend, device)?;
            let cfg = EndpointConfig {
                send_depth: 1024,
                recv_depth: 64,
                ..EndpointConfig::default()
            };
            let listener = domain.listen(&args.addr, cfg)?;
            let _ = writeln!(out, "listening on {}", listener.local_addr());
            let _ = out.flush();
            let never = AtomicBool::new(false);
            conformance::run_target(
                domain.as_ref(),
                listener,
                TargetOptions {
                    exit_process_on_die: true,
                },
                &never,
            )?;
            Ok(true)
        }
        Role::Initiator => {
            let domain = vrio_rdma::open(backend, device)?;
            let sum = conformance::run_initiator(
                domain.as_ref(),
                InitiatorOptions::new(&args.addr, true),
                &mut out,
            )?;
            Ok(sum.failed == 0)
        }
        Role::Hold => {
            let domain = vrio_rdma::open(backend, device)?;
            let mut ep = domain.connect(&args.addr, EndpointConfig::default())?;
            let _ = writeln!(out, "connected");
            let _ = out.flush();
            let mut done = [vrio_rdma::Completion::EMPTY; 16];
            loop {
                match ep.wait(std::time::Duration::from_secs(1)) {
                    Ok(()) => {
                        ep.poll(&mut done)?;
                    }
                    Err(_) => return Ok(true),
                }
            }
        }
        Role::Local => {
            let target = vrio_rdma::open(backend, device)?;
            let initiator = vrio_rdma::open(backend, device)?;
            let sum = conformance::run_in_process(
                target.as_ref(),
                initiator.as_ref(),
                &args.addr,
                &mut out,
            )?;
            Ok(sum.failed == 0)
        }
    }
}
