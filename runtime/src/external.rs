//! Programs that join the tree as nodes: [`Bus::exec_node`] in the parent,
//! [`Bus::join_from_env`] in the program.
//!
//! ```text
//!   parent (any bus process)                      the program (after execve)
//!   ────────────────────────                      ─────────────────────────────
//!   socketpair ── ours: link to the child         fd 3 ── theirs (FORKBUS_FD=3)
//!   fork; the child dup2s theirs to 3, sets       Bus::join_from_env(config):
//!     FORKBUS_FD, FORKBUS_PARENT, FORKBUS_          reads and removes the variables,
//!     INCARNATION, and execs                        checks its parent and the socket,
//!   route to the node usable at once;               builds a bus whose parent link is
//!   child table: reaped, drained, reported          fd 3; hello + tables over the wire
//! ```
//!
//! The program is a node like any other: addressable by pid and name, in broadcasts and
//! groups; when it goes away its parent reports one peer shutdown with the lost list and one
//! child exit (either order), as for a forked child. The node's own id is
//! `(host of the parent, its pid, FORKBUS_INCARNATION)`, so the parent knows it before its
//! hello arrives.
//!
//! `examples/external_node.rs` is such a program, written against the public API only.

use crate::child::PidExt;
use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use forkbus_router::NodeId;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::stat::{fstat, SFlag};

use crate::bus::{Bus, BusConfig};
use crate::child::Pid;
use crate::clock::nonce;
use crate::exec::{start, Command, ExecError, Input, Output, Redirect, Started};

/// The descriptor a node program finds its parent link on.
pub const NODE_FD: RawFd = 3;
/// Names the descriptor of the parent link (`3`).
pub const ENV_FD: &str = "FORKBUS_FD";
/// Names the parent node: `host:pid:incarnation`, decimal.
pub const ENV_PARENT: &str = "FORKBUS_PARENT";
/// The node program's incarnation nonce, decimal.
pub const ENV_INCARNATION: &str = "FORKBUS_INCARNATION";

/// What a node program was told by its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NodeEnv {
    pub(crate) fd: RawFd,
    pub(crate) parent: NodeId,
    pub(crate) incarnation: u32,
}

/// `host:pid:incarnation`.
pub(crate) fn format_node(node: NodeId) -> String {
    format!("{}:{}:{}", node.host, node.pid, node.incarnation)
}

fn bad(what: &str, value: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed {what}: {value:?}"),
    )
}

/// Parses the three variables (missing ones are `NotFound`).
pub(crate) fn parse_node_env(
    fd: Option<&str>,
    parent: Option<&str>,
    incarnation: Option<&str>,
) -> io::Result<NodeEnv> {
    let missing = |name: &str| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{name} is not set: this program was not started as a forkbus node"),
        )
    };
    let fd_text = fd.ok_or_else(|| missing(ENV_FD))?;
    let parent_text = parent.ok_or_else(|| missing(ENV_PARENT))?;
    let inc_text = incarnation.ok_or_else(|| missing(ENV_INCARNATION))?;
    let fd: RawFd = fd_text
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| bad(ENV_FD, fd_text))?;
    let parts: Vec<u32> = parent_text
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| bad(ENV_PARENT, parent_text))?;
    let parent = match parts.as_slice() {
        [host, pid, inc] if *pid > 0 && *inc > 0 => NodeId::new(*host, *pid, *inc),
        _ => return Err(bad(ENV_PARENT, parent_text)),
    };
    let incarnation: u32 = inc_text
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| bad(ENV_INCARNATION, inc_text))?;
    Ok(NodeEnv {
        fd,
        parent,
        incarnation,
    })
}

impl Bus {
    /// Starts a program as a node of the tree, a child of this one: it inherits one end of a
    /// socketpair as descriptor [`NODE_FD`] (named in [`ENV_FD`], with [`ENV_PARENT`] and
    /// [`ENV_INCARNATION`] in its environment) and joins with [`Bus::join_from_env`].
    /// Returns its pid once it is running (after `execve`); its route is usable at once (what
    /// is sent before it joins waits in the socket).
    ///
    /// It is then a child like a forked one: a graceful shutdown tells it to drain, its
    /// exit comes to `on_child_exit` and its link's end to `on_peer_shutdown` with the lost
    /// list. The command's arguments, environment, directory, user and groups, process group
    /// and parent-death setting apply as for [`Bus::exec`]; its standard streams may be
    /// `Null` or `Inherit` only, and it has no timeout ([`ExecError::NotForNode`] otherwise):
    /// stop it with a message, a shutdown or a signal.
    pub fn exec_node(&mut self, command: &Command) -> Result<Pid, ExecError> {
        if self.is_stopping() {
            return Err(ExecError::ShuttingDown);
        }
        if matches!(command.stdin, Input::Bytes(_)) {
            return Err(ExecError::NotForNode("input bytes"));
        }
        if command.stdout == Output::Capture || command.stderr == Output::Capture {
            return Err(ExecError::NotForNode(
                "captured output (use Output::Inherit or Output::Null)",
            ));
        }
        if command.timeout.is_some() {
            return Err(ExecError::NotForNode("a timeout"));
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let flags = nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        let incarnation = nonce(u32::try_from(self.children().len()).unwrap_or(0));
        let me = self.node();
        let env = [
            (OsString::from(ENV_FD), OsString::from(NODE_FD.to_string())),
            (OsString::from(ENV_PARENT), OsString::from(format_node(me))),
            (
                OsString::from(ENV_INCARNATION),
                OsString::from(incarnation.to_string()),
            ),
        ];
        let link_end = Redirect::new(theirs, NODE_FD)?;
        let Started { pid, .. } = start(command, &env, vec![link_end], NODE_FD + 1)?;
        let node = NodeId::new(me.host, pid.as_raw(), incarnation);
        if let Err(e) = self.adopt_node(ours, pid, node) {
            let _ = kill(pid.nix(), Signal::SIGKILL);
            while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(pid.nix(), None) {}
            return Err(ExecError::Io(e));
        }
        tracing::debug!(%node, program = ?command.program(), "node started");
        Ok(pid)
    }

    /// In a program started with [`Bus::exec_node`]: the bus of this process, a node of
    /// its parent's tree, whose parent link is the inherited descriptor.
    ///
    /// Reads and removes [`ENV_FD`], [`ENV_PARENT`] and [`ENV_INCARNATION`] (so that the
    /// program's own children do not see them), checks that the parent named is this
    /// process's parent and that the descriptor is a socket, makes it close-on-exec and
    /// non-blocking, and builds the bus as [`Bus::root`] does (same signal handling; call it
    /// before starting threads) with `config.host` replaced by the parent's. `config.name`,
    /// when set, is registered as this node's name. Errors: `NotFound` when the variables
    /// are missing (not started as a node), `InvalidData` when they are malformed or
    /// meant for another process.
    pub fn join_from_env(mut config: BusConfig) -> io::Result<Self> {
        let var = |name: &str| std::env::var(name).ok();
        let env = parse_node_env(
            var(ENV_FD).as_deref(),
            var(ENV_PARENT).as_deref(),
            var(ENV_INCARNATION).as_deref(),
        )?;
        for name in [ENV_FD, ENV_PARENT, ENV_INCARNATION] {
            std::env::remove_var(name);
        }
        let ppid = nix::unistd::getppid().as_raw();
        if u32::try_from(ppid).ok() != Some(env.parent.pid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{ENV_PARENT} names pid {}, but the parent is {ppid}: the variables were inherited from another process",
                    env.parent.pid
                ),
            ));
        }
        // SAFETY: fstat on a descriptor number only reads its metadata.
        let stat = fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(env.fd) })?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("descriptor {} is not a socket", env.fd),
            ));
        }
        // SAFETY: the parent passed this descriptor to this process for this purpose; it is
        // open (fstat succeeded), and the variables naming it were removed above, so no
        // other call takes ownership of it.
        let fd = unsafe { OwnedFd::from_raw_fd(env.fd) };
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD)?;
        let flags = nix::fcntl::FdFlag::from_bits_truncate(flags) | nix::fcntl::FdFlag::FD_CLOEXEC;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(flags))?;
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        config.host = env.parent.host;
        Self::joined(config, env.incarnation, env.parent, fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_environment_parses() {
        let env = parse_node_env(Some("3"), Some("7:1234:99"), Some("42"));
        assert_eq!(
            env.ok(),
            Some(NodeEnv {
                fd: 3,
                parent: NodeId::new(7, 1234, 99),
                incarnation: 42
            })
        );
        assert_eq!(format_node(NodeId::new(7, 1234, 99)), "7:1234:99");
    }

    #[test]
    fn malformed_or_missing_node_environment_is_refused() {
        let kind = |r: io::Result<NodeEnv>| r.err().map(|e| e.kind());
        assert_eq!(
            kind(parse_node_env(None, Some("0:1:1"), Some("1"))),
            Some(io::ErrorKind::NotFound)
        );
        assert_eq!(
            kind(parse_node_env(Some("3"), None, Some("1"))),
            Some(io::ErrorKind::NotFound)
        );
        for (fd, parent, inc) in [
            ("1", "0:1:1", "1"),
            ("x", "0:1:1", "1"),
            ("3", "0:1", "1"),
            ("3", "0:1:1:1", "1"),
            ("3", "0:0:1", "1"),
            ("3", "0:1:0", "1"),
            ("3", "a:1:1", "1"),
            ("3", "0:1:1", "0"),
            ("3", "0:1:1", "-4"),
        ] {
            assert_eq!(
                kind(parse_node_env(Some(fd), Some(parent), Some(inc))),
                Some(io::ErrorKind::InvalidData),
                "{fd} {parent} {inc}"
            );
        }
    }
}
