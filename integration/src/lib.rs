//! Helpers shared by vrio's cross-process and VM tests.
//!
//! [`rxe`] boots a QEMU (TCG) guest with Soft-RoCE and runs a script in it;
//! see `integration/rxe/README.md`. [`vhost`] holds what the guests of
//! `integration/vhost/` need.

pub mod rxe;
pub mod vhost;
