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

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

#[cfg(doc)]
use crate::bus::Bus;
use crate::identity::{Credentials, PrivilegeDrop};

// The command is here; the rest is in one file per concern:
// - `outcome`: the result and error model (`ExecOutput`, `ExecError` and what they hold);
// - `spawn`: preparing a command before `fork`, and the child's code up to `execve`;
// - `running`: the state machine of a running program, and its `impl Bus` block.
mod outcome;
mod running;
pub(crate) use running::ExecService;
mod spawn;

pub use outcome::{ExecError, ExecId, ExecOutput, Intervention, InvalidCommand, Part, SpawnStage};
pub(crate) use spawn::{start, Redirect, Started};

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
