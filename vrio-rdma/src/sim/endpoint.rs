//! The application's handle on a simulated endpoint.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use super::net::{lock, NewEndpoint, Shared};
use super::trace::SimEndpointId;
use crate::api::{Completion, Endpoint, FabricError, RecvRequest, SendRequest};
use crate::eventfd::EventFd;

/// A simulated RC endpoint. Posting only queues work; nothing executes
/// until the harness steps the network ([`SimNet::step`]). Dropping it
/// closes the connection: the peer notices at a later step.
///
/// [`SimNet::step`]: super::SimNet::step
pub struct SimEndpoint {
    net: Shared,
    id: u32,
    peer: u32,
    notify: Arc<EventFd>,
}

impl fmt::Debug for SimEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimEndpoint")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .finish()
    }
}

impl SimEndpoint {
    pub(crate) fn new(net: Shared, ne: NewEndpoint) -> Self {
        Self {
            net,
            id: ne.id,
            peer: ne.peer,
            notify: ne.notify,
        }
    }

    /// This endpoint's id, for [`SimNet::disconnect`], [`SimNet::pause`]
    /// and the trace.
    ///
    /// [`SimNet::disconnect`]: super::SimNet::disconnect
    /// [`SimNet::pause`]: super::SimNet::pause
    pub fn id(&self) -> SimEndpointId {
        SimEndpointId(self.id)
    }

    /// The id of the other end of the connection.
    pub fn peer_id(&self) -> SimEndpointId {
        SimEndpointId(self.peer)
    }
}

impl Endpoint for SimEndpoint {
    fn post_send(&mut self, wrs: &[SendRequest]) -> Result<(), FabricError> {
        lock(&self.net).post_send(self.id, wrs)
    }

    fn post_recv(&mut self, wrs: &[RecvRequest]) -> Result<(), FabricError> {
        lock(&self.net).post_recv(self.id, wrs)
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        lock(&self.net).poll(self.id, out)
    }

    /// Never blocks (the harness owns time): returns at once, with
    /// [`FabricError::EndpointDead`] when the endpoint is in the error state
    /// and has nothing left to poll, as `soft` does.
    fn wait(&mut self, _timeout: Duration) -> Result<(), FabricError> {
        lock(&self.net).wait(self.id)
    }

    /// An eventfd that becomes readable when completions are queued after
    /// [`Endpoint::arm`] (at once if some already are), as in `soft`.
    fn notify_fd(&self) -> RawFd {
        self.notify.as_raw_fd()
    }

    fn arm(&mut self) -> Result<(), FabricError> {
        lock(&self.net).arm(self.id)
    }

    fn peer(&self) -> String {
        format!("sim ep{}", self.peer)
    }
}

impl Drop for SimEndpoint {
    fn drop(&mut self) {
        lock(&self.net).close(self.id);
    }
}
