//! Awaiting completions on tokio: [`AsyncEndpoint`] drives an endpoint's
//! `notify_fd` (soft: an eventfd; verbs: the completion channel) with
//! `AsyncFd`, for agents that should not spin. Sidecores poll instead.

use std::os::fd::{AsRawFd, RawFd};

use tokio::io::unix::AsyncFd;

use crate::api::{Completion, Endpoint, FabricError};

/// The endpoint's notification fd, borrowed: the endpoint owns and closes it.
struct NotifyFd(RawFd);

impl AsRawFd for NotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// An [`Endpoint`] whose completions can be awaited on tokio. Post through
/// [`AsyncEndpoint::endpoint`]; reap with [`AsyncEndpoint::poll_batch`] or
/// [`AsyncEndpoint::next_completion`].
pub struct AsyncEndpoint {
    // Declared before `ep` so it is dropped (deregistered from the reactor)
    // before the endpoint closes the fd.
    fd: AsyncFd<NotifyFd>,
    ep: Box<dyn Endpoint>,
}

impl AsyncEndpoint {
    /// Wraps `ep`, registering its `notify_fd` with the tokio reactor. Must
    /// be called inside a tokio runtime (else [`FabricError::InvalidRequest`]).
    pub fn new(ep: Box<dyn Endpoint>) -> Result<Self, FabricError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(FabricError::InvalidRequest(
                "AsyncEndpoint needs a tokio runtime".into(),
            ));
        }
        // SAFETY: the fd belongs to `ep`, which stays open for as long as
        // this AsyncFd lives: both are owned by the returned value, and the
        // fd field is dropped first (see the struct).
        let fd = unsafe {
            AsyncFd::register_with_interest(NotifyFd(ep.notify_fd()), tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)?;
        Ok(Self { fd, ep })
    }

    /// The wrapped endpoint, for posting.
    pub fn endpoint(&mut self) -> &mut dyn Endpoint {
        self.ep.as_mut()
    }

    /// Unwraps the endpoint, deregistering its fd from the reactor first.
    pub fn into_inner(self) -> Box<dyn Endpoint> {
        let Self { fd, ep } = self;
        drop(fd);
        ep
    }

    /// Waits until at least one completion is ready; fills `out`.
    pub async fn poll_batch(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.ep.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            // Arm, then poll again: a completion that raced with arming is
            // found here rather than waited for.
            self.ep.arm()?;
            let n = self.ep.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            let mut ready = self.fd.readable().await?;
            ready.clear_ready();
        }
    }

    /// Waits for the next completion.
    pub async fn next_completion(&mut self) -> Result<Completion, FabricError> {
        let mut one = [Completion {
            wr_id: 0,
            status: crate::api::WcStatus::Flushed,
            opcode: crate::api::WcOpcode::Send,
            byte_len: 0,
            imm: None,
        }];
        self.poll_batch(&mut one).await?;
        Ok(one[0])
    }
}
