//! Connecting to the controller with a bearer token, over plain HTTP/2 or
//! mutual TLS.

use std::collections::HashMap;

use crate::auth::AddToken;
use crate::pb;
use crate::pb::control_client::ControlClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A connected gRPC client of the `Control` service that sends the bearer
/// token with every call.
pub type Client = ControlClient<InterceptedService<Channel, AddToken>>;

/// Why [`connect`] or [`connect_with`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not a valid URI.
    #[error("bad controller address {addr}: {source}")]
    Address {
        /// The address as given.
        addr: String,
        /// The parse error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The controller could not be reached.
    #[error("cannot reach controller at {addr}: {source}")]
    Connect {
        /// The address as given.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The token cannot be sent as an HTTP header.
    #[error("{0}")]
    Token(tonic::Status),
    /// The TLS configuration was refused.
    #[error("TLS setup for {addr}: {source}")]
    Tls {
        /// The address as given.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to `addr` (`host:port` or `http://host:port`) over plain HTTP/2;
/// `token` (if any) is sent as `authorization: Bearer <token>`.
pub async fn connect(addr: &str, token: Option<&str>) -> Result<Client, ConnectError> {
    connect_with(addr, token, None).await
}

/// Connects to `addr`, over mutual TLS when `tls` is given.
pub async fn connect_with(
    addr: &str,
    token: Option<&str>,
    tls: Option<&crate::tls::ClientTls>,
) -> Result<Client, ConnectError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = match addr.split_once("://") {
        Some((_, rest)) => format!("{scheme}://{rest}"),
        None => format!("{scheme}://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|source| ConnectError::Address {
        addr: addr.to_string(),
        source,
    })?;
    if let Some(t) = tls {
        endpoint = endpoint
            .tls_config(t.config())
            .map_err(|source| ConnectError::Tls {
                addr: addr.to_string(),
                source,
            })?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ConnectError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let auth = AddToken::new(token).map_err(ConnectError::Token)?;
    Ok(ControlClient::with_interceptor(channel, auth))
}

/// How to reach the controller: what every long-lived follower (I/O server,
/// VM host) keeps so it can connect again after the controller restarts.
#[derive(Clone)]
pub struct ControlOpts {
    /// `host:port` or `http://host:port`.
    pub addr: String,
    /// Bearer token, if the controller wants one.
    pub token: Option<String>,
    /// Mutual TLS; None for plain HTTP/2.
    pub tls: Option<crate::tls::ClientTls>,
}

impl ControlOpts {
    /// Connects once, with the token and TLS these options name.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        connect_with(&self.addr, self.token.as_deref(), self.tls.as_ref()).await
    }
}

/// Every registered server: id to (fabric address, lease alive). Followers
/// need the address, the controller's assignments only name the id.
pub(crate) async fn server_addresses(
    client: &mut Client,
) -> Result<HashMap<String, (String, bool)>, tonic::Status> {
    let r = client
        .list_servers(pb::ListServersRequest {})
        .await?
        .into_inner();
    Ok(r.servers
        .into_iter()
        .map(|s| (s.id, (s.address, s.alive)))
        .collect())
}
