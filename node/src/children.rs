//! The children of a process and where each is in its life.
//!
//! ```text
//!            hello             EXIT sent (drain)       link down (EOF, error)
//!   Forked ─────────► Running ───────────────► Stopping ─────────────────► Unlinked
//!     │                  │                        │                          │ reaped
//!     │                  │                        │                          ▼
//!     └──────────────────┴────────reaped──────────┴──► Exited ──peer shutdown──► gone
//!                                                                         (child exit)
//! ```
//!
//! (Any linked state goes to Unlinked when its link goes down first.) How it ended —
//! exited with a code or killed by a signal — is the `ExitStatus` its exit carries.
//!
//! A child's link may go down before or after the child is reaped; both orders end in one
//! peer shutdown and then one child exit, and the exit knows how many processes the
//! child's subtree ever had (its link said, when it went down), for the tally.
//!
//! Processes a service owns without a link (programs started by `exec`) are held apart:
//! they count for the drain (a node does not exit before them) but have no life here.

use std::collections::{BTreeMap, BTreeSet};

use forkbus_router::{LinkId, NodeId};

use crate::process::{ExitStatus, Pid};

/// Where a child is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChildState {
    /// Forked (or adopted): its link is open, its hello not heard yet.
    Forked {
        /// Its link.
        link: LinkId,
    },
    /// It said hello.
    Running {
        /// Its link.
        link: LinkId,
    },
    /// The drain told it to exit (its subtree was quiet); it exits once its own children
    /// are gone.
    Stopping {
        /// Its link.
        link: LinkId,
    },
    /// Its link is down; it is not reaped yet.
    Unlinked {
        /// Processes its subtree ever had, as its link said when it went down.
        seen: u64,
    },
    /// Reaped while its link was open: the link is going down, and the exit follows its
    /// peer shutdown.
    Exited {
        /// How it ended.
        status: ExitStatus,
        /// Its link, going down.
        link: LinkId,
    },
}

impl ChildState {
    /// Its link while open (not yet down).
    pub fn link(self) -> Option<LinkId> {
        match self {
            Self::Forked { link } | Self::Running { link } | Self::Stopping { link } => Some(link),
            Self::Unlinked { .. } | Self::Exited { .. } => None,
        }
    }
}

/// One child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Child {
    /// Its node.
    pub node: NodeId,
    /// Where it is in its life.
    pub state: ChildState,
}

/// The children of this process, by pid, and the processes services hold.
#[derive(Debug, Default)]
pub(crate) struct ChildTable {
    children: BTreeMap<Pid, Child>,
    held: BTreeSet<Pid>,
}

impl ChildTable {
    pub(crate) fn insert(&mut self, pid: Pid, node: NodeId, link: LinkId) {
        self.children.insert(
            pid,
            Child {
                node,
                state: ChildState::Forked { link },
            },
        );
    }

    pub(crate) fn get(&self, pid: Pid) -> Option<&Child> {
        self.children.get(&pid)
    }

    pub(crate) fn get_mut(&mut self, pid: Pid) -> Option<&mut Child> {
        self.children.get_mut(&pid)
    }

    pub(crate) fn remove(&mut self, pid: Pid) -> Option<Child> {
        self.children.remove(&pid)
    }

    /// The child whose open link this is.
    pub(crate) fn by_link(&self, link: LinkId) -> Option<Pid> {
        self.children
            .iter()
            .find(|(_, c)| c.state.link() == Some(link))
            .map(|(p, _)| *p)
    }

    pub(crate) fn pids(&self) -> Vec<Pid> {
        self.children.keys().copied().collect()
    }

    /// Children whose link is open, the ones that take part in the drain's waves.
    pub(crate) fn linked(&self) -> Vec<Pid> {
        self.children
            .iter()
            .filter(|(_, c)| c.state.link().is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.children.len()
    }

    pub(crate) fn hold(&mut self, pid: Pid) {
        self.held.insert(pid);
    }

    pub(crate) fn release(&mut self, pid: Pid) -> bool {
        self.held.remove(&pid)
    }

    pub(crate) fn held(&self) -> impl Iterator<Item = Pid> + '_ {
        self.held.iter().copied()
    }

    /// No child and no held process left.
    pub(crate) fn is_empty(&self) -> bool {
        self.children.is_empty() && self.held.is_empty()
    }
}
