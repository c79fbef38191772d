//! The forkbus runtime: real processes, real socketpairs, one single-threaded reactor per
//! process over a slab of peer sockets, driving a [`forkbus_router::Router`].
//!
//! Its work is tracked by its own issue; this crate holds only what the workspace needs.
pub mod daemon;
pub mod identity;
pub mod shm;
