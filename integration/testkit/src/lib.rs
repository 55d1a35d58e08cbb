//! vrio-testkit: what stands in for real VMs in vrio's tests, benchmarks and
//! the demo. It is not part of vrio's library API: a VMM or an I/O server
//! links vrio-core, vrio-rdma and vrio-control only.
//!
//! - [`guest`]: synthetic virtio-blk guests (guest memory, split rings,
//!   kick and call eventfds) and a verified read/write workload;
//! - [`net`]: synthetic virtio-net guests, verified frame traffic, and the
//!   net runner;
//! - [`runner`]: runs the blk workload under each I/O model (vhost-style,
//!   local sidecore, remote) and reports throughput, latency and CPU per
//!   request;
//! - [`driver`]: the guest driver's chores both share (memory layout,
//!   adding, kicking, waiting for interrupts, slots);
//! - [`cputime`]: the CPU clocks those reports read.

pub mod cputime;
pub mod driver;
pub mod guest;
pub mod net;
pub mod runner;
