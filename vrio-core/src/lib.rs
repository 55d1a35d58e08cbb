//! vrio-core: the split-virtqueue engine, the virtio-blk and virtio-net
//! device models, sidecores, the two local I/O models (vhost-style and local
//! sidecore) that the remote model is compared against, the remote data
//! path itself, and a vhost-user front for unmodified VMMs.
//!
//! See `docs/architecture.md` for the longer tour.
//!
//! # Layers
//!
//! **Virtio rings and device models** ([`virtio`], no I/O; its modules are
//! re-exported at the root). [`memory`] is how everything reaches
//! guest memory: a [`MemoryMap`] that every guest-supplied address is
//! checked against, and the [`GuestMemory`] trait, the engine's only way to
//! read or write. [`ring`] is the split virtqueue (virtio 1.2 §2.7): layout,
//! the chain walker that validates each chain a hostile guest offers, and
//! both sides of the ring, as state machines that do no I/O of their own.
//! [`device`] is the seam between a queue and a device model, a chain at a
//! time; `virtio::blk` (§5.2) and `virtio::net` (§5.1) are the models,
//! written over [`GuestMemory`] only so the same code serves local rings and
//! rings reached over RDMA. [`blk`] adds the storage back-ends and [`net`]
//! the L2 switch among one server's guests.
//!
//! **Sidecores and local models.** [`sidecore`] is one polling thread
//! serving many queues, each switching between poll and notification mode,
//! with an idle back-off; anything implementing [`sidecore::ServedQueue`]
//! can be served. [`models`] puts rings in local guest memory on it
//! ([`models::LocalQueue`]), or on a vhost-style worker woken by every kick
//! ([`models::VhostWorker`]): the baselines the remote model is measured
//! against.
//!
//! **The remote data path.** [`proto`] is vRIO's protocol without I/O: the
//! wire messages and both sides of a remote queue as state machines, tested
//! deterministically. [`remote`] is its runtime: on the VM host an agent
//! registers guest memory with the fabric and forwards doorbells and
//! interrupts; on the I/O server ([`remote::IoServer`]) remote sidecores
//! walk the guests' rings through RDMA READs and WRITEs alone and run the
//! unchanged device models over staged buffers.
//!
//! **The vhost-user front.** [`vhost_user`] lets an unmodified VMM (QEMU
//! `vhost-user-blk-pci`, `-netdev vhost-user`) and its guest's stock driver
//! use a remote I/O server (or, for virtio-blk, a local sidecore for
//! comparison) over the vhost-user socket.
//!
//! # Entry points
//!
//! A VMM links:
//! - [`remote::attach`] / [`remote::attach_placed`]: attach a device's
//!   queues to an I/O server, getting a [`remote::AttachedDevice`];
//! - [`vhost_user::serve()`] with a [`vhost_user::VrioBackend`]: serve a
//!   vhost-user socket instead;
//! - [`models::LocalQueue`] over a [`device::DeviceSide`], with a
//!   [`device::DeviceModel`], on a [`sidecore::SidecoreThread`]: the local
//!   models.
//!
//! An I/O server links:
//! - [`remote::IoServer`], started with a [`remote::IoServerConfig`];
//! - [`blk::FileBackend`] (or [`blk::MemoryBackend`]) as its disk;
//! - [`net::Switch`] (the server's, from [`remote::NetDevices::switch`])
//!   and [`net::TapUplink`] to give its guests a way out.
//!
//! These are re-exported here.

#![deny(missing_docs)]

pub mod blk;
mod cputime;
pub mod interpose;
pub mod models;
pub mod net;
pub mod proto;
pub mod remote;
pub mod sidecore;
pub mod tenancy;
pub mod vhost_user;
pub mod virtio;

pub use virtio::{device, memory, ring};

pub use memory::{
    memory_from_fds, memory_from_pointers, GuestMemory, GuestRegion, LocalMemory, MemoryError,
    MemoryMap,
};

pub use blk::FileBackend;
pub use device::DeviceModel;
pub use device::DeviceSide;
pub use models::LocalQueue;
pub use net::{Switch, TapUplink};
pub use remote::{attach, attach_placed, AttachedDevice, IoServer, IoServerConfig};
pub use sidecore::SidecoreThread;
pub use vhost_user::serve::serve;
pub use vhost_user::VrioBackend;
