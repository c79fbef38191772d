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
//! ([`ServiceEvent::Task`](crate::ServiceEvent::Task)) and kept for [`TaskPool::wait`]:
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

pub(crate) mod state;
pub(crate) mod types;

use std::rc::Rc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bus::Bus;
use crate::message::{decode, encode_local};
use crate::supervisor::{
    self, JobFn, PoolError, SuperviseError, Supervisor, SupervisorConfig, WaitError,
};

pub(crate) use state::PoolState;
pub use types::{PoolConfig, PoolStats, TaskId, TaskOptions, TaskOutcome, TaskResult};

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

    /// Submits a job. Its outcome comes to the listeners as [`ServiceEvent::Task`](crate::ServiceEvent::Task) and is kept for
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
