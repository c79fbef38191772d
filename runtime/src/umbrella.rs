//! The umbrella error: [`Error`], one variant per detail enum of the runtime (rustls's
//! shape). Its own file, so that no module that returns a detail needs to import the
//! others: this one imports them all, and nothing in the crate imports it.

use std::fmt;
use std::io;

use crate::daemon::DaemonError;
use crate::error::{BusError, DecodeError, ForkError, NameError, SendError};
use crate::exec::ExecError;
use crate::identity::IdentityError;
use crate::shm::ShmError;
use crate::supervisor::error::{PoolError, ReloadError, SuperviseError, WaitError};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::EncodeError;
    use forkbus_router::NodeId;
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
