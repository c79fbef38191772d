//! Custody: names a node holds for a worker that is down.
//!
//! A supervisor whose named child died holds the name ([`Router::hold_name`]): envelopes
//! addressed to it are taken here, not delivered — their receipts stay open — until the
//! name's next holder is forked, when they go onto the new child's link first, ahead of
//! anything routed to it later, keeping origin, id and flags (the receipt is rebound to
//! the new holder by a notice); or until the custodian gives the name up, when each is
//! reported lost to its origin ([`LossReason::Abandoned`]) through the notice path.
//!
//! ```text
//!   origin ──env(name "w" at S)──► S: hold "w" ──(fork w' with "w")──► w' (HANDED)
//!      ▲                              │ notice Moved(w')                    │
//!      └──────────────────────────────┴────── notice Delivered (from w') ◄──┘
//! ```
//!
//! [`Router::hold_name`]: crate::Router::hold_name
//! [`LossReason::Abandoned`]: crate::LossReason::Abandoned

use std::collections::VecDeque;

use crate::hash::{self, Map};
use crate::id::NodeId;
use crate::wire::Envelope;

#[derive(Debug)]
struct Hold {
    capacity: usize,
    queue: VecDeque<Envelope>,
}

/// The names held in custody and the envelopes taken for each; and the names this node
/// handed to a child it forked, so that envelopes still bound to this node for them (sent
/// before the senders heard of the move) follow the name.
#[derive(Debug)]
pub(super) struct Custody {
    held: Map<String, Hold>,
    envelopes: usize,
    handed: Map<String, NodeId>,
}

impl Custody {
    pub(super) fn new(me: NodeId) -> Self {
        Self {
            held: hash::map(me),
            envelopes: 0,
            handed: hash::map(me),
        }
    }

    pub(super) fn holds(&self, name: &str) -> bool {
        self.held.contains_key(name)
    }

    /// Envelopes held over all names.
    pub(super) fn len(&self) -> usize {
        self.envelopes
    }

    /// The child this node handed `name` to, if it did.
    pub(super) fn handed_to(&self, name: &str) -> Option<NodeId> {
        self.handed.get(name).copied()
    }

    /// This node handed `name` to its child `child`.
    pub(super) fn set_handed(&mut self, name: &str, child: NodeId) {
        self.handed.insert(name.to_owned(), child);
    }

    /// A node left: names handed to it are no longer followed.
    pub(super) fn forget_handed(&mut self, node: &NodeId) {
        if self.handed.values().any(|n| n == node) {
            self.handed.retain(|_, n| n != node);
        }
    }

    /// Starts holding `name` (or changes its capacity).
    pub(super) fn hold(&mut self, name: &str, capacity: usize) {
        self.handed.remove(name);
        match self.held.get_mut(name) {
            Some(h) => h.capacity = capacity,
            None => {
                self.held.insert(
                    name.to_owned(),
                    Hold {
                        capacity,
                        queue: VecDeque::new(),
                    },
                );
            }
        }
    }

    /// Takes an envelope for a held name; hands it back when the hold is full.
    pub(super) fn take(&mut self, name: &str, env: Envelope) -> Result<(), Envelope> {
        match self.held.get_mut(name) {
            Some(h) if h.queue.len() < h.capacity => {
                h.queue.push_back(env);
                self.envelopes += 1;
                Ok(())
            }
            _ => Err(env),
        }
    }

    /// Ends the hold of `name`: its envelopes, in the order they came.
    pub(super) fn release(&mut self, name: &str) -> Option<VecDeque<Envelope>> {
        let h = self.held.remove(name)?;
        self.envelopes -= h.queue.len();
        Some(h.queue)
    }

    /// The names held.
    pub(super) fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.held.keys().cloned().collect();
        v.sort_unstable();
        v
    }
}
