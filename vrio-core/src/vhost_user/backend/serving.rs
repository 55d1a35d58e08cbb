//! Who serves the vrings: the I/O server through the VM-host agent, or a
//! sidecore on this host, and what the VMM is offered ([`FrontConfig`]).

use std::sync::Arc;

use crate::blk::{config_space, BlockBackend, BlockConfig};
use crate::remote::AgentConfig;
use crate::sidecore::SidecoreHandle;

use super::config_space::SEGMENT;
use super::placement::Placement;

/// The front: what the VMM is offered and who serves the vrings.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// Who serves the vrings.
    pub serving: Serving,
    /// Queues offered to the VMM (and written into the config space).
    pub queues: u16,
    /// Largest vring the VMM may set up (the back-end's `max_queue_size`).
    pub max_queue_size: u16,
}

/// Who serves the vrings.
#[derive(Debug, Clone)]
pub enum Serving {
    /// A remote I/O server, through the VM-host agent and the fabric.
    Remote(RemoteFront),
    /// A sidecore on this host, over the guest memory from SET_MEM_TABLE.
    Local(LocalFront),
}

/// What the front needs to reach the I/O server.
#[derive(Debug, Clone)]
pub struct RemoteFront {
    /// The I/O server's fabric address.
    pub server: String,
    /// Which fabric reaches it.
    pub fabric: vrio_rdma::Backend,
    /// RDMA device for verbs (default: the first one).
    pub device: Option<String>,
    /// Largest request (data, header and status) the I/O server accepts;
    /// the guest is held under it with SEG_MAX x SIZE_MAX, as virtio-blk
    /// has no field for a request's total size.
    pub max_request: u32,
    /// Device id the queue attachments carry (vring q attaches as queue q
    /// of this device).
    pub device_id: u64,
    /// How each vring's agent runs.
    pub agent: AgentConfig,
    /// Where each vring goes and which agent serves it; a controller
    /// follower reads and updates it.
    pub placement: Arc<Placement>,
    /// The device's attach credential, for servers that check them.
    pub credential: Option<String>,
    /// Whether the server serves the device read-only (its probe's
    /// `ServerDevice::read_only`): the guest is offered `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
}

/// A local sidecore serving the vrings from a block back-end.
#[derive(Clone)]
pub struct LocalFront {
    /// The storage every queue's device runs on.
    pub backend: Arc<dyn BlockBackend>,
    /// The device every queue runs (limits, read-only).
    pub blk: BlockConfig,
    /// Shared by every queue and every VMM session of this daemon.
    pub sidecore: Arc<SidecoreHandle>,
}

impl std::fmt::Debug for LocalFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFront")
            .field("capacity", &self.backend.capacity())
            .field("blk", &self.blk)
            .finish_non_exhaustive()
    }
}

impl LocalFront {
    /// The device's config space, as [`super::VrioBackend::new`] takes it.
    pub fn config_space(&self) -> Vec<u8> {
        config_space(&self.blk, self.backend.capacity())
    }
}

impl Serving {
    /// Largest request the server side takes, header and status included.
    pub(super) fn max_request(&self) -> u32 {
        match self {
            Serving::Remote(r) => r.max_request,
            Serving::Local(l) => l.blk.max_request_bytes.saturating_add(SEGMENT),
        }
    }

    pub(super) fn read_only(&self) -> bool {
        match self {
            Serving::Remote(r) => r.read_only,
            Serving::Local(l) => l.blk.read_only || l.backend.read_only(),
        }
    }

    pub(super) fn name(&self) -> String {
        match self {
            Serving::Remote(r) => format!("the I/O server {}", r.server),
            Serving::Local(_) => "the local sidecore".into(),
        }
    }
}

#[cfg(test)]
impl RemoteFront {
    /// A front for tests: soft fabric, a server nobody listens on.
    pub(crate) fn for_tests(max_request: u32, device_id: u64) -> Self {
        Self {
            server: "127.0.0.1:1".into(),
            fabric: vrio_rdma::Backend::Soft,
            device: None,
            max_request,
            device_id,
            agent: AgentConfig::default(),
            placement: Default::default(),
            credential: None,
            read_only: false,
        }
    }
}
