//! Children: pids, exit statuses and the table of a process's children.

use std::collections::BTreeMap;
use std::fmt;

use forkbus_router::{Address, LinkId, NodeId};
use nix::sys::wait::WaitStatus;

/// A process id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(u32);

impl Pid {
    /// A pid from its number.
    pub const fn from_raw(pid: u32) -> Self {
        Self(pid)
    }

    /// Its number.
    pub const fn as_raw(self) -> u32 {
        self.0
    }

    /// This process.
    pub fn this() -> Self {
        Self(std::process::id())
    }

    pub(crate) fn nix(self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.0).unwrap_or(i32::MAX))
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Pid> for Address {
    fn from(p: Pid) -> Self {
        Self::Pid(p.0)
    }
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The exit of a `waitpid` status; `None` for a child that did not end (stopped,
    /// continued, still alive).
    pub fn from_wait(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(_, code) => Some(Self::Code(code)),
            WaitStatus::Signaled(_, signal, _) => Some(Self::Signal(signal as i32)),
            _ => None,
        }
    }

    /// The exit of a raw `wait` status word; `None` for one that is not an end.
    pub fn from_raw(status: i32) -> Option<Self> {
        use nix::libc;
        if libc::WIFEXITED(status) {
            Some(Self::Code(libc::WEXITSTATUS(status)))
        } else if libc::WIFSIGNALED(status) {
            Some(Self::Signal(libc::WTERMSIG(status)))
        } else {
            None
        }
    }

    /// Whether it exited with code zero.
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exited with code {c}"),
            Self::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// One child. Its link may go down before or after its reaping; both orders give one peer
/// shutdown and one child exit.
#[derive(Debug)]
pub(crate) struct Child {
    pub(crate) node: NodeId,
    /// Its link while open.
    pub(crate) link: Option<LinkId>,
    /// Processes its subtree ever had, as this node heard (set when its link went down).
    pub(crate) seen: u64,
}

impl Child {
    pub(crate) fn new(node: NodeId, link: LinkId) -> Self {
        Self {
            node,
            link: Some(link),
            seen: 0,
        }
    }
}

/// The children of this process, by pid.
#[derive(Debug, Default)]
pub(crate) struct ChildTable {
    children: BTreeMap<Pid, Child>,
}

impl ChildTable {
    pub(crate) fn insert(&mut self, pid: Pid, child: Child) {
        self.children.insert(pid, child);
    }

    pub(crate) fn remove(&mut self, pid: Pid) -> Option<Child> {
        self.children.remove(&pid)
    }

    pub(crate) fn get_mut(&mut self, pid: Pid) -> Option<&mut Child> {
        self.children.get_mut(&pid)
    }

    pub(crate) fn pids(&self) -> Vec<Pid> {
        self.children.keys().copied().collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.children.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Pid, &Child)> {
        self.children.iter().map(|(p, c)| (*p, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_status_from_wait() {
        let p = nix::unistd::Pid::from_raw(42);
        assert_eq!(
            ExitStatus::from_wait(WaitStatus::Exited(p, 3)),
            Some(ExitStatus::Code(3))
        );
        assert_eq!(
            ExitStatus::from_wait(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(ExitStatus::Signal(9))
        );
        assert_eq!(
            ExitStatus::from_wait(WaitStatus::Stopped(p, Signal::SIGSTOP)),
            None
        );
        assert_eq!(ExitStatus::from_wait(WaitStatus::StillAlive), None);
    }

    #[test]
    fn exit_status_from_raw_words() {
        // Exit code in the second byte, signal in the low seven bits, 0x7f means stopped.
        assert_eq!(ExitStatus::from_raw(0), Some(ExitStatus::Code(0)));
        assert_eq!(ExitStatus::from_raw(3 << 8), Some(ExitStatus::Code(3)));
        assert_eq!(ExitStatus::from_raw(255 << 8), Some(ExitStatus::Code(255)));
        assert_eq!(ExitStatus::from_raw(9), Some(ExitStatus::Signal(9)));
        assert_eq!(
            ExitStatus::from_raw(15 | 0x80),
            Some(ExitStatus::Signal(15))
        );
        assert_eq!(ExitStatus::from_raw((19 << 8) | 0x7f), None);
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Code(1).success());
        assert!(!ExitStatus::Signal(9).success());
    }

    #[test]
    fn exit_status_display() {
        assert_eq!(ExitStatus::Code(2).to_string(), "exited with code 2");
        assert_eq!(ExitStatus::Signal(9).to_string(), "killed by SIGKILL");
        assert_eq!(ExitStatus::Signal(99).to_string(), "killed by signal 99");
    }

    #[test]
    fn pid_is_an_address() {
        assert_eq!(Address::from(Pid::from_raw(7)), Address::Pid(7));
        assert_eq!(Pid::from_raw(7).to_string(), "7");
    }
}
