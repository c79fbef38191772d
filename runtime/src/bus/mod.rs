//! The bus: one per process, the driver of its node core (`forkbus_node::Node`): the
//! reactor, the signalfd and `waitpid`. This file holds [`Bus`] and its private types, its
//! creation, its getters, the loop (timers, handle requests, then the node's actions, events
//! and writes until quiet), readiness (links, signals, the application's descriptors) and
//! the reaping of children; its configuration is in `config`, `fork` on both sides in
//! `fork`, what the node says turned into calls in `dispatch`, and the application-facing
//! methods in `api`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use forkbus_node::{Node, Relation, Tally};
use forkbus_router::{LinkId, MessageId, NodeId, Router, Timestamp};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{recv, send, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use crate::child::{exit_of, Pid, PidExt};
use crate::clock::{monotonic_now, nonce};
use crate::error::{BusError, SendError};
use crate::event::Event;
use crate::handle::{Outgoing, Request};
use crate::listener::{Listener, Services};
use crate::listener_set::{panic_message, ListenerSet};
use crate::reactor::{FdId, FdReady, Interest, Ready};
use crate::signals;
use crate::ticket::Ticket;
use crate::timer::Timers;

mod api;
mod config;
mod dispatch;
mod fork;

use self::config::node_config;
pub use self::config::{
    BusConfig, Descriptors, ForkOptions, Stop, EXIT_OS_ERROR, EXIT_PANIC, EXIT_PARENT_GONE,
};

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

/// The pid of the process that holds a bus (one per process).
static BUS_PID: AtomicU32 = AtomicU32::new(0);

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

    fn peer_of(&self, link: LinkId) -> Option<NodeId> {
        self.node
            .router()
            .link_stats(link)
            .ok()
            .and_then(|s| s.peer)
    }

    /// Whether the loop is running (a blocking wait from inside it would nest).
    pub(crate) fn in_loop(&self) -> bool {
        self.running
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
}
