//! The I/O server's virtio-blk config space, before any guest queue exists.
//!
//! The VMM asks for the config at realize time, long before the guest sets
//! up a ring, so we attach one throw-away queue on a scratch ring of our
//! own, keep the config the server replies with, and detach.

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

/// Attaches a scratch queue as device `device_id` and returns the config
/// space the server reported.
pub fn fetch_config(
    domain: Arc<dyn Domain>,
    server: &str,
    device_id: u64,
    cfg: AgentConfig,
) -> Result<Vec<u8>, ProbeError> {
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
        },
        cfg,
    )?;
    let config = dev.config_space().to_vec();
    dev.detach();
    if config.is_empty() {
        return Err(ProbeError::EmptyConfig);
    }
    Ok(config)
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
            let c = fetch_config(domain.clone(), &addr, id, AgentConfig::default()).unwrap();
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
        let r = fetch_config(domain, "127.0.0.1:1", 0, AgentConfig::default());
        assert!(r.is_err());
    }
}
