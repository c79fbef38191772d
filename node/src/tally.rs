//! The shutdown tally: what a (sub)tree did, summed over its processes.

use std::ops::AddAssign;

use forkbus_router::RouterStats;
use serde::{Deserialize, Serialize};

/// What a (sub)tree did, summed over its processes at the end of a graceful shutdown.
///
/// Every process counts what it originated (`sent`), the extra copies it made fanning an
/// envelope out (`copies`: a broadcast leaving on three links and delivered here is one
/// copy in, four out), and how each copy that reached it ended: delivered to its
/// application, lost there (`lost`), dropped as a duplicate or a redundant copy, or absorbed
/// (a dead end). Every copy ends exactly once, so over a tree that drained with no process
/// lost ([`unreported`](Self::unreported) zero) and no link failed
/// ([`unknown`](Self::unknown) zero):
///
/// ```text
///   sent + copies == delivered + lost + duplicates + absorbed + held
/// ```
///
/// ([`balanced`](Self::balanced)). A copy written but unacknowledged when its link went down
/// is counted lost at the sender and may also have been delivered: with failures the left
/// side lies between the right side minus `unknown` and the right side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Tally {
    /// Processes that reported (this one included).
    pub processes: u64,
    /// Processes of the subtree that never reported: killed or crashed before the end
    /// (every process the tree ever heard of, restarts included; their counts are
    /// missing, so the tally cannot balance).
    pub unreported: u64,
    /// Envelopes originated.
    pub sent: u64,
    /// Extra copies made by fanning envelopes out (broadcast and group traffic).
    pub copies: u64,
    /// Copies delivered to applications.
    pub delivered: u64,
    /// Copies lost where they were (by the node that lost them), of sure or unknown fate.
    pub lost: u64,
    /// Of `lost`: written but unacknowledged when a link went down (fate unknown).
    pub unknown: u64,
    /// Copies dropped as duplicates or as redundant copies over peer links.
    pub duplicates: u64,
    /// Copies that ended with nowhere to go (a broadcast in a tree of one, a flood's dead
    /// end, a late envelope of a node that left).
    pub absorbed: u64,
    /// Copies still held in custody.
    pub held: u64,
    /// Loss reports that reached their origins (an [`Event::Lost`](forkbus_router::Event::Lost) here).
    pub lost_reports: u64,
    /// Receipts that ended unknown at their origins (timeout, destination down).
    pub receipt_failures: u64,
}

impl Tally {
    /// One process's own counts.
    pub(crate) fn of_node(stats: &RouterStats, lost_reports: u64, held: usize) -> Self {
        Self {
            processes: 1,
            unreported: 0,
            sent: stats.sent,
            copies: stats.fanout,
            delivered: stats.delivered,
            lost: stats.lost.copies(),
            unknown: stats.lost.unacknowledged,
            duplicates: stats.duplicates + stats.redundant,
            absorbed: stats.absorbed,
            held: held as u64,
            lost_reports,
            receipt_failures: stats.lost.receipt_failures(),
        }
    }

    /// Whether every copy made ended exactly once: true of a tree that drained with every
    /// process reporting and no link failing (see the type's doc).
    pub fn balanced(&self) -> bool {
        self.unreported == 0
            && self.unknown == 0
            && self.sent + self.copies
                == self.delivered + self.lost + self.duplicates + self.absorbed + self.held
    }
}

impl AddAssign for Tally {
    fn add_assign(&mut self, o: Self) {
        self.processes += o.processes;
        self.unreported += o.unreported;
        self.sent += o.sent;
        self.copies += o.copies;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.unknown += o.unknown;
        self.duplicates += o.duplicates;
        self.absorbed += o.absorbed;
        self.held += o.held;
        self.lost_reports += o.lost_reports;
        self.receipt_failures += o.receipt_failures;
    }
}

/// The number of counters a tally carries on the wire.
const FIELDS: usize = 12;

impl Tally {
    /// Its wire form: its twelve counters as little-endian `u64`s, in declaration order.
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.fields().iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    /// A tally from its wire form; `None` for bytes of another shape.
    pub(crate) fn decode(data: &[u8]) -> Option<Self> {
        if data.len() != FIELDS * 8 {
            return None;
        }
        let mut f = [0u64; FIELDS];
        for (v, chunk) in f.iter_mut().zip(data.chunks_exact(8)) {
            *v = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        let [processes, unreported, sent, copies, delivered, lost, unknown, duplicates, absorbed, held, lost_reports, receipt_failures] =
            f;
        Some(Self {
            processes,
            unreported,
            sent,
            copies,
            delivered,
            lost,
            unknown,
            duplicates,
            absorbed,
            held,
            lost_reports,
            receipt_failures,
        })
    }

    fn fields(&self) -> [u64; FIELDS] {
        [
            self.processes,
            self.unreported,
            self.sent,
            self.copies,
            self.delivered,
            self.lost,
            self.unknown,
            self.duplicates,
            self.absorbed,
            self.held,
            self.lost_reports,
            self.receipt_failures,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_and_balance() {
        let mut a = Tally {
            processes: 1,
            sent: 10,
            copies: 6,
            delivered: 4,
            lost: 1,
            ..Tally::default()
        };
        let b = Tally {
            processes: 2,
            delivered: 9,
            duplicates: 1,
            absorbed: 1,
            ..Tally::default()
        };
        assert!(!a.balanced());
        a += b;
        assert_eq!(a.processes, 3);
        assert!(a.balanced());
        a.unreported = 1;
        assert!(!a.balanced(), "a process lost: its counts are missing");
    }

    #[test]
    fn a_tally_round_trips_and_refuses_other_shapes() {
        let t = Tally {
            processes: 7,
            unreported: 1,
            sent: 100,
            delivered: 90,
            lost: 10,
            receipt_failures: u64::MAX,
            ..Tally::default()
        };
        assert_eq!(Tally::decode(&t.encode()), Some(t));
        assert_eq!(Tally::decode(&[0; 95]), None);
        assert_eq!(Tally::decode(&[0; 97]), None);
        assert_eq!(Tally::decode(&[]), None);
    }
}
