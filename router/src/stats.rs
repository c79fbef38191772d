//! Counters: plain data, mutated only inside the crate.

use crate::event::{Fate, LossReason, UnknownReason};

/// Envelopes lost at this node, by reason; and, at an origin, outcomes of unknown fate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LossStats {
    /// Queued for a link that went down before writing them.
    pub never_written: u64,
    /// Partly written to a link that went down.
    pub partially_written: u64,
    /// Written to a link that went down before acknowledging them (fate unknown).
    pub unacknowledged: u64,
    /// No route to the destination.
    pub no_route: u64,
    /// Over the hop limit.
    pub hop_limit: u64,
    /// The next link's queue (or a custodian's hold) was full.
    pub queue_full: u64,
    /// Grown past the frame limit on the way (a trace), so not forwarded.
    pub too_large: u64,
    /// Held in custody for a worker that did not come back.
    pub abandoned: u64,
    /// No receipt within the receipt timeout (counted at the origin; fate unknown).
    pub timeout: u64,
    /// The destination left the tree while a receipt was pending (counted at the origin;
    /// fate unknown).
    pub destination_down: u64,
}

impl LossStats {
    /// Copies lost where they were: everything but the origin's receipt failures
    /// (timeouts, departed destinations), which are verdicts about copies counted
    /// elsewhere.
    pub fn copies(&self) -> u64 {
        self.never_written
            + self.partially_written
            + self.unacknowledged
            + self.no_route
            + self.hop_limit
            + self.queue_full
            + self.too_large
            + self.abandoned
    }

    /// Receipts that ended without news from the path: timeouts and departed
    /// destinations.
    pub fn receipt_failures(&self) -> u64 {
        self.timeout + self.destination_down
    }

    pub(crate) fn count(&mut self, fate: Fate) {
        let slot = match fate {
            Fate::Lost(LossReason::NeverWritten) => &mut self.never_written,
            Fate::Lost(LossReason::PartiallyWritten) => &mut self.partially_written,
            Fate::Unknown(UnknownReason::Unacknowledged) => &mut self.unacknowledged,
            Fate::Lost(LossReason::NoRoute) => &mut self.no_route,
            Fate::Lost(LossReason::HopLimit) => &mut self.hop_limit,
            Fate::Lost(LossReason::QueueFull) => &mut self.queue_full,
            Fate::Lost(LossReason::TooLarge) => &mut self.too_large,
            Fate::Lost(LossReason::Abandoned) => &mut self.abandoned,
            Fate::Unknown(UnknownReason::Timeout) => &mut self.timeout,
            Fate::Unknown(UnknownReason::DestinationDown) => &mut self.destination_down,
        };
        *slot += 1;
    }
}

/// What one router has done since it started.
///
/// Copies balance: every copy of an envelope that exists is created by a submission
/// (`sent`) or by a fan-out (`fanout`: a broadcast or group envelope leaving on k links
/// and delivered here makes k + 1 − 1 copies out of one), and ends exactly once — in
/// `delivered`, `lost.copies()`, `duplicates`, `redundant`, `absorbed`, or in custody
/// (`held` now). Summed over a tree that has gone quiet, both sides are equal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterStats {
    /// Envelopes this node originated (accepted submissions).
    pub sent: u64,
    /// Envelopes passed on towards another node (once per envelope, not per link).
    pub forwarded: u64,
    /// Forwarded copies that waited for room on their next link (their incoming frame held
    /// back, unacknowledged, meanwhile: backpressure instead of a loss).
    pub parked: u64,
    /// Extra copies made here by fanning one envelope out to several links (and the
    /// application).
    pub fanout: u64,
    /// Envelopes delivered to this node's application.
    pub delivered: u64,
    /// Envelopes dropped because their id was seen before.
    pub duplicates: u64,
    /// Flooded copies that came over a peer link from an origin behind another link: the
    /// tree carries the same envelope, so this copy is redundant and dropped.
    pub redundant: u64,
    /// Copies that ended here with nowhere to go and nobody to deliver to (a broadcast
    /// with no other node, a flood's dead end, a late envelope from a node that left).
    pub absorbed: u64,
    /// Envelope frames dropped because their link sequence number was replayed.
    pub link_duplicates: u64,
    /// Envelopes lost here, by reason (and the origin's unknown outcomes).
    pub lost: LossStats,
    /// Envelopes taken in custody for a held name (their receipts wait).
    pub taken_in_custody: u64,
    /// Custody envelopes handed over to a name's new holder.
    pub handed_over: u64,
    /// Delivery receipts and loss notices this node originated.
    pub notices_sent: u64,
    /// Notices passed on towards their origin.
    pub notices_forwarded: u64,
    /// Notices that reached this node but matched no pending envelope, or came from a
    /// node that could not have sent them (ignored).
    pub notices_ignored: u64,
    /// Notices that could not be routed to their origin (it left the tree).
    pub notices_undeliverable: u64,
    /// Name claims of other nodes refused (the name is held by a node elsewhere).
    pub names_refused: u64,
    /// Announcements about nodes ignored (heard over a peer link, or about a node that
    /// left).
    pub routes_ignored: u64,
    /// Links closed because the peer broke the protocol.
    pub protocol_errors: u64,
    /// Links closed because they stalled.
    pub stalls: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes written (as reported by the caller).
    pub bytes_out: u64,
    /// Envelope and notice frames queued on links (for quiescence detection).
    pub tx_frames: u64,
    /// Envelope and notice frames received from links (for quiescence detection).
    pub rx_frames: u64,
}
