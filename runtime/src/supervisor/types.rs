//! The vocabulary of supervision: specs, reasons, events and outcomes (plain data).

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use super::policy::{Backoff, Intensity, MaxRequests};
use forkbus_node::{ExitStatus, Pid};

/// A supervisor of this process, for [`Supervisor`](super::Supervisor) and events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SupervisorId(pub(crate) u32);

impl fmt::Display for SupervisorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "supervisor {}", self.0)
    }
}

/// A supervised child of a supervisor: stable across the processes that incarnate it.
/// Meaningful only to the supervisor that returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChildId(pub(crate) u32);

impl fmt::Display for ChildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "child {}", self.0)
    }
}

/// A child of a particular supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChildRef {
    /// The supervisor.
    pub supervisor: SupervisorId,
    /// The child.
    pub child: ChildId,
}

/// When a child that ended is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Restart {
    /// Whatever the exit (a permanent worker).
    #[default]
    Always,
    /// After an exit with a non-zero code or a death by signal (a transient worker).
    OnFailure,
    /// Never (a temporary worker).
    Never,
}

/// Liveness checking: the supervisor pings the child's loop every `interval`; a ping left
/// unanswered for `timeout` means the child is hung (alive but not running its loop): it
/// is killed and, per its restart policy, restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Heartbeat {
    /// Time between pings.
    pub interval: Duration,
    /// How long the oldest unanswered ping may wait.
    pub timeout: Duration,
}

impl Heartbeat {
    /// A ping every `interval`, hung after `timeout` without an answer.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Self { interval, timeout }
    }
}

/// What becomes of envelopes addressed to a child's name while no process holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhileDown {
    /// The name resolves to nothing: the router reports them lost (`no route`) to their
    /// origins. The default.
    #[default]
    Lose,
    /// The supervisor holds the name in custody: up to `capacity` envelopes are taken,
    /// their receipts left open, and handed to the next process when it is forked, ahead
    /// of anything sent to it later, with their origin and id (the worker answers their
    /// origins as usual; their receipts end `Delivered` when it takes them). Beyond the
    /// capacity an envelope is lost for sure (`queue full`); held envelopes of a child that
    /// is not started again (given up, stopped, the bus draining) are reported lost for
    /// sure (`abandoned`) to their origins.
    Queue {
        /// Envelopes held at most; beyond, each is lost for sure (`queue full`).
        capacity: usize,
    },
}

/// How to supervise a child: its name, restart policy and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChildSpec {
    /// A name every process of the child registers at birth (it moves to the new process).
    pub name: Option<String>,
    /// When to restart it.
    pub restart: Restart,
    /// Delays between restarts.
    pub backoff: Backoff,
    /// Restarts allowed per window before giving up.
    pub intensity: Intensity,
    /// How long a new process may take to be ready (its closure returning) before it is
    /// killed as hung at start-up; `None`: no limit.
    pub start_timeout: Option<Duration>,
    /// Pings and the hang timeout; `None`: no heartbeats.
    pub heartbeat: Option<Heartbeat>,
    /// How long a process asked to stop may take before it is killed (`SIGKILL`).
    pub stop_timeout: Duration,
    /// A process asked to stop keeps serving until no message came for this long, then
    /// drains (its replies acknowledged) and exits 0.
    pub drain_quiet: Duration,
    /// Recycling after a number of handled messages; `None`: never.
    pub max_requests: Option<MaxRequests>,
    /// Envelopes to the name while no process holds it.
    pub while_down: WhileDown,
    /// Each process dies with the supervisor's (`PR_SET_PDEATHSIG`).
    pub die_with_parent: bool,
    /// Descriptors every process of the child keeps open besides 0, 1, 2 and its link to
    /// the supervisor; it has no other ([`ForkOptions::keep_fds`](crate::ForkOptions::keep_fds)).
    pub keep_fds: Vec<RawFd>,
}

impl Default for ChildSpec {
    fn default() -> Self {
        Self {
            name: None,
            restart: Restart::Always,
            backoff: Backoff::default(),
            intensity: Intensity::default(),
            start_timeout: Some(Duration::from_secs(30)),
            heartbeat: None,
            stop_timeout: Duration::from_secs(5),
            drain_quiet: Duration::from_millis(20),
            max_requests: None,
            while_down: WhileDown::Lose,
            die_with_parent: true,
            keep_fds: Vec::new(),
        }
    }
}

impl ChildSpec {
    /// An unnamed child restarted always, with the default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// A child with a name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: Some(name.into()),
            ..Self::default()
        }
    }

    /// Sets the restart policy.
    #[must_use]
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets the backoff.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the restart intensity: more than `max_restarts` within `within` gives up.
    #[must_use]
    pub fn intensity(mut self, max_restarts: u32, within: Duration) -> Self {
        self.intensity = Intensity::new(max_restarts, within);
        self
    }

    /// Turns heartbeats on.
    #[must_use]
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.heartbeat = Some(Heartbeat::new(interval, timeout));
        self
    }

    /// Sets (or removes) the start-up timeout.
    #[must_use]
    pub fn start_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Sets the deadline of a cooperative stop.
    #[must_use]
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Sets how long a stopping process must be quiet before it drains.
    #[must_use]
    pub fn drain_quiet(mut self, quiet: Duration) -> Self {
        self.drain_quiet = quiet;
        self
    }

    /// Recycles each process after `base` plus up to `jitter` handled messages.
    #[must_use]
    pub fn max_requests(mut self, base: u64, jitter: u64) -> Self {
        self.max_requests = Some(MaxRequests::new(base, jitter));
        self
    }

    /// Sets what happens to envelopes for the name while the child is down.
    #[must_use]
    pub fn while_down(mut self, while_down: WhileDown) -> Self {
        self.while_down = while_down;
        self
    }

    /// Whether each process dies with the supervisor's.
    #[must_use]
    pub fn die_with_parent(mut self, yes: bool) -> Self {
        self.die_with_parent = yes;
        self
    }

    /// Keeps a descriptor open in every process of the child (a listening socket the
    /// workers accept from, say); see [`keep_fds`](Self::keep_fds). It must stay open in
    /// the supervisor's process for as long as processes of the child may start.
    #[must_use]
    pub fn keep_fd(mut self, fd: impl AsRawFd) -> Self {
        self.keep_fds.push(fd.as_raw_fd());
        self
    }
}

/// Why a process was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartReason {
    /// The child's first process.
    First,
    /// The previous process ended and the policy restarts it.
    Restart,
    /// Replacing a process that reached its request limit.
    Recycle,
    /// Replacing a process for a rolling reload.
    Reload,
}

/// Why a process was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// [`Supervisor::stop_child`](super::Supervisor::stop_child).
    Requested,
    /// Its replacement is up: it reached its request limit.
    Recycle,
    /// Its replacement is up: a rolling reload.
    Reload,
    /// The supervisor gave up on the child.
    GaveUp,
}

impl StopReason {
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Requested => 0,
            Self::Recycle => 1,
            Self::Reload => 2,
            Self::GaveUp => 3,
        }
    }

    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Recycle,
            2 => Self::Reload,
            3 => Self::GaveUp,
            _ => Self::Requested,
        }
    }
}

/// What a stopping worker is told ([`ServiceEvent::Stopping`](crate::ServiceEvent::Stopping)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StopRequest {
    /// Why.
    pub reason: StopReason,
    /// Time left before the supervisor kills the process.
    pub deadline: Duration,
}

/// Why a process was killed with `SIGKILL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KillReason {
    /// It left a ping unanswered past the heartbeat timeout (hung, not dead).
    HeartbeatTimeout,
    /// It was not ready within the start timeout.
    StartTimeout,
    /// It did not stop within the stop deadline.
    StopTimeout,
}

impl fmt::Display for KillReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HeartbeatTimeout => "heartbeat timeout",
            Self::StartTimeout => "start timeout",
            Self::StopTimeout => "stop timeout",
        })
    }
}

/// How a child ended for good: no process of it will be started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finish {
    /// Its last process exited and the restart policy does not restart it.
    Exited(ExitStatus),
    /// It restarted more often than its intensity allows.
    GaveUp,
    /// It was stopped on request.
    Stopped,
    /// The bus is shutting down.
    Shutdown,
}

/// What follows the exit of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AfterExit {
    /// A new process starts after this delay.
    Restart {
        /// The backoff delay.
        after: Duration,
    },
    /// A replacement already starting takes over.
    Replaced,
    /// It was an old process retired after its replacement took over (or a replacement
    /// that failed while the old one kept serving).
    Retired,
    /// The child is finished.
    Finished(Finish),
}

/// What a supervisor tells listeners ([`ServiceEvent::Supervision`](crate::ServiceEvent::Supervision)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SupervisionEvent {
    /// A process was forked for a child.
    Started {
        /// The child.
        child: ChildRef,
        /// The new process.
        pid: Pid,
        /// How many processes the child has had, this one included.
        generation: u32,
        /// Why.
        reason: StartReason,
        /// Its request limit, with recycling.
        limit: Option<u64>,
    },
    /// A process said it is up (its closure returned; its name is registered).
    Ready {
        /// The child.
        child: ChildRef,
        /// The process.
        pid: Pid,
    },
    /// A replacement is up and took over; the old process is asked to stop.
    Replaced {
        /// The child.
        child: ChildRef,
        /// The old process.
        old: Pid,
        /// The new one.
        new: Pid,
        /// Why.
        reason: StopReason,
    },
    /// A process was asked to stop cooperatively.
    Stopping {
        /// The child.
        child: ChildRef,
        /// The process.
        pid: Pid,
        /// Why.
        reason: StopReason,
    },
    /// A process was killed with `SIGKILL`.
    Killed {
        /// The child.
        child: ChildRef,
        /// The process.
        pid: Pid,
        /// Why.
        reason: KillReason,
    },
    /// A process of a child exited and was reaped: one event per process, whatever the path.
    Exited {
        /// The child.
        child: ChildRef,
        /// The process.
        pid: Pid,
        /// How it ended ([`ExitStatus::success`] tells success from failure).
        status: ExitStatus,
        /// What follows.
        next: AfterExit,
    },
    /// A worker reached its request limit and asked to be replaced.
    Recycling {
        /// The child.
        child: ChildRef,
        /// The process.
        pid: Pid,
        /// Messages it handled.
        handled: u64,
    },
    /// Forking a process for a child failed (counted like a failed start).
    ForkFailed {
        /// The child.
        child: ChildRef,
        /// The error.
        error: String,
    },
    /// More restarts than the intensity allows: the supervisor gave up on the child (and
    /// told its own parent, when it has one).
    GaveUp {
        /// The child.
        child: ChildRef,
        /// Restarts within the window.
        restarts: u32,
    },
    /// A rolling reload began.
    ReloadStarted {
        /// The supervisor.
        supervisor: SupervisorId,
        /// Children to replace, one at a time.
        children: usize,
    },
    /// A rolling reload ended.
    ReloadFinished {
        /// The supervisor.
        supervisor: SupervisorId,
        /// Children whose process was replaced.
        replaced: usize,
        /// Children whose replacement failed (the old process kept serving) or that ended
        /// meanwhile.
        failed: usize,
    },
    /// A reload was asked for (by `SIGHUP`) while one was running: refused, not doubled.
    ReloadRefused {
        /// The supervisor.
        supervisor: SupervisorId,
    },
    /// A supervisor in a child process of this one gave up on one of its children.
    ChildGaveUp {
        /// The child process that reported it.
        from: Pid,
        /// The name of the child it gave up on.
        name: Option<String>,
        /// Its restarts within the window.
        restarts: u32,
    },
}

/// The end of a child, for [`Supervisor::wait`](super::Supervisor::wait).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChildOutcome {
    /// The child.
    pub child: ChildId,
    /// Its name.
    pub name: Option<String>,
    /// How it ended.
    pub finish: Finish,
    /// The exit status of the last of its processes to exit.
    pub last: Option<ExitStatus>,
    /// Processes it had.
    pub generations: u32,
}
