//! A router with a few links, one of them fed whatever the fuzzer likes.
//!
//! The router (node `ME`) has four links:
//!
//! ```text
//!   A  child PEER_A, said hello properly      ┐ one of A, C, D is the target: it gets the
//!   B  parent PEER_B, said hello, a good peer │ fuzzer's bytes (raw chunks, and well-formed
//!   C  child PEER_C declared, no hello yet    │ envelope / notice / ack / routes frames
//!   D  a peer link, nobody declared, no hello ┘ built from fuzzer fields, so the state gets
//!                                               deep: announcements, deltas, forged origins)
//! ```
//!
//! Between chunks the fuzzer submits envelopes (so lost lists are not empty), drains the
//! target's output in part, and moves time. Every other link is drained and acknowledged
//! like a healthy peer would.
//!
//! Checked: nothing panics; an `Err` from `handle_input` is a protocol error, that link is
//! gone, every other link is still open, and exactly one `LinkDown` with the same
//! `DownCause::Protocol` was emitted for it, whose lost list is in link order; no other link
//! goes down; the application only sees envelopes meant for it, and never one in the name
//! of a node that does not live behind the link it came on; the table stays within its
//! bounds; and, once every link is closed and time has run past every deadline, every
//! envelope sent with a receipt has had exactly one outcome.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use forkbus_router::wire::{
    decode_frame, encode_envelope, encode_frame, DecodeLimits, Deframer, Frame, Hello, NodeDelta,
    NodeInfo, Notice, NoticeKind, RouteUpdate, WIRE_VERSION,
};
use forkbus_router::{
    Address, Destination, DownCause, Envelope, Error, Event, Fate, Flags, Hop, LinkDown, LinkId,
    LinkRole, LossReason, MessageId, NoRoutePolicy, NodeId, ProtocolError, Router, RouterConfig,
    SendOptions, Timestamp, UnknownReason,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const ME: NodeId = NodeId::new(0, 1, 1);
const PEER_A: NodeId = NodeId::new(0, 2, 1);
const PEER_B: NodeId = NodeId::new(0, 3, 1);
const PEER_C: NodeId = NodeId::new(0, 4, 1);
const MY_NAME: &str = "me";
const MY_GROUP: &str = "g0";
const NAMES: [&str; 4] = [MY_NAME, "n1", "g0", "a-name-longer-than-sixteen-bytes"];

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    A,
    C,
    D,
}

/// A node the fuzzer can name: the router, its neighbours, or a few nodes behind them.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Who {
    Me,
    A,
    B,
    C,
    Other(u8),
}

impl Who {
    fn node(self) -> NodeId {
        match self {
            Self::Me => ME,
            Self::A => PEER_A,
            Self::B => PEER_B,
            Self::C => PEER_C,
            // A handful of pids, two incarnations each: collisions are the point.
            Self::Other(x) => NodeId::new(0, 10 + u32::from(x % 8), u32::from(x / 8 % 2)),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Dst {
    Node(Who),
    Pid(u8),
    Name(u8),
    NameAt(u8, Who),
    Group(u8),
    Broadcast,
}

impl Dst {
    fn destination(self) -> Destination {
        match self {
            Self::Node(w) => Destination::Node(w.node()),
            Self::Pid(p) => Destination::Node(NodeId::new(0, u32::from(p % 16), 1)),
            Self::Name(i) => Destination::Name(NAMES[usize::from(i) % NAMES.len()].into()),
            Self::NameAt(i, w) => Destination::NameAt {
                name: NAMES[usize::from(i) % NAMES.len()].into(),
                node: w.node(),
            },
            Self::Group(i) => Destination::Group(NAMES[usize::from(i) % NAMES.len()].into()),
            Self::Broadcast => Destination::Broadcast,
        }
    }

    fn address(self) -> Address {
        match self {
            Self::Pid(p) => Address::Pid(u32::from(p % 16)),
            other => Address::To(other.destination()),
        }
    }
}

/// A link sequence number relative to the one the router expects next.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum SeqChoice {
    Next,
    Back(u8),
    Ahead(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    /// Raw bytes to the target link.
    Bytes(Vec<u8>),
    /// A well-formed envelope frame to the target link.
    Envelope {
        link_seq: SeqChoice,
        origin: Who,
        seq: u64,
        dst: Dst,
        hops: u8,
        hop_limit: u8,
        flags: u8,
        payload: Vec<u8>,
        n_trace: u8,
    },
    /// A well-formed notice frame to the target link.
    Notice {
        link_seq: SeqChoice,
        origin: Who,
        seq: u64,
        from: Who,
        hops: u8,
        /// 0: delivered, 1..=10: a fate code + 1, else moved to `to`.
        kind: u8,
        receipt: bool,
        to: Who,
    },
    /// An acknowledgement frame to the target link: `back` below what was sent, or raw.
    Ack { back: u8, raw: Option<u64> },
    /// A route update frame to the target link.
    Routes {
        upsert: Vec<(Who, u8, u8)>,
        remove: Vec<Who>,
        change: Vec<(Who, u8, u8, u8)>,
    },
    /// The hello the target's peer would send (a second one on A is a violation).
    Hello(Who),
    /// The application sends.
    Submit {
        to: Dst,
        len: u8,
        receipt: bool,
        trace: bool,
        hop_limit: Option<u8>,
    },
    /// The target's socket takes this many bytes of its pending output.
    Drain(u16),
    /// Time passes.
    Wait(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    target: Target,
    flood: Option<u8>,
    ops: Vec<Op>,
}

/// The decode limits of [`config`].
const LIMITS: DecodeLimits = DecodeLimits {
    max_frame: 2048,
    max_name: 16,
    max_names_per_node: 3,
};

fn config(flood: Option<u8>) -> RouterConfig {
    let mut c = RouterConfig::default();
    c.max_frame = LIMITS.max_frame;
    c.max_name = LIMITS.max_name;
    c.max_names_per_node = LIMITS.max_names_per_node;
    c.max_names = 12;
    c.max_groups = 12;
    c.max_queue_envelopes = 8;
    c.max_queue_bytes = 4096;
    c.max_nodes = 8;
    c.max_origins = 4;
    c.max_pending_receipts = 4;
    c.hop_limit = 8;
    c.ack_every = 4;
    c.ack_delay = Duration::from_millis(2);
    c.receipt_timeout = Some(Duration::from_secs(1));
    c.no_route = match flood {
        Some(hop_limit) => NoRoutePolicy::Flood { hop_limit },
        None => NoRoutePolicy::Report,
    };
    c
}

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_frame(&mut buf, frame);
    buf
}

/// What the harness knows and checks across one run.
struct Harness {
    router: Router,
    now: Timestamp,
    target: LinkId,
    /// The target link is down (and why).
    target_down: Option<DownCause>,
    /// The other links; none may go down before the end.
    others: Vec<LinkId>,
    /// Local envelopes sent with a receipt, and how many outcomes each has had.
    receipts: BTreeMap<MessageId, u32>,
    /// Local envelopes reported sent.
    sent: BTreeSet<MessageId>,
    /// Every local envelope accepted.
    accepted: BTreeSet<MessageId>,
    /// A copy of the target's deframer, to spot forged loss notices.
    mirror: Deframer,
    /// Receipts that may get a second outcome from a forged loss notice claiming the
    /// envelope had no receipt (outside the trust model: README.md).
    known_forged: BTreeSet<MessageId>,
    closing: bool,
}

impl Harness {
    /// Drains bytes and events, checking every event.
    fn drain(&mut self) -> Vec<Event> {
        while let Some(link) = self.router.poll_transmit() {
            if link != self.target {
                self.flush_healthy(link);
            }
        }
        let mut events = Vec::new();
        while let Some(ev) = self.router.poll_event() {
            self.check_event(&ev);
            events.push(ev);
        }
        events
    }

    /// A healthy peer reads everything and acknowledges what it got.
    fn flush_healthy(&mut self, link: LinkId) {
        let n = self
            .router
            .pending_output(link)
            .expect("poll_transmit names open links")
            .len();
        self.router
            .advance_output(link, n)
            .expect("poll_transmit names open links");
        let stats = self.router.link_stats(link).expect("link is open");
        if stats.peer == Some(PEER_B) && stats.frames_sent > 0 {
            let ack = frame_bytes(&Frame::Ack(stats.frames_sent));
            self.router
                .handle_input(self.now, link, &ack)
                .expect("a healthy peer's acknowledgement is accepted");
        }
    }

    fn check_event(&mut self, ev: &Event) {
        match ev {
            Event::LinkDown(down) => self.check_link_down(down),
            Event::Message { envelope, link } => {
                assert!(
                    !envelope.flags.contains(Flags::HANDED),
                    "a hand-over accepted from a link that is not the parent: {envelope:?}"
                );
                let mine = match &envelope.destination {
                    Destination::Node(n) => *n == ME,
                    Destination::NameAt { node, .. } => *node == ME,
                    Destination::Name(s) => s == MY_NAME,
                    Destination::Group(g) => g == MY_GROUP,
                    Destination::Broadcast => true,
                };
                if link.is_some() {
                    // Never in the name of this node or of a node that lives behind another
                    // link (the target speaks for its own subtree only).
                    let origin = envelope.id.origin;
                    let elsewhere = self
                        .router
                        .routes()
                        .iter()
                        .any(|(n, l)| *n == origin && *l != self.target);
                    assert!(
                        origin != ME && !elsewhere,
                        "delivered in the name of {origin}, which lives elsewhere"
                    );
                }
                assert!(
                    mine,
                    "delivered an envelope not meant for this node: {ev:?}"
                );
                assert!(
                    link.is_none() || *link == Some(self.target),
                    "delivered from a link that was fed nothing: {ev:?}"
                );
            }
            Event::Sent(id) => {
                assert!(self.accepted.contains(id), "Sent for unknown {id}");
                assert!(self.sent.insert(*id), "Sent twice for {id}");
            }
            Event::Delivered(id) => self.outcome(*id, ev),
            Event::Lost(report) if self.receipts.contains_key(&report.id) => {
                self.outcome(report.id, ev);
            }
            _ => {}
        }
    }

    fn outcome(&mut self, id: MessageId, ev: &Event) {
        let n = self
            .receipts
            .get_mut(&id)
            .unwrap_or_else(|| panic!("outcome for an envelope sent without receipt: {ev:?}"));
        *n += 1;
        if self.known_forged.contains(&id) {
            // Outside the trust model: a peer that forges notices can mislead an origin.
            return;
        }
        assert_eq!(*n, 1, "second outcome for {id}: {ev:?}");
    }

    fn check_link_down(&mut self, down: &LinkDown) {
        if down.link == self.target {
            assert!(self.target_down.is_none(), "target went down twice");
            self.target_down = Some(down.cause.clone());
        } else {
            assert!(
                self.closing,
                "a link that was fed nothing went down: {:?}",
                down.cause
            );
        }
        // The lost list is in link order: written whole, at most one written in part, then
        // never written.
        let rank = |f: Fate| match f {
            Fate::Unknown(UnknownReason::Unacknowledged) => 2,
            Fate::Lost(LossReason::PartiallyWritten) => 1,
            Fate::Lost(LossReason::NeverWritten) => 0,
            other => panic!("lost list holds a non-link loss: {other:?}"),
        };
        let mut last = 2;
        let mut partial = 0;
        for lost in &down.lost {
            let r = rank(lost.fate);
            assert!(r <= last, "lost list out of link order");
            last = r;
            partial += usize::from(r == 1);
        }
        assert!(partial <= 1, "{partial} frames written in part");
    }

    /// Notes the ids named by loss notices that claim "no receipt": a peer forging notices
    /// can give an envelope a second outcome, which the router's trust model allows (the
    /// nodes of a tree are trusted to tell the truth; see the router's crate docs).
    fn note_forged(&mut self, bytes: &[u8]) {
        let forged = &mut self.known_forged;
        // After an error the router closes the link, so the mirror is never needed again.
        let _ = self.mirror.feed(bytes, |kind, body| {
            if let Frame::Notice {
                notice:
                    Notice {
                        origin,
                        seq,
                        kind: NoticeKind::Lost { receipt: false, .. },
                        ..
                    },
                ..
            } = decode_frame(kind, body, LIMITS)?
            {
                if origin == ME {
                    forged.insert(MessageId { origin: ME, seq });
                }
            }
            Ok::<_, ProtocolError>(())
        });
    }

    fn feed(&mut self, bytes: &[u8]) {
        if self.target_down.is_some() {
            return;
        }
        self.note_forged(bytes);
        let result = self.router.handle_input(self.now, self.target, bytes);
        let events = self.drain();
        let open = self.router.links();
        for l in &self.others {
            assert!(open.contains(l), "link {l} closed by bytes on another link");
        }
        let config = self.router.config();
        assert!(self.router.routes().len() <= config.max_nodes, "table past its bound");
        assert!(self.router.seen_origins() <= config.max_origins);
        match result {
            Ok(()) => {
                if !open.contains(&self.target) {
                    // The only way a link closes without an error: its peer stopped reading.
                    assert_eq!(self.target_down, Some(DownCause::Overrun));
                }
            }
            Err(Error::Protocol(e)) => {
                assert!(!open.contains(&self.target), "link still open after {e}");
                let downs: Vec<_> = events
                    .iter()
                    .filter_map(|ev| match ev {
                        Event::LinkDown(d) if d.link == self.target => Some(&d.cause),
                        _ => None,
                    })
                    .collect();
                assert_eq!(downs, [&DownCause::Protocol(e)], "LinkDown for the error");
            }
            Err(other) => panic!("handle_input on an open link failed with {other}"),
        }
    }

    /// The link sequence number a choice names, relative to what the target expects next;
    /// `None` once the target is closed.
    fn link_seq(&self, choice: SeqChoice) -> Option<u64> {
        let expected = self.router.link_stats(self.target).ok()?.frames_received;
        Some(match choice {
            SeqChoice::Next => expected,
            SeqChoice::Back(n) => expected.saturating_sub(u64::from(n)),
            SeqChoice::Ahead(n) => expected.saturating_add(u64::from(n)),
            SeqChoice::Raw(n) => n,
        })
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Bytes(b) => self.feed(b),
            Op::Envelope {
                link_seq,
                origin,
                seq,
                dst,
                hops,
                hop_limit,
                flags,
                payload,
                n_trace,
            } => {
                let Some(link_seq) = self.link_seq(*link_seq) else {
                    return;
                };
                let flags = Flags::from_bits(flags & 0b111).unwrap_or_default();
                let payload = payload.clone();
                let trace = if flags.contains(Flags::TRACE) {
                    let n = (*n_trace).min(hops.saturating_add(1));
                    (0..n)
                        .map(|i| Hop {
                            node: Who::Other(i).node(),
                            link: (i > 0).then_some(u32::from(i)),
                            at: Timestamp::from_nanos(u64::from(i)),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let env = Envelope {
                    id: MessageId {
                        origin: origin.node(),
                        seq: *seq,
                    },
                    destination: dst.destination(),
                    hops: *hops,
                    hop_limit: *hop_limit,
                    flags,
                    trace,
                    payload,
                };
                let mut buf = Vec::new();
                encode_envelope(&mut buf, link_seq, &env);
                self.feed(&buf);
            }
            Op::Notice {
                link_seq,
                origin,
                seq,
                from,
                hops,
                kind,
                receipt,
                to,
            } => {
                let Some(link_seq) = self.link_seq(*link_seq) else {
                    return;
                };
                let kind = match *kind {
                    0 => NoticeKind::Delivered,
                    k @ 1..=10 => match Fate::from_code(u64::from(k - 1)) {
                        Some(fate) => NoticeKind::Lost {
                            fate,
                            receipt: *receipt,
                        },
                        None => NoticeKind::Delivered,
                    },
                    _ => NoticeKind::Moved(to.node()),
                };
                let frame = Frame::Notice {
                    link_seq,
                    notice: Notice {
                        origin: origin.node(),
                        seq: *seq,
                        from: from.node(),
                        hops: *hops,
                        kind,
                    },
                };
                self.feed(&frame_bytes(&frame));
            }
            Op::Ack { back, raw } => {
                let Ok(stats) = self.router.link_stats(self.target) else {
                    return;
                };
                let n = raw.unwrap_or(stats.frames_sent.saturating_sub(u64::from(*back)));
                self.feed(&frame_bytes(&Frame::Ack(n)));
            }
            Op::Routes {
                upsert,
                remove,
                change,
            } => {
                let name = |i: u8| NAMES[usize::from(i) % NAMES.len()].to_owned();
                let update = RouteUpdate {
                    upsert: upsert
                        .iter()
                        .map(|(who, names, groups)| NodeInfo {
                            node: who.node(),
                            version: u64::from(*names ^ *groups),
                            names: (0..names % 3).map(|i| name(names / 4 + i)).collect(),
                            groups: (0..groups % 3).map(|i| name(groups / 4 + i)).collect(),
                        })
                        .collect(),
                    remove: remove.iter().map(|w| w.node()).collect(),
                    change: change
                        .iter()
                        .map(|(who, version, add, drop)| NodeDelta {
                            node: who.node(),
                            version: u64::from(*version),
                            add_names: (0..add % 4).map(|i| name(add / 4 + i)).collect(),
                            remove_names: (0..drop % 3).map(|i| name(drop / 4 + i)).collect(),
                            join_groups: (0..add % 2).map(|i| name(drop + i)).collect(),
                            leave_groups: (0..drop % 2).map(|i| name(add + i)).collect(),
                        })
                        .collect(),
                };
                self.feed(&frame_bytes(&Frame::Routes(update)));
            }
            Op::Hello(who) => {
                let hello = Frame::Hello(Hello {
                    version: WIRE_VERSION,
                    node: who.node(),
                });
                self.feed(&frame_bytes(&hello));
            }
            Op::Submit {
                to,
                len,
                receipt,
                trace,
                hop_limit,
            } => {
                let options = SendOptions {
                    receipt: *receipt,
                    trace: *trace,
                    hop_limit: *hop_limit,
                };
                let payload = vec![0x5a; usize::from(*len)];
                let address = to.address();
                if let Ok(id) = self.router.submit(self.now, address, payload, options) {
                    assert!(self.accepted.insert(id), "id {id} handed out twice");
                    if *receipt {
                        self.receipts.insert(id, 0);
                    }
                }
                self.drain();
            }
            Op::Drain(n) => {
                if let Ok(pending) = self.router.pending_output(self.target) {
                    let n = usize::from(*n).min(pending.len());
                    self.router
                        .advance_output(self.target, n)
                        .expect("the target is open");
                    self.drain();
                }
            }
            Op::Wait(ms) => {
                self.now = self.now + Duration::from_millis(u64::from(*ms));
                if self.router.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.router.handle_timeout(self.now);
                }
                self.drain();
            }
        }
    }

    /// Closes every link and lets every deadline pass: every receipt has its outcome now.
    fn finish(&mut self) {
        self.closing = true;
        for link in self.router.links() {
            self.router
                .handle_link_down(self.now, link)
                .expect("links() names open links");
            self.drain();
        }
        self.now = self.now + Duration::from_secs(3600);
        self.router.handle_timeout(self.now);
        self.drain();
        for (id, n) in &self.receipts {
            if *n > 1 && self.known_forged.contains(id) {
                continue;
            }
            assert_eq!(*n, 1, "envelope {id} sent with a receipt had {n} outcomes");
        }
        assert_eq!(self.router.pending_receipts(), 0);
        assert!(self.router.is_idle(), "router with no links is not idle");
        assert!(self.router.routes().is_empty(), "routes left after every link closed");
    }
}

fuzz_target!(|input: Input| {
    let Ok(mut router) = Router::new(ME, config(input.flood)) else {
        return;
    };
    router.register_name(MY_NAME).expect("valid name");
    router.join_group(MY_GROUP).expect("valid group");
    let t0 = Timestamp::from_nanos(1_000_000_000);
    let a = router.handle_link_up(t0, Some(PEER_A), LinkRole::Child);
    let b = router.handle_link_up(t0, Some(PEER_B), LinkRole::Parent);
    let c = router.handle_link_up(t0, Some(PEER_C), LinkRole::Child);
    let d = router.handle_link_up(t0, None, LinkRole::Peer);
    for (link, peer) in [(a, PEER_A), (b, PEER_B)] {
        let hello = frame_bytes(&Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: peer,
        }));
        router
            .handle_input(t0, link, &hello)
            .expect("a proper hello is accepted");
    }
    let target = match input.target {
        Target::A => a,
        Target::C => c,
        Target::D => d,
    };
    let mut h = Harness {
        router,
        now: t0,
        target,
        target_down: None,
        others: [a, b, c, d].into_iter().filter(|l| *l != target).collect(),
        receipts: BTreeMap::new(),
        sent: BTreeSet::new(),
        accepted: BTreeSet::new(),
        mirror: Deframer::new(LIMITS.max_frame),
        known_forged: BTreeSet::new(),
        closing: false,
    };
    h.drain();
    for op in &input.ops {
        h.run(op);
    }
    h.finish();
});
