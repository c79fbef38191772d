//! Duplicate suppression: a sliding window of seen sequence numbers per origin.

use crate::hash::{self, Map};
use crate::id::{MessageId, NodeId};

/// The seen sequence numbers of one origin, as a bitmap over the last [`SeenWindow::SPAN`].
///
/// ```text
///            top - SPAN                         top
///                │◄──────────── SPAN ──────────►│
///   too old      │ 1 1 0 1 1 1 1 0 1 1 1 1 1 1 1│ new: seq >= top
///   (duplicate)  │      bit i = seen(top-1-i)   │ (window slides)
/// ```
///
/// Sequence numbers below the window are taken for duplicates: on a tree with FIFO links an
/// origin's envelopes arrive nearly in order, so only a replay can be that far behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeenWindow {
    /// One past the highest sequence number seen.
    top: u64,
    /// Bit `i` is set when `top - 1 - i` was seen.
    bits: u128,
}

impl SeenWindow {
    /// How many sequence numbers below the highest one are remembered.
    pub const SPAN: u64 = 128;

    /// Records `seq`; returns `false` when it was seen before (or is too old to tell).
    /// `u64::MAX` is never a valid sequence number (the wire refuses it) and is refused here.
    pub fn insert(&mut self, seq: u64) -> bool {
        if seq == u64::MAX {
            return false;
        }
        if seq >= self.top {
            let shift = seq - self.top + 1;
            self.bits = if shift >= Self::SPAN {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.top = seq + 1;
            return true;
        }
        let behind = self.top - 1 - seq;
        if behind >= Self::SPAN {
            return false;
        }
        let mask = 1u128 << behind;
        let fresh = self.bits & mask == 0;
        self.bits |= mask;
        fresh
    }
}

/// Seen windows for a bounded number of origins; the least recently used one is forgotten
/// when a new origin would exceed the bound.
///
/// Every operation is O(1): the windows sit in a slab threaded on a doubly linked list in
/// order of use, most recent at the head, so the origin to evict is the tail.
///
/// ```text
///   map: origin ─► slot        head ─► [slot] ⇄ [slot] ⇄ … ⇄ [slot] ◄─ tail (evicted next)
/// ```
#[derive(Debug)]
pub struct SeenTable {
    index: Map<NodeId, usize>,
    slots: slab::Slab<Slot>,
    head: Option<usize>,
    tail: Option<usize>,
    max_origins: usize,
    evicted: u64,
}

#[derive(Debug)]
struct Slot {
    origin: NodeId,
    window: SeenWindow,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SeenTable {
    /// A table tracking at most `max_origins` origins (at least one), for the router of
    /// node `me` (which seeds its hasher).
    pub fn new(me: NodeId, max_origins: usize) -> Self {
        Self {
            index: hash::map(me),
            slots: slab::Slab::new(),
            head: None,
            tail: None,
            max_origins: max_origins.max(1),
            evicted: 0,
        }
    }

    /// Records `id`; returns `false` when it is a duplicate.
    pub fn insert(&mut self, id: MessageId) -> bool {
        if let Some(&slot) = self.index.get(&id.origin) {
            self.unlink(slot);
            self.push_front(slot);
            return self.slots[slot].window.insert(id.seq);
        }
        if self.slots.len() >= self.max_origins {
            if let Some(oldest) = self.tail {
                self.remove_slot(oldest);
                self.evicted += 1;
            }
        }
        let mut window = SeenWindow::default();
        let fresh = window.insert(id.seq);
        let slot = self.slots.insert(Slot {
            origin: id.origin,
            window,
            prev: None,
            next: None,
        });
        self.index.insert(id.origin, slot);
        self.push_front(slot);
        fresh
    }

    /// Forgets an origin (it left the tree).
    pub fn forget(&mut self, origin: &NodeId) {
        if let Some(&slot) = self.index.get(origin) {
            self.remove_slot(slot);
        }
    }

    /// Origins tracked now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no origin is tracked.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Origins forgotten to stay within the bound.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn remove_slot(&mut self, slot: usize) {
        self.unlink(slot);
        let s = self.slots.remove(slot);
        self.index.remove(&s.origin);
    }

    fn unlink(&mut self, slot: usize) {
        let (prev, next) = (self.slots[slot].prev, self.slots[slot].next);
        match prev {
            Some(p) => self.slots[p].next = next,
            None => self.head = next,
        }
        match next {
            Some(n) => self.slots[n].prev = prev,
            None => self.tail = prev,
        }
        self.slots[slot].prev = None;
        self.slots[slot].next = None;
    }

    fn push_front(&mut self, slot: usize) {
        self.slots[slot].next = self.head;
        self.slots[slot].prev = None;
        if let Some(h) = self.head {
            self.slots[h].prev = Some(slot);
        }
        self.head = Some(slot);
        if self.tail.is_none() {
            self.tail = Some(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_then_replay() {
        let mut w = SeenWindow::default();
        for s in 0..1000 {
            assert!(w.insert(s));
        }
        for s in 872..1000 {
            assert!(!w.insert(s), "{s} replayed");
        }
    }

    #[test]
    fn out_of_order_within_the_window() {
        let mut w = SeenWindow::default();
        assert!(w.insert(10));
        assert!(w.insert(3));
        assert!(w.insert(0));
        assert!(!w.insert(3));
        assert!(w.insert(9));
        assert!(!w.insert(10));
    }

    #[test]
    fn window_edges() {
        let mut w = SeenWindow::default();
        assert!(w.insert(SeenWindow::SPAN)); // top = SPAN + 1
        assert!(w.insert(1)); // behind = SPAN - 1: the oldest remembered slot
        assert!(!w.insert(1));
        assert!(!w.insert(0)); // behind = SPAN: too old, taken for a duplicate
        assert!(w.insert(SeenWindow::SPAN + 300)); // a jump clears everything
        assert!(!w.insert(SeenWindow::SPAN));
        assert!(w.insert(SeenWindow::SPAN + 299));
        assert!(w.insert(u64::MAX - 1));
        assert!(!w.insert(u64::MAX - 1));
        assert!(!w.insert(u64::MAX), "never valid, never a panic");
    }

    #[test]
    fn table_is_bounded_and_evicts_least_recently_used() {
        let node = |pid| NodeId::new(0, pid, 0);
        let id = |pid, seq| MessageId {
            origin: node(pid),
            seq,
        };
        let mut t = SeenTable::new(NodeId::new(0, 1, 1), 2);
        assert!(t.insert(id(1, 0)));
        assert!(t.insert(id(2, 0)));
        assert!(!t.insert(id(1, 0))); // 1 is now the most recent
        assert!(t.insert(id(3, 0))); // evicts 2
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted(), 1);
        assert!(!t.insert(id(1, 0)));
        assert!(t.insert(id(2, 0)), "2 was forgotten");
        t.forget(&node(1));
        assert!(t.insert(id(1, 0)));
    }

    /// Checks the table against a naive model (a list in order of use) under random
    /// operations, eviction included.
    #[test]
    fn lru_matches_a_naive_model() {
        let node = |pid| NodeId::new(0, pid, 0);
        let mut t = SeenTable::new(NodeId::new(0, 1, 1), 5);
        let mut model: Vec<(u32, SeenWindow)> = Vec::new();
        let mut x: u64 = 7;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pid = ((x >> 33) % 9) as u32;
            let seq = (x >> 40) % 300;
            if (x >> 20) % 17 == 0 {
                t.forget(&node(pid));
                model.retain(|(p, _)| *p != pid);
                continue;
            }
            let expect = match model.iter().position(|(p, _)| *p == pid) {
                Some(i) => {
                    let (p, mut w) = model.remove(i);
                    let fresh = w.insert(seq);
                    model.insert(0, (p, w));
                    fresh
                }
                None => {
                    if model.len() == 5 {
                        model.pop();
                    }
                    let mut w = SeenWindow::default();
                    let fresh = w.insert(seq);
                    model.insert(0, (pid, w));
                    fresh
                }
            };
            assert_eq!(
                t.insert(MessageId {
                    origin: node(pid),
                    seq
                }),
                expect
            );
            assert_eq!(t.len(), model.len());
        }
    }

    #[test]
    fn incarnations_are_separate_origins() {
        let mut t = SeenTable::new(NodeId::new(0, 1, 1), 8);
        let a = MessageId {
            origin: NodeId::new(0, 5, 1),
            seq: 0,
        };
        let b = MessageId {
            origin: NodeId::new(0, 5, 2),
            seq: 0,
        };
        assert!(t.insert(a));
        assert!(t.insert(b), "a restarted pid starts at zero again");
    }
}
