//! forkbus: a multi-process message bus over a forked tree of socketpairs.
//!
//! This facade re-exports the routing core ([`router`]) and the runtime ([`runtime`]).

pub use forkbus_router as router;
pub use forkbus_runtime as runtime;

/// The README's examples, compiled and run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
