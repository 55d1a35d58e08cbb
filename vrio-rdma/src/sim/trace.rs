//! What the simulated network did: one [`SimEvent`] per step (and per
//! injected fault), and running [`SimStats`] counters.

use std::fmt;

use crate::api::{Opcode, WcStatus};

/// Names one simulated endpoint (stable for the network's life, never
/// reused; assigned in creation order, so runs that create endpoints in the
/// same order get the same ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SimEndpointId(pub(crate) u32);

impl fmt::Display for SimEndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ep{}", self.0)
    }
}

/// The kind of a send-queue request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimOp {
    /// RDMA READ.
    Read,
    /// RDMA WRITE.
    Write,
    /// RDMA WRITE_WITH_IMM.
    WriteWithImm,
    /// SEND.
    Send,
}

impl SimOp {
    pub(crate) fn of(op: &Opcode) -> Self {
        match op {
            Opcode::Read { .. } => SimOp::Read,
            Opcode::Write { .. } => SimOp::Write,
            Opcode::WriteWithImm { .. } => SimOp::WriteWithImm,
            Opcode::Send => SimOp::Send,
        }
    }
}

/// One thing the network did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimEvent {
    /// `ep`'s oldest unexecuted request ran at the responder (data moved,
    /// the peer's receive consumed) or was refused; `status` is the outcome
    /// its completion will carry.
    Execute {
        /// The requester.
        ep: SimEndpointId,
        /// The request's `wr_id`.
        wr_id: u64,
        /// The request's kind.
        op: SimOp,
        /// Success, or why it failed.
        status: WcStatus,
    },
    /// A SEND or WRITE_WITH_IMM of `ep` found no receive posted at the peer
    /// and stays pending (one RNR retry used).
    RnrNak {
        /// The requester.
        ep: SimEndpointId,
        /// The request's `wr_id`.
        wr_id: u64,
    },
    /// `ep`'s oldest executed request retired (its completion, if signalled
    /// or failed, is now in `ep`'s completion queue).
    Retire {
        /// The requester.
        ep: SimEndpointId,
        /// The request's `wr_id`.
        wr_id: u64,
        /// The status it completed with.
        status: WcStatus,
    },
    /// `ep` noticed that its peer broke or closed the connection: its
    /// oldest unexecuted request completed `RetryExceeded`, the rest and its
    /// receives `Flushed`.
    PeerLost {
        /// The endpoint that noticed.
        ep: SimEndpointId,
    },
    /// [`SimNet::disconnect`](super::SimNet::disconnect) cut `ep`'s
    /// connection.
    Disconnect {
        /// The endpoint named in the call.
        ep: SimEndpointId,
    },
}

/// Counters over a network's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimStats {
    /// Steps taken.
    pub steps: u64,
    /// READs executed successfully.
    pub reads: u64,
    /// WRITEs executed successfully.
    pub writes: u64,
    /// WRITE_WITH_IMMs executed successfully.
    pub write_imms: u64,
    /// SENDs executed successfully.
    pub sends: u64,
    /// Requests whose execution failed (remote or local fault, RNR retries
    /// exhausted).
    pub faults: u64,
    /// RNR NAKs (a SEND or WRITE_WITH_IMM that found no receive).
    pub rnr_naks: u64,
    /// Requests retired at their requester.
    pub retired: u64,
    /// Connections found broken by a [`SimEvent::PeerLost`] step.
    pub peers_lost: u64,
    /// [`SimNet::disconnect`](super::SimNet::disconnect) calls.
    pub disconnects: u64,
}

impl SimStats {
    /// Counts a successful execution of `op`.
    pub(crate) fn executed(&mut self, op: SimOp) {
        match op {
            SimOp::Read => self.reads += 1,
            SimOp::Write => self.writes += 1,
            SimOp::WriteWithImm => self.write_imms += 1,
            SimOp::Send => self.sends += 1,
        }
    }
}
