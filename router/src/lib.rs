//! The routing core of forkbus: envelopes, the wire, routing tables, flooding with duplicate
//! suppression, and delivery accounting — with no I/O at all.
//!
//! This crate is to forkbus what `quinn-proto` is to quinn: the whole protocol as a pure,
//! deterministic state machine. It opens no socket, reads no clock (every input that needs
//! the time takes `now`), starts no thread and touches no file. The runtime
//! (`forkbus-runtime`) moves bytes and time in and out; tests drive many routers in the
//! deterministic `sim::Sim` (feature `testing`).
//!
//! The shape is that of `quinn_proto::Connection`:
//!
//! - inputs: [`Router::handle_link_up`], [`Router::handle_input`],
//!   [`Router::handle_link_down`], [`Router::handle_timeout`], [`Router::submit`];
//! - outputs: [`Router::poll_transmit`] with [`Router::pending_output`] and
//!   [`Router::advance_output`], [`Router::poll_event`], [`Router::poll_timeout`].
//!
//! Effects are data ([`Event`]); the router never calls user code.
//!
//! # Promises
//!
//! - Unicast follows the routing table, one link per hop; broadcast and group envelopes are
//!   flooded to every link with members but the one they came on; every node keeps a
//!   bounded window of seen ids per origin, so nothing is delivered twice.
//! - With a receipt, the origin gets exactly one outcome per envelope, and it is true:
//!   [`Event::Delivered`], or [`Event::Lost`] whose [`Fate`] says whether it surely did not
//!   arrive ([`LossReason`]: safe to retry) or may have ([`UnknownReason`]). A link that
//!   goes down yields its lost list ([`LinkDown`]): every envelope queued for it or written
//!   and not acknowledged, whole. Origins elsewhere get notices, never dropped while the
//!   links to them stand.
//! - A forward never drops for want of room: it waits and holds its input back
//!   (backpressure, hop by hop). With no failure, every receipt ends delivered.
//! - Where a node lives is fixed by topology (its first announcement); traffic never moves
//!   it, and a tree link that contradicts it is closed.
//! - Queues, windows, tables and names are bounded whatever peers send; a malformed frame
//!   closes one link and nothing else; a link that stalls is closed.
//!
//! # Trust
//!
//! Bytes from a peer are untrusted: nothing a peer sends can make a router panic, allocate
//! without bound, or close another link. A tree link speaks only for the nodes behind it
//! ([`LinkRole`]); within that, a node may still lie about envelopes that passed through it
//! (claim one it carried was lost). Receipts are believed only from the node an envelope is
//! bound to.
//!
//! # The wire format
//!
//! Each link carries length-prefixed frames with compact CBOR bodies (version
//! `WIRE_VERSION`, 2; a hello opens with the magic `"FKBS"`):
//!
//! ```text
//!  0        4      5
//!  ┌────────┬──────┬──────────────────────────────────────────────┐
//!  │ len    │ kind │ body: one CBOR array (ciborium-ll)           │
//!  │ u32 BE │ u8   │ integers, one byte string, a few text names  │
//!  └────────┴──────┴──────────────────────────────────────────────┘
//!  len counts kind + body and is checked against the frame limit before anything is
//!  allocated for the frame.
//!
//!  hello     [magic, version, host, pid, incarnation]
//!  envelope  [link_seq, o.host, o.pid, o.inc, seq, hops, hop_limit, flags,
//!             dst_kind, dst.., payload, trace?]
//!             dst_kind 0: node [host, pid, inc]   1: name [text]
//!                      2: group [text]            3: broadcast []
//!                      4: name at node [text, host, pid, inc]
//!             trace (when flags has TRACE): [[host, pid, inc, link+1 or 0, at_nanos], ..]
//!  ack       [cumulative envelope frames received]
//!  routes    [[full..], [removed..], [delta..]]
//!             full     [host, pid, inc, version, [names..], [groups..]]
//!             removed  [host, pid, inc]
//!             delta    [host, pid, inc, version, [+names..], [-names..], [+groups..], [-groups..]]
//!  control   [code, data]
//!  notice    [link_seq, o.host, o.pid, o.inc, seq, from.host, from.pid, from.inc, hops,
//!             kind, arg..]   (numbered with the link's envelopes, acknowledged alike)
//!             to the origin o of envelope seq, said by node `from`:
//!             kind 0: delivered []   1: lost or unknown [fate code, receipt 0|1]
//!             2: moved to a new holder [host, pid, inc] (custody handed it over)
//! ```
//!
//! The header is an array of integers with no field names, and the payload one byte string,
//! so an envelope costs a handful of bytes over its payload and decodes without serde (see
//! the `cbor` module for the heads).
//!
//! The encoders and decoders (`wire`) and the simulator (`sim`) are public with the
//! `testing` feature only: they are for tests, fuzzing and tools, not stable API.

mod cbor;
mod dedup;
mod error;
mod event;
mod hash;
mod id;
mod router;
#[cfg(feature = "testing")]
pub mod sim;
mod stats;
mod table;
#[cfg(feature = "testing")]
pub mod wire;
#[cfg(not(feature = "testing"))]
#[allow(unreachable_pub, dead_code)]
mod wire;

pub use dedup::{SeenTable, SeenWindow};
pub use error::{Error, ProtocolError};
pub use event::{
    DownCause, Event, Fate, LinkDown, LossReason, LossReport, LostEnvelope, UnknownReason,
};
pub use id::{Address, Destination, LinkId, LinkRole, MessageId, NodeId, Timestamp};
pub use router::{LinkStats, NoRoutePolicy, Refused, Router, RouterConfig, SendOptions};
pub use stats::{LossStats, RouterStats};
pub use wire::{Envelope, Flags, Hop};
