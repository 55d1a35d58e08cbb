//! The remote protocol, without I/O: what the VM-host agent and the I/O
//! server say to each other ([`wire`]), the server's local copy of guest
//! ring memory ([`shadow`]), the limits of a remote queue ([`config`]) and
//! the VM-host side of a queue as a state machine ([`agent`]): events in
//! (kicks, completions, messages, commands, the time), actions out (send
//! this, connect there, interrupt the guest). `remote` is the runtime that
//! owns the threads, endpoints and eventfds around it.

pub mod agent;
pub mod config;
pub mod shadow;
pub mod wire;

#[cfg(test)]
mod tests;
