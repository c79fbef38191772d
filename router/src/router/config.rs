//! A router's configuration and the options and refusals of a submission.

use std::fmt;
use std::time::Duration;

use crate::error::Error;
use crate::id::NodeId;

/// What a node does with a unicast envelope it has no route for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NoRoutePolicy {
    /// Report it lost with [`LossReason::NoRoute`](crate::LossReason::NoRoute) (the default).
    #[default]
    Report,
    /// Flood it to every link but the one it came on, at most this many hops in all. A flood
    /// that finds no taker is counted in [`RouterStats::absorbed`](crate::RouterStats); its
    /// origin learns of it only through a receipt's timeout, so this policy needs
    /// [`RouterConfig::receipt_timeout`].
    Flood {
        /// Hop limit of flooded envelopes.
        hop_limit: u8,
    },
}

/// Bounds and behaviour of a router. Every bound holds whatever peers send.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterConfig {
    /// Largest frame accepted or produced (kind + body), in bytes.
    pub max_frame: u32,
    /// Longest name or group name, in bytes.
    pub max_name: usize,
    /// Envelopes a link may hold queued or written and unacknowledged.
    pub max_queue_envelopes: usize,
    /// Bytes of envelope frames a link may hold queued or written and unacknowledged. A
    /// link's other output (acknowledgements, announcements, notices, control) may reach
    /// the same again plus a frame before the peer counts as not reading
    /// ([`DownCause::Overrun`](crate::DownCause::Overrun)), and so may the notices it has
    /// not acknowledged, written or not; local control sends are refused before that.
    pub max_queue_bytes: usize,
    /// Remote nodes the routing table holds at most (a peer announcing more breaks the
    /// protocol).
    pub max_nodes: usize,
    /// Names (and, separately, groups) one node may hold at most.
    pub max_names_per_node: usize,
    /// Names all nodes together may hold at most, in this node's table.
    pub max_names: usize,
    /// Group memberships all nodes together may hold at most, in this node's table.
    pub max_groups: usize,
    /// Origins whose seen windows are kept at most.
    pub max_origins: usize,
    /// Envelopes awaiting a receipt at most.
    pub max_pending_receipts: usize,
    /// Payload bytes of envelopes awaiting a receipt at most (the router keeps them to hand
    /// them back with a loss report).
    pub max_pending_receipt_bytes: usize,
    /// Hop limit of envelopes sent without one of their own.
    pub hop_limit: u8,
    /// What to do with unicast envelopes that have no route.
    pub no_route: NoRoutePolicy,
    /// Longest a received envelope frame waits for its acknowledgement when nothing is sent
    /// back that could carry it.
    pub ack_delay: Duration,
    /// Received envelope frames that trigger an acknowledgement at once. Keep it below the
    /// peers' `max_queue_envelopes`, or a full peer waits `ack_delay` for room.
    pub ack_every: u64,
    /// How long an origin waits for a receipt before reporting
    /// [`UnknownReason::Timeout`](crate::UnknownReason::Timeout) (`None`: until the
    /// destination leaves the tree).
    pub receipt_timeout: Option<Duration>,
    /// How long a link may make no progress — output waiting that the peer does not take,
    /// or a frame the peer began and does not complete — before it is closed
    /// ([`DownCause::Stalled`](crate::DownCause::Stalled)); `None`: forever.
    pub stall_timeout: Option<Duration>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            max_frame: (1 << 20) + 4096,
            max_name: 256,
            max_queue_envelopes: 4096,
            max_queue_bytes: 8 << 20,
            max_nodes: 1 << 16,
            max_names_per_node: 64,
            max_names: 1 << 16,
            max_groups: 1 << 16,
            max_origins: 1 << 12,
            max_pending_receipts: 1 << 16,
            max_pending_receipt_bytes: 64 << 20,
            hop_limit: 64,
            no_route: NoRoutePolicy::Report,
            ack_delay: Duration::from_millis(2),
            ack_every: 32,
            receipt_timeout: Some(Duration::from_secs(30)),
            stall_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// Builder setters: one `fn field(self, value) -> Self` per listed field, so that a
/// `#[non_exhaustive]` configuration is built from its default without mutating it.
macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            #[must_use]
            pub fn $field(mut self, value: $ty) -> Self {
                self.$field = value;
                self
            }
        )*
    };
}

impl RouterConfig {
    setters! {
        /// Sets [`max_frame`](Self::max_frame).
        max_frame: u32,
        /// Sets [`max_name`](Self::max_name).
        max_name: usize,
        /// Sets [`max_queue_envelopes`](Self::max_queue_envelopes).
        max_queue_envelopes: usize,
        /// Sets [`max_queue_bytes`](Self::max_queue_bytes).
        max_queue_bytes: usize,
        /// Sets [`max_nodes`](Self::max_nodes).
        max_nodes: usize,
        /// Sets [`max_names_per_node`](Self::max_names_per_node).
        max_names_per_node: usize,
        /// Sets [`max_names`](Self::max_names).
        max_names: usize,
        /// Sets [`max_groups`](Self::max_groups).
        max_groups: usize,
        /// Sets [`max_origins`](Self::max_origins).
        max_origins: usize,
        /// Sets [`max_pending_receipts`](Self::max_pending_receipts).
        max_pending_receipts: usize,
        /// Sets [`max_pending_receipt_bytes`](Self::max_pending_receipt_bytes).
        max_pending_receipt_bytes: usize,
        /// Sets [`hop_limit`](Self::hop_limit).
        hop_limit: u8,
        /// Sets [`no_route`](Self::no_route).
        no_route: NoRoutePolicy,
        /// Sets [`ack_delay`](Self::ack_delay).
        ack_delay: Duration,
        /// Sets [`ack_every`](Self::ack_every).
        ack_every: u64,
        /// Sets [`receipt_timeout`](Self::receipt_timeout).
        receipt_timeout: Option<Duration>,
        /// Sets [`stall_timeout`](Self::stall_timeout).
        stall_timeout: Option<Duration>,
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.max_frame < 64 {
            return Err(Error::InvalidConfig("max_frame must be at least 64"));
        }
        if self.max_queue_bytes < self.max_frame as usize {
            return Err(Error::InvalidConfig("max_queue_bytes must hold one frame"));
        }
        if self.max_queue_envelopes == 0 || self.ack_every == 0 {
            return Err(Error::InvalidConfig(
                "max_queue_envelopes and ack_every must be positive",
            ));
        }
        if matches!(self.no_route, NoRoutePolicy::Flood { .. }) && self.receipt_timeout.is_none() {
            // A flood that finds no taker says nothing: only the timeout ends its receipt.
            return Err(Error::InvalidConfig(
                "flooding unroutable envelopes needs a receipt_timeout",
            ));
        }
        if self.max_name == 0 || self.max_name + 64 > self.max_frame as usize {
            return Err(Error::InvalidConfig("max_name must fit a frame"));
        }
        if self.max_names_per_node == 0 {
            return Err(Error::InvalidConfig("max_names_per_node must be positive"));
        }
        Ok(())
    }
}

impl From<&RouterConfig> for crate::wire::DecodeLimits {
    fn from(c: &RouterConfig) -> Self {
        Self {
            max_frame: c.max_frame,
            max_name: c.max_name,
            max_names_per_node: c.max_names_per_node,
        }
    }
}

/// Per-message options of [`Router::submit`](crate::Router::submit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// Ask for exactly one outcome: [`Event::Delivered`](crate::Event::Delivered) or
    /// [`Event::Lost`](crate::Event::Lost) (unicast only).
    pub receipt: bool,
    /// Record every hop in the envelope's trace.
    pub trace: bool,
    /// A hop limit for this envelope instead of the configured one.
    pub hop_limit: Option<u8>,
}

impl SendOptions {
    /// No receipt, no trace, the configured hop limit.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// Sets [`receipt`](Self::receipt).
        receipt: bool,
        /// Sets [`trace`](Self::trace).
        trace: bool,
        /// Sets [`hop_limit`](Self::hop_limit).
        hop_limit: Option<u8>,
    }
}

/// A refused submission: the reason and the payload, handed back untouched.
#[derive(Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why it was refused.
    pub error: Error,
    /// The payload, for a retry.
    pub payload: Vec<u8>,
}

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refused")
            .field("error", &self.error)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "send refused: {}", self.error)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// What a link holds, for views and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// The neighbour, when known.
    pub peer: Option<NodeId>,
    /// What the link is to this node.
    pub role: crate::id::LinkRole,
    /// Envelopes queued or written and not acknowledged.
    pub in_flight: usize,
    /// Bytes of those envelopes' frames.
    pub in_flight_bytes: usize,
    /// Bytes waiting to be written.
    pub pending_output: usize,
    /// Envelope frames sent on this link.
    pub frames_sent: u64,
    /// Envelope frames received on this link.
    pub frames_received: u64,
    /// Remote nodes whose route is this link.
    pub nodes_behind: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setters_build_what_a_struct_update_would() {
        let built = RouterConfig::default()
            .max_queue_envelopes(7)
            .receipt_timeout(None)
            .no_route(NoRoutePolicy::Report)
            .hop_limit(3);
        let by_hand = RouterConfig {
            max_queue_envelopes: 7,
            receipt_timeout: None,
            no_route: NoRoutePolicy::Report,
            hop_limit: 3,
            ..RouterConfig::default()
        };
        assert_eq!(built, by_hand);
        assert_ne!(built, RouterConfig::default());
        let o = SendOptions::new()
            .receipt(true)
            .trace(true)
            .hop_limit(Some(2));
        assert_eq!((o.receipt, o.trace, o.hop_limit), (true, true, Some(2)));
    }
}
