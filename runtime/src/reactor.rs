//! The reactor: one `polling` poller over a slab of sources whose keys are the poll keys.
//!
//! ```text
//!   slab key == poll key          Source
//!   ───────────────────           ──────────────────────────────────────────────
//!   0                             Signal   the signalfd (SIGCHLD, SIGTERM, ...)
//!   1, 2, ...                     Link     a socket of a link; its LinkId maps back here
//!   ...                           User     a descriptor the application registered
//! ```
//!
//! Every source is registered in level-triggered mode ([`PollMode::Level`]), so readiness
//! never needs re-arming: epoll keeps reporting a descriptor while it is readable (or
//! writable, when asked). Write interest is asked for only while a link has output the
//! kernel did not take; it is dropped again once the output is written. Every `add` is
//! paired with a `delete` before the descriptor closes, and a failed `add` leaves no slab
//! entry behind.
//!
//! # Syscalls per wake-up (measured with `strace -c -f`, see `examples/pingpong.rs`)
//!
//! A round trip of a 64-byte message between a parent and a child costs 14 syscalls in all
//! (7 per process): `recvfrom` and `sendto` (one each: all frames of a link are coalesced
//! into one write, and a read shorter than the buffer ends the draining of a link without a
//! further `EAGAIN` read, which level-triggered mode makes safe), and 5 inside one
//! `Poller::wait`. Those 5 are polling 3.11's own, whatever the mode or timeout:
//! `timerfd_settime` and an `epoll_ctl` re-arming its timerfd (even for "no timeout"),
//! `epoll_wait`, a `read` of its notify eventfd (even when nobody notified) and an
//! `epoll_ctl` re-arming that eventfd. Level mode saves the re-arm of our own sources that
//! oneshot mode needs, waiting without a timeout when no timer is due saves nothing more
//! inside polling, and one reused `Events` buffer saves allocations, not syscalls. Bare
//! epoll would need 3 per process. Reading the clock is a vDSO call, not a syscall.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use forkbus_router::{LinkId, NodeId};
use nix::sys::signalfd::SignalFd;
use polling::{Event, Events, PollMode, Poller};
use slab::Slab;

use crate::error::SendError;

/// What a registered descriptor should be watched for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Interest {
    /// Report when it is readable.
    pub readable: bool,
    /// Report when it is writable.
    pub writable: bool,
}

impl Interest {
    /// Readable only.
    pub const READABLE: Self = Self {
        readable: true,
        writable: false,
    };
    /// Writable only.
    pub const WRITABLE: Self = Self {
        readable: false,
        writable: true,
    };
    /// Both.
    pub const BOTH: Self = Self {
        readable: true,
        writable: true,
    };
}

/// A descriptor registered with [`Bus::add_fd`](crate::Bus::add_fd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdId {
    pub(crate) key: usize,
    pub(crate) serial: u64,
}

/// Readiness of a registered descriptor, handed to its callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FdReady {
    /// Which registration.
    pub id: FdId,
    /// The descriptor (still owned by the bus).
    pub fd: RawFd,
    /// It is readable (or at end of file, or in error).
    pub readable: bool,
    /// It is writable.
    pub writable: bool,
}

/// The socket of one link.
#[derive(Debug)]
pub(crate) struct LinkSource {
    pub(crate) fd: OwnedFd,
    pub(crate) link: LinkId,
    pub(crate) peer: Option<NodeId>,
    /// Write interest is registered.
    pub(crate) writing: bool,
    pub(crate) span: tracing::Span,
}

/// A descriptor of the application's.
pub(crate) struct UserSource<C> {
    pub(crate) fd: OwnedFd,
    pub(crate) serial: u64,
    pub(crate) interest: Interest,
    /// Taken out while it runs.
    /// What the owner runs when it is ready (the bus's callback).
    pub(crate) callback: Option<C>,
}

impl<C> std::fmt::Debug for UserSource<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSource")
            .field("fd", &self.fd)
            .field("serial", &self.serial)
            .field("interest", &self.interest)
            .finish_non_exhaustive()
    }
}

/// Everything the poller watches.
#[derive(Debug)]
pub(crate) enum Source<C> {
    Signal(SignalFd),
    Link(LinkSource),
    User(UserSource<C>),
}

impl<C> Source<C> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Signal(s) => s.as_fd(),
            Self::Link(l) => l.fd.as_fd(),
            Self::User(u) => u.fd.as_fd(),
        }
    }
}

/// The poller, shared with the bus's handles (which only ever `notify` it).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) poller: Poller,
    /// The process the poller belongs to: a handle copied into a forked child must not
    /// touch it (its descriptors were closed there, their numbers may be reused).
    pub(crate) owner: u32,
}

impl Shared {
    pub(crate) fn notify(&self) -> Result<(), SendError> {
        if std::process::id() != self.owner {
            return Err(SendError::OtherProcess);
        }
        // Writing to an eventfd cannot fail in a way worth reporting: a full counter
        // still wakes the waiter.
        let _ = self.poller.notify();
        Ok(())
    }
}

/// One ready source, copied out of the events buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ready {
    pub(crate) key: usize,
    pub(crate) readable: bool,
    pub(crate) writable: bool,
}

/// The poller, its sources and the one reused events buffer.
#[derive(Debug)]
pub(crate) struct Reactor<C> {
    pub(crate) shared: Arc<Shared>,
    /// The descriptors the poller opened (epoll, notify eventfd, timerfd), found by
    /// comparing `/proc/self/fd` before and after creating it: a forked child closes them
    /// by number, since dropping the inherited `Poller` would deregister the parent's
    /// notifier from the epoll instance both processes share.
    poller_fds: Vec<RawFd>,
    pub(crate) sources: Slab<Source<C>>,
    events: Events,
    pub(crate) ready: Vec<Ready>,
}

impl<C> Reactor<C> {
    pub(crate) fn new(capacity: usize) -> io::Result<Self> {
        let before = open_fds()?;
        let poller = Poller::new()?;
        let after = open_fds()?;
        let mut poller_fds: Vec<RawFd> = after
            .into_iter()
            .filter(|fd| !before.contains(fd) && is_anon_inode(*fd))
            .collect();
        if !poller_fds.contains(&poller.as_raw_fd()) {
            poller_fds.push(poller.as_raw_fd());
        }
        poller_fds.sort_unstable();
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            shared: Arc::new(Shared {
                poller,
                owner: std::process::id(),
            }),
            poller_fds,
            sources: Slab::new(),
            events: Events::with_capacity(capacity),
            ready: Vec::with_capacity(capacity.get()),
        })
    }

    /// The poller's own descriptors.
    pub(crate) fn poller_fds(&self) -> &[RawFd] {
        &self.poller_fds
    }

    /// Registers a source; on failure nothing stays behind (the source is dropped).
    pub(crate) fn insert(&mut self, source: Source<C>, interest: Interest) -> io::Result<usize> {
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        let raw = source.fd().as_raw_fd();
        let event = Event::new(key, interest.readable, interest.writable);
        // SAFETY: polling requires the descriptor to be deleted from the poller before it is
        // closed. Every source lives in this slab, and `remove` (and `Drop`) delete it from
        // the poller before the slab entry, which owns the descriptor, is dropped.
        unsafe {
            self.shared
                .poller
                .add_with_mode(raw, event, PollMode::Level)?
        };
        entry.insert(source);
        Ok(key)
    }

    /// Changes what a source is watched for.
    pub(crate) fn set_interest(&self, key: usize, interest: Interest) -> io::Result<()> {
        let Some(source) = self.sources.get(key) else {
            return Ok(());
        };
        let event = Event::new(key, interest.readable, interest.writable);
        self.shared
            .poller
            .modify_with_mode(source.fd(), event, PollMode::Level)
    }

    /// Deregisters and returns a source (its descriptor closes when it is dropped).
    pub(crate) fn remove(&mut self, key: usize) -> Option<Source<C>> {
        let source = self.sources.try_remove(key)?;
        if let Err(e) = self.shared.poller.delete(source.fd()) {
            tracing::warn!(key, error = %e, "cannot deregister a descriptor");
        }
        Some(source)
    }

    /// Waits for readiness (`None`: until something happens) and copies it into `ready`.
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.events.clear();
        self.ready.clear();
        self.shared.poller.wait(&mut self.events, timeout)?;
        self.ready.extend(self.events.iter().map(|e| Ready {
            key: e.key,
            readable: e.readable,
            writable: e.writable,
        }));
        Ok(())
    }

    /// In a forked child: closes every descriptor inherited from the parent's reactor
    /// without touching the epoll instance the two processes share, and forgets the
    /// parent's callbacks (their destructors belong to the parent). The caller must then
    /// forget the reactor: the parent's `Poller` must never be dropped here (its destructor
    /// deregisters the notifier from the epoll instance both processes share).
    pub(crate) fn abandon(&mut self) {
        for fd in std::mem::take(&mut self.poller_fds) {
            // Closing our copy leaves the parent's poller alone.
            let _ = nix::unistd::close(fd);
        }
        for (_, source) in std::mem::take(&mut self.sources) {
            match source {
                Source::Signal(s) => drop(s),
                Source::Link(l) => {
                    drop(l.fd);
                    std::mem::forget(l.span);
                }
                Source::User(u) => {
                    drop(u.fd);
                    std::mem::forget(u.callback);
                }
            }
        }
    }
}

impl<C> Drop for Reactor<C> {
    fn drop(&mut self) {
        for (_, source) in &self.sources {
            let _ = self.shared.poller.delete(source.fd());
        }
    }
}

/// The open descriptors of this process.
pub(crate) fn open_fds() -> io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            fds.push(fd);
        }
    }
    fds.sort_unstable();
    Ok(fds)
}

/// What a descriptor is, as `/proc/self/fd` says (`socket:[123]`, `anon_inode:[eventfd]`).
pub fn describe_fd(fd: RawFd) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn is_anon_inode(fd: RawFd) -> bool {
    describe_fd(fd).is_some_and(|d| d.starts_with("anon_inode:"))
}
