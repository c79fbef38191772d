//! Errors: what a caller can act on ([`Error`]) and what a peer did wrong ([`ProtocolError`]).

use std::fmt;

use crate::id::{LinkId, NodeId};

/// An error of the routing core.
///
/// Refusals of local submissions are values the caller can act on: a [`Error::QueueFull`]
/// clears when the link drains (the router then emits
/// [`Event::LinkReady`](crate::Event::LinkReady)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A link the envelope must go out on holds as many envelopes or bytes as it may; nothing
    /// was queued anywhere.
    QueueFull {
        /// The full link.
        link: LinkId,
    },
    /// The encoded envelope would exceed the frame size limit.
    PayloadTooLarge {
        /// Size of the frame the envelope would need.
        len: usize,
        /// The configured frame size limit.
        max: usize,
    },
    /// Delivery receipts exist only for unicast destinations (node, pid, name).
    ReceiptNeedsUnicast,
    /// As many envelopes await a receipt as the configuration allows.
    TooManyPendingReceipts {
        /// The configured bound.
        max: usize,
    },
    /// The name is held by another node (names are unique; only a parent may hand a name
    /// to the child it forks).
    NameTaken {
        /// The name.
        name: String,
        /// The node holding it, as this node knows.
        holder: NodeId,
    },
    /// This node has as many names or groups as the configuration allows (per node or in
    /// the whole table).
    TooManyNames {
        /// The bound reached.
        max: usize,
    },
    /// A name or group name is empty or longer than the configured limit.
    InvalidName {
        /// Its length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// No open link has this id (it went down, or never existed).
    UnknownLink(LinkId),
    /// The configuration is inconsistent; the text says which bound.
    InvalidConfig(&'static str),
    /// A peer broke the protocol; its link was closed.
    Protocol(ProtocolError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull { link } => write!(f, "queue of link {link} is full"),
            Self::PayloadTooLarge { len, max } => {
                write!(
                    f,
                    "envelope of {len} bytes exceeds the frame limit of {max}"
                )
            }
            Self::ReceiptNeedsUnicast => {
                f.write_str("delivery receipts need a unicast destination")
            }
            Self::TooManyPendingReceipts { max } => {
                write!(f, "{max} envelopes already await a receipt")
            }
            Self::NameTaken { name, holder } => {
                write!(f, "name {name:?} is held by node {holder}")
            }
            Self::TooManyNames { max } => write!(f, "at the bound of {max} names or groups"),
            Self::InvalidName { len, max } => {
                write!(f, "name of {len} bytes is empty or longer than {max}")
            }
            Self::UnknownLink(link) => write!(f, "no open link {link}"),
            Self::InvalidConfig(what) => write!(f, "invalid configuration: {what}"),
            Self::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Protocol(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Self::Protocol(e)
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::QueueFull { .. } => std::io::ErrorKind::WouldBlock,
            Error::Protocol(_) => std::io::ErrorKind::InvalidData,
            Error::UnknownLink(_) => std::io::ErrorKind::NotConnected,
            _ => std::io::ErrorKind::InvalidInput,
        };
        Self::new(kind, e)
    }
}

/// What a peer sent that breaks the protocol. The link it came on is closed; nothing else is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A length prefix announced a frame over the limit (checked before allocating).
    FrameTooLarge {
        /// The announced length.
        len: u32,
        /// The configured limit.
        max: u32,
    },
    /// A frame with a zero length prefix.
    EmptyFrame,
    /// A frame kind this version does not know.
    UnknownFrameKind(u8),
    /// A frame body that does not decode; the text names the field.
    Malformed(&'static str),
    /// The hello did not start with the forkbus magic number.
    BadMagic,
    /// The peer speaks another version of the wire format.
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
    /// A frame other than hello arrived before the hello.
    HelloMissing,
    /// A second hello on one link.
    DuplicateHello,
    /// The hello named another node than the one this link was opened to.
    PeerMismatch {
        /// The node the link was opened to.
        expected: NodeId,
        /// The node the hello named.
        got: NodeId,
    },
    /// An envelope frame skipped link sequence numbers (a reliable stream cannot lose frames).
    SequenceGap {
        /// The next sequence number expected.
        expected: u64,
        /// The one that came.
        got: u64,
    },
    /// The peer announced a node, or sent an envelope or notice from a node, that lives
    /// behind another link of this router (or is this router): a node lives behind one
    /// link, and traffic never moves it.
    RouteConflict {
        /// The node.
        node: NodeId,
    },
    /// An envelope or notice from a node this router was never told lives behind the link
    /// it came on.
    UnknownOrigin {
        /// The claimed origin.
        node: NodeId,
    },
    /// The peer announced more nodes than the routing table may hold.
    TooManyNodes {
        /// The configured bound.
        max: usize,
    },
    /// The peer announced more names or groups than allowed (per node or in all).
    TooManyNames {
        /// The bound passed.
        max: usize,
    },
    /// A handed-over envelope came from another link than this node's parent.
    HandedNotFromParent,
    /// The peer sent on while this node held its envelopes back (their forwards waited for
    /// room): more unacknowledged envelopes than any peer with the tree's queue bounds may
    /// have in flight.
    WindowExceeded {
        /// Envelopes held back.
        held: usize,
    },
    /// An acknowledgement went backwards or covered frames not yet written.
    BadAck {
        /// The cumulative count acknowledged.
        acked: u64,
        /// Frames fully written so far.
        written: u64,
        /// The previous acknowledgement.
        previous: u64,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes announced, limit is {max}")
            }
            Self::EmptyFrame => f.write_str("frame of length zero"),
            Self::UnknownFrameKind(k) => write!(f, "unknown frame kind {k}"),
            Self::Malformed(what) => write!(f, "malformed frame: {what}"),
            Self::BadMagic => f.write_str("hello without the forkbus magic number"),
            Self::VersionMismatch { ours, theirs } => {
                write!(f, "peer speaks wire version {theirs}, we speak {ours}")
            }
            Self::HelloMissing => f.write_str("frame before hello"),
            Self::DuplicateHello => f.write_str("second hello on one link"),
            Self::PeerMismatch { expected, got } => {
                write!(f, "hello from {got} on a link opened to {expected}")
            }
            Self::SequenceGap { expected, got } => {
                write!(f, "link sequence {got} where {expected} was due")
            }
            Self::RouteConflict { node } => {
                write!(f, "node {node} lives behind another link")
            }
            Self::UnknownOrigin { node } => {
                write!(f, "node {node} was never announced behind this link")
            }
            Self::TooManyNodes { max } => write!(f, "more than {max} nodes announced"),
            Self::TooManyNames { max } => {
                write!(f, "more than {max} names or groups announced")
            }
            Self::HandedNotFromParent => {
                f.write_str("a handed-over envelope from another link than the parent's")
            }
            Self::WindowExceeded { held } => write!(
                f,
                "{held} envelopes held back: the peer ignores the acknowledgement window"
            ),
            Self::BadAck {
                acked,
                written,
                previous,
            } => write!(
                f,
                "acknowledgement of {acked} frames (previous {previous}, written {written})"
            ),
        }
    }
}

impl std::error::Error for ProtocolError {}
