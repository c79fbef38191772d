//! A task pool (Swoole's task workers): supervised worker processes that run jobs for the
//! process that owns the pool, with an outcome for every job.
//!
//! ```no_run
//! use std::time::Duration;
//! use forkbus_runtime::pool::{PoolConfig, TaskPool};
//! use forkbus_runtime::{Bus, BusConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut bus = Bus::root(BusConfig::default())?;
//! let pool = TaskPool::start(&mut bus, PoolConfig::new(4), |_bus, n: u64| n * n)?;
//! let ids: Vec<_> = (0..100u64).map(|n| pool.submit(&mut bus, &n)).collect::<Result<_, _>>()?;
//! for outcome in pool.wait_many(&mut bus, &ids, Duration::from_secs(10))? {
//!     let square: Option<u64> = outcome.value().and_then(Result::ok);
//!     println!("{}: {square:?}", outcome.task);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Jobs travel to workers as link-level control frames of the supervision protocol (never
//! seen by listeners' `on_message`), at most [`PoolConfig::window`] per worker at a time;
//! the rest wait in the pool (bounded by [`PoolConfig::max_pending`]). An idle worker is
//! preferred, otherwise the next one with room in round-robin order. Every job ends in
//! exactly one [`TaskOutcome`], delivered to the owner's listeners
//! ([`Listener::on_task`](crate::Listener::on_task)) and kept for [`TaskPool::wait`]:
//!
//! - [`TaskResult::Done`]: the handler's value; [`TaskResult::Failed`]: it panicked or the
//!   job could not be decoded;
//! - [`TaskResult::Lost`]: the worker holding it died first (a job marked idempotent is
//!   sent again, once, before it is reported lost);
//! - [`TaskResult::TimedOut`]: no result within its timeout (a late result is dropped and
//!   counted).
//!
//! A result the worker wrote before dying still counts: the bus reads a dead child's
//! socket to the end before it reports the exit.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use forkbus_router::Timestamp;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bus::Bus;
use crate::child::Pid;
use crate::error::DecodeError;
use crate::message::{decode, encode_local};
use crate::supervisor::{
    self, ChildSpec, JobFn, PoolError, SuperviseError, Supervisor, SupervisorConfig, WaitError,
};

/// A job of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(u64);

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
    /// Jobs waiting or running at most; beyond, [`TaskPool::submit`] refuses.
    pub max_pending: usize,
    /// Default timeout of a job (`None`: none).
    pub task_timeout: Option<Duration>,
    /// Outcomes kept for [`TaskPool::take`] and waits at most (the oldest are forgotten
    /// first; every outcome reaches `on_task` regardless).
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

/// A pool of supervised worker processes running jobs. A handle (copyable): the bus keeps
/// the state. See the [module documentation](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskPool {
    sup: Supervisor,
}

impl TaskPool {
    /// Starts a pool whose workers run `handler` on every job (decoded as a `J`; the `R`
    /// it returns is the job's result). Workers are supervised children (restarted always
    /// by default; the spec in `config` applies).
    pub fn start<J, R, F>(
        bus: &mut Bus,
        config: PoolConfig,
        handler: F,
    ) -> Result<Self, SuperviseError>
    where
        J: DeserializeOwned,
        R: Serialize,
        F: Fn(&mut Bus, J) -> R + 'static,
    {
        Self::start_with(bus, config, |_| {}, handler)
    }

    /// [`start`](Self::start) with `init` run first in every worker process (listeners,
    /// state).
    pub fn start_with<I, J, R, F>(
        bus: &mut Bus,
        config: PoolConfig,
        init: I,
        handler: F,
    ) -> Result<Self, SuperviseError>
    where
        I: Fn(&mut Bus) + 'static,
        J: DeserializeOwned,
        R: Serialize,
        F: Fn(&mut Bus, J) -> R + 'static,
    {
        if config.workers == 0 || config.window == 0 {
            return Err(SuperviseError::InvalidSpec(
                "a pool needs workers and a window",
            ));
        }
        let job: JobFn = Rc::new(move |bus: &mut Bus, bytes: &[u8]| {
            let input: J = decode(bytes).map_err(|e| e.to_string())?;
            let output = handler(bus, input);
            let max = (bus.router().config().max_frame as usize).saturating_sub(64);
            encode_local(&output, max).map_err(|e| e.to_string())
        });
        let sup = Supervisor::with_config(
            bus,
            SupervisorConfig {
                reload_on_sighup: config.reload_on_sighup,
            },
        );
        supervisor::attach_pool(bus, sup.id(), PoolState::new(&config, job));
        let init: Rc<dyn Fn(&mut Bus)> = Rc::new(init);
        for i in 0..config.workers {
            let mut spec = config.worker.clone();
            spec.name = config.name.as_ref().map(|n| format!("{n}.{i}"));
            sup.spawn_rc(bus, spec, init.clone())?;
        }
        Ok(Self { sup })
    }

    /// The supervisor of the workers (their pids, events, reload).
    pub fn supervisor(&self) -> Supervisor {
        self.sup
    }

    /// Submits a job with the pool's default options.
    pub fn submit<J: Serialize + ?Sized>(
        &self,
        bus: &mut Bus,
        job: &J,
    ) -> Result<TaskId, PoolError> {
        self.submit_with(bus, job, TaskOptions::default())
    }

    /// Submits a job. Its outcome comes to the listeners' `on_task` and is kept for
    /// [`wait`](Self::wait) and [`take`](Self::take).
    pub fn submit_with<J: Serialize + ?Sized>(
        &self,
        bus: &mut Bus,
        job: &J,
        options: TaskOptions,
    ) -> Result<TaskId, PoolError> {
        if bus.is_stopping() {
            return Err(PoolError::ShuttingDown);
        }
        let max = (bus.router().config().max_frame as usize).saturating_sub(64);
        // Refused while encoding, before a job too large is encoded whole.
        let payload = encode_local(job, max).map_err(PoolError::Encode)?;
        let now = bus.now();
        supervisor::with_pool(bus, self.sup.id(), |pool, _| {
            pool.submit(now, payload, options)
        })
        .unwrap_or(Err(PoolError::NoSuchPool))
    }

    /// Takes a job's kept outcome, if it has one.
    pub fn take(&self, bus: &mut Bus, task: TaskId) -> Option<TaskOutcome> {
        supervisor::with_pool(bus, self.sup.id(), |pool, _| pool.take(task.0)).flatten()
    }

    /// Runs the loop until the job has an outcome (taken out of the pool's keeping) or the
    /// timeout passes.
    pub fn wait(
        &self,
        bus: &mut Bus,
        task: TaskId,
        timeout: Duration,
    ) -> Result<TaskOutcome, WaitError> {
        if !supervisor::pool_ref(bus, self.sup.id()).is_some_and(|p| p.knows(task.0)) {
            return Err(WaitError::NotFound);
        }
        supervisor::wait_pool(bus, self.sup.id(), timeout, move |p| p.has_outcome(task.0))?;
        self.take(bus, task).ok_or(WaitError::NotFound)
    }

    /// Runs the loop until every job has an outcome or the timeout passes; returns the
    /// outcomes that came, in the order asked (taken out of the pool's keeping). Fewer than
    /// asked means the timeout passed (or some were not this pool's).
    pub fn wait_many(
        &self,
        bus: &mut Bus,
        tasks: &[TaskId],
        timeout: Duration,
    ) -> Result<Vec<TaskOutcome>, WaitError> {
        let ids: Vec<u64> = tasks.iter().map(|t| t.0).collect();
        let watch = ids.clone();
        // Checked after every event: a cursor over the ids keeps it amortized O(1).
        let cursor = std::cell::Cell::new(0usize);
        match supervisor::wait_pool(bus, self.sup.id(), timeout, move |p| {
            let mut i = cursor.get();
            while i < watch.len() && (p.has_outcome(watch[i]) || !p.knows(watch[i])) {
                i += 1;
            }
            cursor.set(i);
            i == watch.len()
        }) {
            Ok(()) | Err(WaitError::Timeout) => {}
            Err(e) => return Err(e),
        }
        Ok(ids
            .into_iter()
            .filter_map(|id| self.take(bus, TaskId(id)))
            .collect())
    }

    /// Counters.
    pub fn stats(&self, bus: &Bus) -> PoolStats {
        supervisor::pool_ref(bus, self.sup.id()).map_or_else(PoolStats::default, PoolState::stats)
    }
}

// ---------------------------------------------------------------------------------------
// The pool's bookkeeping: no I/O (sends go through a callback), time as `now`.

#[derive(Debug)]
struct Task {
    /// Kept while it waits, and while it runs when idempotent (for the retry).
    payload: Option<Vec<u8>>,
    deadline: Option<Timestamp>,
    idempotent: bool,
    retried: bool,
    /// The worker holding it.
    at: Option<Pid>,
}

/// The pool's state, kept beside its supervisor's.
pub(crate) struct PoolState {
    window: usize,
    max_pending: usize,
    task_timeout: Option<Duration>,
    max_kept: usize,
    job: JobFn,
    next_id: u64,
    queue: VecDeque<u64>,
    tasks: HashMap<u64, Task>,
    /// Jobs sent to each worker and not answered (timed-out ones included: they still run).
    load: HashMap<Pid, BTreeSet<u64>>,
    rr: usize,
    deadlines: BTreeSet<(Timestamp, u64)>,
    kept: HashMap<u64, TaskOutcome>,
    kept_order: VecDeque<u64>,
    stats: PoolStats,
}

impl fmt::Debug for PoolState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolState")
            .field("queued", &self.queue.len())
            .field("tasks", &self.tasks.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl PoolState {
    pub(crate) fn new(config: &PoolConfig, job: JobFn) -> Self {
        Self {
            window: config.window.max(1),
            max_pending: config.max_pending,
            task_timeout: config.task_timeout,
            max_kept: config.max_kept,
            job,
            next_id: 0,
            queue: VecDeque::new(),
            tasks: HashMap::new(),
            load: HashMap::new(),
            rr: 0,
            deadlines: BTreeSet::new(),
            kept: HashMap::new(),
            kept_order: VecDeque::new(),
            stats: PoolStats::default(),
        }
    }

    pub(crate) fn job(&self) -> JobFn {
        self.job.clone()
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let mut s = self.stats;
        s.queued = self.tasks.values().filter(|t| t.at.is_none()).count() as u64;
        s.running = self.tasks.len() as u64 - s.queued;
        s
    }

    /// Whether a job is pending or has a kept outcome.
    pub(crate) fn knows(&self, id: u64) -> bool {
        self.tasks.contains_key(&id) || self.kept.contains_key(&id)
    }

    pub(crate) fn has_outcome(&self, id: u64) -> bool {
        self.kept.contains_key(&id)
    }

    pub(crate) fn submit(
        &mut self,
        now: Timestamp,
        payload: Vec<u8>,
        options: TaskOptions,
    ) -> Result<TaskId, PoolError> {
        if self.tasks.len() >= self.max_pending {
            return Err(PoolError::Full {
                max: self.max_pending,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let deadline = options.timeout.or(self.task_timeout).map(|t| now + t);
        if let Some(d) = deadline {
            self.deadlines.insert((d, id));
        }
        self.tasks.insert(
            id,
            Task {
                payload: Some(payload),
                deadline,
                idempotent: options.idempotent,
                retried: false,
                at: None,
            },
        );
        self.queue.push_back(id);
        self.stats.submitted += 1;
        Ok(TaskId(id))
    }

    /// Hands waiting jobs to `workers` (running ones, in child order): an idle worker
    /// first, otherwise the next with room after the last one used. `send` returns `false`
    /// when the worker cannot take frames (its link is gone); the job stays queued.
    pub(crate) fn dispatch(
        &mut self,
        workers: &[Pid],
        send: &mut dyn FnMut(Pid, u64, &[u8]) -> bool,
    ) {
        let n = workers.len();
        if n == 0 {
            return;
        }
        let mut refused: Vec<Pid> = Vec::new();
        while let Some(&id) = self.queue.front() {
            let Some(task) = self.tasks.get(&id) else {
                // Timed out while it waited.
                self.queue.pop_front();
                continue;
            };
            let load = |p: &Pid| self.load.get(p).map_or(0, BTreeSet::len);
            let order = (0..n).map(|k| (self.rr + k) % n);
            let usable = |i: &usize| !refused.contains(&workers[*i]);
            let pick = order
                .clone()
                .filter(usable)
                .find(|i| load(&workers[*i]) == 0)
                .or_else(|| {
                    order
                        .filter(usable)
                        .find(|i| load(&workers[*i]) < self.window)
                });
            let Some(i) = pick else {
                return;
            };
            let pid = workers[i];
            let payload = task.payload.as_deref().unwrap_or(&[]);
            if !send(pid, id, payload) {
                refused.push(pid);
                continue;
            }
            self.queue.pop_front();
            self.rr = (i + 1) % n;
            self.load.entry(pid).or_default().insert(id);
            if let Some(t) = self.tasks.get_mut(&id) {
                t.at = Some(pid);
                if !t.idempotent {
                    t.payload = None;
                }
            }
        }
    }

    /// A worker's result.
    pub(crate) fn on_result(
        &mut self,
        pid: Pid,
        id: u64,
        outcome: Result<Vec<u8>, String>,
    ) -> Option<TaskOutcome> {
        if let Some(set) = self.load.get_mut(&pid) {
            set.remove(&id);
        }
        let held_here = self.tasks.get(&id).is_some_and(|t| t.at == Some(pid));
        if !held_here {
            self.stats.late += 1;
            return None;
        }
        let task = self.tasks.remove(&id)?;
        self.forget_deadline(id, &task);
        let result = match outcome {
            Ok(bytes) => {
                self.stats.done += 1;
                TaskResult::Done(bytes)
            }
            Err(text) => {
                self.stats.failed += 1;
                TaskResult::Failed(text)
            }
        };
        Some(TaskOutcome {
            task: TaskId(id),
            result,
            retried: task.retried,
        })
    }

    /// A worker exited: its jobs are lost (an idempotent one not retried yet waits again,
    /// first in line).
    pub(crate) fn on_worker_gone(&mut self, pid: Pid) -> Vec<TaskOutcome> {
        let Some(ids) = self.load.remove(&pid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for id in ids.into_iter().rev() {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            if task.at != Some(pid) {
                continue;
            }
            if task.idempotent && !task.retried && task.payload.is_some() {
                task.retried = true;
                task.at = None;
                self.stats.retried += 1;
                self.queue.push_front(id);
                continue;
            }
            if let Some(task) = self.tasks.remove(&id) {
                self.forget_deadline(id, &task);
                self.stats.lost += 1;
                out.push(TaskOutcome {
                    task: TaskId(id),
                    result: TaskResult::Lost { worker: pid },
                    retried: task.retried,
                });
            }
        }
        out.sort_by_key(|o| o.task);
        out
    }

    /// Jobs past their deadline.
    pub(crate) fn handle_timeout(&mut self, now: Timestamp) -> Vec<TaskOutcome> {
        let mut out = Vec::new();
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(task) = self.tasks.remove(&id) {
                self.stats.timed_out += 1;
                out.push(TaskOutcome {
                    task: TaskId(id),
                    result: TaskResult::TimedOut,
                    retried: task.retried,
                });
            }
        }
        out
    }

    pub(crate) fn poll_timeout(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    fn forget_deadline(&mut self, id: u64, task: &Task) {
        if let Some(d) = task.deadline {
            self.deadlines.remove(&(d, id));
        }
    }

    /// Keeps an outcome for waits (the oldest forgotten beyond the bound).
    pub(crate) fn keep(&mut self, outcome: &TaskOutcome) {
        if self.max_kept == 0 {
            return;
        }
        let id = outcome.task.0;
        if self.kept.insert(id, outcome.clone()).is_none() {
            self.kept_order.push_back(id);
        }
        if self.kept_order.len() > 2 * self.kept.len().max(16) {
            // Ids taken meanwhile: compact (amortized, the order is otherwise unbounded).
            let kept = &self.kept;
            self.kept_order.retain(|id| kept.contains_key(id));
        }
        while self.kept.len() > self.max_kept {
            match self.kept_order.pop_front() {
                Some(old) => {
                    self.kept.remove(&old);
                }
                None => break,
            }
        }
    }

    pub(crate) fn take(&mut self, id: u64) -> Option<TaskOutcome> {
        // `kept_order` keeps the id until the next compaction: harmless, it is skipped.
        self.kept.remove(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(window: usize) -> PoolState {
        let job: JobFn = Rc::new(|_: &mut Bus, b: &[u8]| Ok(b.to_vec()));
        PoolState::new(&PoolConfig::new(2).window(window), job)
    }

    fn ms(n: u64) -> Timestamp {
        Timestamp::from_nanos(n * 1_000_000)
    }

    fn p(n: u32) -> Pid {
        Pid::from_raw(n)
    }

    /// Dispatches and returns (worker, job) in the order sent.
    fn dispatch(s: &mut PoolState, workers: &[Pid]) -> Vec<(u32, u64)> {
        let mut sent = Vec::new();
        s.dispatch(workers, &mut |pid, id, _| {
            sent.push((pid.as_raw(), id));
            true
        });
        sent
    }

    #[test]
    fn idle_workers_first_then_round_robin_within_the_window() {
        let mut s = state(2);
        for _ in 0..6 {
            s.submit(ms(0), vec![1], TaskOptions::default())
                .expect("room");
        }
        let sent = dispatch(&mut s, &[p(1), p(2)]);
        // Two idle workers take one each, then round robin up to the window of two.
        assert_eq!(sent, [(1, 0), (2, 1), (1, 2), (2, 3)]);
        assert_eq!(s.stats().queued, 2);
        // A result frees worker 2: it is idle? No, it holds job 3 still; worker 2 has room.
        assert!(s.on_result(p(2), 1, Ok(vec![9])).is_some());
        assert_eq!(dispatch(&mut s, &[p(1), p(2)]), [(2, 4)]);
        // Worker 1 finishes both: idle, preferred.
        s.on_result(p(1), 0, Ok(vec![]));
        s.on_result(p(1), 2, Ok(vec![]));
        assert_eq!(dispatch(&mut s, &[p(1), p(2)]), [(1, 5)]);
    }

    #[test]
    fn every_job_gets_one_outcome_when_a_worker_dies() {
        let mut s = state(4);
        let ids: Vec<TaskId> = (0..6)
            .map(|i| {
                let o = if i % 2 == 0 {
                    TaskOptions::default().idempotent()
                } else {
                    TaskOptions::default()
                };
                s.submit(ms(0), vec![i], o).expect("room")
            })
            .collect();
        dispatch(&mut s, &[p(1), p(2)]);
        // Worker 1 holds 0, 2, 4 (idempotent) ; worker 2 holds 1, 3, 5.
        let lost = s.on_worker_gone(p(2));
        assert_eq!(lost.iter().map(|o| o.task.0).collect::<Vec<_>>(), [1, 3, 5]);
        assert!(lost.iter().all(TaskOutcome::is_lost));
        let requeued = s.on_worker_gone(p(1));
        assert!(requeued.is_empty(), "idempotent jobs are sent again");
        assert_eq!(s.stats().retried, 3);
        let again = dispatch(&mut s, &[p(3)]);
        assert_eq!(again.len(), 3);
        // Retried once only: a second death loses them.
        let lost2 = s.on_worker_gone(p(3));
        assert_eq!(lost2.len(), 3);
        assert!(lost2.iter().all(|o| o.retried));
        assert_eq!(s.stats().lost, 6);
        assert_eq!(ids.len(), 6);
        assert!(s.tasks.is_empty());
    }

    #[test]
    fn timeouts_and_late_results() {
        let mut s = state(1);
        let a = s
            .submit(
                ms(0),
                vec![],
                TaskOptions::default().timeout(Duration::from_millis(10)),
            )
            .expect("room");
        let b = s
            .submit(
                ms(0),
                vec![],
                TaskOptions::default().timeout(Duration::from_millis(20)),
            )
            .expect("room");
        dispatch(&mut s, &[p(1)]);
        assert_eq!(s.poll_timeout(), Some(ms(10)));
        let out = s.handle_timeout(ms(10));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].task, a);
        assert_eq!(out[0].result, TaskResult::TimedOut);
        // Job a still occupies worker 1 until its result comes: b waits.
        assert!(dispatch(&mut s, &[p(1)]).is_empty());
        assert_eq!(s.on_result(p(1), a.0, Ok(vec![])), None);
        assert_eq!(s.stats().late, 1);
        assert_eq!(dispatch(&mut s, &[p(1)]), [(1, b.0)]);
        let out = s.handle_timeout(ms(25));
        assert_eq!(out[0].task, b);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn bounded_pending_and_kept() {
        let job: JobFn = Rc::new(|_: &mut Bus, b: &[u8]| Ok(b.to_vec()));
        let mut config = PoolConfig::new(1);
        config.max_pending = 2;
        config.max_kept = 2;
        let mut s = PoolState::new(&config, job);
        s.submit(ms(0), vec![], TaskOptions::default())
            .expect("room");
        s.submit(ms(0), vec![], TaskOptions::default())
            .expect("room");
        assert!(matches!(
            s.submit(ms(0), vec![], TaskOptions::default()),
            Err(PoolError::Full { max: 2 })
        ));
        dispatch(&mut s, &[p(1)]);
        for id in 0..2 {
            let o = s.on_result(p(1), id, Ok(vec![id as u8])).expect("outcome");
            s.keep(&o);
        }
        for id in 2..5 {
            s.submit(ms(0), vec![], TaskOptions::default())
                .expect("room");
            dispatch(&mut s, &[p(1)]);
            let o = s.on_result(p(1), id, Ok(vec![])).expect("outcome");
            s.keep(&o);
        }
        assert!(!s.has_outcome(0) && !s.has_outcome(2));
        assert!(s.has_outcome(3) && s.has_outcome(4));
        assert!(s.take(4).is_some());
        assert!(s.take(4).is_none());
        assert!(s.kept_order.len() <= 32);
    }

    #[test]
    fn a_refused_send_keeps_the_job_queued() {
        let mut s = state(4);
        s.submit(ms(0), vec![], TaskOptions::default())
            .expect("room");
        s.dispatch(&[p(1)], &mut |_, _, _| false);
        assert_eq!(s.stats().queued, 1);
        assert_eq!(dispatch(&mut s, &[p(1)]), [(1, 0)]);
    }

    #[test]
    fn outcomes_decode() {
        let mut scratch = Vec::new();
        let bytes = crate::message::encode(&42u32, &mut scratch).expect("encodes");
        let o = TaskOutcome {
            task: TaskId(1),
            result: TaskResult::Done(bytes),
            retried: false,
        };
        assert_eq!(o.value::<u32>().map(Result::ok), Some(Some(42)));
        let lost = TaskOutcome {
            task: TaskId(2),
            result: TaskResult::Lost { worker: p(3) },
            retried: true,
        };
        assert!(lost.value::<u32>().is_none());
        assert!(lost.is_lost());
        assert_eq!(TaskId(7).to_string(), "task 7");
    }
}
