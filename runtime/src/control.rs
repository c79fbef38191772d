//! The runtime's link-level control frames and the shutdown tally.
//!
//! ```text
//!   code          direction        data
//!   SHUTDOWN      parent → child   none: drain your subtree, then exit 0
//!   TALLY         child → parent   CBOR Tally of the child's whole subtree, its last frame
//! ```

use std::ops::AddAssign;

use forkbus_router::RouterStats;
use serde::{Deserialize, Serialize};

/// Parent → child: shut your subtree down and exit.
pub(crate) const CONTROL_SHUTDOWN: u32 = 0x4642_0001;
/// Child → parent: the tally of my subtree; my last frame.
pub(crate) const CONTROL_TALLY: u32 = 0x4642_0002;

/// What a (sub)tree did, summed over its processes at the end of a graceful shutdown.
///
/// Every process counts what it originated (`sent`), what it delivered to its application
/// (`delivered`) and what was lost *at it* (`lost`: queued for a link that went down, no
/// route, hop limit, a full queue on the way). For unicast traffic without receipts, every
/// envelope is delivered once or lost once somewhere, so over a whole tree that shut down
/// gracefully `sent == delivered + lost` ([`balanced`](Self::balanced)). Broadcast and
/// group envelopes are delivered many times and do not balance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Tally {
    /// Processes counted.
    pub processes: u64,
    /// Envelopes originated.
    pub sent: u64,
    /// Envelopes delivered to applications.
    pub delivered: u64,
    /// Envelopes lost where they were (by the node that lost them).
    pub lost: u64,
    /// Loss reports that reached their origins ([`Listener::on_lost`](crate::Listener::on_lost)).
    pub lost_reports: u64,
    /// Receipts that failed at their origins (timeout, destination down).
    pub receipt_failures: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Children that exited without reporting their subtree (killed, crashed).
    pub unreported: u64,
}

impl Tally {
    /// One process's own counts.
    pub(crate) fn of_node(stats: &RouterStats, lost_reports: u64) -> Self {
        let receipt_failures = stats.lost.timeout + stats.lost.destination_down;
        Self {
            processes: 1,
            sent: stats.sent,
            delivered: stats.delivered,
            lost: stats.lost.total() - receipt_failures,
            lost_reports,
            receipt_failures,
            duplicates: stats.duplicates,
            unreported: 0,
        }
    }

    /// Whether every envelope sent was delivered or lost (see the type's doc for when this
    /// must hold).
    pub fn balanced(&self) -> bool {
        self.sent == self.delivered + self.lost
    }
}

impl AddAssign for Tally {
    fn add_assign(&mut self, o: Self) {
        self.processes += o.processes;
        self.sent += o.sent;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.lost_reports += o.lost_reports;
        self.receipt_failures += o.receipt_failures;
        self.duplicates += o.duplicates;
        self.unreported += o.unreported;
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
            delivered: 4,
            lost: 1,
            ..Tally::default()
        };
        let b = Tally {
            processes: 2,
            sent: 0,
            delivered: 5,
            ..Tally::default()
        };
        assert!(!a.balanced());
        a += b;
        assert_eq!(a.processes, 3);
        assert!(a.balanced());
    }

    #[test]
    fn tally_round_trips_through_cbor() {
        let t = Tally {
            processes: 7,
            sent: 100,
            delivered: 90,
            lost: 10,
            ..Tally::default()
        };
        let mut buf = Vec::new();
        let bytes = crate::message::encode(&t, &mut buf).expect("encodes");
        assert_eq!(crate::message::decode::<Tally>(&bytes).expect("decodes"), t);
    }
}
