//! Pending receipts at an origin: one entry per envelope sent with a receipt, until its
//! one outcome.
//!
//! The entry is the single source of the outcome: the first of delivered / lost / unknown
//! removes it and emits the event; later news finds no entry and is ignored. It keeps the
//! payload, so a loss report hands it back, and the node the envelope is bound to, so a
//! delivery receipt is believed only from that node and its departure ends the wait.

use std::collections::BTreeSet;

use crate::hash::{self, Map};
use crate::id::{Destination, NodeId, Timestamp};

/// One envelope awaiting its outcome.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    /// The node it is bound to (its destination, or the name's holder it was handed to);
    /// `None` when it was flooded for want of a route (only a receipt or the timeout ends
    /// it).
    pub(super) dest: Option<NodeId>,
    pub(super) deadline: Option<Timestamp>,
    pub(super) destination: Destination,
    pub(super) payload: Vec<u8>,
}

/// The pending receipts of one router, indexed by sequence number, deadline and
/// destination node (so a node's departure costs the receipts waiting on it).
#[derive(Debug)]
pub(super) struct Receipts {
    pending: Map<u64, Pending>,
    deadlines: BTreeSet<(Timestamp, u64)>,
    by_dest: Map<NodeId, BTreeSet<u64>>,
    bytes: usize,
}

impl Receipts {
    pub(super) fn new(me: NodeId) -> Self {
        Self {
            pending: hash::map(me),
            deadlines: BTreeSet::new(),
            by_dest: hash::map(me),
            bytes: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Payload bytes kept.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn get(&self, seq: u64) -> Option<&Pending> {
        self.pending.get(&seq)
    }

    pub(super) fn insert(&mut self, seq: u64, p: Pending) {
        if let Some(d) = p.deadline {
            self.deadlines.insert((d, seq));
        }
        if let Some(n) = p.dest {
            self.by_dest.entry(n).or_default().insert(seq);
        }
        self.bytes += p.payload.len();
        self.pending.insert(seq, p);
    }

    /// Ends the wait for `seq`: its entry, if it was pending.
    pub(super) fn take(&mut self, seq: u64) -> Option<Pending> {
        let p = self.pending.remove(&seq)?;
        if let Some(d) = p.deadline {
            self.deadlines.remove(&(d, seq));
        }
        if let Some(n) = p.dest {
            self.unindex(n, seq);
        }
        self.bytes -= p.payload.len();
        Some(p)
    }

    /// The envelope was handed over to another node: its receipt now waits on `to`.
    pub(super) fn rebind(&mut self, seq: u64, to: NodeId) {
        let Some(p) = self.pending.get_mut(&seq) else {
            return;
        };
        let old = p.dest.replace(to);
        if let Some(n) = old {
            self.unindex(n, seq);
        }
        self.by_dest.entry(to).or_default().insert(seq);
    }

    /// The receipts bound to `node`, in order, taken out of the index (the caller ends
    /// each with [`take`](Self::take)).
    pub(super) fn waiting_on(&mut self, node: &NodeId) -> Vec<u64> {
        self.by_dest
            .remove(node)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default()
    }

    /// The first receipt deadline at or before `now`, if any.
    pub(super) fn pop_due(&mut self, now: Timestamp) -> Option<u64> {
        let &(at, seq) = self.deadlines.first()?;
        (at <= now).then_some(seq)
    }

    pub(super) fn next_deadline(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    fn unindex(&mut self, node: NodeId, seq: u64) {
        if let Some(set) = self.by_dest.get_mut(&node) {
            set.remove(&seq);
            if set.is_empty() {
                self.by_dest.remove(&node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(dest: Option<NodeId>, deadline: Option<u64>, len: usize) -> Pending {
        Pending {
            dest,
            deadline: deadline.map(Timestamp::from_nanos),
            destination: Destination::Broadcast,
            payload: vec![0; len],
        }
    }

    #[test]
    fn every_index_follows_the_entries() {
        let (a, b) = (NodeId::new(0, 2, 1), NodeId::new(0, 3, 1));
        let mut r = Receipts::new(NodeId::new(0, 1, 1));
        r.insert(1, pending(Some(a), Some(50), 10));
        r.insert(2, pending(Some(a), Some(20), 5));
        r.insert(3, pending(None, None, 1));
        assert_eq!(r.bytes(), 16);
        assert_eq!(r.next_deadline(), Some(Timestamp::from_nanos(20)));
        assert_eq!(r.pop_due(Timestamp::from_nanos(19)), None);
        assert_eq!(r.pop_due(Timestamp::from_nanos(20)), Some(2));
        assert!(r.take(2).is_some());
        r.rebind(1, b);
        assert!(r.waiting_on(&a).is_empty());
        assert_eq!(r.waiting_on(&b), vec![1]);
        assert!(r.take(1).is_some());
        assert!(r.take(1).is_none(), "one outcome");
        assert_eq!(r.next_deadline(), None);
        assert_eq!(r.len(), 1);
        assert_eq!(r.bytes(), 1);
    }
}
