//! The router: one per process, fed bytes and time, producing bytes and events.

use std::cell::Cell;
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use slab::Slab;

use crate::dedup::SeenTable;
use crate::error::{Error, ProtocolError};
use crate::event::{DownCause, Event, LinkDown, LossReason, LossReport, LostEnvelope, WriteState};
use crate::hash::{self, Map};
use crate::id::{Address, Destination, LinkId, MessageId, NodeId, Timestamp};
use crate::stats::RouterStats;
use crate::table::{Applied, RouteTable};
use crate::wire::{
    decode_frame, encode_ack_fixed, encode_envelope, encode_frame, envelope_frame_len, raise_ack,
    DecodeLimits, Deframer, Envelope, Flags, Frame, Hello, Hop, Notice, RouteUpdate, WIRE_VERSION,
};

/// What a node does with a unicast envelope it has no route for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NoRoutePolicy {
    /// Report it lost with [`LossReason::NoRoute`] (the default).
    #[default]
    Report,
    /// Flood it to every link but the one it came on, at most this many hops in all. A flood
    /// that finds no taker is counted in [`RouterStats::flood_dead_ends`]; its origin learns
    /// of it only through a receipt's timeout, so this policy needs
    /// [`RouterConfig::receipt_timeout`].
    Flood {
        /// Hop limit of flooded envelopes.
        hop_limit: u8,
    },
}

/// Bounds and behaviour of a router. Every bound holds whatever peers send.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterConfig {
    /// Largest frame accepted or produced (kind + body), in bytes.
    pub max_frame: u32,
    /// Longest name or group name, in bytes.
    pub max_name: usize,
    /// Envelopes a link may hold queued or written and unacknowledged. Receipts and loss
    /// notices may use a reserve of the same size again.
    pub max_queue_envelopes: usize,
    /// Bytes of envelope frames a link may hold queued or written and unacknowledged (and
    /// the same again as a reserve for notices).
    pub max_queue_bytes: usize,
    /// Remote nodes the routing table holds at most.
    pub max_nodes: usize,
    /// Origins whose seen windows are kept at most.
    pub max_origins: usize,
    /// Envelopes awaiting a receipt at most.
    pub max_pending_receipts: usize,
    /// Hop limit of envelopes sent without one of their own.
    pub hop_limit: u8,
    /// What to do with unicast envelopes that have no route.
    pub no_route: NoRoutePolicy,
    /// Longest a received envelope frame waits for its acknowledgement when nothing is sent
    /// back that could carry it.
    pub ack_delay: Duration,
    /// Received envelope frames that trigger an acknowledgement at once. Keep it below the
    /// peers' `max_queue_envelopes`, or a full peer waits `ack_delay` for room.
    pub ack_every: u64,
    /// How long an origin waits for a receipt before reporting [`LossReason::Timeout`]
    /// (`None`: until the destination leaves the tree).
    pub receipt_timeout: Option<Duration>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            max_frame: (1 << 20) + 4096,
            max_name: 256,
            max_queue_envelopes: 4096,
            max_queue_bytes: 8 << 20,
            max_nodes: 1 << 16,
            max_origins: 1 << 12,
            max_pending_receipts: 1 << 16,
            hop_limit: 64,
            no_route: NoRoutePolicy::Report,
            ack_delay: Duration::from_millis(2),
            ack_every: 32,
            receipt_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl RouterConfig {
    fn validate(&self) -> Result<(), Error> {
        if self.max_frame < 64 {
            return Err(Error::InvalidConfig("max_frame must be at least 64"));
        }
        if self.max_queue_bytes < self.max_frame as usize {
            return Err(Error::InvalidConfig("max_queue_bytes must hold one frame"));
        }
        if self.max_queue_envelopes == 0 || self.ack_every == 0 {
            return Err(Error::InvalidConfig(
                "max_queue_envelopes and ack_every must be positive",
            ));
        }
        if matches!(self.no_route, NoRoutePolicy::Flood { .. }) && self.receipt_timeout.is_none() {
            // A flood that finds no taker says nothing: only the timeout ends its receipt.
            return Err(Error::InvalidConfig(
                "flooding unroutable envelopes needs a receipt_timeout",
            ));
        }
        if self.max_name == 0 || self.max_name + 64 > self.max_frame as usize {
            return Err(Error::InvalidConfig("max_name must fit a frame"));
        }
        Ok(())
    }
}

/// Per-message options of [`Router::submit`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// Ask for exactly one outcome: [`Event::Delivered`] or [`Event::Lost`] (unicast only).
    pub receipt: bool,
    /// Record every hop in the envelope's trace.
    pub trace: bool,
    /// A hop limit for this envelope instead of the configured one.
    pub hop_limit: Option<u8>,
}

/// A refused submission: the reason and the payload, handed back untouched.
#[derive(Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why it was refused.
    pub error: Error,
    /// The payload, for a retry.
    pub payload: Vec<u8>,
}

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refused")
            .field("error", &self.error)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "send refused: {}", self.error)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// What a link holds, for views and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// The neighbour, when known.
    pub peer: Option<NodeId>,
    /// Envelopes queued or written and not acknowledged.
    pub in_flight: usize,
    /// Bytes of those envelopes' frames.
    pub in_flight_bytes: usize,
    /// Bytes waiting to be written.
    pub pending_output: usize,
    /// Envelope frames sent on this link.
    pub frames_sent: u64,
    /// Envelope frames received on this link.
    pub frames_received: u64,
}

/// An envelope in link accounting, shared by every link it was queued on.
#[derive(Debug)]
struct Queued {
    env: Envelope,
    /// Its frame's length with the widest link sequence number: computed once, an upper
    /// bound on every link.
    max_len: usize,
    /// Originated here (not forwarded).
    local: bool,
    /// Links it is queued on and not yet written whole to.
    unwritten: Cell<u32>,
    /// Lost on one of its links: no [`Event::Sent`] for it.
    lost: Cell<bool>,
}

impl Queued {
    fn new(env: Envelope, local: bool, targets: usize) -> Rc<Self> {
        let max_len = envelope_frame_len(u64::MAX, &env);
        Self::with_len(env, max_len, local, targets)
    }

    /// When the caller computed `envelope_frame_len(u64::MAX, &env)` already.
    fn with_len(env: Envelope, max_len: usize, local: bool, targets: usize) -> Rc<Self> {
        Rc::new(Self {
            max_len,
            env,
            local,
            unwritten: Cell::new(u32::try_from(targets).unwrap_or(u32::MAX)),
            lost: Cell::new(false),
        })
    }
}

/// Bytes one hop can add to a traced envelope: a five-item array of a node id, a link index
/// and a time, each at its widest.
const MAX_HOP_LEN: usize = 1 + 3 * 5 + 9 + 9;

/// An envelope frame on one link: its sequence number and where it sits in the byte stream.
#[derive(Debug)]
struct InFlight {
    start: u64,
    end: u64,
    queued: Rc<Queued>,
}

/// One link's two directions.
///
/// ```text
///  send:  ──acked──┬──written, unacked──┬──queued, unwritten──►  next_seq
///                 acked          first_unwritten
///         inflight holds seqs acked..next_seq; tx holds the bytes not yet written
///  recv:  rx_next = frames received;  rx_acked = frames acknowledged to the peer
/// ```
#[derive(Debug)]
struct Link {
    generation: u32,
    peer: Option<NodeId>,
    hello: bool,
    deframer: Deframer,
    rx_next: u64,
    rx_acked: u64,
    ack_deadline: Option<Timestamp>,
    tx: Vec<u8>,
    tx_head: usize,
    tx_written: u64,
    /// Offset in `tx` of the count of an acknowledgement not yet started.
    ack_at: Option<usize>,
    next_seq: u64,
    acked: u64,
    first_unwritten: u64,
    inflight: VecDeque<InFlight>,
    inflight_bytes: usize,
    refused: bool,
    dirty: bool,
}

impl Link {
    fn new(generation: u32, peer: Option<NodeId>, max_frame: u32) -> Self {
        Self {
            generation,
            peer,
            hello: false,
            deframer: Deframer::new(max_frame),
            rx_next: 0,
            rx_acked: 0,
            ack_deadline: None,
            tx: Vec::new(),
            tx_head: 0,
            tx_written: 0,
            ack_at: None,
            next_seq: 0,
            acked: 0,
            first_unwritten: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            refused: false,
            dirty: false,
        }
    }

    fn pending(&self) -> usize {
        self.tx.len() - self.tx_head
    }

    fn stream_end(&self) -> u64 {
        self.tx_written + self.pending() as u64
    }

    /// Whether an envelope frame fits. Notices (receipts, loss notices) may use a reserve as
    /// large as the bound itself, so that a queue full of envelopes does not also swallow
    /// the news of their fate.
    fn has_room(&self, frame_len: usize, config: &RouterConfig, notice: bool) -> bool {
        let factor = if notice { 2 } else { 1 };
        self.inflight.len() < config.max_queue_envelopes * factor
            && self.inflight_bytes + frame_len <= config.max_queue_bytes * factor
    }

    fn below_low_water(&self, config: &RouterConfig) -> bool {
        self.inflight.len() <= config.max_queue_envelopes / 2
            && self.inflight_bytes <= config.max_queue_bytes / 2
    }

    /// Writes (or raises in place) the acknowledgement of everything received.
    fn write_ack(&mut self) {
        self.ack_deadline = None;
        if self.rx_acked == self.rx_next {
            return;
        }
        self.rx_acked = self.rx_next;
        match self.ack_at {
            Some(at) if at >= self.tx_head + 7 => raise_ack(&mut self.tx, at, self.rx_next),
            _ => self.ack_at = Some(encode_ack_fixed(&mut self.tx, self.rx_next)),
        }
    }

    /// Writes a pending acknowledgement ahead of other output, so it rides along.
    fn piggyback_ack(&mut self) {
        if self.rx_next > self.rx_acked {
            self.write_ack();
        }
    }
}

/// A pending receipt.
#[derive(Clone, Copy, Debug)]
struct PendingReceipt {
    /// The node it went to; `None` when it was flooded for want of a route (only a receipt
    /// or the timeout can end it).
    dest: Option<NodeId>,
    deadline: Option<Timestamp>,
}

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
    deliver: bool,
    targets: Targets,
    /// Unicast with no route under [`NoRoutePolicy::Report`].
    unroutable: bool,
    /// Flooded for want of a route.
    flooded: bool,
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
/// a malformed frame or a protocol violation closes that one link, reported as
/// [`Event::LinkDown`] with its lost list.
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
    receipts: Map<u64, PendingReceipt>,
    deadlines: BTreeSet<(Timestamp, u64)>,
    events: VecDeque<Event>,
    dirty: VecDeque<LinkId>,
    overrun: Vec<LinkId>,
    stats: RouterStats,
}

impl Router {
    /// A router for node `me`.
    pub fn new(me: NodeId, config: RouterConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            me,
            limits: DecodeLimits {
                max_frame: config.max_frame,
                max_name: config.max_name,
            },
            table: RouteTable::new(me, config.max_nodes),
            seen: SeenTable::new(me, config.max_origins),
            config,
            links: Slab::new(),
            generations: Vec::new(),
            next_seq: 0,
            receipts: hash::map(me),
            deadlines: BTreeSet::new(),
            events: VecDeque::new(),
            dirty: VecDeque::new(),
            overrun: Vec::new(),
            stats: RouterStats::default(),
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
            in_flight: l.inflight.len(),
            in_flight_bytes: l.inflight_bytes,
            pending_output: l.pending(),
            frames_sent: l.next_seq,
            frames_received: l.rx_next,
        })
    }

    /// Envelopes awaiting a receipt.
    pub fn pending_receipts(&self) -> usize {
        self.receipts.len()
    }

    /// Origins whose seen windows are kept.
    pub fn seen_origins(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is queued, unacknowledged, unwritten, or awaiting a receipt.
    pub fn is_idle(&self) -> bool {
        self.receipts.is_empty()
            && self
                .links
                .iter()
                .all(|(_, l)| l.inflight.is_empty() && l.pending() == 0)
    }

    // -----------------------------------------------------------------------------------
    // Inputs: links

    /// A link came up. `peer` is the node at its other end when known already (a parent
    /// knows its child the moment fork returns: its route is usable at once). Queues this
    /// node's hello and its routing table for the peer.
    pub fn handle_link_up(&mut self, _now: Timestamp, peer: Option<NodeId>) -> LinkId {
        let link = self.open_link(peer);
        self.greet(link);
        if let Some(p) = peer {
            self.neighbour(link, p);
        }
        self.flush_overruns();
        link
    }

    /// The parent's side of a fork: a link to `child`, whose router was made from this
    /// router's copy by [`forked_child`](Self::forked_child) and therefore already knows
    /// this node and its whole routing table, so neither is sent. The child's route — and
    /// its `names`, when the fork gave it some — are usable at once and announced to the
    /// rest of the tree.
    pub fn handle_fork(&mut self, _now: Timestamp, child: NodeId, names: &[String]) -> LinkId {
        let link = self.open_link(Some(child));
        if self.table.add_neighbour(child, link) == Applied::Refused {
            self.stats.routes_refused += 1;
        }
        self.table.name_bare(&child, names);
        if let Some(info) = self.table.info_of(&child) {
            let update = RouteUpdate {
                upsert: vec![info],
                remove: Vec::new(),
            };
            self.flood_routes(&update, Some(link));
        }
        self.flush_overruns();
        link
    }

    /// The child's side of a fork, called on the child's copy of its parent's router: a
    /// fresh router for `me`, holding `names` from the start, with one link, to the parent,
    /// that knows every node, name and group the parent knew when it forked (so the child's
    /// first sends have routes). Pair it with [`handle_fork`](Self::handle_fork) in the
    /// parent, with the same names. Nothing of the parent's queues, links, receipts or seen
    /// windows is carried over.
    pub fn forked_child(
        &self,
        now: Timestamp,
        me: NodeId,
        names: &[String],
        config: RouterConfig,
    ) -> Result<(Self, LinkId), Error> {
        let mut child = Self::new(me, config)?;
        for name in names {
            child.register_name(name)?;
        }
        let parent = self.me;
        let link = child.handle_link_up(now, Some(parent));
        if let Some(l) = child.links.get_mut(link.index()) {
            // The parent's hello is implied by the fork itself.
            l.hello = true;
        }
        let known = self.table.dump(None);
        for info in &known.upsert {
            if info.node != me && child.table.upsert(info, link) == Applied::Refused {
                child.stats.routes_refused += 1;
            }
        }
        Ok((child, link))
    }

    fn open_link(&mut self, peer: Option<NodeId>) -> LinkId {
        let entry = self.links.vacant_entry();
        let index = entry.key();
        if self.generations.len() <= index {
            self.generations.resize(index + 1, 0);
        }
        let generation = self.generations[index];
        entry.insert(Link::new(generation, peer, self.config.max_frame));
        let link = Self::link_id(index, generation);
        tracing::debug!(link = %link, me = %self.me, peer = ?peer, "link up");
        link
    }

    /// Queues this node's hello and its routing table for a new neighbour.
    fn greet(&mut self, link: LinkId) {
        self.push_frame(
            link,
            &Frame::Hello(Hello {
                version: WIRE_VERSION,
                node: self.me,
            }),
        );
        let dump = self.table.dump(Some(link));
        self.push_frame(link, &Frame::Routes(dump));
    }

    /// Bytes arrived on a link, split anywhere. On a protocol error the link is closed here
    /// (its [`Event::LinkDown`] is queued) and the error returned: close the socket.
    pub fn handle_input(
        &mut self,
        now: Timestamp,
        link: LinkId,
        bytes: &[u8],
    ) -> Result<(), Error> {
        let idx = self.check(link)?;
        self.stats.bytes_in += bytes.len() as u64;
        let mut deframer = std::mem::replace(&mut self.links[idx].deframer, Deframer::new(0));
        let result = deframer.feed(bytes, |kind, body| self.on_frame(now, link, kind, body));
        match result {
            Ok(()) => {
                if let Some(l) = self.links.get_mut(idx) {
                    l.deframer = deframer;
                    if l.rx_next - l.rx_acked >= self.config.ack_every {
                        l.write_ack();
                        self.mark_dirty(link);
                    } else if l.rx_next > l.rx_acked && l.ack_deadline.is_none() {
                        l.ack_deadline = Some(now + self.config.ack_delay);
                    }
                }
                self.flush_overruns();
                Ok(())
            }
            Err(e) => {
                tracing::warn!(link = %link, error = %e, "closing link: protocol error");
                self.stats.protocol_errors += 1;
                self.teardown(link, DownCause::Protocol(e.clone()));
                self.flush_overruns();
                Err(Error::Protocol(e))
            }
        }
    }

    /// The caller saw the link end (end of file, a socket error, the peer reaped).
    pub fn handle_link_down(&mut self, _now: Timestamp, link: LinkId) -> Result<(), Error> {
        self.check(link)?;
        self.teardown(link, DownCause::Closed);
        self.flush_overruns();
        Ok(())
    }

    /// Closes a link from this side; its queued envelopes are reported lost.
    pub fn close_link(&mut self, _now: Timestamp, link: LinkId) -> Result<(), Error> {
        self.check(link)?;
        self.teardown(link, DownCause::Local);
        self.flush_overruns();
        Ok(())
    }

    /// Time passed: sends due acknowledgements and reports receipts that timed out.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let mut due = Vec::new();
        for (i, l) in self.links.iter_mut() {
            if l.ack_deadline.is_some_and(|d| d <= now) {
                l.write_ack();
                due.push(Self::link_id(i, l.generation));
            }
        }
        for link in due {
            self.mark_dirty(link);
        }
        while let Some(&(at, seq)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if self.receipts.remove(&seq).is_some() {
                self.stats.lost.count(LossReason::Timeout);
                self.events.push_back(Event::Lost(LossReport {
                    id: MessageId {
                        origin: self.me,
                        seq,
                    },
                    reason: LossReason::Timeout,
                    at: self.me,
                }));
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Inputs: the application

    /// Sends `payload` to `to`. Returns the envelope's id; its fate comes as events:
    /// [`Event::Sent`] once written on every link, and for a receipt exactly one of
    /// [`Event::Delivered`] and [`Event::Lost`]. An envelope with no route is accepted and
    /// reported lost ([`LossReason::NoRoute`]).
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
        let to = to.into();
        match self.try_submit(now, &to, payload, options) {
            Ok(id) => {
                self.flush_overruns();
                Ok(id)
            }
            Err(refused) => Err(refused),
        }
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
        if let Address::To(Destination::Name(s) | Destination::Group(s)) = to {
            if let Err(e) = self.check_name(s) {
                return refuse(e, payload);
            }
        }
        if options.receipt && self.receipts.len() >= self.config.max_pending_receipts {
            let max = self.config.max_pending_receipts;
            return refuse(Error::TooManyPendingReceipts { max }, payload);
        }
        let (destination, resolved) = match to {
            Address::Pid(p) => match self.table.resolve_pid(self.me.host, *p) {
                Some(n) => (Destination::Node(n), true),
                None => (Destination::Node(NodeId::new(self.me.host, *p, 0)), false),
            },
            Address::To(d) => (d.clone(), true),
        };
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
            Plan {
                deliver: false,
                targets: Targets::None,
                unroutable: true,
                flooded: false,
            }
        };
        for &link in plan.targets.as_slice() {
            let Some(l) = self.links.get_mut(link.index()) else {
                continue;
            };
            if !l.has_room(len, &self.config, false) {
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
            || (targets.is_empty() && !plan.deliver && !self.is_broadcast(&env))
        {
            Some(LossReason::NoRoute)
        } else if !targets.is_empty() && env.hop_limit == 0 {
            Some(LossReason::HopLimit)
        } else {
            None
        };
        if let Some(reason) = lost_here {
            // The first and only outcome of this envelope: nothing is pending for it.
            self.stats.lost.count(reason);
            self.events.push_back(Event::Lost(LossReport {
                id,
                reason,
                at: self.me,
            }));
            return Ok(id);
        }
        if options.receipt {
            let dest = match &env.destination {
                Destination::Node(n) => Some(*n),
                Destination::Name(s) => self.table.resolve_name(s),
                _ => None,
            };
            if plan.deliver {
                self.events.push_back(Event::Delivered(id));
            } else {
                let deadline = self.config.receipt_timeout.map(|t| now + t);
                if let Some(d) = deadline {
                    self.deadlines.insert((d, id.seq));
                }
                self.receipts
                    .insert(id.seq, PendingReceipt { dest, deadline });
            }
        }
        if plan.deliver {
            self.stats.delivered += 1;
            self.events.push_back(Event::Message {
                envelope: env.clone(),
                link: None,
            });
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
            self.enqueue(link, &queued);
        }
        Ok(id)
    }

    /// Registers a name for this node (announced to the whole tree).
    pub fn register_name(&mut self, name: &str) -> Result<(), Error> {
        self.check_name(name)?;
        if self.table.add_my_name(name) {
            self.announce_me();
        }
        Ok(())
    }

    /// Gives up a name of this node.
    pub fn unregister_name(&mut self, name: &str) -> Result<(), Error> {
        if self.table.remove_my_name(name) {
            self.announce_me();
        }
        Ok(())
    }

    /// Joins a group (announced to the whole tree).
    pub fn join_group(&mut self, group: &str) -> Result<(), Error> {
        self.check_name(group)?;
        if self.table.join_group(group) {
            self.announce_me();
        }
        Ok(())
    }

    /// Leaves a group.
    pub fn leave_group(&mut self, group: &str) -> Result<(), Error> {
        if self.table.leave_group(group) {
            self.announce_me();
        }
        Ok(())
    }

    /// Queues a link-level control frame for the neighbour (not routed, not accounted).
    pub fn send_control(&mut self, link: LinkId, code: u32, data: Vec<u8>) -> Result<(), Error> {
        self.check(link)?;
        if data.len() + 32 > self.config.max_frame as usize {
            let max = self.config.max_frame as usize;
            return Err(Error::PayloadTooLarge {
                len: data.len(),
                max,
            });
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
            done.push(f.queued.clone());
        }
        if l.tx_head == l.tx.len() {
            l.tx.clear();
            l.tx_head = 0;
            l.ack_at = None;
        } else if l.tx_head >= 1 << 16 && l.tx_head * 2 >= l.tx.len() {
            l.tx.drain(..l.tx_head);
            l.ack_at = l.ack_at.and_then(|at| at.checked_sub(l.tx_head));
            l.tx_head = 0;
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
        let acks = self.links.iter().filter_map(|(_, l)| l.ack_deadline).min();
        let receipts = self.deadlines.first().map(|(t, _)| *t);
        match (acks, receipts) {
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
            Frame::Routes(update) => {
                self.on_routes(link, update);
                Ok(())
            }
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
        l.peer = Some(h.node);
        l.hello = true;
        self.neighbour(link, h.node);
        self.events.push_back(Event::LinkUp { link, peer: h.node });
        Ok(())
    }

    fn neighbour(&mut self, link: LinkId, peer: NodeId) {
        match self.table.add_neighbour(peer, link) {
            Applied::Changed => {
                // Announce what is known of it (bare when new: its own routes follow).
                if let Some(info) = self.table.info_of(&peer) {
                    let update = RouteUpdate {
                        upsert: vec![info],
                        remove: Vec::new(),
                    };
                    self.flood_routes(&update, Some(link));
                }
            }
            Applied::Refused => self.stats.routes_refused += 1,
            Applied::Unchanged => {}
        }
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
                l.inflight_bytes -= usize::try_from(f.end - f.start).unwrap_or(0);
            }
            l.acked += 1;
        }
        if l.refused && l.below_low_water(&self.config) {
            l.refused = false;
            self.events.push_back(Event::LinkReady(link));
        }
        Ok(())
    }

    fn on_routes(&mut self, link: LinkId, update: RouteUpdate) {
        let mut forward = RouteUpdate::default();
        for info in update.upsert {
            match self.table.upsert(&info, link) {
                Applied::Changed => forward.upsert.push(info),
                Applied::Refused => self.stats.routes_refused += 1,
                Applied::Unchanged => {}
            }
        }
        for node in update.remove {
            if self.table.remove_via(&node, link) {
                self.node_gone(node);
                forward.remove.push(node);
            }
        }
        if !forward.is_empty() {
            self.flood_routes(&forward, Some(link));
        }
    }

    fn on_envelope(
        &mut self,
        now: Timestamp,
        link: LinkId,
        link_seq: u64,
        mut env: Envelope,
    ) -> Result<(), ProtocolError> {
        let Some(l) = self.links.get_mut(link.index()) else {
            return Ok(());
        };
        if link_seq < l.rx_next {
            self.stats.link_duplicates += 1;
            return Ok(());
        }
        if link_seq > l.rx_next {
            return Err(ProtocolError::SequenceGap {
                expected: l.rx_next,
                got: link_seq,
            });
        }
        l.rx_next += 1;
        let origin = env.id.origin;
        if origin == self.me || !self.seen.insert(env.id) {
            self.stats.duplicates += 1;
            tracing::trace!(origin = %origin, seq = env.id.seq, link = %link, "duplicate dropped");
            return Ok(());
        }
        // Learn from the first copy only: a duplicate took the longer way round.
        if origin != self.me && self.table.learn(origin, link) == Applied::Refused {
            self.stats.routes_refused += 1;
        }
        if env.flags.contains(Flags::TRACE) {
            env.trace.push(Hop {
                node: self.me,
                link: Some(link.index),
                at: now,
            });
            tracing::debug!(
                origin = %origin, seq = env.id.seq, dst = %env.destination, hops = env.hops,
                link = %link, "traced hop"
            );
        }
        tracing::trace!(
            origin = %origin, seq = env.id.seq, dst = %env.destination, hops = env.hops,
            link = %link, "hop"
        );
        self.dispatch(env, link);
        Ok(())
    }

    /// Routes an envelope that came in on `from`.
    fn dispatch(&mut self, mut env: Envelope, from: LinkId) {
        let plan = self.plan(&env.destination, Some(from));
        if plan.unroutable {
            self.lose(&env, LossReason::NoRoute);
            return;
        }
        let targets = plan.targets.as_slice();
        if plan.deliver {
            if targets.is_empty() {
                self.deliver(env, from);
                return;
            }
            self.deliver(env.clone(), from);
        }
        if targets.is_empty() {
            if plan.flooded {
                self.stats.flood_dead_ends += 1;
            }
            return;
        }
        let limit = match (plan.flooded, self.config.no_route) {
            (true, NoRoutePolicy::Flood { hop_limit }) => hop_limit.min(env.hop_limit),
            _ => env.hop_limit,
        };
        if env.hops >= limit {
            self.lose(&env, LossReason::HopLimit);
            return;
        }
        env.hops += 1;
        let queued = Queued::new(env, false, targets.len());
        if queued.max_len - 4 > self.config.max_frame as usize {
            // Grown past the frame limit on its way (a trace from a sender that did not
            // reserve room): the next hop would refuse the frame and close the link.
            self.lose(&queued.env, LossReason::TooLarge);
            return;
        }
        self.stats.forwarded += 1;
        for &link in plan.targets.as_slice() {
            if !self.enqueue(link, &queued) {
                self.lose(&queued.env, LossReason::QueueFull);
            }
        }
    }

    fn deliver(&mut self, env: Envelope, from: LinkId) {
        if env.flags.contains(Flags::SYSTEM) {
            self.on_notice(&env);
            return;
        }
        self.stats.delivered += 1;
        if env.flags.contains(Flags::RECEIPT) && env.destination.is_unicast() {
            let notice = Notice::Delivered { seq: env.id.seq };
            self.send_notice(env.id.origin, notice);
        }
        self.events.push_back(Event::Message {
            envelope: env,
            link: Some(from),
        });
    }

    fn on_notice(&mut self, env: &Envelope) {
        if env.destination != Destination::Node(self.me) {
            self.stats.notices_dropped += 1;
            return;
        }
        match Notice::decode(&env.payload) {
            Ok(Notice::Delivered { seq }) => {
                if let Some(p) = self.receipts.remove(&seq) {
                    if let Some(d) = p.deadline {
                        self.deadlines.remove(&(d, seq));
                    }
                    self.events.push_back(Event::Delivered(MessageId {
                        origin: self.me,
                        seq,
                    }));
                }
            }
            Ok(Notice::Lost {
                seq,
                reason,
                receipt,
            }) => match LossReason::from_code(reason) {
                Some(reason) if seq < self.next_seq => {
                    let id = MessageId {
                        origin: self.me,
                        seq,
                    };
                    self.origin_lost(id, reason, env.id.origin, receipt);
                }
                _ => self.stats.notices_dropped += 1,
            },
            Err(_) => self.stats.notices_dropped += 1,
        }
    }

    // -----------------------------------------------------------------------------------
    // Routing decisions

    fn is_broadcast(&self, env: &Envelope) -> bool {
        env.destination == Destination::Broadcast
    }

    fn plan(&self, dst: &Destination, from: Option<LinkId>) -> Plan {
        let only = |deliver, targets| Plan {
            deliver,
            targets,
            unroutable: false,
            flooded: false,
        };
        match dst {
            Destination::Node(n) if *n == self.me => only(true, Targets::None),
            Destination::Node(n) => self.unicast_plan(n, from),
            Destination::Name(s) if self.table.has_name(s) => only(true, Targets::None),
            Destination::Name(s) => match self.table.resolve_name(s) {
                Some(n) => self.unicast_plan(&n, from),
                None => self.no_route_plan(from),
            },
            Destination::Group(g) => only(
                self.table.is_member(g),
                Targets::Many(self.table.group_links(g, from)),
            ),
            Destination::Broadcast => only(from.is_some(), Targets::Many(self.other_links(from))),
        }
    }

    fn unicast_plan(&self, node: &NodeId, from: Option<LinkId>) -> Plan {
        match self.table.route(node) {
            // Sending it back where it came from would meet a seen window: no route.
            Some(l) if Some(l) != from => Plan {
                deliver: false,
                targets: Targets::One(l),
                unroutable: false,
                flooded: false,
            },
            _ => self.no_route_plan(from),
        }
    }

    fn no_route_plan(&self, from: Option<LinkId>) -> Plan {
        match self.config.no_route {
            NoRoutePolicy::Report => Plan {
                deliver: false,
                targets: Targets::None,
                unroutable: true,
                flooded: false,
            },
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

    // -----------------------------------------------------------------------------------
    // Losses and notices

    /// An envelope is lost here: count it and tell its origin.
    fn lose(&mut self, env: &Envelope, reason: LossReason) {
        tracing::debug!(
            origin = %env.id.origin, seq = env.id.seq, dst = %env.destination, %reason, "lost"
        );
        if env.flags.contains(Flags::SYSTEM) {
            self.stats.notices_dropped += 1;
            return;
        }
        self.stats.lost.count(reason);
        let receipt = env.flags.contains(Flags::RECEIPT);
        if env.id.origin == self.me {
            self.origin_lost(env.id, reason, self.me, receipt);
        } else {
            let notice = Notice::Lost {
                seq: env.id.seq,
                reason: reason.code(),
                receipt,
            };
            self.send_notice(env.id.origin, notice);
        }
    }

    /// An envelope of this node's was lost at `at`. With a receipt, only the first outcome
    /// counts: a loss of an envelope no longer pending was resolved already.
    fn origin_lost(&mut self, id: MessageId, reason: LossReason, at: NodeId, receipt: bool) {
        if receipt {
            let Some(p) = self.receipts.remove(&id.seq) else {
                return;
            };
            if let Some(d) = p.deadline {
                self.deadlines.remove(&(d, id.seq));
            }
        }
        self.events
            .push_back(Event::Lost(LossReport { id, reason, at }));
    }

    fn send_notice(&mut self, to: NodeId, notice: Notice) {
        let env = Envelope {
            id: MessageId {
                origin: self.me,
                seq: self.next_seq,
            },
            destination: Destination::Node(to),
            hops: 0,
            hop_limit: self.config.hop_limit,
            flags: Flags::SYSTEM,
            trace: Vec::new(),
            payload: notice.encode(),
        };
        let plan = self.plan(&env.destination, None);
        let targets = plan.targets.as_slice();
        if plan.unroutable || targets.is_empty() {
            self.stats.notices_dropped += 1;
            return;
        }
        self.next_seq += 1;
        let mut env = env;
        env.hops = 1;
        let queued = Queued::new(env, false, targets.len());
        let mut sent = false;
        for &link in plan.targets.as_slice() {
            sent |= self.enqueue(link, &queued);
        }
        if sent {
            self.stats.notices_sent += 1;
        } else {
            self.stats.notices_dropped += 1;
        }
    }

    /// A node left the tree: forget its window, fail receipts waiting on it.
    fn node_gone(&mut self, node: NodeId) {
        self.seen.forget(&node);
        self.events.push_back(Event::NodeDown(node));
        let mut waiting: Vec<u64> = self
            .receipts
            .iter()
            .filter(|(_, p)| p.dest == Some(node))
            .map(|(seq, _)| *seq)
            .collect();
        waiting.sort_unstable();
        for seq in waiting {
            let id = MessageId {
                origin: self.me,
                seq,
            };
            self.stats.lost.count(LossReason::DestinationDown);
            self.origin_lost(id, LossReason::DestinationDown, self.me, true);
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

    fn mark_dirty(&mut self, link: LinkId) {
        if let Some(l) = self.links.get_mut(link.index()) {
            if !l.dirty && l.pending() > 0 {
                l.dirty = true;
                self.dirty.push_back(link);
            }
        }
    }

    /// Queues an envelope frame on a link; `false` when the link is full (or gone).
    fn enqueue(&mut self, link: LinkId, queued: &Rc<Queued>) -> bool {
        let Some(l) = self.links.get_mut(link.index()) else {
            return false;
        };
        let notice = queued.env.flags.contains(Flags::SYSTEM);
        if !l.has_room(queued.max_len, &self.config, notice) {
            return false;
        }
        l.piggyback_ack();
        let start = l.stream_end();
        let n = encode_envelope(&mut l.tx, l.next_seq, &queued.env);
        l.next_seq += 1;
        l.inflight.push_back(InFlight {
            start,
            end: start + n as u64,
            queued: queued.clone(),
        });
        l.inflight_bytes += n;
        tracing::trace!(
            origin = %queued.env.id.origin, seq = queued.env.id.seq,
            dst = %queued.env.destination, hops = queued.env.hops, link = %link, "queued"
        );
        self.mark_dirty(link);
        true
    }

    /// Queues a frame outside link accounting (hello, routes, control).
    fn push_frame(&mut self, link: LinkId, frame: &Frame) {
        let mut buf = Vec::new();
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

    fn flood_routes(&mut self, update: &RouteUpdate, except: Option<LinkId>) {
        let mut buf = Vec::new();
        encode_frame(&mut buf, &Frame::Routes(update.clone()));
        for link in self.other_links(except) {
            self.push_bytes(link, &buf);
        }
    }

    fn announce_me(&mut self) {
        let update = RouteUpdate {
            upsert: vec![self.table.me_info()],
            remove: Vec::new(),
        };
        self.flood_routes(&update, None);
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

    /// Closes links whose peers stopped reading while control output piled up.
    fn flush_overruns(&mut self) {
        while let Some(link) = self.overrun.pop() {
            if self.check(link).is_ok() {
                tracing::warn!(link = %link, "closing link: peer does not read");
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
        let l = self.links.remove(idx);
        self.generations[idx] = self.generations[idx].wrapping_add(1);
        let mut lost = Vec::with_capacity(l.inflight.len());
        for f in l.inflight {
            let state = if l.tx_written >= f.end {
                WriteState::Unacknowledged
            } else if l.tx_written > f.start {
                WriteState::PartiallyWritten
            } else {
                WriteState::NeverWritten
            };
            f.queued.lost.set(true);
            let envelope = match Rc::try_unwrap(f.queued) {
                Ok(q) => q.env,
                Err(shared) => shared.env.clone(),
            };
            lost.push(LostEnvelope {
                envelope,
                reason: LossReason::PeerDown(state),
            });
        }
        tracing::debug!(link = %link, peer = ?l.peer, cause = ?cause, lost = lost.len(), "link down");
        let accounting: Vec<(Envelope, LossReason)> = lost
            .iter()
            .map(|x| (header_only(&x.envelope), x.reason))
            .collect();
        self.events.push_back(Event::LinkDown(LinkDown {
            link,
            peer: l.peer,
            cause,
            lost,
        }));
        for (env, reason) in accounting {
            self.lose(&env, reason);
        }
        let gone = self.table.remove_link(link);
        for node in &gone {
            self.node_gone(*node);
        }
        if !gone.is_empty() {
            let update = RouteUpdate {
                upsert: Vec::new(),
                remove: gone,
            };
            self.flood_routes(&update, None);
        }
    }
}

/// An envelope's header without its payload and trace, for loss accounting.
fn header_only(env: &Envelope) -> Envelope {
    Envelope {
        id: env.id,
        destination: env.destination.clone(),
        hops: env.hops,
        hop_limit: env.hop_limit,
        flags: env.flags,
        trace: Vec::new(),
        payload: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_stream;

    fn node(pid: u32) -> NodeId {
        NodeId::new(0, pid, 1)
    }

    fn t(nanos: u64) -> Timestamp {
        Timestamp::from_nanos(nanos)
    }

    /// Two routers joined by one link; returns them and their link ids.
    fn pair() -> (Router, Router, LinkId, LinkId) {
        let mut a = Router::new(node(1), RouterConfig::default()).expect("valid");
        let mut b = Router::new(node(2), RouterConfig::default()).expect("valid");
        let la = a.handle_link_up(t(0), Some(node(2)));
        let lb = b.handle_link_up(t(0), Some(node(1)));
        let mut r = (a, b, la, lb);
        pump(&mut r);
        r
    }

    /// Moves all bytes both ways once; returns the frames that went a → b and b → a.
    fn pump(r: &mut (Router, Router, LinkId, LinkId)) -> (Vec<Frame>, Vec<Frame>) {
        let (a, b, la, lb) = r;
        let ab = a.pending_output(*la).expect("open").to_vec();
        a.advance_output(*la, ab.len()).expect("open");
        b.handle_input(t(1), *lb, &ab).expect("valid");
        let ba = b.pending_output(*lb).expect("open").to_vec();
        b.advance_output(*lb, ba.len()).expect("open");
        a.handle_input(t(1), *la, &ba).expect("valid");
        let limits = DecodeLimits::default();
        (
            decode_stream(&ab, limits).expect("valid"),
            decode_stream(&ba, limits).expect("valid"),
        )
    }

    #[test]
    fn a_reply_carries_the_acknowledgement() {
        let mut r = pair();
        r.0.submit(t(2), node(2), vec![1], SendOptions::default())
            .expect("room");
        let ab = r.0.pending_output(r.2).expect("open").to_vec();
        r.0.advance_output(r.2, ab.len()).expect("open");
        r.1.handle_input(t(3), r.3, &ab).expect("valid");
        // Nothing to say back yet: the acknowledgement waits for a ride or the timer.
        assert!(r.1.pending_output(r.3).expect("open").is_empty());
        assert_eq!(
            r.1.poll_timeout(),
            Some(t(3) + RouterConfig::default().ack_delay)
        );
        r.1.submit(t(4), node(1), vec![2], SendOptions::default())
            .expect("room");
        let ba = decode_stream(
            r.1.pending_output(r.3).expect("open"),
            DecodeLimits::default(),
        )
        .expect("valid");
        assert!(matches!(
            ba.as_slice(),
            [Frame::Ack(1), Frame::Envelope { .. }]
        ));
        assert_eq!(r.1.poll_timeout(), None, "the timer is off once acked");
    }

    #[test]
    fn the_ack_timer_sends_a_lone_acknowledgement() {
        let mut r = pair();
        r.0.submit(t(2), node(2), vec![1], SendOptions::default())
            .expect("room");
        let ab = r.0.pending_output(r.2).expect("open").to_vec();
        r.0.advance_output(r.2, ab.len()).expect("open");
        r.1.handle_input(t(3), r.3, &ab).expect("valid");
        let due = r.1.poll_timeout().expect("ack timer");
        r.1.handle_timeout(due);
        assert_eq!(r.1.poll_transmit(), Some(r.3));
        let ba = r.1.pending_output(r.3).expect("open").to_vec();
        assert_eq!(
            decode_stream(&ba, DecodeLimits::default()),
            Ok(vec![Frame::Ack(1)])
        );
        r.0.handle_input(t(4), r.2, &ba).expect("valid");
        assert_eq!(r.0.link_stats(r.2).map(|s| s.in_flight), Ok(0));
        assert!(r.0.is_idle());
    }

    #[test]
    fn a_queued_acknowledgement_is_raised_in_place() {
        let mut r = pair();
        r.1.config = RouterConfig {
            ack_every: 1,
            ..RouterConfig::default()
        };
        for k in 0..3u8 {
            r.0.submit(t(2), node(2), vec![k], SendOptions::default())
                .expect("room");
            let ab = r.0.pending_output(r.2).expect("open").to_vec();
            r.0.advance_output(r.2, ab.len()).expect("open");
            r.1.handle_input(t(3), r.3, &ab).expect("valid");
        }
        // B never wrote: one acknowledgement frame, counting all three.
        let ba = r.1.pending_output(r.3).expect("open");
        assert_eq!(
            decode_stream(ba, DecodeLimits::default()),
            Ok(vec![Frame::Ack(3)])
        );
    }

    #[test]
    fn sent_comes_once_every_byte_is_written() {
        let mut r = pair();
        let id =
            r.0.submit(t(2), node(2), vec![7; 100], SendOptions::default())
                .expect("room");
        let n = r.0.pending_output(r.2).expect("open").len();
        r.0.advance_output(r.2, n - 1).expect("open");
        assert!(std::iter::from_fn(|| r.0.poll_event()).all(|e| e != Event::Sent(id)));
        r.0.advance_output(r.2, 1).expect("open");
        assert_eq!(r.0.poll_event(), Some(Event::Sent(id)));
    }

    #[test]
    fn a_dead_link_id_stays_dead_when_its_slot_is_reused() {
        let (mut a, _, la, _) = pair();
        a.handle_link_down(t(5), la).expect("open");
        let again = a.handle_link_up(t(6), Some(node(3)));
        assert_eq!(again.index(), la.index(), "the slot is reused");
        assert_ne!(again, la);
        assert_eq!(a.handle_input(t(7), la, b"x"), Err(Error::UnknownLink(la)));
        assert!(a.pending_output(again).is_ok());
    }

    #[test]
    fn a_forked_childs_name_is_known_at_once_and_kept() {
        let mut p = Router::new(node(1), RouterConfig::default()).expect("valid");
        let names = vec!["worker".to_string()];
        let (c, lc) = p
            .forked_child(t(0), node(2), &names, RouterConfig::default())
            .expect("valid");
        let lp = p.handle_fork(t(0), node(2), &names);
        let by_name = Address::from(Destination::Name("worker".into()));
        assert_eq!(p.resolve(&by_name), Some(node(2)), "before a byte moved");
        assert_eq!(c.resolve(&Address::Pid(1)), Some(node(1)));
        // The child's own announcement (a newer version) keeps the name.
        let mut r = (p, c, lp, lc);
        pump(&mut r);
        pump(&mut r);
        assert_eq!(r.0.resolve(&by_name), Some(node(2)));
    }

    #[test]
    fn a_receipt_to_oneself_is_delivered_at_once() {
        let mut a = Router::new(node(1), RouterConfig::default()).expect("valid");
        a.register_name("me").expect("valid");
        let id = a
            .submit(
                t(1),
                Destination::Name("me".into()),
                vec![1],
                SendOptions {
                    receipt: true,
                    ..SendOptions::default()
                },
            )
            .expect("accepted");
        let events: Vec<Event> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(events.contains(&Event::Delivered(id)));
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Message { link: None, .. })));
        assert_eq!(a.pending_receipts(), 0);
    }

    #[test]
    fn refusals_hand_the_payload_back() {
        let mut a = Router::new(node(1), RouterConfig::default()).expect("valid");
        let r = a
            .submit(
                t(1),
                Destination::Broadcast,
                vec![9; 3],
                SendOptions {
                    receipt: true,
                    ..SendOptions::default()
                },
            )
            .expect_err("receipts need unicast");
        assert_eq!(r.error, Error::ReceiptNeedsUnicast);
        assert_eq!(r.payload, vec![9; 3]);
        let big = vec![0; a.config().max_frame as usize];
        let r = a
            .submit(t(1), node(2), big, SendOptions::default())
            .expect_err("too large");
        assert!(matches!(r.error, Error::PayloadTooLarge { .. }));
        assert!(a.register_name("").is_err());
        assert!(a.join_group(&"x".repeat(1000)).is_err());
    }
}
