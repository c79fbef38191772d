//! The router: one per process, fed bytes and time, producing bytes and events.

mod config;
mod custody;
mod link;
mod receipts;

use std::collections::VecDeque;
use std::rc::Rc;

use slab::Slab;

pub use config::{LinkStats, NoRoutePolicy, Refused, RouterConfig, SendOptions};

use self::custody::Custody;
use self::link::{InFlight, Link, Parked, Queued};
use self::receipts::{Pending, Receipts};
use crate::dedup::SeenTable;
use crate::error::{Error, ProtocolError};
use crate::event::{
    DownCause, Event, Fate, LinkDown, LossReason, LossReport, LostEnvelope, UnknownReason,
};
use crate::id::{Address, Destination, LinkId, LinkRole, MessageId, NodeId, Timestamp};
use crate::stats::RouterStats;
use crate::table::{Applied, NameRefusal, RouteTable, TableLimits};
use crate::wire::{
    decode_frame, encode_envelope, encode_frame, envelope_frame_len, DecodeLimits, Deframer,
    Envelope, Flags, Frame, Hello, Hop, NodeDelta, Notice, NoticeKind, RouteUpdate, WIRE_VERSION,
};

/// Bytes one hop can add to a traced envelope: a five-item array of a node id, a link index
/// and a time, each at its widest.
const MAX_HOP_LEN: usize = 1 + 3 * 5 + 9 + 9;

/// Bytes of a notice frame at most.
const NOTICE_LEN: usize = 64;

/// Where a plan sends an envelope.
#[derive(Debug)]
enum Targets {
    None,
    One(LinkId),
    Many(Vec<LinkId>),
}

impl Targets {
    fn as_slice(&self) -> &[LinkId] {
        match self {
            Self::None => &[],
            Self::One(l) => std::slice::from_ref(l),
            Self::Many(v) => v,
        }
    }
}

/// What to do with an envelope here.
#[derive(Debug)]
struct Plan {
    /// Deliver to this node's application (or take in custody, for a held name).
    deliver: bool,
    targets: Targets,
    /// Unicast with no route under [`NoRoutePolicy::Report`].
    unroutable: bool,
    /// Flooded for want of a route.
    flooded: bool,
}

impl Plan {
    fn only(deliver: bool, targets: Targets) -> Self {
        Self {
            deliver,
            targets,
            unroutable: false,
            flooded: false,
        }
    }

    fn unroutable() -> Self {
        Self {
            deliver: false,
            targets: Targets::None,
            unroutable: true,
            flooded: false,
        }
    }
}

/// The routing core of one node: pure, deterministic, driven by its caller.
///
/// # Driving it
///
/// Inputs (`handle_*`, and the mutators [`submit`](Self::submit),
/// [`register_name`](Self::register_name), ...) take the current time where they need it.
/// After any input, drain the outputs in this order:
///
/// 1. [`poll_transmit`](Self::poll_transmit) for every link with new bytes, then write
///    [`pending_output`](Self::pending_output) and report it with
///    [`advance_output`](Self::advance_output) (a partial write is fine);
/// 2. [`poll_event`](Self::poll_event) until `None`;
/// 3. [`poll_timeout`](Self::poll_timeout): call [`handle_timeout`](Self::handle_timeout)
///    no later than that.
///
/// Nothing a peer sends can make it panic or grow without bound: a frame over the limit,
/// a malformed frame or a protocol violation (an origin or an announcement that
/// contradicts where nodes live) closes that one link, reported as [`Event::LinkDown`]
/// with its lost list.
#[derive(Debug)]
pub struct Router {
    me: NodeId,
    config: RouterConfig,
    limits: DecodeLimits,
    links: Slab<Link>,
    generations: Vec<u32>,
    table: RouteTable,
    seen: SeenTable,
    next_seq: u64,
    receipts: Receipts,
    custody: Custody,
    events: VecDeque<Event>,
    dirty: VecDeque<LinkId>,
    overrun: Vec<LinkId>,
    stats: RouterStats,
    /// The latest `now` an input brought (for stall bookkeeping in calls that take none).
    clock: Timestamp,
}

impl Router {
    /// A router for node `me`.
    pub fn new(me: NodeId, config: RouterConfig) -> Result<Self, Error> {
        config.validate()?;
        let limits = TableLimits {
            max_nodes: config.max_nodes,
            max_names_per_node: config.max_names_per_node,
            max_groups_per_node: config.max_names_per_node,
            max_names: config.max_names,
            max_groups: config.max_groups,
        };
        Ok(Self {
            me,
            limits: DecodeLimits::from(&config),
            table: RouteTable::new(me, limits),
            seen: SeenTable::new(me, config.max_origins),
            config,
            links: Slab::new(),
            generations: Vec::new(),
            next_seq: 0,
            receipts: Receipts::new(me),
            custody: Custody::new(me),
            events: VecDeque::new(),
            dirty: VecDeque::new(),
            overrun: Vec::new(),
            stats: RouterStats::default(),
            clock: Timestamp::ZERO,
        })
    }

    // -----------------------------------------------------------------------------------
    // Getters

    /// This node.
    pub fn node(&self) -> NodeId {
        self.me
    }

    /// The configuration.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Counters since start.
    pub fn stats(&self) -> RouterStats {
        self.stats
    }

    /// Every remote node this router knows and its next hop, sorted by node.
    pub fn routes(&self) -> Vec<(NodeId, LinkId)> {
        self.table.routes()
    }

    /// The node an address resolves to here (`None` for groups, broadcast, unknown nodes).
    pub fn resolve(&self, to: &Address) -> Option<NodeId> {
        match to {
            Address::Pid(p) => self.table.resolve_pid(self.me.host, *p),
            Address::To(Destination::Node(n)) => self.table.contains(n).then_some(*n),
            Address::To(Destination::Name(s)) => self.table.resolve_name(s),
            Address::To(Destination::NameAt { node, .. }) => {
                self.table.contains(node).then_some(*node)
            }
            Address::To(_) => None,
        }
    }

    /// The open links, in index order.
    pub fn links(&self) -> Vec<LinkId> {
        self.links
            .iter()
            .map(|(i, l)| Self::link_id(i, l.generation))
            .collect()
    }

    /// What a link holds.
    pub fn link_stats(&self, link: LinkId) -> Result<LinkStats, Error> {
        let l = self.link(link)?;
        Ok(LinkStats {
            peer: l.peer,
            role: l.role,
            in_flight: l.envelopes(),
            in_flight_bytes: l.inflight_bytes,
            pending_output: l.pending(),
            frames_sent: l.next_seq,
            frames_received: l.rx_next,
            nodes_behind: self.table.n_behind(link),
        })
    }

    /// Envelopes awaiting a receipt.
    pub fn pending_receipts(&self) -> usize {
        self.receipts.len()
    }

    /// Envelopes held in custody for names this node holds.
    pub fn held(&self) -> usize {
        self.custody.len()
    }

    /// The names this node holds in custody.
    pub fn held_names(&self) -> Vec<String> {
        self.custody.names()
    }

    /// Origins whose seen windows are kept.
    pub fn seen_origins(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is queued, unacknowledged, unwritten, held in custody or awaiting a
    /// receipt.
    pub fn is_idle(&self) -> bool {
        self.receipts.is_empty()
            && self.custody.len() == 0
            && self
                .links
                .iter()
                .all(|(_, l)| l.inflight.is_empty() && l.pending() == 0 && l.parked.is_empty())
    }

    /// Whether a forked child may be given these names ([`handle_fork`](Self::handle_fork)):
    /// each must be free, this node's own (held in custody, say), or held by a child of
    /// this node (its replacement takes it over). Names are unique: any other holder
    /// refuses with [`Error::NameTaken`].
    pub fn check_fork_names(&self, names: &[String]) -> Result<(), Error> {
        for name in names {
            self.check_name(name)?;
            let Err(taken) = self.table.name_free_for_me(name) else {
                continue;
            };
            let by_child = self.table.route(&taken.holder).is_some_and(|l| {
                self.links
                    .get(l.index())
                    .is_some_and(|x| x.role == LinkRole::Child && x.peer == Some(taken.holder))
            });
            if !by_child {
                return Err(Error::NameTaken {
                    name: name.clone(),
                    holder: taken.holder,
                });
            }
        }
        if names.len() > self.config.max_names_per_node {
            return Err(Error::TooManyNames {
                max: self.config.max_names_per_node,
            });
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Inputs: links

    /// A link came up. `peer` is the node at its other end when known already (a parent
    /// knows a child it started the moment it starts: its route is usable at once);
    /// `role` is what the link is to this node. Queues this node's hello and what it may
    /// tell the peer of the tree (everything over a tree link; only itself over a peer
    /// link).
    pub fn handle_link_up(
        &mut self,
        now: Timestamp,
        peer: Option<NodeId>,
        role: LinkRole,
    ) -> LinkId {
        self.clock = now;
        let link = self.open_link(peer, role);
        self.greet(link);
        if let Some(p) = peer {
            if let Err(e) = self.neighbour(link, p) {
                self.violation(link, e);
                return link;
            }
        }
        self.flush_overruns();
        link
    }

    /// The parent's side of a fork: a link to `child`, whose router was made from this
    /// router's copy by [`forked_child`](Self::forked_child) and therefore already knows
    /// this node and its whole routing table, so neither is sent. The child's route — and
    /// its `names` — are usable at once and announced to the rest of the tree. Check the
    /// names with [`check_fork_names`](Self::check_fork_names) before forking: a name this
    /// node held moves to the child (with what it held in custody for it, handed over
    /// ahead of anything else), a name a child of this node held moves from it.
    pub fn handle_fork(&mut self, now: Timestamp, child: NodeId, names: &[String]) -> LinkId {
        self.clock = now;
        let link = self.open_link(Some(child), LinkRole::Child);
        if let Err(e) = self.table.add_neighbour(child, link) {
            self.violation(link, e);
            return link;
        }
        let given = self.table.give_names(child, names);
        if let Some(info) = self.table.info_of(&child) {
            let update = RouteUpdate {
                upsert: vec![info],
                ..RouteUpdate::default()
            };
            self.flood_routes(&update, Some(link));
        }
        if !given.is_empty() {
            self.announce_me(NodeDelta {
                remove_names: given.clone(),
                ..NodeDelta::default()
            });
        }
        for name in &given {
            self.custody.set_handed(name, child);
            for env in self.custody.release(name).into_iter().flatten() {
                self.hand_over(link, child, env);
            }
        }
        self.flush_overruns();
        link
    }

    /// The child's side of a fork, called on the child's copy of its parent's router: a
    /// fresh router for `me`, holding `names` from the start (given by the parent: they may
    /// have been the parent's or a sibling's), with one link, to the parent, that knows
    /// every node, name and group the parent knew when it forked (so the child's first
    /// sends have routes). Pair it with [`handle_fork`](Self::handle_fork) in the parent,
    /// with the same names. Nothing of the parent's queues, links, receipts or seen
    /// windows is carried over.
    pub fn forked_child(
        &self,
        now: Timestamp,
        me: NodeId,
        names: &[String],
        config: RouterConfig,
    ) -> Result<(Self, LinkId), Error> {
        let mut child = Self::new(me, config)?;
        child.clock = now;
        let parent = self.me;
        let link = child.open_link(Some(parent), LinkRole::Parent);
        if let Some(l) = child.links.get_mut(link.index()) {
            // The parent's hello is implied by the fork itself.
            l.hello = true;
        }
        let known = self.table.dump(None);
        for name in names {
            child.check_name(name)?;
            match child.table.add_my_name(name, true) {
                Ok(_) => {}
                Err(NameRefusal::TooMany(max)) => return Err(Error::TooManyNames { max }),
                Err(NameRefusal::Taken(_)) => {}
            }
        }
        for info in &known.upsert {
            if info.node == me {
                continue;
            }
            if let Err(e) = child.table.upsert(info, link) {
                return Err(Error::Protocol(e));
            }
        }
        child.stats.names_refused += child.table.take_refused();
        // The hello (the parent checks it names this child), then only the child's own
        // names: everything else the parent knows.
        child.push_frame(
            link,
            &Frame::Hello(Hello {
                version: WIRE_VERSION,
                node: me,
            }),
        );
        child.push_frame(
            link,
            &Frame::Routes(RouteUpdate {
                upsert: vec![child.table.me_info()],
                ..RouteUpdate::default()
            }),
        );
        Ok((child, link))
    }

    fn open_link(&mut self, peer: Option<NodeId>, role: LinkRole) -> LinkId {
        let entry = self.links.vacant_entry();
        let index = entry.key();
        if self.generations.len() <= index {
            self.generations.resize(index + 1, 0);
        }
        let generation = self.generations[index];
        entry.insert(Link::new(generation, role, peer, self.config.max_frame));
        let link = Self::link_id(index, generation);
        self.table.add_link(link, role);
        tracing::debug!(link = %link, me = %self.me, peer = ?peer, ?role, "link up");
        link
    }

    /// Queues this node's hello and what it tells a new neighbour of the tree.
    fn greet(&mut self, link: LinkId) {
        self.push_frame(
            link,
            &Frame::Hello(Hello {
                version: WIRE_VERSION,
                node: self.me,
            }),
        );
        let dump = if self.role_of(link).is_tree() {
            self.table.dump(Some(link))
        } else {
            RouteUpdate {
                upsert: vec![self.table.me_info()],
                ..RouteUpdate::default()
            }
        };
        let mut buf = Vec::new();
        encode_routes(&mut buf, dump, self.route_budget());
        self.push_bytes(link, &buf);
    }

    /// Bytes arrived on a link, split anywhere. On a protocol error the link is closed here
    /// (its [`Event::LinkDown`] is queued) and the error returned: close the socket.
    pub fn handle_input(
        &mut self,
        now: Timestamp,
        link: LinkId,
        bytes: &[u8],
    ) -> Result<(), Error> {
        self.clock = now;
        let idx = self.check(link)?;
        self.stats.bytes_in += bytes.len() as u64;
        let mut deframer = std::mem::replace(&mut self.links[idx].deframer, Deframer::new(0));
        let frames_before = self.stats.frames_in;
        let result = deframer.feed(bytes, |kind, body| self.on_frame(now, link, kind, body));
        match result {
            Ok(()) => {
                let completed = self.stats.frames_in != frames_before;
                if let Some(l) = self.links.get_mut(idx) {
                    if l.generation != link.generation {
                        return Ok(());
                    }
                    l.rx_partial_since = match (deframer.buffered(), l.rx_partial_since) {
                        (0, _) => None,
                        (_, Some(since)) if !completed => Some(since),
                        _ => Some(now),
                    };
                    l.deframer = deframer;
                    let unacked = l.ack_limit().saturating_sub(l.rx_acked);
                    if unacked >= self.config.ack_every {
                        l.write_ack();
                        self.mark_dirty(link);
                    } else if unacked > 0 && l.ack_deadline.is_none() {
                        l.ack_deadline = Some(now + self.config.ack_delay);
                    }
                }
                self.flush_overruns();
                Ok(())
            }
            Err(e) => {
                self.violation(link, e.clone());
                self.flush_overruns();
                Err(Error::Protocol(e))
            }
        }
    }

    /// The caller saw the link end (end of file, a socket error, the peer reaped).
    pub fn handle_link_down(&mut self, now: Timestamp, link: LinkId) -> Result<(), Error> {
        self.clock = now;
        self.check(link)?;
        self.teardown(link, DownCause::Closed);
        self.flush_overruns();
        Ok(())
    }

    /// Closes a link from this side; its queued envelopes are reported lost.
    pub fn close_link(&mut self, now: Timestamp, link: LinkId) -> Result<(), Error> {
        self.clock = now;
        self.check(link)?;
        self.teardown(link, DownCause::Local);
        self.flush_overruns();
        Ok(())
    }

    /// Time passed: sends due acknowledgements, closes stalled links and reports receipts
    /// that timed out.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.clock = now;
        let mut due = Vec::new();
        let mut stalled = Vec::new();
        for (i, l) in self.links.iter_mut() {
            let id = Self::link_id(i, l.generation);
            if std::mem::take(&mut l.tx_progress) && l.tx_stalled_since.is_some() {
                // The peer took output since the last check: the stall clock starts again.
                l.tx_stalled_since = Some(now);
            }
            if l.ack_deadline.is_some_and(|d| d <= now) {
                l.write_ack();
                due.push(id);
            }
            if l.stall_deadline(&self.config).is_some_and(|d| d <= now) {
                stalled.push(id);
            }
        }
        for link in due {
            self.mark_dirty(link);
        }
        for link in stalled {
            tracing::warn!(link = %link, "closing link: stalled");
            self.stats.stalls += 1;
            self.teardown(link, DownCause::Stalled);
        }
        while let Some(seq) = self.receipts.pop_due(now) {
            let id = MessageId {
                origin: self.me,
                seq,
            };
            self.origin_outcome(id, Fate::Unknown(UnknownReason::Timeout), self.me, None);
        }
        self.flush_overruns();
    }

    // -----------------------------------------------------------------------------------
    // Inputs: the application

    /// Sends `payload` to `to`. Returns the envelope's id; its fate comes as events:
    /// [`Event::Sent`] once written on every link, and for a receipt exactly one of
    /// [`Event::Delivered`] and [`Event::Lost`]. An envelope with no route is accepted and
    /// reported lost ([`LossReason::NoRoute`]). A name is bound here to the node that holds
    /// it ([`Destination::NameAt`]).
    ///
    /// Refused, with the payload handed back and nothing queued anywhere, when a link it
    /// must go out on is full ([`Error::QueueFull`]: wait for [`Event::LinkReady`]), when it
    /// would exceed the frame limit, or when its options do not fit its destination.
    pub fn submit(
        &mut self,
        now: Timestamp,
        to: impl Into<Address>,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> Result<MessageId, Refused> {
        self.clock = now;
        let to = to.into();
        let r = self.try_submit(now, &to, payload, options);
        if r.is_ok() {
            self.flush_overruns();
        }
        r
    }

    fn try_submit(
        &mut self,
        now: Timestamp,
        to: &Address,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> Result<MessageId, Refused> {
        let refuse = |error, payload| Err(Refused { error, payload });
        if options.receipt && !to.is_unicast() {
            return refuse(Error::ReceiptNeedsUnicast, payload);
        }
        if let Address::To(d) = to {
            if let Some(s) = match d {
                Destination::Name(s) | Destination::Group(s) => Some(s),
                Destination::NameAt { name, .. } => Some(name),
                _ => None,
            } {
                if let Err(e) = self.check_name(s) {
                    return refuse(e, payload);
                }
            }
        }
        if options.receipt
            && (self.receipts.len() >= self.config.max_pending_receipts
                || self.receipts.bytes() + payload.len() > self.config.max_pending_receipt_bytes)
        {
            let max = self.config.max_pending_receipts;
            return refuse(Error::TooManyPendingReceipts { max }, payload);
        }
        let (destination, resolved) = self.bind(to);
        let mut flags = Flags::empty();
        if options.receipt {
            flags = flags.with(Flags::RECEIPT);
        }
        if options.trace {
            flags = flags.with(Flags::TRACE);
        }
        let id = MessageId {
            origin: self.me,
            seq: self.next_seq,
        };
        let mut env = Envelope {
            id,
            destination,
            hops: 0,
            hop_limit: options.hop_limit.unwrap_or(self.config.hop_limit),
            flags,
            trace: if options.trace {
                vec![Hop {
                    node: self.me,
                    link: None,
                    at: now,
                }]
            } else {
                Vec::new()
            },
            payload,
        };
        let len = envelope_frame_len(u64::MAX, &env);
        // A traced envelope grows by a hop at every node: reserve room for all of them, so
        // that no honest node ever has to refuse it on the way.
        let growth = if options.trace {
            (usize::from(env.hop_limit) + 1) * MAX_HOP_LEN + 8
        } else {
            0
        };
        if len + growth - 4 > self.config.max_frame as usize {
            let max = self.config.max_frame as usize + 4;
            return refuse(
                Error::PayloadTooLarge {
                    len: len + growth,
                    max,
                },
                env.payload,
            );
        }
        let plan = if resolved {
            self.plan(&env.destination, None)
        } else {
            Plan::unroutable()
        };
        for &link in plan.targets.as_slice() {
            let Some(l) = self.links.get_mut(link.index()) else {
                continue;
            };
            if !l.has_room(len, &self.config) {
                l.refused = true;
                return refuse(Error::QueueFull { link }, env.payload);
            }
        }

        // Accepted: from here on the envelope is accounted for.
        self.next_seq += 1;
        self.stats.sent += 1;
        tracing::trace!(origin = %id.origin, seq = id.seq, dst = %env.destination, "submit");
        let targets = plan.targets.as_slice();
        let lost_here = if plan.unroutable
            || (targets.is_empty() && !plan.deliver && env.destination.is_unicast())
        {
            Some(LossReason::NoRoute)
        } else if !targets.is_empty() && env.hop_limit == 0 {
            Some(LossReason::HopLimit)
        } else {
            None
        };
        if let Some(reason) = lost_here {
            // The first and only outcome of this envelope: nothing is pending for it.
            self.stats.lost.count(Fate::Lost(reason));
            self.events.push_back(Event::Lost(LossReport {
                id,
                fate: Fate::Lost(reason),
                at: self.me,
                destination: Some(env.destination),
                payload: Some(env.payload),
            }));
            return Ok(id);
        }
        self.count_copies(plan.deliver, targets.len());
        if options.receipt {
            let dest = match &env.destination {
                Destination::Node(n) | Destination::NameAt { node: n, .. } => Some(*n),
                _ => None,
            };
            let deadline = self.config.receipt_timeout.map(|t| now + t);
            self.receipts.insert(
                id.seq,
                Pending {
                    dest,
                    deadline,
                    destination: env.destination.clone(),
                    payload: env.payload.clone(),
                },
            );
        }
        if plan.deliver {
            // Sent to itself: no link, no receipt to wait for.
            if targets.is_empty() {
                self.arrive_here(env, None);
                self.events.push_back(Event::Sent(id));
                return Ok(id);
            }
            self.arrive_here(env.clone(), None);
        }
        if targets.is_empty() {
            self.events.push_back(Event::Sent(id));
            return Ok(id);
        }
        // Hops 0 and 1 encode alike: the length computed above holds.
        env.hops = 1;
        let queued = Queued::with_len(env, len, true, targets.len());
        for &link in plan.targets.as_slice() {
            // Room was checked above and nothing ran in between.
            self.push_queued(link, &queued);
        }
        Ok(id)
    }

    /// The wire destination of an address: names bound to their holder here, pids to the
    /// live node. `false`: nothing to send it to (a pid or name unknown here).
    fn bind(&self, to: &Address) -> (Destination, bool) {
        match to {
            Address::Pid(p) => match self.table.resolve_pid(self.me.host, *p) {
                Some(n) => (Destination::Node(n), true),
                None => (Destination::Node(NodeId::new(self.me.host, *p, 0)), false),
            },
            Address::To(Destination::Name(s)) => {
                match (self.custody.holds(s), self.table.resolve_name(s)) {
                    (true, _) => (
                        Destination::NameAt {
                            name: s.clone(),
                            node: self.me,
                        },
                        true,
                    ),
                    (false, Some(node)) => (
                        Destination::NameAt {
                            name: s.clone(),
                            node,
                        },
                        true,
                    ),
                    (false, None) => {
                        let flood = matches!(self.config.no_route, NoRoutePolicy::Flood { .. });
                        (Destination::Name(s.clone()), flood)
                    }
                }
            }
            Address::To(d) => (d.clone(), true),
        }
    }

    /// Registers a name for this node, announced to the whole tree. Names are unique: one
    /// another node holds is refused ([`Error::NameTaken`]), and so is one past the bounds
    /// ([`Error::TooManyNames`]) or while a link's control output is backed up
    /// ([`Error::QueueFull`]).
    pub fn register_name(&mut self, name: &str) -> Result<(), Error> {
        self.add_own(name, true)
    }

    /// Takes a name (`is_name`) or joins a group, and announces the change.
    fn add_own(&mut self, name: &str, is_name: bool) -> Result<(), Error> {
        self.check_name(name)?;
        let has = if is_name {
            self.table.has_name(name)
        } else {
            self.table.is_member(name)
        };
        if has {
            return Ok(());
        }
        self.check_announce_room()?;
        self.check_announcement_fits(name)?;
        let added = if is_name {
            self.table.add_my_name(name, false)
        } else {
            self.table.join_group(name)
        };
        added.map_err(|r| Self::name_error(name, r))?;
        let mut delta = NodeDelta::default();
        if is_name {
            delta.add_names.push(name.to_owned());
        } else {
            delta.join_groups.push(name.to_owned());
        }
        self.announce_me(delta);
        self.flush_overruns();
        Ok(())
    }

    /// Gives up a name of this node. Envelopes it held in custody for the name are
    /// reported lost to their origins ([`LossReason::Abandoned`]).
    pub fn unregister_name(&mut self, name: &str) -> Result<(), Error> {
        if let Some(held) = self.custody.release(name) {
            for env in held {
                self.lose(&env, Fate::Lost(LossReason::Abandoned));
            }
        }
        if self.table.remove_my_name(name) {
            self.announce_me(NodeDelta {
                remove_names: vec![name.to_owned()],
                ..NodeDelta::default()
            });
        }
        self.flush_overruns();
        Ok(())
    }

    /// Holds `name` in custody for a worker that is down: this node takes the name (it must
    /// be free or this node's), and envelopes to it are taken — at most `capacity`, beyond
    /// which they are lost (`queue full`) — with their receipts left open. When a child is
    /// forked with the name ([`handle_fork`](Self::handle_fork)) they are handed to it
    /// first; [`unregister_name`](Self::unregister_name) reports them lost instead.
    pub fn hold_name(&mut self, name: &str, capacity: usize) -> Result<(), Error> {
        self.register_name(name)?;
        self.custody.hold(name, capacity);
        Ok(())
    }

    /// Joins a group (announced to the whole tree); refused past the bounds
    /// ([`Error::TooManyNames`]) or while a link's control output is backed up.
    pub fn join_group(&mut self, group: &str) -> Result<(), Error> {
        self.add_own(group, false)
    }

    /// Leaves a group.
    pub fn leave_group(&mut self, group: &str) -> Result<(), Error> {
        if self.table.leave_group(group) {
            self.announce_me(NodeDelta {
                leave_groups: vec![group.to_owned()],
                ..NodeDelta::default()
            });
        }
        self.flush_overruns();
        Ok(())
    }

    fn name_error(name: &str, r: NameRefusal) -> Error {
        match r {
            NameRefusal::Taken(t) => Error::NameTaken {
                name: name.to_owned(),
                holder: t.holder,
            },
            NameRefusal::TooMany(max) => Error::TooManyNames { max },
        }
    }

    /// Bytes a route frame's body may take: half a frame, so one node's announcement (its
    /// names and groups bounded to fit) always fits one.
    fn route_budget(&self) -> usize {
        self.config.max_frame as usize / 2
    }

    /// Whether this node's announcement still fits a route frame with `name` added to its
    /// names or groups.
    fn check_announcement_fits(&self, name: &str) -> Result<(), Error> {
        let mut info = self.table.me_info();
        info.names.push(name.to_owned());
        let mut buf = Vec::new();
        let update = RouteUpdate {
            upsert: vec![info],
            ..RouteUpdate::default()
        };
        if encode_frame(&mut buf, &Frame::Routes(update)) > self.route_budget() {
            return Err(Error::TooManyNames {
                max: self.table.me_info().names.len() + self.table.me_info().groups.len(),
            });
        }
        Ok(())
    }

    fn check_announce_room(&self) -> Result<(), Error> {
        let len = self.config.max_name + 64;
        for (i, l) in self.links.iter() {
            if !l.has_control_room(len, &self.config) {
                let link = Self::link_id(i, l.generation);
                return Err(Error::QueueFull { link });
            }
        }
        Ok(())
    }

    /// Queues a link-level control frame for the neighbour (not routed, not accounted as an
    /// envelope). Refused while the link's control output is backed up
    /// ([`Error::QueueFull`]).
    pub fn send_control(&mut self, link: LinkId, code: u32, data: Vec<u8>) -> Result<(), Error> {
        let idx = self.check(link)?;
        if data.len() + 32 > self.config.max_frame as usize {
            let max = self.config.max_frame as usize;
            return Err(Error::PayloadTooLarge {
                len: data.len(),
                max,
            });
        }
        if !self.links[idx].has_control_room(data.len() + 32, &self.config) {
            return Err(Error::QueueFull { link });
        }
        self.push_frame(link, &Frame::Control { code, data });
        self.flush_overruns();
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Outputs

    /// The next link with bytes to write, once per time it gains output.
    pub fn poll_transmit(&mut self) -> Option<LinkId> {
        while let Some(link) = self.dirty.pop_front() {
            if let Ok(idx) = self.check(link) {
                let l = &mut self.links[idx];
                l.dirty = false;
                if l.pending() > 0 {
                    return Some(link);
                }
            }
        }
        None
    }

    /// The bytes waiting to be written on a link (all its frames, coalesced).
    pub fn pending_output(&self, link: LinkId) -> Result<&[u8], Error> {
        let l = self.link(link)?;
        Ok(&l.tx[l.tx_head..])
    }

    /// Reports that the first `n` bytes of [`pending_output`](Self::pending_output) were
    /// written (a partial write is fine).
    pub fn advance_output(&mut self, link: LinkId, n: usize) -> Result<(), Error> {
        let idx = self.check(link)?;
        let l = &mut self.links[idx];
        let n = n.min(l.pending());
        l.tx_head += n;
        l.tx_written += n as u64;
        self.stats.bytes_out += n as u64;
        let mut done = Vec::new();
        while let Some(f) = l
            .inflight
            .get(usize::try_from(l.first_unwritten - l.acked).unwrap_or(usize::MAX))
        {
            if f.end > l.tx_written {
                break;
            }
            l.first_unwritten += 1;
            if let Some(q) = &f.queued {
                done.push(q.clone());
            }
        }
        if l.tx_head == l.tx.len() {
            l.tx.clear();
            l.tx_head = 0;
            l.ack_at = None;
            l.tx_stalled_since = None;
            l.tx_progress = false;
        } else {
            l.tx_progress |= n > 0;
            if l.tx_head >= 1 << 16 && l.tx_head * 2 >= l.tx.len() {
                l.tx.drain(..l.tx_head);
                l.ack_at = l.ack_at.and_then(|at| at.checked_sub(l.tx_head));
                l.tx_head = 0;
            }
        }
        for q in done {
            self.written_once(&q);
        }
        Ok(())
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let links = self
            .links
            .iter()
            .filter_map(|(_, l)| {
                let stall = l.stall_deadline(&self.config);
                match (l.ack_deadline, stall) {
                    (Some(a), Some(s)) => Some(a.min(s)),
                    (a, s) => a.or(s),
                }
            })
            .min();
        match (links, self.receipts.next_deadline()) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
    }

    // -----------------------------------------------------------------------------------
    // Frames

    fn on_frame(
        &mut self,
        now: Timestamp,
        link: LinkId,
        kind: u8,
        body: &[u8],
    ) -> Result<(), ProtocolError> {
        self.stats.frames_in += 1;
        let frame = decode_frame(kind, body, self.limits)?;
        let idx = link.index();
        let hello = self.links.get(idx).is_some_and(|l| l.hello);
        match frame {
            Frame::Hello(h) => self.on_hello(link, h),
            _ if !hello => Err(ProtocolError::HelloMissing),
            Frame::Envelope { link_seq, envelope } => {
                self.on_envelope(now, link, link_seq, envelope)
            }
            Frame::Ack(n) => self.on_ack(link, n),
            Frame::Routes(update) => self.on_routes(link, update),
            Frame::Notice { link_seq, notice } => self.on_notice(link, link_seq, notice),
            Frame::Control { code, data } => {
                self.events.push_back(Event::Control { link, code, data });
                Ok(())
            }
        }
    }

    fn on_hello(&mut self, link: LinkId, h: Hello) -> Result<(), ProtocolError> {
        let me = self.me;
        let Some(l) = self.links.get_mut(link.index()) else {
            return Ok(());
        };
        if l.hello {
            return Err(ProtocolError::DuplicateHello);
        }
        if h.version != WIRE_VERSION {
            return Err(ProtocolError::VersionMismatch {
                ours: WIRE_VERSION,
                theirs: h.version,
            });
        }
        if h.node == me {
            return Err(ProtocolError::Malformed("hello from this very node"));
        }
        if let Some(expected) = l.peer {
            if expected != h.node {
                return Err(ProtocolError::PeerMismatch {
                    expected,
                    got: h.node,
                });
            }
        }
        let known = l.peer.is_some();
        l.peer = Some(h.node);
        l.hello = true;
        if !known {
            self.neighbour(link, h.node)?;
        }
        self.events.push_back(Event::LinkUp { link, peer: h.node });
        Ok(())
    }

    /// A neighbour is known: placed behind its link unless the tree knows it already (and
    /// announced to the tree, from a tree link).
    fn neighbour(&mut self, link: LinkId, peer: NodeId) -> Result<(), ProtocolError> {
        if let Applied::Changed(info) = self.table.add_neighbour(peer, link)? {
            if self.role_of(link).is_tree() {
                let update = RouteUpdate {
                    upsert: vec![info],
                    ..RouteUpdate::default()
                };
                self.flood_routes(&update, Some(link));
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, link: LinkId, n: u64) -> Result<(), ProtocolError> {
        let Some(l) = self.links.get_mut(link.index()) else {
            return Ok(());
        };
        if n < l.acked || n > l.first_unwritten {
            return Err(ProtocolError::BadAck {
                acked: n,
                written: l.first_unwritten,
                previous: l.acked,
            });
        }
        while l.acked < n {
            if let Some(f) = l.inflight.pop_front() {
                let len = usize::try_from(f.end - f.start).unwrap_or(0);
                if f.queued.is_some() {
                    l.inflight_bytes -= len;
                } else {
                    l.inflight_notices -= 1;
                    l.inflight_notice_bytes -= len;
                }
            }
            l.acked += 1;
        }
        self.unpark(link);
        let Some(l) = self.links.get_mut(link.index()) else {
            return Ok(());
        };
        if l.refused && l.below_low_water(&self.config) {
            l.refused = false;
            self.events.push_back(Event::LinkReady(link));
        }
        Ok(())
    }

    fn on_routes(&mut self, link: LinkId, update: RouteUpdate) -> Result<(), ProtocolError> {
        let role = self.role_of(link);
        let peer = self.links.get(link.index()).and_then(|l| l.peer);
        let mut forward = RouteUpdate::default();
        for info in update.upsert {
            // A peer link speaks for its own neighbour only.
            if role == LinkRole::Peer && Some(info.node) != peer {
                self.stats.routes_ignored += 1;
                continue;
            }
            match self.table.upsert(&info, link)? {
                Applied::Changed(accepted) => forward.upsert.push(accepted),
                Applied::Ignored => self.stats.routes_ignored += 1,
                Applied::Unchanged => {}
            }
        }
        for delta in update.change {
            if role == LinkRole::Peer && Some(delta.node) != peer {
                self.stats.routes_ignored += 1;
                continue;
            }
            match self.table.apply_delta(&delta, link)? {
                Applied::Changed(accepted) if !accepted.is_empty() => forward.change.push(accepted),
                Applied::Changed(_) | Applied::Unchanged => {}
                Applied::Ignored => self.stats.routes_ignored += 1,
            }
        }
        for node in update.remove {
            if self.table.remove_via(&node, link) {
                self.node_gone(node);
                forward.remove.push(node);
            }
        }
        self.stats.names_refused += self.table.take_refused();
        // What a peer link's neighbour says of itself stays here.
        if role.is_tree() && !forward.is_empty() {
            self.flood_routes(&forward, Some(link));
        }
        Ok(())
    }

    /// Checks that `node` may speak on `link`: it lives behind it. `Ok(false)`: drop
    /// quietly (a redundant copy over a peer link, or news from a node that left).
    fn speaks_for(&self, link: LinkId, node: NodeId) -> Result<bool, ProtocolError> {
        let tree = self.role_of(link).is_tree();
        match self.table.route(&node) {
            Some(l) if l == link => Ok(true),
            _ if self.table.is_buried(&node) => Ok(false),
            _ if !tree => Ok(false),
            Some(_) => Err(ProtocolError::RouteConflict { node }),
            None if node == self.me => Err(ProtocolError::RouteConflict { node }),
            None => Err(ProtocolError::UnknownOrigin { node }),
        }
    }

    fn on_envelope(
        &mut self,
        now: Timestamp,
        link: LinkId,
        link_seq: u64,
        mut env: Envelope,
    ) -> Result<(), ProtocolError> {
        if !self.next_in_sequence(link, link_seq)? {
            return Ok(());
        }
        let role = self.role_of(link);
        self.stats.rx_frames += 1;
        let origin = env.id.origin;
        if env.flags.contains(Flags::HANDED) {
            // A custodian's hand-over: from the parent only, taken as is (its origin may
            // live anywhere; its id was seen by the custodian, not here).
            if role != LinkRole::Parent {
                return Err(ProtocolError::HandedNotFromParent);
            }
            self.trace_hop(now, link, &mut env);
            self.arrive_here(env, Some(link));
            return Ok(());
        }
        if !self.speaks_for(link, origin)? {
            if self.table.is_buried(&origin) {
                self.stats.absorbed += 1;
            } else {
                self.stats.redundant += 1;
            }
            tracing::trace!(origin = %origin, seq = env.id.seq, link = %link, "not from behind this link: dropped");
            return Ok(());
        }
        if !self.seen.insert(env.id) {
            self.stats.duplicates += 1;
            tracing::trace!(origin = %origin, seq = env.id.seq, link = %link, "duplicate dropped");
            return Ok(());
        }
        self.trace_hop(now, link, &mut env);
        tracing::trace!(
            origin = %origin, seq = env.id.seq, dst = %env.destination, hops = env.hops,
            link = %link, "hop"
        );
        if role == LinkRole::Peer {
            // A peer link carries traffic between its two ends only.
            self.deliver_from_peer(env, link);
        } else {
            // Not acknowledged while it is dispatched, so that nothing acknowledges it
            // before every copy found room (a forward that waits keeps its own hold).
            if let Some(l) = self.links.get_mut(link.index()) {
                l.dispatching = Some(link_seq);
            }
            self.dispatch(env, (link, link_seq));
            if let Some(l) = self.links.get_mut(link.index()) {
                if l.generation == link.generation {
                    l.dispatching = None;
                }
            }
            // An honest peer has at most its queue bound unacknowledged: one that sends on
            // while its envelopes are held back would make them pile up here.
            let held = self.links.get(link.index()).map_or(0, |l| l.holds.len());
            if held > 2 * self.config.max_queue_envelopes {
                return Err(ProtocolError::WindowExceeded { held });
            }
        }
        Ok(())
    }

    /// Checks a numbered frame's link sequence number: `Ok(false)` for a replay (dropped),
    /// an error for a gap (a stream cannot lose frames).
    fn next_in_sequence(&mut self, link: LinkId, link_seq: u64) -> Result<bool, ProtocolError> {
        let Some(l) = self.links.get_mut(link.index()) else {
            return Ok(false);
        };
        if link_seq < l.rx_next {
            self.stats.link_duplicates += 1;
            return Ok(false);
        }
        if link_seq > l.rx_next {
            return Err(ProtocolError::SequenceGap {
                expected: l.rx_next,
                got: link_seq,
            });
        }
        l.rx_next += 1;
        Ok(true)
    }

    fn trace_hop(&self, now: Timestamp, link: LinkId, env: &mut Envelope) {
        if env.flags.contains(Flags::TRACE) {
            env.trace.push(Hop {
                node: self.me,
                link: Some(link.index),
                at: now,
            });
            tracing::debug!(
                origin = %env.id.origin, seq = env.id.seq, dst = %env.destination,
                hops = env.hops, link = %link, "traced hop"
            );
        }
    }

    fn deliver_from_peer(&mut self, env: Envelope, link: LinkId) {
        let plan = self.plan(&env.destination, Some(link));
        if plan.deliver {
            self.arrive_here(env, Some(link));
        } else if env.destination.is_unicast() {
            self.lose(&env, Fate::Lost(LossReason::NoRoute));
        } else {
            self.stats.absorbed += 1;
        }
    }

    /// Routes an envelope that came in on `from`, frame `seq` of that link.
    fn dispatch(&mut self, mut env: Envelope, (from, seq): (LinkId, u64)) {
        let plan = self.plan(&env.destination, Some(from));
        if plan.unroutable {
            self.lose(&env, Fate::Lost(LossReason::NoRoute));
            return;
        }
        let targets = plan.targets.as_slice();
        if targets.is_empty() {
            if plan.deliver {
                self.arrive_here(env, Some(from));
            } else {
                // A flood's dead end, or a group envelope with nowhere to go.
                self.stats.absorbed += 1;
            }
            return;
        }
        let limit = match (plan.flooded, self.config.no_route) {
            (true, NoRoutePolicy::Flood { hop_limit }) => hop_limit.min(env.hop_limit),
            _ => env.hop_limit,
        };
        let deliver = plan.deliver;
        let targets = targets.to_vec();
        if env.hops >= limit {
            self.count_copies(deliver, 1);
            if deliver {
                self.arrive_here(env.clone(), Some(from));
            }
            self.lose(&env, Fate::Lost(LossReason::HopLimit));
            return;
        }
        if deliver {
            // The copy delivered here has the hops it came with.
            self.arrive_here(env.clone(), Some(from));
        }
        env.hops += 1;
        let max_len = envelope_frame_len(u64::MAX, &env);
        if max_len - 4 > self.config.max_frame as usize {
            // Grown past the frame limit on its way (a trace from a sender that did not
            // reserve room): the next hop would refuse the frame and close the link.
            self.count_copies(deliver, 1);
            self.lose(&env, Fate::Lost(LossReason::TooLarge));
            return;
        }
        self.count_copies(deliver, targets.len());
        self.stats.forwarded += 1;
        let queued = Queued::with_len(env, max_len, false, targets.len());
        for link in targets {
            if self.enqueue(link, &queued) {
                continue;
            }
            // No room: the copy waits for it, holding back the frame it came in.
            let Some(l) = self.links.get_mut(link.index()) else {
                continue;
            };
            l.parked.push_back(Parked::Envelope {
                queued: queued.clone(),
                hold: (from, seq),
            });
            self.stats.parked += 1;
            if let Some(l) = self.links.get_mut(from.index()) {
                l.hold(seq);
            }
        }
    }

    /// Queues the forwards waiting for room on `link`, in order, as far as it has room;
    /// each releases the incoming frame it held back.
    fn unpark(&mut self, link: LinkId) {
        loop {
            let Some(l) = self.links.get_mut(link.index()) else {
                return;
            };
            let fits = match l.parked.front() {
                Some(Parked::Envelope { queued, .. }) => {
                    l.forward_fits(queued.max_len, &self.config)
                }
                Some(Parked::Routes(_)) => true,
                None => false,
            };
            if !fits {
                return;
            }
            match l.parked.pop_front() {
                Some(Parked::Envelope { queued, hold }) => {
                    self.push_queued(link, &queued);
                    self.release_hold(hold);
                }
                Some(Parked::Routes(bytes)) => {
                    l.parked_route_bytes -= bytes.len();
                    self.push_bytes(link, &bytes);
                }
                None => return,
            }
        }
    }

    /// Releases one hold on an incoming frame; acknowledges what that frees.
    fn release_hold(&mut self, (link, seq): (LinkId, u64)) {
        let clock = self.clock;
        let Some(l) = self.links.get_mut(link.index()) else {
            return;
        };
        if l.generation != link.generation {
            return;
        }
        l.release(seq);
        let unacked = l.ack_limit().saturating_sub(l.rx_acked);
        if unacked >= self.config.ack_every {
            l.write_ack();
            self.mark_dirty(link);
        } else if unacked > 0 && l.ack_deadline.is_none() {
            l.ack_deadline = Some(clock + self.config.ack_delay);
        }
    }

    /// One envelope became `deliver + targets` copies here.
    fn count_copies(&mut self, deliver: bool, targets: usize) {
        match usize::from(deliver) + targets {
            0 => self.stats.absorbed += 1,
            k => self.stats.fanout += (k - 1) as u64,
        }
    }

    /// An envelope for this node: delivered to the application, or taken in custody when
    /// addressed to a name held here.
    fn arrive_here(&mut self, env: Envelope, from: Option<LinkId>) {
        if !env.flags.contains(Flags::HANDED) {
            if let Destination::NameAt { name, .. } = &env.destination {
                if self.custody.holds(name) {
                    self.take_in_custody(env);
                    return;
                }
                if !self.table.has_name(name) {
                    // The name moved on since the sender bound it here: to the child this
                    // node handed it to, or nowhere (a sure loss: no holder took it).
                    let child = self.custody.handed_to(name);
                    match child.and_then(|c| self.table.route(&c).map(|l| (c, l))) {
                        Some((child, link)) => self.hand_over(link, child, env),
                        None => self.lose(&env, Fate::Lost(LossReason::NoRoute)),
                    }
                    return;
                }
            }
        }
        self.stats.delivered += 1;
        let receipt = env.flags.contains(Flags::RECEIPT) && env.destination.is_unicast();
        let id = env.id;
        // The message before its receipt: a receipt for this very node is an event too,
        // and the application must never hear "delivered" of a message it was not given.
        self.events.push_back(Event::Message {
            envelope: env,
            link: from,
        });
        if receipt {
            self.send_notice(id.origin, id.seq, NoticeKind::Delivered);
        }
    }

    fn take_in_custody(&mut self, env: Envelope) {
        let Some(name) = env.destination.name().map(str::to_owned) else {
            return;
        };
        let id = env.id;
        match self.custody.take(&name, env) {
            Ok(()) => {
                self.stats.taken_in_custody += 1;
                self.events.push_back(Event::Held { name, id });
            }
            Err(env) => self.lose(&env, Fate::Lost(LossReason::QueueFull)),
        }
    }

    /// Hands an envelope for a name to its new holder, `child` behind `link` (held ones
    /// go ahead of anything routed to it later). Its receipt is rebound to the child by a
    /// notice.
    fn hand_over(&mut self, link: LinkId, child: NodeId, mut env: Envelope) {
        env.flags = env.flags.with(Flags::HANDED);
        env.hops = env.hops.saturating_add(1);
        let queued = Queued::new(env, false, 1);
        if queued.max_len - 4 > self.config.max_frame as usize {
            self.lose(&queued.env, Fate::Lost(LossReason::TooLarge));
            return;
        }
        // Custody is bounded by its capacity: a hand-over may pass the queue bound of the
        // new holder's link by that much.
        self.push_queued(link, &queued);
        self.stats.handed_over += 1;
        if queued.env.flags.contains(Flags::RECEIPT) {
            let (origin, seq) = (queued.env.id.origin, queued.env.id.seq);
            self.send_notice(origin, seq, NoticeKind::Moved(child));
        }
    }

    // -----------------------------------------------------------------------------------
    // Notices

    /// Tells `origin` what became of its envelope `seq`, said by this node.
    fn send_notice(&mut self, origin: NodeId, seq: u64, kind: NoticeKind) {
        self.stats.notices_sent += 1;
        let notice = Notice {
            origin,
            seq,
            from: self.me,
            hops: 0,
            kind,
        };
        if origin == self.me {
            self.notice_here(notice);
        } else {
            self.route_notice(notice);
        }
    }

    /// Sends a notice one hop on towards its origin, on the control stream of the link.
    fn route_notice(&mut self, mut notice: Notice) {
        let Some(link) = self.table.route(&notice.origin) else {
            // The origin left the tree: nobody to tell.
            self.stats.notices_undeliverable += 1;
            return;
        };
        if notice.hops >= self.config.hop_limit {
            self.stats.notices_undeliverable += 1;
            return;
        }
        notice.hops += 1;
        self.stats.tx_frames += 1;
        let limit = self.config.max_queue_bytes * 2 + self.config.max_frame as usize;
        let Some(l) = self.links.get_mut(link.index()) else {
            return;
        };
        l.piggyback_ack();
        let start = l.stream_end();
        let frame = Frame::Notice {
            link_seq: l.next_seq,
            notice,
        };
        let n = encode_frame(&mut l.tx, &frame);
        l.next_seq += 1;
        l.inflight.push_back(InFlight {
            start,
            end: start + n as u64,
            queued: None,
        });
        l.inflight_notices += 1;
        l.inflight_notice_bytes += n;
        // A notice stays in the link's accounting until acknowledged: one the peer read
        // and never acknowledged costs its record, so unacknowledged notices count
        // towards the bound of output the peer does not take, like unwritten bytes.
        if (l.pending() > limit || l.inflight_notice_bytes > limit) && !self.overrun.contains(&link)
        {
            self.overrun.push(link);
        }
        self.mark_dirty(link);
    }

    fn on_notice(
        &mut self,
        link: LinkId,
        link_seq: u64,
        notice: Notice,
    ) -> Result<(), ProtocolError> {
        if !self.next_in_sequence(link, link_seq)? {
            return Ok(());
        }
        self.stats.rx_frames += 1;
        if !self.speaks_for(link, notice.from)? {
            self.stats.notices_ignored += 1;
            return Ok(());
        }
        if notice.origin == self.me {
            self.notice_here(notice);
        } else {
            self.stats.notices_forwarded += 1;
            self.route_notice(notice);
        }
        Ok(())
    }

    /// A notice about an envelope of this node's. Believed only from a node that can know:
    /// a receipt from the node the envelope is bound to, a loss from a node on its path.
    fn notice_here(&mut self, notice: Notice) {
        let id = MessageId {
            origin: self.me,
            seq: notice.seq,
        };
        let from = notice.from;
        let bound = self.receipts.get(notice.seq).map(|p| p.dest);
        match notice.kind {
            NoticeKind::Delivered => match bound {
                Some(dest) if dest.is_none() || dest == Some(from) => {
                    self.receipts.take(notice.seq);
                    self.events.push_back(Event::Delivered(id));
                }
                _ => self.stats.notices_ignored += 1,
            },
            NoticeKind::Moved(to) => match bound {
                Some(Some(dest)) if dest == from => self.receipts.rebind(notice.seq, to),
                _ => self.stats.notices_ignored += 1,
            },
            NoticeKind::Lost { fate, receipt } => {
                let on_path = |d: Option<NodeId>| match d {
                    Some(d) => {
                        d == from
                            || from == self.me
                            || self.table.route(&from) == self.table.route(&d)
                    }
                    None => true,
                };
                match bound {
                    Some(dest) if on_path(dest) => self.origin_outcome(id, fate, from, None),
                    Some(_) => self.stats.notices_ignored += 1,
                    None if !receipt && notice.seq < self.next_seq => {
                        self.events.push_back(Event::Lost(LossReport {
                            id,
                            fate,
                            at: from,
                            destination: None,
                            payload: None,
                        }));
                    }
                    None => self.stats.notices_ignored += 1,
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Routing decisions

    fn plan(&self, dst: &Destination, from: Option<LinkId>) -> Plan {
        match dst {
            Destination::Node(n) if *n == self.me => Plan::only(true, Targets::None),
            Destination::Node(n) => self.unicast_plan(n, from),
            Destination::NameAt { node, .. } if *node == self.me => Plan::only(true, Targets::None),
            Destination::NameAt { node, .. } => self.unicast_plan(node, from),
            Destination::Name(s) if self.table.has_name(s) => Plan::only(true, Targets::None),
            Destination::Name(s) => match self.table.resolve_name(s) {
                Some(n) => self.unicast_plan(&n, from),
                None => self.no_route_plan(from),
            },
            Destination::Group(g) => Plan::only(
                self.table.is_member(g),
                Targets::Many(self.table.group_links(g, from)),
            ),
            Destination::Broadcast => {
                Plan::only(from.is_some(), Targets::Many(self.other_links(from)))
            }
        }
    }

    fn unicast_plan(&self, node: &NodeId, from: Option<LinkId>) -> Plan {
        match self.table.route(node) {
            // Sending it back where it came from would meet a seen window: no route.
            Some(l) if Some(l) != from => Plan::only(false, Targets::One(l)),
            _ => self.no_route_plan(from),
        }
    }

    fn no_route_plan(&self, from: Option<LinkId>) -> Plan {
        match self.config.no_route {
            NoRoutePolicy::Report => Plan::unroutable(),
            NoRoutePolicy::Flood { .. } => Plan {
                deliver: false,
                targets: Targets::Many(self.other_links(from)),
                unroutable: false,
                flooded: true,
            },
        }
    }

    fn other_links(&self, except: Option<LinkId>) -> Vec<LinkId> {
        self.links
            .iter()
            .map(|(i, l)| Self::link_id(i, l.generation))
            .filter(|l| Some(*l) != except)
            .collect()
    }

    fn tree_links(&self, except: Option<LinkId>) -> Vec<LinkId> {
        self.links
            .iter()
            .filter(|(_, l)| l.role.is_tree())
            .map(|(i, l)| Self::link_id(i, l.generation))
            .filter(|l| Some(*l) != except)
            .collect()
    }

    // -----------------------------------------------------------------------------------
    // Losses

    /// An envelope is lost here: count it and tell its origin.
    fn lose(&mut self, env: &Envelope, fate: Fate) {
        tracing::debug!(
            origin = %env.id.origin, seq = env.id.seq, dst = %env.destination, %fate, "lost"
        );
        self.stats.lost.count(fate);
        if env.id.origin == self.me {
            self.origin_outcome(env.id, fate, self.me, Some(env));
        } else {
            let receipt = env.flags.contains(Flags::RECEIPT);
            self.send_notice(
                env.id.origin,
                env.id.seq,
                NoticeKind::Lost { fate, receipt },
            );
        }
    }

    /// An envelope of this node's was lost at `at` (or its fate became unknown). With a
    /// receipt (always, when `env` is not given), only the first outcome counts: one no
    /// longer pending was resolved already.
    fn origin_outcome(&mut self, id: MessageId, fate: Fate, at: NodeId, env: Option<&Envelope>) {
        let tracked = env.is_none_or(|e| e.flags.contains(Flags::RECEIPT));
        let (destination, payload) = if tracked {
            match self.receipts.take(id.seq) {
                Some(p) => (Some(p.destination), Some(p.payload)),
                None => return,
            }
        } else {
            (
                env.map(|e| e.destination.clone()),
                env.map(|e| e.payload.clone()),
            )
        };
        if matches!(
            fate,
            Fate::Unknown(UnknownReason::Timeout | UnknownReason::DestinationDown)
        ) {
            self.stats.lost.count(fate);
        }
        self.events.push_back(Event::Lost(LossReport {
            id,
            fate,
            at,
            destination,
            payload,
        }));
    }

    /// A node left the tree: forget its window, end receipts waiting on it.
    fn node_gone(&mut self, node: NodeId) {
        self.seen.forget(&node);
        self.custody.forget_handed(&node);
        self.events.push_back(Event::NodeDown(node));
        for seq in self.receipts.waiting_on(&node) {
            let id = MessageId {
                origin: self.me,
                seq,
            };
            self.origin_outcome(
                id,
                Fate::Unknown(UnknownReason::DestinationDown),
                self.me,
                None,
            );
        }
    }

    // -----------------------------------------------------------------------------------
    // Links

    fn link_id(index: usize, generation: u32) -> LinkId {
        LinkId {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            generation,
        }
    }

    fn check(&self, link: LinkId) -> Result<usize, Error> {
        match self.links.get(link.index()) {
            Some(l) if l.generation == link.generation => Ok(link.index()),
            _ => Err(Error::UnknownLink(link)),
        }
    }

    fn link(&self, link: LinkId) -> Result<&Link, Error> {
        let idx = self.check(link)?;
        Ok(&self.links[idx])
    }

    fn role_of(&self, link: LinkId) -> LinkRole {
        self.links
            .get(link.index())
            .map_or(LinkRole::Peer, |l| l.role)
    }

    fn mark_dirty(&mut self, link: LinkId) {
        let clock = self.clock;
        if let Some(l) = self.links.get_mut(link.index()) {
            if l.pending() > 0 && l.tx_stalled_since.is_none() {
                l.tx_stalled_since = Some(clock);
            }
            if !l.dirty && l.pending() > 0 {
                l.dirty = true;
                self.dirty.push_back(link);
            }
        }
    }

    /// Queues a forwarded envelope frame on a link; `false` when the forwards' share of
    /// the link is full, or something waits ahead (or the link is gone).
    fn enqueue(&mut self, link: LinkId, queued: &Rc<Queued>) -> bool {
        match self.links.get(link.index()) {
            Some(l) if l.takes_forward(queued.max_len, &self.config) => {
                self.push_queued(link, queued);
                true
            }
            _ => false,
        }
    }

    fn push_queued(&mut self, link: LinkId, queued: &Rc<Queued>) {
        let Some(l) = self.links.get_mut(link.index()) else {
            return;
        };
        l.piggyback_ack();
        let start = l.stream_end();
        let n = encode_envelope(&mut l.tx, l.next_seq, &queued.env);
        l.next_seq += 1;
        l.inflight.push_back(InFlight {
            start,
            end: start + n as u64,
            queued: Some(queued.clone()),
        });
        l.inflight_bytes += n;
        self.stats.tx_frames += 1;
        tracing::trace!(
            origin = %queued.env.id.origin, seq = queued.env.id.seq,
            dst = %queued.env.destination, hops = queued.env.hops, link = %link, "queued"
        );
        self.mark_dirty(link);
    }

    /// Queues a frame outside envelope accounting (hello, routes, notices, control).
    fn push_frame(&mut self, link: LinkId, frame: &Frame) {
        let mut buf = Vec::with_capacity(NOTICE_LEN);
        encode_frame(&mut buf, frame);
        self.push_bytes(link, &buf);
    }

    fn push_bytes(&mut self, link: LinkId, bytes: &[u8]) {
        let limit = self.config.max_queue_bytes * 2 + self.config.max_frame as usize;
        let Some(l) = self.links.get_mut(link.index()) else {
            return;
        };
        l.piggyback_ack();
        l.tx.extend_from_slice(bytes);
        if l.pending() > limit && !self.overrun.contains(&link) {
            self.overrun.push(link);
        }
        self.mark_dirty(link);
    }

    /// Passes route changes on to every tree link but `except` (peer links hear only of
    /// this node itself).
    fn flood_routes(&mut self, update: &RouteUpdate, except: Option<LinkId>) {
        if update.is_empty() {
            return;
        }
        let mut buf = Vec::new();
        encode_routes(&mut buf, update.clone(), self.route_budget());
        let limit = self.config.max_queue_bytes * 2 + self.config.max_frame as usize;
        for link in self.tree_links(except) {
            match self.links.get_mut(link.index()) {
                Some(l) if !l.parked.is_empty() => {
                    l.parked_route_bytes += buf.len();
                    l.parked.push_back(Parked::Routes(buf.clone()));
                    if l.pending() + l.parked_route_bytes > limit && !self.overrun.contains(&link) {
                        self.overrun.push(link);
                    }
                }
                _ => self.push_bytes(link, &buf),
            }
        }
    }

    /// Announces a change of this node's names or groups to every link.
    fn announce_me(&mut self, mut delta: NodeDelta) {
        delta.node = self.me;
        delta.version = self.table.my_version();
        let mut buf = Vec::new();
        let update = RouteUpdate {
            change: vec![delta],
            ..RouteUpdate::default()
        };
        encode_routes(&mut buf, update, self.route_budget());
        for link in self.other_links(None) {
            self.push_bytes(link, &buf);
        }
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        if name.is_empty() || name.len() > self.config.max_name {
            return Err(Error::InvalidName {
                len: name.len(),
                max: self.config.max_name,
            });
        }
        Ok(())
    }

    fn written_once(&mut self, q: &Queued) {
        let left = q.unwritten.get().saturating_sub(1);
        q.unwritten.set(left);
        if left == 0 && q.local && !q.lost.get() {
            self.events.push_back(Event::Sent(q.env.id));
        }
    }

    /// A peer broke the protocol: its link closes.
    fn violation(&mut self, link: LinkId, e: ProtocolError) {
        if self.check(link).is_err() {
            return;
        }
        tracing::warn!(link = %link, error = %e, "closing link: protocol error");
        self.stats.protocol_errors += 1;
        self.teardown(link, DownCause::Protocol(e));
    }

    /// Closes links whose peers stopped reading (or acknowledging notices) while control
    /// output piled up.
    fn flush_overruns(&mut self) {
        while let Some(link) = self.overrun.pop() {
            if self.check(link).is_ok() {
                tracing::warn!(link = %link, "closing link: peer does not read or acknowledge");
                self.teardown(link, DownCause::Overrun);
            }
        }
    }

    /// Takes a link down: its lost list, the nodes behind it, notices to origins.
    fn teardown(&mut self, link: LinkId, cause: DownCause) {
        let idx = link.index();
        if self.check(link).is_err() {
            return;
        }
        let mut l = self.links.remove(idx);
        self.generations[idx] = self.generations[idx].wrapping_add(1);
        // Forwards that waited for room on it were never written: sure losses; the frames
        // they held back elsewhere may be acknowledged now.
        for p in std::mem::take(&mut l.parked) {
            if let Parked::Envelope { queued, hold } = p {
                let env = for_accounting(&queued.env, false);
                self.lose(&env, Fate::Lost(LossReason::NeverWritten));
                self.release_hold(hold);
            }
        }
        let mut lost = Vec::with_capacity(l.envelopes());
        for f in l.inflight {
            // A notice goes down with its link: the origin is behind it, cut off, and
            // hears of its envelopes' fate from the destination's withdrawal.
            let Some(queued) = f.queued else {
                continue;
            };
            let fate = if l.tx_written >= f.end {
                Fate::Unknown(UnknownReason::Unacknowledged)
            } else if l.tx_written > f.start {
                Fate::Lost(LossReason::PartiallyWritten)
            } else {
                Fate::Lost(LossReason::NeverWritten)
            };
            queued.lost.set(true);
            let envelope = match Rc::try_unwrap(queued) {
                Ok(q) => q.env,
                Err(shared) => shared.env.clone(),
            };
            lost.push(LostEnvelope { envelope, fate });
        }
        tracing::debug!(link = %link, peer = ?l.peer, cause = ?cause, lost = lost.len(), "link down");
        let nodes_ever = self.table.nodes_ever(link);
        let accounting: Vec<(Envelope, Fate)> = lost
            .iter()
            .map(|x| {
                let local = x.envelope.id.origin == self.me;
                (for_accounting(&x.envelope, local), x.fate)
            })
            .collect();
        self.events.push_back(Event::LinkDown(LinkDown {
            link,
            peer: l.peer,
            cause,
            lost,
            nodes_ever,
        }));
        for (env, fate) in accounting {
            self.lose(&env, fate);
        }
        let gone = self.table.remove_link(link);
        for node in &gone {
            self.node_gone(*node);
        }
        if !gone.is_empty() && l.role.is_tree() {
            let update = RouteUpdate {
                remove: gone,
                ..RouteUpdate::default()
            };
            self.flood_routes(&update, None);
        }
    }
}

/// Appends a route update as one frame, or as several in order when one would pass
/// `budget` bytes (a dump of a big table, say): each frame is a valid update on its own,
/// applied in the order upserts, changes, removals.
fn encode_routes(out: &mut Vec<u8>, update: RouteUpdate, budget: usize) {
    let start = out.len();
    let n = update.upsert.len() + update.change.len() + update.remove.len();
    if encode_frame(out, &Frame::Routes(update.clone())) <= budget || n <= 1 {
        return;
    }
    out.truncate(start);
    let RouteUpdate {
        mut upsert,
        mut change,
        mut remove,
    } = update;
    let half = n / 2;
    let mut first = RouteUpdate::default();
    let take_up = half.min(upsert.len());
    first.upsert = upsert.drain(..take_up).collect();
    let take_change = (half - take_up).min(change.len());
    first.change = change.drain(..take_change).collect();
    let take_remove = half - take_up - take_change;
    first.remove = remove.drain(..take_remove).collect();
    encode_routes(out, first, budget);
    encode_routes(
        out,
        RouteUpdate {
            upsert,
            change,
            remove,
        },
        budget,
    );
}

/// An envelope without its trace, for loss accounting; the payload only when `keep` (a
/// local loss report hands it back; a notice to another origin needs none).
fn for_accounting(env: &Envelope, keep: bool) -> Envelope {
    Envelope {
        id: env.id,
        destination: env.destination.clone(),
        hops: env.hops,
        hop_limit: env.hop_limit,
        flags: env.flags,
        trace: Vec::new(),
        payload: if keep {
            env.payload.clone()
        } else {
            Vec::new()
        },
    }
}

#[cfg(test)]
mod tests;
