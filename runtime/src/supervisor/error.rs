//! Errors of supervision and the task pool.

use std::fmt;
use std::io;

use crate::bus::Stop;
use crate::error::EncodeError;

/// A supervised child could not be added.
#[derive(Debug)]
#[non_exhaustive]
pub enum SuperviseError {
    /// The bus is draining for shutdown.
    ShuttingDown,
    /// The spec is not usable; the text says which field.
    InvalidSpec(&'static str),
    /// No such supervisor on this bus (a handle from another process or bus).
    NoSuchSupervisor,
}

impl fmt::Display for SuperviseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShuttingDown => f.write_str("the bus is shutting down"),
            Self::InvalidSpec(why) => write!(f, "invalid child spec: {why}"),
            Self::NoSuchSupervisor => f.write_str("no such supervisor on this bus"),
        }
    }
}

impl std::error::Error for SuperviseError {}

impl From<SuperviseError> for io::Error {
    fn from(e: SuperviseError) -> Self {
        let kind = match e {
            SuperviseError::InvalidSpec(_) => io::ErrorKind::InvalidInput,
            SuperviseError::NoSuchSupervisor => io::ErrorKind::NotFound,
            SuperviseError::ShuttingDown => io::ErrorKind::Other,
        };
        Self::new(kind, e)
    }
}

/// A rolling reload was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReloadError {
    /// A reload is running: it is not doubled.
    InProgress,
    /// The bus is draining for shutdown.
    ShuttingDown,
    /// No such supervisor on this bus.
    NoSuchSupervisor,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InProgress => "a reload is in progress",
            Self::ShuttingDown => "the bus is shutting down",
            Self::NoSuchSupervisor => "no such supervisor on this bus",
        })
    }
}

impl std::error::Error for ReloadError {}

impl From<ReloadError> for io::Error {
    fn from(e: ReloadError) -> Self {
        let kind = match e {
            ReloadError::InProgress => io::ErrorKind::WouldBlock,
            ReloadError::NoSuchSupervisor => io::ErrorKind::NotFound,
            ReloadError::ShuttingDown => io::ErrorKind::Other,
        };
        Self::new(kind, e)
    }
}

/// A blocking wait ended without its answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum WaitError {
    /// The timeout passed first.
    Timeout,
    /// Called from inside the loop (a listener, timer or callback): a blocking wait runs
    /// the loop itself, so it cannot be nested.
    InsideLoop,
    /// The loop ended for another reason (a stop, a shutdown, the parent gone).
    Interrupted(Stop),
    /// The poller failed.
    Io(io::Error),
    /// No such child (or task) here.
    NotFound,
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timed out"),
            Self::InsideLoop => f.write_str("a blocking wait cannot run inside the loop"),
            Self::Interrupted(Stop::Stopped) => f.write_str("the loop ended first: it was stopped"),
            Self::Interrupted(Stop::Shutdown(_)) => {
                f.write_str("the loop ended first: the subtree shut down")
            }
            Self::Interrupted(Stop::ParentGone) => {
                f.write_str("the loop ended first: the parent is gone")
            }
            Self::Io(e) => write!(f, "the loop failed: {e}"),
            Self::NotFound => f.write_str("nothing to wait for by that id"),
        }
    }
}

impl std::error::Error for WaitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<WaitError> for io::Error {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Io(e) => e,
            WaitError::Timeout => Self::new(io::ErrorKind::TimedOut, e),
            WaitError::NotFound => Self::new(io::ErrorKind::NotFound, e),
            other => Self::other(other),
        }
    }
}

/// A job was refused by the task pool. Nothing was queued.
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolError {
    /// As many jobs are pending as the pool allows.
    Full {
        /// The configured bound.
        max: usize,
    },
    /// The job could not be encoded: its encoding passed what a control frame may carry
    /// ([`EncodeError::TooLarge`]), or its `Serialize` failed.
    Encode(EncodeError),
    /// The bus is draining for shutdown.
    ShuttingDown,
    /// No such pool on this bus.
    NoSuchPool,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full { max } => write!(f, "the pool holds {max} pending jobs already"),
            Self::Encode(e) => write!(f, "cannot encode the job: {e}"),
            Self::ShuttingDown => f.write_str("the bus is shutting down"),
            Self::NoSuchPool => f.write_str("no such pool on this bus"),
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Encode(e) => Some(e),
            _ => None,
        }
    }
}

impl From<PoolError> for io::Error {
    fn from(e: PoolError) -> Self {
        let kind = match &e {
            PoolError::Full { .. } => io::ErrorKind::WouldBlock,
            PoolError::Encode(EncodeError::TooLarge { .. }) => io::ErrorKind::InvalidInput,
            PoolError::Encode(_) => io::ErrorKind::InvalidData,
            PoolError::NoSuchPool => io::ErrorKind::NotFound,
            PoolError::ShuttingDown => io::ErrorKind::Other,
        };
        Self::new(kind, e)
    }
}
