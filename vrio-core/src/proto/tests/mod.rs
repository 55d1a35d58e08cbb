//! Deterministic tests of the protocol's state machines: no threads,
//! sockets or real time, so the same seed gives the same run.
//!
//! - `agent`: the VM-host side alone, against in-test servers that follow
//!   the protocol;
//! - `pair`: both sides together over an in-memory model of an RC queue
//!   pair, with random interleavings, moves, lost servers, adaptive
//!   switching, a small send queue and a hostile guest.

mod agent;
mod pair;
