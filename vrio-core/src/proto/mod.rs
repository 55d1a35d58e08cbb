//! The remote protocol, without I/O: what the VM-host agent and the I/O
//! server say to each other ([`wire`]), the server's local copy of guest
//! ring memory ([`shadow`]), the limits of a remote queue ([`config`]) and
//! the two sides of a queue as state machines ([`agent`] for the VM host,
//! [`server`] for the I/O server, with its staging buffer): events in
//! (kicks, completions, messages, commands, the time), actions out (send
//! this, connect there, interrupt the guest). `remote` is the runtime that
//! owns the threads, endpoints and eventfds around it.

pub mod agent;
pub mod config;
pub mod queue_error;
pub mod server;
pub mod shadow;
pub(crate) mod staging;
pub mod stats;
pub mod wire;

/// The wire's numeric device id for a controller's device id: the number
/// itself when the id is decimal, else a stable 64-bit hash (FNV-1a), so
/// agents and servers name a queue (`dev<key>.q<queue>`) the same way.
pub fn device_key(id: &str) -> u64 {
    if let Ok(n) = id.parse::<u64>() {
        return n;
    }
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The name an I/O server gives a queue.
pub fn queue_name(device_key: u64, queue: u16) -> String {
    format!("dev{device_key}.q{queue}")
}

#[cfg(test)]
mod tests;
