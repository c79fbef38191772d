//! Events and outcomes: what the router tells the application, as data.
//!
//! Every outcome says how much is known. [`Fate::Lost`] means the envelope *surely* did not
//! reach its destination's application (it was never written, refused, had no route, ...):
//! retrying it cannot make a duplicate. [`Fate::Unknown`] means it may or may not have
//! arrived (written but not acknowledged when a peer died, the destination died after it
//! could have taken it, no receipt in time): retrying it may deliver it twice.

use std::fmt;

use crate::error::ProtocolError;
use crate::id::{Destination, LinkId, MessageId, NodeId};
use crate::wire::Envelope;

/// Why an envelope surely did not reach its destination: safe to send again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossReason {
    /// Queued for a link that went down before one byte of it was written.
    NeverWritten,
    /// Written in part to a link that went down: a half frame the peer can never decode.
    PartiallyWritten,
    /// No route to its destination.
    NoRoute,
    /// It would have exceeded its hop limit.
    HopLimit,
    /// A name's custodian held as many envelopes as it may. (A full link never loses a
    /// forward: it waits, holding back its input; local sends are refused instead.)
    QueueFull,
    /// It grew past the frame limit on its way (its trace) and could not be forwarded.
    TooLarge,
    /// A name's custodian held it for a worker that did not come back, and gave it up.
    Abandoned,
}

/// Why an envelope's fate is unknown: it may have arrived. Sending it again may deliver
/// it twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnknownReason {
    /// Written whole to a link that went down before the peer acknowledged it.
    Unacknowledged,
    /// Its destination left the tree before a receipt came (it may have taken it).
    DestinationDown,
    /// No receipt came within the receipt timeout.
    Timeout,
}

/// What became of an envelope that was not (known to be) delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fate {
    /// Surely not delivered: safe to retry.
    Lost(LossReason),
    /// Maybe delivered: a retry may be a duplicate.
    Unknown(UnknownReason),
}

impl Fate {
    /// Whether the envelope surely did not arrive (a retry cannot duplicate it).
    pub fn is_sure_loss(self) -> bool {
        matches!(self, Self::Lost(_))
    }

    /// The fate's number on the wire (notices).
    pub fn code(self) -> u64 {
        match self {
            Self::Lost(LossReason::NeverWritten) => 0,
            Self::Lost(LossReason::PartiallyWritten) => 1,
            Self::Unknown(UnknownReason::Unacknowledged) => 2,
            Self::Lost(LossReason::NoRoute) => 3,
            Self::Lost(LossReason::HopLimit) => 4,
            Self::Lost(LossReason::QueueFull) => 5,
            Self::Unknown(UnknownReason::Timeout) => 6,
            Self::Unknown(UnknownReason::DestinationDown) => 7,
            Self::Lost(LossReason::TooLarge) => 8,
            Self::Lost(LossReason::Abandoned) => 9,
        }
    }

    /// The fate with this wire number, if any.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Lost(LossReason::NeverWritten),
            1 => Self::Lost(LossReason::PartiallyWritten),
            2 => Self::Unknown(UnknownReason::Unacknowledged),
            3 => Self::Lost(LossReason::NoRoute),
            4 => Self::Lost(LossReason::HopLimit),
            5 => Self::Lost(LossReason::QueueFull),
            6 => Self::Unknown(UnknownReason::Timeout),
            7 => Self::Unknown(UnknownReason::DestinationDown),
            8 => Self::Lost(LossReason::TooLarge),
            9 => Self::Lost(LossReason::Abandoned),
            _ => return None,
        })
    }
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NeverWritten => "peer down (never written)",
            Self::PartiallyWritten => "peer down (partially written)",
            Self::NoRoute => "no route",
            Self::HopLimit => "hop limit",
            Self::QueueFull => "queue full",
            Self::TooLarge => "too large to forward",
            Self::Abandoned => "abandoned by the name's custodian",
        })
    }
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unacknowledged => "peer down (written, not acknowledged)",
            Self::DestinationDown => "destination down",
            Self::Timeout => "timeout",
        })
    }
}

impl fmt::Display for Fate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lost(r) => write!(f, "lost: {r}"),
            Self::Unknown(r) => write!(f, "unknown: {r}"),
        }
    }
}

impl From<LossReason> for Fate {
    fn from(r: LossReason) -> Self {
        Self::Lost(r)
    }
}

impl From<UnknownReason> for Fate {
    fn from(r: UnknownReason) -> Self {
        Self::Unknown(r)
    }
}

/// One envelope of a lost list, whole, with what is known of its fate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostEnvelope {
    /// The envelope as it was queued.
    pub envelope: Envelope,
    /// Never written or partly written ([`Fate::Lost`]), or written and not acknowledged
    /// ([`Fate::Unknown`]).
    pub fate: Fate,
}

/// Why a link went down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownCause {
    /// The caller reported it down (end of file, a socket error, the peer reaped).
    Closed,
    /// The peer broke the protocol.
    Protocol(ProtocolError),
    /// The peer stopped reading (or acknowledging) and its link's control output — unwritten
    /// bytes, or notices it did not acknowledge — passed its bound.
    Overrun,
    /// The link made no progress within the stall timeout: output waited unwritten, or a
    /// frame the peer began was never completed.
    Stalled,
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
    /// Distinct nodes ever announced behind it, the neighbour included (for a child: every
    /// process its subtree ever had that this node heard of).
    pub nodes_ever: u64,
}

/// The final outcome of an envelope of this node's that was not delivered: where, and
/// whether it surely did not arrive.
///
/// For an envelope sent with a receipt this and [`Event::Delivered`] together come exactly
/// once, and `payload` holds the payload (the router keeps it until the outcome): retry a
/// [`Fate::Lost`] with it. Without a receipt, a report comes for losses the router hears
/// of (at most one per envelope) and `payload` is there when the loss was at this node.
#[derive(Clone, PartialEq, Eq)]
pub struct LossReport {
    /// The envelope's id.
    pub id: MessageId,
    /// Surely lost, or unknown.
    pub fate: Fate,
    /// The node where it was lost (this node for timeouts and departed destinations).
    pub at: NodeId,
    /// Where it was addressed, when known here.
    pub destination: Option<Destination>,
    /// Its payload, when known here.
    pub payload: Option<Vec<u8>>,
}

impl LossReport {
    /// Whether the envelope surely did not arrive: a retry cannot make a duplicate.
    pub fn is_sure_loss(&self) -> bool {
        self.fate.is_sure_loss()
    }
}

impl fmt::Debug for LossReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossReport")
            .field("id", &self.id)
            .field("fate", &self.fate)
            .field("at", &self.at)
            .field("destination", &self.destination)
            .field("payload_len", &self.payload.as_ref().map(Vec::len))
            .finish()
    }
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
    /// An envelope of this node's was lost or its fate is unknown. For an envelope sent
    /// with a receipt this and [`Event::Delivered`] together come exactly once.
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
    /// An envelope for a name this node holds in custody was taken (not delivered: its
    /// receipt waits for the name's next holder).
    Held {
        /// The name.
        name: String,
        /// The envelope's id.
        id: MessageId,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fate_codes_round_trip_and_sort_certainty() {
        let mut sure = 0;
        for code in 0..16 {
            if let Some(f) = Fate::from_code(code) {
                assert_eq!(f.code(), code);
                sure += usize::from(f.is_sure_loss());
            }
        }
        assert_eq!(sure, 7);
        assert_eq!(Fate::from_code(10), None);
        assert!(!Fate::Unknown(UnknownReason::Unacknowledged).is_sure_loss());
        assert!(Fate::Lost(LossReason::PartiallyWritten).is_sure_loss());
    }
}
