//! Helpers shared by vrio's cross-process and VM tests.
