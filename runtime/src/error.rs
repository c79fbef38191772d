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

use crate::daemon::DaemonError;
use crate::exec::ExecError;
use crate::identity::IdentityError;
use crate::listener::ListenerId;
use crate::shm::ShmError;
use crate::supervisor::{PoolError, ReloadError, SuperviseError, WaitError};

/// An error of the forkbus runtime: one of the detail enums beneath it.
///
/// Every fallible call of the runtime returns its own detail enum, and `?` turns any of
/// them into this one. Match on the variant, then on the detail, to act on a refusal; a
/// new kind of refusal is a new variant (the enum is `#[non_exhaustive]`). `Display` is the
/// detail's; [`source`](std::error::Error::source) is the detail.
///
/// # As an [`io::Error`]
///
/// `From<Error> for io::Error` is the detail's own conversion, so that `?` works in a
/// function returning [`io::Result`]. Where an OS error lies underneath (an
/// [`Error::Io`], a `ForkError::Io`, an `ExecError::Io`, a `WaitError::Io`, a
/// `DaemonError::Os` or `ThreadCount`, an errno or `/proc` error of `IdentityError`, an
/// errno of `ShmError`) it is passed through as it is, its kind and raw OS error kept. A
/// `BusError::Io` or `BusError::Poller` keeps its error's kind and an `ExecError::Spawn`
/// its errno's, the detail wrapped around them. Otherwise the `io::Error` wraps the
/// detail (downcast [`get_ref`](io::Error::get_ref) to it) with this kind:
///
/// | kind | refusals |
/// |------|----------|
/// | [`WouldBlock`](io::ErrorKind::WouldBlock) | full: `SendError::QueueFull`, `SendError::HandleFull`, `NameError::Backlogged`, `PoolError::Full`; `ReloadError::InProgress`; `ShmError::WouldDeadlock` |
/// | [`Other`](io::ErrorKind::Other) | the bus is shutting down (every `ShuttingDown` variant); a wait interrupted or called inside the loop; a handle used in another process; a panic caught in the loop; a threaded process refused a fork or a daemon; a daemon that did not report, or reported nonsense |
/// | [`InvalidInput`](io::ErrorKind::InvalidInput) | an invalid name, child spec, command, title, nice value, CPU or configuration; a value too large to encode (`EncodeError::TooLarge`) or to send; any other refusal of the router (the router's own conversion) |
/// | [`InvalidData`](io::ErrorKind::InvalidData) | a payload that does not decode ([`DecodeError`]); a value whose `Serialize` failed (`EncodeError::Serialize`); a peer that broke the protocol or sent a bad control frame; a corrupt shared map |
/// | [`AlreadyExists`](io::ErrorKind::AlreadyExists) | a name held by another node (`NameError::Taken`); a pid file held |
/// | [`QuotaExceeded`](io::ErrorKind::QuotaExceeded) | at the bound of names or groups (`NameError::TooMany`) |
/// | [`NotFound`](io::ErrorKind::NotFound) | no such supervisor, pool, task, user or group; a shared region removed |
/// | [`NotConnected`](io::ErrorKind::NotConnected) | the bus behind a handle is gone; an unknown link |
/// | [`ConnectionAborted`](io::ErrorKind::ConnectionAborted) | a link closed because its peer stopped reading (`BusError::Overrun`) |
/// | [`TimedOut`](io::ErrorKind::TimedOut) | a wait timed out; a child that did not reach `execve` in time |
/// | [`PermissionDenied`](io::ErrorKind::PermissionDenied) | credentials not the requested ones after a drop; a shared region destroyed by another process than its creator |
/// | [`StorageFull`](io::ErrorKind::StorageFull) | a shared map full, or a key or value larger than its slots |
///
/// Shutting down is `Other`, not `BrokenPipe`: nothing broke, the bus takes no new work
/// while it drains; match on the detail to tell it from the other `Other`s.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A send was refused ([`Bus::send`](crate::Bus::send),
    /// [`BusHandle::send`](crate::BusHandle::send), ...).
    Send(SendError),
    /// A fork was refused or failed ([`Bus::fork`](crate::Bus::fork)).
    Fork(ForkError),
    /// A payload is not the type it was decoded as ([`Message::decode`](crate::Message::decode)).
    Decode(DecodeError),
    /// A name or group name was refused ([`Bus::register_name`](crate::Bus::register_name),
    /// [`Bus::join_group`](crate::Bus::join_group), ...).
    Name(NameError),
    /// Something went wrong that the loop survived
    /// ([`Listener::on_router_error`](crate::Listener::on_router_error)).
    Bus(BusError),
    /// A program could not be started ([`Bus::exec`](crate::Bus::exec)).
    Exec(ExecError),
    /// A supervised child could not be added.
    Supervise(SuperviseError),
    /// A rolling reload was refused.
    Reload(ReloadError),
    /// A blocking wait ended without its answer.
    Wait(WaitError),
    /// A job was refused by the task pool.
    Pool(PoolError),
    /// Daemonizing or a pid file failed.
    Daemon(DaemonError),
    /// Changing the identity or priority of the process failed.
    Identity(IdentityError),
    /// A shared region, its lock or a shared map failed.
    Shm(ShmError),
    /// The routing core refused (a query of [`Bus::router`](crate::Bus::router), a
    /// [`Router`](forkbus_router::Router) driven by hand, ...).
    Router(forkbus_router::Error),
    /// An OS call failed.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Send(e) => e.fmt(f),
            Self::Fork(e) => e.fmt(f),
            Self::Decode(e) => e.fmt(f),
            Self::Name(e) => e.fmt(f),
            Self::Bus(e) => e.fmt(f),
            Self::Exec(e) => e.fmt(f),
            Self::Supervise(e) => e.fmt(f),
            Self::Reload(e) => e.fmt(f),
            Self::Wait(e) => e.fmt(f),
            Self::Pool(e) => e.fmt(f),
            Self::Daemon(e) => e.fmt(f),
            Self::Identity(e) => e.fmt(f),
            Self::Shm(e) => e.fmt(f),
            Self::Router(e) => e.fmt(f),
            Self::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(match self {
            Self::Send(e) => e,
            Self::Fork(e) => e,
            Self::Decode(e) => e,
            Self::Name(e) => e,
            Self::Bus(e) => e,
            Self::Exec(e) => e,
            Self::Supervise(e) => e,
            Self::Reload(e) => e,
            Self::Wait(e) => e,
            Self::Pool(e) => e,
            Self::Daemon(e) => e,
            Self::Identity(e) => e,
            Self::Shm(e) => e,
            Self::Router(e) => e,
            Self::Io(e) => e,
        })
    }
}

impl From<Error> for io::Error {
    /// The detail's own conversion; see [`Error`] for the kinds.
    fn from(e: Error) -> Self {
        match e {
            Error::Send(e) => e.into(),
            Error::Fork(e) => e.into(),
            Error::Decode(e) => e.into(),
            Error::Name(e) => e.into(),
            Error::Bus(e) => e.into(),
            Error::Exec(e) => e.into(),
            Error::Supervise(e) => e.into(),
            Error::Reload(e) => e.into(),
            Error::Wait(e) => e.into(),
            Error::Pool(e) => e.into(),
            Error::Daemon(e) => e.into(),
            Error::Identity(e) => e.into(),
            Error::Shm(e) => e.into(),
            Error::Router(e) => e.into(),
            Error::Io(e) => e,
        }
    }
}

macro_rules! from_detail {
    ($($variant:ident($detail:ty)),* $(,)?) => {
        $(
            impl From<$detail> for Error {
                fn from(e: $detail) -> Self {
                    Self::$variant(e)
                }
            }
        )*
    };
}

from_detail! {
    Send(SendError),
    Fork(ForkError),
    Decode(DecodeError),
    Name(NameError),
    Bus(BusError),
    Exec(ExecError),
    Supervise(SuperviseError),
    Reload(ReloadError),
    Wait(WaitError),
    Pool(PoolError),
    Daemon(DaemonError),
    Identity(IdentityError),
    Shm(ShmError),
    Router(forkbus_router::Error),
    Io(io::Error),
}

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
            Self::HandleSend { to, error } => write!(f, "handle send to {to} refused: {error}"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// `?` turns the detail into an [`Error`] of the given variant.
    fn via_question_mark<D>(detail: D) -> Error
    where
        Error: From<D>,
    {
        fn fails<D>(detail: D) -> Result<(), Error>
        where
            Error: From<D>,
        {
            Err(detail)?;
            Ok(())
        }
        match fails(detail) {
            Err(e) => e,
            Ok(()) => unreachable!("fails() always fails"),
        }
    }

    #[test]
    fn question_mark_converts_every_detail() {
        /// `?` on the detail gives an `Error` of this shape, whose `Display` is the
        /// detail's and whose source is the detail.
        macro_rules! converts {
            ($detail:expr, $pattern:pat $(if $guard:expr)?) => {
                let e = via_question_mark($detail);
                assert!(matches!(e, $pattern $(if $guard)?), "{e:?}");
                let source = e.source().expect("the detail is the source");
                assert_eq!(e.to_string(), source.to_string());
            };
        }
        let node = NodeId::new(1, 2, 3);
        converts!(
            SendError::ShuttingDown,
            Error::Send(SendError::ShuttingDown)
        );
        converts!(
            ForkError::ShuttingDown,
            Error::Fork(ForkError::ShuttingDown)
        );
        converts!(
            DecodeError::TooDeep { expected: "u8" },
            Error::Decode(DecodeError::TooDeep { .. })
        );
        converts!(
            NameError::Taken {
                name: "a".into(),
                holder: node,
            },
            Error::Name(NameError::Taken { .. })
        );
        converts!(
            BusError::Overrun { peer: None },
            Error::Bus(BusError::Overrun { .. })
        );
        converts!(
            ExecError::ShuttingDown,
            Error::Exec(ExecError::ShuttingDown)
        );
        converts!(
            SuperviseError::NoSuchSupervisor,
            Error::Supervise(SuperviseError::NoSuchSupervisor)
        );
        converts!(
            ReloadError::InProgress,
            Error::Reload(ReloadError::InProgress)
        );
        converts!(WaitError::Timeout, Error::Wait(WaitError::Timeout));
        converts!(
            PoolError::Full { max: 3 },
            Error::Pool(PoolError::Full { max: 3 })
        );
        converts!(DaemonError::NoReport, Error::Daemon(DaemonError::NoReport));
        converts!(
            IdentityError::InvalidTitle,
            Error::Identity(IdentityError::InvalidTitle)
        );
        converts!(ShmError::Removed, Error::Shm(ShmError::Removed));
        converts!(
            forkbus_router::Error::ReceiptNeedsUnicast,
            Error::Router(forkbus_router::Error::ReceiptNeedsUnicast)
        );
        converts!(
            io::Error::from(io::ErrorKind::BrokenPipe),
            Error::Io(ref io) if io.kind() == io::ErrorKind::BrokenPipe
        );
    }

    #[test]
    fn the_io_mapping_keeps_an_inner_io_errors_kind() {
        let kind_of = |e: Error| io::Error::from(e).kind();
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            kind_of(Error::Io(refused())),
            io::ErrorKind::ConnectionRefused
        );
        assert_eq!(
            kind_of(ForkError::Io(refused()).into()),
            io::ErrorKind::ConnectionRefused
        );
        assert_eq!(
            kind_of(WaitError::Io(refused()).into()),
            io::ErrorKind::ConnectionRefused
        );
        assert_eq!(
            kind_of(ExecError::Io(refused()).into()),
            io::ErrorKind::ConnectionRefused
        );
        let bus = BusError::Io {
            peer: None,
            op: "sendmsg",
            error: refused(),
        };
        assert_eq!(kind_of(bus.into()), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            kind_of(BusError::Poller(refused()).into()),
            io::ErrorKind::ConnectionRefused
        );
        // An OS error underneath is passed through whole, its errno kept.
        let os = io::Error::from(ForkError::from(nix::errno::Errno::EAGAIN));
        assert_eq!(os.raw_os_error(), Some(nix::libc::EAGAIN));
        let os = io::Error::from(Error::from(IdentityError::Priority(
            nix::errno::Errno::EPERM,
        )));
        assert_eq!(os.raw_os_error(), Some(nix::libc::EPERM));
    }

    #[test]
    fn the_io_mapping_of_refusals() {
        let kind_of = |e: Error| io::Error::from(e).kind();
        use io::ErrorKind as K;
        assert_eq!(
            kind_of(SendError::QueueFull { peer: None }.into()),
            K::WouldBlock
        );
        assert_eq!(kind_of(SendError::HandleFull.into()), K::WouldBlock);
        assert_eq!(kind_of(NameError::Backlogged.into()), K::WouldBlock);
        assert_eq!(kind_of(PoolError::Full { max: 1 }.into()), K::WouldBlock);
        assert_eq!(kind_of(SendError::ShuttingDown.into()), K::Other);
        assert_eq!(kind_of(ForkError::ShuttingDown.into()), K::Other);
        assert_eq!(kind_of(ExecError::ShuttingDown.into()), K::Other);
        assert_eq!(kind_of(PoolError::ShuttingDown.into()), K::Other);
        assert_eq!(kind_of(SendError::Disconnected.into()), K::NotConnected);
        assert_eq!(
            kind_of(SendError::Encode(EncodeError::TooLarge { limit: 9 }).into()),
            K::InvalidInput
        );
        assert_eq!(
            kind_of(
                SendError::Encode(EncodeError::Serialize {
                    message: "no".into()
                })
                .into()
            ),
            K::InvalidData
        );
        assert_eq!(
            kind_of(
                SendError::Router(forkbus_router::Error::PayloadTooLarge { len: 9, max: 8 }).into()
            ),
            K::InvalidInput
        );
        assert_eq!(
            kind_of(NameError::Invalid { len: 0, max: 8 }.into()),
            K::InvalidInput
        );
        assert_eq!(
            kind_of(
                NameError::Taken {
                    name: "a".into(),
                    holder: NodeId::new(1, 2, 3),
                }
                .into()
            ),
            K::AlreadyExists
        );
        assert_eq!(
            kind_of(NameError::TooMany { max: 4 }.into()),
            K::QuotaExceeded
        );
        assert_eq!(
            kind_of(
                DecodeError::Truncated {
                    expected: "u8",
                    len: 0
                }
                .into()
            ),
            K::InvalidData
        );
        assert_eq!(kind_of(WaitError::Timeout.into()), K::TimedOut);
        // The detail is what the io::Error wraps.
        let io = io::Error::from(Error::from(SendError::HandleFull));
        assert!(matches!(
            io.get_ref().and_then(|e| e.downcast_ref::<SendError>()),
            Some(SendError::HandleFull)
        ));
    }

    #[test]
    fn name_refusals_of_the_router_say_what_happened() {
        use forkbus_router::Error as E;
        assert_eq!(
            NameError::from_router(E::InvalidName { len: 0, max: 8 }),
            NameError::Invalid { len: 0, max: 8 }
        );
        assert_eq!(
            NameError::from_router(E::TooManyNames { max: 4 }),
            NameError::TooMany { max: 4 }
        );
        let mut router = forkbus_router::Router::new(
            NodeId::new(1, 2, 3),
            forkbus_router::RouterConfig::default(),
        )
        .expect("the default configuration is valid");
        let link = router.handle_link_up(
            forkbus_router::Timestamp::ZERO,
            None,
            forkbus_router::LinkRole::Peer,
        );
        assert_eq!(
            NameError::from_router(E::QueueFull { link }),
            NameError::Backlogged
        );
        // Anything else is passed on, not made into one of the above.
        let other = E::InvalidConfig("max_name");
        assert_eq!(
            NameError::from_router(other.clone()),
            NameError::Router(other)
        );
    }
}
