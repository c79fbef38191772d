//! The bus: one per process, the driver of its node core (`forkbus_node::Node`): the
//! reactor, the signalfd, `waitpid`, `fork` and the listeners.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use forkbus_node::{Action, LinkInfo, Node, NodeConfig, NodeEvent, Refusal, Relation, Tally};
use forkbus_router::{
    Address, DownCause, Event as RouterEvent, LinkId, MessageId, NodeId, Refused, Router,
    RouterConfig, SendOptions, Timestamp,
};
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::ForkResult;
use serde::Serialize;

use crate::child::{exit_of, Pid, PidExt};
use crate::clock::{monotonic_now, nonce};
use crate::error::{BusError, ForkError, NameError, SendError};
use crate::event::Event;
use crate::handle::{BusHandle, Outgoing, Request};
use crate::listener::{Listener, Services};
use crate::listener_set::{panic_message, ListenerId, ListenerSet};
use crate::message::{encode_capped, Message};
use crate::reactor::{FdId, FdReady, Interest, LinkSource, Ready, UserSource};
use crate::signals;
use crate::ticket::Ticket;
use crate::timer::{TimerId, Timers};
use forkbus_node::PeerShutdown;

/// Exit code of a child whose parent link went down while it was not draining.
pub const EXIT_PARENT_GONE: i32 = 1;
/// Exit code of a child whose closure panicked.
pub const EXIT_PANIC: i32 = 101;
/// Exit code of a child that could not set itself up (`EX_OSERR`), or whose loop failed.
pub const EXIT_OS_ERROR: i32 = 71;

/// Reads per link per wake-up before the loop moves on (the rest is reported again:
/// level-triggered).
const MAX_READS: usize = 16;
/// Rounds of "write, then dispatch events" per loop iteration before waiting again.
const MAX_ROUNDS: usize = 64;
/// Timers fired per loop iteration at most (a timer re-adding itself for "now" must not
/// starve the loop).
const MAX_TIMERS: usize = 1024;
/// How long a child waits at most to hand its last frames to the kernel.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// After the drain deadline killed the remaining children, how long to wait for them.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The pid of the process that holds a bus (one per process).
static BUS_PID: AtomicU32 = AtomicU32::new(0);

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// [`Bus::stop`] or [`BusHandle::stop`] was called.
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

/// Things the loop reports outside the node's events, dispatched after them.
#[derive(Debug)]
enum Internal {
    Error(BusError),
    /// A handle's send with a receipt or a trace was submitted.
    Submitted(Ticket, MessageId),
    Signal(i32),
    /// Work to run at the loop's top level (where listeners may be called).
    Deferred(Deferred),
}

/// A closure run at the loop's top level ([`Bus::defer`]).
struct Deferred(Box<dyn FnOnce(&mut Bus)>);

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deferred")
    }
}

/// The callback of a registered descriptor.
type FdCallback = Box<dyn FnMut(&mut Bus, FdReady)>;
/// The reactor of a bus: its sources' callbacks take the bus.
type Reactor = crate::reactor::Reactor<FdCallback>;
type Source = crate::reactor::Source<FdCallback>;

/// [`Bus::run_with`]'s handler.
type Handler<'h> = dyn FnMut(&mut Bus, Event) + 'h;

/// What a timer does when it is due.
enum TimerAction {
    /// Runs a closure ([`Bus::add_timer`]).
    Call(Box<dyn FnOnce(&mut Bus)>),
    /// Emits [`Event::Timer`] ([`Bus::timer`]).
    Event,
}

/// One process's bus: the driver of its node (router, children, drain), its reactor and
/// its listeners.
///
/// Create the root with [`Bus::root`] (before starting any thread), fork children with
/// [`fork`](Self::fork) (each child gets a bus of its own, built fresh), then
/// [`run`](Self::run) the loop. See the crate documentation for a tour.
pub struct Bus {
    config: BusConfig,
    me: NodeId,
    /// The node core: router, children, drain, tally. Every decision is its.
    node: Node,
    reactor: Reactor,
    signal_key: usize,
    /// Each link's reactor key.
    links: HashMap<LinkId, usize>,
    /// I/O errors of links, reported with their peer shutdown.
    link_errors: Vec<(LinkId, BusError)>,
    listeners: ListenerSet<Box<dyn Listener>>,
    timers: Timers<TimerAction>,
    requests_tx: Sender<Request>,
    requests_rx: Receiver<Request>,
    sends_tx: Sender<Outgoing>,
    sends_rx: Receiver<Outgoing>,
    /// A handle send refused for a full queue, retried when a link has room.
    backlog: VecDeque<Outgoing>,
    /// Links the poller found writable, written by `drive` after the events.
    writable: Vec<LinkId>,
    internal: VecDeque<Internal>,
    stop: Option<Stop>,
    running: bool,
    /// Work is left over from the last iteration: do not sleep.
    busy: bool,
    now: Timestamp,
    rbuf: Vec<u8>,
    scratch: Vec<u8>,
    exit_code: Option<i32>,
    next_fd_serial: u64,
    span: tracing::Span,
    /// The signal mask to put back when the root bus is dropped.
    root_mask: Option<SigSet>,
    owner: u32,
    /// The next ticket of the handles' sends.
    tickets: Arc<AtomicU64>,
    /// The runtime's services and their states.
    services: Services,
    /// [`run_with`](Self::run_with)'s handler is running: events are queued for it.
    handler_active: bool,
    /// Events for [`run_with`](Self::run_with)'s handler, in order.
    for_handler: VecDeque<Event>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("node", &self.me)
            .field("parent", &self.node.parent())
            .field("children", &self.node.children().len())
            .field("links", &self.links.len())
            .field("listeners", &self.listeners.len())
            .field("timers", &self.timers.len())
            .field("draining", &self.node.is_draining())
            .finish_non_exhaustive()
    }
}

impl Bus {
    // -----------------------------------------------------------------------------------
    // Creation

    /// The bus of the root process of a tree.
    ///
    /// Blocks `SIGCHLD`, `SIGTERM`, `SIGINT` and `SIGHUP` in the calling thread (they are
    /// read from a signalfd by the loop; the mask is put back when the bus is dropped), so
    /// call it before starting threads. One bus per process: a second one is refused
    /// ([`io::ErrorKind::AlreadyExists`]).
    pub fn root(config: BusConfig) -> io::Result<Self> {
        Self::start(config, nonce(0))
    }

    /// The bus of a program started with `Bus::exec_node`, whose parent link is `link_fd`
    /// (`crate::external`): like a root, but with a declared parent.
    pub(crate) fn joined(
        config: BusConfig,
        incarnation: u32,
        parent: NodeId,
        link_fd: OwnedFd,
    ) -> io::Result<Self> {
        let mut bus = Self::start(config, incarnation)?;
        let now = bus.now();
        let link = bus.node.join_parent(now, parent);
        bus.register_link(link_fd, link, Some(parent), Relation::Parent)?;
        Ok(bus)
    }

    fn start(config: BusConfig, incarnation: u32) -> io::Result<Self> {
        let pid = std::process::id();
        // Another pid here is a bus inherited through a plain fork: not this process's.
        if BUS_PID.load(Ordering::SeqCst) == pid {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "this process has a bus already",
            ));
        }
        BUS_PID.store(pid, Ordering::SeqCst);
        let old_mask = match signals::block() {
            Ok(m) => m,
            Err(e) => {
                BUS_PID.store(0, Ordering::SeqCst);
                return Err(e);
            }
        };
        let me = NodeId::new(config.host, pid, incarnation);
        let name = config.name.clone();
        let node_config = node_config(&config);
        let built = Router::new(me, config.router.clone())
            .map_err(io::Error::from)
            .and_then(|router| Self::build(config, Node::new(router, node_config)));
        match built {
            Ok(mut bus) => {
                bus.root_mask = Some(old_mask);
                if let Some(name) = name {
                    bus.node
                        .router_mut()
                        .register_name(&name)
                        .map_err(io::Error::from)?;
                }
                Ok(bus)
            }
            Err(e) => {
                signals::restore(&old_mask);
                BUS_PID.store(0, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn build(config: BusConfig, node: Node) -> io::Result<Self> {
        let me = node.node();
        let mut reactor = Reactor::new(config.events_capacity)?;
        let signal_key =
            reactor.insert(Source::Signal(signals::signalfd()?), Interest::READABLE)?;
        let (requests_tx, requests_rx) = unbounded();
        let (sends_tx, sends_rx) = bounded(config.handle_capacity.max(1));
        let span = tracing::info_span!(parent: None, "bus", pid = me.pid, node = %me);
        Ok(Self {
            rbuf: vec![0; config.read_buffer.max(4096)],
            config,
            me,
            node,
            reactor,
            signal_key,
            links: HashMap::new(),
            link_errors: Vec::new(),
            listeners: ListenerSet::default(),
            timers: Timers::default(),
            requests_tx,
            requests_rx,
            sends_tx,
            sends_rx,
            backlog: VecDeque::new(),
            writable: Vec::new(),
            internal: VecDeque::new(),
            stop: None,
            running: false,
            busy: false,
            now: monotonic_now(),
            scratch: Vec::new(),
            exit_code: None,
            next_fd_serial: 0,
            span,
            root_mask: None,
            owner: me.pid,
            tickets: Arc::new(AtomicU64::new(0)),
            services: Services::with(crate::builtin_services()),
            handler_active: false,
            for_handler: VecDeque::new(),
        })
    }

    // -----------------------------------------------------------------------------------
    // Getters

    /// This node.
    pub fn node(&self) -> NodeId {
        self.me
    }

    /// This process.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.me.pid)
    }

    /// The parent's node, for a child.
    pub fn parent(&self) -> Option<NodeId> {
        self.node.parent()
    }

    /// Whether this is the root of its tree.
    pub fn is_root(&self) -> bool {
        self.node.parent().is_none()
    }

    /// The children alive or not yet reaped, by pid.
    pub fn children(&self) -> Vec<Pid> {
        self.node.children()
    }

    /// The node of a child.
    pub fn child_node(&self, pid: Pid) -> Option<NodeId> {
        self.node.child(pid).map(|c| c.node)
    }

    /// The routing core, for views (routes, link statistics, counters).
    pub fn router(&self) -> &Router {
        self.node.router()
    }

    /// Whether a graceful shutdown is draining this node.
    pub fn is_stopping(&self) -> bool {
        self.node.is_draining()
    }

    /// Now, as the loop sees it (`CLOCK_MONOTONIC`).
    pub fn now(&mut self) -> Timestamp {
        self.now = monotonic_now();
        self.now
    }

    /// This node's own counts so far plus the tallies its exited children reported.
    pub fn tally(&self) -> Tally {
        self.node.tally()
    }

    /// The descriptors this bus holds.
    pub fn descriptors(&self) -> Descriptors {
        let mut links = Vec::new();
        let mut user = Vec::new();
        let mut signal = -1;
        for (_, s) in &self.reactor.sources {
            match s {
                Source::Signal(fd) => signal = fd.as_raw_fd(),
                Source::Link(l) => {
                    let relation = self
                        .node
                        .link(l.link)
                        .map_or(Relation::Attached, |i| i.relation);
                    links.push((l.fd.as_raw_fd(), relation));
                }
                Source::User(u) => user.push(u.fd.as_raw_fd()),
            }
        }
        links.sort_unstable_by_key(|(fd, _)| *fd);
        user.sort_unstable();
        Descriptors {
            poller: self.reactor.poller_fds().to_vec(),
            signal,
            links,
            user,
        }
    }

    /// A handle for other threads of this process.
    pub fn handle(&self) -> BusHandle {
        BusHandle {
            shared: self.reactor.shared.clone(),
            requests: self.requests_tx.clone(),
            sends: self.sends_tx.clone(),
            max_frame: self.config.router.max_frame as usize,
            tickets: self.tickets.clone(),
        }
    }

    // -----------------------------------------------------------------------------------
    // Sending, names, groups

    /// Sends a value, encoded as CBOR, to a node, pid, name, group or everyone.
    ///
    /// Returns the envelope's id; its fate comes to the listeners (`on_sent`, and
    /// `on_lost` when it is lost anywhere). Refused, with nothing queued, when a link it
    /// must go out on is full ([`SendError::QueueFull`]: retry after `on_send_ready`) or
    /// while the bus drains for shutdown.
    pub fn send<T: Serialize + ?Sized>(
        &mut self,
        to: impl Into<Address>,
        value: &T,
    ) -> Result<MessageId, SendError> {
        self.send_with(to, value, SendOptions::default())
    }

    /// Sends a value with options (a delivery receipt, a routing trace, a hop limit).
    ///
    /// A value whose encoding passes the frame limit (`BusConfig::router.max_frame`) is
    /// refused as soon as it does, before it is encoded whole
    /// ([`SendError::Encode`] with [`EncodeError::TooLarge`](crate::EncodeError::TooLarge)).
    pub fn send_with<T: Serialize + ?Sized>(
        &mut self,
        to: impl Into<Address>,
        value: &T,
        options: SendOptions,
    ) -> Result<MessageId, SendError> {
        let max_frame = usize::try_from(self.config.router.max_frame).unwrap_or(usize::MAX);
        let payload = encode_capped(value, &mut self.scratch, max_frame)?;
        self.send_bytes(to, payload, options)
    }

    /// Sends raw payload bytes.
    pub fn send_bytes(
        &mut self,
        to: impl Into<Address>,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> Result<MessageId, SendError> {
        self.submit(to.into(), payload, options).map_err(|(e, _)| e)
    }

    fn submit(
        &mut self,
        to: Address,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> Result<MessageId, (SendError, Vec<u8>)> {
        // The router uses the time only for a trace's first hop and a receipt's deadline:
        // read the clock for those, and take the loop's time of this wake-up otherwise (a
        // clock read per send was 6 % of a sender's time in the 64 B stream).
        let now = if options.trace || options.receipt {
            self.now()
        } else {
            self.now
        };
        match self.node.submit(now, to, payload, options) {
            Ok(id) => Ok(id),
            Err(Refusal::Draining { payload }) => Err((SendError::ShuttingDown, payload)),
            Err(Refusal::Router(Refused { error, payload })) => {
                let peer = match &error {
                    forkbus_router::Error::QueueFull { link } => self.peer_of(*link),
                    _ => None,
                };
                Err((SendError::from_router(error, peer), payload))
            }
        }
    }

    fn peer_of(&self, link: LinkId) -> Option<NodeId> {
        self.node
            .router()
            .link_stats(link)
            .ok()
            .and_then(|s| s.peer)
    }

    /// Registers a name for this node, announced to the whole tree. Names are unique: a
    /// name another node holds is refused ([`NameError::Taken`]).
    pub fn register_name(&mut self, name: &str) -> Result<(), NameError> {
        self.node
            .router_mut()
            .register_name(name)
            .map_err(NameError::from_router)
    }

    /// Gives up a name.
    pub fn unregister_name(&mut self, name: &str) -> Result<(), NameError> {
        self.node
            .router_mut()
            .unregister_name(name)
            .map_err(NameError::from_router)
    }

    /// Joins a group, announced to the whole tree.
    pub fn join_group(&mut self, group: &str) -> Result<(), NameError> {
        self.node
            .router_mut()
            .join_group(group)
            .map_err(NameError::from_router)
    }

    /// Leaves a group.
    pub fn leave_group(&mut self, group: &str) -> Result<(), NameError> {
        self.node
            .router_mut()
            .leave_group(group)
            .map_err(NameError::from_router)
    }

    /// Holds `name` in custody for a worker that is down ([`Router::hold_name`]), for the
    /// services that restart workers under their names.
    pub(crate) fn hold_name(&mut self, name: &str, capacity: usize) -> Result<(), NameError> {
        self.node
            .router_mut()
            .hold_name(name, capacity)
            .map_err(NameError::from_router)
    }

    /// Gives up a name held in custody: what it held is reported lost to its origins.
    pub(crate) fn release_held_name(&mut self, name: &str) {
        let _ = self.node.router_mut().unregister_name(name);
    }

    // -----------------------------------------------------------------------------------
    // Listeners, timers, descriptors

    /// Adds a listener; lowest priority runs first, ties in the order added.
    pub fn add_listener(&mut self, priority: i32, listener: impl Listener + 'static) -> ListenerId {
        self.listeners.insert(priority, Box::new(listener))
    }

    /// Removes a listener; `false` when there is none with this id.
    pub fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.listeners.remove(id)
    }

    /// Runs `callback` once, `after` from now, inside the loop.
    pub fn add_timer(
        &mut self,
        after: Duration,
        callback: impl FnOnce(&mut Self) + 'static,
    ) -> TimerId {
        let at = self.now() + after;
        self.add_timer_at(at, callback)
    }

    /// Runs `callback` once at `at` (on [`monotonic_now`]'s clock), inside the loop.
    pub fn add_timer_at(
        &mut self,
        at: Timestamp,
        callback: impl FnOnce(&mut Self) + 'static,
    ) -> TimerId {
        self.timers
            .insert(at, TimerAction::Call(Box::new(callback)))
    }

    /// Sets a timer that is an event: [`Event::Timer`] with its id, `after` from now, to the
    /// listeners ([`Listener::on_timer`]) and [`run_with`](Self::run_with)'s handler (so
    /// that state shared with message handling needs no shared cell).
    pub fn timer(&mut self, after: Duration) -> TimerId {
        let at = self.now() + after;
        self.timer_at(at)
    }

    /// [`timer`](Self::timer) at `at` (on [`monotonic_now`]'s clock).
    pub fn timer_at(&mut self, at: Timestamp) -> TimerId {
        self.timers.insert(at, TimerAction::Event)
    }

    /// Cancels a timer; `false` when it fired or was cancelled already.
    pub fn cancel_timer(&mut self, id: TimerId) -> bool {
        self.timers.cancel(id).is_some()
    }

    /// Registers a descriptor of the application's in the loop (level-triggered: the
    /// callback runs on every iteration while the descriptor is ready, so read it until it
    /// would block, or drop the interest). The bus owns it until [`remove_fd`](Self::remove_fd);
    /// a forked child closes the parent's registered descriptors, like every descriptor it
    /// was not told to keep: to share one with children (a listening socket, say), keep a
    /// duplicate outside the bus and name that in [`ForkOptions::keep_fd`].
    pub fn add_fd(
        &mut self,
        fd: OwnedFd,
        interest: Interest,
        callback: impl FnMut(&mut Self, FdReady) + 'static,
    ) -> io::Result<FdId> {
        let serial = self.next_fd_serial;
        self.next_fd_serial += 1;
        let callback: FdCallback = Box::new(callback);
        let key = self.reactor.insert(
            Source::User(UserSource {
                fd,
                serial,
                interest,
                callback: Some(callback),
            }),
            interest,
        )?;
        Ok(FdId { key, serial })
    }

    /// Changes what a registered descriptor is watched for.
    pub fn set_fd_interest(&mut self, id: FdId, interest: Interest) -> io::Result<()> {
        match self.reactor.sources.get_mut(id.key) {
            Some(Source::User(u)) if u.serial == id.serial => u.interest = interest,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no such descriptor",
                ))
            }
        }
        self.reactor.set_interest(id.key, interest)
    }

    /// A registered descriptor, to read or write it (from its callback, say).
    pub fn fd(&self, id: FdId) -> Option<BorrowedFd<'_>> {
        match self.reactor.sources.get(id.key) {
            Some(Source::User(u)) if u.serial == id.serial => Some(u.fd.as_fd()),
            _ => None,
        }
    }

    /// Deregisters a descriptor and hands it back.
    pub fn remove_fd(&mut self, id: FdId) -> Option<OwnedFd> {
        match self.reactor.sources.get(id.key) {
            Some(Source::User(u)) if u.serial == id.serial => {}
            _ => return None,
        }
        match self.reactor.remove(id.key) {
            Some(Source::User(u)) => {
                // A callback removing its own descriptor: drop it after it returns.
                Some(u.fd)
            }
            _ => None,
        }
    }

    /// Adopts a connected stream socket as a peer link to a node that speaks the bus
    /// protocol (a program started another way, a test's raw peer, a redundant path).
    /// `peer`, when given, is the node the hello must name. A peer link speaks for its own
    /// neighbour only: the neighbour is reachable from this node when the tree does not know
    /// it already, and its traffic is delivered here, not routed on (see
    /// [`LinkRole::Peer`](forkbus_router::LinkRole::Peer)).
    pub fn attach_link(&mut self, fd: OwnedFd, peer: Option<NodeId>) -> io::Result<LinkId> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
        flags.insert(nix::fcntl::OFlag::O_NONBLOCK);
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        let now = self.now();
        let link = self.node.attach(now, peer);
        self.register_link(fd, link, peer, Relation::Attached)
    }

    /// Registers the descriptor of a link the node has opened; a link whose descriptor
    /// does not register is abandoned.
    fn register_link(
        &mut self,
        fd: OwnedFd,
        link: LinkId,
        peer: Option<NodeId>,
        relation: Relation,
    ) -> io::Result<LinkId> {
        let now = self.now();
        let span = tracing::debug_span!(
            parent: &self.span, "link", %link, peer = ?peer, relation = ?relation
        );
        let source = Source::Link(LinkSource {
            fd,
            link,
            peer,
            writing: false,
            span,
        });
        match self.reactor.insert(source, Interest::READABLE) {
            Ok(key) => {
                self.links.insert(link, key);
                Ok(link)
            }
            Err(e) => {
                self.node.abandon_link(now, link);
                Err(e)
            }
        }
    }

    /// Adopts a program started with `Bus::exec_node` as a child: `fd` is this side of its
    /// socketpair. Unlike a forked child it knows nothing of the tree yet, so the hello and
    /// the routing table go over the wire; its route is usable at once.
    pub(crate) fn adopt_node(&mut self, fd: OwnedFd, pid: Pid, node: NodeId) -> io::Result<()> {
        let now = self.now();
        let link = self.node.adopt(now, pid, node);
        self.register_link(fd, link, Some(node), Relation::Child(pid))?;
        Ok(())
    }

    /// Sets the exit code this process uses when its loop ends (a child; the root does not
    /// exit). Without one: 0, or [`EXIT_PARENT_GONE`] when the parent went away.
    pub fn set_exit_code(&mut self, code: i32) {
        self.exit_code = Some(code);
    }

    /// Queues a link-level control frame for a neighbour (a child by pid, or the parent);
    /// `false` when there is no open link to it.
    pub(crate) fn send_link_control(&mut self, to: Relation, code: u32, data: Vec<u8>) -> bool {
        self.node.send_control(to, code, data)
    }

    /// A service's state in this bus, made on first use.
    pub(crate) fn service_state<T: Default + 'static>(&mut self) -> &mut T {
        self.services.state::<T>()
    }

    /// A service's state in this bus, if it was ever used.
    pub(crate) fn service_state_ref<T: 'static>(&self) -> Option<&T> {
        self.services.state_ref::<T>()
    }

    /// A process a service started without a link (a program run by `exec`): the drain
    /// waits for it and kills it at its deadline.
    pub(crate) fn hold_process(&mut self, pid: Pid) {
        self.node.hold_process(pid);
    }

    /// A held process ended and its service is done with it.
    pub(crate) fn release_process(&mut self, pid: Pid) {
        self.node.release_process(pid);
    }

    /// Runs `work` at the loop's top level after the current event, where it may call
    /// listeners ([`emit`](Self::emit)).
    pub(crate) fn defer(&mut self, work: impl FnOnce(&mut Self) + 'static) {
        self.internal
            .push_back(Internal::Deferred(Deferred(Box::new(work))));
    }

    /// Whether the loop is running (a blocking wait from inside it would nest).
    pub(crate) fn in_loop(&self) -> bool {
        self.running
    }

    // -----------------------------------------------------------------------------------
    // Fork

    /// Forks a child that runs `child` with a bus of its own, then its loop, then exits; it
    /// never returns into the caller's code (a panic in `child` is caught and the child
    /// exits with [`EXIT_PANIC`]). Returns the child's pid; its route is usable at once.
    ///
    /// Refused, with nothing forked, when this process has more than one thread or the bus
    /// is draining. In the child: the parent's links, signalfd, poller and registered
    /// descriptors are closed, and so is every other descriptor but 0, 1, 2, its parent
    /// link and those named in [`ForkOptions::keep_fds`] (before the child's bus opens its
    /// own); its router, queues, timers, listeners and child table are dropped (forgotten:
    /// their destructors belong to the parent); with [`ForkOptions::die_with_parent`], the
    /// child gets `SIGKILL` when this process dies.
    ///
    /// A value the child inherits that owns a descriptor it did not keep (a `File`, a
    /// socket, an `OwnedFd` moved into `child`) refers to a closed number, which the
    /// child's bus may reuse: the child must neither use nor drop it (forget it, or
    /// release it with `into_raw_fd`), or keep its descriptor.
    pub fn fork<F>(&mut self, options: ForkOptions, child: F) -> Result<Pid, ForkError>
    where
        F: FnOnce(&mut Self),
    {
        if self.is_stopping() {
            return Err(ForkError::ShuttingDown);
        }
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        if threads > 1 {
            return Err(ForkError::Threaded { threads });
        }
        let names: Vec<String> = options.name.iter().cloned().collect();
        // Names are unique: only a free name, one of this node's, or one a child of this
        // node holds (its replacement takes it over) may be given to the new child.
        self.node
            .router()
            .check_fork_names(&names)
            .map_err(|e| ForkError::Name(NameError::from_router(e)))?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )?;
        let incarnation = nonce(u32::try_from(self.node.children().len()).unwrap_or(0));
        let parent_pid = nix::unistd::getpid();
        // Whatever sits in the standard buffers would be written twice otherwise.
        let _ = io::stdout().flush();
        let _ = io::stderr().flush();
        // SAFETY: this process has exactly one thread (counted just above; the bus starts
        // none, and nothing ran in between), so the child may run any code, not only
        // async-signal-safe functions. The child never returns into the caller: it ends in
        // `_exit`.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Child => {
                self.become_child(options, parent_pid, incarnation, theirs, ours, child)
            }
            ForkResult::Parent { child: raw } => {
                drop(theirs);
                let pid = Pid::from_raw(u32::try_from(raw.as_raw()).unwrap_or(0));
                let node = NodeId::new(self.me.host, pid.as_raw(), incarnation);
                // The child's router was made from this router's copy at fork time: it
                // knows this node and its table already (`Router::forked_child`), and this
                // router knows the child's name at once.
                let now = self.now();
                let link = self.node.handle_fork(now, pid, node, &names);
                match self.register_link(ours, link, Some(node), Relation::Child(pid)) {
                    Ok(_) => {
                        tracing::debug!(parent: &self.span, child = %node, "forked");
                        Ok(pid)
                    }
                    Err(e) => {
                        let _ = kill(raw, Signal::SIGKILL);
                        let _ = waitpid(raw, None);
                        Err(ForkError::Io(e))
                    }
                }
            }
        }
    }

    fn become_child<F: FnOnce(&mut Self)>(
        &mut self,
        options: ForkOptions,
        parent_pid: nix::unistd::Pid,
        incarnation: u32,
        link_fd: OwnedFd,
        parent_end: OwnedFd,
        child: F,
    ) -> ! {
        drop(parent_end);
        if options.die_with_parent && nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
            exit_now(EXIT_OS_ERROR);
        }
        // The parent may have died before the death signal was armed: then nobody will
        // send it, and the child is an orphan already.
        if nix::unistd::getppid() != parent_pid {
            exit_now(EXIT_PARENT_GONE);
        }
        let parent_node = self.me;
        let config = self.config.clone();
        let pid = std::process::id();
        let me = NodeId::new(config.host, pid, incarnation);
        // The child's router knows the parent's whole table from the start, so its first
        // sends have routes; the parent sends it nothing it knows already.
        let now = self.now();
        let names: Vec<String> = options.name.iter().cloned().collect();
        let forked =
            self.node
                .forked_child(now, me, &names, config.router.clone(), node_config(&config));
        BUS_PID.store(pid, Ordering::SeqCst);
        // Close every descriptor of the parent's bus before opening ours, so no number is
        // closed twice.
        self.reactor.abandon();
        // Then every other descriptor but stdio, the parent link and what the caller keeps:
        // the child holds only what it was given. Before the new bus opens its own.
        let mut keep = options.keep_fds;
        keep.extend([0, 1, 2, link_fd.as_raw_fd()]);
        keep.retain(|fd| *fd >= 0);
        keep.sort_unstable();
        keep.dedup();
        if let Err(e) = close_all_but(&keep) {
            tracing::error!(error = %e, "cannot close the inherited descriptors");
            exit_now(EXIT_OS_ERROR);
        }
        let built = forked
            .map_err(io::Error::from)
            .and_then(|(node, link)| Self::build(config, node).map(|bus| (bus, link)));
        let code = match built {
            Ok((fresh, link)) => {
                let inherited = std::mem::replace(self, fresh);
                // The parent's router, listeners, timers, queues and children: its memory,
                // its destructors.
                std::mem::forget(inherited);
                match self.register_link(link_fd, link, Some(parent_node), Relation::Parent) {
                    Ok(_) => {
                        // The name was registered by `forked_child`, before the child's
                        // first announcement.
                        self.run_child(child)
                    }
                    Err(e) => {
                        tracing::error!(parent: &self.span, error = %e, "cannot register the parent link");
                        EXIT_OS_ERROR
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the child's bus");
                EXIT_OS_ERROR
            }
        };
        exit_now(code)
    }

    fn run_child<F: FnOnce(&mut Self)>(&mut self, child: F) -> i32 {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.span.clone().in_scope(|| child(self));
            self.run()
        }));
        if let Ok(Ok(Stop::Stopped)) = outcome {
            // Leaving on its own (not drained): its counts still go to the parent, so the
            // tree's tally counts it as reported.
            if let Some(link) = self.node.leave() {
                self.flush_final(link);
            }
        }
        match outcome {
            Ok(Ok(stop)) => match (self.exit_code, stop) {
                (Some(code), _) => code,
                (None, Stop::ParentGone) => EXIT_PARENT_GONE,
                (None, _) => 0,
            },
            Ok(Err(e)) => {
                tracing::error!(parent: &self.span, error = %e, "the loop failed");
                EXIT_OS_ERROR
            }
            Err(panic) => {
                tracing::error!(
                    parent: &self.span, panic = %panic_message(&*panic), "the child's closure panicked"
                );
                EXIT_PANIC
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Running and stopping

    /// Runs the loop until [`stop`](Self::stop), a completed graceful shutdown, or (in a
    /// child) the loss of the parent link. The root's bus may run again afterwards.
    ///
    /// Fails only when the poller does, or when called from inside the loop.
    pub fn run(&mut self) -> io::Result<Stop> {
        self.run_inner(None)
    }

    /// Runs the loop like [`run`](Self::run), handing every [`Event`] to `handler` as well
    /// (after the listeners have heard of it, before anything read in the same wake-up is
    /// acknowledged or answered on the wire). One closure sees messages, outcomes, child
    /// exits and its own timers ([`timer`](Self::timer)), so the state they share can be a
    /// plain local borrowed by the closure. A panic in `handler` is caught and reported as
    /// [`BusError::CallbackPanicked`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use forkbus_runtime::{Bus, BusConfig, Event};
    ///
    /// # fn main() -> std::io::Result<()> {
    /// let mut bus = Bus::root(BusConfig::default())?;
    /// let mut seen = 0;
    /// let tick = bus.timer(Duration::from_secs(1));
    /// bus.run_with(|bus, event| match event {
    ///     Event::Message(_) => seen += 1,
    ///     Event::Timer(t) if t == tick => {
    ///         println!("{seen} messages in a second");
    ///         bus.stop();
    ///     }
    ///     _ => {}
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn run_with(&mut self, mut handler: impl FnMut(&mut Self, Event)) -> io::Result<Stop> {
        self.run_inner(Some(&mut handler))
    }

    fn run_inner(&mut self, handler: Option<&mut Handler<'_>>) -> io::Result<Stop> {
        if self.running {
            return Err(io::Error::other("Bus::run called from inside the loop"));
        }
        self.running = true;
        self.handler_active = handler.is_some();
        let span = self.span.clone();
        let result = span.in_scope(|| self.run_loop(handler));
        self.handler_active = false;
        self.for_handler.clear();
        self.running = false;
        result
    }

    fn run_loop(&mut self, mut handler: Option<&mut Handler<'_>>) -> io::Result<Stop> {
        loop {
            self.tick(handler.as_deref_mut());
            if let Some(stop) = self.stop.take() {
                return Ok(stop);
            }
            let timeout = self.wait_timeout();
            self.reactor.wait(timeout)?;
            self.now = monotonic_now();
            let mut ready = std::mem::take(&mut self.reactor.ready);
            for r in ready.drain(..) {
                self.on_ready(r);
            }
            self.reactor.ready = ready;
        }
    }

    /// Ends the loop at the end of this iteration ([`Stop::Stopped`]); pending output gets
    /// one more write.
    pub fn stop(&mut self) {
        if self.stop.is_none() {
            self.stop = Some(Stop::Stopped);
        }
    }

    /// Shuts this node's subtree down gracefully (at the root: the whole tree), bottom-up:
    /// every child is told to drain, drains its own children, waits until they are reaped
    /// and its queues acknowledged, reports its tally and exits 0. Sends are refused from
    /// now on. The loop ([`run`](Self::run)) returns [`Stop::Shutdown`] with the tally once
    /// this node's children are reaped and its queues idle (or the drain deadline passed).
    /// `SIGTERM` and `SIGINT` do the same.
    pub fn shutdown_tree(&mut self) {
        self.begin_drain();
    }

    fn begin_drain(&mut self) {
        if self.is_stopping() {
            return;
        }
        self.now = monotonic_now();
        self.node.begin_drain(self.now);
    }

    /// Writes a link's output before the process exits, waiting for the kernel to take it
    /// (bounded). Nothing is read meanwhile: the tally sent was this node's last word.
    fn flush_final(&mut self, link: LinkId) {
        let Some(&key) = self.links.get(&link) else {
            return;
        };
        let Some(Source::Link(src)) = self.reactor.sources.get(key) else {
            return;
        };
        let raw = src.fd.as_raw_fd();
        let deadline = monotonic_now() + FINAL_FLUSH;
        loop {
            let Ok(buf) = self.node.pending_output(link) else {
                return;
            };
            if buf.is_empty() {
                return;
            }
            match send(raw, buf, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    let _ = self.node.advance_output(link, n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    let now = monotonic_now();
                    if now >= deadline {
                        return;
                    }
                    let left = deadline.saturating_duration_since(now);
                    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                    if let Some(Source::Link(src)) = self.reactor.sources.get(key) {
                        let mut fds = [nix::poll::PollFd::new(
                            src.fd.as_fd(),
                            nix::poll::PollFlags::POLLOUT,
                        )];
                        let _ = nix::poll::poll(&mut fds, ms);
                    }
                }
                Err(_) => return,
            }
        }
    }

    fn wait_timeout(&self) -> Option<Duration> {
        if self.busy || !self.internal.is_empty() || self.stop.is_some() {
            return Some(Duration::ZERO);
        }
        let next = match (self.node.poll_timeout(), self.timers.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|t| t.saturating_duration_since(self.now))
    }

    /// One pass of work that needs no waiting: timers, the node's timeouts, handle
    /// requests, then events and writes until quiet.
    fn tick(&mut self, handler: Option<&mut Handler<'_>>) {
        self.now = monotonic_now();
        self.fire_timers();
        if self.node.poll_timeout().is_some_and(|t| t <= self.now) {
            self.node.handle_timeout(self.now);
        }
        self.take_requests();
        self.drive(handler);
    }

    fn fire_timers(&mut self) {
        for _ in 0..MAX_TIMERS {
            let Some((id, action)) = self.timers.pop_due(self.now) else {
                return;
            };
            let callback = match action {
                TimerAction::Call(callback) => callback,
                TimerAction::Event => {
                    self.emit(Event::Timer(id));
                    continue;
                }
            };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| callback(self))) {
                self.internal
                    .push_back(Internal::Error(BusError::CallbackPanicked {
                        what: "timer",
                        message: panic_message(&*panic),
                    }));
            }
        }
        // Timers still due make the next wait's timeout zero.
    }

    fn take_requests(&mut self) {
        while let Ok(r) = self.requests_rx.try_recv() {
            match r {
                Request::Stop => self.stop(),
                Request::Shutdown => self.begin_drain(),
            }
        }
        self.pump_handle_sends();
    }

    /// Submits the handles' sends; a send refused for a full queue waits (and holds the
    /// channel back) until a link has room.
    fn pump_handle_sends(&mut self) {
        loop {
            let out = match self.backlog.pop_front() {
                Some(o) => o,
                None => match self.sends_rx.try_recv() {
                    Ok(o) => o,
                    Err(_) => return,
                },
            };
            let Outgoing {
                ticket,
                to,
                payload,
                options,
            } = out;
            match self.submit(to.clone(), payload, options) {
                Ok(id) if options.receipt || options.trace => {
                    self.internal.push_back(Internal::Submitted(ticket, id));
                }
                Ok(_) => {}
                Err((SendError::QueueFull { .. }, payload)) => {
                    self.backlog.push_front(Outgoing {
                        ticket,
                        to,
                        payload,
                        options,
                    });
                    return;
                }
                Err((error, _)) => {
                    self.internal
                        .push_back(Internal::Error(BusError::HandleSend { ticket, to, error }));
                }
            }
        }
    }

    /// Dispatches and writes until nothing is left to tell or write.
    ///
    /// Events go first: the router queues a delivery receipt with the message it is for,
    /// and the receipt must not reach the kernel before the application was told of the
    /// message — a process killed in between would leave the origin a false `Delivered`
    /// for a message no listener saw.
    fn drive(&mut self, mut handler: Option<&mut Handler<'_>>) {
        for _ in 0..MAX_ROUNDS {
            let mut any = false;
            while let Some(action) = self.node.poll_action() {
                any = true;
                self.on_action(action);
            }
            while let Some(event) = self.node.poll_event() {
                any = true;
                self.on_node_event(event);
            }
            while let Some(event) = self.internal.pop_front() {
                any = true;
                self.on_internal(event);
            }
            if let Some(handler) = handler.as_deref_mut() {
                while let Some(event) = self.for_handler.pop_front() {
                    any = true;
                    let outcome = catch_unwind(AssertUnwindSafe(|| handler(self, event)));
                    if let Err(panic) = outcome {
                        self.internal
                            .push_back(Internal::Error(BusError::CallbackPanicked {
                                what: "run_with handler",
                                message: panic_message(&*panic),
                            }));
                    }
                }
            }
            while let Some(link) = self.writable.pop() {
                any = true;
                self.flush_link(link);
            }
            while let Some(link) = self.node.poll_transmit() {
                any = true;
                self.flush_link(link);
            }
            if !any {
                self.busy = false;
                return;
            }
        }
        self.busy = true;
    }

    // -----------------------------------------------------------------------------------
    // Readiness

    fn on_ready(&mut self, r: Ready) {
        match self.reactor.sources.get(r.key) {
            Some(Source::Link(l)) => {
                let link = l.link;
                if r.readable {
                    self.read_link(r.key, MAX_READS);
                }
                if r.writable {
                    // Written by `drive`, once the messages read meanwhile (from this link
                    // or another) are dispatched: their receipts may be queued here.
                    self.writable.push(link);
                }
            }
            Some(Source::Signal(_)) => self.read_signals(),
            Some(Source::User(_)) => self.fire_fd(r),
            None => {}
        }
    }

    /// Reads a link until it would block (a short read means the socket was empty, and
    /// level-triggered readiness reports what comes later), end of file, an error, or
    /// `max_reads` reads.
    fn read_link(&mut self, key: usize, max_reads: usize) {
        let Some(Source::Link(src)) = self.reactor.sources.get(key) else {
            return;
        };
        let (raw, link) = (src.fd.as_raw_fd(), src.link);
        let span = src.span.clone();
        let _entered = span.enter();
        for _ in 0..max_reads {
            match recv(raw, &mut self.rbuf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    tracing::debug!("end of file");
                    self.node.handle_link_closed(self.now, link);
                    return;
                }
                Ok(n) => {
                    if self
                        .node
                        .handle_input(self.now, link, &self.rbuf[..n])
                        .is_err()
                    {
                        // Closed by the router (protocol error); its LinkDown is queued.
                        return;
                    }
                    if n < self.rbuf.len() {
                        return;
                    }
                }
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => {}
                Err(Errno::ECONNRESET) => {
                    self.node.handle_link_closed(self.now, link);
                    return;
                }
                Err(e) => {
                    self.link_failed(link, "read", e);
                    return;
                }
            }
        }
    }

    /// Writes a link's coalesced output with one `send` (a partial write waits for
    /// writability), and asks for write interest only while output is left.
    fn flush_link(&mut self, link: LinkId) {
        let Some(&key) = self.links.get(&link) else {
            return;
        };
        let Some(Source::Link(src)) = self.reactor.sources.get(key) else {
            return;
        };
        let raw = src.fd.as_raw_fd();
        let span = src.span.clone();
        let _entered = span.enter();
        let failed = loop {
            let Ok(buf) = self.node.pending_output(link) else {
                return;
            };
            if buf.is_empty() {
                break None;
            }
            match send(raw, buf, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    let all = n == buf.len();
                    let _ = self.node.advance_output(link, n);
                    if !all {
                        // The kernel took what it had room for: wait for writability.
                        break None;
                    }
                }
                Err(Errno::EAGAIN) => break None,
                Err(Errno::EINTR) => {}
                Err(e) => break Some(e),
            }
        };
        match failed {
            Some(Errno::EPIPE | Errno::ECONNRESET) => self.peer_gone(link),
            Some(e) => self.link_failed(link, "write", e),
            None => self.update_write_interest(key, link),
        }
    }

    fn update_write_interest(&mut self, key: usize, link: LinkId) {
        let want = self.node.pending_output(link).is_ok_and(|b| !b.is_empty());
        let Some(Source::Link(src)) = self.reactor.sources.get_mut(key) else {
            return;
        };
        if src.writing == want {
            return;
        }
        src.writing = want;
        let interest = Interest {
            readable: true,
            writable: want,
        };
        if let Err(e) = self.reactor.set_interest(key, interest) {
            self.internal
                .push_back(Internal::Error(BusError::Poller(e)));
        }
    }

    /// The peer closed its end: read what it left, then the end of file takes the link
    /// down (or take it down now if someone else still holds the peer's end).
    fn peer_gone(&mut self, link: LinkId) {
        if let Some(&key) = self.links.get(&link) {
            self.read_link(key, usize::MAX);
        }
        self.node.handle_link_closed(self.now, link);
    }

    fn link_failed(&mut self, link: LinkId, op: &'static str, e: Errno) {
        let peer = self.peer_of(link);
        tracing::warn!(%link, op, error = %e, "link failed");
        self.link_errors.push((
            link,
            BusError::Io {
                peer,
                op,
                error: e.into(),
            },
        ));
        self.node.handle_link_closed(self.now, link);
    }

    fn read_signals(&mut self) {
        let mut reap = false;
        while let Some(Source::Signal(sfd)) = self.reactor.sources.get(self.signal_key) {
            match sfd.read_signal() {
                Ok(Some(info)) => {
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                    match Signal::try_from(signo) {
                        Ok(Signal::SIGCHLD) => reap = true,
                        Ok(Signal::SIGTERM | Signal::SIGINT) => {
                            tracing::info!(signal = signo, "shutdown signal");
                            self.begin_drain();
                        }
                        _ => self.internal.push_back(Internal::Signal(signo)),
                    }
                }
                Ok(None) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the signalfd");
                    break;
                }
            }
        }
        if reap {
            self.reap_children();
        }
    }

    /// Reaps every child that ended (signals coalesce: look at all of them).
    fn reap_children(&mut self) {
        for pid in self.node.children() {
            loop {
                match waitpid(pid.nix(), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(status) => {
                        if let Some(exit) = exit_of(status) {
                            self.child_reaped(pid, exit);
                        }
                        break;
                    }
                    Err(Errno::EINTR) => {}
                    Err(e) => {
                        tracing::warn!(%pid, error = %e, "cannot wait for a child");
                        break;
                    }
                }
            }
        }
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            service.on_sigchld(self);
            i += 1;
        }
    }

    fn child_reaped(&mut self, pid: Pid, status: forkbus_node::ExitStatus) {
        tracing::debug!(%pid, %status, "child reaped");
        // Whatever the child wrote before it died is in the socket: take it first.
        let link = self.node.child(pid).and_then(|c| c.state.link());
        if let Some(&key) = link.and_then(|l| self.links.get(&l)) {
            self.read_link(key, usize::MAX);
        }
        self.node.handle_reaped(self.now, pid, status);
    }

    fn fire_fd(&mut self, r: Ready) {
        let Some(Source::User(u)) = self.reactor.sources.get_mut(r.key) else {
            return;
        };
        let serial = u.serial;
        let ready = FdReady {
            id: FdId { key: r.key, serial },
            fd: u.fd.as_raw_fd(),
            readable: r.readable,
            writable: r.writable,
        };
        let Some(mut callback) = u.callback.take() else {
            return;
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| callback(self, ready)));
        if let Some(Source::User(u)) = self.reactor.sources.get_mut(r.key) {
            if u.serial == serial && u.callback.is_none() {
                u.callback = Some(callback);
            }
        }
        if let Err(panic) = outcome {
            self.internal
                .push_back(Internal::Error(BusError::CallbackPanicked {
                    what: "fd",
                    message: panic_message(&*panic),
                }));
        }
    }

    // -----------------------------------------------------------------------------------
    // Events

    /// Asks each service whether it owns `pid` (and killed it).
    fn service_kill(&mut self, pid: Pid) -> bool {
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            if service.kill(self, pid) {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Offers a control frame to each service; `false` when none took it.
    fn service_control(&mut self, from: LinkInfo, code: u32, data: &[u8]) -> bool {
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            if service.on_control(self, from, code, data) {
                return true;
            }
            i += 1;
        }
        false
    }

    fn on_action(&mut self, action: Action) {
        match action {
            Action::Kill(pid) => {
                if !self.service_kill(pid) {
                    tracing::warn!(parent: &self.span, %pid, "drain deadline passed: SIGKILL");
                    let _ = kill(pid.nix(), Signal::SIGKILL);
                }
            }
            other => tracing::debug!(action = ?other, "unhandled node action"),
        }
    }

    fn on_node_event(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Router(event) => self.on_router_event(event),
            NodeEvent::PeerShutdown(shutdown) => self.on_peer_shutdown(shutdown),
            NodeEvent::ChildExit { pid, status } => {
                self.emit(Event::ChildExit { pid, status });
            }
            NodeEvent::Control {
                link,
                from,
                code,
                data,
            } => {
                if !self.service_control(from, code, &data) {
                    tracing::warn!(%link, code, relation = ?from.relation, "control frame refused");
                    let peer = self.peer_of(link);
                    self.emit(Event::Error(BusError::BadControl { peer, code }));
                }
            }
            NodeEvent::BadControl { peer, code, .. } => {
                self.emit(Event::Error(BusError::BadControl { peer, code }));
            }
            NodeEvent::Draining => {
                tracing::info!(parent: &self.span, "draining");
                // Frames queued after this iteration's writes: write them before sleeping.
                self.busy = true;
                self.emit(Event::Shutdown);
            }
            NodeEvent::Drained(tally) => {
                tracing::info!(parent: &self.span, ?tally, "drained");
                // The tally is this process's last word to its parent: hand it to the
                // kernel before the loop ends.
                if let Some(link) = self.node.parent_link() {
                    self.flush_final(link);
                }
                self.stop = Some(Stop::Shutdown(tally));
            }
            NodeEvent::ParentGone => {
                if self.stop.is_none() {
                    self.stop = Some(Stop::ParentGone);
                }
            }
            other => tracing::debug!(event = ?other, "unhandled node event"),
        }
    }

    fn on_router_event(&mut self, event: RouterEvent) {
        match event {
            RouterEvent::Message { envelope, link } => {
                self.emit(Event::Message(Message::new(envelope, link)));
            }
            RouterEvent::Held { name, id } => {
                tracing::debug!(%name, %id, "held in custody");
            }
            RouterEvent::Sent(id) => self.emit(Event::Sent(id)),
            RouterEvent::Delivered(id) => self.emit(Event::Delivered(id)),
            RouterEvent::Lost(report) => self.emit(Event::Lost(report)),
            RouterEvent::LinkUp { link, peer } => {
                if let Some(Source::Link(src)) = self
                    .links
                    .get(&link)
                    .and_then(|k| self.reactor.sources.get_mut(*k))
                {
                    src.peer = Some(peer);
                }
                tracing::debug!(%link, %peer, "peer up");
                self.emit(Event::PeerUp(peer));
            }
            RouterEvent::LinkReady(_) => {
                self.pump_handle_sends();
                self.emit(Event::SendReady);
            }
            RouterEvent::NodeDown(node) => self.emit(Event::NodeDown(node)),
            other => tracing::debug!(event = ?other, "unhandled router event"),
        }
    }

    /// A link went down: its descriptor closes, its errors and its peer shutdown go to
    /// the listeners.
    fn on_peer_shutdown(&mut self, shutdown: PeerShutdown) {
        let link = shutdown.link;
        let source = self
            .links
            .remove(&link)
            .and_then(|key| self.reactor.remove(key));
        // Deregistered above; the descriptor closes here.
        drop(source);
        tracing::debug!(%link, peer = ?shutdown.peer, cause = ?shutdown.cause, lost = shutdown.lost.len(), "link down");
        let mut errors = Vec::new();
        while let Some(at) = self.link_errors.iter().position(|(l, _)| *l == link) {
            errors.push(self.link_errors.swap_remove(at).1);
        }
        match &shutdown.cause {
            DownCause::Protocol(error) => errors.push(BusError::Protocol {
                peer: shutdown.peer,
                link,
                error: error.clone(),
            }),
            DownCause::Overrun => errors.push(BusError::Overrun {
                peer: shutdown.peer,
            }),
            _ => {}
        }
        for error in errors {
            self.emit(Event::Error(error));
        }
        self.emit(Event::PeerShutdown(shutdown));
    }

    fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::Error(error) => {
                tracing::warn!(%error, "bus error");
                self.emit(Event::Error(error));
            }
            Internal::Signal(signal) => self.emit(Event::Signal(signal)),
            Internal::Submitted(ticket, id) => self.emit(Event::Submitted { ticket, id }),
            Internal::Deferred(Deferred(work)) => work(self),
        }
    }

    /// Hands an event to the services, then to every listener, then to the services
    /// again (`Service::after_event`), then queues it for [`run_with`](Self::run_with)'s
    /// handler (only from the loop's top level: a deferred closure, a timer, a runtime
    /// event; never from inside a listener).
    pub(crate) fn emit(&mut self, event: Event) {
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            service.on_event(self, &event);
            i += 1;
        }
        self.dispatch(&event, None);
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            service.after_event(self, &event);
            i += 1;
        }
        if self.handler_active {
            self.for_handler.push_back(event);
        }
    }

    /// Calls every listener in order (but `except`), each under `catch_unwind`. Listeners
    /// added meanwhile run from the next event on; those removed meanwhile are skipped. A
    /// listener's panic is reported to the others as an error event.
    fn dispatch(&mut self, event: &Event, except: Option<ListenerId>) {
        if self.listeners.len() == 0 {
            return;
        }
        let mut taken = self.listeners.take();
        let mut panics = Vec::new();
        for entry in &mut taken {
            if Some(entry.id) == except || self.listeners.is_removed(entry.id) {
                continue;
            }
            let listener: &mut dyn Listener = &mut *entry.item;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| listener.on_event(self, event))) {
                panics.push((entry.id, panic_message(&*panic)));
            }
        }
        self.listeners.restore(taken);
        let method = event.method();
        for (listener, message) in panics {
            tracing::error!(%listener, method, %message, "listener panicked");
            if !matches!(event, Event::Error(_)) {
                let error = Event::Error(BusError::ListenerPanicked {
                    listener,
                    method,
                    message,
                });
                self.dispatch(&error, Some(listener));
            }
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            return;
        }
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            service.on_drop(self);
            i += 1;
        }
        // Close every link: children see the end of file and end their loops.
        let keys: Vec<usize> = self.links.drain().map(|(_, k)| k).collect();
        for key in keys {
            drop(self.reactor.remove(key));
        }
        // Reap them, killing what does not end in time.
        let deadline = monotonic_now() + KILL_GRACE;
        for pid in self.node.children() {
            loop {
                match waitpid(pid.nix(), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) if monotonic_now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Ok(WaitStatus::StillAlive) => {
                        let _ = kill(pid.nix(), Signal::SIGKILL);
                        let _ = waitpid(pid.nix(), None);
                        break;
                    }
                    Err(Errno::EINTR) => {}
                    _ => break,
                }
            }
        }
        if let Some(mask) = self.root_mask.take() {
            signals::restore(&mask);
        }
        let _ = BUS_PID.compare_exchange(self.owner, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Closes every descriptor of this process but those in `keep` (sorted, without
/// duplicates or negative numbers): `close_range` over the gaps, or one by one from
/// `/proc/self/fd` where `close_range` fails.
fn close_all_but(keep: &[RawFd]) -> io::Result<()> {
    let mut gaps = Vec::with_capacity(keep.len() + 1);
    let mut from: u32 = 0;
    for &fd in keep {
        let Ok(fd) = u32::try_from(fd) else {
            continue;
        };
        if fd > from {
            gaps.push((from, fd - 1));
        }
        from = from.max(fd.saturating_add(1));
    }
    gaps.push((from, u32::MAX));
    for (first, last) in gaps {
        let (first, last, flags): (nix::libc::c_uint, nix::libc::c_uint, nix::libc::c_uint) =
            (first, last, 0);
        // SAFETY: close_range only closes descriptor numbers. Their owners in this forked
        // process are the parent's values: the bus's were abandoned or are forgotten, the
        // application's must not be used or dropped in the child (see `Bus::fork`).
        let rc = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, first, last, flags) };
        if rc != 0 {
            // ENOSYS before Linux 5.9; EPERM under seccomp filters that predate it.
            for fd in crate::reactor::open_fds()? {
                if keep.binary_search(&fd).is_err() {
                    // The directory read above had a descriptor of its own, closed by
                    // now: its EBADF is ignored with the rest.
                    let _ = nix::unistd::close(fd);
                }
            }
            return Ok(());
        }
    }
    Ok(())
}

/// The node core's configuration from the bus's.
fn node_config(config: &BusConfig) -> NodeConfig {
    NodeConfig::default()
        .drain_timeout(config.drain_timeout)
        .kill_grace(KILL_GRACE)
}

/// Ends a forked child without unwinding into the caller's code.
fn exit_now(code: i32) -> ! {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: `_exit` ends the process at once. It is called only in a forked child, which
    // must never return into the code that called `fork` nor run the parent's atexit
    // handlers or destructors.
    unsafe { nix::libc::_exit(code) }
}
