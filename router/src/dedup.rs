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
#[derive(Debug)]
pub struct SeenTable {
    windows: Map<NodeId, (SeenWindow, u64)>,
    max_origins: usize,
    clock: u64,
    evicted: u64,
}

impl SeenTable {
    /// A table tracking at most `max_origins` origins (at least one), for the router of
    /// node `me` (which seeds its hasher).
    pub fn new(me: NodeId, max_origins: usize) -> Self {
        Self {
            windows: hash::map(me),
            max_origins: max_origins.max(1),
            clock: 0,
            evicted: 0,
        }
    }

    /// Records `id`; returns `false` when it is a duplicate.
    pub fn insert(&mut self, id: MessageId) -> bool {
        self.clock += 1;
        let clock = self.clock;
        if let Some((window, used)) = self.windows.get_mut(&id.origin) {
            *used = clock;
            return window.insert(id.seq);
        }
        if self.windows.len() >= self.max_origins {
            let oldest = self
                .windows
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(node, _)| *node);
            if let Some(node) = oldest {
                self.windows.remove(&node);
                self.evicted += 1;
            }
        }
        let mut window = SeenWindow::default();
        let fresh = window.insert(id.seq);
        self.windows.insert(id.origin, (window, clock));
        fresh
    }

    /// Forgets an origin (it left the tree).
    pub fn forget(&mut self, origin: &NodeId) {
        self.windows.remove(origin);
    }

    /// Origins tracked now.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no origin is tracked.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Origins forgotten to stay within the bound.
    pub fn evicted(&self) -> u64 {
        self.evicted
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
