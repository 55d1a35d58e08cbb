//! Connecting to the controller with a bearer token.

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
}

/// Connects to `addr` (`host:port` or `http://host:port`).
pub async fn connect(addr: &str, token: Option<&str>) -> Result<Client, ConnectError> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|source| ConnectError::Address {
        addr: addr.to_string(),
        source,
    })?;
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
