//! How a bus is set up, and the plain values it hands back: [`BusConfig`] with its setters,
//! [`ForkOptions`], why the loop returned ([`Stop`]), the descriptors it holds
//! ([`Descriptors`]), the exit codes of a child, and the node core's configuration made from
//! the bus's. Plain data: nothing here imports the rest of the bus.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use forkbus_node::{NodeConfig, Relation, Tally};
use forkbus_router::RouterConfig;

/// Exit code of a child whose parent link went down while it was not draining.
pub const EXIT_PARENT_GONE: i32 = 1;

/// Exit code of a child whose closure panicked.
pub const EXIT_PANIC: i32 = 101;

/// Exit code of a child that could not set itself up (`EX_OSERR`), or whose loop failed.
pub const EXIT_OS_ERROR: i32 = 71;

/// After the drain deadline killed the remaining children, how long to wait for them.
pub(super) const KILL_GRACE: Duration = Duration::from_secs(5);

/// How a bus is set up. Every process of a tree uses its root's configuration.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BusConfig {
    /// Bounds and behaviour of every process's router (queue bounds, frame limit, ...).
    pub router: RouterConfig,
    /// The host part of every node id of this tree.
    pub host: u32,
    /// A name for the root.
    pub name: Option<String>,
    /// How long a graceful shutdown waits for children and acknowledgements before it
    /// kills what is left and ends anyway.
    pub drain_timeout: Duration,
    /// Sends a [`BusHandle`] may have waiting for the loop.
    ///
    /// [`BusHandle`]: crate::BusHandle
    pub handle_capacity: usize,
    /// Bytes read from a socket per `read` call.
    pub read_buffer: usize,
    /// Readiness events taken per wait.
    pub events_capacity: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            router: RouterConfig::default(),
            host: 0,
            name: None,
            drain_timeout: Duration::from_secs(10),
            handle_capacity: 1024,
            read_buffer: 64 << 10,
            events_capacity: 256,
        }
    }
}

impl BusConfig {
    /// Sets [`router`](Self::router).
    #[must_use]
    pub fn router(mut self, router: RouterConfig) -> Self {
        self.router = router;
        self
    }

    /// Sets [`host`](Self::host).
    #[must_use]
    pub fn host(mut self, host: u32) -> Self {
        self.host = host;
        self
    }

    /// Sets [`name`](Self::name): the root registers it.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets [`drain_timeout`](Self::drain_timeout).
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Sets [`handle_capacity`](Self::handle_capacity).
    #[must_use]
    pub fn handle_capacity(mut self, capacity: usize) -> Self {
        self.handle_capacity = capacity;
        self
    }

    /// Sets [`read_buffer`](Self::read_buffer).
    #[must_use]
    pub fn read_buffer(mut self, bytes: usize) -> Self {
        self.read_buffer = bytes;
        self
    }

    /// Sets [`events_capacity`](Self::events_capacity).
    #[must_use]
    pub fn events_capacity(mut self, events: usize) -> Self {
        self.events_capacity = events;
        self
    }
}

/// How to fork a child.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ForkOptions {
    /// A name the child registers at once (unique in the tree).
    pub name: Option<String>,
    /// Kill the child (`SIGKILL`) when this process dies (`PR_SET_PDEATHSIG`). On by
    /// default.
    pub die_with_parent: bool,
    /// Descriptors the child keeps open besides 0, 1, 2 and its parent link: every other
    /// descriptor of this process is closed in the child right after `fork` (as Python's
    /// `subprocess` does with `close_fds=True`). Numbers that are not open are ignored; a
    /// descriptor this bus owns (a link, one registered with [`Bus::add_fd`]) is closed
    /// all the same, so keep a duplicate of it instead. See [`keep_fd`](Self::keep_fd).
    ///
    /// [`Bus::add_fd`]: crate::Bus::add_fd
    pub keep_fds: Vec<RawFd>,
}

impl Default for ForkOptions {
    fn default() -> Self {
        Self {
            name: None,
            die_with_parent: true,
            keep_fds: Vec::new(),
        }
    }
}

impl ForkOptions {
    /// Options for a child with this name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: Some(name.into()),
            ..Self::default()
        }
    }

    /// Whether the child dies with this process.
    #[must_use]
    pub fn die_with_parent(mut self, yes: bool) -> Self {
        self.die_with_parent = yes;
        self
    }

    /// Keeps a descriptor open in the child (a listening socket shared with workers, a
    /// pipe to report on, a log file); see [`keep_fds`](Self::keep_fds). The child has it
    /// under the same number.
    #[must_use]
    pub fn keep_fd(mut self, fd: impl AsRawFd) -> Self {
        self.keep_fds.push(fd.as_raw_fd());
        self
    }
}

/// Why [`Bus::run`] returned.
///
/// [`Bus::run`]: crate::Bus::run
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// [`Bus::stop`] or [`BusHandle::stop`] was called.
    ///
    /// [`Bus::stop`]: crate::Bus::stop
    /// [`BusHandle::stop`]: crate::BusHandle::stop
    Stopped,
    /// A graceful shutdown of this node's subtree completed (children exited and reaped,
    /// queues acknowledged); the tally covers the subtree. A child exits 0 after it.
    Shutdown(Tally),
    /// The link to this process's parent went down.
    ParentGone,
}

/// The descriptors a bus holds, for diagnostics and hygiene checks.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Descriptors {
    /// The poller's own (epoll, its notify eventfd, its timerfd).
    pub poller: Vec<RawFd>,
    /// The signalfd.
    pub signal: RawFd,
    /// Link sockets, with whom they lead to.
    pub links: Vec<(RawFd, Relation)>,
    /// Descriptors registered with [`Bus::add_fd`].
    ///
    /// [`Bus::add_fd`]: crate::Bus::add_fd
    pub user: Vec<RawFd>,
}

impl Descriptors {
    /// All of them, sorted.
    pub fn all(&self) -> Vec<RawFd> {
        let mut all: Vec<RawFd> = self.poller.clone();
        all.push(self.signal);
        all.extend(self.links.iter().map(|(fd, _)| *fd));
        all.extend(&self.user);
        all.sort_unstable();
        all
    }
}

/// The node core's configuration from the bus's.
pub(super) fn node_config(config: &BusConfig) -> NodeConfig {
    NodeConfig::default()
        .drain_timeout(config.drain_timeout)
        .kill_grace(KILL_GRACE)
}
