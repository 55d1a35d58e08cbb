//! vrio-ctl: operator CLI for vrio-controller.
//!
//!   vrio-ctl servers | devices | assignments | stats   [--json]
//!   vrio-ctl move DEVICE QUEUE SERVER SIDECORE
//!   vrio-ctl drain SERVER
//!   vrio-ctl watch [--count N]
//!   vrio-ctl top [--interval SECS] [--count N] [--metrics URL]... [--json]
//!
//! Volumes and grants at the controller:
//!   vrio-ctl volume create NAME --size-mib N
//!   vrio-ctl volume list [--json]
//!   vrio-ctl volume delete NAME [--force]
//!   vrio-ctl volume grant VOLUME DEVICE [--mode rw|ro|shared] [--host IP]
//!   vrio-ctl volume revoke VOLUME DEVICE
//!
//! Interposition policies of devices (QoS, encryption, metering, faults):
//!   vrio-ctl policy set DEVICE (--file F | --json JSON)
//!   vrio-ctl policy show DEVICE [--json]
//!   vrio-ctl policy clear DEVICE
//!
//! Data-plane tenancy (local: no controller needed):
//!   vrio-ctl key generate --out FILE
//!   vrio-ctl credential mint --key-file FILE (--device NAME | --device-id N) --volume V [--mode rw|ro|shared]
//!   vrio-ctl volume create|list|delete --dir DIR ...   (images in a server's --volume-dir)

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::process::ExitCode;
use tonic::Code;
use vrio_control::client::{connect_with, Client};
use vrio_control::pb;

#[derive(Parser, Debug)]
#[command(about = "Control vrio queue placement")]
struct Args {
    /// Controller address.
    #[arg(
        long,
        env = "VRIO_CONTROLLER",
        default_value = "127.0.0.1:7470",
        global = true
    )]
    addr: String,
    /// Bearer token.
    #[arg(long, env = "VRIO_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: vrio_examples::control::TlsArgs,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// I/O servers, their sidecores, load and leases.
    Servers,
    /// Attached devices.
    Devices,
    /// Which sidecore serves each queue.
    Assignments {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        server: Option<String>,
    },
    /// Controller totals.
    Stats,
    /// Move one queue to a server's sidecore.
    Move {
        device: String,
        queue: u32,
        server: String,
        sidecore: u32,
    },
    /// Move every queue off a server and stop placing queues on it.
    Drain { server: String },
    /// Run one rebalance round now.
    Rebalance,
    /// Detach a device and free its queues.
    Detach { device: String },
    /// Stream assignment changes (starting with the current assignments).
    Watch {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        server: Option<String>,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// A live view of servers, sidecores and the busiest queues, from the
    /// controller and (with --metrics) the servers' /metrics endpoints.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Exit after this many refreshes (default: until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// An I/O server's metrics endpoint (vrio-server --metrics-listen),
        /// e.g. http://127.0.0.1:9100/metrics; repeatable.
        #[arg(long = "metrics", value_name = "URL")]
        metrics: Vec<String>,
        /// How many queues the QUEUES table lists.
        #[arg(long, default_value_t = 10)]
        queues: usize,
    },
    /// Data-plane keys I/O servers check attach credentials with (local).
    #[command(subcommand)]
    Key(KeyCmd),
    /// Attach credentials for VM hosts (local; needs the key file).
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// Volumes and which device may attach each: at the controller, or with
    /// --dir the raw images in a server's --volume-dir (local).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Devices' interposition policies: QoS limits, encryption at rest,
    /// metering, fault injection, net ACLs and rate limits, applied by the
    /// I/O servers (see `vrio-ctl policy set --help`).
    #[command(subcommand)]
    Policy(PolicyCmd),
}

/// `vrio-ctl policy set --help`.
const POLICY_SET_HELP: &str = r#"Set a device's interposition policy at the controller.

Every I/O server applies it within about a second, to the device's queues
there now and to those that attach later: a policy follows its device
through moves and failovers. The device need not be attached yet, and
detaching it keeps its policy. An empty policy ('' or {"stages": []})
clears it, as `vrio-ctl policy clear` does. The controller checks the
policy as a server builds it and refuses a bad one; the device then keeps
the policy it has.

A policy is JSON: {"stages": [STAGE, ...]}, in the order requests pass the
stages. Each STAGE is an object whose "stage" field names its kind:

  meter     ops, bytes, errors and latency per op (blk and net); no fields
  qos       blk limits, 0 = unlimited: rw_ios_per_sec, rw_mbytes_per_sec,
            r_mbytes_per_sec, w_mbytes_per_sec; burst_ms (default 100)
  crypt     AES-XTS-256 at rest (blk): key, 128 hex digits (two different
            AES-256 keys); cipher, "aes_xts_256" (the default)
  fault     errors or delays on sectors first_sector .. first_sector +
            sectors (blk): ops (read, write, flush, discard, write_zeroes;
            none = all), error ("ioerr" or "unsupp"), delay_ms
  net_acl   sources a guest may send from (net): allow_macs
            ("52:54:00:12:34:56"), allow_ipv4 ("10.0.0.0/24")
  net_rate  limits on frames a guest sends (net), 0 = unlimited:
            mbits_per_sec, frames_per_sec; burst_ms (default 100)

Example:

  vrio-ctl policy set disk0 --json '{"stages": [{"stage": "meter"},
      {"stage": "qos", "rw_ios_per_sec": 2000, "w_mbytes_per_sec": 50}]}'

Give a policy with a key in a file (--file, mode 0600, or - for stdin),
not with --json: other users of the machine can read command lines. The
controller keeps keys in its state and sends them only to the I/O servers;
`policy show` and error messages print "redacted" in their place."#;

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Set (or with an empty policy, clear) a device's policy.
    #[command(long_about = POLICY_SET_HELP)]
    Set {
        /// The device's id at the controller.
        device: String,
        /// Read the policy JSON from this file (- for stdin).
        #[arg(long, value_name = "FILE", conflicts_with = "policy_json")]
        file: Option<std::path::PathBuf>,
        /// The policy JSON itself (`--json JSON` after `policy set` means
        /// this too).
        #[arg(long = "policy-json", value_name = "JSON")]
        policy_json: Option<String>,
    },
    /// Show a device's policy (keys redacted) and, per I/O server, its
    /// stages' counters: for a meter stage requests, bytes and errors by
    /// op and the p50 and p99 latency.
    Show {
        /// The device's id at the controller.
        device: String,
    },
    /// Clear a device's policy: nothing is interposed any more.
    Clear {
        /// The device's id at the controller.
        device: String,
    },
}

/// Lets `policy set DEVICE --json JSON` work although `--json` is also the
/// global output flag (a flag without a value, which clap will not let a
/// subcommand redefine): after `policy set`, a `--json` followed by a
/// value becomes `--policy-json`.
fn policy_json_args(mut argv: Vec<String>) -> Vec<String> {
    let Some(set) = argv
        .windows(2)
        .position(|w| w[0] == "policy" && w[1] == "set")
    else {
        return argv;
    };
    let mut i = set + 2;
    while i < argv.len() {
        if argv[i] == "--" {
            break;
        }
        if argv[i] == "--json" && argv.get(i + 1).is_some_and(|v| !v.starts_with("--")) {
            argv[i] = "--policy-json".into();
            i += 1;
        } else if let Some(v) = argv[i].strip_prefix("--json=") {
            argv[i] = format!("--policy-json={v}");
        }
        i += 1;
    }
    argv
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// Write a new random key file (mode 0600); give it to the I/O servers
    /// (--key-file) and to whoever mints credentials, and to nobody else.
    Generate {
        /// Where to write it (refuses to overwrite).
        #[arg(long)]
        out: std::path::PathBuf,
        /// The key's id, for rotation (servers accept every key in the file).
        #[arg(long, default_value = "k1")]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum CredentialCmd {
    /// Print a credential that lets one device attach one volume.
    Mint {
        /// The key file (vrio-ctl key generate).
        #[arg(long)]
        key_file: std::path::PathBuf,
        /// The device's name at the controller (its wire id is derived).
        #[arg(
            long,
            conflicts_with = "device_id",
            required_unless_present = "device_id"
        )]
        device: Option<String>,
        /// The device's numeric id (vrio-client --device-id, without a controller).
        #[arg(long)]
        device_id: Option<u64>,
        /// The volume its blk queues serve (net devices: any name, unused).
        #[arg(long, default_value = "default")]
        volume: String,
        /// rw (exclusive writer), ro, or shared (several writers).
        #[arg(long, default_value = "rw")]
        mode: vrio_core::tenancy::AccessMode,
        /// The VM host's IP address (`local` for unix: fabrics); empty: any.
        #[arg(long, default_value = "")]
        host: String,
        /// Hours until it expires (checked at attach time).
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
    },
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Record a volume at the controller (I/O servers that join with a
    /// volume directory create its image), or with --dir create the sparse
    /// raw image DIR/NAME.img.
    Create {
        /// 1 to 64 of [A-Za-z0-9._-], not starting with '.'.
        name: String,
        /// Size in MiB.
        #[arg(long)]
        size_mib: u64,
        /// Create the image in this directory instead (no controller).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// The controller's volumes and their grants, or with --dir the images
    /// in DIR.
    List {
        /// List the images in this directory instead (no controller).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Forget a volume at the controller (refused while it is granted,
    /// unless --force; server images are kept), or with --dir delete
    /// DIR/NAME.img (a server that has it open keeps serving it until its
    /// last queue detaches).
    Delete {
        /// The volume's name.
        name: String,
        /// Delete the image in this directory instead (no controller).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Also revoke the volume's grants.
        #[arg(long, conflicts_with = "dir")]
        force: bool,
    },
    /// Let a device attach a volume (controller). A device attaches one
    /// volume; granting the same one again changes mode and host.
    Grant {
        /// The volume's name.
        volume: String,
        /// The device's id at the controller.
        device: String,
        /// rw (exclusive writer), ro, or shared (several writers).
        #[arg(long, default_value = "rw")]
        mode: vrio_core::tenancy::AccessMode,
        /// The VM host's IP address (`local` for unix: fabrics); default:
        /// any host.
        #[arg(long)]
        host: Option<String>,
    },
    /// Take a grant back (controller). Credentials already issued stay
    /// valid until they expire.
    Revoke {
        /// The volume's name.
        volume: String,
        /// The device's id at the controller.
        device: String,
    },
}

/// println! that ends the program quietly when stdout is a closed pipe
/// (`vrio-ctl servers | head`). SIGPIPE stays ignored, as Rust sets it, so a
/// controller that drops the connection is an error, not a silent death.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

#[tokio::main]
async fn main() -> ExitCode {
    vrio_examples::init_tracing();
    let args = Args::parse_from(policy_json_args(std::env::args().collect()));
    if let Some(r) = local(&args) {
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vrio-ctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let tls = match args.tls.load() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vrio-ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let mut client = match connect_with(&args.addr, args.token.as_deref(), tls.as_ref()).await {
        Ok(c) => c,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                // tonic repeats each layer's text in its source; print it once.
                let text = s.to_string();
                if !msg.ends_with(&text) {
                    msg = format!("{msg}: {text}");
                }
                source = s.source();
            }
            if tls.is_none() {
                msg.push_str(
                    " (if the controller serves TLS, pass --tls-ca, --tls-cert and --tls-key)",
                );
            }
            eprintln!("vrio-ctl: {msg}");
            return ExitCode::FAILURE;
        }
    };
    match run(&mut client, &args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(s) => {
            eprintln!("vrio-ctl: {}", explain(&s));
            ExitCode::FAILURE
        }
    }
}

/// The subcommands that need no controller; None for the others.
fn local(args: &Args) -> Option<Result<(), String>> {
    use vrio_core::tenancy::{image_path, valid_volume_name, Keyring};
    let check_name = |n: &str| {
        if valid_volume_name(n) {
            Ok(())
        } else {
            Err(format!(
                "{n:?}: a volume name is 1 to 64 of [A-Za-z0-9._-], not starting with '.'"
            ))
        }
    };
    Some(match &args.cmd {
        Cmd::Key(KeyCmd::Generate { out, id }) => (|| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let text = Keyring::generate_file_text(id).map_err(|e| e.to_string())?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            f.write_all(text.as_bytes())
                .map_err(|e| format!("{}: {e}", out.display()))?;
            out!("wrote key {id} to {}", out.display());
            Ok(())
        })(),
        Cmd::Credential(CredentialCmd::Mint {
            key_file,
            device,
            device_id,
            volume,
            mode,
            host,
            ttl_hours,
        }) => (|| {
            let keys = Keyring::from_file(key_file).map_err(|e| e.to_string())?;
            let id = match (device, device_id) {
                (Some(name), _) => vrio_core::remote::device_key(name),
                (None, Some(id)) => *id,
                (None, None) => return Err("give --device or --device-id".into()),
            };
            let ttl = std::time::Duration::from_secs(ttl_hours.saturating_mul(3600));
            let token = keys
                .mint(id, volume, *mode, host, ttl)
                .map_err(|e| e.to_string())?;
            out!("{token}");
            Ok(())
        })(),
        Cmd::Volume(VolumeCmd::Create {
            dir: Some(dir),
            name,
            size_mib,
        }) => (|| {
            check_name(name)?;
            let path = image_path(dir, name);
            if path.exists() {
                return Err(format!("volume {name} exists ({})", path.display()));
            }
            let bytes = size_mib
                .checked_mul(1 << 20)
                .filter(|&b| b > 0)
                .ok_or("--size-mib must be at least 1")?;
            vrio_core::blk::FileBackend::create(&path, bytes)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            out!(
                "created volume {name}: {} ({size_mib} MiB, sparse)",
                path.display()
            );
            Ok(())
        })(),
        Cmd::Volume(VolumeCmd::List { dir: Some(dir) }) => (|| {
            let mut rows = Vec::new();
            for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
                let e = e.map_err(|e| e.to_string())?;
                let p = e.path();
                let Some(name) = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".img"))
                else {
                    continue;
                };
                if !valid_volume_name(name) {
                    continue;
                }
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                rows.push((name.to_string(), len));
            }
            rows.sort();
            if args.json {
                let v: Vec<Value> = rows
                    .iter()
                    .map(|(n, l)| json!({"name": n, "bytes": l}))
                    .collect();
                out!("{}", Value::Array(v));
            } else {
                out!("{:<32} {:>12}", "VOLUME", "MIB");
                for (n, l) in rows {
                    out!("{:<32} {:>12}", n, l >> 20);
                }
            }
            Ok(())
        })(),
        Cmd::Volume(VolumeCmd::Delete {
            dir: Some(dir),
            name,
            ..
        }) => (|| {
            check_name(name)?;
            let path = image_path(dir, name);
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            out!("deleted volume {name}");
            Ok(())
        })(),
        _ => return None,
    })
}

fn explain(s: &tonic::Status) -> String {
    let what = match s.code() {
        Code::Unauthenticated => "not authenticated (pass --token or set VRIO_TOKEN)",
        Code::PermissionDenied => "permission denied",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::InvalidArgument => "invalid request",
        Code::FailedPrecondition => "not possible now",
        Code::ResourceExhausted => "no capacity",
        Code::Unavailable => "controller unavailable",
        _ => "error",
    };
    let mut msg = format!("{what}: {}", s.message());
    // The transport's own words, once (tonic repeats each layer's text).
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let t = e.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        source = e.source();
    }
    if matches!(
        s.code(),
        Code::Unknown | Code::Cancelled | Code::Unavailable
    ) || msg.contains("transport error")
    {
        msg.push_str(
            " (the connection failed: is the address right, and does the controller \
             serve TLS? then pass --tls-ca, --tls-cert and --tls-key)",
        );
    }
    msg
}

async fn run(c: &mut Client, args: &Args) -> Result<(), tonic::Status> {
    match &args.cmd {
        Cmd::Servers => {
            let servers = c
                .list_servers(pb::ListServersRequest {})
                .await?
                .into_inner()
                .servers;
            if args.json {
                print_json(&Value::Array(servers.iter().map(server_json).collect()));
            } else {
                let now = vrio_control::service::now_ms();
                let rows = servers
                    .iter()
                    .map(|s| {
                        let state = match (s.alive, s.draining) {
                            (false, _) => "dead".to_string(),
                            (true, true) => "draining".to_string(),
                            (true, false) => "alive".to_string(),
                        };
                        let lease = if s.alive {
                            format!(
                                "{:.1}s",
                                s.lease_expires_unix_ms.saturating_sub(now) as f64 / 1e3
                            )
                        } else {
                            "-".into()
                        };
                        let busy: Vec<String> = s
                            .load
                            .iter()
                            .map(|l| format!("{:.0}%", l.busy * 100.0))
                            .collect();
                        let rps: f64 = s.load.iter().map(|l| l.requests_per_sec).sum();
                        vec![
                            s.id.clone(),
                            s.address.clone(),
                            state,
                            s.sidecores.to_string(),
                            format!("{}/{}", s.assigned_queues, s.capacity),
                            busy.join(" "),
                            format!("{rps:.0}"),
                            lease,
                        ]
                    })
                    .collect::<Vec<_>>();
                print_table(
                    &[
                        "SERVER",
                        "ADDRESS",
                        "STATE",
                        "SIDECORES",
                        "QUEUES",
                        "BUSY",
                        "REQ/S",
                        "LEASE",
                    ],
                    &rows,
                );
            }
        }
        Cmd::Devices => {
            let devices = c
                .list_devices(pb::ListDevicesRequest {})
                .await?
                .into_inner()
                .devices;
            if args.json {
                print_json(&Value::Array(devices.iter().map(device_json).collect()));
            } else {
                let rows = devices
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.clone(),
                            d.vm_id.clone(),
                            device_type(d.r#type).into(),
                            d.queues.to_string(),
                            d.agent_address.clone(),
                            dash(&d.pinned_server_id),
                        ]
                    })
                    .collect::<Vec<_>>();
                print_table(
                    &["DEVICE", "VM", "TYPE", "QUEUES", "AGENT", "PINNED"],
                    &rows,
                );
            }
        }
        Cmd::Assignments { device, server } => {
            let list = c
                .list_assignments(pb::ListAssignmentsRequest {
                    device_id: device.clone().unwrap_or_default(),
                    server_id: server.clone().unwrap_or_default(),
                })
                .await?
                .into_inner()
                .assignments;
            print_assignments(&list, args.json);
        }
        Cmd::Stats => {
            let s = c.stats(pb::StatsRequest {}).await?.into_inner();
            let v = json!({
                "servers": s.servers, "alive_servers": s.alive_servers, "devices": s.devices,
                "queues": s.queues, "unassigned_queues": s.unassigned_queues, "moves": s.moves,
                "failovers": s.failovers, "rebalance_moves": s.rebalance_moves,
                "uptime_ms": s.uptime_ms,
            });
            if args.json {
                print_json(&v);
            } else if let Value::Object(m) = v {
                let rows = m
                    .iter()
                    .map(|(k, v)| vec![k.clone(), v.to_string()])
                    .collect::<Vec<_>>();
                print_table(&["STAT", "VALUE"], &rows);
            }
        }
        Cmd::Move {
            device,
            queue,
            server,
            sidecore,
        } => {
            let a = c
                .move_queue(pb::MoveQueueRequest {
                    device_id: device.clone(),
                    queue: *queue,
                    server_id: server.clone(),
                    sidecore: *sidecore,
                })
                .await?
                .into_inner()
                .assignment
                .unwrap_or_default();
            print_assignments(&[a], args.json);
        }
        Cmd::Drain { server } => {
            let moved = c
                .drain_server(pb::DrainServerRequest {
                    server_id: server.clone(),
                })
                .await?
                .into_inner()
                .moved;
            print_assignments(&moved, args.json);
        }
        Cmd::Rebalance => {
            let moved = c
                .rebalance(pb::RebalanceRequest {})
                .await?
                .into_inner()
                .moved;
            print_assignments(&moved, args.json);
        }
        Cmd::Detach { device } => {
            c.detach_device(pb::DetachDeviceRequest {
                device_id: device.clone(),
            })
            .await?;
            if args.json {
                print_json(&json!({ "detached": device }));
            } else {
                out!("detached {device}");
            }
        }
        Cmd::Watch {
            device,
            server,
            count,
        } => {
            let mut stream = c
                .watch_assignments(pb::WatchAssignmentsRequest {
                    device_id: device.clone().unwrap_or_default(),
                    server_id: server.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            let mut seen = 0u64;
            if !args.json {
                out!(
                    "{:<9} {:<10} {:<20} {:<22} {:<22} GEN",
                    "EVENT",
                    "REASON",
                    "QUEUE",
                    "FROM",
                    "TO"
                );
            }
            while count.is_none_or(|n| seen < n) {
                let Some(e) = stream.message().await? else {
                    break;
                };
                seen += 1;
                let a = e.assignment.clone().unwrap_or_default();
                if args.json {
                    out!(
                        "{}",
                        json!({
                            "kind": event_kind(e.kind),
                            "reason": e.reason,
                            "assignment": assignment_json(&a),
                            "previous": e.previous.as_ref().map(assignment_json),
                        })
                    );
                } else {
                    let from = e.previous.as_ref().map(place).unwrap_or_else(|| "-".into());
                    out!(
                        "{:<9} {:<10} {:<20} {:<22} {:<22} {}",
                        event_kind(e.kind),
                        e.reason,
                        format!("{}/{}", a.device_id, a.queue),
                        from,
                        place(&a),
                        a.generation
                    );
                }
            }
        }
        Cmd::Volume(v) => volume(c, v, args.json).await?,
        Cmd::Policy(p) => policy(c, p, args.json).await?,
        Cmd::Top {
            interval,
            count,
            metrics,
            queues,
        } => top(c, args, *interval, *count, metrics, *queues).await?,
        // Handled by local() before connecting.
        Cmd::Key(_) | Cmd::Credential(_) => {}
    }
    Ok(())
}

/// `vrio-ctl top`: refreshes until `count` views were shown or Ctrl-C. A
/// failed controller call or scrape is shown in the view and retried at
/// the next refresh; the exit status is the last controller call's.
async fn top(
    c: &mut Client,
    args: &Args,
    interval: f64,
    count: Option<u64>,
    urls: &[String],
    max_queues: usize,
) -> Result<(), tonic::Status> {
    use std::io::{IsTerminal, Write};
    use std::time::Duration;
    use vrio_examples::top::{ControllerView, Target, View};
    if !(0.1..=3600.0).contains(&interval) {
        return Err(tonic::Status::invalid_argument(
            "--interval must be between 0.1 and 3600 seconds",
        ));
    }
    for u in urls {
        vrio_examples::top::split_url(u).map_err(tonic::Status::invalid_argument)?;
    }
    let interval = Duration::from_secs_f64(interval);
    // A call or a scrape gets at most the interval (and at least 1 s).
    let timeout = interval.max(Duration::from_secs(1));
    let tty = !args.json && std::io::stdout().is_terminal();
    let mut targets: Vec<Target> = urls.iter().cloned().map(Target::new).collect();
    let mut shown = 0u64;
    let mut last_error: Option<tonic::Status>;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let started = tokio::time::Instant::now();
        let scrapes: Vec<_> = urls
            .iter()
            .cloned()
            .map(|u| tokio::task::spawn_blocking(move || Target::scrape(&u, timeout)))
            .collect();
        let controller = tokio::time::timeout(timeout, async {
            let servers = c
                .list_servers(pb::ListServersRequest {})
                .await?
                .into_inner()
                .servers;
            let assignments = c
                .list_assignments(pb::ListAssignmentsRequest::default())
                .await?
                .into_inner()
                .assignments;
            Ok::<_, tonic::Status>(ControllerView {
                servers,
                assignments,
            })
        })
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no answer from {} within {timeout:?}",
                args.addr
            )))
        });
        for (t, h) in targets.iter_mut().zip(scrapes) {
            t.record(h.await.unwrap_or_else(|e| Err(e.to_string())));
        }
        let view_controller = match controller {
            Ok(v) => {
                last_error = None;
                Ok(v)
            }
            Err(s) => {
                let text = explain(&s);
                last_error = Some(s);
                Err(text)
            }
        };
        let view = View {
            controller_addr: &args.addr,
            interval,
            now_ms: vrio_control::service::now_ms(),
            controller: &view_controller,
            targets: &targets,
            max_queues,
        };
        if args.json {
            out!("{}", view.to_json());
        } else {
            let text = view.render_text();
            let mut o = std::io::stdout().lock();
            let written = if tty {
                // Home, clear the screen, draw.
                write!(o, "\x1b[H\x1b[2J{text}")
            } else {
                if shown > 0 {
                    let _ = writeln!(o);
                }
                write!(o, "{text}")
            };
            if written.and_then(|()| o.flush()).is_err() {
                std::process::exit(0);
            }
        }
        shown += 1;
        if count.is_some_and(|n| shown >= n) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + interval) => {}
            _ = &mut ctrl_c => break,
        }
    }
    match last_error {
        Some(s) => Err(s),
        None => Ok(()),
    }
}

/// The volume subcommands that talk to the controller (those without
/// --dir; local() ran the others).
async fn volume(c: &mut Client, cmd: &VolumeCmd, json: bool) -> Result<(), tonic::Status> {
    match cmd {
        VolumeCmd::Create {
            dir: None,
            name,
            size_mib,
        } => {
            let size_bytes = size_mib
                .checked_mul(1 << 20)
                .filter(|&b| b > 0)
                .ok_or_else(|| tonic::Status::invalid_argument("--size-mib must be at least 1"))?;
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    size_bytes,
                })
                .await?
                .into_inner()
                .volume
                .unwrap_or_default();
            if json {
                print_json(&volume_json(&v));
            } else {
                out!("created volume {} ({} MiB)", v.name, mib(v.size_bytes));
            }
        }
        VolumeCmd::List { dir: None } => {
            let volumes = c
                .list_volumes(pb::ListVolumesRequest {})
                .await?
                .into_inner()
                .volumes;
            if json {
                print_json(&Value::Array(volumes.iter().map(volume_json).collect()));
            } else {
                let mut rows = Vec::new();
                for v in &volumes {
                    let size = mib(v.size_bytes);
                    if v.grants.is_empty() {
                        rows.push(vec![
                            v.name.clone(),
                            size.clone(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                        ]);
                    }
                    for g in &v.grants {
                        rows.push(vec![
                            v.name.clone(),
                            size.clone(),
                            g.device_id.clone(),
                            mode_name(g.mode).into(),
                            host_name(&g.host),
                        ]);
                    }
                }
                print_table(&["VOLUME", "MIB", "DEVICE", "MODE", "HOST"], &rows);
            }
        }
        VolumeCmd::Delete {
            dir: None,
            name,
            force,
        } => {
            let revoked = c
                .delete_volume(pb::DeleteVolumeRequest {
                    name: name.clone(),
                    force: *force,
                })
                .await?
                .into_inner()
                .revoked;
            if json {
                print_json(&json!({
                    "deleted": name,
                    "revoked": revoked.iter().map(grant_json).collect::<Vec<_>>(),
                }));
            } else {
                for g in &revoked {
                    out!("revoked volume {} from device {}", g.volume, g.device_id);
                }
                out!("deleted volume {name} (images on the I/O servers are kept)");
            }
        }
        VolumeCmd::Grant {
            volume,
            device,
            mode,
            host,
        } => {
            let mode = match mode {
                vrio_core::tenancy::AccessMode::ReadWrite => pb::AccessMode::Rw,
                vrio_core::tenancy::AccessMode::ReadOnly => pb::AccessMode::Ro,
                vrio_core::tenancy::AccessMode::Shared => pb::AccessMode::Shared,
            };
            let g = c
                .grant_volume(pb::GrantVolumeRequest {
                    volume: volume.clone(),
                    device_id: device.clone(),
                    mode: mode as i32,
                    host: host.clone().unwrap_or_default(),
                })
                .await?
                .into_inner()
                .grant
                .unwrap_or_default();
            if json {
                print_json(&grant_json(&g));
            } else {
                out!(
                    "granted volume {} to device {} ({}, from {})",
                    g.volume,
                    g.device_id,
                    mode_name(g.mode),
                    host_name(&g.host)
                );
            }
        }
        VolumeCmd::Revoke { volume, device } => {
            let g = c
                .revoke_grant(pb::RevokeGrantRequest {
                    volume: volume.clone(),
                    device_id: device.clone(),
                })
                .await?
                .into_inner()
                .revoked
                .unwrap_or_default();
            if json {
                print_json(&json!({ "revoked": grant_json(&g) }));
            } else {
                out!("revoked volume {} from device {}", g.volume, g.device_id);
            }
        }
        // With --dir: handled by local() before connecting.
        VolumeCmd::Create { dir: Some(_), .. }
        | VolumeCmd::List { dir: Some(_) }
        | VolumeCmd::Delete { dir: Some(_), .. } => {}
    }
    Ok(())
}

/// The policy subcommands.
async fn policy(c: &mut Client, cmd: &PolicyCmd, json: bool) -> Result<(), tonic::Status> {
    let (device, text) = match cmd {
        PolicyCmd::Show { device } => return policy_show(c, device, json).await,
        PolicyCmd::Clear { device } => (device, String::new()),
        PolicyCmd::Set {
            device,
            file,
            policy_json,
        } => {
            let text = match (file, policy_json) {
                (Some(f), _) => read_policy_file(f)?,
                (None, Some(j)) => j.clone(),
                (None, None) => {
                    return Err(tonic::Status::invalid_argument(
                        "give the policy with --file FILE or --json JSON \
                         (vrio-ctl policy set --help explains it)",
                    ))
                }
            };
            (device, text)
        }
    };
    let r = c
        .set_device_policy(pb::SetDevicePolicyRequest {
            device: device.clone(),
            policy_json: text,
        })
        .await?
        .into_inner();
    let policy: Value = if r.policy_json.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&r.policy_json).unwrap_or(Value::Null)
    };
    if json {
        print_json(&json!({
            "device": device, "version": r.version, "cleared": r.cleared, "policy": policy,
        }));
    } else if r.cleared {
        out!(
            "cleared the policy of device {device} (version {})",
            r.version
        );
    } else {
        let summary = vrio_core::interpose::PolicySpec::parse(&r.policy_json)
            .map(|p| p.summary())
            .unwrap_or_default();
        out!(
            "set the policy of device {device} (version {}): {summary}",
            r.version
        );
    }
    Ok(())
}

/// The policy text of `--file` (`-`: stdin).
fn read_policy_file(f: &std::path::Path) -> Result<String, tonic::Status> {
    use std::io::Read;
    let mut text = String::new();
    let read = if f.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).map(drop)
    } else {
        std::fs::File::open(f).and_then(|mut h| h.read_to_string(&mut text).map(drop))
    };
    read.map_err(|e| tonic::Status::invalid_argument(format!("--file {}: {e}", f.display())))?;
    Ok(text)
}

/// Quantile `q` of `h` as a bucket bound, short: `50us`, `2.5ms`, `1s`;
/// `>10s` in the last bucket (above the last bound), `-` when empty.
fn latency_text(h: &vrio_core::interpose::LatencyHistogram, q: f64) -> String {
    match h.quantile(q) {
        None => "-".into(),
        Some(s) if s.is_infinite() => {
            format!(">{}s", h.bounds.last().copied().unwrap_or(0.0))
        }
        Some(s) if s < 1e-3 => format!("{}us", (s * 1e6 * 100.0).round() / 100.0),
        Some(s) if s < 1.0 => format!("{}ms", (s * 1e3 * 100.0).round() / 100.0),
        Some(s) => format!("{s}s"),
    }
}

/// Requests, bytes and errors by op of a meter stage, for the ops it saw.
fn meter_ops(r: &vrio_core::interpose::StageReport) -> Vec<(String, [u64; 3])> {
    let mut ops: Vec<String> = Vec::new();
    for c in &r.counters {
        if !ops.contains(&c.label) {
            ops.push(c.label.clone());
        }
    }
    ops.into_iter()
        .map(|op| {
            let v = [
                r.counter("requests", &op),
                r.counter("bytes", &op),
                r.counter("errors", &op),
            ];
            (op, v)
        })
        .filter(|(_, v)| v.iter().any(|&n| n > 0))
        .collect()
}

fn stage_json(r: &vrio_core::interpose::StageReport) -> Value {
    let mut v = json!({
        "kind": r.kind,
        "counters": r.counters.iter().map(|c| json!({
            "name": c.name, "label": c.label, "value": c.value,
        })).collect::<Vec<_>>(),
    });
    if let Some(h) = &r.latency {
        v["latency"] = json!({
            "bounds": h.bounds, "counts": h.counts, "sum": h.sum, "count": h.count(),
            // null when empty, or in the last (+Inf) bucket.
            "p50_s": h.quantile(0.5).filter(|q| q.is_finite()),
            "p99_s": h.quantile(0.99).filter(|q| q.is_finite()),
        });
    }
    if r.kind == "meter" {
        let ops: serde_json::Map<String, Value> = meter_ops(r)
            .into_iter()
            .map(|(op, [requests, bytes, errors])| {
                (
                    op,
                    json!({"requests": requests, "bytes": bytes, "errors": errors}),
                )
            })
            .collect();
        v["ops"] = Value::Object(ops);
    }
    v
}

async fn policy_show(c: &mut Client, device: &str, json: bool) -> Result<(), tonic::Status> {
    let r = c
        .get_device_policy(pb::GetDevicePolicyRequest {
            device: device.to_string(),
        })
        .await?
        .into_inner();
    let policy: Value = serde_json::from_str(&r.policy_json).unwrap_or(Value::Null);
    let servers: Vec<(String, u64, Vec<vrio_core::interpose::StageReport>)> = r
        .reports
        .iter()
        .map(|s| {
            (
                s.server_id.clone(),
                s.reported_unix_ms,
                s.stages
                    .iter()
                    .map(vrio_control::policy::report_from_pb)
                    .collect(),
            )
        })
        .collect();
    if json {
        print_json(&json!({
            "device": r.device,
            "version": r.version,
            "policy": policy,
            "servers": servers.iter().map(|(id, at, stages)| json!({
                "server": id,
                "reported_unix_ms": at,
                "stages": stages.iter().map(stage_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    out!("device {} policy version {}", r.device, r.version);
    out!(
        "{}",
        serde_json::to_string_pretty(&policy).unwrap_or_else(|_| r.policy_json.clone())
    );
    if servers.is_empty() {
        out!("no live I/O server has reported the device's stages yet");
    }
    let now = vrio_control::service::now_ms();
    for (id, at, stages) in &servers {
        out!("");
        out!(
            "server {id} (reported {:.1}s ago)",
            now.saturating_sub(*at) as f64 / 1e3
        );
        for (i, st) in stages.iter().enumerate() {
            out!("  stage {i}: {}", st.kind);
            if st.kind == "meter" {
                let ops = meter_ops(st);
                if ops.is_empty() {
                    out!("    no requests yet");
                } else {
                    let rows: Vec<Vec<String>> = ops
                        .iter()
                        .map(|(op, [requests, bytes, errors])| {
                            vec![
                                format!("    {op}"),
                                requests.to_string(),
                                bytes.to_string(),
                                errors.to_string(),
                            ]
                        })
                        .collect();
                    print_table(&["    OP", "REQUESTS", "BYTES", "ERRORS"], &rows);
                }
            } else if st.counters.is_empty() {
                out!("    no counters");
            } else {
                let rows: Vec<Vec<String>> = st
                    .counters
                    .iter()
                    .map(|c| {
                        vec![
                            format!("    {}", c.name),
                            dash(&c.label),
                            c.value.to_string(),
                        ]
                    })
                    .collect();
                print_table(&["    COUNTER", "LABEL", "VALUE"], &rows);
            }
            if let Some(h) = &st.latency {
                out!(
                    "    latency: p50 {}  p99 {}  ({} requests)",
                    latency_text(h, 0.5),
                    latency_text(h, 0.99),
                    h.count()
                );
            }
        }
    }
    Ok(())
}

/// Bytes as MiB: whole when exact, else with two decimals.
fn mib(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        (bytes >> 20).to_string()
    } else {
        format!("{:.2}", bytes as f64 / f64::from(1u32 << 20))
    }
}

fn mode_name(m: i32) -> &'static str {
    match pb::AccessMode::try_from(m) {
        Ok(pb::AccessMode::Rw) => "rw",
        Ok(pb::AccessMode::Ro) => "ro",
        Ok(pb::AccessMode::Shared) => "shared",
        _ => "unknown",
    }
}

fn host_name(h: &str) -> String {
    if h.is_empty() {
        "any".into()
    } else {
        h.into()
    }
}

fn grant_json(g: &pb::VolumeGrant) -> Value {
    json!({
        "volume": g.volume, "device": g.device_id, "mode": mode_name(g.mode),
        "host": if g.host.is_empty() { Value::Null } else { json!(g.host) },
    })
}

fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "name": v.name, "size_bytes": v.size_bytes,
        "grants": v.grants.iter().map(grant_json).collect::<Vec<_>>(),
    })
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

fn place(a: &pb::Assignment) -> String {
    if a.server_id.is_empty() {
        "(unassigned)".into()
    } else {
        format!("{}:{}", a.server_id, a.sidecore)
    }
}

fn device_type(t: i32) -> &'static str {
    match pb::DeviceType::try_from(t) {
        Ok(pb::DeviceType::Blk) => "blk",
        Ok(pb::DeviceType::Net) => "net",
        _ => "unknown",
    }
}

fn event_kind(k: i32) -> &'static str {
    match pb::EventKind::try_from(k) {
        Ok(pb::EventKind::Snapshot) => "snapshot",
        Ok(pb::EventKind::Assigned) => "assigned",
        Ok(pb::EventKind::Moved) => "moved",
        Ok(pb::EventKind::Removed) => "removed",
        _ => "unknown",
    }
}

fn assignment_json(a: &pb::Assignment) -> Value {
    json!({
        "device": a.device_id, "queue": a.queue,
        "server": if a.server_id.is_empty() { Value::Null } else { json!(a.server_id) },
        "sidecore": a.sidecore, "generation": a.generation,
    })
}

fn server_json(s: &pb::IoServer) -> Value {
    json!({
        "id": s.id, "address": s.address, "sidecores": s.sidecores, "capacity": s.capacity,
        "assigned_queues": s.assigned_queues, "alive": s.alive, "draining": s.draining,
        "lease_expires_unix_ms": s.lease_expires_unix_ms,
        "load": s.load.iter().map(|l| json!({
            "sidecore": l.sidecore, "busy": l.busy, "requests_per_sec": l.requests_per_sec,
        })).collect::<Vec<_>>(),
    })
}

fn device_json(d: &pb::Device) -> Value {
    json!({
        "id": d.id, "vm_id": d.vm_id, "type": device_type(d.r#type), "queues": d.queues,
        "agent_address": d.agent_address,
        "pinned_server": if d.pinned_server_id.is_empty() { Value::Null } else { json!(d.pinned_server_id) },
    })
}

fn print_assignments(list: &[pb::Assignment], json: bool) {
    if json {
        print_json(&Value::Array(list.iter().map(assignment_json).collect()));
        return;
    }
    let rows = list
        .iter()
        .map(|a| {
            vec![
                a.device_id.clone(),
                a.queue.to_string(),
                dash(&a.server_id),
                if a.server_id.is_empty() {
                    "-".into()
                } else {
                    a.sidecore.to_string()
                },
                a.generation.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    print_table(&["DEVICE", "QUEUE", "SERVER", "SIDECORE", "GEN"], &rows);
}

fn print_json(v: &Value) {
    out!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
