//! The forkbus runtime: real processes, real socketpairs, one single-threaded reactor per
//! process over a slab of peer sockets, driving a [`forkbus_router::Router`].
//!
//! # A tour
//!
//! ```no_run
//! use forkbus_runtime::{Bus, BusConfig, ForkOptions, Listener, Message, Pid};
//! use forkbus_router::{Address, Destination};
//!
//! struct Echo;
//! impl Listener for Echo {
//!     fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
//!         let text: String = msg.decode().unwrap_or_default();
//!         let _ = bus.send(msg.origin(), &format!("echo: {text}"));
//!     }
//! }
//!
//! # fn main() -> std::io::Result<()> {
//! let mut bus = Bus::root(BusConfig::default())?;
//! let child = bus.fork(ForkOptions::named("echo"), |bus| {
//!     bus.add_listener(0, Echo);
//! })?;
//! bus.send(child, &"hello")?;
//! bus.send(Address::To(Destination::Name("echo".into())), &"by name")?;
//! bus.run()?; // until stop(), SIGTERM (graceful tree shutdown) or ...
//! # Ok(())
//! # }
//! ```
//!
//! - [`Bus`]: one per process. [`Bus::root`] makes the root; [`Bus::fork`] forks a child
//!   that runs a closure with a bus of its own, then its loop, then exits (it never returns
//!   into the caller's code); the parent gets the pid, the route usable at once.
//! - Sending: [`Bus::send`] encodes any `serde` value as CBOR to a pid, node, name, group or
//!   everyone; [`Message::decode`] decodes it on arrival.
//! - [`Listener`]s, in priority order, hear of messages, hand-offs, receipts, losses, peer
//!   shutdowns with their lost lists, child exits and errors; a panicking listener is
//!   caught and reported.
//! - [`Bus::run`] runs the reactor; [`Bus::stop`] ends it; [`Bus::shutdown_tree`] (or
//!   `SIGTERM`/`SIGINT`) drains the tree bottom-up and ends with a [`Tally`].
//! - [`BusHandle`]: send and stop from other threads.
//! - [`Bus::add_fd`] and [`Bus::add_timer`]: the application's descriptors and timers in the
//!   same reactor.
//! - [`Bus::exec`]: an external program, its output captured through the reactor, its result
//!   reported once it exited and its pipes closed ([`exec`]); [`Bus::exec_node`] and
//!   [`Bus::join_from_env`]: a program that joins the tree as a node ([`external`]).
//! - [`Supervisor`] ([`supervisor`]): supervised children that restart with backoff and an
//!   intensity limit, keep their names, recycle after N messages, answer heartbeats and
//!   reload one at a time; [`TaskPool`] ([`pool`]): jobs with exactly one outcome each.
//! - Errors: each call returns its own detail enum ([`SendError`], [`ForkError`],
//!   [`NameError`], ...), refusals as values to act on; [`Error`] gathers them all, so that
//!   `?` converts any of them, and converts into an [`io::Error`](std::io::Error).
//!
//! # Processes and descriptors
//!
//! Fork refuses when the process has more than one thread. A child closes every
//! descriptor of its parent's bus (links, signalfd, poller, registered descriptors) and
//! every other descriptor it inherited, right after `fork`, except 0, 1, 2 and those the
//! parent names in [`ForkOptions::keep_fd`] ([`ChildSpec::keep_fd`] for supervised
//! children): a file, pipe or listening socket the application opened, before or after
//! [`Bus::root`], reaches a child only when kept. It then holds exactly: its parent link,
//! its own children's links, its poller's descriptors (epoll, an eventfd, a timerfd), its
//! signalfd ([`Bus::descriptors`]), stdio and what it was told to keep. Values of the
//! parent's that own a descriptor not kept must not be used or dropped in the child (see
//! [`Bus::fork`]). Sockets are non-blocking and close-on-exec from birth. With
//! [`ForkOptions::die_with_parent`] (the default) a child gets `SIGKILL` when its parent
//! dies, the race with an early death checked.
//!
//! The library starts no thread and installs no `tracing` subscriber; it opens a span per
//! process (`bus`, with `pid` and `node`) and per link (`link`).

mod bus;
mod child;
mod clock;
pub mod daemon;
mod error;
mod event;
pub mod exec;
pub mod external;
mod forge;
mod handle;
pub mod identity;
mod listener;
mod listener_set;
mod message;
pub mod pool;
mod reactor;
pub mod shm;
mod signals;
pub mod supervisor;
mod ticket;
mod timer;
mod umbrella;

pub use bus::{
    Bus, BusConfig, Descriptors, ForkOptions, Stop, EXIT_OS_ERROR, EXIT_PANIC, EXIT_PARENT_GONE,
};
pub use clock::monotonic_now;
pub use error::{BusError, DecodeError, EncodeError, ForkError, NameError, SendError};
pub use event::{Event, ServiceEvent};
pub use forkbus_node::{ExitStatus, Pid, Tally};
pub use forkbus_node::{PeerShutdown, Relation};
pub use handle::BusHandle;
pub use listener::Listener;
pub use listener_set::ListenerId;
pub use message::{decode, Message};
pub use pool::{TaskId, TaskOutcome, TaskPool};
pub use reactor::{describe_fd, FdId, FdReady, Interest};
pub use supervisor::{should_stop, ChildSpec, Restart, SupervisionEvent, Supervisor};
pub use ticket::Ticket;
pub use timer::TimerId;
pub use umbrella::Error;

pub use forkbus_router::{
    Address, Destination, Fate, LossReason, LossReport, LostEnvelope, MessageId, NodeId,
    RouterConfig, SendOptions, Timestamp, UnknownReason,
};

/// The services every bus is born with, in the order they hear events. This is the one
/// place that names them: the crate root wires them into the bus, which names none.
pub(crate) fn builtin_services() -> [&'static dyn listener::Service; 2] {
    [&supervisor::SupervisionService, &exec::ExecService]
}

/// Addresses, spelled shortly.
pub mod to {
    use forkbus_router::{Address, Destination};

    /// The node that registered `name`.
    pub fn name(name: impl Into<String>) -> Address {
        Address::To(Destination::Name(name.into()))
    }

    /// Every member of `group`, once each.
    pub fn group(group: impl Into<String>) -> Address {
        Address::To(Destination::Group(group.into()))
    }

    /// Every node of the tree but the sender, once each.
    pub fn broadcast() -> Address {
        Address::To(Destination::Broadcast)
    }

    /// The live node with this pid.
    pub fn pid(pid: forkbus_node::Pid) -> Address {
        Address::Pid(pid.as_raw())
    }
}
