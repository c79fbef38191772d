//! Errors: one [`Error`] for the runtime, with a detail enum per concern beneath it.
//!
//! Each operation returns its own detail enum ([`SendError`], [`ForkError`],
//! [`NameError`], ...): an expected refusal is a value the caller can act on (a full queue
//! to wait out, a name held by another node). [`Error`] gathers them, so `?` works in a
//! function that does several things; a refusal is never a string. OS failures stay
//! [`io::Error`], wrapped as they came.

use std::fmt;
use std::io;

use forkbus_router::{Address, LinkId, NodeId, ProtocolError};

use crate::listener_set::ListenerId;
use crate::ticket::Ticket;

/// Why a value could not be encoded as CBOR. Nothing was sent or stored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoding passed `limit` bytes and was stopped there, before the value was
    /// encoded whole: it can never fit. How large it would have grown is not known.
    TooLarge {
        /// The most bytes the encoding may take (for a send: the frame limit, which holds
        /// the payload and more).
        limit: usize,
    },
    /// The value's `Serialize` implementation failed (a custom serde error: a map whose
    /// keys fail to serialize, a `collect_str` whose `Display` failed, ...).
    Serialize {
        /// What the `Serialize` implementation said.
        message: String,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { limit } => {
                write!(f, "the encoding passes the limit of {limit} bytes")
            }
            Self::Serialize { message } => write!(f, "the value failed to serialize: {message}"),
        }
    }
}

impl std::error::Error for EncodeError {}

impl EncodeError {
    /// The [`io::ErrorKind`] of this refusal: too large is invalid input, a failed
    /// `Serialize` invalid data.
    pub(crate) fn io_kind(&self) -> io::ErrorKind {
        match self {
            Self::TooLarge { .. } => io::ErrorKind::InvalidInput,
            Self::Serialize { .. } => io::ErrorKind::InvalidData,
        }
    }
}

impl From<EncodeError> for io::Error {
    fn from(e: EncodeError) -> Self {
        Self::new(e.io_kind(), e)
    }
}

/// Why a send was refused. Nothing was queued anywhere.
#[derive(Debug)]
#[non_exhaustive]
pub enum SendError {
    /// The value could not be encoded as CBOR (too large for a frame, or its `Serialize`
    /// failed).
    Encode(EncodeError),
    /// A link the envelope must go out on holds as much as it may. Wait for
    /// [`Listener::on_send_ready`](crate::Listener::on_send_ready) and send again.
    QueueFull {
        /// The neighbour behind the full link, when known.
        peer: Option<NodeId>,
    },
    /// The bus is draining for shutdown and takes no new envelopes.
    ShuttingDown,
    /// The bus behind a [`BusHandle`](crate::BusHandle) is gone.
    Disconnected,
    /// A [`BusHandle`](crate::BusHandle) was used in another process than its bus's (it was
    /// copied into a forked child).
    OtherProcess,
    /// The channel of a [`BusHandle`](crate::BusHandle) is full
    /// ([`try_send`](crate::BusHandle::try_send) only).
    HandleFull,
    /// Another refusal of the routing core (an envelope larger than a frame, a receipt for
    /// a group, too many pending receipts, an invalid name, ...).
    Router(forkbus_router::Error),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Encode(e) => write!(f, "cannot encode the payload: {e}"),
            Self::QueueFull { peer: Some(p) } => write!(f, "the queue towards {p} is full"),
            Self::QueueFull { peer: None } => f.write_str("a link queue is full"),
            Self::ShuttingDown => f.write_str("the bus is shutting down"),
            Self::Disconnected => f.write_str("the bus is gone"),
            Self::OtherProcess => f.write_str("bus handle used in another process than its bus's"),
            Self::HandleFull => f.write_str("the bus handle's channel is full"),
            Self::Router(e) => write!(f, "refused by the router: {e}"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Encode(e) => Some(e),
            Self::Router(e) => Some(e),
            _ => None,
        }
    }
}

impl From<EncodeError> for SendError {
    fn from(e: EncodeError) -> Self {
        Self::Encode(e)
    }
}

impl SendError {
    pub(crate) fn from_router(error: forkbus_router::Error, peer: Option<NodeId>) -> Self {
        use forkbus_router::Error as E;
        match error {
            E::QueueFull { .. } => Self::QueueFull { peer },
            other => Self::Router(other),
        }
    }
}

impl From<SendError> for io::Error {
    /// A full queue or channel is `WouldBlock`, a bus gone `NotConnected`, a refusal of the
    /// encoder or the router the kind of their own conversions; shutting down and a handle
    /// in another process are `Other`.
    fn from(e: SendError) -> Self {
        Self::new(send_kind(&e), e)
    }
}

/// Why a fork was refused or failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ForkError {
    /// The process has more than one thread: in a forked child only async-signal-safe calls
    /// would be allowed, so the bus refuses. Nothing was forked.
    Threaded {
        /// Threads counted in `/proc/self/task`.
        threads: usize,
    },
    /// The bus is draining for shutdown and forks nothing more.
    ShuttingDown,
    /// The child's name was refused (invalid, or held by another node). Nothing was
    /// forked.
    Name(NameError),
    /// An OS call failed (counting threads, `socketpair`, `fork`, registering the link).
    Io(io::Error),
}

impl fmt::Display for ForkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Threaded { threads } => {
                write!(f, "refusing to fork a process with {threads} threads")
            }
            Self::ShuttingDown => f.write_str("the bus is shutting down"),
            Self::Name(e) => write!(f, "the child's name was refused: {e}"),
            Self::Io(e) => write!(f, "fork failed: {e}"),
        }
    }
}

impl std::error::Error for ForkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            Self::Name(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ForkError> for io::Error {
    fn from(e: ForkError) -> Self {
        match e {
            ForkError::Io(e) => e,
            ForkError::Name(_) => Self::new(io::ErrorKind::InvalidInput, e),
            ForkError::Threaded { .. } | ForkError::ShuttingDown => Self::other(e),
        }
    }
}

impl From<io::Error> for ForkError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<nix::errno::Errno> for ForkError {
    fn from(e: nix::errno::Errno) -> Self {
        Self::Io(e.into())
    }
}

/// A payload is not the type it was decoded as.
#[derive(Debug)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not well-formed CBOR.
    Syntax {
        /// The type asked for.
        expected: &'static str,
        /// Byte offset of the error.
        offset: usize,
    },
    /// Well-formed CBOR, but not a value of the type asked for.
    Mismatch {
        /// The type asked for.
        expected: &'static str,
        /// What serde said.
        detail: String,
    },
    /// A value of the type, followed by bytes that belong to no value.
    TrailingBytes {
        /// The type asked for.
        expected: &'static str,
        /// How many bytes were left over.
        trailing: usize,
    },
    /// The value nests deeper than the decoder allows.
    TooDeep {
        /// The type asked for.
        expected: &'static str,
    },
    /// The bytes end inside a value (an empty payload, or one cut short).
    Truncated {
        /// The type asked for.
        expected: &'static str,
        /// How many bytes there were.
        len: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax { expected, offset } => {
                write!(
                    f,
                    "payload is not a {expected}: malformed CBOR at byte {offset}"
                )
            }
            Self::Mismatch { expected, detail } => {
                write!(f, "payload is not a {expected}: {detail}")
            }
            Self::TrailingBytes { expected, trailing } => {
                write!(
                    f,
                    "payload is a {expected} followed by {trailing} stray bytes"
                )
            }
            Self::TooDeep { expected } => {
                write!(f, "payload is not a {expected}: nested too deep")
            }
            Self::Truncated { expected, len } => {
                write!(
                    f,
                    "payload is not a {expected}: its {len} bytes end inside a value"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

impl DecodeError {
    /// The decoder's error, reading `len` bytes as an `expected`.
    pub(crate) fn from_ciborium<E>(
        e: ciborium::de::Error<E>,
        expected: &'static str,
        len: usize,
    ) -> Self {
        match e {
            // Reading from a slice fails only at its end.
            ciborium::de::Error::Io(_) => Self::Truncated { expected, len },
            ciborium::de::Error::Syntax(offset) => Self::Syntax { expected, offset },
            ciborium::de::Error::Semantic(_, detail) => Self::Mismatch { expected, detail },
            ciborium::de::Error::RecursionLimitExceeded => Self::TooDeep { expected },
        }
    }
}

impl From<DecodeError> for io::Error {
    /// Always `InvalidData`.
    fn from(e: DecodeError) -> Self {
        Self::new(io::ErrorKind::InvalidData, e)
    }
}

/// A name or group name was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// It is empty or longer than the configured limit.
    Invalid {
        /// Its length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// Another node holds it (names are unique; only a parent may hand a name on, to the
    /// child it forks).
    Taken {
        /// The name.
        name: String,
        /// The node holding it, as this node knows.
        holder: NodeId,
    },
    /// This node holds as many names or groups as it may (or the table as many as it
    /// may).
    TooMany {
        /// The bound.
        max: usize,
    },
    /// A link's control output is backed up (a slow peer): the announcement would pile up.
    /// Try again after the link drained
    /// ([`Listener::on_send_ready`](crate::Listener::on_send_ready) is not promised for
    /// this).
    Backlogged,
    /// Another refusal of the routing core, as it came. The router refuses name
    /// operations for none today but the reasons above; its error can grow.
    Router(forkbus_router::Error),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid { len, max } => {
                write!(f, "name of {len} bytes is empty or longer than {max}")
            }
            Self::Taken { name, holder } => write!(f, "name {name:?} is held by node {holder}"),
            Self::TooMany { max } => write!(f, "at the bound of {max} names or groups"),
            Self::Backlogged => f.write_str("a link's control output is backed up"),
            Self::Router(e) => write!(f, "refused by the router: {e}"),
        }
    }
}

impl std::error::Error for NameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Router(e) => Some(e),
            _ => None,
        }
    }
}

impl NameError {
    /// The router's refusal of a name operation: its reasons for refusing a name become
    /// this enum's variants, anything else is passed on as [`NameError::Router`].
    pub(crate) fn from_router(e: forkbus_router::Error) -> Self {
        use forkbus_router::Error as E;
        match e {
            E::InvalidName { len, max } => Self::Invalid { len, max },
            E::NameTaken { name, holder } => Self::Taken { name, holder },
            E::TooManyNames { max } => Self::TooMany { max },
            // The router refuses an announcement while a link's control output is full.
            E::QueueFull { .. } => Self::Backlogged,
            other => Self::Router(other),
        }
    }
}

impl From<NameError> for io::Error {
    /// Invalid is `InvalidInput`, taken `AlreadyExists`, too many `QuotaExceeded`,
    /// backlogged `WouldBlock`; a refusal of the router the kind of its conversion.
    fn from(e: NameError) -> Self {
        let kind = match &e {
            NameError::Invalid { .. } => io::ErrorKind::InvalidInput,
            NameError::Taken { .. } => io::ErrorKind::AlreadyExists,
            NameError::TooMany { .. } => io::ErrorKind::QuotaExceeded,
            NameError::Backlogged => io::ErrorKind::WouldBlock,
            NameError::Router(router) => Self::from(router.clone()).kind(),
        };
        Self::new(kind, e)
    }
}

/// Something went wrong that the loop survived; handed to
/// [`Listener::on_router_error`](crate::Listener::on_router_error).
#[derive(Debug)]
#[non_exhaustive]
pub enum BusError {
    /// A peer broke the protocol (a malformed or oversized frame, ...); its link was closed,
    /// its lost list follows in [`Listener::on_peer_shutdown`](crate::Listener::on_peer_shutdown).
    Protocol {
        /// The neighbour, when it had said hello.
        peer: Option<NodeId>,
        /// The link, now closed.
        link: LinkId,
        /// What it did wrong.
        error: ProtocolError,
    },
    /// A link was closed because its peer stopped reading (or acknowledging) while control
    /// output piled up.
    Overrun {
        /// The neighbour, when known.
        peer: Option<NodeId>,
    },
    /// A socket call on a link failed with something other than end of file or
    /// `WouldBlock`; the link was closed.
    Io {
        /// The neighbour, when known.
        peer: Option<NodeId>,
        /// The call.
        op: &'static str,
        /// The error.
        error: io::Error,
    },
    /// A listener method panicked; the other listeners and the loop went on.
    ListenerPanicked {
        /// The listener.
        listener: ListenerId,
        /// The method.
        method: &'static str,
        /// The panic message.
        message: String,
    },
    /// A timer or descriptor callback panicked; the loop went on.
    CallbackPanicked {
        /// `"timer"` or `"fd"`.
        what: &'static str,
        /// The panic message.
        message: String,
    },
    /// A send made through a [`BusHandle`](crate::BusHandle) was refused by the router.
    HandleSend {
        /// The ticket the handle's send returned.
        ticket: Ticket,
        /// Where it was going.
        to: Address,
        /// Why it was refused.
        error: SendError,
    },
    /// A link-level control frame from a neighbour could not be understood, or came from a
    /// neighbour that may not send it (a supervision frame from a program started with
    /// `Bus::exec_node`, a shutdown request from a child, ...); it was ignored.
    BadControl {
        /// The neighbour.
        peer: Option<NodeId>,
        /// The control code.
        code: u32,
    },
    /// The loop failed to register or update a descriptor in the poller.
    Poller(io::Error),
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peer =
            |p: &Option<NodeId>| p.map_or_else(|| "an unknown peer".to_owned(), |n| n.to_string());
        match self {
            Self::Protocol {
                peer: p,
                link,
                error,
            } => {
                write!(f, "link {link} to {} closed: {error}", peer(p))
            }
            Self::Overrun { peer: p } => {
                write!(
                    f,
                    "link to {} closed: the peer does not read or acknowledge",
                    peer(p)
                )
            }
            Self::Io { peer: p, op, error } => {
                write!(f, "{op} on the link to {} failed: {error}", peer(p))
            }
            Self::ListenerPanicked {
                listener,
                method,
                message,
            } => {
                write!(f, "listener {listener} panicked in {method}: {message}")
            }
            Self::CallbackPanicked { what, message } => {
                write!(f, "{what} callback panicked: {message}")
            }
            Self::HandleSend { ticket, to, error } => {
                write!(f, "handle send ({ticket}) to {to} refused: {error}")
            }
            Self::BadControl { peer: p, code } => {
                write!(
                    f,
                    "malformed or unexpected control frame {code:#x} from {}",
                    peer(p)
                )
            }
            Self::Poller(e) => write!(f, "poller failure: {e}"),
        }
    }
}

impl std::error::Error for BusError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Protocol { error, .. } => Some(error),
            Self::Io { error, .. } | Self::Poller(error) => Some(error),
            Self::HandleSend { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<BusError> for io::Error {
    /// A failed socket call or poller keeps its kind (the detail wrapped around it); a
    /// peer that broke the protocol or sent a bad control frame is `InvalidData`, one that
    /// stopped reading `ConnectionAborted`; a refused handle send the kind of its
    /// [`SendError`]; a caught panic `Other`.
    fn from(e: BusError) -> Self {
        let kind = match &e {
            BusError::Io { error, .. } | BusError::Poller(error) => error.kind(),
            BusError::Protocol { .. } | BusError::BadControl { .. } => io::ErrorKind::InvalidData,
            BusError::Overrun { .. } => io::ErrorKind::ConnectionAborted,
            BusError::HandleSend { error, .. } => send_kind(error),
            BusError::ListenerPanicked { .. } | BusError::CallbackPanicked { .. } => {
                io::ErrorKind::Other
            }
        };
        Self::new(kind, e)
    }
}

/// The kind [`SendError`]'s conversion gives, without converting it.
fn send_kind(e: &SendError) -> io::ErrorKind {
    match e {
        SendError::QueueFull { .. } | SendError::HandleFull => io::ErrorKind::WouldBlock,
        SendError::Disconnected => io::ErrorKind::NotConnected,
        SendError::Encode(encode) => encode.io_kind(),
        SendError::Router(router) => io::Error::from(router.clone()).kind(),
        SendError::ShuttingDown | SendError::OtherProcess => io::ErrorKind::Other,
    }
}
