//! Stream sockets for the soft fabric: TCP (`host:port`) or Unix
//! (`unix:/path`, or any address starting with `/`), plus the HELLO handshake.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::wire::{Header, Kind, HEADER_LEN, MAGIC, VERSION};
use crate::accept::Acceptor;
use crate::api::{AcceptLimits, FabricError};

/// How long connect waits for the listener's HELLO.
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

/// Checks that `b` is a HELLO: the right kind, [`MAGIC`] and a version
/// this side speaks.
pub(crate) fn check_hello(b: &[u8; HEADER_LEN]) -> Result<(), FabricError> {
    let bad = |why: String| Err(FabricError::Protocol(format!("bad HELLO: {why}")));
    if b[4] != Kind::Hello as u8 {
        return bad(match Header::decode(b) {
            Ok(h) => format!("expected a HELLO frame, got {:?}", h.kind),
            Err(e) => e.to_string(),
        });
    }
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[8..16]);
    let magic = u64::from_le_bytes(m);
    if magic != MAGIC {
        return bad(format!(
            "magic {magic:#018x}, not {MAGIC:#018x}: not a vrio soft fabric peer"
        ));
    }
    let version = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
    if version != VERSION {
        return bad(format!(
            "the peer speaks protocol version {version}, this side {VERSION}"
        ));
    }
    // The other fields (no payload, no status, zero rkey).
    Header::decode(b).map_err(|e| FabricError::Protocol(format!("bad HELLO: {e}")))?;
    Ok(())
}

/// Sends our HELLO and checks the peer's.
fn handshake<S: Read + Write>(s: &mut S) -> Result<(), FabricError> {
    s.write_all(&Header::hello().encode())?;
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            FabricError::Protocol("the peer closed before its HELLO".into())
        }
        _ => e.into(),
    })?;
    check_hello(&b)
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

/// A bound TCP or Unix socket whose connections handshake concurrently
/// (see `crate::accept`). A Unix socket's file is removed on drop.
pub(crate) struct SoftSocketListener {
    acceptor: Acceptor<(OwnedFd, String)>,
    local: String,
    path: Option<PathBuf>,
}

impl SoftSocketListener {
    pub(crate) fn bind(addr: &str, limits: AcceptLimits) -> Result<Self, FabricError> {
        match parse(addr) {
            Addr::Tcp(a) => {
                let l = TcpListener::bind(&a).map_err(|e| connect_err(addr, e))?;
                let local = l
                    .local_addr()
                    .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
                let acceptor = Acceptor::spawn(
                    "soft fabric",
                    OwnedFd::from(l),
                    limits,
                    Arc::new(|fd| {
                        let mut s = TcpStream::from(fd);
                        s.set_nodelay(true)?;
                        let peer = s.peer_addr()?;
                        handshake(&mut s)?;
                        Ok((OwnedFd::from(s), format!("tcp:{peer}")))
                    }),
                )?;
                Ok(Self {
                    acceptor,
                    local,
                    path: None,
                })
            }
            Addr::Unix(p) => {
                let l = UnixListener::bind(&p).map_err(|e| connect_err(addr, e))?;
                let desc = format!("unix:{}", p.display());
                let peer = desc.clone();
                let acceptor = Acceptor::spawn(
                    "soft fabric",
                    OwnedFd::from(l),
                    limits,
                    Arc::new(move |fd| {
                        let mut s = UnixStream::from(fd);
                        handshake(&mut s)?;
                        Ok((OwnedFd::from(s), peer.clone()))
                    }),
                );
                let acceptor = match acceptor {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = std::fs::remove_file(&p);
                        return Err(e);
                    }
                };
                Ok(Self {
                    acceptor,
                    local: desc,
                    path: Some(p),
                })
            }
        }
    }

    pub(crate) fn local_addr(&self) -> String {
        self.local.clone()
    }

    /// The next peer that completed the handshake. Peers that fail it are
    /// logged and dropped; none of them delays another.
    pub(crate) fn accept(&self) -> Result<(OwnedFd, String), FabricError> {
        self.acceptor.accept()
    }
}

impl Drop for SoftSocketListener {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(b: &[u8; HEADER_LEN]) -> String {
        match check_hello(b) {
            Err(FabricError::Protocol(m)) => m,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn only_a_hello_is_a_hello() {
        assert!(check_hello(&Header::hello().encode()).is_ok());
        // Well-formed frames of other kinds.
        let read = Header::request(Kind::Read, 0, 0x1000, 7, 64).encode();
        assert!(refusal(&read).contains("expected a HELLO frame, got Read"));
        let send = Header::request(Kind::Send, 8, 0, 0, 0).encode();
        assert!(refusal(&send).contains("got Send"));
        // The wrong magic, or a version this side does not speak.
        let mut h = Header::hello().encode();
        h[8] ^= 1;
        assert!(refusal(&h).contains("not a vrio soft fabric peer"));
        let mut h = Header::hello().encode();
        h[20..24].copy_from_slice(&2u32.to_le_bytes());
        assert!(refusal(&h).contains("protocol version 2"));
        // A HELLO with a payload; noise.
        let mut h = Header::hello().encode();
        h[0] = 1;
        assert!(refusal(&h).starts_with("bad HELLO"));
        assert!(refusal(&[0xFF; HEADER_LEN]).starts_with("bad HELLO"));
    }
}
