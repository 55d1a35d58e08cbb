//! Stream sockets for the soft fabric: TCP (`host:port`) or Unix
//! (`unix:/path`, or any address starting with `/`), plus the HELLO handshake.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::wire::{Header, HEADER_LEN};
use crate::api::FabricError;

/// How long connect and accept wait for the peer's HELLO.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

enum Addr {
    Tcp(String),
    Unix(PathBuf),
}

fn parse(addr: &str) -> Addr {
    if let Some(p) = addr.strip_prefix("unix:") {
        Addr::Unix(PathBuf::from(p))
    } else if addr.starts_with('/') {
        Addr::Unix(PathBuf::from(addr))
    } else {
        Addr::Tcp(addr.to_string())
    }
}

fn connect_err(addr: &str, e: impl std::fmt::Display) -> FabricError {
    FabricError::Connect {
        addr: addr.to_string(),
        reason: e.to_string(),
    }
}

/// Sends our HELLO and checks the peer's.
fn handshake<S: Read + Write>(s: &mut S) -> Result<(), FabricError> {
    s.write_all(&Header::hello().encode())?;
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b)?;
    Header::decode(&b).map_err(|e| FabricError::Protocol(format!("bad hello: {e}")))?;
    Ok(())
}

/// Connects and handshakes; returns the socket and a peer description.
pub(crate) fn connect(addr: &str) -> Result<(OwnedFd, String), FabricError> {
    match parse(addr) {
        Addr::Tcp(a) => {
            let mut s = TcpStream::connect(&a).map_err(|e| connect_err(addr, e))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            handshake(&mut s).map_err(|e| connect_err(addr, e))?;
            s.set_read_timeout(None)?;
            let peer = s.peer_addr().map_or_else(|_| a.clone(), |p| p.to_string());
            Ok((OwnedFd::from(s), format!("tcp:{peer}")))
        }
        Addr::Unix(p) => {
            let mut s = UnixStream::connect(&p).map_err(|e| connect_err(addr, e))?;
            s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            handshake(&mut s).map_err(|e| connect_err(addr, e))?;
            s.set_read_timeout(None)?;
            Ok((OwnedFd::from(s), format!("unix:{}", p.display())))
        }
    }
}

pub(crate) enum SoftSocketListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl SoftSocketListener {
    pub(crate) fn bind(addr: &str) -> Result<Self, FabricError> {
        match parse(addr) {
            Addr::Tcp(a) => Ok(Self::Tcp(
                TcpListener::bind(&a).map_err(|e| connect_err(addr, e))?,
            )),
            Addr::Unix(p) => Ok(Self::Unix(
                UnixListener::bind(&p).map_err(|e| connect_err(addr, e))?,
                p,
            )),
        }
    }

    pub(crate) fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string()),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Accepts the next peer that completes the handshake. Peers that fail
    /// it are logged and dropped, so one bad client cannot block accept.
    pub(crate) fn accept(&self) -> Result<(OwnedFd, String), FabricError> {
        loop {
            let r = match self {
                Self::Tcp(l) => {
                    let (mut s, peer) = l.accept()?;
                    (|| {
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
                        handshake(&mut s)?;
                        s.set_read_timeout(None)?;
                        Ok::<_, FabricError>((OwnedFd::from(s), format!("tcp:{peer}")))
                    })()
                }
                Self::Unix(l, p) => {
                    let (mut s, _) = l.accept()?;
                    (|| {
                        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
                        handshake(&mut s)?;
                        s.set_read_timeout(None)?;
                        Ok::<_, FabricError>((OwnedFd::from(s), format!("unix:{}", p.display())))
                    })()
                }
            };
            match r {
                Ok(x) => return Ok(x),
                Err(e) => {
                    tracing::warn!("soft fabric: dropping a peer that failed the handshake: {e}")
                }
            }
        }
    }
}

impl Drop for SoftSocketListener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}
