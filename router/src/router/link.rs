//! One link's accounting: the send queue of envelope frames in flight, the byte stream
//! waiting to be written, and the receive side's acknowledgements.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use super::config::RouterConfig;
use crate::id::{LinkId, LinkRole, NodeId, Timestamp};
use crate::wire::{encode_ack_fixed, envelope_frame_len, raise_ack, Deframer, Envelope};

/// An envelope in link accounting, shared by every link it was queued on.
#[derive(Debug)]
pub(super) struct Queued {
    pub(super) env: Envelope,
    /// Its frame's length with the widest link sequence number: computed once, an upper
    /// bound on every link.
    pub(super) max_len: usize,
    /// Originated here (not forwarded).
    pub(super) local: bool,
    /// Links it is queued on and not yet written whole to.
    pub(super) unwritten: Cell<u32>,
    /// Lost on one of its links: no [`Event::Sent`](crate::Event::Sent) for it.
    pub(super) lost: Cell<bool>,
}

impl Queued {
    pub(super) fn new(env: Envelope, local: bool, targets: usize) -> Rc<Self> {
        let max_len = envelope_frame_len(u64::MAX, &env);
        Self::with_len(env, max_len, local, targets)
    }

    /// When the caller computed `envelope_frame_len(u64::MAX, &env)` already.
    pub(super) fn with_len(env: Envelope, max_len: usize, local: bool, targets: usize) -> Rc<Self> {
        Rc::new(Self {
            max_len,
            env,
            local,
            unwritten: Cell::new(u32::try_from(targets).unwrap_or(u32::MAX)),
            lost: Cell::new(false),
        })
    }
}

/// A numbered frame on one link: where it sits in the byte stream, and the envelope (a
/// notice has none: it counts towards no queue bound and is in no lost list).
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) queued: Option<Rc<Queued>>,
}

/// What waits for room on a link, in order.
#[derive(Debug)]
pub(super) enum Parked {
    /// A forwarded envelope, and the incoming frame it holds back (that frame, and every
    /// later one on its link, stays unacknowledged until the envelope is queued: the
    /// sender's queue fills and it slows down).
    Envelope {
        queued: Rc<Queued>,
        /// The incoming link and frame held back.
        hold: (LinkId, u64),
    },
    /// A route update passed on while forwards waited: it must not overtake them (the
    /// removal of a node ahead of that node's last envelopes would make them look late).
    Routes(Vec<u8>),
}

/// One link's two directions.
///
/// ```text
///  send:  ──acked──┬──written, unacked──┬──queued, unwritten──►  next_seq
///                 acked          first_unwritten
///         inflight holds seqs acked..next_seq (envelopes and notices); tx holds the
///         bytes not yet written (those frames and hello, acks, routes, control)
///  recv:  rx_next = frames received;  rx_acked = frames acknowledged to the peer,
///         never past the first frame held back (`holds`) by a forward that waits for
///         room: backpressure, hop by hop
/// ```
#[derive(Debug)]
pub(super) struct Link {
    pub(super) generation: u32,
    pub(super) role: LinkRole,
    pub(super) peer: Option<NodeId>,
    pub(super) hello: bool,
    pub(super) deframer: Deframer,
    pub(super) rx_next: u64,
    pub(super) rx_acked: u64,
    pub(super) ack_deadline: Option<Timestamp>,
    pub(super) tx: Vec<u8>,
    pub(super) tx_head: usize,
    pub(super) tx_written: u64,
    /// Offset in `tx` of the count of an acknowledgement not yet started.
    pub(super) ack_at: Option<usize>,
    pub(super) next_seq: u64,
    pub(super) acked: u64,
    pub(super) first_unwritten: u64,
    pub(super) inflight: VecDeque<InFlight>,
    /// Notices among `inflight`.
    pub(super) inflight_notices: usize,
    /// Bytes of those notices' frames (written or not): like unwritten output, bounded,
    /// so that a peer that reads but never acknowledges cannot make them pile up.
    pub(super) inflight_notice_bytes: usize,
    /// Bytes of the envelope frames among `inflight`.
    pub(super) inflight_bytes: usize,
    pub(super) refused: bool,
    pub(super) dirty: bool,
    /// Forwarded envelopes (and route updates behind them) waiting for room on this link,
    /// in order.
    pub(super) parked: VecDeque<Parked>,
    /// Bytes of the route updates among `parked` (counted with unwritten output against
    /// the overrun bound).
    pub(super) parked_route_bytes: usize,
    /// Incoming frames of this link held back, with how many forwards each waits for.
    pub(super) holds: BTreeMap<u64, u32>,
    /// The incoming frame being dispatched right now (not to be acknowledged by output
    /// written meanwhile, before its forwards found room or were parked).
    pub(super) dispatching: Option<u64>,
    /// Since when output has waited without the peer taking any of it.
    pub(super) tx_stalled_since: Option<Timestamp>,
    /// The peer took some output since the stall clock was last set (it is set again to
    /// the time of the next timeout check: `advance_output` has no clock).
    pub(super) tx_progress: bool,
    /// Since when a frame the peer began has waited for its end.
    pub(super) rx_partial_since: Option<Timestamp>,
}

impl Link {
    pub(super) fn new(
        generation: u32,
        role: LinkRole,
        peer: Option<NodeId>,
        max_frame: u32,
    ) -> Self {
        Self {
            generation,
            role,
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
            inflight_notices: 0,
            inflight_notice_bytes: 0,
            inflight_bytes: 0,
            refused: false,
            dirty: false,
            parked: VecDeque::new(),
            parked_route_bytes: 0,
            holds: BTreeMap::new(),
            dispatching: None,
            tx_stalled_since: None,
            tx_progress: false,
            rx_partial_since: None,
        }
    }

    /// Envelopes queued or unacknowledged.
    pub(super) fn envelopes(&self) -> usize {
        self.inflight.len() - self.inflight_notices
    }

    pub(super) fn pending(&self) -> usize {
        self.tx.len() - self.tx_head
    }

    pub(super) fn stream_end(&self) -> u64 {
        self.tx_written + self.pending() as u64
    }

    /// Whether a forwarded envelope frame may be queued now: nothing waits ahead of it,
    /// and it fits the share of the bounds forwards may use — three quarters, so that
    /// this node's own sends (a ping, a reply) always find room behind a flood passing
    /// through, instead of waiting for the flood to end.
    pub(super) fn takes_forward(&self, frame_len: usize, config: &RouterConfig) -> bool {
        self.parked.is_empty() && self.forward_fits(frame_len, config)
    }

    /// Whether a forwarded frame fits the forwards' share of the bounds.
    pub(super) fn forward_fits(&self, frame_len: usize, config: &RouterConfig) -> bool {
        let share = |x: usize| (x - x / 4).max(1);
        self.envelopes() < share(config.max_queue_envelopes)
            && self.inflight_bytes + frame_len <= share(config.max_queue_bytes)
    }

    /// Whether an envelope frame fits the link's bounds.
    pub(super) fn has_room(&self, frame_len: usize, config: &RouterConfig) -> bool {
        self.envelopes() < config.max_queue_envelopes
            && self.inflight_bytes + frame_len <= config.max_queue_bytes
    }

    /// Whether a local control frame (an announcement, a control message) of `len` bytes
    /// may still be queued: beyond, the peer is slow and the caller should wait.
    pub(super) fn has_control_room(&self, len: usize, config: &RouterConfig) -> bool {
        self.pending() + len <= 2 * config.max_queue_bytes
    }

    /// Whether a link that refused a local send has room for local sends again (a
    /// quarter of the bounds free: hysteresis against a wake-up per acknowledgement).
    pub(super) fn below_low_water(&self, config: &RouterConfig) -> bool {
        let mark = |x: usize| x - x / 4;
        self.envelopes() <= mark(config.max_queue_envelopes)
            && self.inflight_bytes <= mark(config.max_queue_bytes)
    }

    /// What may be acknowledged: everything received, up to the first frame held back.
    pub(super) fn ack_limit(&self) -> u64 {
        let held = self.holds.keys().next().copied().unwrap_or(self.rx_next);
        self.dispatching.map_or(held, |d| d.min(held))
    }

    /// Writes (or raises in place) the acknowledgement of everything received that is not
    /// held back.
    pub(super) fn write_ack(&mut self) {
        self.ack_deadline = None;
        let upto = self.ack_limit();
        if self.rx_acked >= upto {
            return;
        }
        self.rx_acked = upto;
        match self.ack_at {
            Some(at) if at >= self.tx_head + 7 => raise_ack(&mut self.tx, at, upto),
            _ => self.ack_at = Some(encode_ack_fixed(&mut self.tx, upto)),
        }
    }

    /// Writes a pending acknowledgement ahead of other output, so it rides along.
    pub(super) fn piggyback_ack(&mut self) {
        if self.ack_limit() > self.rx_acked {
            self.write_ack();
        }
    }

    /// Holds incoming frame `seq` back once more.
    pub(super) fn hold(&mut self, seq: u64) {
        *self.holds.entry(seq).or_default() += 1;
    }

    /// Releases one hold on incoming frame `seq`; `true` when the acknowledgement may now
    /// go further.
    pub(super) fn release(&mut self, seq: u64) -> bool {
        let before = self.ack_limit();
        if let Some(n) = self.holds.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.holds.remove(&seq);
            }
        }
        self.ack_limit() > before
    }

    /// The earliest moment this link counts as stalled.
    pub(super) fn stall_deadline(&self, config: &RouterConfig) -> Option<Timestamp> {
        let after = config.stall_timeout?;
        let since = match (self.tx_stalled_since, self.rx_partial_since) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(since + after)
    }
}
