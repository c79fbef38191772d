//! Holding a down child's name ([`WhileDown::Queue`](super::WhileDown::Queue)): while no
//! process of the child holds its name, the supervisor registers it, keeps the envelopes
//! that arrive for it (bounded), and relays them to the next process once it is ready,
//! with their origin and id, so the worker sees them as sent and answers their origins.
//!
//! The router cannot pass on an envelope it delivered, nor report the loss of one the
//! application took, so both travel as ordinary envelopes with a tagged payload that the
//! runtime unwraps before any listener sees it:
//!
//! ```text
//!   0xDA 'F' 'B' 'R'   kind   ...                 (a CBOR tag head: no serde value of the
//!                                                  application's starts with it)
//!   kind 1 RELAY       origin host u32, pid u32, incarnation u32, seq u64, hops u8,
//!                      name length u16, name, payload           supervisor → new process
//!   kind 2 LOST        seq u64, reason u8                        supervisor → origin
//! ```
//!
//! A relay is sent with a receipt: if it is lost, the origin gets a `LOST` notice, turned
//! into [`Listener::on_lost`](crate::Listener::on_lost) there. Held envelopes of a child
//! that finishes (gives up, stops) are reported lost (`destination down`) the same way.
//!
//! What this cannot do (router gaps): an origin that asked for a receipt was told
//! "delivered" when the supervisor took the envelope, so it may hear of a loss after a
//! receipt; and held envelopes of a bus that is shutting down can no longer be reported
//! (sends are refused): they are counted in a [`SupervisionEvent::HeldDropped`](super::SupervisionEvent::HeldDropped).

use std::collections::VecDeque;

use forkbus_router::{
    Destination, Envelope, Flags, LossReason, LossReport, MessageId, NodeId, SendOptions,
};

use super::types::{ChildId, ChildRef, SupervisionEvent, WhileDown};
use super::Entry;
use crate::bus::Bus;
use crate::listener::Listener;
use crate::message::Message;

const TAG: [u8; 4] = [0xDA, b'F', b'B', b'R'];
const RELAY: u8 = 1;
const LOST: u8 = 2;

/// A tagged payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Tagged {
    Relay {
        origin: NodeId,
        seq: u64,
        hops: u8,
        name: String,
        payload: Vec<u8>,
    },
    Lost {
        seq: u64,
        reason: LossReason,
    },
}

impl Tagged {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = TAG.to_vec();
        match self {
            Self::Relay {
                origin,
                seq,
                hops,
                name,
                payload,
            } => {
                b.push(RELAY);
                b.extend_from_slice(&origin.host.to_le_bytes());
                b.extend_from_slice(&origin.pid.to_le_bytes());
                b.extend_from_slice(&origin.incarnation.to_le_bytes());
                b.extend_from_slice(&seq.to_le_bytes());
                b.push(*hops);
                let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
                b.extend_from_slice(&len.to_le_bytes());
                b.extend_from_slice(&name.as_bytes()[..usize::from(len)]);
                b.extend_from_slice(payload);
            }
            Self::Lost { seq, reason } => {
                b.push(LOST);
                b.extend_from_slice(&seq.to_le_bytes());
                b.push(reason_code(*reason));
            }
        }
        b
    }

    /// The tagged payload in `bytes`, if it is one (well-formed).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(&TAG[..])?;
        let (&kind, rest) = rest.split_first()?;
        let u32_at = |b: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
        };
        let u64_at = |b: &[u8], at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
        };
        match kind {
            RELAY => {
                let origin = NodeId::new(u32_at(rest, 0)?, u32_at(rest, 4)?, u32_at(rest, 8)?);
                let seq = u64_at(rest, 12)?;
                let hops = *rest.get(20)?;
                let len = usize::from(u16::from_le_bytes(rest.get(21..23)?.try_into().ok()?));
                let name = std::str::from_utf8(rest.get(23..23 + len)?)
                    .ok()?
                    .to_owned();
                let payload = rest.get(23 + len..)?.to_vec();
                Some(Self::Relay {
                    origin,
                    seq,
                    hops,
                    name,
                    payload,
                })
            }
            LOST if rest.len() == 9 => Some(Self::Lost {
                seq: u64_at(rest, 0)?,
                reason: reason_from(rest[8])?,
            }),
            _ => None,
        }
    }
}

/// The router's wire number of a loss reason (all fit a byte).
fn reason_code(r: LossReason) -> u8 {
    u8::try_from(r.code()).unwrap_or(u8::MAX)
}

fn reason_from(code: u8) -> Option<LossReason> {
    LossReason::from_code(u64::from(code))
}

/// A name held for a down child.
#[derive(Debug)]
pub(crate) struct Held {
    name: String,
    capacity: usize,
    /// Whether the supervisor still holds the name (given up once the queue is full).
    registered: bool,
    queue: VecDeque<Envelope>,
}

/// Reacts to a supervisor's events: holds the name of a child that is restarting (queue
/// mode), relays what it held once the next process is ready, reports it lost when the
/// child finishes.
pub(super) fn after_events(
    bus: &mut Bus,
    sup: super::SupervisorId,
    entry: &mut Entry,
    events: &[SupervisionEvent],
) -> Vec<SupervisionEvent> {
    let mut more = Vec::new();
    for e in events {
        match e {
            SupervisionEvent::Exited {
                child,
                next: super::AfterExit::Restart { .. },
                ..
            } => hold(bus, entry, child.child),
            SupervisionEvent::Ready { child, pid } => {
                let node = bus.child_node(*pid);
                release(bus, entry, child.child, node);
            }
            _ => {}
        }
    }
    // A child that will not start again (given up, stopped, the bus draining) hands its
    // name back and reports what it held.
    let done: Vec<ChildId> = entry
        .held
        .keys()
        .copied()
        .filter(|c| entry.core.is_done(*c))
        .collect();
    for child in done {
        if let Some(n) = release(bus, entry, child, None) {
            if n > 0 {
                more.push(SupervisionEvent::HeldDropped {
                    child: ChildRef {
                        supervisor: sup,
                        child,
                    },
                    count: n,
                });
            }
        }
    }
    more
}

fn hold(bus: &mut Bus, entry: &mut Entry, child: ChildId) {
    let Some(spec) = entry.core.spec(child) else {
        return;
    };
    let (WhileDown::Queue { capacity }, Some(name)) = (spec.while_down, spec.name.clone()) else {
        return;
    };
    if capacity == 0 || entry.held.contains_key(&child) || bus.is_stopping() {
        return;
    }
    if let Err(e) = bus.register_name(&name) {
        tracing::warn!(%name, error = %e, "cannot hold a down child's name");
        return;
    }
    tracing::debug!(%name, capacity, "holding the name of a restarting child");
    entry.held.insert(
        child,
        Held {
            name,
            capacity,
            registered: true,
            queue: VecDeque::new(),
        },
    );
}

/// Gives the name up; relays the held envelopes to `to`, or reports them lost to their
/// origins. Returns the number that could not even be reported (the bus is draining).
fn release(bus: &mut Bus, entry: &mut Entry, child: ChildId, to: Option<NodeId>) -> Option<u64> {
    let held = entry.held.remove(&child)?;
    if held.registered {
        let _ = bus.unregister_name(&held.name);
    }
    let mut unreported = 0;
    for env in held.queue {
        let (origin, seq) = (env.id.origin, env.id.seq);
        let sent = match to {
            Some(node) => {
                let relay = Tagged::Relay {
                    origin,
                    seq,
                    hops: env.hops,
                    name: held.name.clone(),
                    payload: env.payload,
                };
                let options = SendOptions {
                    receipt: true,
                    ..SendOptions::default()
                };
                match bus.send_bytes(node, relay.encode(), options) {
                    Ok(id) => {
                        entry.relays.insert(id, (origin, seq));
                        true
                    }
                    Err(_) => notify_lost(bus, origin, seq, LossReason::QueueFull),
                }
            }
            None => notify_lost(bus, origin, seq, LossReason::DestinationDown),
        };
        if !sent {
            unreported += 1;
        }
    }
    Some(unreported)
}

/// Tells an origin that an envelope of its was lost here; `false` when even that cannot
/// be sent.
pub(super) fn notify_lost(bus: &mut Bus, origin: NodeId, seq: u64, reason: LossReason) -> bool {
    let notice = Tagged::Lost { seq, reason }.encode();
    bus.send_bytes(origin, notice, SendOptions::default())
        .is_ok()
}

/// An envelope delivered here, before any listener: unwraps relays (from the parent) and
/// loss notices, and keeps envelopes for held names. `true`: taken care of.
pub(crate) fn intercept(bus: &mut Bus, message: &Message) -> bool {
    if let Some(tagged) = Tagged::decode(message.payload()) {
        match tagged {
            Tagged::Relay {
                origin,
                seq,
                hops,
                name,
                payload,
            } if bus.parent() == Some(message.origin()) => {
                let envelope = Envelope {
                    id: MessageId { origin, seq },
                    destination: Destination::Name(name),
                    hops: hops.saturating_add(message.envelope().hops),
                    hop_limit: message.envelope().hop_limit,
                    flags: Flags::empty(),
                    trace: Vec::new(),
                    payload,
                };
                let inner = Message::new(envelope, message.link());
                bus.emit("on_message", |l: &mut dyn Listener, b| {
                    l.on_message(b, &inner)
                });
                return true;
            }
            Tagged::Lost { seq, reason } => {
                let report = LossReport {
                    id: MessageId {
                        origin: bus.node(),
                        seq,
                    },
                    reason,
                    at: message.origin(),
                };
                bus.emit("on_lost", |l: &mut dyn Listener, b| l.on_lost(b, &report));
                return true;
            }
            Tagged::Relay { .. } => return false,
        }
    }
    let Destination::Name(name) = message.destination() else {
        return false;
    };
    hold_envelope(bus, name, message)
}

/// An envelope for `name` delivered here: it names a queue-mode child of one of this
/// process's supervisors (the name was held when it was routed). Held while there is room;
/// past the capacity, or once the name was handed back, relayed to the child's current
/// process or reported lost to its origin.
fn hold_envelope(bus: &mut Bus, name: &str, message: &Message) -> bool {
    enum Fate {
        Held,
        Relay(NodeId),
        Lost(LossReason),
    }
    let mut fate = None;
    let mut owner = None;
    for (index, entry) in bus.supervision.supervisors.iter_mut().enumerate() {
        let Some(entry) = entry else { continue };
        let Some(child) = entry.core.child_named(name) else {
            continue;
        };
        if !matches!(
            entry.core.spec(child).map(|s| s.while_down),
            Some(WhileDown::Queue { .. })
        ) {
            continue;
        }
        owner = Some(index);
        fate = Some(match entry.held.get_mut(&child) {
            Some(held) if held.registered => {
                held.queue.push_back(message.envelope().clone());
                if held.queue.len() >= held.capacity {
                    // Full: give the name up; the router reports further envelopes lost.
                    held.registered = false;
                    let n = held.name.clone();
                    let _ = bus.unregister_name(&n);
                }
                Fate::Held
            }
            Some(_) => Fate::Lost(LossReason::QueueFull),
            None => match entry.core.running().iter().find(|(c, _)| *c == child) {
                Some((_, pid)) => match bus.child_node(*pid) {
                    Some(node) => Fate::Relay(node),
                    None => Fate::Lost(LossReason::DestinationDown),
                },
                None => Fate::Lost(LossReason::DestinationDown),
            },
        });
        break;
    }
    let (Some(fate), Some(index)) = (fate, owner) else {
        return false;
    };
    let env = message.envelope();
    match fate {
        Fate::Held => {}
        Fate::Lost(reason) => {
            notify_lost(bus, env.id.origin, env.id.seq, reason);
        }
        Fate::Relay(node) => {
            let relay = Tagged::Relay {
                origin: env.id.origin,
                seq: env.id.seq,
                hops: env.hops,
                name: name.to_owned(),
                payload: env.payload.clone(),
            };
            let options = SendOptions {
                receipt: true,
                ..SendOptions::default()
            };
            match bus.send_bytes(node, relay.encode(), options) {
                Ok(id) => {
                    if let Some(Some(e)) = bus.supervision.supervisors.get_mut(index) {
                        e.relays.insert(id, (env.id.origin, env.id.seq));
                    }
                }
                Err(_) => {
                    notify_lost(bus, env.id.origin, env.id.seq, LossReason::QueueFull);
                }
            }
        }
    }
    true
}

/// The bus is draining: held envelopes can no longer be relayed nor reported (sends are
/// refused); they are counted in events.
pub(super) fn drop_held(bus: &mut Bus, sup: super::SupervisorId) {
    let held = match bus.supervision.supervisors.get_mut(sup.0 as usize) {
        Some(Some(e)) => std::mem::take(&mut e.held),
        _ => return,
    };
    for (child, h) in held {
        tracing::warn!(name = %h.name, held = h.queue.len(), "shutdown: held envelopes dropped");
        if h.queue.is_empty() {
            continue;
        }
        let event = SupervisionEvent::HeldDropped {
            child: ChildRef {
                supervisor: sup,
                child,
            },
            count: h.queue.len() as u64,
        };
        bus.defer(move |bus| bus.emit("on_supervision", |l, b| l.on_supervision(b, &event)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_payloads_round_trip() {
        let relay = Tagged::Relay {
            origin: NodeId::new(1, 4242, 7),
            seq: 99,
            hops: 2,
            name: "db".into(),
            payload: vec![1, 2, 3],
        };
        assert_eq!(Tagged::decode(&relay.encode()), Some(relay));
        for code in 0..9 {
            let reason = reason_from(code).expect("a reason");
            assert_eq!(reason_code(reason), code);
            let lost = Tagged::Lost { seq: 5, reason };
            assert_eq!(Tagged::decode(&lost.encode()), Some(lost));
        }
        assert_eq!(reason_from(9), None);
    }

    #[test]
    fn ordinary_and_malformed_payloads_are_not_tagged() {
        let mut scratch = Vec::new();
        for value in [
            crate::message::encode(&"text", &mut scratch).expect("encodes"),
            crate::message::encode(&(1u32, vec![0xDAu8]), &mut scratch).expect("encodes"),
            Vec::new(),
        ] {
            assert_eq!(Tagged::decode(&value), None);
        }
        let mut bad = Tagged::Lost {
            seq: 1,
            reason: LossReason::NoRoute,
        }
        .encode();
        bad.push(0);
        assert_eq!(Tagged::decode(&bad), None);
        let relay = Tagged::Relay {
            origin: NodeId::new(0, 1, 1),
            seq: 1,
            hops: 0,
            name: "n".into(),
            payload: Vec::new(),
        }
        .encode();
        for cut in 5..relay.len() - 1 {
            assert_eq!(Tagged::decode(&relay[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Tagged::decode(&[0xDA, b'F', b'B', b'R', 9]), None);
    }
}
