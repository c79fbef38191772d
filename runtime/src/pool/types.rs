//! The vocabulary of the task pool: jobs, their outcomes, options, configuration and
//! counters (plain data).

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::child::Pid;
use crate::error::DecodeError;
use crate::message::decode;
use crate::supervisor::types::ChildSpec;

/// A job of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub(crate) u64);

impl TaskId {
    /// Its number (unique in its pool).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {}", self.0)
    }
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskResult {
    /// The handler's value, encoded (see [`TaskOutcome::value`]).
    Done(Vec<u8>),
    /// The handler panicked, or the job was not the type the handler takes.
    Failed(String),
    /// The worker holding the job died before its result came.
    Lost {
        /// The worker.
        worker: Pid,
    },
    /// No result within the job's timeout.
    TimedOut,
}

/// A job's one outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskOutcome {
    /// The job.
    pub task: TaskId,
    /// How it ended.
    pub result: TaskResult,
    /// Whether it was sent a second time (idempotent, after its first worker died).
    pub retried: bool,
}

impl TaskOutcome {
    /// The handler's value, decoded; `None` unless the job is [`TaskResult::Done`].
    pub fn value<R: DeserializeOwned>(&self) -> Option<Result<R, DecodeError>> {
        match &self.result {
            TaskResult::Done(bytes) => Some(decode(bytes)),
            _ => None,
        }
    }

    /// Whether the job was lost with a worker.
    pub fn is_lost(&self) -> bool {
        matches!(self.result, TaskResult::Lost { .. })
    }
}

/// Per-job options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskOptions {
    /// A timeout instead of the pool's.
    pub timeout: Option<Duration>,
    /// Running the job twice is harmless: if its worker dies, send it once more before
    /// reporting it lost.
    pub idempotent: bool,
}

impl TaskOptions {
    /// Marks the job idempotent.
    #[must_use]
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Sets its timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// How a pool is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Worker processes.
    pub workers: usize,
    /// Workers are named `{name}.{index}` when set.
    pub name: Option<String>,
    /// The spec of every worker (its name is replaced as above).
    pub worker: ChildSpec,
    /// Jobs a worker holds at most (sent, no result yet).
    pub window: usize,
    /// Jobs waiting or running at most; beyond, [`TaskPool::submit`](super::TaskPool::submit) refuses.
    pub max_pending: usize,
    /// Default timeout of a job (`None`: none).
    pub task_timeout: Option<Duration>,
    /// Outcomes kept for [`TaskPool::take`](super::TaskPool::take) and waits at most (the oldest are forgotten
    /// first; every outcome reaches the listeners as `ServiceEvent::Task` regardless).
    pub max_kept: usize,
    /// A `SIGHUP` reloads the workers one at a time.
    pub reload_on_sighup: bool,
}

impl PoolConfig {
    /// A pool of `workers` workers with the defaults.
    pub fn new(workers: usize) -> Self {
        Self {
            workers,
            name: None,
            worker: ChildSpec::default(),
            window: 16,
            max_pending: 1 << 16,
            task_timeout: Some(Duration::from_secs(60)),
            max_kept: 1 << 16,
            reload_on_sighup: true,
        }
    }

    /// Names the workers `{name}.{index}`.
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the spec of every worker.
    #[must_use]
    pub fn worker(mut self, spec: ChildSpec) -> Self {
        self.worker = spec;
        self
    }

    /// Sets the per-worker window.
    #[must_use]
    pub fn window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// Sets the default job timeout.
    #[must_use]
    pub fn task_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.task_timeout = timeout;
        self
    }
}

/// What a pool did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Jobs accepted.
    pub submitted: u64,
    /// Jobs with a result.
    pub done: u64,
    /// Jobs whose handler failed.
    pub failed: u64,
    /// Jobs lost with their worker.
    pub lost: u64,
    /// Jobs sent a second time after their worker died.
    pub retried: u64,
    /// Jobs that timed out.
    pub timed_out: u64,
    /// Results that came after their job timed out (dropped).
    pub late: u64,
    /// Jobs waiting for a worker now.
    pub queued: u64,
    /// Jobs at workers now.
    pub running: u64,
}
