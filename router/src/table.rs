//! The routing table: node → link, name → node, group → members, pid → node.
//!
//! Where a node lives is fixed by the first link that announced it; nothing moves it after
//! that (an announcement of a known node from another tree link is a protocol violation of
//! that link, see [`LinkRole`]). Every index is kept in step with `nodes`, so removing a
//! node or a link costs what is removed, never a scan of the table.

use std::collections::{BTreeSet, VecDeque};

use crate::error::ProtocolError;
use crate::hash::{self, Map, Set};
use crate::id::{LinkId, LinkRole, NodeId};
use crate::wire::{NodeDelta, NodeInfo, RouteUpdate};

/// How many names and groups the table holds at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableLimits {
    pub(crate) max_nodes: usize,
    pub(crate) max_names_per_node: usize,
    pub(crate) max_groups_per_node: usize,
    pub(crate) max_names: usize,
    pub(crate) max_groups: usize,
}

/// What is known of one remote node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// The next hop towards it.
    link: LinkId,
    /// The version of the announcement its names and groups come from (0: bare).
    version: u64,
    /// The names it claimed that this table accepted.
    names: Vec<String>,
    groups: Vec<String>,
}

/// Who holds a name here.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NameSlot {
    holder: NodeId,
}

/// The nodes behind one link.
#[derive(Debug)]
struct LinkNodes {
    role: LinkRole,
    nodes: Set<NodeId>,
    /// Distinct nodes ever placed behind it.
    ever: u64,
}

/// The outcome of applying an announcement to the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Applied<T> {
    /// The table changed; pass this on (what was accepted of the announcement).
    Changed(T),
    /// Nothing to do (known already, stale, or about a node that left).
    Unchanged,
    /// Ignored: heard over a peer link about a node that lives elsewhere.
    Ignored,
}

/// A name another node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) holder: NodeId,
}

/// Every node's next hop, and the names and groups that resolve to nodes.
///
/// **Invariant:** `names`, `groups`, `by_pid` and `by_link` only ever point at `me` or at
/// keys of `nodes`, and `by_link[l]` holds exactly the nodes whose entry says `l`.
#[derive(Debug)]
pub(crate) struct RouteTable {
    me: NodeId,
    /// Bumped whenever this node's names or groups change.
    my_version: u64,
    my_names: Vec<String>,
    my_groups: Vec<String>,
    nodes: Map<NodeId, Entry>,
    links: Map<LinkId, LinkNodes>,
    names: Map<String, NameSlot>,
    groups: Map<String, BTreeSet<NodeId>>,
    by_pid: Map<(u32, u32), Vec<NodeId>>,
    /// Nodes that left: incarnations never come back, so an announcement of one (a late
    /// echo over a redundant path) is ignored. Bounded: the oldest are forgotten first.
    tombstones: Set<NodeId>,
    tombstone_order: VecDeque<NodeId>,
    n_names: usize,
    n_groups: usize,
    limits: TableLimits,
    /// Name claims refused since the last call of [`take_refused`](Self::take_refused).
    refused: u64,
}

impl RouteTable {
    pub(crate) fn new(me: NodeId, limits: TableLimits) -> Self {
        let mut by_pid = hash::map(me);
        by_pid.insert((me.host, me.pid), vec![me]);
        Self {
            me,
            my_version: 1,
            my_names: Vec::new(),
            my_groups: Vec::new(),
            nodes: hash::map(me),
            links: hash::map(me),
            names: hash::map(me),
            groups: hash::map(me),
            by_pid,
            tombstones: hash::set(me),
            tombstone_order: VecDeque::new(),
            n_names: 0,
            n_groups: 0,
            limits,
            refused: 0,
        }
    }

    // -----------------------------------------------------------------------------------
    // Lookups

    /// The next hop towards `node`; `None` for unknown nodes and for this node itself.
    pub(crate) fn route(&self, node: &NodeId) -> Option<LinkId> {
        self.nodes.get(node).map(|e| e.link)
    }

    pub(crate) fn contains(&self, node: &NodeId) -> bool {
        *node == self.me || self.nodes.contains_key(node)
    }

    pub(crate) fn is_buried(&self, node: &NodeId) -> bool {
        self.tombstones.contains(node)
    }

    pub(crate) fn resolve_name(&self, name: &str) -> Option<NodeId> {
        self.names.get(name).map(|s| s.holder)
    }

    pub(crate) fn resolve_pid(&self, host: u32, pid: u32) -> Option<NodeId> {
        self.by_pid
            .get(&(host, pid))
            .and_then(|v| v.last())
            .copied()
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

    /// Remote nodes whose route is `link`.
    pub(crate) fn n_behind(&self, link: LinkId) -> usize {
        self.links.get(&link).map_or(0, |l| l.nodes.len())
    }

    /// Distinct nodes ever placed behind `link` (the peer included).
    pub(crate) fn nodes_ever(&self, link: LinkId) -> u64 {
        self.links.get(&link).map_or(0, |l| l.ever)
    }

    /// Name claims refused since the last call.
    pub(crate) fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
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
        self.nodes.get(node).map(|e| Self::info(*node, e))
    }

    fn info(node: NodeId, e: &Entry) -> NodeInfo {
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
            .map(|(n, e)| Self::info(*n, e))
            .collect();
        others.sort_unstable_by_key(|i| i.node);
        upsert.extend(others);
        RouteUpdate {
            upsert,
            ..RouteUpdate::default()
        }
    }

    // -----------------------------------------------------------------------------------
    // Links

    /// A link opened: nodes may be placed behind it.
    pub(crate) fn add_link(&mut self, link: LinkId, role: LinkRole) {
        self.links.insert(
            link,
            LinkNodes {
                role,
                nodes: hash::set(self.me),
                ever: 0,
            },
        );
    }

    fn role(&self, link: LinkId) -> LinkRole {
        self.links.get(&link).map_or(LinkRole::Peer, |l| l.role)
    }

    /// Removes every node behind `link` and the link itself; returns them, sorted.
    pub(crate) fn remove_link(&mut self, link: LinkId) -> Vec<NodeId> {
        let Some(behind) = self.links.remove(&link) else {
            return Vec::new();
        };
        let mut gone: Vec<NodeId> = behind.nodes.into_iter().collect();
        gone.sort_unstable();
        for n in &gone {
            self.remove_node(n);
        }
        gone
    }

    // -----------------------------------------------------------------------------------
    // This node's names and groups

    /// Whether this node may take `name`: free, or its own already.
    pub(crate) fn name_free_for_me(&self, name: &str) -> Result<(), Taken> {
        match self.names.get(name) {
            Some(s) if s.holder != self.me => Err(Taken { holder: s.holder }),
            _ => Ok(()),
        }
    }

    /// This node registers a name. `Ok(false)` when it had it already; refused when another
    /// node holds it (unless `force`: a forked child given the name by its parent) or the
    /// bounds are reached.
    pub(crate) fn add_my_name(&mut self, name: &str, force: bool) -> Result<bool, NameRefusal> {
        if self.has_name(name) {
            return Ok(false);
        }
        if !force {
            if let Err(t) = self.name_free_for_me(name) {
                return Err(NameRefusal::Taken(t));
            }
        }
        if self.my_names.len() >= self.limits.max_names_per_node {
            return Err(NameRefusal::TooMany(self.limits.max_names_per_node));
        }
        if self.n_names >= self.limits.max_names {
            return Err(NameRefusal::TooMany(self.limits.max_names));
        }
        if let Some(old) = self.names.remove(name) {
            // Taken over (`force`): the old holder keeps its entry, not the name.
            if let Some(e) = self.nodes.get_mut(&old.holder) {
                e.names.retain(|n| n != name);
                self.n_names -= 1;
            }
        }
        self.my_version += 1;
        self.my_names.push(name.to_owned());
        self.n_names += 1;
        self.names
            .insert(name.to_owned(), NameSlot { holder: self.me });
        Ok(true)
    }

    pub(crate) fn remove_my_name(&mut self, name: &str) -> bool {
        let before = self.my_names.len();
        self.my_names.retain(|n| n != name);
        if self.my_names.len() == before {
            return false;
        }
        self.n_names -= 1;
        self.my_version += 1;
        self.release_name(name, self.me);
        true
    }

    pub(crate) fn join_group(&mut self, group: &str) -> Result<bool, NameRefusal> {
        if self.is_member(group) {
            return Ok(false);
        }
        if self.my_groups.len() >= self.limits.max_groups_per_node {
            return Err(NameRefusal::TooMany(self.limits.max_groups_per_node));
        }
        if self.n_groups >= self.limits.max_groups {
            return Err(NameRefusal::TooMany(self.limits.max_groups));
        }
        self.my_version += 1;
        self.my_groups.push(group.to_owned());
        self.n_groups += 1;
        self.groups
            .entry(group.to_owned())
            .or_default()
            .insert(self.me);
        Ok(true)
    }

    pub(crate) fn leave_group(&mut self, group: &str) -> bool {
        let before = self.my_groups.len();
        self.my_groups.retain(|g| g != group);
        if self.my_groups.len() == before {
            return false;
        }
        self.n_groups -= 1;
        self.my_version += 1;
        self.release_group(group, self.me);
        true
    }

    /// This node's current announcement counter.
    pub(crate) fn my_version(&self) -> u64 {
        self.my_version
    }

    // -----------------------------------------------------------------------------------
    // Remote nodes

    /// A neighbour is known the moment its link opens (bare: names come with its routes).
    /// A neighbour the tree knows already (a redundant link) stays where it is.
    pub(crate) fn add_neighbour(
        &mut self,
        node: NodeId,
        via: LinkId,
    ) -> Result<Applied<NodeInfo>, ProtocolError> {
        if node == self.me || self.nodes.contains_key(&node) || self.is_buried(&node) {
            return Ok(Applied::Unchanged);
        }
        self.insert(node, via, 0)?;
        Ok(Applied::Changed(NodeInfo {
            node,
            ..NodeInfo::default()
        }))
    }

    /// A forked child takes `names` from its parent (this node): the one sanctioned move
    /// of a name between nodes. Returns the names this node gave up (its own custody or
    /// names), for its own announcement.
    pub(crate) fn give_names(&mut self, child: NodeId, names: &[String]) -> Vec<String> {
        let mut mine = Vec::new();
        for name in names {
            if self.has_name(name) {
                self.my_names.retain(|n| n != name);
                self.n_names -= 1;
                self.my_version += 1;
                self.names.remove(name.as_str());
                mine.push(name.clone());
            }
            if self.n_names >= self.limits.max_names {
                continue;
            }
            let Some(e) = self.nodes.get_mut(&child) else {
                continue;
            };
            if !e.names.contains(name) {
                e.names.push(name.clone());
                self.n_names += 1;
            }
            self.move_name(name, child);
        }
        mine
    }

    /// Applies one node's full announcement, heard through `via`.
    ///
    /// An announcement no newer than what is known is stale. A node known behind another
    /// link is never moved: from a tree link that is a protocol violation (a node lives
    /// behind one link), from a peer link a redundant view (ignored).
    pub(crate) fn upsert(
        &mut self,
        info: &NodeInfo,
        via: LinkId,
    ) -> Result<Applied<NodeInfo>, ProtocolError> {
        let role = self.role(via);
        if info.node == self.me {
            return Self::elsewhere(role, info.node);
        }
        if self.is_buried(&info.node) {
            return Ok(Applied::Unchanged);
        }
        match self.nodes.get(&info.node).map(|e| (e.link, e.version)) {
            // The tree has the last word over a peer link's neighbour.
            Some((l, _)) if l != via && role.is_tree() && self.role(l) == LinkRole::Peer => {
                self.strip(&info.node);
                self.relink(info.node, l, via);
            }
            Some((l, _)) if l != via => return Self::elsewhere(role, info.node),
            Some((_, v)) if info.version <= v => return Ok(Applied::Unchanged),
            Some(_) => return self.replace_lists(info, via),
            None => self.insert(info.node, via, info.version)?,
        }
        self.check_per_node(info.names.len(), info.groups.len())?;
        let names = self.claim_names(info.node, via, &info.names)?;
        let groups = self.join_groups_of(info.node, &info.groups)?;
        if let Some(e) = self.nodes.get_mut(&info.node) {
            e.version = info.version;
        }
        Ok(Applied::Changed(NodeInfo {
            node: info.node,
            version: info.version,
            names,
            groups,
        }))
    }

    /// A newer full announcement of a known node, applied as the change it makes (names it
    /// keeps are not released and claimed again).
    fn replace_lists(
        &mut self,
        info: &NodeInfo,
        via: LinkId,
    ) -> Result<Applied<NodeInfo>, ProtocolError> {
        let Some(e) = self.nodes.get(&info.node) else {
            return Ok(Applied::Unchanged);
        };
        let delta = NodeDelta {
            node: info.node,
            version: info.version,
            add_names: info
                .names
                .iter()
                .filter(|n| !e.names.contains(n))
                .cloned()
                .collect(),
            remove_names: e
                .names
                .iter()
                .filter(|n| !info.names.contains(n))
                .cloned()
                .collect(),
            join_groups: info
                .groups
                .iter()
                .filter(|g| !e.groups.contains(g))
                .cloned()
                .collect(),
            leave_groups: e
                .groups
                .iter()
                .filter(|g| !info.groups.contains(g))
                .cloned()
                .collect(),
        };
        self.apply_delta(&delta, via)?;
        match self.info_of(&info.node) {
            Some(now) => Ok(Applied::Changed(now)),
            None => Ok(Applied::Unchanged),
        }
    }

    /// Applies a change to a node known behind `via`.
    pub(crate) fn apply_delta(
        &mut self,
        d: &NodeDelta,
        via: LinkId,
    ) -> Result<Applied<NodeDelta>, ProtocolError> {
        let role = self.role(via);
        if d.node == self.me {
            return Self::elsewhere(role, d.node);
        }
        let (n_names, n_groups) = match self.nodes.get(&d.node) {
            None => return Ok(Applied::Unchanged),
            Some(e) if e.link != via => return Self::elsewhere(role, d.node),
            Some(e) if d.version <= e.version => return Ok(Applied::Unchanged),
            Some(e) => (e.names.len(), e.groups.len()),
        };
        let mut out = NodeDelta {
            node: d.node,
            version: d.version,
            ..NodeDelta::default()
        };
        for name in &d.remove_names {
            let held = self
                .nodes
                .get_mut(&d.node)
                .map(|e| {
                    let before = e.names.len();
                    e.names.retain(|n| n != name);
                    e.names.len() != before
                })
                .unwrap_or(false);
            if held {
                self.n_names -= 1;
                self.release_name(name, d.node);
                out.remove_names.push(name.clone());
            }
        }
        for group in &d.leave_groups {
            let member = self
                .nodes
                .get_mut(&d.node)
                .map(|e| {
                    let before = e.groups.len();
                    e.groups.retain(|g| g != group);
                    e.groups.len() != before
                })
                .unwrap_or(false);
            if member {
                self.n_groups -= 1;
                self.release_group(group, d.node);
                out.leave_groups.push(group.clone());
            }
        }
        self.check_per_node(
            n_names.saturating_sub(out.remove_names.len()) + d.add_names.len(),
            n_groups.saturating_sub(out.leave_groups.len()) + d.join_groups.len(),
        )?;
        out.add_names = self.claim_names(d.node, via, &d.add_names)?;
        out.join_groups = self.join_groups_of(d.node, &d.join_groups)?;
        if let Some(e) = self.nodes.get_mut(&d.node) {
            e.version = d.version;
        }
        Ok(Applied::Changed(out))
    }

    /// Removes `node` if it is known through `via` (a removal from elsewhere is stale).
    pub(crate) fn remove_via(&mut self, node: &NodeId, via: LinkId) -> bool {
        if self.route(node) == Some(via) {
            self.remove_node(node);
            true
        } else {
            false
        }
    }

    fn elsewhere<T>(role: LinkRole, node: NodeId) -> Result<Applied<T>, ProtocolError> {
        if role.is_tree() {
            Err(ProtocolError::RouteConflict { node })
        } else {
            Ok(Applied::Ignored)
        }
    }

    fn relink(&mut self, node: NodeId, from: LinkId, to: LinkId) {
        if let Some(e) = self.nodes.get_mut(&node) {
            e.link = to;
        }
        if let Some(l) = self.links.get_mut(&from) {
            l.nodes.remove(&node);
        }
        if let Some(l) = self.links.get_mut(&to) {
            l.nodes.insert(node);
            l.ever += 1;
        }
    }

    fn check_per_node(&self, names: usize, groups: usize) -> Result<(), ProtocolError> {
        if names > self.limits.max_names_per_node || groups > self.limits.max_groups_per_node {
            return Err(ProtocolError::TooManyNames {
                max: self
                    .limits
                    .max_names_per_node
                    .max(self.limits.max_groups_per_node),
            });
        }
        Ok(())
    }

    fn insert(&mut self, node: NodeId, via: LinkId, version: u64) -> Result<(), ProtocolError> {
        if self.nodes.len() >= self.limits.max_nodes {
            return Err(ProtocolError::TooManyNodes {
                max: self.limits.max_nodes,
            });
        }
        self.nodes.insert(
            node,
            Entry {
                link: via,
                version,
                names: Vec::new(),
                groups: Vec::new(),
            },
        );
        if let Some(l) = self.links.get_mut(&via) {
            l.nodes.insert(node);
            l.ever += 1;
        }
        self.by_pid
            .entry((node.host, node.pid))
            .or_default()
            .push(node);
        Ok(())
    }

    /// Accepts what it can of `node`'s claims on `names`: a free name, or one whose
    /// holder lives behind the same link (a replacement in that subtree took it over).
    /// Returns the accepted ones.
    fn claim_names(
        &mut self,
        node: NodeId,
        via: LinkId,
        names: &[String],
    ) -> Result<Vec<String>, ProtocolError> {
        let mut accepted = Vec::new();
        for name in names {
            if accepted.contains(name) {
                continue;
            }
            let take = match self.names.get(name.as_str()) {
                None => true,
                Some(s) if s.holder == node => false,
                Some(s) if s.holder != self.me && self.route(&s.holder) == Some(via) => true,
                Some(_) => {
                    self.refused += 1;
                    continue;
                }
            };
            if self.n_names >= self.limits.max_names {
                return Err(ProtocolError::TooManyNames {
                    max: self.limits.max_names,
                });
            }
            if take {
                self.move_name(name, node);
            }
            if let Some(e) = self.nodes.get_mut(&node) {
                if !e.names.contains(name) {
                    e.names.push(name.clone());
                    self.n_names += 1;
                }
            }
            accepted.push(name.clone());
        }
        Ok(accepted)
    }

    /// Gives `name` to `node`; a previous remote holder keeps its entry, not the name.
    fn move_name(&mut self, name: &str, node: NodeId) {
        let old = self
            .names
            .insert(name.to_owned(), NameSlot { holder: node });
        if let Some(old) = old.filter(|o| o.holder != node) {
            if let Some(e) = self.nodes.get_mut(&old.holder) {
                let before = e.names.len();
                e.names.retain(|n| n != name);
                self.n_names -= before - e.names.len();
            }
        }
    }

    fn join_groups_of(
        &mut self,
        node: NodeId,
        groups: &[String],
    ) -> Result<Vec<String>, ProtocolError> {
        let mut accepted = Vec::new();
        for g in groups {
            let Some(e) = self.nodes.get_mut(&node) else {
                break;
            };
            if e.groups.contains(g) {
                continue;
            }
            if self.n_groups >= self.limits.max_groups {
                return Err(ProtocolError::TooManyNames {
                    max: self.limits.max_groups,
                });
            }
            e.groups.push(g.clone());
            self.n_groups += 1;
            self.groups.entry(g.clone()).or_default().insert(node);
            accepted.push(g.clone());
        }
        Ok(accepted)
    }

    fn bury(&mut self, node: NodeId) {
        if self.tombstones.insert(node) {
            self.tombstone_order.push_back(node);
            if self.tombstone_order.len() > self.limits.max_nodes {
                if let Some(old) = self.tombstone_order.pop_front() {
                    self.tombstones.remove(&old);
                }
            }
        }
    }

    /// Removes a node that left (buried: it never comes back).
    fn remove_node(&mut self, node: &NodeId) {
        let Some(link) = self.route(node) else {
            return;
        };
        self.bury(*node);
        self.strip(node);
        self.nodes.remove(node);
        if let Some(l) = self.links.get_mut(&link) {
            l.nodes.remove(node);
        }
        let key = (node.host, node.pid);
        if let Some(v) = self.by_pid.get_mut(&key) {
            v.retain(|n| n != node);
            if v.is_empty() {
                self.by_pid.remove(&key);
            }
        }
    }

    /// Takes a node's names and groups away (its entry stays).
    fn strip(&mut self, node: &NodeId) {
        let Some(e) = self.nodes.get_mut(node) else {
            return;
        };
        let names = std::mem::take(&mut e.names);
        let groups = std::mem::take(&mut e.groups);
        self.n_names -= names.len();
        self.n_groups -= groups.len();
        for n in &names {
            self.release_name(n, *node);
        }
        for g in &groups {
            self.release_group(g, *node);
        }
    }

    /// `node` no longer holds `name`.
    fn release_name(&mut self, name: &str, node: NodeId) {
        if self.names.get(name).is_some_and(|s| s.holder == node) {
            self.names.remove(name);
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

/// Why this node may not take a name or join a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NameRefusal {
    Taken(Taken),
    TooMany(usize),
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

    fn limits(max_nodes: usize) -> TableLimits {
        TableLimits {
            max_nodes,
            max_names_per_node: 8,
            max_groups_per_node: 8,
            max_names: 64,
            max_groups: 64,
        }
    }

    /// A table with child links 0 and 1 and a parent link 2.
    fn table(max_nodes: usize) -> RouteTable {
        let mut t = RouteTable::new(n(1), limits(max_nodes));
        t.add_link(l(0), LinkRole::Child);
        t.add_link(l(1), LinkRole::Child);
        t.add_link(l(2), LinkRole::Parent);
        t.add_link(l(3), LinkRole::Peer);
        t
    }

    fn info(node: NodeId, version: u64, names: &[&str], groups: &[&str]) -> NodeInfo {
        NodeInfo {
            node,
            version,
            names: names.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn changed<T>(a: Result<Applied<T>, ProtocolError>) -> bool {
        matches!(a, Ok(Applied::Changed(_)))
    }

    #[test]
    fn upsert_is_idempotent_and_replaces() {
        let mut t = table(16);
        let first = info(n(2), 1, &["a"], &["g"]);
        assert!(changed(t.upsert(&first, l(0))));
        assert_eq!(t.upsert(&first, l(0)), Ok(Applied::Unchanged));
        assert_eq!(t.resolve_name("a"), Some(n(2)));
        assert!(changed(t.upsert(&info(n(2), 2, &["b"], &[]), l(0))));
        assert_eq!(t.resolve_name("a"), None);
        assert_eq!(t.resolve_name("b"), Some(n(2)));
        assert!(t.group_links("g", None).is_empty());
    }

    #[test]
    fn removing_a_link_removes_everything_behind_it_and_only_that() {
        let mut t = table(16);
        t.upsert(&info(n(2), 1, &["a"], &["g"]), l(0)).expect("ok");
        t.upsert(&info(n(3), 1, &[], &["g"]), l(0)).expect("ok");
        t.upsert(&info(n(4), 1, &[], &["g"]), l(1)).expect("ok");
        assert_eq!(t.group_links("g", None), vec![l(0), l(1)]);
        assert_eq!(t.group_links("g", Some(l(0))), vec![l(1)]);
        assert_eq!(t.nodes_ever(l(0)), 2);
        assert_eq!(t.remove_link(l(0)), vec![n(2), n(3)]);
        assert_eq!(t.routes(), vec![(n(4), l(1))]);
        assert_eq!(t.resolve_name("a"), None);
        assert_eq!(t.resolve_pid(0, 2), None);
        assert_eq!(t.group_links("g", None), vec![l(1)]);
        assert_eq!(t.remove_link(l(0)), Vec::<NodeId>::new());
    }

    #[test]
    fn a_node_is_never_moved_and_a_tree_link_that_tries_is_a_violation() {
        let mut t = table(16);
        t.upsert(&info(n(2), 1, &["a"], &[]), l(0)).expect("ok");
        assert_eq!(
            t.upsert(&info(n(2), 2, &["b"], &[]), l(1)),
            Err(ProtocolError::RouteConflict { node: n(2) })
        );
        assert_eq!(
            t.upsert(&info(n(2), 3, &["b"], &[]), l(3)),
            Ok(Applied::Ignored),
            "a peer link's view is redundant"
        );
        assert_eq!(
            t.upsert(&info(n(1), 9, &[], &[]), l(2)),
            Err(ProtocolError::RouteConflict { node: n(1) }),
            "nobody else announces this node"
        );
        assert_eq!(t.route(&n(2)), Some(l(0)));
        assert_eq!(t.resolve_name("a"), Some(n(2)));
        // A conflicting neighbour stays where the tree put it.
        assert_eq!(t.add_neighbour(n(2), l(3)), Ok(Applied::Unchanged));
        assert_eq!(t.route(&n(2)), Some(l(0)));
    }

    #[test]
    fn stale_removal_from_another_link_is_ignored() {
        let mut t = table(16);
        t.upsert(&info(n(2), 1, &[], &[]), l(0)).expect("ok");
        assert!(!t.remove_via(&n(2), l(1)));
        assert!(t.remove_via(&n(2), l(0)));
        assert!(!t.contains(&n(2)));
    }

    #[test]
    fn a_name_moves_to_a_replacement_in_the_same_subtree() {
        let mut t = table(16);
        let old = NodeId::new(0, 7, 1);
        let new = NodeId::new(0, 7, 2);
        t.upsert(&info(old, 1, &["w"], &[]), l(0)).expect("ok");
        t.upsert(&info(new, 1, &["w"], &[]), l(0)).expect("ok");
        assert_eq!(t.resolve_name("w"), Some(new));
        assert_eq!(t.resolve_pid(0, 7), Some(new));
        // The old one leaving takes nothing from the new one; the new one leaving frees it.
        assert!(t.remove_via(&old, l(0)));
        assert_eq!(t.resolve_name("w"), Some(new));
        assert_eq!(t.resolve_pid(0, 7), Some(new));
        assert!(t.remove_via(&new, l(0)));
        assert_eq!(t.resolve_name("w"), None);
    }

    #[test]
    fn a_name_held_elsewhere_is_not_taken() {
        let mut t = table(16);
        t.upsert(&info(n(2), 1, &["db"], &[]), l(0)).expect("ok");
        assert!(changed(t.upsert(&info(n(3), 1, &["db"], &[]), l(1))));
        assert_eq!(t.resolve_name("db"), Some(n(2)));
        assert_eq!(t.take_refused(), 1);
        assert_eq!(t.info_of(&n(3)).map(|i| i.names), Some(Vec::new()));
        // When the holder leaves, the refused claimant does not inherit it.
        t.remove_link(l(0));
        assert_eq!(t.resolve_name("db"), None);
        // This node's own names are not taken by a claim either.
        t.add_my_name("me", false).expect("free");
        t.upsert(&info(n(5), 1, &["me"], &[]), l(2)).expect("ok");
        assert_eq!(t.resolve_name("me"), Some(n(1)));
        assert_eq!(
            t.add_my_name("x", false),
            Ok(true),
            "a free name can be taken"
        );
        t.upsert(&info(n(6), 1, &["y"], &[]), l(2)).expect("ok");
        assert_eq!(
            t.add_my_name("y", false),
            Err(NameRefusal::Taken(Taken { holder: n(6) }))
        );
        assert_eq!(t.add_my_name("y", true), Ok(true), "given by the parent");
        assert_eq!(t.resolve_name("y"), Some(n(1)));
    }

    #[test]
    fn giving_names_to_a_child_moves_them_and_own_names_go() {
        let mut t = table(16);
        t.add_my_name("w", false).expect("free");
        t.add_neighbour(n(9), l(1)).expect("room");
        let gone = t.give_names(n(9), &["w".to_string()]);
        assert_eq!(gone, vec!["w".to_string()]);
        assert!(!t.has_name("w"));
        assert_eq!(t.resolve_name("w"), Some(n(9)));
    }

    #[test]
    fn own_names_and_groups() {
        let mut t = table(16);
        assert_eq!(t.add_my_name("root", false), Ok(true));
        assert_eq!(t.add_my_name("root", false), Ok(false));
        assert_eq!(t.resolve_name("root"), Some(n(1)));
        assert_eq!(t.resolve_pid(0, 1), Some(n(1)));
        assert_eq!(t.join_group("g"), Ok(true));
        assert!(t.is_member("g"));
        assert!(t.group_links("g", None).is_empty(), "self is not a link");
        assert!(t.leave_group("g"));
        assert!(!t.is_member("g"));
        assert!(t.remove_my_name("root"));
        assert_eq!(t.resolve_name("root"), None);
    }

    #[test]
    fn a_node_that_left_never_comes_back() {
        let mut t = table(16);
        t.upsert(&info(n(2), 1, &[], &[]), l(0)).expect("ok");
        assert!(t.remove_via(&n(2), l(0)));
        assert_eq!(
            t.upsert(&info(n(2), 5, &[], &[]), l(0)),
            Ok(Applied::Unchanged)
        );
        assert_eq!(t.add_neighbour(n(2), l(1)), Ok(Applied::Unchanged));
        assert!(!t.contains(&n(2)));
    }

    #[test]
    fn deltas_apply_once_in_order_and_are_bounded() {
        let mut t = table(16);
        t.upsert(&info(n(2), 1, &["a"], &[]), l(0)).expect("ok");
        let d = NodeDelta {
            node: n(2),
            version: 2,
            add_names: vec!["b".into()],
            remove_names: vec!["a".into(), "zz".into()],
            join_groups: vec!["g".into()],
            leave_groups: Vec::new(),
        };
        let Ok(Applied::Changed(fwd)) = t.apply_delta(&d, l(0)) else {
            panic!("applied");
        };
        assert_eq!(
            fwd.remove_names,
            vec!["a".to_string()],
            "only what was held"
        );
        assert_eq!(t.resolve_name("b"), Some(n(2)));
        assert_eq!(t.resolve_name("a"), None);
        assert_eq!(t.group_links("g", None), vec![l(0)]);
        assert_eq!(t.apply_delta(&d, l(0)), Ok(Applied::Unchanged), "stale");
        assert_eq!(
            t.apply_delta(
                &NodeDelta {
                    version: 3,
                    ..d.clone()
                },
                l(1)
            ),
            Err(ProtocolError::RouteConflict { node: n(2) })
        );
        let many = NodeDelta {
            node: n(2),
            version: 4,
            add_names: (0..8).map(|i| format!("n{i}")).collect(),
            ..NodeDelta::default()
        };
        assert!(matches!(
            t.apply_delta(&many, l(0)),
            Err(ProtocolError::TooManyNames { .. })
        ));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = table(2);
        assert!(changed(t.add_neighbour(n(2), l(0))));
        assert!(changed(t.upsert(&info(n(3), 1, &[], &[]), l(0))));
        assert_eq!(
            t.upsert(&info(n(4), 1, &[], &[]), l(0)),
            Err(ProtocolError::TooManyNodes { max: 2 })
        );
        assert_eq!(t.n_nodes(), 2);
    }

    #[test]
    fn dump_leaves_out_the_asking_link() {
        let mut t = table(16);
        t.add_my_name("me", false).expect("free");
        t.upsert(&info(n(2), 1, &[], &[]), l(0)).expect("ok");
        t.upsert(&info(n(3), 1, &[], &[]), l(1)).expect("ok");
        let d = t.dump(Some(l(0)));
        let nodes: Vec<NodeId> = d.upsert.iter().map(|i| i.node).collect();
        assert_eq!(nodes, vec![n(1), n(3)]);
        assert_eq!(d.upsert[0].names, vec!["me".to_string()]);
    }

    /// Many nodes behind one link, with names and a shared group, removed in one go: every
    /// index is left consistent (what stays resolves, nothing gone does).
    #[test]
    fn a_big_teardown_is_linear() {
        let mut t = RouteTable::new(
            n(1),
            TableLimits {
                max_nodes: 1 << 17,
                max_names_per_node: 4,
                max_groups_per_node: 4,
                max_names: 1 << 18,
                max_groups: 1 << 18,
            },
        );
        t.add_link(l(0), LinkRole::Child);
        t.add_link(l(1), LinkRole::Child);
        for pid in 0..60_000u32 {
            let names = [format!("a{pid}"), format!("b{pid}")];
            let info = NodeInfo {
                node: NodeId::new(0, 10 + pid, 1),
                version: 1,
                names: names.to_vec(),
                groups: vec!["g".into()],
            };
            t.upsert(&info, l(0)).expect("room");
        }
        t.upsert(&info(n(5), 1, &["keep"], &["g"]), l(1))
            .expect("room");
        // Quadratic, this took seconds per thousand nodes; `cargo bench -p forkbus-router
        // --bench core` times it.
        assert_eq!(t.remove_link(l(0)).len(), 60_000);
        assert_eq!(t.resolve_name("keep"), Some(n(5)));
        assert_eq!(t.group_links("g", None), vec![l(1)]);
    }
}
