//! forkbus: a multi-process message bus over a forked tree of socketpairs.
//!
//! At the root, the names a program needs:
//!
//! - the bus: [`Bus`], [`BusConfig`], [`ForkOptions`], [`BusHandle`] (other threads),
//!   [`Stop`] (why the loop ended);
//! - what happens, as one stream: [`Event`] (with [`ServiceEvent`] for supervision, stop
//!   requests and task outcomes), handed to [`Bus::run_with`]'s closure or to
//!   [`Listener`]s;
//! - addresses and sending: [`Address`], [`Destination`], [`to`], [`SendOptions`],
//!   [`Message`], ids ([`MessageId`], [`NodeId`], [`Pid`]);
//! - outcomes: [`Fate`] — a sure [`LossReason`] (safe to retry) or an [`UnknownReason`] —
//!   in a [`LossReport`]; [`PeerShutdown`] with its lost list and [`Relation`];
//!   [`ExitStatus`] of a child; [`Tally`] of a drained tree;
//! - [`Error`], into which `?` turns every detail enum ([`error`]).
//!
//! The rest is in modules, all at one level: [`error`] (the detail enums), [`bus`] (the
//! loop's other parts: descriptors, timers, tickets, exit codes), the services
//! [`supervisor`], [`pool`], [`exec`], [`external`], and the process control [`daemon`],
//! [`identity`], [`shm`]; [`router`] and [`node`] are the pure cores underneath (their
//! simulators and raw wire encoders with the `testing` feature).

pub use forkbus_node as node;
pub use forkbus_router as router;
pub use forkbus_runtime::{daemon, exec, external, identity, pool, shm, supervisor};

pub use forkbus_node::{ExitStatus, PeerShutdown, Pid, Relation, Tally};
pub use forkbus_router::{
    Address, Destination, Fate, LossReason, LossReport, MessageId, NodeId, SendOptions,
    UnknownReason,
};
pub use forkbus_runtime::{
    to, Bus, BusConfig, BusHandle, Error, Event, ForkOptions, Listener, Message, ServiceEvent, Stop,
};

/// The errors beneath [`Error`]: why a send, a fork, a decode or a name was refused, and
/// what went wrong in a loop that survived it. The services' own detail enums are in their
/// modules ([`supervisor`], [`exec`], ...).
pub mod error {
    pub use forkbus_router::{Error as RouterError, ProtocolError};
    pub use forkbus_runtime::{
        BusError, DecodeError, EncodeError, ForkError, NameError, SendError,
    };
}

/// The loop's other parts: the application's descriptors and timers, listener ids, the
/// tickets of handle sends, the descriptors a bus holds, the clock, and the exit codes of
/// forked children.
pub mod bus {
    pub use forkbus_runtime::{
        decode, describe_fd, monotonic_now, Descriptors, FdId, FdReady, Interest, ListenerId,
        Ticket, TimerId, EXIT_OS_ERROR, EXIT_PANIC, EXIT_PARENT_GONE,
    };
}

/// The README's examples, compiled and run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
