//! Mutual TLS (rustls, through tonic) between the controller and everyone
//! who talks to it: the controller proves itself with its certificate, and
//! accepts only clients whose certificate its CA signed. The bearer token
//! still authorises each call on top.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why loading TLS files failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no PEM block.
    #[error("{0} is not PEM")]
    NotPem(PathBuf),
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let b = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !b.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem(path.to_path_buf()));
    }
    Ok(b)
}

/// PEM files: a certificate and its key, and the CA that signs the peers.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This side's certificate (PEM).
    pub cert: PathBuf,
    /// The certificate's private key (PEM).
    pub key: PathBuf,
    /// The CA that signs the peers' certificates (PEM).
    pub ca: PathBuf,
}

/// The controller's side: its identity, and the CA its clients' certificates
/// must chain to (client certificates are required).
#[derive(Clone)]
pub struct ServerTls(ServerTlsConfig);

impl ServerTls {
    /// Reads the controller's certificate and key and the clients' CA.
    /// Fails if a file is unreadable or not PEM.
    pub fn load(f: &TlsFiles) -> Result<Self, TlsError> {
        let id = Identity::from_pem(read_pem("certificate", &f.cert)?, read_pem("key", &f.key)?);
        let ca = Certificate::from_pem(read_pem("client CA", &f.ca)?);
        Ok(Self(
            ServerTlsConfig::new()
                .identity(id)
                .client_ca_root(ca)
                .client_auth_optional(false),
        ))
    }

    /// The tonic server configuration (a copy).
    pub fn config(&self) -> ServerTlsConfig {
        self.0.clone()
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls(mutual)")
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

/// A client's side: the CA that signed the controller's certificate, and the
/// client's own identity.
#[derive(Clone)]
pub struct ClientTls(ClientTlsConfig);

impl ClientTls {
    /// `domain` is the name the controller's certificate carries (default
    /// in vrio's tools: `localhost`).
    pub fn load(f: &TlsFiles, domain: &str) -> Result<Self, TlsError> {
        let id = Identity::from_pem(read_pem("certificate", &f.cert)?, read_pem("key", &f.key)?);
        let ca = Certificate::from_pem(read_pem("CA", &f.ca)?);
        Ok(Self(
            ClientTlsConfig::new()
                .ca_certificate(ca)
                .identity(id)
                .domain_name(domain),
        ))
    }

    /// Trusts `ca` but presents no certificate (the controller refuses it;
    /// for tests and diagnostics).
    pub fn anonymous(ca: &Path, domain: &str) -> Result<Self, TlsError> {
        let ca = Certificate::from_pem(read_pem("CA", ca)?);
        Ok(Self(
            ClientTlsConfig::new()
                .ca_certificate(ca)
                .domain_name(domain),
        ))
    }

    /// The tonic client configuration (a copy).
    pub fn config(&self) -> ClientTlsConfig {
        self.0.clone()
    }
}
