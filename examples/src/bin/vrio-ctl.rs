//! vrio-ctl: operator CLI for vrio-controller.
//!
//!   vrio-ctl servers | devices | assignments | stats   [--json]
//!   vrio-ctl move DEVICE QUEUE SERVER SIDECORE
//!   vrio-ctl drain SERVER
//!   vrio-ctl watch [--count N]
//!
//! Data-plane tenancy (local: no controller needed):
//!   vrio-ctl key generate --out FILE
//!   vrio-ctl credential mint --key-file FILE (--device NAME | --device-id N) --volume V [--mode rw|ro|shared]
//!   vrio-ctl volume create|list|delete --dir DIR ...

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
    /// Data-plane keys I/O servers check attach credentials with (local).
    #[command(subcommand)]
    Key(KeyCmd),
    /// Attach credentials for VM hosts (local; needs the key file).
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// Raw-image volumes in a server's --volume-dir (local).
    #[command(subcommand)]
    Volume(VolumeCmd),
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
    /// Create a sparse raw image DIR/NAME.img.
    Create {
        #[arg(long)]
        dir: std::path::PathBuf,
        name: String,
        #[arg(long)]
        size_mib: u64,
    },
    /// List the images in DIR.
    List {
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// Delete DIR/NAME.img (a server that has it open keeps serving it
    /// until its last queue detaches).
    Delete {
        #[arg(long)]
        dir: std::path::PathBuf,
        name: String,
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
    let args = Args::parse();
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
            dir,
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
        Cmd::Volume(VolumeCmd::List { dir }) => (|| {
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
        Cmd::Volume(VolumeCmd::Delete { dir, name }) => (|| {
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
        // Handled by local() before connecting.
        Cmd::Key(_) | Cmd::Credential(_) | Cmd::Volume(_) => {}
    }
    Ok(())
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
