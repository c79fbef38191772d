//! External programs run from the loop: [`Command`], [`Bus::exec`], [`ExecOutput`].
//!
//! ```no_run
//! use std::time::Duration;
//! use forkbus_runtime::exec::Command;
//! use forkbus_runtime::{Bus, BusConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut bus = Bus::root(BusConfig::default())?;
//! let git = Command::new("git")
//!     .args(["status", "-s"])
//!     .current_dir("/srv/app")
//!     .timeout(Duration::from_secs(30));
//! bus.exec(&git, |bus, out| {
//!     println!("{:?}: {}", out.status, String::from_utf8_lossy(&out.stdout));
//!     bus.stop();
//! })?;
//! bus.run()?;
//! # Ok(())
//! # }
//! ```
//!
//! # What [`Bus::exec`] promises
//!
//! - **The program runs as asked or not at all.** Everything that can be checked without the
//!   child is checked before `fork` (NUL bytes, environment names, the user and groups, which
//!   are looked up in the parent). In the child, between `fork` and `execve`, only
//!   async-signal-safe system calls run, on memory prepared before `fork` (nothing is
//!   allocated): `setpgid`, `dup2`, `close_range`, the privilege drop of
//!   [`Credentials::apply`] (supplementary groups, group, user, then verified), `chdir` (with
//!   the new identity's permissions), the parent-death signal, the signal mask, `execve`. Any failure is written to a close-on-exec pipe as a
//!   stage and an `errno`, and the child `_exit`s: it never runs the program as the wrong user
//!   or in the wrong directory. [`Bus::exec`] waits for that pipe (it closes at `execve`, a
//!   matter of microseconds; never for the program itself) and returns
//!   [`ExecError::Spawn`] with the stage and `errno`.
//! - **The result is whole.** [`ExecOutput`] reaches the callback only after the exit was
//!   reaped *and* both pipes reached end of file, so no output is lost to a race between
//!   `SIGCHLD` and the pipes. A stopped child (`SIGSTOP`) is not an exited one: children are
//!   reaped with `waitpid(pid, WNOHANG)` without `WUNTRACED`.
//! - **Bounded.** Each captured stream keeps at most [`Command::max_output`] bytes. Past the
//!   bound the program is killed (`SIGKILL`, to its process group), the excess is discarded,
//!   and the result says so: [`Intervention::OutputLimit`] and [`ExecOutput::truncated`].
//! - **Cancellable.** [`Bus::cancel_exec`] and the [`timeout`](Command::timeout) send the
//!   command's [cancel signal](Command::cancel_signal) (then `SIGCONT`, so that a stopped
//!   program can act on it), and `SIGKILL` after the [grace period](Command::kill_grace).
//!   By default the program runs in a process group of its own and signals go to the whole
//!   group, so that a shell's children go too.
//! - **Asynchronous.** Output is read and input written through the reactor, non-blocking;
//!   the callback runs from the loop (from a timer, under `catch_unwind`).
//!
//! A descendant of the program may keep a pipe open after the program exited
//! (`sh -c 'daemon &'`). Then the pipes are closed [`pipe_grace`](Command::pipe_grace) after
//! the exit and the result is flagged ([`ExecOutput::pipes_held_open`]).
//!
//! Only an `ExecOutput` ever reaches the callback: whatever stops a program from starting is
//! an error of [`Bus::exec`] itself, and then no callback runs.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use forkbus_router::Timestamp;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use nix::libc::{self, c_char};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use crate::bus::Bus;
use crate::child::{ExitStatus, Pid};
use crate::identity::{CredentialCall, Credentials, IdentityError, PrivilegeDrop};
use crate::reactor::{FdId, Interest};
use crate::timer::TimerId;

/// The default bound of each captured stream: 16 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 16 << 20;
/// The default time between the cancel signal and `SIGKILL`.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);
/// The default time the pipes may stay open after the program exited.
pub const DEFAULT_PIPE_GRACE: Duration = Duration::from_secs(5);
/// The exit code of a child that failed before `execve` (what shells use for "cannot run").
pub const EXIT_SPAWN_FAILED: i32 = 127;
/// The most supplementary groups a drop in the child may set: beyond them the verification
/// of [`Credentials::apply`] would allocate, which is not allowed between `fork` and `exec`.
pub const MAX_CHILD_GROUPS: usize = 128;

/// How long [`Bus::exec`] waits at most for the child to reach `execve`.
const SPAWN_WAIT: Duration = Duration::from_secs(30);
/// Descriptors handed to the child are moved to this number or above before `fork`, so
/// that no `dup2` onto 0..=3 overwrites another one still to be copied.
const LOW_FD: RawFd = 10;
/// Bytes read per `read` call from a pipe.
const READ_CHUNK: usize = 64 << 10;
/// Reads per pipe per wake-up (level-triggered: the rest is reported again).
const MAX_READS: usize = 16;
/// The length of the child's failure report: stage (u32) and errno (i32), little-endian.
const REPORT_LEN: usize = 8;
/// `close_range` flag: mark close-on-exec instead of closing (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// Without `close_range`, descriptors below this are marked close-on-exec one by one.
const FALLBACK_FD_LIMIT: libc::c_int = 65_536;

// ---------------------------------------------------------------------------------------
// The command

/// Where the program's standard input comes from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Input {
    /// `/dev/null` (the default).
    #[default]
    Null,
    /// These bytes, written through the reactor; then end of file. Bytes the program does
    /// not read before it exits are counted in [`ExecOutput::stdin_unwritten`].
    Bytes(Vec<u8>),
    /// This process's standard input.
    Inherit,
}

/// Where the program's standard output or error goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Output {
    /// A pipe read through the reactor into the [`ExecOutput`] (the default).
    #[default]
    Capture,
    /// `/dev/null`.
    Null,
    /// This process's own.
    Inherit,
}

/// One of the two captured streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        })
    }
}

/// Who the program runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    Inherit,
    Drop(PrivilegeDrop),
    Exact(Credentials),
}

/// A program to run: its arguments, environment, directory, identity, standard streams and
/// limits. Built like [`std::process::Command`]; run with [`Bus::exec`] (or as a node of the
/// tree with [`Bus::exec_node`]). No shell is involved unless asked for with
/// [`shell`](Self::shell).
#[derive(Clone, Debug)]
pub struct Command {
    program: OsString,
    arg0: Option<OsString>,
    args: Vec<OsString>,
    env_clear: bool,
    /// Sets (`Some`) and removals (`None`), applied in order.
    env: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
    identity: Identity,
    pub(crate) stdin: Input,
    pub(crate) stdout: Output,
    pub(crate) stderr: Output,
    max_output: usize,
    pub(crate) timeout: Option<Duration>,
    cancel_signal: Signal,
    kill_grace: Duration,
    pipe_grace: Duration,
    process_group: bool,
    die_with_parent: bool,
}

impl Command {
    /// Runs `program` (a path, or a name looked up in `PATH` — the child's `PATH` when the
    /// environment sets one — the way `execvp` does), with `program` as `argv[0]`.
    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            arg0: None,
            args: Vec::new(),
            env_clear: false,
            env: Vec::new(),
            cwd: None,
            identity: Identity::Inherit,
            stdin: Input::Null,
            stdout: Output::Capture,
            stderr: Output::Capture,
            max_output: DEFAULT_MAX_OUTPUT,
            timeout: None,
            cancel_signal: Signal::SIGTERM,
            kill_grace: DEFAULT_KILL_GRACE,
            pipe_grace: DEFAULT_PIPE_GRACE,
            process_group: true,
            die_with_parent: true,
        }
    }

    /// Runs `command` with `/bin/sh -c`.
    pub fn shell(command: impl Into<OsString>) -> Self {
        Self::new("/bin/sh").arg0("sh").arg("-c").arg(command)
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets `argv[0]` (by default the program as given).
    #[must_use]
    pub fn arg0(mut self, arg0: impl Into<OsString>) -> Self {
        self.arg0 = Some(arg0.into());
        self
    }

    /// Sets an environment variable for the program.
    #[must_use]
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable for the program.
    #[must_use]
    pub fn env_remove(mut self, name: impl Into<OsString>) -> Self {
        self.env.push((name.into(), None));
        self
    }

    /// Starts from an empty environment instead of this process's (sets and removals made
    /// before or after still apply).
    #[must_use]
    pub fn env_clear(mut self) -> Self {
        self.env_clear = true;
        self
    }

    /// The directory the program runs in (a failed `chdir` is an error; the program does
    /// not run).
    #[must_use]
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Runs the program as another user and groups, looked up when the command is run
    /// (before `fork`). A drop that fails in the child is an error; the program does not run.
    #[must_use]
    pub fn user(mut self, drop: PrivilegeDrop) -> Self {
        self.identity = Identity::Drop(drop);
        self
    }

    /// Runs the program with these numeric credentials (nothing is looked up).
    #[must_use]
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.identity = Identity::Exact(credentials);
        self
    }

    /// Where standard input comes from (default: `/dev/null`).
    #[must_use]
    pub fn stdin(mut self, input: Input) -> Self {
        self.stdin = input;
        self
    }

    /// Feeds these bytes to standard input, then end of file.
    #[must_use]
    pub fn stdin_bytes(self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin(Input::Bytes(bytes.into()))
    }

    /// Where standard output goes (default: captured).
    #[must_use]
    pub fn stdout(mut self, output: Output) -> Self {
        self.stdout = output;
        self
    }

    /// Where standard error goes (default: captured).
    #[must_use]
    pub fn stderr(mut self, output: Output) -> Self {
        self.stderr = output;
        self
    }

    /// The most bytes kept of each captured stream (default [`DEFAULT_MAX_OUTPUT`]). A
    /// program that writes more is killed and its result flagged
    /// ([`Intervention::OutputLimit`]).
    #[must_use]
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// Cancels the program (as [`Bus::cancel_exec`] does) when it runs longer than this.
    #[must_use]
    pub fn timeout(mut self, after: Duration) -> Self {
        self.timeout = Some(after);
        self
    }

    /// The signal a cancel or a timeout sends first (default `SIGTERM`).
    #[must_use]
    pub fn cancel_signal(mut self, signal: Signal) -> Self {
        self.cancel_signal = signal;
        self
    }

    /// How long after the cancel signal `SIGKILL` follows (default [`DEFAULT_KILL_GRACE`]).
    #[must_use]
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// How long the captured pipes may stay open after the program exited (held by a
    /// descendant) before they are closed and the result flagged (default
    /// [`DEFAULT_PIPE_GRACE`]).
    #[must_use]
    pub fn pipe_grace(mut self, grace: Duration) -> Self {
        self.pipe_grace = grace;
        self
    }

    /// Whether the program gets a process group of its own, which signals go to as a whole
    /// (default: yes). Without one, they go to the program alone. In a group of its own a
    /// program is not in the terminal's foreground: with [`Input::Inherit`] from a terminal,
    /// reading it stops the program (`SIGTTIN`), and `Ctrl-C` does not reach it (the bus's
    /// `SIGINT` shutdown cancels it instead).
    #[must_use]
    pub fn process_group(mut self, yes: bool) -> Self {
        self.process_group = yes;
        self
    }

    /// Whether the program gets `SIGKILL` when this process dies (`PR_SET_PDEATHSIG`, set
    /// after the privilege drop, which would clear it; default: yes). The kernel ties it to
    /// the thread that called [`Bus::exec`]: the thread running the bus.
    #[must_use]
    pub fn die_with_parent(mut self, yes: bool) -> Self {
        self.die_with_parent = yes;
        self
    }

    /// The program as given.
    pub fn program(&self) -> &OsStr {
        &self.program
    }
}

// ---------------------------------------------------------------------------------------
// Results and errors

/// One run of [`Bus::exec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecId(u64);

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
    const ALL: [Self; 12] = [
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

    fn code(self) -> u32 {
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

    fn from_code(code: u32) -> Option<Self> {
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
        /// Why it failed (`UnknownErrno` for a verification that found other credentials).
        errno: Errno,
    },
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
            Self::Spawn { stage, errno } if *errno == Errno::UnknownErrno => {
                write!(f, "the program did not run: failed {stage}")
            }
            Self::Spawn { stage, errno } => {
                write!(f, "the program did not run: failed {stage}: {errno}")
            }
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
            ExecError::Spawn { errno, .. } if errno != Errno::UnknownErrno => {
                Self::new(Self::from(errno).kind(), e)
            }
            ExecError::Spawn { .. } => Self::new(io::ErrorKind::PermissionDenied, e),
            ExecError::SpawnTimedOut => Self::new(io::ErrorKind::TimedOut, e),
            ExecError::Identity(_) => Self::new(io::ErrorKind::NotFound, e),
            _ => Self::new(io::ErrorKind::InvalidInput, e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Preparing (pure)

/// Everything `execve` needs, as C strings, built before `fork`.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The paths to try in order (one when the program has a `/`).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
    creds: Option<Credentials>,
}

fn c_string(bytes: &OsStr, part: Part) -> Result<CString, ExecError> {
    CString::new(bytes.as_bytes()).map_err(|_| ExecError::Invalid(InvalidCommand::Nul(part)))
}

/// The program's environment: this process's (`base`) unless cleared, then the command's
/// sets and removals in order, then `extra` (which wins). Sorted by name.
pub(crate) fn build_env(
    base: impl IntoIterator<Item = (OsString, OsString)>,
    clear: bool,
    ops: &[(OsString, Option<OsString>)],
    extra: &[(OsString, OsString)],
) -> Result<Vec<CString>, ExecError> {
    let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
    if !clear {
        env.extend(base);
    }
    let check = |name: &OsStr| {
        let b = name.as_bytes();
        if b.is_empty() || b.contains(&b'=') {
            Err(ExecError::Invalid(InvalidCommand::EnvName(
                name.to_string_lossy().into_owned(),
            )))
        } else {
            Ok(())
        }
    };
    for (name, value) in ops {
        check(name)?;
        match value {
            Some(v) => env.insert(name.clone(), v.clone()),
            None => env.remove(name),
        };
    }
    for (name, value) in extra {
        check(name)?;
        env.insert(name.clone(), value.clone());
    }
    env.into_iter()
        .map(|(name, value)| {
            let mut entry = name.clone().into_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            CString::new(entry).map_err(|_| {
                ExecError::Invalid(InvalidCommand::Nul(Part::Env(
                    name.to_string_lossy().into_owned(),
                )))
            })
        })
        .collect()
}

/// The paths `execvp` would try for `program`: itself when it holds a `/`, else each
/// directory of `path` in order (an empty entry is the working directory).
pub(crate) fn candidates(program: &OsStr, path: Option<&OsStr>) -> Vec<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return vec![PathBuf::from(program)];
    }
    let path = path.unwrap_or_else(|| OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    path.as_bytes()
        .split(|b| *b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
            PathBuf::from(OsStr::from_bytes(dir)).join(program)
        })
        .collect()
}

/// Checks and converts a command for `execve`, with `extra` environment variables.
pub(crate) fn prepare(
    command: &Command,
    extra_env: &[(OsString, OsString)],
) -> Result<Prepared, ExecError> {
    if command.program.is_empty() {
        return Err(ExecError::Invalid(InvalidCommand::EmptyProgram));
    }
    c_string(&command.program, Part::Program)?;
    let arg0 = match &command.arg0 {
        Some(a) => c_string(a, Part::Arg0)?,
        None => c_string(&command.program, Part::Program)?,
    };
    let mut argv = vec![arg0];
    for (i, a) in command.args.iter().enumerate() {
        argv.push(c_string(a, Part::Arg(i))?);
    }
    let envp = build_env(
        std::env::vars_os(),
        command.env_clear,
        &command.env,
        extra_env,
    )?;
    // The child's PATH when its environment has one (as std::process does), else ours.
    let child_path = envp
        .iter()
        .find_map(|e| e.as_bytes().strip_prefix(b"PATH="))
        .map(|p| OsStr::from_bytes(p).to_owned());
    let path = child_path.or_else(|| std::env::var_os("PATH"));
    let candidates = candidates(&command.program, path.as_deref())
        .into_iter()
        .map(|p| c_string(p.as_os_str(), Part::Program))
        .collect::<Result<Vec<_>, _>>()?;
    if candidates.is_empty() {
        return Err(ExecError::Invalid(InvalidCommand::NoPath));
    }
    let cwd = match &command.cwd {
        Some(d) => Some(c_string(d.as_os_str(), Part::Dir)?),
        None => None,
    };
    let creds = match &command.identity {
        Identity::Inherit => None,
        Identity::Drop(drop) => Some(drop.resolve().map_err(ExecError::Identity)?),
        Identity::Exact(c) => Some(c.clone()),
    };
    if let Some(c) = &creds {
        if c.groups().len() > MAX_CHILD_GROUPS {
            return Err(ExecError::Invalid(InvalidCommand::TooManyGroups {
                n_groups: c.groups().len(),
            }));
        }
    }
    Ok(Prepared {
        candidates,
        argv,
        envp,
        cwd,
        creds,
    })
}

fn encode_report(stage: SpawnStage, errno: i32) -> [u8; REPORT_LEN] {
    let mut out = [0; REPORT_LEN];
    let (s, e) = out.split_at_mut(4);
    s.copy_from_slice(&stage.code().to_le_bytes());
    e.copy_from_slice(&errno.to_le_bytes());
    out
}

fn decode_report(bytes: &[u8]) -> Option<(SpawnStage, Errno)> {
    let stage: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let errno: [u8; 4] = bytes.get(4..REPORT_LEN)?.try_into().ok()?;
    let stage = SpawnStage::from_code(u32::from_le_bytes(stage))?;
    Some((stage, Errno::from_raw(i32::from_le_bytes(errno))))
}

// ---------------------------------------------------------------------------------------
// Starting (fork, the child, exec)

/// A descriptor the child gets at a fixed number.
#[derive(Debug)]
pub(crate) struct Redirect {
    /// Close-on-exec, at [`LOW_FD`] or above.
    src: OwnedFd,
    dst: RawFd,
}

impl Redirect {
    /// `fd` as the child's `dst` (moved out of the way of the standard numbers first).
    pub(crate) fn new(fd: OwnedFd, dst: RawFd) -> io::Result<Self> {
        Ok(Self {
            src: raise(fd)?,
            dst,
        })
    }
}

/// The descriptor at [`LOW_FD`] or above, close-on-exec.
fn raise(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= LOW_FD {
        return Ok(fd);
    }
    let raw = nix::fcntl::fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(LOW_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(nix::fcntl::fcntl(fd, FcntlArg::F_GETFL)?);
    nix::fcntl::fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// What the child runs between `fork` and `execve`: pointers into memory the parent built
/// before `fork` (the child has its own copy of it), so the child allocates nothing.
struct ChildPlan<'a> {
    candidates: &'a [*const c_char],
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: Option<&'a CStr>,
    creds: Option<&'a Credentials>,
    redirects: &'a [(RawFd, RawFd)],
    close_from: RawFd,
    report: RawFd,
    process_group: bool,
    die_with_parent: bool,
    parent: libc::pid_t,
}

/// The parent's ends of a started program's pipes.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) pid: Pid,
    pub(crate) stdin: Option<OwnedFd>,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
}

/// Forks and executes `command` with `extra_env` and `extra` descriptors (beyond the
/// standard three); marks every other descriptor from `close_from` on close-on-exec in the
/// child. Returns once the child reached `execve`, or with its failure.
pub(crate) fn start(
    command: &Command,
    extra_env: &[(OsString, OsString)],
    extra: Vec<Redirect>,
    close_from: RawFd,
) -> Result<Started, ExecError> {
    let prepared = prepare(command, extra_env)?;
    let mut redirects = extra;
    let mut null: Option<OwnedFd> = None;
    let mut dev_null = || -> io::Result<OwnedFd> {
        if null.is_none() {
            let fd = nix::fcntl::open(
                "/dev/null",
                OFlag::O_RDWR | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            null = Some(raise(fd)?);
        }
        match &null {
            Some(fd) => Ok(fd.try_clone()?),
            None => Err(io::Error::other("cannot open /dev/null")),
        }
    };
    let stdin = match &command.stdin {
        Input::Null => {
            redirects.push(Redirect::new(dev_null()?, 0)?);
            None
        }
        Input::Bytes(_) => {
            let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            redirects.push(Redirect::new(rd, 0)?);
            set_nonblocking(&wr)?;
            Some(wr)
        }
        Input::Inherit => None,
    };
    let mut output = |how: Output, dst: RawFd| -> Result<Option<OwnedFd>, ExecError> {
        match how {
            Output::Capture => {
                let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                redirects.push(Redirect::new(wr, dst)?);
                set_nonblocking(&rd)?;
                Ok(Some(rd))
            }
            Output::Null => {
                redirects.push(Redirect::new(dev_null()?, dst)?);
                Ok(None)
            }
            Output::Inherit => Ok(None),
        }
    };
    let stdout = output(command.stdout, 1)?;
    let stderr = output(command.stderr, 2)?;
    let pid = spawn(
        &prepared,
        &redirects,
        close_from,
        command.process_group,
        command.die_with_parent,
    )?;
    Ok(Started {
        pid,
        stdin,
        stdout,
        stderr,
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn spawn(
    prepared: &Prepared,
    redirects: &[Redirect],
    close_from: RawFd,
    process_group: bool,
    die_with_parent: bool,
) -> Result<Pid, ExecError> {
    let candidates: Vec<*const c_char> = prepared.candidates.iter().map(|c| c.as_ptr()).collect();
    let argv = null_terminated(&prepared.argv);
    let envp = null_terminated(&prepared.envp);
    let pairs: Vec<(RawFd, RawFd)> = redirects
        .iter()
        .map(|r| (r.src.as_raw_fd(), r.dst))
        .collect();
    let (report_rd, report_wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let report_wr = raise(report_wr)?;
    let plan = ChildPlan {
        candidates: &candidates,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: prepared.cwd.as_deref(),
        creds: prepared.creds.as_ref(),
        redirects: &pairs,
        close_from,
        report: report_wr.as_raw_fd(),
        process_group,
        die_with_parent,
        parent: nix::unistd::getpid().as_raw(),
    };
    // SAFETY: the child runs `child_main` only, which makes async-signal-safe system calls on
    // memory prepared above and never returns (it ends in `execve` or `_exit`), so forking
    // is sound even if this process has other threads.
    let child = match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => child_main(&plan),
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(report_wr);
    let pid = Pid::from_raw(u32::try_from(child.as_raw()).unwrap_or(0));
    match wait_report(&report_rd) {
        Ok(None) => Ok(pid),
        Ok(Some((stage, errno))) => {
            reap_blocking(child);
            Err(ExecError::Spawn { stage, errno })
        }
        Err(e) => {
            let _ = kill(child, Signal::SIGKILL);
            reap_blocking(child);
            Err(e)
        }
    }
}

/// Reads the child's report: end of file (`None`) when `execve` succeeded.
fn wait_report(rd: &OwnedFd) -> Result<Option<(SpawnStage, Errno)>, ExecError> {
    let deadline = crate::clock::monotonic_now() + SPAWN_WAIT;
    let mut buf = [0u8; REPORT_LEN];
    let mut got = 0;
    loop {
        let left = deadline.saturating_duration_since(crate::clock::monotonic_now());
        if left.is_zero() {
            return Err(ExecError::SpawnTimedOut);
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(
            rd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        match nix::unistd::read(rd, buf.get_mut(got..).unwrap_or_default()) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ExecError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the child's report was cut short",
                )))
            }
            Ok(n) => {
                got += n;
                if got == REPORT_LEN {
                    return decode_report(&buf).map(Some).ok_or_else(|| {
                        ExecError::Io(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "malformed report from the child",
                        ))
                    });
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits for a child that is ending (it failed before `execve`, or was sent `SIGKILL`).
fn reap_blocking(pid: nix::unistd::Pid) {
    while let Err(Errno::EINTR) = waitpid(pid, None) {}
}

/// The child, between `fork` and `execve`. Async-signal-safe system calls only; nothing
/// allocates, nothing panics (no indexing, no `unwrap`); every failure ends in
/// [`child_fail`].
fn child_main(plan: &ChildPlan<'_>) -> ! {
    let report = plan.report;
    // SAFETY (every libc call below): plain system calls on integers and on pointers into
    // NUL-terminated strings and null-terminated arrays the parent built before fork; all
    // are async-signal-safe.
    if plan.process_group && unsafe { libc::setpgid(0, 0) } != 0 {
        child_fail(report, SpawnStage::ProcessGroup, Errno::last_raw());
    }
    for &(src, dst) in plan.redirects {
        let rc = if src == dst {
            // SAFETY: see above.
            unsafe { libc::fcntl(dst, libc::F_SETFD, 0) }
        } else {
            // SAFETY: see above; dup2 clears close-on-exec on `dst`.
            unsafe { libc::dup2(src, dst) }
        };
        if rc < 0 {
            child_fail(report, SpawnStage::Stdio, Errno::last_raw());
        }
    }
    mark_cloexec_from(plan.close_from, report);
    if let Some(creds) = plan.creds {
        if let Err(e) = creds.apply() {
            let (stage, errno) = match e {
                IdentityError::CredentialCall { call, errno } => (
                    match call {
                        CredentialCall::Setgroups => SpawnStage::Setgroups,
                        CredentialCall::Setgid => SpawnStage::Setgid,
                        CredentialCall::Setuid => SpawnStage::Setuid,
                        _ => SpawnStage::VerifyCredentials,
                    },
                    errno as i32,
                ),
                _ => (SpawnStage::VerifyCredentials, 0),
            };
            child_fail(report, stage, errno);
        }
    }
    // After the drop: the directory is entered with the program's own permissions.
    if let Some(dir) = plan.cwd {
        // SAFETY: see above.
        if unsafe { libc::chdir(dir.as_ptr()) } != 0 {
            child_fail(report, SpawnStage::Chdir, Errno::last_raw());
        }
    }
    if plan.die_with_parent {
        // After the drop: a change of credentials clears the parent-death signal.
        // SAFETY: see above.
        let sig = libc::c_ulong::try_from(libc::SIGKILL).unwrap_or(9);
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) } != 0 {
            child_fail(report, SpawnStage::ParentDeathSignal, Errno::last_raw());
        }
        // SAFETY: see above.
        if unsafe { libc::getppid() } != plan.parent {
            child_fail(report, SpawnStage::ParentGone, libc::ESRCH);
        }
    }
    // The bus blocks SIGCHLD, SIGTERM, SIGINT and SIGHUP and Rust ignores SIGPIPE; a
    // program expects neither.
    // SAFETY: see above; `empty` is a local sigset_t initialised by sigemptyset.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
            || libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0
        {
            child_fail(report, SpawnStage::Signals, Errno::last_raw());
        }
    }
    // execvp's search, on paths built before fork: go on past "not here", remember
    // "here but not permitted".
    let mut errno = libc::ENOENT;
    let mut denied = false;
    for &path in plan.candidates {
        // SAFETY: see above; execve returns only on failure.
        unsafe { libc::execve(path, plan.argv, plan.envp) };
        errno = Errno::last_raw();
        match errno {
            libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG => {}
            libc::EACCES => denied = true,
            _ => break,
        }
    }
    if denied && errno != libc::E2BIG && errno != libc::ENOEXEC {
        errno = libc::EACCES;
    }
    child_fail(report, SpawnStage::Exec, errno)
}

/// Marks every descriptor from `first` on close-on-exec (the report pipe is one already).
fn mark_cloexec_from(first: RawFd, report: RawFd) {
    let Ok(first) = libc::c_uint::try_from(first) else {
        return;
    };
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on descriptors; it is a
    // plain system call, async-signal-safe.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    // Kernels before 5.11: one by one, up to a bound.
    let Ok(first) = libc::c_int::try_from(first) else {
        return;
    };
    for fd in first..FALLBACK_FD_LIMIT {
        // SAFETY: fcntl on a descriptor number; EBADF for one not open is ignored.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0 {
                child_fail(report, SpawnStage::CloseDescriptors, Errno::last_raw());
            }
        }
    }
}

/// Writes the failure report and leaves, without running the program.
fn child_fail(report: RawFd, stage: SpawnStage, errno: i32) -> ! {
    let bytes = encode_report(stage, errno);
    let mut off = 0;
    while off < bytes.len() {
        let rest = bytes.get(off..).unwrap_or_default();
        // SAFETY: writes from a live stack buffer to the report pipe.
        let n = unsafe { libc::write(report, rest.as_ptr().cast(), rest.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => off += n,
            _ if Errno::last_raw() == libc::EINTR => {}
            _ => break,
        }
    }
    // SAFETY: ends the child at once, running no destructor and no atexit handler of the
    // parent's.
    unsafe { libc::_exit(EXIT_SPAWN_FAILED) }
}

// ---------------------------------------------------------------------------------------
// Running (the bus side)

type DoneFn = Box<dyn FnOnce(&mut Bus, ExecOutput)>;

/// A captured stream.
#[derive(Debug, Default)]
struct Pipe {
    /// Its registration while open.
    fd: Option<FdId>,
    bytes: Vec<u8>,
}

/// Input being written.
#[derive(Debug)]
struct Feeder {
    fd: FdId,
    data: Vec<u8>,
    off: usize,
}

/// Where a program is in its life.
///
/// ```text
///   Running ──reaped──► Exited ──both pipes at EOF (or closed after pipe_grace)──► done
///      │                                                                    (callback)
///      └──(someone else reaped it: ECHILD)──► Vanished ──pipes──► done
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Running,
    Exited(ExitStatus),
    Vanished,
}

struct Running {
    pid: Pid,
    group: bool,
    started: Timestamp,
    life: Life,
    stdout: Pipe,
    stderr: Pipe,
    stdin: Option<Feeder>,
    max_output: usize,
    intervention: Option<Intervention>,
    killed: bool,
    truncated: bool,
    pipes_held_open: bool,
    stdin_unwritten: usize,
    cancel_signal: Signal,
    kill_grace: Duration,
    pipe_grace: Duration,
    timeout_timer: Option<TimerId>,
    kill_timer: Option<TimerId>,
    pipe_timer: Option<TimerId>,
    done: Option<DoneFn>,
}

impl Running {
    fn pipe(&mut self, stream: Stream) -> &mut Pipe {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }

    fn pipes_open(&self) -> bool {
        self.stdout.fd.is_some() || self.stderr.fd.is_some()
    }

    /// Sends `signal` to the program (its group when it has one) while it is not reaped.
    fn signal(&self, signal: Signal) {
        if self.life != Life::Running {
            return;
        }
        let raw = i32::try_from(self.pid.as_raw()).unwrap_or(i32::MAX);
        let target = nix::unistd::Pid::from_raw(if self.group { -raw } else { raw });
        if let Err(e) = kill(target, signal) {
            if e != Errno::ESRCH {
                tracing::warn!(pid = %self.pid, %signal, error = %e, "cannot signal a program");
            }
        }
    }
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("pid", &self.pid)
            .field("life", &self.life)
            .field("intervention", &self.intervention)
            .finish_non_exhaustive()
    }
}

/// The programs a bus runs, by id.
#[derive(Debug, Default)]
pub(crate) struct ExecTable {
    running: BTreeMap<ExecId, Running>,
    next: u64,
    rbuf: Vec<u8>,
}

impl ExecTable {
    /// Whether no program is running or awaiting its result.
    pub(crate) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

impl Bus {
    /// Runs an external program; `done` gets its [`ExecOutput`] from the loop once it has
    /// exited (reaped) and both its pipes are at end of file. See the
    /// [module documentation](crate::exec) for what is promised.
    ///
    /// Returns once the program is running: after `fork`, the child's setup and `execve`
    /// (this waits for the child to reach `execve`, never for the program). Any error means
    /// the program did not run and `done` will not be called: the command is malformed, the
    /// user is unknown, or the child failed before `execve` ([`ExecError::Spawn`] with the
    /// stage and `errno`; the child never runs the program as the wrong user). Refused while
    /// the bus drains for shutdown; a shutdown cancels the programs still running and waits
    /// for their results.
    ///
    /// Works in a process with several threads too: the child runs async-signal-safe calls
    /// only.
    pub fn exec(
        &mut self,
        command: &Command,
        done: impl FnOnce(&mut Self, ExecOutput) + 'static,
    ) -> Result<ExecId, ExecError> {
        if self.is_stopping() {
            return Err(ExecError::ShuttingDown);
        }
        let started = self.now();
        let Started {
            pid,
            stdin,
            stdout,
            stderr,
        } = start(command, &[], Vec::new(), 3)?;
        let id = ExecId(self.execs.next);
        self.execs.next += 1;
        let mut entry = Running {
            pid,
            group: command.process_group,
            started,
            life: Life::Running,
            stdout: Pipe::default(),
            stderr: Pipe::default(),
            stdin: None,
            max_output: command.max_output,
            intervention: None,
            killed: false,
            truncated: false,
            pipes_held_open: false,
            stdin_unwritten: 0,
            cancel_signal: command.cancel_signal,
            kill_grace: command.kill_grace,
            pipe_grace: command.pipe_grace,
            timeout_timer: None,
            kill_timer: None,
            pipe_timer: None,
            done: Some(Box::new(done)),
        };
        let registered = self.register_exec_fds(id, &mut entry, command, stdin, stdout, stderr);
        if let Err(e) = registered {
            entry.signal(Signal::SIGKILL);
            reap_blocking(pid.nix());
            for fd in [entry.stdout.fd, entry.stderr.fd, entry.stdin.map(|f| f.fd)]
                .into_iter()
                .flatten()
            {
                drop(self.remove_fd(fd));
            }
            return Err(ExecError::Io(e));
        }
        if let Some(after) = command.timeout {
            entry.timeout_timer = Some(self.add_timer(after, move |bus| {
                bus.intervene(id, Intervention::Timeout);
            }));
        }
        tracing::debug!(%id, %pid, program = ?command.program, "exec started");
        self.execs.running.insert(id, entry);
        Ok(id)
    }

    fn register_exec_fds(
        &mut self,
        id: ExecId,
        entry: &mut Running,
        command: &Command,
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    ) -> io::Result<()> {
        for (fd, stream) in [(stdout, Stream::Stdout), (stderr, Stream::Stderr)] {
            if let Some(fd) = fd {
                let reg = self.add_fd(fd, Interest::READABLE, move |bus, ready| {
                    bus.exec_readable(id, stream, ready.fd);
                })?;
                entry.pipe(stream).fd = Some(reg);
            }
        }
        if let (Some(fd), Input::Bytes(data)) = (stdin, &command.stdin) {
            if data.is_empty() {
                // End of file at once.
                drop(fd);
            } else {
                let reg = self.add_fd(fd, Interest::WRITABLE, move |bus, ready| {
                    bus.exec_writable(id, ready.fd);
                })?;
                entry.stdin = Some(Feeder {
                    fd: reg,
                    data: data.clone(),
                    off: 0,
                });
            }
        }
        Ok(())
    }

    /// Cancels a program: sends its [cancel signal](Command::cancel_signal) (and `SIGCONT`),
    /// then `SIGKILL` after its [grace period](Command::kill_grace) if it is still running.
    /// Its result still comes to its callback, with [`Intervention::Cancelled`]. `false`
    /// when there is no such program or it has exited already.
    pub fn cancel_exec(&mut self, id: ExecId) -> bool {
        self.intervene(id, Intervention::Cancelled)
    }

    /// The process id of a program still running or awaiting its result.
    pub fn exec_pid(&self, id: ExecId) -> Option<Pid> {
        self.execs.running.get(&id).map(|r| r.pid)
    }

    /// The programs running or awaiting their results.
    pub fn execs(&self) -> Vec<(ExecId, Pid)> {
        self.execs
            .running
            .iter()
            .map(|(id, r)| (*id, r.pid))
            .collect()
    }

    fn intervene(&mut self, id: ExecId, why: Intervention) -> bool {
        let Some(r) = self.execs.running.get_mut(&id) else {
            return false;
        };
        if r.life != Life::Running {
            return false;
        }
        if r.intervention.is_none() {
            r.intervention = Some(why);
        }
        tracing::debug!(%id, pid = %r.pid, %why, "cancelling a program");
        r.signal(r.cancel_signal);
        r.signal(Signal::SIGCONT);
        if r.kill_timer.is_none() {
            let grace = r.kill_grace;
            let timer = self.add_timer(grace, move |bus| bus.kill_exec(id));
            if let Some(r) = self.execs.running.get_mut(&id) {
                r.kill_timer = Some(timer);
            }
        }
        true
    }

    fn kill_exec(&mut self, id: ExecId) {
        if let Some(r) = self.execs.running.get_mut(&id) {
            r.kill_timer = None;
            if r.life == Life::Running {
                tracing::debug!(%id, pid = %r.pid, "grace period over: SIGKILL");
                r.signal(Signal::SIGKILL);
                r.killed = true;
            }
        }
    }

    /// A graceful shutdown began: cancel every program still running.
    pub(crate) fn cancel_all_execs(&mut self) {
        let ids: Vec<ExecId> = self.execs.running.keys().copied().collect();
        for id in ids {
            self.intervene(id, Intervention::Cancelled);
        }
    }

    /// The drain deadline passed: `SIGKILL` to every program still running.
    pub(crate) fn kill_all_execs(&mut self) {
        let ids: Vec<ExecId> = self.execs.running.keys().copied().collect();
        for id in ids {
            self.kill_exec(id);
        }
    }

    /// The bus is dropped: kill and reap every program still running (no callback runs).
    pub(crate) fn abort_execs(&mut self) {
        for (_, r) in std::mem::take(&mut self.execs.running) {
            if r.life == Life::Running {
                r.signal(Signal::SIGKILL);
                reap_blocking(r.pid.nix());
            }
        }
    }

    /// `SIGCHLD`: reaps the programs that exited (by pid, without `WUNTRACED`: a stopped
    /// program is still running).
    pub(crate) fn reap_execs(&mut self) {
        let ids: Vec<ExecId> = self
            .execs
            .running
            .iter()
            .filter(|(_, r)| r.life == Life::Running)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(pid) = self.execs.running.get(&id).map(|r| r.pid) else {
                continue;
            };
            let life = loop {
                match waitpid(pid.nix(), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => break None,
                    Ok(status) => break ExitStatus::from_wait(status).map(Life::Exited),
                    Err(Errno::EINTR) => {}
                    Err(Errno::ECHILD) => {
                        tracing::warn!(%id, %pid, "a program was reaped by someone else: its exit is unknown");
                        break Some(Life::Vanished);
                    }
                    Err(e) => {
                        tracing::warn!(%id, %pid, error = %e, "cannot wait for a program");
                        break None;
                    }
                }
            };
            let Some(life) = life else { continue };
            let Some(r) = self.execs.running.get_mut(&id) else {
                continue;
            };
            r.life = life;
            tracing::debug!(%id, %pid, ?life, "program reaped");
            if r.pipes_open() {
                let grace = r.pipe_grace;
                let timer = self.add_timer(grace, move |bus| bus.pipes_expired(id));
                if let Some(r) = self.execs.running.get_mut(&id) {
                    r.pipe_timer = Some(timer);
                }
            }
            self.exec_check(id);
        }
    }

    fn pipes_expired(&mut self, id: ExecId) {
        let fds: Vec<(FdId, Stream)> = match self.execs.running.get_mut(&id) {
            Some(r) => {
                r.pipe_timer = None;
                [(r.stdout.fd, Stream::Stdout), (r.stderr.fd, Stream::Stderr)]
                    .into_iter()
                    .filter_map(|(fd, s)| fd.map(|fd| (fd, s)))
                    .collect()
            }
            None => return,
        };
        for (fd, stream) in fds {
            // Take what is there, then close.
            if let Some(raw) = self.fd(fd).map(|f| f.as_raw_fd()) {
                self.exec_readable(id, stream, raw);
            }
            if let Some(r) = self.execs.running.get_mut(&id) {
                if let Some(fd) = r.pipe(stream).fd.take() {
                    tracing::warn!(%id, %stream, "pipe held open after the exit: closed");
                    r.pipes_held_open = true;
                    r.truncated = true;
                    drop(self.remove_fd(fd));
                }
            }
        }
        self.exec_check(id);
    }

    fn exec_readable(&mut self, id: ExecId, stream: Stream, raw: RawFd) {
        let mut buf = std::mem::take(&mut self.execs.rbuf);
        buf.resize(READ_CHUNK, 0);
        // SAFETY: `raw` is the descriptor of a registration the bus owns (this is its
        // callback, or the registration was just looked up); it stays open until
        // `remove_fd` below, after the last use of `fd`.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let mut end = false;
        for _ in 0..MAX_READS {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => {
                    end = true;
                    break;
                }
                Ok(n) => {
                    self.exec_take(id, stream, buf.get(..n).unwrap_or_default());
                    if n < buf.len() {
                        break;
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(%id, %stream, error = %e, "cannot read a program's output");
                    if let Some(r) = self.execs.running.get_mut(&id) {
                        r.truncated = true;
                    }
                    end = true;
                    break;
                }
            }
        }
        self.execs.rbuf = buf;
        if end {
            let reg = self
                .execs
                .running
                .get_mut(&id)
                .and_then(|r| r.pipe(stream).fd.take());
            if let Some(reg) = reg {
                drop(self.remove_fd(reg));
            }
            self.exec_check(id);
        }
    }

    /// Keeps output up to the bound; past it, kills the program and discards the rest.
    fn exec_take(&mut self, id: ExecId, stream: Stream, bytes: &[u8]) {
        let Some(r) = self.execs.running.get_mut(&id) else {
            return;
        };
        let limit = r.max_output;
        let pipe = r.pipe(stream);
        let room = limit.saturating_sub(pipe.bytes.len());
        let keep = bytes.get(..room.min(bytes.len())).unwrap_or_default();
        pipe.bytes.extend_from_slice(keep);
        if keep.len() < bytes.len() && !r.truncated {
            r.truncated = true;
            if r.intervention.is_none() {
                r.intervention = Some(Intervention::OutputLimit { stream, limit });
            }
            tracing::warn!(%id, pid = %r.pid, %stream, limit, "output bound passed: killing the program");
            if r.life == Life::Running {
                r.signal(Signal::SIGKILL);
                r.killed = true;
            }
        }
    }

    fn exec_writable(&mut self, id: ExecId, raw: RawFd) {
        let Some(feeder) = self
            .execs
            .running
            .get_mut(&id)
            .and_then(|r| r.stdin.as_mut())
        else {
            return;
        };
        // SAFETY: as in `exec_readable`: the bus owns this registration's descriptor until
        // `remove_fd` below.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let mut finished = false;
        loop {
            let rest = feeder.data.get(feeder.off..).unwrap_or_default();
            if rest.is_empty() {
                finished = true;
                break;
            }
            match write_pipe(fd, rest) {
                Ok(n) => feeder.off += n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    if e != Errno::EPIPE {
                        tracing::warn!(%id, error = %e, "cannot write a program's input");
                    }
                    finished = true;
                    break;
                }
            }
        }
        if finished {
            let Some(r) = self.execs.running.get_mut(&id) else {
                return;
            };
            if let Some(feeder) = r.stdin.take() {
                r.stdin_unwritten = feeder.data.len().saturating_sub(feeder.off);
                drop(self.remove_fd(feeder.fd));
            }
        }
    }

    /// Delivers the result once the exit is known and both pipes are closed.
    fn exec_check(&mut self, id: ExecId) {
        let ready = self
            .execs
            .running
            .get(&id)
            .is_some_and(|r| r.life != Life::Running && !r.pipes_open());
        if !ready {
            return;
        }
        let Some(mut r) = self.execs.running.remove(&id) else {
            return;
        };
        for timer in [r.timeout_timer, r.kill_timer, r.pipe_timer]
            .into_iter()
            .flatten()
        {
            self.cancel_timer(timer);
        }
        if let Some(feeder) = r.stdin.take() {
            r.stdin_unwritten = feeder.data.len().saturating_sub(feeder.off);
            drop(self.remove_fd(feeder.fd));
        }
        let now = self.now();
        let output = ExecOutput {
            id,
            pid: r.pid,
            status: match r.life {
                Life::Exited(s) => Some(s),
                _ => None,
            },
            stdout: std::mem::take(&mut r.stdout.bytes),
            stderr: std::mem::take(&mut r.stderr.bytes),
            duration: now.saturating_duration_since(r.started),
            intervention: r.intervention,
            killed: r.killed,
            truncated: r.truncated,
            pipes_held_open: r.pipes_held_open,
            stdin_unwritten: r.stdin_unwritten,
        };
        tracing::debug!(%id, pid = %r.pid, status = ?output.status, "exec done");
        if let Some(done) = r.done.take() {
            // From a timer: at the loop's top level, under catch_unwind.
            self.add_timer(Duration::ZERO, move |bus| done(bus, output));
        }
    }
}

/// Writes to a pipe without dying of `SIGPIPE` when the reader is gone: unless `SIGPIPE` is
/// ignored already (as Rust programs do at start-up), it is blocked for the write and a
/// `SIGPIPE` the write raised is taken off the pending set.
fn write_pipe(fd: BorrowedFd<'_>, bytes: &[u8]) -> Result<usize, Errno> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    if sigpipe_ignored() {
        return nix::unistd::write(fd, bytes);
    }
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&pipe), Some(&mut old))?;
    // SAFETY: sigpending fills a local sigset_t; sigismember reads it.
    let was_pending = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set) == 0 && libc::sigismember(&set, libc::SIGPIPE) == 1
    };
    let result = nix::unistd::write(fd, bytes);
    if result == Err(Errno::EPIPE) && !was_pending && !old.contains(Signal::SIGPIPE) {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: sigtimedwait reads a live sigset and timespec; the signal is blocked, so
        // this only takes the SIGPIPE this write raised off the pending set.
        unsafe { libc::sigtimedwait(pipe.as_ref(), std::ptr::null_mut(), &zero) };
    }
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    result
}

fn sigpipe_ignored() -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> OsString {
        OsString::from(s)
    }

    fn env_of(entries: &[CString]) -> Vec<String> {
        entries
            .iter()
            .map(|e| e.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn environment_inherit_set_remove_and_clear() {
        let base = vec![(os("HOME"), os("/root")), (os("PATH"), os("/bin"))];
        let ops = vec![
            (os("A"), Some(os("1"))),
            (os("HOME"), None),
            (os("A"), Some(os("2"))),
        ];
        let env = build_env(base.clone(), false, &ops, &[]).map(|e| env_of(&e));
        assert_eq!(env.ok(), Some(vec!["A=2".into(), "PATH=/bin".into()]));
        let env = build_env(base.clone(), true, &ops, &[]).map(|e| env_of(&e));
        assert_eq!(env.ok(), Some(vec!["A=2".into()]));
        // Extra variables win over the command's.
        let extra = vec![(os("A"), os("node"))];
        let env = build_env(base, true, &ops, &extra).map(|e| env_of(&e));
        assert_eq!(env.ok(), Some(vec!["A=node".into()]));
        // An inherited variable may hold '=' in its value.
        let env = build_env(vec![(os("X"), os("a=b"))], false, &[], &[]).map(|e| env_of(&e));
        assert_eq!(env.ok(), Some(vec!["X=a=b".into()]));
    }

    #[test]
    fn environment_names_and_values_are_checked() {
        for bad in ["", "A=B"] {
            let r = build_env(Vec::new(), true, &[(os(bad), Some(os("v")))], &[]);
            assert!(
                matches!(r, Err(ExecError::Invalid(InvalidCommand::EnvName(_)))),
                "{bad:?}"
            );
        }
        let r = build_env(Vec::new(), true, &[(os("A"), Some(os("x\0y")))], &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Env(ref n)))) if n == "A"
        ));
        let r = build_env(Vec::new(), true, &[(os("A\0"), None)], &[]);
        assert!(r.is_ok(), "removing a name that cannot exist is harmless");
    }

    #[test]
    fn arguments_with_nul_bytes_are_refused() {
        let r = prepare(&Command::new("/bin/echo").arg("ok").arg("a\0b"), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Arg(1))))
        ));
        let r = prepare(&Command::new("/bin/e\0cho"), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Program)))
        ));
        let r = prepare(&Command::new("/bin/echo").current_dir("/t\0mp"), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Dir)))
        ));
        let r = prepare(&Command::new(""), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::EmptyProgram))
        ));
        let r = prepare(&Command::new("/bin/echo").arg0("e\0"), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Arg0)))
        ));
    }

    #[test]
    fn prepared_argv_and_shell() {
        let p = prepare(&Command::shell("echo hi").env_clear().env("K", "v"), &[]);
        let p = p.ok();
        let argv: Option<Vec<String>> = p
            .as_ref()
            .map(|p| p.argv.iter().map(|a| a.to_string_lossy().into()).collect());
        assert_eq!(argv, Some(vec!["sh".into(), "-c".into(), "echo hi".into()]));
        let cands: Option<Vec<String>> = p.as_ref().map(|p| {
            p.candidates
                .iter()
                .map(|a| a.to_string_lossy().into())
                .collect()
        });
        assert_eq!(cands, Some(vec!["/bin/sh".into()]));
        assert_eq!(p.map(|p| env_of(&p.envp)), Some(vec!["K=v".into()]));
    }

    #[test]
    fn program_lookup_follows_path() {
        let c = candidates(OsStr::new("ls"), Some(OsStr::new("/a:/b/c::/d")));
        let c: Vec<String> = c.iter().map(|p| p.to_string_lossy().into()).collect();
        assert_eq!(c, ["/a/ls", "/b/c/ls", "./ls", "/d/ls"]);
        let c = candidates(OsStr::new("./x"), Some(OsStr::new("/a")));
        assert_eq!(c, [PathBuf::from("./x")]);
        let c = candidates(OsStr::new("sh"), None);
        assert_eq!(c.len(), 3);
        // The child's PATH is the one searched when its environment sets one.
        let p = prepare(&Command::new("prog").env("PATH", "/x:/y"), &[]);
        let cands: Option<Vec<String>> = p.ok().map(|p| {
            p.candidates
                .iter()
                .map(|a| a.to_string_lossy().into())
                .collect()
        });
        assert_eq!(cands, Some(vec!["/x/prog".into(), "/y/prog".into()]));
    }

    #[test]
    fn unknown_users_and_too_many_groups_are_refused_before_fork() {
        let r = prepare(
            &Command::new("/bin/true").user(PrivilegeDrop::new("forkbus-no-such-user")),
            &[],
        );
        assert!(matches!(
            r,
            Err(ExecError::Identity(IdentityError::UnknownUser(_)))
        ));
        let groups: Vec<u32> = (1000..1000 + 200).collect();
        let r = prepare(
            &Command::new("/bin/true").credentials(Credentials::new(1, 1, groups)),
            &[],
        );
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::TooManyGroups {
                n_groups: 200
            }))
        ));
    }

    #[test]
    fn reports_round_trip_and_stages_are_distinct() {
        for stage in SpawnStage::ALL {
            let bytes = encode_report(stage, libc::EPERM);
            assert_eq!(decode_report(&bytes), Some((stage, Errno::EPERM)));
        }
        let mut codes: Vec<u32> = SpawnStage::ALL.iter().map(|s| s.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), SpawnStage::ALL.len());
        assert_eq!(decode_report(&[0; 8]), None);
        assert_eq!(decode_report(&[1, 0, 0]), None);
    }

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
        let e = ExecError::Spawn {
            stage: SpawnStage::VerifyCredentials,
            errno: Errno::UnknownErrno,
        };
        assert!(e.to_string().ends_with("after the drop"));
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
