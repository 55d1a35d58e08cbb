//! The `soft` back-end: verbs RC semantics in user space over TCP or Unix
//! stream sockets. See `docs/fabric.md` for the semantics and the protocol.

mod cpu;
mod endpoint;
mod region;
mod socket;
mod tx;
pub mod wire;

use std::sync::Arc;

pub use cpu::thread_cpu_ns;
pub use endpoint::SoftEndpoint;
pub use region::SoftRegion;
// The verbs back-end implements `MemoryRegion` for its regions with it too.
pub(crate) use region::impl_memory_region;

use crate::api::{
    AcceptLimits, Access, Domain, Endpoint, EndpointConfig, FabricError, Listener, MemoryRegion,
};
use cpu::FabricCpu;
pub(crate) use region::Registry;
use socket::SoftSocketListener;

/// A soft protection domain: its regions are reachable only through
/// endpoints created from it. The threads of those endpoints (connected or
/// accepted through its listeners) are accounted to it
/// ([`Domain::fabric_cpu_ns`]).
#[derive(Debug)]
pub struct SoftDomain {
    reg: Arc<Registry>,
    cpu: Arc<FabricCpu>,
}

/// Opens a soft domain (always succeeds; kept fallible like `verbs`).
pub fn open_domain() -> Result<Box<dyn Domain>, FabricError> {
    Ok(Box::new(SoftDomain::new()))
}

impl SoftDomain {
    /// An empty domain with no regions.
    pub fn new() -> Self {
        Self {
            reg: Registry::new(),
            cpu: FabricCpu::new(),
        }
    }
}

impl SoftDomain {
    /// [`Domain::listen`] with limits other than the default on the
    /// connections being set up.
    pub fn listen_with(
        &self,
        addr: &str,
        cfg: EndpointConfig,
        limits: AcceptLimits,
    ) -> Result<SoftListener, FabricError> {
        Ok(SoftListener {
            sock: SoftSocketListener::bind(addr, limits)?,
            reg: Arc::clone(&self.reg),
            cpu: Arc::clone(&self.cpu),
            cfg,
        })
    }
}

impl Default for SoftDomain {
    fn default() -> Self {
        Self::new()
    }
}

impl Domain for SoftDomain {
    // SAFETY: the caller upholds `Domain::register`'s contract (api.rs): the
    // memory stays mapped for as long as the returned region lives.
    unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Box<dyn MemoryRegion>, FabricError> {
        Ok(Box::new(self.reg.register(ptr, len, access)?))
    }

    fn fabric_cpu_ns(&self) -> u64 {
        self.cpu.total_ns()
    }

    fn listen(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Listener>, FabricError> {
        Ok(Box::new(self.listen_with(
            addr,
            cfg,
            AcceptLimits::default(),
        )?))
    }

    fn connect(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Endpoint>, FabricError> {
        let (fd, peer) = socket::connect(addr)?;
        Ok(Box::new(SoftEndpoint::start(
            fd,
            peer,
            Arc::clone(&self.reg),
            &self.cpu,
            cfg,
        )?))
    }
}

/// A soft listener: a bound TCP or Unix socket. `accept` hands out
/// endpoints that reach its domain's regions. Handshakes run concurrently
/// on threads of the listener's own, each within a deadline
/// ([`AcceptLimits`]); peers that fail them are logged and dropped.
/// Dropping the listener stops those threads.
pub struct SoftListener {
    sock: SoftSocketListener,
    reg: Arc<Registry>,
    cpu: Arc<FabricCpu>,
    cfg: EndpointConfig,
}

impl Listener for SoftListener {
    fn accept(&mut self) -> Result<Box<dyn Endpoint>, FabricError> {
        let (fd, peer) = self.sock.accept()?;
        Ok(Box::new(SoftEndpoint::start(
            fd,
            peer,
            Arc::clone(&self.reg),
            &self.cpu,
            self.cfg,
        )?))
    }

    fn local_addr(&self) -> String {
        self.sock.local_addr()
    }
}
