//! The I/O server's side of a remote queue, without I/O. [`ServerRing`]
//! is what every queue kind shares: ring indices, doorbell intake (or
//! remote polling, and the adaptive switch between them), chain walking
//! over a shadow with fetches, waves of one-sided requests, control
//! messages and quiesce. [`RequestQueue`] serves request/reply devices
//! (virtio-blk, net TX) over it, [`RxQueue`] virtio-net receive.
//!
//! The runtime (`remote::RemoteQueue`, `remote::RemoteRxQueue`) owns the
//! endpoint and the registrations of the ring's buffers: it feeds polled
//! completions to [`ServerRing::on_completions`], tells the time with
//! [`ServerRing::set_now`], calls `serve`, and posts
//! [`ServerRing::outbox`]. Nothing here waits: a READ in flight is a stage
//! the next call resumes.

mod request;
mod ring;
mod rx;

pub use request::RequestQueue;
#[cfg(test)]
pub(crate) use ring::SLEEPER_STREAK;
pub use ring::{ServerRing, Wake};
pub use rx::RxQueue;
