//! The vhost-user socket loop: serve one VMM connection at a time, detach
//! its queues when it goes away, and wait for it (or another) to connect.

use std::path::Path;
use std::sync::Arc;

use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::{FrontConfig, VrioBackend};

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The vhost-user daemon could not be created for a session.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// Serves `socket` until `keep_going` says stop (checked after each VMM
/// connection ends). `server_config` is the I/O server's config space.
pub fn serve(
    socket: &Path,
    cfg: &FrontConfig,
    server_config: &[u8],
    keep_going: impl FnMut() -> bool,
) -> Result<(), ServeError> {
    serve_loop(
        socket,
        "vrio-vhost-user-blk",
        || VrioBackend::new(cfg.clone(), server_config),
        Relay::WithInflight,
        keep_going,
    )
}

/// How the VMM's socket reaches the daemon.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// The daemon serves the socket itself.
    None,
    /// Through [`super::relay`] (held early enables, the dirty log).
    Plain,
    /// Through [`super::relay`], offering inflight I/O tracking to the
    /// session's back-end.
    WithInflight,
}

/// [`serve`] with the back-end of each session made by `backend`; with
/// `relay`, the VMM's messages pass [`super::relay`] (QEMU's
/// vhost-user-net needs it).
pub fn serve_with(
    socket: &Path,
    name: &str,
    backend: impl FnMut() -> VrioBackend,
    relay: bool,
    keep_going: impl FnMut() -> bool,
) -> Result<(), ServeError> {
    let relay = if relay { Relay::Plain } else { Relay::None };
    serve_loop(socket, name, backend, relay, keep_going)
}

fn serve_loop(
    socket: &Path,
    name: &str,
    mut backend: impl FnMut() -> VrioBackend,
    relay: Relay,
    mut keep_going: impl FnMut() -> bool,
) -> Result<(), ServeError> {
    loop {
        // Fresh back-end and daemon per connection: vhost-user state
        // (features, vrings, memory) belongs to one front-end session.
        let backend = Arc::new(backend());
        let mut daemon = VhostUserDaemon::new(
            name.into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        backend.set_handlers(&daemon.get_epoll_handlers());
        tracing::info!(socket = %socket.display(), "waiting for a VMM");
        let r = match relay {
            Relay::None => daemon.serve(socket).map_err(|e| e.to_string()),
            Relay::Plain => super::relay::serve_relayed(&mut daemon, socket, &backend, false),
            Relay::WithInflight => super::relay::serve_relayed(&mut daemon, socket, &backend, true),
        };
        backend.detach_all();
        match r {
            Ok(()) => tracing::info!("the VMM disconnected"),
            Err(e) => tracing::warn!(error = %e, "the VMM session ended with an error"),
        }
        if !keep_going() {
            return Ok(());
        }
    }
}
