//! Shared code of the vrio example binaries.
