//! The binaries' command-line side of the control plane: TLS flags, and the
//! lines they print for moves and failovers. The glue itself (register,
//! place, follow) is in vrio-control ([`vrio_control::io_server`],
//! [`vrio_control::vm_host`]).

use vrio_control::tls::{ClientTls, TlsError, TlsFiles};
use vrio_control::QueueMoved;

/// Command-line flags for mutual TLS to the controller, shared by the
/// binaries that talk to it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signed the controller's certificate; turns
    /// TLS on, together with --tls-cert and --tls-key.
    #[arg(long, env = "VRIO_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), signed by the controller's client CA.
    #[arg(long, env = "VRIO_TLS_CERT", requires = "tls_ca")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "VRIO_TLS_KEY", requires = "tls_ca")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Name the controller's certificate carries.
    #[arg(long, env = "VRIO_TLS_DOMAIN", default_value = "localhost")]
    pub tls_domain: String,
}

/// Why [`TlsArgs::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsArgsError {
    /// Only some of the three files were given (possible through the
    /// environment, which clap's `requires` does not see).
    #[error("--tls-ca, --tls-cert and --tls-key go together")]
    Incomplete,
    /// The files could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl TlsArgs {
    /// The client TLS these flags name; None when TLS is off.
    pub fn load(&self) -> Result<Option<ClientTls>, TlsArgsError> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => {
                let f = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                };
                Ok(Some(ClientTls::load(&f, &self.tls_domain)?))
            }
            (None, None, None) => Ok(None),
            _ => Err(TlsArgsError::Incomplete),
        }
    }
}

/// One line per completed move or failover, for logs and tests (they count
/// `agent: moved:` and `agent: failover:` lines).
pub fn move_line(m: &QueueMoved) -> String {
    let (device, queue, to, r) = (&m.device, m.queue, &m.to, &m.report);
    match r.down {
        Some(down) => format!(
            "agent: failover: device {device} queue {queue} resumed on {} sidecore {} at ring index {} after {} ms without a server",
            to.server, to.sidecore, r.resumed_at, down.as_millis()
        ),
        None => format!(
            "agent: moved: device {device} queue {queue} to {} sidecore {} at ring index {} in {} ms",
            to.server, to.sidecore, r.resumed_at, r.took.as_millis()
        ),
    }
}

/// Prints [`move_line`] on stdout: the binaries' `on_move` callback for
/// [`vrio_control::follow_placement`].
pub fn print_move(m: QueueMoved) {
    println!("{}", move_line(&m));
}
