//! [`Node`]: one process of the tree as a pure state machine — its router, its children,
//! its drain and its tally.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use forkbus_router::{
    Address, DownCause, Error, Event, LinkDown, LinkId, LinkRole, LostEnvelope, MessageId, NodeId,
    Refused, Router, RouterConfig, SendOptions, Timestamp,
};

use crate::children::{Child, ChildState, ChildTable};
use crate::control::Control;
use crate::drain::{Action as DrainAction, Drain, NodeState};
use crate::process::{ExitStatus, Pid};
use crate::tally::Tally;

/// How long a node's drain waits.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeConfig {
    /// How long a graceful shutdown waits for the subtree to get quiet, and then as long for
    /// the children to exit, before killing them.
    pub drain_timeout: Duration,
    /// How long to wait for killed children to be reaped before giving up on them.
    pub kill_grace: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(10),
            kill_grace: Duration::from_secs(5),
        }
    }
}

impl NodeConfig {
    /// Sets [`drain_timeout`](Self::drain_timeout).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Sets [`kill_grace`](Self::kill_grace).
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }
}

/// Who a link led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// This process's parent.
    Parent,
    /// A child of this process.
    Child(Pid),
    /// A link attached by hand (a peer, a test's raw socket).
    Attached,
}

/// What the node knows of one of its links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Who it leads to.
    pub relation: Relation,
    /// Whether it leads to a child this process forked (not one adopted after an `exec`).
    pub forked: bool,
}

/// A neighbour went away: who, why, and what it lost.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PeerShutdown {
    /// The link (closed now; the driver closes its descriptor).
    pub link: LinkId,
    /// The neighbour, when known.
    pub peer: Option<NodeId>,
    /// How it was related to this process.
    pub relation: Relation,
    /// Why the link went down.
    pub cause: DownCause,
    /// Every envelope queued for it or written and not acknowledged, whole, in link order.
    pub lost: Vec<LostEnvelope>,
}

/// Everything the node has to tell its driver, in order.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A router event: every kind but [`Event::LinkDown`] (a [`PeerShutdown`] here) and
    /// [`Event::Control`] (decoded here; a service's frame is [`NodeEvent::Control`]).
    Router(Event),
    /// A link went down. Exactly once per link.
    PeerShutdown(PeerShutdown),
    /// A child was reaped. Exactly once per child, after its link's peer shutdown.
    ChildExit {
        /// The child.
        pid: Pid,
        /// How it ended.
        status: ExitStatus,
    },
    /// A service's control frame (not the node core's), decoded: the service decides
    /// whether the sender may send it.
    Control {
        /// The link it came on.
        link: LinkId,
        /// Who sent it.
        from: LinkInfo,
        /// The frame.
        control: Control,
    },
    /// A control frame of the node core from a relation that may not send it, a frame of
    /// the wrong shape, or a code nobody knows: refused, and otherwise ignored.
    BadControl {
        /// The link it came on.
        link: LinkId,
        /// The neighbour.
        peer: Option<NodeId>,
        /// Its code.
        code: u32,
    },
    /// A graceful shutdown began here: sends are refused from now on.
    Draining,
    /// The drain ended: the subtree is gone and this node's queues are idle (or the
    /// deadline passed). The tally went to the parent as this node's last frame; the
    /// driver writes it out and ends its loop.
    Drained(Tally),
    /// The link to the parent went down: this process is on its own.
    ParentGone,
}

/// Something the driver must do to the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Send `SIGKILL` to a process (a child or a held process that outlived the drain).
    Kill(Pid),
}

/// Why [`Node::submit`] refused an envelope.
#[derive(Debug)]
pub enum Refusal {
    /// The node is draining: nothing new is sent.
    Draining {
        /// The payload, handed back.
        payload: Vec<u8>,
    },
    /// The router refused it.
    Router(Refused),
}

/// One process of the tree: its [`Router`], its children and their lives, the graceful
/// drain of its subtree and the tally of what it did.
///
/// Like [`Router`], it does no I/O and reads no clock:
///
/// - inputs: [`handle_fork`](Self::handle_fork), [`adopt`](Self::adopt),
///   [`attach`](Self::attach), [`handle_input`](Self::handle_input),
///   [`handle_link_closed`](Self::handle_link_closed), [`handle_reaped`](Self::handle_reaped),
///   [`handle_timeout`](Self::handle_timeout), [`begin_drain`](Self::begin_drain),
///   [`submit`](Self::submit);
/// - outputs: [`poll_transmit`](Self::poll_transmit) with
///   [`pending_output`](Self::pending_output) and [`advance_output`](Self::advance_output),
///   [`poll_event`](Self::poll_event), [`poll_action`](Self::poll_action),
///   [`poll_timeout`](Self::poll_timeout).
///
/// After each input, drain [`poll_event`](Self::poll_event) and
/// [`poll_action`](Self::poll_action), then write every link's pending output; call
/// [`handle_timeout`](Self::handle_timeout) when [`poll_timeout`](Self::poll_timeout) is due.
#[derive(Debug)]
pub struct Node {
    router: Router,
    config: NodeConfig,
    now: Timestamp,
    parent: Option<(NodeId, Option<LinkId>)>,
    links: HashMap<LinkId, LinkInfo>,
    /// Links closed before the driver could use them: their going down says nothing.
    stillborn: Vec<LinkId>,
    children: ChildTable,
    drain: Drain,
    /// Tallies the children reported.
    subtree: Tally,
    tallied: BTreeSet<Pid>,
    lost_reports: u64,
    events: VecDeque<NodeEvent>,
    actions: VecDeque<Action>,
}

impl Node {
    /// A node over `router`, with no parent (a root) until [`join_parent`](Self::join_parent).
    pub fn new(router: Router, config: NodeConfig) -> Self {
        Self {
            router,
            drain: Drain::new(config.drain_timeout, config.kill_grace),
            config,
            now: Timestamp::ZERO,
            parent: None,
            links: HashMap::new(),
            stillborn: Vec::new(),
            children: ChildTable::default(),
            subtree: Tally::default(),
            tallied: BTreeSet::new(),
            lost_reports: 0,
            events: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// The child's side of a fork, called on the child's copy of its parent's node: a
    /// fresh node for `me` whose router knows its parent's table
    /// ([`Router::forked_child`]), and whose one link leads to the parent. Nothing else of
    /// the parent's is carried over.
    pub fn forked_child(
        &self,
        now: Timestamp,
        me: NodeId,
        names: &[String],
        router: RouterConfig,
        config: NodeConfig,
    ) -> Result<(Self, LinkId), Error> {
        let (router, link) = self.router.forked_child(now, me, names, router)?;
        let mut node = Self::new(router, config);
        node.now = now;
        node.parent = Some((self.router.node(), Some(link)));
        node.links.insert(
            link,
            LinkInfo {
                relation: Relation::Parent,
                forked: false,
            },
        );
        Ok((node, link))
    }

    // ---------------------------------------------------------------------------------
    // Getters

    /// This node.
    pub fn node(&self) -> NodeId {
        self.router.node()
    }

    /// The routing core.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The routing core, for what the node does not wrap: output to write, names, groups.
    pub fn router_mut(&mut self) -> &mut Router {
        &mut self.router
    }

    /// The parent's node, for a child.
    pub fn parent(&self) -> Option<NodeId> {
        self.parent.map(|(n, _)| n)
    }

    /// The link to the parent while it is open.
    pub fn parent_link(&self) -> Option<LinkId> {
        self.parent.and_then(|(_, l)| l)
    }

    /// The children not yet reaped, by pid.
    pub fn children(&self) -> Vec<Pid> {
        self.children.pids()
    }

    /// A child not yet reaped.
    pub fn child(&self, pid: Pid) -> Option<Child> {
        self.children.get(pid).copied()
    }

    /// What the node knows of a link.
    pub fn link(&self, link: LinkId) -> Option<LinkInfo> {
        self.links.get(&link).copied()
    }

    /// The open link to a neighbour.
    pub fn link_to(&self, to: Relation) -> Option<LinkId> {
        match to {
            Relation::Parent => self.parent_link(),
            Relation::Child(pid) => self.children.get(pid).and_then(|c| c.state.link()),
            Relation::Attached => None,
        }
    }

    /// Whether a graceful shutdown is draining this node.
    pub fn is_draining(&self) -> bool {
        !self.drain.is_running()
    }

    /// This node's own counts so far plus the tallies its exited children reported.
    pub fn tally(&self) -> Tally {
        let mut t = Tally::of_node(&self.router.stats(), self.lost_reports, self.router.held());
        t += self.subtree;
        t
    }

    // ---------------------------------------------------------------------------------
    // Inputs

    /// This node's parent is `parent`, reached over a new link (a program that joined a
    /// tree after `exec`). Returns the link.
    pub fn join_parent(&mut self, now: Timestamp, parent: NodeId) -> LinkId {
        let link = self.open(now, Some(parent), Relation::Parent, false);
        self.parent = Some((parent, Some(link)));
        link
    }

    /// This process forked `pid`, whose node is `node` and which holds `names` from birth
    /// (checked with [`Router::check_fork_names`] first). Returns the link to it.
    pub fn handle_fork(
        &mut self,
        now: Timestamp,
        pid: Pid,
        node: NodeId,
        names: &[String],
    ) -> LinkId {
        self.now = now;
        let link = self.router.handle_fork(now, node, names);
        self.links.insert(
            link,
            LinkInfo {
                relation: Relation::Child(pid),
                forked: true,
            },
        );
        self.children.insert(pid, node, link);
        link
    }

    /// Adopts `pid`, a program that joins the tree as a child over a new link (its hello
    /// and the routing table go over the wire). Returns the link.
    pub fn adopt(&mut self, now: Timestamp, pid: Pid, node: NodeId) -> LinkId {
        let link = self.open(now, Some(node), Relation::Child(pid), false);
        self.children.insert(pid, node, link);
        link
    }

    /// Attaches a link to a neighbour outside the tree ([`LinkRole::Peer`]).
    pub fn attach(&mut self, now: Timestamp, peer: Option<NodeId>) -> LinkId {
        self.open(now, peer, Relation::Attached, false)
    }

    fn open(
        &mut self,
        now: Timestamp,
        peer: Option<NodeId>,
        relation: Relation,
        forked: bool,
    ) -> LinkId {
        self.now = now;
        let role = match relation {
            Relation::Parent => LinkRole::Parent,
            Relation::Child(_) => LinkRole::Child,
            Relation::Attached => LinkRole::Peer,
        };
        let link = self.router.handle_link_up(now, peer, role);
        self.links.insert(link, LinkInfo { relation, forked });
        link
    }

    /// The driver could not take a link into use (its descriptor did not register): it is
    /// closed, and forgotten without an event; a child on it is forgotten too (the driver
    /// kills and reaps it itself).
    pub fn abandon_link(&mut self, now: Timestamp, link: LinkId) {
        self.now = now;
        if let Some(pid) = self.children.by_link(link) {
            self.children.remove(pid);
        }
        if let Some((_, l)) = &mut self.parent {
            if *l == Some(link) {
                *l = None;
            }
        }
        self.links.remove(&link);
        self.stillborn.push(link);
        let _ = self.router.close_link(now, link);
    }

    /// Bytes arrived on a link ([`Router::handle_input`]).
    pub fn handle_input(
        &mut self,
        now: Timestamp,
        link: LinkId,
        bytes: &[u8],
    ) -> Result<(), Error> {
        self.now = now;
        let result = self.router.handle_input(now, link, bytes);
        self.tick_drain();
        result
    }

    /// A link ended (end of file, a socket error). Its peer shutdown follows.
    pub fn handle_link_closed(&mut self, now: Timestamp, link: LinkId) {
        self.now = now;
        if self.router.link_stats(link).is_ok() {
            let _ = self.router.handle_link_down(now, link);
        }
        self.tick_drain();
    }

    /// A process of this node's was reaped: a child (whose link the driver read to its
    /// end first: what it wrote before dying was in the socket), or one a service holds.
    pub fn handle_reaped(&mut self, now: Timestamp, pid: Pid, status: ExitStatus) {
        self.now = now;
        if self.children.release(pid) {
            self.tick_drain();
            return;
        }
        let Some(child) = self.children.get_mut(pid) else {
            return;
        };
        match child.state {
            ChildState::Forked { link }
            | ChildState::Running { link }
            | ChildState::Stopping { link } => {
                // Its exit follows its link's peer shutdown, which says how many processes
                // its subtree had.
                child.state = ChildState::Exited { status, link };
                if self.router.link_stats(link).is_ok() {
                    let _ = self.router.handle_link_down(now, link);
                }
            }
            ChildState::Unlinked { seen } => {
                self.children.remove(pid);
                self.child_exit(pid, status, seen);
            }
            ChildState::Exited { .. } => {}
        }
        self.tick_drain();
    }

    /// A service owns `pid`, a process without a link (a program started by `exec`): the
    /// drain waits for it, and kills it at the deadline. Its reaping goes to
    /// [`handle_reaped`](Self::handle_reaped) (or [`release_process`](Self::release_process)).
    pub fn hold_process(&mut self, pid: Pid) {
        self.children.hold(pid);
    }

    /// A held process ended or is no longer the node's concern.
    pub fn release_process(&mut self, pid: Pid) {
        self.children.release(pid);
        self.tick_drain();
    }

    /// Time passed: router timers and the drain's.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = now;
        if self.router.poll_timeout().is_some_and(|t| t <= now) {
            self.router.handle_timeout(now);
        }
        self.tick_drain();
    }

    /// Begins a graceful shutdown of this node's subtree (at the root: of the tree), on
    /// this node's own decision: sends are refused, every child drains, probe waves run
    /// until the subtree is quiet, then it exits bottom-up and [`NodeEvent::Drained`]
    /// carries the tally.
    pub fn begin_drain(&mut self, now: Timestamp) {
        self.now = now;
        self.start_drain(true);
    }

    /// This node leaves on its own (not drained): its counts go to the parent all the
    /// same, so the tree's tally counts it as reported. Returns the parent link, whose
    /// output the driver writes out before the process exits.
    pub fn leave(&mut self) -> Option<LinkId> {
        let link = self.parent_link()?;
        let (code, data) = Control::Tally(self.tally()).encode();
        self.router.send_control(link, code, data).ok()?;
        Some(link)
    }

    /// Sends an envelope ([`Router::submit`]); refused while draining.
    pub fn submit(
        &mut self,
        now: Timestamp,
        to: impl Into<Address>,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> Result<MessageId, Refusal> {
        if self.is_draining() {
            return Err(Refusal::Draining { payload });
        }
        self.router
            .submit(now, to, payload, options)
            .map_err(Refusal::Router)
    }

    /// Queues a control frame for a neighbour; `false` without an open link to it.
    pub fn send_control(&mut self, to: Relation, code: u32, data: Vec<u8>) -> bool {
        self.link_to(to)
            .is_some_and(|l| self.router.send_control(l, code, data).is_ok())
    }

    // ---------------------------------------------------------------------------------
    // Outputs

    /// The next link with output to write ([`Router::poll_transmit`]).
    pub fn poll_transmit(&mut self) -> Option<LinkId> {
        self.router.poll_transmit()
    }

    /// A link's output not yet written ([`Router::pending_output`]).
    pub fn pending_output(&self, link: LinkId) -> Result<&[u8], Error> {
        self.router.pending_output(link)
    }

    /// `n` bytes of a link's output were written ([`Router::advance_output`]). Written
    /// output can leave the node idle, which a drain waits for.
    pub fn advance_output(&mut self, link: LinkId, n: usize) -> Result<(), Error> {
        let result = self.router.advance_output(link, n);
        if self.router.pending_output(link).is_ok_and(<[u8]>::is_empty) {
            self.tick_drain();
        }
        result
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            let event = self.router.poll_event()?;
            self.on_router_event(event);
        }
    }

    /// The next action.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match (self.router.poll_timeout(), self.drain.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---------------------------------------------------------------------------------
    // Internals

    fn on_router_event(&mut self, event: Event) {
        match event {
            Event::LinkDown(down) => self.on_link_down(down),
            Event::Control { link, code, data } => self.on_control(link, code, data),
            Event::LinkUp { link, .. } => {
                if let Some(Relation::Child(pid)) = self.links.get(&link).map(|i| i.relation) {
                    if let Some(c) = self.children.get_mut(pid) {
                        if let ChildState::Forked { link } = c.state {
                            c.state = ChildState::Running { link };
                        }
                    }
                }
                self.events.push_back(NodeEvent::Router(event));
            }
            Event::Lost(_) => {
                self.lost_reports += 1;
                self.events.push_back(NodeEvent::Router(event));
            }
            other => self.events.push_back(NodeEvent::Router(other)),
        }
    }

    fn on_link_down(&mut self, down: LinkDown) {
        let LinkDown {
            link,
            peer,
            cause,
            lost,
            nodes_ever,
        } = down;
        if let Some(at) = self.stillborn.iter().position(|l| *l == link) {
            self.stillborn.swap_remove(at);
            return;
        }
        let relation = self
            .links
            .remove(&link)
            .map_or(Relation::Attached, |i| i.relation);
        self.events.push_back(NodeEvent::PeerShutdown(PeerShutdown {
            link,
            peer,
            relation,
            cause,
            lost,
        }));
        match relation {
            Relation::Parent => {
                if let Some((_, l)) = &mut self.parent {
                    *l = None;
                }
                self.events.push_back(NodeEvent::ParentGone);
            }
            Relation::Child(pid) => {
                if let Some(c) = self.children.get_mut(pid) {
                    match c.state {
                        ChildState::Forked { .. }
                        | ChildState::Running { .. }
                        | ChildState::Stopping { .. } => {
                            c.state = ChildState::Unlinked { seen: nodes_ever };
                        }
                        ChildState::Exited { status, .. } => {
                            self.children.remove(pid);
                            self.child_exit(pid, status, nodes_ever);
                        }
                        ChildState::Unlinked { .. } => {}
                    }
                }
                if self.is_draining() {
                    self.run_drain(|d, s| d.handle_child_gone(s, pid));
                }
            }
            Relation::Attached => {}
        }
    }

    /// A child is gone for good: its tally is in, or its subtree's counts are missing.
    fn child_exit(&mut self, pid: Pid, status: ExitStatus, seen: u64) {
        // A child that exits without its tally takes its subtree's counts with it: every
        // process the tree heard of behind it is unreported.
        if !self.tallied.remove(&pid) {
            self.subtree.unreported += seen.max(1);
        }
        self.events.push_back(NodeEvent::ChildExit { pid, status });
        self.tick_drain();
    }

    fn on_control(&mut self, link: LinkId, code: u32, data: Vec<u8>) {
        let Some(from) = self.links.get(&link).copied() else {
            return;
        };
        if !Control::is_node_code(code) {
            match Control::decode_service(code, &data) {
                Some(control) => self.events.push_back(NodeEvent::Control {
                    link,
                    from,
                    control,
                }),
                None => {
                    tracing::warn!(%link, code, "control frame not understood");
                    let peer = self.router.link_stats(link).ok().and_then(|s| s.peer);
                    self.events
                        .push_back(NodeEvent::BadControl { link, peer, code });
                }
            }
            return;
        }
        let control = match from.relation {
            Relation::Parent => Control::from_parent(code, &data),
            Relation::Child(_) => Control::from_child(code, &data),
            Relation::Attached => None,
        };
        match (control, from.relation) {
            (Some(Control::Drain), Relation::Parent) => self.start_drain(false),
            (Some(Control::Probe(wave)), Relation::Parent) => {
                self.start_drain(false);
                self.run_drain(|d, s| d.handle_probe(s, wave));
            }
            (Some(Control::Exit), Relation::Parent) => {
                self.start_drain(false);
                self.run_drain(|d, s| d.handle_exit(s));
            }
            (Some(Control::Quiet { wave, still }), Relation::Child(pid)) => {
                self.run_drain(|d, s| d.handle_quiet(s, pid, wave, still));
            }
            (Some(Control::Tally(t)), Relation::Child(pid)) => {
                self.subtree += t;
                self.tallied.insert(pid);
            }
            _ => {
                tracing::warn!(%link, code, relation = ?from.relation, "control frame refused");
                let peer = self.router.link_stats(link).ok().and_then(|s| s.peer);
                self.events
                    .push_back(NodeEvent::BadControl { link, peer, code });
            }
        }
    }

    fn start_drain(&mut self, initiator: bool) {
        if self.is_draining() {
            return;
        }
        tracing::info!(children = self.children.len(), initiator, "draining");
        self.events.push_back(NodeEvent::Draining);
        self.run_drain(|d, s| d.begin(s, initiator));
    }

    fn tick_drain(&mut self) {
        if self.is_draining() {
            self.run_drain(|d, s| d.tick(s));
        }
    }

    /// Runs one input of the drain with this node's state, then carries out its actions.
    fn run_drain(&mut self, input: impl FnOnce(&mut Drain, NodeState<'_>)) {
        let linked = self.children.linked();
        let state = NodeState {
            now: self.now,
            children: &linked,
            no_children: self.children.is_empty(),
            idle: self.router.is_idle(),
            rx: self.router.stats().rx_frames,
        };
        input(&mut self.drain, state);
        let actions: Vec<DrainAction> = self.drain.poll_actions().collect();
        for a in actions {
            match a {
                DrainAction::ToChild(pid, c) => {
                    if c == Control::Exit {
                        if let Some(child) = self.children.get_mut(pid) {
                            if let Some(link) = child.state.link() {
                                child.state = ChildState::Stopping { link };
                            }
                        }
                    }
                    let (code, data) = c.encode();
                    self.send_control(Relation::Child(pid), code, data);
                }
                DrainAction::ToParent(c) => {
                    let (code, data) = c.encode();
                    self.send_control(Relation::Parent, code, data);
                }
                DrainAction::KillChildren => {
                    tracing::warn!(
                        children = self.children.len(),
                        "exit deadline passed: killing the children left"
                    );
                    let pids: Vec<Pid> = self
                        .children
                        .pids()
                        .into_iter()
                        .chain(self.children.held())
                        .collect();
                    self.actions.extend(pids.into_iter().map(Action::Kill));
                }
                DrainAction::Finish => self.finish_drain(),
            }
        }
    }

    fn finish_drain(&mut self) {
        let tally = self.tally();
        self.subtree = Tally::default();
        self.tallied.clear();
        tracing::info!(?tally, "drained");
        if let Some(link) = self.parent_link() {
            let (code, data) = Control::Tally(tally).encode();
            let _ = self.router.send_control(link, code, data);
        }
        self.events.push_back(NodeEvent::Drained(tally));
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }
}
