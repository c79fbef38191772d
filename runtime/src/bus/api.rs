//! The application-facing methods of the bus that are neither the loop nor fork: the handle
//! for other threads, sends, names and groups, listeners, timers, the application's
//! descriptors, links attached or adopted, and what services and children ask of their bus
//! (service state, held processes, link control frames, deferred work, the exit code).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use forkbus_node::{Refusal, Relation};
use forkbus_router::{Address, LinkId, MessageId, NodeId, Refused, SendOptions, Timestamp};
use serde::Serialize;

use super::{Bus, Deferred, FdCallback, Internal, Source, TimerAction};
use crate::child::Pid;
use crate::error::{NameError, SendError};
use crate::handle::BusHandle;
use crate::listener::Listener;
use crate::listener_set::ListenerId;
use crate::message::encode_capped;
use crate::reactor::{FdId, FdReady, Interest, LinkSource, UserSource};
use crate::timer::TimerId;

impl Bus {
    // -----------------------------------------------------------------------------------
    // Handles

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

    pub(super) fn submit(
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
    ///
    /// [`Router::hold_name`]: forkbus_router::Router::hold_name
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
    ///
    /// [`monotonic_now`]: crate::monotonic_now
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
    ///
    /// [`Event::Timer`]: crate::Event::Timer
    pub fn timer(&mut self, after: Duration) -> TimerId {
        let at = self.now() + after;
        self.timer_at(at)
    }

    /// [`timer`](Self::timer) at `at` (on [`monotonic_now`]'s clock).
    ///
    /// [`monotonic_now`]: crate::monotonic_now
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
    ///
    /// [`ForkOptions::keep_fd`]: crate::ForkOptions::keep_fd
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

    // -----------------------------------------------------------------------------------
    // Links

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
    pub(super) fn register_link(
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

    // -----------------------------------------------------------------------------------
    // For services and children

    /// Sets the exit code this process uses when its loop ends (a child; the root does not
    /// exit). Without one: 0, or [`EXIT_PARENT_GONE`] when the parent went away.
    ///
    /// [`EXIT_PARENT_GONE`]: crate::EXIT_PARENT_GONE
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
}
