//! Hash maps keyed by node ids and names, with a fast keyed hasher.
//!
//! `std`'s SipHash cost about 300 instructions per table lookup on the envelope path (two
//! lookups per hop: the seen window and the route), a tenth of all the work of routing an
//! envelope. foldhash is several times cheaper. Its seed comes from this node's id (whose
//! incarnation is a random nonce), not from a clock or the OS, so the router stays pure.

use std::collections::{HashMap, HashSet};

use foldhash::fast::FixedState;

use crate::id::NodeId;

/// A hash map with the router's hasher.
pub(crate) type Map<K, V> = HashMap<K, V, FixedState>;
/// A hash set with the router's hasher.
pub(crate) type Set<K> = HashSet<K, FixedState>;

/// The hasher state of the router of node `me`.
pub(crate) fn state(me: NodeId) -> FixedState {
    let seed = (u64::from(me.pid) << 32 | u64::from(me.incarnation)) ^ u64::from(me.host);
    FixedState::with_seed(seed)
}

/// An empty map for the router of node `me`.
pub(crate) fn map<K, V>(me: NodeId) -> Map<K, V> {
    HashMap::with_hasher(state(me))
}

/// An empty set for the router of node `me`.
pub(crate) fn set<K>(me: NodeId) -> Set<K> {
    HashSet::with_hasher(state(me))
}
