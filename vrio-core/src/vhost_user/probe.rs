//! The I/O server's virtio-blk config space, before any guest queue exists.
//!
//! The VMM asks for the config at realize time, long before the guest sets
//! up a ring, so we attach one throw-away queue on a scratch ring of our
//! own (as queue [`PROBE_QUEUE`] of the device itself, so its credential
//! serves), keep the config and feature bits the server replies with, and
//! detach.

use std::sync::Arc;

use vm_memory::mmap::FromRangesError;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrio_rdma::Domain;

use crate::remote::{attach, AgentConfig, AgentError, DeviceAttach, QueueAttach};
use crate::virtio::memory::LocalMemory;
use crate::virtio::ring::{QueueError, RingFeatures, RingLayout};

/// Why the server's config space could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The scratch guest memory could not be allocated.
    #[error("scratch memory: {0}")]
    ScratchMemory(#[source] FromRangesError),
    /// The scratch ring's layout was refused.
    #[error("scratch ring: {0}")]
    ScratchRing(#[source] QueueError),
    /// An eventfd could not be made.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Attaching the scratch queue failed (no server, refused, fabric).
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The server replied with no config space.
    #[error("the server sent an empty config space")]
    EmptyConfig,
}

const SCRATCH_BYTES: usize = 0x4000;
/// The queue index the scratch queue attaches as: no real vring has it, so
/// its name never clashes with the device's queues on the server.
pub const PROBE_QUEUE: u16 = u16::MAX;

/// What the I/O server presents for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDevice {
    /// The device's config space.
    pub config: Vec<u8>,
    /// Feature bits the server imposes (`VIRTIO_BLK_F_RO`).
    pub features: u64,
}

impl ServerDevice {
    /// Whether the server serves the device read-only.
    pub fn read_only(&self) -> bool {
        self.features & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO) != 0
    }
}

/// Attaches a scratch queue of device `device_id` (with its `credential`,
/// if the server needs one) and returns what the server reported.
pub fn fetch_config(
    domain: Arc<dyn Domain>,
    server: &str,
    device_id: u64,
    credential: Option<String>,
    cfg: AgentConfig,
) -> Result<ServerDevice, ProbeError> {
    let mem = LocalMemory::from_ranges(&[(GuestAddress(0), SCRATCH_BYTES)])
        .map_err(ProbeError::ScratchMemory)?;
    let layout = RingLayout::new(8, 0, 0x1000, 0x2000).map_err(ProbeError::ScratchRing)?;
    let dev = attach(
        domain,
        server,
        DeviceAttach {
            device_id,
            mem: Arc::new(mem),
            queues: vec![QueueAttach {
                layout,
                features: RingFeatures {
                    indirect: false,
                    event_idx: false,
                },
                kick: EventFd::new(EFD_NONBLOCK)?,
                call: EventFd::new(EFD_NONBLOCK)?,
                start: 0,
            }],
            credential,
        },
        AgentConfig {
            queue_base: PROBE_QUEUE,
            ..cfg
        },
    )?;
    let config = dev.config_space().to_vec();
    let features = dev.device_features();
    dev.detach();
    if config.is_empty() {
        return Err(ProbeError::EmptyConfig);
    }
    Ok(ServerDevice { config, features })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::{BlockBackend, MemoryBackend};
    use crate::remote::{IoServer, IoServerConfig};

    #[test]
    fn fetches_the_servers_config_space_and_detaches() {
        let domain: Arc<dyn Domain> =
            Arc::from(vrio_rdma::open(vrio_rdma::Backend::Soft, None).unwrap());
        let backend: Arc<dyn BlockBackend> = Arc::new(MemoryBackend::new(4 << 20));
        let server = IoServer::start(domain.clone(), backend, IoServerConfig::default()).unwrap();
        let addr = server.addr().to_string();
        for id in [1, 2] {
            let d = fetch_config(domain.clone(), &addr, id, None, AgentConfig::default()).unwrap();
            assert!(!d.read_only());
            let c = d.config;
            assert_eq!(c.len(), 96);
            let sectors = u64::from_le_bytes(c[0..8].try_into().unwrap());
            assert_eq!(sectors, (4 << 20) / 512);
        }
        server.stop();
    }

    #[test]
    fn no_server_is_an_error() {
        let domain: Arc<dyn Domain> =
            Arc::from(vrio_rdma::open(vrio_rdma::Backend::Soft, None).unwrap());
        let r = fetch_config(domain, "127.0.0.1:1", 0, None, AgentConfig::default());
        assert!(r.is_err());
    }
}
