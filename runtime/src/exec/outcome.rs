//! The result and error model of [`Bus::exec`]: the [`ExecId`] of a run, the [`ExecOutput`]
//! that reaches the callback (with the [`Intervention`] of the bus, if any), and the
//! [`ExecError`] returned when a program did not start, with the [`SpawnStage`] of a failure
//! in the child or the [`InvalidCommand`] found before `fork`. Plain data and its
//! `Display`, `Error` and `From` impls: nothing here touches a process.

use std::fmt;
use std::io;
use std::time::Duration;

use nix::errno::Errno;

#[cfg(doc)]
use crate::bus::Bus;
use crate::identity::IdentityError;
use forkbus_node::{ExitStatus, Pid};

#[cfg(doc)]
use super::{Command, Input};
use super::{Stream, MAX_CHILD_GROUPS};

/// One run of [`Bus::exec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecId(pub(super) u64);

impl fmt::Display for ExecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exec#{}", self.0)
    }
}

/// Why the bus signalled the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Intervention {
    /// The [timeout](Command::timeout) passed: the cancel signal was sent (and `SIGKILL` if
    /// the program outlived the grace period, see [`ExecOutput::killed`]).
    Timeout,
    /// [`Bus::cancel_exec`] (or a graceful shutdown of the bus) cancelled it.
    Cancelled,
    /// A captured stream went past [`Command::max_output`]: the program was killed
    /// (`SIGKILL`) and the excess discarded.
    OutputLimit {
        /// Which stream.
        stream: Stream,
        /// The bound, in bytes: what the stream kept.
        limit: usize,
    },
}

impl fmt::Display for Intervention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timed out"),
            Self::Cancelled => f.write_str("cancelled"),
            Self::OutputLimit { stream, limit } => {
                write!(f, "killed: {stream} passed its bound of {limit} bytes")
            }
        }
    }
}

/// How a program run by [`Bus::exec`] ended, with what it wrote.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ExecOutput {
    /// Which run.
    pub id: ExecId,
    /// Its process id.
    pub pid: Pid,
    /// How it ended. `None` only when something else in this process reaped it (a
    /// `waitpid(-1)` outside the bus): then its exit cannot be known.
    pub status: Option<ExitStatus>,
    /// Its standard output (empty unless captured), at most [`Command::max_output`] bytes.
    pub stdout: Vec<u8>,
    /// Its standard error (empty unless captured), at most [`Command::max_output`] bytes.
    pub stderr: Vec<u8>,
    /// From the fork to the moment the exit was reaped and both pipes closed.
    pub duration: Duration,
    /// Why the bus signalled it, if it did.
    pub intervention: Option<Intervention>,
    /// The bus sent it `SIGKILL` (the grace period after a cancel passed, or the output
    /// limit).
    pub killed: bool,
    /// Captured output may be missing bytes: past the output limit, pipes held open past
    /// [`Command::pipe_grace`], or a failed read (logged).
    pub truncated: bool,
    /// The pipes were still open [`Command::pipe_grace`] after the exit (a descendant held
    /// them) and were closed by the bus; output written after that is lost.
    pub pipes_held_open: bool,
    /// Bytes of [`Input::Bytes`] the program did not take before it closed its input or
    /// exited.
    pub stdin_unwritten: usize,
}

impl ExecOutput {
    /// The exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        match self.status {
            Some(ExitStatus::Code(c)) => Some(c),
            _ => None,
        }
    }

    /// The signal that killed it, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self.status {
            Some(ExitStatus::Signal(s)) => Some(s),
            _ => None,
        }
    }

    /// It exited with code 0 on its own, and its output is whole.
    pub fn success(&self) -> bool {
        self.code() == Some(0) && self.intervention.is_none() && !self.truncated
    }
}

/// Where in the child, between `fork` and `execve`, a start failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SpawnStage {
    /// `setpgid`: the process group of its own.
    ProcessGroup,
    /// `dup2` of the standard streams (or the node descriptor).
    Stdio,
    /// Marking inherited descriptors close-on-exec.
    CloseDescriptors,
    /// `chdir` to the working directory.
    Chdir,
    /// `setgroups`: the supplementary groups.
    Setgroups,
    /// `setgid`.
    Setgid,
    /// `setuid`.
    Setuid,
    /// The credentials after the drop were not the requested ones, or root could be regained.
    VerifyCredentials,
    /// `prctl(PR_SET_PDEATHSIG)`.
    ParentDeathSignal,
    /// The parent died before the death signal was armed.
    ParentGone,
    /// Resetting the signal mask and `SIGPIPE`.
    Signals,
    /// `execve` itself (`ENOENT`: no such program; `EACCES`: not executable, ...).
    Exec,
}

impl SpawnStage {
    pub(super) const ALL: [Self; 12] = [
        Self::ProcessGroup,
        Self::Stdio,
        Self::CloseDescriptors,
        Self::Chdir,
        Self::Setgroups,
        Self::Setgid,
        Self::Setuid,
        Self::VerifyCredentials,
        Self::ParentDeathSignal,
        Self::ParentGone,
        Self::Signals,
        Self::Exec,
    ];

    pub(super) fn code(self) -> u32 {
        match self {
            Self::ProcessGroup => 1,
            Self::Stdio => 2,
            Self::CloseDescriptors => 3,
            Self::Chdir => 4,
            Self::Setgroups => 5,
            Self::Setgid => 6,
            Self::Setuid => 7,
            Self::VerifyCredentials => 8,
            Self::ParentDeathSignal => 9,
            Self::ParentGone => 10,
            Self::Signals => 11,
            Self::Exec => 12,
        }
    }

    pub(super) fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }
}

impl fmt::Display for SpawnStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ProcessGroup => "setting the process group",
            Self::Stdio => "redirecting the standard streams",
            Self::CloseDescriptors => "closing inherited descriptors",
            Self::Chdir => "changing directory",
            Self::Setgroups => "setting the supplementary groups",
            Self::Setgid => "setting the group",
            Self::Setuid => "setting the user",
            Self::VerifyCredentials => "verifying the credentials after the drop",
            Self::ParentDeathSignal => "arming the parent-death signal",
            Self::ParentGone => "checking the parent is alive",
            Self::Signals => "resetting signals",
            Self::Exec => "executing the program",
        })
    }
}

/// What is wrong with a [`Command`], found before anything was started.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidCommand {
    /// The program is an empty string.
    EmptyProgram,
    /// A string holds a NUL byte, which `execve` cannot pass.
    Nul(Part),
    /// An environment variable's name is empty or holds `=`.
    EnvName(String),
    /// The program has no `/` and `PATH` names no directory to look in.
    NoPath,
    /// More supplementary groups than [`MAX_CHILD_GROUPS`].
    TooManyGroups {
        /// How many were asked for.
        n_groups: usize,
    },
}

/// Which part of a [`Command`], in [`InvalidCommand::Nul`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Part {
    /// The program.
    Program,
    /// `argv[0]`.
    Arg0,
    /// The argument at this index (0 is the first after `argv[0]`).
    Arg(usize),
    /// The environment variable of this name (lossily shown).
    Env(String),
    /// The working directory.
    Dir,
}

impl fmt::Display for InvalidCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyProgram => f.write_str("the program is empty"),
            Self::Nul(part) => match part {
                Part::Program => f.write_str("the program holds a NUL byte"),
                Part::Arg0 => f.write_str("argv[0] holds a NUL byte"),
                Part::Arg(i) => write!(f, "argument {i} holds a NUL byte"),
                Part::Env(name) => write!(f, "environment variable {name:?} holds a NUL byte"),
                Part::Dir => f.write_str("the working directory holds a NUL byte"),
            },
            Self::EnvName(name) => {
                write!(
                    f,
                    "environment variable name {name:?} is empty or holds '='"
                )
            }
            Self::NoPath => f.write_str("PATH names no directory to look for the program in"),
            Self::TooManyGroups { n_groups } => write!(
                f,
                "{n_groups} supplementary groups: at most {MAX_CHILD_GROUPS} can be set before exec"
            ),
        }
    }
}

/// Why a program could not be started. When this is returned, it did not run (and no
/// callback will be called).
#[derive(Debug)]
#[non_exhaustive]
pub enum ExecError {
    /// The command is malformed; nothing was started.
    Invalid(InvalidCommand),
    /// The user or groups could not be resolved; nothing was started.
    Identity(IdentityError),
    /// The child failed before `execve` and exited; the program did not run.
    Spawn {
        /// What it was doing.
        stage: SpawnStage,
        /// Why it failed.
        errno: Errno,
    },
    /// The child dropped its privileges, but the check after the drop found credentials
    /// other than the requested ones (or found it could regain root); it exited before
    /// `execve`, and the program did not run.
    Unverified,
    /// The child did not reach `execve` within 30 seconds (a `chdir` into a hung mount,
    /// say); it was killed.
    SpawnTimedOut,
    /// [`Bus::exec_node`] cannot do this (capture output, feed input, time out).
    NotForNode(&'static str),
    /// The bus is draining for shutdown and starts nothing more.
    ShuttingDown,
    /// An OS call in this process failed (a pipe, `fork`, registering a descriptor).
    Io(io::Error),
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(e) => write!(f, "invalid command: {e}"),
            Self::Identity(e) => write!(f, "cannot resolve the identity: {e}"),
            Self::Spawn { stage, errno } => {
                write!(f, "the program did not run: failed {stage}: {errno}")
            }
            Self::Unverified => f.write_str(
                "the program did not run: the credentials after the drop are not the requested ones",
            ),
            Self::SpawnTimedOut => f.write_str("the child did not reach exec in time"),
            Self::NotForNode(what) => write!(f, "a node cannot have {what}"),
            Self::ShuttingDown => f.write_str("the bus is shutting down"),
            Self::Io(e) => write!(f, "cannot start the program: {e}"),
        }
    }
}

impl std::error::Error for ExecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Identity(e) => Some(e),
            Self::Spawn { errno, .. } => Some(errno),
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl ExecError {
    /// The child's report of a failure at `stage`: the verification after the drop
    /// reports no errno (zero) when no call failed but the credentials were other ones.
    pub(super) fn from_report(stage: SpawnStage, errno: Errno) -> Self {
        match (stage, errno) {
            (SpawnStage::VerifyCredentials, Errno::UnknownErrno) => Self::Unverified,
            (stage, errno) => Self::Spawn { stage, errno },
        }
    }
}

impl From<io::Error> for ExecError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<Errno> for ExecError {
    fn from(e: Errno) -> Self {
        Self::Io(e.into())
    }
}

impl From<ExecError> for io::Error {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::Io(e) => e,
            ExecError::Spawn { errno, .. } => Self::new(Self::from(errno).kind(), e),
            ExecError::Unverified => Self::new(io::ErrorKind::PermissionDenied, e),
            ExecError::SpawnTimedOut => Self::new(io::ErrorKind::TimedOut, e),
            ExecError::Identity(_) => Self::new(io::ErrorKind::NotFound, e),
            ExecError::ShuttingDown => Self::other(e),
            ExecError::Invalid(_) | ExecError::NotForNode(_) => {
                Self::new(io::ErrorKind::InvalidInput, e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_display() {
        let e = ExecError::Spawn {
            stage: SpawnStage::Setuid,
            errno: Errno::EPERM,
        };
        assert_eq!(
            e.to_string(),
            "the program did not run: failed setting the user: EPERM: Operation not permitted"
        );
        let e = ExecError::from_report(SpawnStage::VerifyCredentials, Errno::UnknownErrno);
        assert!(matches!(e, ExecError::Unverified), "{e:?}");
        assert!(e.to_string().ends_with("not the requested ones"));
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            io::Error::from(ExecError::Spawn {
                stage: SpawnStage::Exec,
                errno: Errno::ENOENT
            })
            .kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            Intervention::OutputLimit {
                stream: Stream::Stderr,
                limit: 10
            }
            .to_string(),
            "killed: stderr passed its bound of 10 bytes"
        );
    }

    #[test]
    fn output_helpers() {
        let mut out = ExecOutput {
            id: ExecId(1),
            pid: Pid::from_raw(5),
            status: Some(ExitStatus::Code(0)),
            stdout: Vec::new(),
            stderr: Vec::new(),
            duration: Duration::ZERO,
            intervention: None,
            killed: false,
            truncated: false,
            pipes_held_open: false,
            stdin_unwritten: 0,
        };
        assert!(out.success());
        assert_eq!(out.code(), Some(0));
        out.truncated = true;
        assert!(!out.success());
        out.status = Some(ExitStatus::Signal(9));
        assert_eq!(out.signal(), Some(9));
        assert_eq!(out.code(), None);
        out.status = None;
        assert_eq!((out.code(), out.signal()), (None, None));
    }
}
