//! forkbus: a multi-process message bus over a forked tree of socketpairs.
//!
//! This facade re-exports the routing core ([`router`]) and the runtime ([`runtime`]), and
//! at its root the names a program needs: [`Bus`], [`Listener`], [`Message`], addresses
//! ([`Address`], [`Destination`], [`to`]) and outcomes ([`Fate`]: a sure [`LossReason`] or an
//! [`UnknownReason`]; [`LossReport`], [`PeerShutdown`]),
//! process management: [`Supervisor`] ([`supervisor`]) and [`TaskPool`] ([`pool`]),
//! and errors: [`Error`], into which `?` turns every detail enum of the runtime
//! ([`SendError`], [`ForkError`], [`NameError`], ...).

pub use forkbus_router as router;
pub use forkbus_runtime as runtime;
pub use forkbus_runtime::exec;

pub use forkbus_router::{
    Address, Destination, DownCause, Fate, LossReason, LossReport, LostEnvelope, MessageId, NodeId,
    RouterConfig, SendOptions, Timestamp, UnknownReason,
};
pub use forkbus_runtime::{
    monotonic_now, to, Bus, BusConfig, BusError, BusHandle, DecodeError, Descriptors, EncodeError,
    Error, Event, ExitStatus, FdId, FdReady, ForkError, ForkOptions, Interest, Listener,
    ListenerId, Message, NameError, PeerShutdown, Pid, Relation, SendError, ServiceEvent, Stop,
    Tally, TimerId,
};
pub use forkbus_runtime::{
    pool, should_stop, supervisor, ChildSpec, Restart, SupervisionEvent, Supervisor, TaskId,
    TaskOutcome, TaskPool,
};

/// The README's examples, compiled and run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
