//! `sim`: a deterministic, in-memory model of reliable-connected queue
//! pairs, for protocol tests (feature `sim`).
//!
//! No threads, sockets or clocks: [`SimNet`] holds every domain and
//! endpoint of a test behind one lock. Posting work only queues it; the
//! harness moves the network one step at a time with [`SimNet::step`],
//! which picks one of the steps that may run with the rng it is given. The
//! rng is the only source of choice (all tables are ordered), so the same
//! seed and the same calls give the same run, and the [`SimNet::trace`]
//! says what happened.
//!
//! Semantics are `soft`'s (see `docs/fabric.md`), with time replaced by
//! steps:
//!
//! - Each send-queue request takes two steps: **execute** (at the peer:
//!   rkey, range and access checks, the memcpy, the peer's receive consumed
//!   and completed) and **retire** (back at the requester: its completion,
//!   if signalled or failed). A peer can thus see a SEND's receive
//!   completion before the sender sees the SEND complete, and answer it.
//!   Per endpoint, requests execute in post order and retire in post
//!   order; which endpoint moves next is the rng's choice.
//! - Errors follow RC and `soft`: the faulting request completes with the
//!   status `soft` gives, the rest `Flushed`, the endpoint enters the error
//!   state (later posts complete `Flushed`), and the connection breaks: a
//!   responder that refuses a request enters the error state at once; the
//!   other side of an endpoint that failed locally, or was dropped, notices
//!   at a later retire step of its own (oldest unexecuted request
//!   `RetryExceeded`, the rest `Flushed`; requests that already executed
//!   still retire with their outcome).
//! - A SEND or WRITE_WITH_IMM that finds no receive posted gets an RNR NAK
//!   and stays pending (later requests of that endpoint wait behind it);
//!   after [`SimNet::set_rnr_retries`] NAKs (default 7) the next attempt
//!   fails with `RnrRetryExceeded`.
//! - [`SimNet::disconnect`] cuts a connection at once: on both ends the
//!   oldest outstanding request completes `RetryExceeded` (even if it
//!   executed: its acknowledgement is lost) and the rest `Flushed`.
//! - [`SimNet::pause`] stops an endpoint's own send queue (no execute or
//!   retire steps): a slow host. The peer's requests into it still execute,
//!   as a NIC serves one-sided requests without the host's CPU.
//!
//! Keys are deterministic, carry their domain, and lkey ≠ rkey. `listen` and
//! `connect` work by name within one network; `accept` never blocks. The
//! conformance suite cannot run here: it needs blocking `accept`/`wait`
//! and a target thread.
//!
//! ```
//! use rand::{rngs::SmallRng, SeedableRng};
//! use vrio_rdma::sim::SimNet;
//! use vrio_rdma::{Access, Domain, Endpoint, EndpointConfig, MemoryRegion, Opcode,
//!                 SendRequest, Sge, WcStatus, Completion};
//!
//! let net = SimNet::new();
//! let (host, server) = (net.domain()?, net.domain()?);
//! let mut guest_ram = vec![0u8; 4096];
//! let mut buf = vec![7u8; 64];
//! // SAFETY: both vectors outlive their regions (dropped first, below).
//! let ram = unsafe { host.register(guest_ram.as_mut_ptr(), 4096, Access::GUEST_RAM)? };
//! let local = unsafe { server.register(buf.as_mut_ptr(), 64, Access::LOCAL_ONLY)? };
//! let cfg = EndpointConfig::default();
//! let (_agent, mut srv) = net.pair(&host, &server, cfg, cfg)?;
//! srv.post_send(&[SendRequest {
//!     wr_id: 1,
//!     opcode: Opcode::Write { remote_addr: ram.addr() + 100, rkey: ram.rkey() },
//!     local: Sge { lkey: local.lkey(), addr: local.addr(), len: 64 },
//!     signaled: true,
//! }])?;
//! assert_eq!(net.run(&mut SmallRng::seed_from_u64(1), 1000), 2); // execute, retire
//! let mut out = [Completion::EMPTY; 4];
//! assert_eq!(srv.poll(&mut out)?, 1);
//! assert_eq!(out[0].status, WcStatus::Success);
//! drop((ram, local));
//! assert_eq!(&guest_ram[100..164], &[7u8; 64][..]);
//! # Ok::<(), vrio_rdma::FabricError>(())
//! ```

mod domain;
mod endpoint;
mod memory;
mod net;
mod qp;
mod trace;

use std::fmt;
use std::sync::{Arc, Mutex};

pub use domain::{SimDomain, SimListener, SimRegion};
pub use endpoint::SimEndpoint;
pub use trace::{SimEndpointId, SimEvent, SimOp, SimStats};

use crate::api::{EndpointConfig, FabricError};
use net::{lock, Net, Shared};

/// A simulated network: a cheap, clonable handle; every clone is the same
/// network. See the [module docs](self).
#[derive(Clone)]
pub struct SimNet {
    inner: Shared,
}

impl fmt::Debug for SimNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimNet")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for SimNet {
    fn default() -> Self {
        Self::new()
    }
}

impl SimNet {
    /// An empty network.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Net::new())),
        }
    }

    /// A new protection domain (one per simulated host, or per guest) with
    /// its own key namespace. Fails only past 4,095 domains.
    pub fn domain(&self) -> Result<SimDomain, FabricError> {
        let id = lock(&self.inner).new_domain()?;
        Ok(SimDomain {
            net: Arc::clone(&self.inner),
            id,
        })
    }

    /// Two connected endpoints: the first in `a` with `cfg_a`, the second in
    /// `b` with `cfg_b` (`a` and `b` may be the same domain). Fails if a
    /// domain belongs to another network, or creating an eventfd fails.
    pub fn pair(
        &self,
        a: &SimDomain,
        b: &SimDomain,
        cfg_a: EndpointConfig,
        cfg_b: EndpointConfig,
    ) -> Result<(SimEndpoint, SimEndpoint), FabricError> {
        if !Arc::ptr_eq(&a.net, &self.inner) || !Arc::ptr_eq(&b.net, &self.inner) {
            return Err(FabricError::InvalidRequest(
                "the domain belongs to another simulated network".into(),
            ));
        }
        let (na, nb) = lock(&self.inner).new_pair((a.id, cfg_a), (b.id, cfg_b))?;
        Ok((
            SimEndpoint::new(Arc::clone(&self.inner), na),
            SimEndpoint::new(Arc::clone(&self.inner), nb),
        ))
    }

    /// Runs one step chosen with `rng` among those that may run; returns
    /// false (and draws nothing from `rng`) when none may.
    pub fn step<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> bool {
        let mut net = lock(&self.inner);
        let actions = net.actions();
        if actions.is_empty() {
            return false;
        }
        // Drawn as u64 so the choice does not depend on usize's width.
        let i = rng.gen_range(0..actions.len() as u64) as usize;
        net.apply(actions[i]);
        true
    }

    /// Steps until nothing may run or `max_steps` steps ran; returns how
    /// many ran.
    pub fn run<R: rand::Rng + ?Sized>(&self, rng: &mut R, max_steps: usize) -> usize {
        let mut n = 0;
        while n < max_steps && self.step(rng) {
            n += 1;
        }
        n
    }

    /// Whether no step may run (everything posted has executed and retired,
    /// or waits on a paused endpoint).
    pub fn is_idle(&self) -> bool {
        lock(&self.inner).actions().is_empty()
    }

    /// Cuts the connection of `ep` (a lost peer): both ends enter the error
    /// state at once; on each, the oldest outstanding request completes
    /// `RetryExceeded` (its acknowledgement, if it executed, is lost), the
    /// rest and every posted receive `Flushed`; later posts complete
    /// `Flushed`. Fails if `ep` was dropped.
    pub fn disconnect(&self, ep: SimEndpointId) -> Result<(), FabricError> {
        lock(&self.inner).disconnect(ep.0)
    }

    /// Stops `ep`'s send queue: its requests neither execute nor retire
    /// (and it does not notice a broken connection) until
    /// [`SimNet::resume`]. Fails if `ep` was dropped.
    pub fn pause(&self, ep: SimEndpointId) -> Result<(), FabricError> {
        lock(&self.inner).set_paused(ep.0, true)
    }

    /// Undoes [`SimNet::pause`]. Fails if `ep` was dropped.
    pub fn resume(&self, ep: SimEndpointId) -> Result<(), FabricError> {
        lock(&self.inner).set_paused(ep.0, false)
    }

    /// How many RNR NAKs a SEND or WRITE_WITH_IMM survives before it fails
    /// with `RnrRetryExceeded` (default 7; 0 fails at once).
    pub fn set_rnr_retries(&self, n: u32) {
        lock(&self.inner).set_rnr_retries(n);
    }

    /// Every event so far, oldest first (one per step, plus disconnects).
    pub fn trace(&self) -> Vec<SimEvent> {
        lock(&self.inner).trace().to_vec()
    }

    /// Forgets the events recorded so far (the counters stay).
    pub fn clear_trace(&self) {
        lock(&self.inner).clear_trace();
    }

    /// Counters of what ran, by kind.
    pub fn stats(&self) -> SimStats {
        lock(&self.inner).stats()
    }
}
