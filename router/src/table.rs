//! The routing table: node → link, name → node, group → members, pid → node.

use std::collections::{BTreeSet, VecDeque};

use crate::hash::{self, Map, Set};

use crate::id::{LinkId, NodeId};
use crate::wire::{NodeInfo, RouteUpdate};

/// What is known of one remote node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// The next hop towards it.
    link: LinkId,
    /// The version of the announcement its names and groups come from.
    version: u64,
    names: Vec<String>,
    groups: Vec<String>,
}

/// The outcome of applying an announcement to the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The table changed; the announcement must be passed on.
    Changed,
    /// The table already said so.
    Unchanged,
    /// The table is at its bound; the node was not added.
    Refused,
}

/// Every node's next hop, and the names and groups that resolve to nodes.
///
/// **Invariant:** `names`, `groups` and `by_pid` only ever point at `me` or at a key of
/// `nodes`; removing a node removes every pointer to it.
#[derive(Debug)]
pub(crate) struct RouteTable {
    me: NodeId,
    /// Bumped whenever this node's names or groups change.
    my_version: u64,
    my_names: Vec<String>,
    my_groups: Vec<String>,
    nodes: Map<NodeId, Entry>,
    names: Map<String, NodeId>,
    groups: Map<String, BTreeSet<NodeId>>,
    by_pid: Map<(u32, u32), NodeId>,
    /// Nodes that left, so that a late envelope of theirs does not bring them back by
    /// learning (bounded: the oldest are forgotten first).
    tombstones: Set<NodeId>,
    tombstone_order: VecDeque<NodeId>,
    max_nodes: usize,
}

impl RouteTable {
    pub(crate) fn new(me: NodeId, max_nodes: usize) -> Self {
        let mut by_pid = hash::map(me);
        by_pid.insert((me.host, me.pid), me);
        Self {
            me,
            my_version: 1,
            my_names: Vec::new(),
            my_groups: Vec::new(),
            nodes: hash::map(me),
            names: hash::map(me),
            groups: hash::map(me),
            by_pid,
            tombstones: hash::set(me),
            tombstone_order: VecDeque::new(),
            max_nodes,
        }
    }

    /// The next hop towards `node`; `None` for unknown nodes and for this node itself.
    pub(crate) fn route(&self, node: &NodeId) -> Option<LinkId> {
        self.nodes.get(node).map(|e| e.link)
    }

    pub(crate) fn contains(&self, node: &NodeId) -> bool {
        *node == self.me || self.nodes.contains_key(node)
    }

    pub(crate) fn resolve_name(&self, name: &str) -> Option<NodeId> {
        self.names.get(name).copied()
    }

    pub(crate) fn resolve_pid(&self, host: u32, pid: u32) -> Option<NodeId> {
        self.by_pid.get(&(host, pid)).copied()
    }

    pub(crate) fn has_name(&self, name: &str) -> bool {
        self.my_names.iter().any(|n| n == name)
    }

    pub(crate) fn is_member(&self, group: &str) -> bool {
        self.my_groups.iter().any(|g| g == group)
    }

    /// Links with members of `group` behind them, but `except`, each once, in index order.
    pub(crate) fn group_links(&self, group: &str, except: Option<LinkId>) -> Vec<LinkId> {
        let mut links: Vec<LinkId> = self
            .groups
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|n| self.nodes.get(n).map(|e| e.link))
            .filter(|l| Some(*l) != except)
            .collect();
        links.sort_unstable();
        links.dedup();
        links
    }

    #[cfg(test)]
    pub(crate) fn n_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Every known remote node and its next hop, sorted.
    pub(crate) fn routes(&self) -> Vec<(NodeId, LinkId)> {
        let mut v: Vec<_> = self.nodes.iter().map(|(n, e)| (*n, e.link)).collect();
        v.sort_unstable();
        v
    }

    pub(crate) fn me_info(&self) -> NodeInfo {
        NodeInfo {
            node: self.me,
            version: self.my_version,
            names: self.my_names.clone(),
            groups: self.my_groups.clone(),
        }
    }

    /// What is known of a remote node, as an announcement.
    pub(crate) fn info_of(&self, node: &NodeId) -> Option<NodeInfo> {
        self.nodes.get(node).map(|e| self.info(*node, e))
    }

    fn info(&self, node: NodeId, e: &Entry) -> NodeInfo {
        NodeInfo {
            node,
            version: e.version,
            names: e.names.clone(),
            groups: e.groups.clone(),
        }
    }

    /// Everything this node can tell a new neighbour: itself and every node not behind
    /// `except` (the neighbour's own link).
    pub(crate) fn dump(&self, except: Option<LinkId>) -> RouteUpdate {
        let mut upsert = vec![self.me_info()];
        let mut others: Vec<NodeInfo> = self
            .nodes
            .iter()
            .filter(|(_, e)| Some(e.link) != except)
            .map(|(n, e)| self.info(*n, e))
            .collect();
        others.sort_unstable_by_key(|i| i.node);
        upsert.extend(others);
        RouteUpdate {
            upsert,
            remove: Vec::new(),
        }
    }

    /// This node registers a name. Returns `false` when it already had it.
    pub(crate) fn add_my_name(&mut self, name: &str) -> bool {
        if self.has_name(name) {
            return false;
        }
        self.my_version += 1;
        self.my_names.push(name.to_owned());
        self.names.insert(name.to_owned(), self.me);
        true
    }

    pub(crate) fn remove_my_name(&mut self, name: &str) -> bool {
        let before = self.my_names.len();
        self.my_names.retain(|n| n != name);
        if self.my_names.len() == before {
            return false;
        }
        self.my_version += 1;
        self.release_name(name, self.me);
        true
    }

    pub(crate) fn join_group(&mut self, group: &str) -> bool {
        if self.is_member(group) {
            return false;
        }
        self.my_version += 1;
        self.my_groups.push(group.to_owned());
        self.groups
            .entry(group.to_owned())
            .or_default()
            .insert(self.me);
        true
    }

    pub(crate) fn leave_group(&mut self, group: &str) -> bool {
        let before = self.my_groups.len();
        self.my_groups.retain(|g| g != group);
        if self.my_groups.len() == before {
            return false;
        }
        self.my_version += 1;
        self.release_group(group, self.me);
        true
    }

    /// A neighbour is known the moment its link opens (bare: names come with its routes).
    pub(crate) fn add_neighbour(&mut self, node: NodeId, via: LinkId) -> Applied {
        self.unbury(&node);
        self.learn(node, via)
    }

    /// Gives a bare neighbour (version 0, names not yet announced) the names its parent
    /// forked it with; its own first announcement (a higher version) replaces them.
    pub(crate) fn name_bare(&mut self, node: &NodeId, names: &[String]) {
        let Some(e) = self.nodes.get_mut(node) else {
            return;
        };
        if e.version != 0 || names.is_empty() {
            return;
        }
        for n in names {
            if !e.names.contains(n) {
                e.names.push(n.clone());
            }
            self.names.insert(n.clone(), *node);
        }
    }

    /// Learns `node` behind `via` from an envelope it originated: corrects the next hop of a
    /// known node, adds an unknown one, but never brings back a node that left.
    pub(crate) fn learn(&mut self, node: NodeId, via: LinkId) -> Applied {
        if node == self.me || self.tombstones.contains(&node) {
            return Applied::Unchanged;
        }
        let full = self.nodes.len() >= self.max_nodes;
        match self.nodes.get_mut(&node) {
            Some(e) if e.link == via => Applied::Unchanged,
            Some(e) => {
                e.link = via;
                Applied::Changed
            }
            None if full => Applied::Refused,
            None => {
                self.insert(
                    node,
                    Entry {
                        link: via,
                        version: 0,
                        names: Vec::new(),
                        groups: Vec::new(),
                    },
                );
                Applied::Changed
            }
        }
    }

    /// Applies one node's announcement, heard through `via`.
    ///
    /// An announcement no newer than what is known is stale and changes nothing, so
    /// announcements die out even where redundant links close a cycle. Nor does one move a
    /// known node to another link: on a tree a node has one path, and next hops move only
    /// by [`learn`](Self::learn).
    pub(crate) fn upsert(&mut self, info: &NodeInfo, via: LinkId) -> Applied {
        if info.node == self.me {
            return Applied::Unchanged;
        }
        self.unbury(&info.node);
        let link = match self.nodes.get(&info.node) {
            Some(e) if info.version <= e.version => return Applied::Unchanged,
            Some(e) => {
                let link = e.link;
                self.forget_node(&info.node);
                link
            }
            None if self.nodes.len() >= self.max_nodes => return Applied::Refused,
            None => via,
        };
        self.insert(
            info.node,
            Entry {
                link,
                version: info.version,
                names: info.names.clone(),
                groups: info.groups.clone(),
            },
        );
        Applied::Changed
    }

    fn insert(&mut self, node: NodeId, e: Entry) {
        for n in &e.names {
            self.names.insert(n.clone(), node);
        }
        for g in &e.groups {
            self.groups.entry(g.clone()).or_default().insert(node);
        }
        self.by_pid.insert((node.host, node.pid), node);
        self.nodes.insert(node, e);
    }

    /// Removes `node` if it is known through `via` (an announcement from elsewhere is stale).
    pub(crate) fn remove_via(&mut self, node: &NodeId, via: LinkId) -> bool {
        if self.route(node) == Some(via) {
            self.remove_node(node);
            true
        } else {
            false
        }
    }

    /// Removes every node behind `link`; returns them, sorted.
    pub(crate) fn remove_link(&mut self, link: LinkId) -> Vec<NodeId> {
        let mut gone: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.link == link)
            .map(|(n, _)| *n)
            .collect();
        gone.sort_unstable();
        for n in &gone {
            self.remove_node(n);
        }
        gone
    }

    fn unbury(&mut self, node: &NodeId) {
        if self.tombstones.remove(node) {
            self.tombstone_order.retain(|n| n != node);
        }
    }

    fn bury(&mut self, node: NodeId) {
        if self.tombstones.insert(node) {
            self.tombstone_order.push_back(node);
            if self.tombstone_order.len() > self.max_nodes {
                if let Some(old) = self.tombstone_order.pop_front() {
                    self.tombstones.remove(&old);
                }
            }
        }
    }

    /// Removes a node that left (buried against relearning).
    fn remove_node(&mut self, node: &NodeId) {
        if self.nodes.contains_key(node) {
            self.bury(*node);
        }
        self.forget_node(node);
    }

    /// Removes a node's entry and every pointer to it.
    fn forget_node(&mut self, node: &NodeId) {
        let Some(e) = self.nodes.remove(node) else {
            return;
        };
        for n in &e.names {
            self.release_name(n, *node);
        }
        for g in &e.groups {
            self.release_group(g, *node);
        }
        let key = (node.host, node.pid);
        if self.by_pid.get(&key) == Some(node) {
            self.by_pid.remove(&key);
            // Another incarnation may still hold the pid (a restart announced before the
            // old one's removal arrived).
            if let Some(other) = self.nodes.keys().find(|n| (n.host, n.pid) == key) {
                self.by_pid.insert(key, *other);
            }
        }
    }

    /// `node` no longer holds `name`; another holder, if any, gets it back.
    fn release_name(&mut self, name: &str, node: NodeId) {
        if self.names.get(name) != Some(&node) {
            return;
        }
        self.names.remove(name);
        let heir = if self.has_name(name) {
            Some(self.me)
        } else {
            let mut holders: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(n, e)| **n != node && e.names.iter().any(|x| x == name))
                .map(|(n, _)| *n)
                .collect();
            holders.sort_unstable();
            holders.pop()
        };
        if let Some(h) = heir {
            self.names.insert(name.to_owned(), h);
        }
    }

    fn release_group(&mut self, group: &str, node: NodeId) {
        if let Some(members) = self.groups.get_mut(group) {
            members.remove(&node);
            if members.is_empty() {
                self.groups.remove(group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(pid: u32) -> NodeId {
        NodeId::new(0, pid, 1)
    }

    fn l(index: u32) -> LinkId {
        LinkId {
            index,
            generation: 0,
        }
    }

    fn info(node: NodeId, names: &[&str], groups: &[&str]) -> NodeInfo {
        use std::sync::atomic::{AtomicU64, Ordering};
        static VERSION: AtomicU64 = AtomicU64::new(1);
        NodeInfo {
            node,
            version: VERSION.fetch_add(1, Ordering::Relaxed),
            names: names.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn upsert_is_idempotent_and_replaces() {
        let mut t = RouteTable::new(n(1), 16);
        let first = info(n(2), &["a"], &["g"]);
        assert_eq!(t.upsert(&first, l(0)), Applied::Changed);
        assert_eq!(t.upsert(&first, l(0)), Applied::Unchanged);
        assert_eq!(t.resolve_name("a"), Some(n(2)));
        assert_eq!(t.upsert(&info(n(2), &["b"], &[]), l(0)), Applied::Changed);
        assert_eq!(t.resolve_name("a"), None);
        assert_eq!(t.resolve_name("b"), Some(n(2)));
        assert!(t.group_links("g", None).is_empty());
    }

    #[test]
    fn removing_a_link_removes_everything_behind_it() {
        let mut t = RouteTable::new(n(1), 16);
        t.upsert(&info(n(2), &["a"], &["g"]), l(0));
        t.upsert(&info(n(3), &[], &["g"]), l(0));
        t.upsert(&info(n(4), &[], &["g"]), l(1));
        assert_eq!(t.group_links("g", None), vec![l(0), l(1)]);
        assert_eq!(t.group_links("g", Some(l(0))), vec![l(1)]);
        assert_eq!(t.remove_link(l(0)), vec![n(2), n(3)]);
        assert_eq!(t.routes(), vec![(n(4), l(1))]);
        assert_eq!(t.resolve_name("a"), None);
        assert_eq!(t.resolve_pid(0, 2), None);
        assert_eq!(t.group_links("g", None), vec![l(1)]);
    }

    #[test]
    fn announcements_do_not_move_known_nodes() {
        let mut t = RouteTable::new(n(1), 16);
        let first = info(n(2), &["a"], &[]);
        t.upsert(&first, l(0));
        assert_eq!(t.upsert(&first, l(1)), Applied::Unchanged);
        assert_eq!(t.upsert(&info(n(2), &["b"], &[]), l(1)), Applied::Changed);
        assert_eq!(t.route(&n(2)), Some(l(0)));
        assert_eq!(t.learn(n(2), l(1)), Applied::Changed, "envelopes move it");
        assert_eq!(t.route(&n(2)), Some(l(1)));
    }

    #[test]
    fn stale_removal_from_another_link_is_ignored() {
        let mut t = RouteTable::new(n(1), 16);
        t.upsert(&info(n(2), &[], &[]), l(0));
        assert!(!t.remove_via(&n(2), l(1)));
        assert!(t.remove_via(&n(2), l(0)));
        assert!(!t.contains(&n(2)));
    }

    #[test]
    fn a_name_moves_to_a_restarted_worker_and_stays_there() {
        let mut t = RouteTable::new(n(1), 16);
        let old = NodeId::new(0, 7, 1);
        let new = NodeId::new(0, 7, 2);
        t.upsert(&info(old, &["w"], &[]), l(0));
        t.upsert(&info(new, &["w"], &[]), l(0));
        assert_eq!(t.resolve_name("w"), Some(new));
        assert_eq!(t.resolve_pid(0, 7), Some(new));
        assert!(t.remove_via(&old, l(0)));
        assert_eq!(t.resolve_name("w"), Some(new));
        assert_eq!(t.resolve_pid(0, 7), Some(new));
    }

    #[test]
    fn a_name_falls_back_to_the_remaining_holder() {
        let mut t = RouteTable::new(n(1), 16);
        t.upsert(&info(n(2), &["w"], &[]), l(0));
        t.upsert(&info(n(3), &["w"], &[]), l(1));
        t.remove_link(l(1));
        assert_eq!(t.resolve_name("w"), Some(n(2)));
    }

    #[test]
    fn own_names_and_groups() {
        let mut t = RouteTable::new(n(1), 16);
        assert!(t.add_my_name("root"));
        assert!(!t.add_my_name("root"));
        assert_eq!(t.resolve_name("root"), Some(n(1)));
        assert_eq!(t.resolve_pid(0, 1), Some(n(1)));
        assert!(t.join_group("g"));
        assert!(t.is_member("g"));
        assert!(t.group_links("g", None).is_empty(), "self is not a link");
        assert!(t.leave_group("g"));
        assert!(!t.is_member("g"));
        assert!(t.remove_my_name("root"));
        assert_eq!(t.resolve_name("root"), None);
        assert_eq!(t.upsert(&info(n(1), &["x"], &[]), l(0)), Applied::Unchanged);
    }

    #[test]
    fn a_node_that_left_is_not_relearned_from_a_late_envelope() {
        let mut t = RouteTable::new(n(1), 16);
        t.upsert(&info(n(2), &[], &[]), l(0));
        assert!(t.remove_via(&n(2), l(0)));
        assert_eq!(t.learn(n(2), l(0)), Applied::Unchanged);
        assert!(!t.contains(&n(2)));
        assert_eq!(t.upsert(&info(n(2), &[], &[]), l(0)), Applied::Changed);
        assert!(t.contains(&n(2)), "an announcement brings it back");
        t.remove_link(l(0));
        assert_eq!(t.add_neighbour(n(2), l(1)), Applied::Changed);
    }

    #[test]
    fn stale_announcements_change_nothing() {
        let mut t = RouteTable::new(n(1), 16);
        let old = info(n(2), &["old"], &[]);
        let new = info(n(2), &["new"], &[]);
        assert_eq!(t.upsert(&new, l(0)), Applied::Changed);
        assert_eq!(t.upsert(&old, l(1)), Applied::Unchanged);
        assert_eq!(t.resolve_name("new"), Some(n(2)));
        assert_eq!(t.resolve_name("old"), None);
        // A bare neighbour (version 0) never wipes known names.
        assert_eq!(t.add_neighbour(n(2), l(0)), Applied::Unchanged);
        assert_eq!(
            t.info_of(&n(2)).map(|i| i.names),
            Some(vec!["new".to_string()])
        );
    }

    #[test]
    fn own_version_grows_with_every_change() {
        let mut t = RouteTable::new(n(1), 16);
        let v0 = t.me_info().version;
        t.add_my_name("a");
        t.join_group("g");
        t.leave_group("g");
        t.remove_my_name("a");
        assert_eq!(t.me_info().version, v0 + 4);
        t.remove_my_name("a");
        assert_eq!(t.me_info().version, v0 + 4, "no change, no new version");
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = RouteTable::new(n(1), 2);
        assert_eq!(t.learn(n(2), l(0)), Applied::Changed);
        assert_eq!(t.upsert(&info(n(3), &[], &[]), l(0)), Applied::Changed);
        assert_eq!(t.upsert(&info(n(4), &[], &[]), l(0)), Applied::Refused);
        assert_eq!(t.learn(n(5), l(0)), Applied::Refused);
        assert_eq!(
            t.learn(n(2), l(1)),
            Applied::Changed,
            "known nodes may move"
        );
        assert_eq!(t.n_nodes(), 2);
    }

    #[test]
    fn dump_leaves_out_the_asking_link() {
        let mut t = RouteTable::new(n(1), 16);
        t.add_my_name("me");
        t.upsert(&info(n(2), &[], &[]), l(0));
        t.upsert(&info(n(3), &[], &[]), l(1));
        let d = t.dump(Some(l(0)));
        let nodes: Vec<NodeId> = d.upsert.iter().map(|i| i.node).collect();
        assert_eq!(nodes, vec![n(1), n(3)]);
        assert_eq!(d.upsert[0].names, vec!["me".to_string()]);
    }
}
