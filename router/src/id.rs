//! Identity: nodes, messages, links, destinations and the caller's clock.

use std::fmt;
use std::ops::Add;
use std::time::Duration;

/// One process of a forkbus tree, told apart from every other process that ever had its pid.
///
/// The kernel reuses pids, so a node is named by three parts:
///
/// ```text
///   host         pid          incarnation
///   ─────────    ─────────    ───────────
///   which tree   kernel pid   a nonce chosen when the process joined; a
///   (fixed per   (what users  restarted worker with a recycled pid gets a
///   tree today)  address)     new one, so its sequence numbers, routes and
///                             loss notices never mix with the dead node's
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// The host or tree part; every node of one tree shares it.
    pub host: u32,
    /// The process id.
    pub pid: u32,
    /// The incarnation nonce, distinct for every process that held this pid.
    pub incarnation: u32,
}

impl NodeId {
    /// Builds a node id from its three parts.
    pub const fn new(host: u32, pid: u32, incarnation: u32) -> Self {
        Self {
            host,
            pid,
            incarnation,
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{:x}", self.pid, self.incarnation)?;
        if self.host != 0 {
            write!(f, "@{}", self.host)?;
        }
        Ok(())
    }
}

/// The id of one envelope: its origin and the origin's sequence number for it.
///
/// This is the seen-ID that duplicate suppression works on. Sequence numbers start at zero in
/// every incarnation of a node and grow by one per envelope the node originates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The node that originated the envelope.
    pub origin: NodeId,
    /// The origin's sequence number.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.origin, self.seq)
    }
}

/// A link of one router: the slab key that is also the runtime's poll key, plus a generation.
///
/// The generation guards a reused slot: input or output calls made with the id of a link that
/// went down are refused with [`Error::UnknownLink`](crate::Error::UnknownLink), even when a new
/// link has taken its slot since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl LinkId {
    /// The slab index of this link; unique among the router's open links, used as poll key.
    pub fn index(self) -> usize {
        self.index as usize
    }

    /// The generation of the slot when this link was opened.
    pub fn generation(self) -> u32 {
        self.generation
    }
}

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}.{}", self.index, self.generation)
    }
}

/// Where an envelope goes, as carried on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// One node, this very incarnation of it.
    Node(NodeId),
    /// The node that holds this name (names are unique; a name follows a supervised worker
    /// across restarts). The sender's router binds it to the node the name resolves to
    /// there ([`Destination::NameAt`]); on the wire it stays unbound only when flooded for
    /// want of a holder ([`NoRoutePolicy::Flood`](crate::NoRoutePolicy::Flood)).
    Name(String),
    /// A name as bound by the sender: the envelope goes to `node`, the holder of `name` when
    /// it was sent, and its outcome is about that node. A node that has left makes it a
    /// loss (`no route`, safe to retry: the retry resolves the name again) or, once taken,
    /// an unknown fate; it is never delivered to another holder behind the sender's back.
    NameAt {
        /// The name it was addressed to.
        name: String,
        /// The node that held it at the sender.
        node: NodeId,
    },
    /// Every member of this group, once each.
    Group(String),
    /// Every node of the tree but the sender, once each.
    Broadcast,
}

impl Destination {
    /// Whether an envelope to this destination goes to exactly one node.
    pub fn is_unicast(&self) -> bool {
        matches!(self, Self::Node(_) | Self::Name(_) | Self::NameAt { .. })
    }

    /// The name it was addressed to, for [`Destination::Name`] and [`Destination::NameAt`].
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Name(n) | Self::NameAt { name: n, .. } => Some(n),
            _ => None,
        }
    }
}

/// What a link is to this node, which decides what its peer may say.
///
/// ```text
///   Parent   the link this node was forked (or started) on: speaks for every node
///            outside this node's subtree
///   Child    a link to a node this one forked or started: speaks for that child's
///            subtree only
///   Peer     any other link (a redundant path, a test's raw peer): speaks for its own
///            neighbour only, and only when the tree does not know it already
/// ```
///
/// Where a node lives is fixed by the first link that announced it (a parent knows its
/// child from the fork); traffic never moves it. An envelope or announcement on a tree
/// link (parent or child) that contradicts this is a protocol violation of that link. A
/// flooded copy over a peer link from an origin that lives elsewhere is dropped as
/// redundant (the tree carries the same envelope).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LinkRole {
    /// The link to this node's parent.
    Parent,
    /// A link to a child of this node.
    Child,
    /// Any other link.
    #[default]
    Peer,
}

impl LinkRole {
    /// Whether the link is an edge of the tree (parent or child).
    pub fn is_tree(self) -> bool {
        matches!(self, Self::Parent | Self::Child)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(n) => write!(f, "node {n}"),
            Self::Name(n) => write!(f, "name {n:?}"),
            Self::NameAt { name, node } => write!(f, "name {name:?} at {node}"),
            Self::Group(g) => write!(f, "group {g:?}"),
            Self::Broadcast => f.write_str("broadcast"),
        }
    }
}

/// Where the application sends: a [`Destination`], or a bare pid.
///
/// A pid is resolved by the sender's routing table to the live node holding it on the
/// sender's host, so users can address "pid 4242" without knowing its incarnation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// A destination as carried on the wire.
    To(Destination),
    /// The live node with this pid on the sender's host.
    Pid(u32),
}

impl Address {
    /// Whether an envelope to this address goes to exactly one node.
    pub fn is_unicast(&self) -> bool {
        match self {
            Self::To(d) => d.is_unicast(),
            Self::Pid(_) => true,
        }
    }
}

impl From<Destination> for Address {
    fn from(d: Destination) -> Self {
        Self::To(d)
    }
}

impl From<NodeId> for Address {
    fn from(n: NodeId) -> Self {
        Self::To(Destination::Node(n))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::To(d) => d.fmt(f),
            Self::Pid(p) => write!(f, "pid {p}"),
        }
    }
}

/// A point in time on the caller's monotonic clock, in nanoseconds.
///
/// The router never reads a clock: every input that needs the time takes `now`. Within one
/// machine the runtime uses `CLOCK_MONOTONIC`, which all processes share, so the times in a
/// routing trace are comparable across the tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch of the caller's clock.
    pub const ZERO: Self = Self(0);

    /// A timestamp this many nanoseconds after the epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is; zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Self;

    fn add(self, rhs: Duration) -> Self {
        let nanos = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_display_hides_default_host() {
        assert_eq!(NodeId::new(0, 42, 0xab).to_string(), "42#ab");
        assert_eq!(NodeId::new(3, 42, 1).to_string(), "42#1@3");
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        let t = Timestamp::from_nanos(u64::MAX - 1);
        assert_eq!((t + Duration::from_secs(1)).as_nanos(), u64::MAX);
        assert_eq!(Timestamp::ZERO.saturating_duration_since(t), Duration::ZERO);
    }

    #[test]
    fn unicast_destinations() {
        assert!(Address::Pid(1).is_unicast());
        assert!(!Address::from(Destination::Broadcast).is_unicast());
        assert!(Destination::Name("a".into()).is_unicast());
        assert!(!Destination::Group("g".into()).is_unicast());
        assert!(!Destination::Broadcast.is_unicast());
    }
}
