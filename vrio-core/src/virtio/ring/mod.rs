//! Split virtqueues (virtio 1.2 §2.7): layout, the chain walker, and both
//! sides of the ring.

pub mod descriptor;
pub mod device;
pub mod driver;
pub mod error;
pub mod layout;
pub mod walker;

pub use descriptor::{Descriptor, DescriptorChain, Segment};
pub use device::{DeviceQueue, RingState};
pub use driver::{DriverError, DriverQueue, IndirectArea};
pub use error::{ChainError, QueueError};
pub use layout::{RingFeatures, RingLayout};
pub use walker::Walker;

#[cfg(test)]
mod tests;
