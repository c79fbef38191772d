//! Counters: plain data, mutated only inside the crate.

use crate::event::LossReason;

/// Envelopes lost at this node, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LossStats {
    /// Queued for a link that went down before writing them.
    pub never_written: u64,
    /// Partly written to a link that went down.
    pub partially_written: u64,
    /// Written to a link that went down before acknowledging them.
    pub unacknowledged: u64,
    /// No route to the destination.
    pub no_route: u64,
    /// Over the hop limit.
    pub hop_limit: u64,
    /// The next link's queue was full.
    pub queue_full: u64,
    /// No receipt within the receipt timeout (counted at the origin).
    pub timeout: u64,
    /// The destination left the tree while a receipt was pending (counted at the origin).
    pub destination_down: u64,
    /// Grown past the frame limit on the way (a trace), so not forwarded.
    pub too_large: u64,
}

impl LossStats {
    /// All losses together.
    pub fn total(&self) -> u64 {
        self.never_written
            + self.partially_written
            + self.unacknowledged
            + self.no_route
            + self.hop_limit
            + self.queue_full
            + self.timeout
            + self.destination_down
            + self.too_large
    }

    pub(crate) fn count(&mut self, reason: LossReason) {
        use crate::event::WriteState;
        let slot = match reason {
            LossReason::PeerDown(WriteState::NeverWritten) => &mut self.never_written,
            LossReason::PeerDown(WriteState::PartiallyWritten) => &mut self.partially_written,
            LossReason::PeerDown(WriteState::Unacknowledged) => &mut self.unacknowledged,
            LossReason::NoRoute => &mut self.no_route,
            LossReason::HopLimit => &mut self.hop_limit,
            LossReason::QueueFull => &mut self.queue_full,
            LossReason::Timeout => &mut self.timeout,
            LossReason::DestinationDown => &mut self.destination_down,
            LossReason::TooLarge => &mut self.too_large,
        };
        *slot += 1;
    }
}

/// What one router has done since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterStats {
    /// Envelopes this node originated (accepted submissions).
    pub sent: u64,
    /// Envelopes passed on towards another node (once per envelope, not per link).
    pub forwarded: u64,
    /// Envelopes delivered to this node's application.
    pub delivered: u64,
    /// Envelopes dropped because their id was seen before.
    pub duplicates: u64,
    /// Envelope frames dropped because their link sequence number was replayed.
    pub link_duplicates: u64,
    /// Envelopes lost here, by reason.
    pub lost: LossStats,
    /// Delivery receipts and loss notices sent to origins.
    pub notices_sent: u64,
    /// Receipts and loss notices that could not be sent or were themselves lost.
    pub notices_dropped: u64,
    /// Flooded envelopes that reached a node with nowhere further to go.
    pub flood_dead_ends: u64,
    /// Route announcements ignored because the table was at its bound.
    pub routes_refused: u64,
    /// Links closed because the peer broke the protocol.
    pub protocol_errors: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes written (as reported by the caller).
    pub bytes_out: u64,
}
