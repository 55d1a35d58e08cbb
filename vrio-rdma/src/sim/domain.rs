//! Simulated protection domains, their registered regions, and listeners
//! by name.

use std::fmt;
use std::sync::Arc;

use super::endpoint::SimEndpoint;
use super::net::{lock, Shared};
use crate::api::{Access, Domain, Endpoint, EndpointConfig, FabricError, Listener, MemoryRegion};

/// A simulated protection domain: its own key namespace, reachable only
/// through endpoints created from it (by [`SimNet::pair`] or
/// [`Domain::connect`] / [`Listener::accept`]).
///
/// [`SimNet::pair`]: super::SimNet::pair
pub struct SimDomain {
    pub(crate) net: Shared,
    pub(crate) id: usize,
}

impl fmt::Debug for SimDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDomain").field("id", &self.id).finish()
    }
}

impl Domain for SimDomain {
    // SAFETY: the caller upholds `Domain::register`'s contract (api.rs): the
    // memory stays mapped and valid for as long as the returned region
    // lives, which is what the sim's copies rely on (see `memory.rs`).
    unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Box<dyn MemoryRegion>, FabricError> {
        let addr = ptr.expose_provenance() as u64;
        let len = len as u64;
        let keys = lock(&self.net).register(self.id, addr, len, access)?;
        Ok(Box::new(SimRegion {
            net: Arc::clone(&self.net),
            domain: self.id,
            lkey: keys.lkey,
            rkey: keys.rkey,
            addr,
            len,
            access,
        }))
    }

    /// Listens under the name `addr` (any string) in this network.
    fn listen(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Listener>, FabricError> {
        lock(&self.net).listen(addr, self.id, cfg)?;
        Ok(Box::new(SimListener {
            net: Arc::clone(&self.net),
            name: addr.to_string(),
        }))
    }

    /// Connects to the listener named `addr`; the listener's side waits in
    /// its backlog for [`Listener::accept`].
    fn connect(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Endpoint>, FabricError> {
        let ne = lock(&self.net).connect(addr, self.id, cfg)?;
        Ok(Box::new(SimEndpoint::new(Arc::clone(&self.net), ne)))
    }
}

/// A region registered with a [`SimDomain`]; dropping it deregisters it.
/// Its lkey and rkey differ (unlike `soft`), so mixing them up faults.
pub struct SimRegion {
    net: Shared,
    domain: usize,
    lkey: u32,
    rkey: u32,
    addr: u64,
    len: u64,
    access: Access,
}

impl fmt::Debug for SimRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimRegion")
            .field("domain", &self.domain)
            .field("lkey", &self.lkey)
            .field("rkey", &self.rkey)
            .field("addr", &self.addr)
            .field("len", &self.len)
            .field("access", &self.access)
            .finish()
    }
}

impl MemoryRegion for SimRegion {
    fn lkey(&self) -> u32 {
        self.lkey
    }
    fn rkey(&self) -> u32 {
        self.rkey
    }
    fn addr(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn access(&self) -> Access {
        self.access
    }
}

impl Drop for SimRegion {
    fn drop(&mut self) {
        lock(&self.net).deregister(self.domain, self.lkey);
    }
}

/// A listener registered by name in a simulated network. `accept` never
/// blocks: it fails with [`FabricError::Connect`] when nobody connected.
/// Dropping it closes the connections not accepted yet.
pub struct SimListener {
    net: Shared,
    name: String,
}

impl fmt::Debug for SimListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimListener")
            .field("name", &self.name)
            .finish()
    }
}

impl Listener for SimListener {
    fn accept(&mut self) -> Result<Box<dyn Endpoint>, FabricError> {
        let ne = lock(&self.net).accept(&self.name)?;
        Ok(Box::new(SimEndpoint::new(Arc::clone(&self.net), ne)))
    }

    fn local_addr(&self) -> String {
        self.name.clone()
    }
}

impl Drop for SimListener {
    fn drop(&mut self) {
        lock(&self.net).unlisten(&self.name);
    }
}
