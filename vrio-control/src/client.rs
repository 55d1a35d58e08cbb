//! Connecting to the controller with a bearer token, over plain HTTP/2 or
//! mutual TLS.

use crate::auth::AddToken;
use crate::pb::control_client::ControlClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub type Client = ControlClient<InterceptedService<Channel, AddToken>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad controller address {addr}: {source}")]
    Address {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot reach controller at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    Token(tonic::Status),
    #[error("TLS setup for {addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to `addr` (`host:port` or `http://host:port`).
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
