//! Events: what the router tells the application, as data.

use std::fmt;

use crate::error::ProtocolError;
use crate::id::{LinkId, MessageId, NodeId};
use crate::wire::Envelope;

/// How far a lost envelope got onto the link that went down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteState {
    /// Still queued: not one byte written.
    NeverWritten,
    /// Written in part (a half-written frame the peer can never decode).
    PartiallyWritten,
    /// Written whole but not acknowledged: the peer may or may not have taken it.
    Unacknowledged,
}

/// Why an envelope was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossReason {
    /// The link it was queued on went down.
    PeerDown(WriteState),
    /// No route to its destination.
    NoRoute,
    /// It would have exceeded its hop limit.
    HopLimit,
    /// The next link's queue was full (a forwarded envelope; local sends are refused instead).
    QueueFull,
    /// No receipt came within the receipt timeout.
    Timeout,
    /// Its destination left the tree before a receipt came.
    DestinationDown,
    /// It grew past the frame limit on its way (its trace) and could not be forwarded.
    TooLarge,
}

impl LossReason {
    /// The reason's number on the wire (loss notices).
    pub fn code(self) -> u64 {
        match self {
            Self::PeerDown(WriteState::NeverWritten) => 0,
            Self::PeerDown(WriteState::PartiallyWritten) => 1,
            Self::PeerDown(WriteState::Unacknowledged) => 2,
            Self::NoRoute => 3,
            Self::HopLimit => 4,
            Self::QueueFull => 5,
            Self::Timeout => 6,
            Self::DestinationDown => 7,
            Self::TooLarge => 8,
        }
    }

    /// The reason with this wire number, if any.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::PeerDown(WriteState::NeverWritten),
            1 => Self::PeerDown(WriteState::PartiallyWritten),
            2 => Self::PeerDown(WriteState::Unacknowledged),
            3 => Self::NoRoute,
            4 => Self::HopLimit,
            5 => Self::QueueFull,
            6 => Self::Timeout,
            7 => Self::DestinationDown,
            8 => Self::TooLarge,
            _ => return None,
        })
    }
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PeerDown(WriteState::NeverWritten) => "peer down (never written)",
            Self::PeerDown(WriteState::PartiallyWritten) => "peer down (partially written)",
            Self::PeerDown(WriteState::Unacknowledged) => "peer down (written, not acknowledged)",
            Self::NoRoute => "no route",
            Self::HopLimit => "hop limit",
            Self::QueueFull => "queue full",
            Self::Timeout => "timeout",
            Self::DestinationDown => "destination down",
            Self::TooLarge => "too large to forward",
        })
    }
}

/// One envelope of a lost list, whole, with the reason it was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostEnvelope {
    /// The envelope as it was queued.
    pub envelope: Envelope,
    /// Why it is lost.
    pub reason: LossReason,
}

/// Why a link went down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownCause {
    /// The caller reported it down (end of file, a socket error, the peer reaped).
    Closed,
    /// The peer broke the protocol.
    Protocol(ProtocolError),
    /// The peer stopped reading and its link's control output passed its bound.
    Overrun,
    /// The caller closed it.
    Local,
}

/// A link went down: who was behind it, why, and every envelope it lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkDown {
    /// The link (its id is dead from now on).
    pub link: LinkId,
    /// The neighbour, when known.
    pub peer: Option<NodeId>,
    /// Why.
    pub cause: DownCause,
    /// Every envelope queued for it or written and not acknowledged, in link order.
    pub lost: Vec<LostEnvelope>,
}

/// An envelope of this node's that was lost, here or anywhere on its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LossReport {
    /// The envelope's id.
    pub id: MessageId,
    /// Why.
    pub reason: LossReason,
    /// The node where it was lost.
    pub at: NodeId,
}

/// Everything the router has to tell its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An envelope for this node's application.
    Message {
        /// The envelope (its trace complete, when asked for).
        envelope: Envelope,
        /// The link it came in on (`None` when this node sent it to itself).
        link: Option<LinkId>,
    },
    /// A local envelope was written whole on every link it was queued on (a hand-off to the
    /// kernel, not a delivery).
    Sent(MessageId),
    /// A receipt: the destination took the envelope.
    Delivered(MessageId),
    /// An envelope of this node's was lost. For an envelope sent with a receipt this and
    /// [`Event::Delivered`] together come exactly once.
    Lost(LossReport),
    /// A neighbour said hello.
    LinkUp {
        /// The link.
        link: LinkId,
        /// The neighbour.
        peer: NodeId,
    },
    /// A link went down, with its lost list.
    LinkDown(LinkDown),
    /// A link that refused a local send has room again.
    LinkReady(LinkId),
    /// A link-level control frame from a neighbour.
    Control {
        /// The link it came on.
        link: LinkId,
        /// Its code.
        code: u32,
        /// Its data.
        data: Vec<u8>,
    },
    /// A node left the tree (its route was withdrawn or its link went down).
    NodeDown(NodeId),
}
