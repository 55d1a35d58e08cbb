//! vrio-controller: the control-plane daemon. Prints the bound address as its
//! first stdout line (so `--listen 127.0.0.1:0` works for scripts and tests);
//! with `--metrics-listen`, a `vrio-controller: metrics listening on
//! http://ADDR/metrics` line follows.

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use vrio_control::metrics::RpcMetrics;
use vrio_control::placement::LeastLoaded;
use vrio_control::server::{serve_observed, ServeOptions};
use vrio_control::store::{FileStore, MemoryStore, StateStore};
use vrio_control::{Controller, ControllerConfig, CredentialConfig};
use vrio_core::tenancy::Keyring;
use vrio_examples::metrics::{ControllerMetrics, ControllerSlot, ObsArgs};

#[derive(Parser, Debug)]
#[command(
    about = "vrio control plane: places guest queues on I/O server sidecores",
    after_help = "Metrics: vrio-controller --metrics-listen 127.0.0.1:9102   (Prometheus: http://127.0.0.1:9102/metrics)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7470")]
    listen: String,
    /// Directory of the crash-safe state snapshot.
    #[arg(
        long,
        default_value = "vrio-controller-state",
        conflicts_with = "memory"
    )]
    state_dir: PathBuf,
    /// Keep state in memory only (lost on exit).
    #[arg(long)]
    memory: bool,
    /// Serve mutual TLS with this certificate (PEM); needs --tls-key and
    /// --tls-client-ca. Clients must present a certificate that CA signed.
    #[arg(long, env = "VRIO_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "VRIO_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signs the certificates of servers, agents and operators.
    #[arg(long, env = "VRIO_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Keep state in etcd (comma-separated endpoints) and serve only while
    /// leader of the etcd election; standbys wait their turn.
    #[cfg(feature = "etcd")]
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["memory", "state_dir"])]
    etcd: Vec<String>,
    /// etcd lease TTL in seconds: how long a crashed leader blocks takeover.
    #[cfg(feature = "etcd")]
    #[arg(long, default_value_t = 3)]
    etcd_lease_secs: i64,
    /// Bearer token clients must present.
    #[arg(long, env = "VRIO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Run without authentication (only for isolated test setups).
    #[arg(long, conflicts_with = "token")]
    insecure: bool,
    /// Server lease length; a server that does not renew within it is failed over.
    #[arg(long, default_value_t = 10_000)]
    lease_ttl_ms: u64,
    /// How often leases are checked.
    #[arg(long, default_value_t = 500)]
    tick_ms: u64,
    /// Rebalance period in seconds; 0 turns periodic rebalancing off.
    #[arg(long, default_value_t = 5)]
    rebalance_secs: u64,
    /// Rebalance only when sidecore scores differ by more than this.
    #[arg(long, default_value_t = 0.2)]
    rebalance_threshold: f64,
    /// A queue is not rebalanced again within this many seconds.
    #[arg(long, default_value_t = 10)]
    rebalance_cooldown_secs: u64,
    /// Data-plane key file (`vrio-ctl key generate`; the file the I/O
    /// servers get as --key-file). With it, AttachDevice answers with a
    /// signed attach credential, and a blk device attaches only once it is
    /// granted a volume (`vrio-ctl volume grant VOLUME DEVICE`).
    #[arg(long, env = "VRIO_DATA_KEY")]
    data_key: Option<PathBuf>,
    /// How long an attach credential is valid, in seconds (servers check it
    /// when a queue attaches; it also bounds how long a revoked grant still
    /// lets a device attach).
    #[arg(long, default_value_t = 24 * 3600, requires = "data_key")]
    credential_ttl_secs: u64,
    #[command(flatten)]
    obs: ObsArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    vrio_examples::init_tracing_as(args.obs.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrio-controller: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    // First, so that a taken address fails before anything starts. A
    // standby (etcd) serves it too, with vrio_controller_leader 0.
    let metrics_listener = args.obs.bind_metrics().map_err(|e| e.to_string())?;
    let slot = ControllerSlot::default();
    let rpc = Arc::new(RpcMetrics::new());
    let metrics = match metrics_listener {
        Some(l) => Some(
            l.serve(
                "vrio-controller",
                ControllerMetrics::new(slot.clone(), rpc.clone()),
            )
            .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let token = match (args.token, args.insecure) {
        (Some(t), _) if t.is_empty() => return Err("--token / VRIO_TOKEN is empty".into()),
        (Some(t), _) => Some(t),
        (None, true) => None,
        (None, false) => {
            return Err("set --token or VRIO_TOKEN (or --insecure to run without auth)".into())
        }
    };
    #[cfg(feature = "etcd")]
    let mut leadership = None;
    let store: Box<dyn StateStore> = if args.memory {
        Box::new(MemoryStore::default())
    } else {
        #[cfg(feature = "etcd")]
        if !args.etcd.is_empty() {
            use vrio_control::store_etcd::{campaign, EtcdStore};
            tracing::info!(endpoints = ?args.etcd, "campaigning for leadership");
            let lead = campaign(
                args.etcd.clone(),
                "/vrio/controller/leader",
                &args.listen,
                args.etcd_lease_secs,
            )
            .await
            .map_err(|e| e.to_string())?;
            let fence = Some(lead.fence.clone());
            leadership = Some(lead);
            Box::new(
                EtcdStore::connect(args.etcd.clone(), "/vrio/controller/state", fence)
                    .map_err(|e| e.to_string())?,
            )
        } else {
            Box::new(FileStore::open(&args.state_dir).map_err(|e| e.to_string())?)
        }
        #[cfg(not(feature = "etcd"))]
        Box::new(FileStore::open(&args.state_dir).map_err(|e| e.to_string())?)
    };
    let credentials = match &args.data_key {
        Some(path) => {
            let keys = Keyring::from_file(path).map_err(|e| e.to_string())?;
            if args.credential_ttl_secs == 0 {
                return Err("--credential-ttl-secs must be at least 1".into());
            }
            tracing::info!(
                ttl_secs = args.credential_ttl_secs,
                "signing attach credentials; blk devices need a volume grant"
            );
            Some(CredentialConfig {
                keys: Arc::new(keys),
                ttl: Duration::from_secs(args.credential_ttl_secs),
            })
        }
        None => None,
    };
    let policy = LeastLoaded {
        threshold: args.rebalance_threshold,
        cooldown_ms: args.rebalance_cooldown_secs.saturating_mul(1000),
        ..LeastLoaded::default()
    };
    let ctrl = Controller::open(
        ControllerConfig {
            lease_ttl_ms: args.lease_ttl_ms,
            credentials,
            ..ControllerConfig::default()
        },
        store,
        Box::new(policy),
        vrio_control::service::now_ms(),
    )
    .map_err(|e| format!("cannot recover state: {e}"))?;
    let ctrl = Arc::new(ctrl);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{addr}").map_err(|e| e.to_string())?;
        if let Some(m) = &metrics {
            writeln!(
                out,
                "vrio-controller: metrics listening on http://{}/metrics",
                m.addr()
            )
            .map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    tracing::info!(%addr, "vrio-controller listening");
    // Leading and serving: the state metrics appear.
    let _ = slot.set(ctrl.clone());
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(
            vrio_control::tls::ServerTls::load(&vrio_control::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })
            .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let opts = ServeOptions {
        tls,
        token,
        tick: Duration::from_millis(args.tick_ms.max(1)),
        rebalance_every: (args.rebalance_secs > 0)
            .then(|| Duration::from_secs(args.rebalance_secs)),
    };
    let shutdown = async {
        #[cfg(feature = "etcd")]
        if let Some(mut lead) = leadership {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    let _ = lead.resign().await;
                }
                _ = lead.lost() => {
                    // Another controller may already lead: stop serving now.
                    eprintln!("vrio-controller: lost etcd leadership, exiting");
                    std::process::exit(3);
                }
            }
            tracing::info!("shutting down");
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    let out = serve_observed(listener, ctrl, opts, rpc, shutdown)
        .await
        .map_err(|e| e.to_string());
    drop(metrics);
    out
}
