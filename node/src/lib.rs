//! The node core of forkbus: one process of the tree — its router, its children and their
//! lives, the graceful drain of its subtree and the tally of what it did — as pure state
//! machines.
//!
//! This crate is the layer above `forkbus-router` that `forkbus-runtime` drives: it opens
//! no socket, reads no clock (every input that needs the time takes `now`), forks nothing,
//! kills nothing and starts no thread. Where the world must change, it says so as data
//! ([`Action::Kill`], [`NodeEvent`]); the runtime's bus makes the syscalls. Tests drive
//! whole trees of nodes, with a fake process table, in the deterministic `sim::ProcSim`
//! (feature `testing`).
//!
//! # Promises
//!
//! - Each link ends in exactly one [`NodeEvent::PeerShutdown`] with its lost list; each
//!   child in exactly one [`NodeEvent::ChildExit`] after it, whether the child's link went
//!   down before it was reaped or after ([`ChildState`]).
//! - A drain loses nothing that is in flight: sends are refused everywhere
//!   ([`Refusal::Draining`]), probe waves run down the subtree until two in a row find
//!   every process idle with nothing received, and only then does the subtree exit,
//!   bottom-up; each process reports its subtree's [`Tally`] as its last frame.
//! - A drain that cannot get quiet ends at its deadline: children left are killed
//!   ([`Action::Kill`]) and the tally counts what they took with them as unreported.
//! - Control frames are taken only from the relation that may send them ([`Control`]);
//!   anything else is [`NodeEvent::BadControl`].

mod children;
mod control;
mod drain;
mod node;
mod process;
#[cfg(feature = "testing")]
pub mod sim;
mod tally;

pub use children::{Child, ChildState};
pub use control::supervision::{SupervisionFrame, SupervisionSender};
pub use control::Control;
pub use node::{Action, LinkInfo, Node, NodeConfig, NodeEvent, PeerShutdown, Refusal, Relation};
pub use process::{ExitStatus, Pid};
pub use tally::Tally;
