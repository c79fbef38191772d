//! Supervision: workers that restart, keep their names, recycle, answer heartbeats and
//! reload one at a time — Erlang/OTP's supervisor in forkbus's single-threaded reactor.
//!
//! A [`Supervisor`] lives in a bus and forks its children with [`Supervisor::spawn`]: a
//! closure run in a forked child, like [`Bus::fork`], then its loop. Each child follows a
//! [`ChildSpec`]: a name that moves to every new process, a [`Restart`] policy, a
//! restart-intensity limit with [`Backoff`], a start timeout, [`Heartbeat`]s, a stop
//! deadline, and recycling after a number of handled messages ([`MaxRequests`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use forkbus_runtime::supervisor::{ChildSpec, Restart, Supervisor};
//! use forkbus_runtime::{Bus, BusConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut bus = Bus::root(BusConfig::default())?;
//! let sup = Supervisor::new(&mut bus);
//! let spec = ChildSpec::named("db")
//!     .restart(Restart::OnFailure)
//!     .intensity(5, Duration::from_secs(10))
//!     .heartbeat(Duration::from_millis(200), Duration::from_secs(1))
//!     .max_requests(10_000, 1_000);
//! let db = sup.spawn(&mut bus, spec, |bus| {
//!     // Runs in every process of "db": add listeners, load state.
//!     let _ = bus;
//! })?;
//! let outcome = sup.wait(&mut bus, db, Duration::from_secs(60))?;
//! println!("db ended: {:?}", outcome.finish);
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//!
//! The decisions are a pure state machine (`core.rs`, tested without processes); the shell
//! here feeds it child exits (from the bus's one reaping path, whichever comes first),
//! link-level control frames from its children (`READY`, `PONG`, `RECYCLE`), `SIGHUP`
//! and one timer of the bus armed at its next deadline. Restarts wait in a backoff state
//! driven by that timer — the loop never sleeps. Events reach listeners as
//! [`ServiceEvent::Supervision`].
//!
//! In each supervised process an agent answers pings from its loop (so a process whose
//! loop is blocked stays silent and is killed after the heartbeat timeout), says `READY`
//! when its closure returned, counts handled messages (recycling), and turns a stop
//! request into [`ServiceEvent::Stopping`] and
//! [`should_stop`]; then it keeps serving until quiet for
//! [`ChildSpec::drain_quiet`], drains (its replies acknowledged) and exits 0. A stop not
//! honoured within [`ChildSpec::stop_timeout`] becomes `SIGKILL`.
//!
//! # Names and envelopes across restarts
//!
//! **The rule: a name is bound to a node at the sender.** An envelope sent to a name goes
//! to the node the name resolves to in the sender's routing table when it is sent
//! ([`Destination::NameAt`](forkbus_router::Destination::NameAt)), and its outcome is
//! about that node: routing never re-resolves the name on the way, so an envelope is
//! never delivered to one process while its receipt waits on another.
//!
//! - A child's name is given by its supervisor to each new process at birth (the only
//!   way a name moves: names are unique, and a name held by another node is refused to
//!   [`Bus::register_name`] and to [`Bus::fork`]). A replacement (recycling, reload) takes
//!   the name over before the old process is asked to stop: envelopes bound to the old
//!   process still reach it (it serves until quiet), envelopes sent after the senders
//!   heard of the move go to the new one; both end `Delivered` when taken.
//! - A process that dies takes with it what it held: envelopes queued or unacknowledged
//!   towards it come back from its link as lost (never written: sure; unacknowledged:
//!   unknown), envelopes it took but did not answer end `Unknown(destination down)` at
//!   their origins once its route is withdrawn ([`Event::NodeDown`]).
//! - While no process holds the name (between a crash and the restart), envelopes sent to
//!   it are lost for sure (`no route`: safe to retry) by default; with
//!   [`WhileDown::Queue`] the supervisor holds the name in custody and up to `capacity`
//!   envelopes, their receipts open, and hands them to the restart ahead of anything else
//!   (`custody.rs`): they end `Delivered` there, or `Lost(abandoned)` if the child is not
//!   restarted.
//! - An envelope bound to the supervisor as custodian that arrives after the restart took
//!   the name is passed on to the restart too.
//!
//! # Exits and waits
//!
//! Every process of a child ends in exactly one [`SupervisionEvent::Exited`] with its
//! [`ExitStatus`](forkbus_node::ExitStatus) and what follows, whatever reaped it (the bus reaps in
//! one place and never hands a status to anyone else). [`Supervisor::wait`] and
//! [`Supervisor::wait_all`] run the loop until children are finished, with a timeout.

pub(crate) mod agent;
mod core;
mod custody;
pub(crate) mod error;
mod policy;
pub(crate) mod types;

use crate::child::PidExt;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use forkbus_router::Timestamp;
use nix::sys::signal::{kill, Signal};

pub use agent::{hold_stop, ready, release_stop, should_stop};
pub use error::{PoolError, ReloadError, SuperviseError, WaitError};
pub use policy::{Backoff, Intensity, MaxRequests};
pub use types::{
    AfterExit, ChildId, ChildOutcome, ChildRef, ChildSpec, Finish, Heartbeat, KillReason, Restart,
    StartReason, StopReason, StopRequest, SupervisionEvent, SupervisorId, WhileDown,
};

pub(crate) use agent::JobFn;

use self::core::{Core, Effects, ForkOrder, ReloadRefusal};
use crate::bus::{Bus, ForkOptions};
use crate::event::{Event, ServiceEvent};
use crate::exec::Command;
use crate::listener::Service;
use crate::pool::state::PoolState;
use crate::pool::types::TaskOutcome;
use crate::timer::TimerId;
use forkbus_node::LinkInfo;
use forkbus_node::Pid;
use forkbus_node::Relation;
use forkbus_node::{Control, SupervisionFrame as Frame, SupervisionSender as Sender};

/// The closure every process of a child runs.
type StartFn = Rc<dyn Fn(&mut Bus)>;

/// How every process of a child starts: a forked closure, or a program that joins the tree
/// ([`Bus::exec_node`]).
#[derive(Clone)]
enum Start {
    Closure(StartFn),
    Program(Box<Command>),
}

/// How a supervisor behaves as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SupervisorConfig {
    /// A `SIGHUP` to this process starts a rolling reload of this supervisor's children.
    pub reload_on_sighup: bool,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            reload_on_sighup: true,
        }
    }
}

impl SupervisorConfig {
    /// Sets [`reload_on_sighup`](Self::reload_on_sighup).
    #[must_use]
    pub fn reload_on_sighup(mut self, yes: bool) -> Self {
        self.reload_on_sighup = yes;
        self
    }
}

/// A supervisor in this process's bus: a handle (copyable) to state the bus keeps.
///
/// See the [module documentation](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Supervisor {
    id: SupervisorId,
}

/// The supervision state a bus keeps: its supervisors, the agent when this process is a
/// supervised worker, and the blocking wait in progress.
#[derive(Default)]
pub(crate) struct Registry {
    supervisors: Vec<Option<Entry>>,
    pub(crate) agent: Option<agent::Agent>,
    wait: Option<ActiveWait>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("supervisors", &self.supervisors.len())
            .field("agent", &self.agent)
            .field("waiting", &self.wait.is_some())
            .finish()
    }
}

struct Entry {
    core: Core,
    config: SupervisorConfig,
    starts: Vec<Start>,
    timer: Option<(TimerId, Timestamp)>,
    pool: Option<PoolState<JobFn>>,
    /// Names held in custody for children that are down ([`WhileDown::Queue`]).
    held: BTreeMap<ChildId, String>,
}

type WaitCond = Box<dyn Fn(&Registry) -> bool>;

struct ActiveWait {
    cond: WaitCond,
    met: bool,
    expired: bool,
}

impl Supervisor {
    /// A supervisor in this bus, reloading on `SIGHUP`.
    pub fn new(bus: &mut Bus) -> Self {
        Self::with_config(bus, SupervisorConfig::default())
    }

    /// A supervisor with a configuration.
    pub fn with_config(bus: &mut Bus, config: SupervisorConfig) -> Self {
        let reg = registry(bus);
        let id = SupervisorId(u32::try_from(reg.supervisors.len()).unwrap_or(u32::MAX));
        let seed = u64::from(crate::clock::nonce(id.0)) << 32 | u64::from(bus.pid().as_raw());
        registry(bus).supervisors.push(Some(Entry {
            core: Core::new(id, seed),
            config,
            starts: Vec::new(),
            timer: None,
            pool: None,
            held: BTreeMap::new(),
        }));
        Self { id }
    }

    /// Its id (in events).
    pub fn id(&self) -> SupervisorId {
        self.id
    }

    /// Adds a supervised child and forks its first process, which runs `worker` (like
    /// [`Bus::fork`]'s closure: listeners, state), tells the supervisor it is ready when
    /// `worker` returns, then runs its loop. Every restart runs `worker` again in a new
    /// process.
    ///
    /// A failed fork is not an error here: it counts as a failed start (an event, a
    /// backoff, the intensity limit).
    pub fn spawn<F>(
        &self,
        bus: &mut Bus,
        spec: ChildSpec,
        worker: F,
    ) -> Result<ChildId, SuperviseError>
    where
        F: Fn(&mut Bus) + 'static,
    {
        self.spawn_rc(bus, spec, Rc::new(worker))
    }

    pub(crate) fn spawn_rc(
        &self,
        bus: &mut Bus,
        spec: ChildSpec,
        worker: StartFn,
    ) -> Result<ChildId, SuperviseError> {
        if bus.is_stopping() {
            return Err(SuperviseError::ShuttingDown);
        }
        validate(bus, &spec)?;
        match registry(bus).supervisors.get_mut(self.id.0 as usize) {
            // The closure of child `n` is `starts[n]`: in place before its first fork.
            Some(Some(e)) => e.starts.push(Start::Closure(worker)),
            _ => return Err(SuperviseError::NoSuchSupervisor),
        }
        operate(bus, self.id, move |core, _, fx| {
            let now = crate::clock::monotonic_now();
            core.add(now, spec, fx)
        })
        .ok_or(SuperviseError::NoSuchSupervisor)
    }

    /// Adds a supervised child whose every process is `program`, started as a node of the
    /// tree ([`Bus::exec_node`]): restart policy, backoff, intensity, heartbeats, stop
    /// requests and its name across restarts work as for a forked child. The program is
    /// told its name in `FORKBUS_NAME` and that it is supervised in `FORKBUS_SUPERVISED`;
    /// it registers the name, says when it is ready (`READY`), answers `PING`s and exits
    /// when asked to stop (`docs/wire.md`; the Python package does all of it).
    ///
    /// Refused ([`SuperviseError::InvalidSpec`]) for a spec a program cannot honour yet:
    /// its name held in custody while it is down ([`WhileDown::Queue`]) or a request limit
    /// (recycling counts messages inside the process).
    pub fn spawn_program(
        &self,
        bus: &mut Bus,
        spec: ChildSpec,
        program: Command,
    ) -> Result<ChildId, SuperviseError> {
        if bus.is_stopping() {
            return Err(SuperviseError::ShuttingDown);
        }
        if matches!(spec.while_down, WhileDown::Queue { .. }) {
            return Err(SuperviseError::InvalidSpec(
                "a program child cannot hold its name in custody while down",
            ));
        }
        if spec.max_requests.is_some() {
            return Err(SuperviseError::InvalidSpec(
                "a program child cannot be recycled after a number of requests",
            ));
        }
        validate(bus, &spec)?;
        match registry(bus).supervisors.get_mut(self.id.0 as usize) {
            Some(Some(e)) => e.starts.push(Start::Program(Box::new(program))),
            _ => return Err(SuperviseError::NoSuchSupervisor),
        }
        operate(bus, self.id, move |core, _, fx| {
            let now = crate::clock::monotonic_now();
            core.add(now, spec, fx)
        })
        .ok_or(SuperviseError::NoSuchSupervisor)
    }

    /// The current process of a child (starting or running), if any.
    pub fn pid(&self, bus: &Bus, child: ChildId) -> Option<Pid> {
        entry(bus, self.id)?.core.current(child)
    }

    /// Every process of this supervisor not yet reaped (current, starting replacements and
    /// old processes being retired).
    pub fn pids(&self, bus: &Bus) -> Vec<Pid> {
        entry(bus, self.id).map_or_else(Vec::new, |e| e.core.pids())
    }

    /// The children, in the order they were added.
    pub fn children(&self, bus: &Bus) -> Vec<ChildId> {
        entry(bus, self.id).map_or_else(Vec::new, |e| {
            (0..e.core.len()).map(|i| ChildId(i as u32)).collect()
        })
    }

    /// The children whose current process is ready and running, with its pid.
    pub fn running(&self, bus: &Bus) -> Vec<(ChildId, Pid)> {
        entry(bus, self.id).map_or_else(Vec::new, |e| e.core.running())
    }

    /// The child a live process belongs to.
    pub fn child_of(&self, bus: &Bus, pid: Pid) -> Option<ChildId> {
        entry(bus, self.id)?.core.child_of(pid)
    }

    /// The name of a child.
    pub fn name(&self, bus: &Bus, child: ChildId) -> Option<String> {
        entry(bus, self.id)?.core.spec(child)?.name.clone()
    }

    /// How a finished child ended (`None` while it is not finished).
    pub fn outcome(&self, bus: &Bus, child: ChildId) -> Option<ChildOutcome> {
        entry(bus, self.id)?.core.outcome(child)
    }

    /// Whether a rolling reload is running.
    pub fn is_reloading(&self, bus: &Bus) -> bool {
        entry(bus, self.id).is_some_and(|e| e.core.is_reloading())
    }

    /// Stops a child for good: its process is asked to stop ([`StopReason::Requested`])
    /// and killed after its stop deadline. `false` when it was finished already.
    pub fn stop_child(&self, bus: &mut Bus, child: ChildId) -> bool {
        operate(bus, self.id, |core, _, fx| {
            let now = crate::clock::monotonic_now();
            core.stop_child(now, child, fx)
        })
        .unwrap_or(false)
    }

    /// Begins a rolling reload: one child at a time, a new process is started; once it is
    /// ready (and holds the name) the old one is asked to drain, and killed after its stop
    /// deadline; once it is reaped the next child follows. Returns the number of children
    /// to replace. A reload while one runs is refused ([`ReloadError::InProgress`]).
    pub fn reload(&self, bus: &mut Bus) -> Result<usize, ReloadError> {
        if bus.is_stopping() {
            return Err(ReloadError::ShuttingDown);
        }
        operate(bus, self.id, |core, _, fx| {
            let now = crate::clock::monotonic_now();
            core.reload(now, fx).map_err(|e| match e {
                ReloadRefusal::InProgress => ReloadError::InProgress,
                ReloadRefusal::ShuttingDown => ReloadError::ShuttingDown,
            })
        })
        .unwrap_or(Err(ReloadError::NoSuchSupervisor))
    }

    /// Runs the loop until a child is finished (no process of it will start again and
    /// none is left), or the timeout passes. Call it from the top level (not a listener).
    pub fn wait(
        &self,
        bus: &mut Bus,
        child: ChildId,
        timeout: Duration,
    ) -> Result<ChildOutcome, WaitError> {
        let id = self.id;
        if entry(bus, id).is_none_or(|e| e.core.spec(child).is_none()) {
            return Err(WaitError::NotFound);
        }
        let done =
            move |reg: &Registry| reg_entry(reg, id).is_none_or(|e| e.core.is_finished(child));
        run_until(bus, timeout, Box::new(done))?;
        self.outcome(bus, child).ok_or(WaitError::NotFound)
    }

    /// Runs the loop until every child is finished, or the timeout passes.
    pub fn wait_all(
        &self,
        bus: &mut Bus,
        timeout: Duration,
    ) -> Result<Vec<ChildOutcome>, WaitError> {
        let id = self.id;
        let done = move |reg: &Registry| reg_entry(reg, id).is_none_or(|e| e.core.all_finished());
        run_until(bus, timeout, Box::new(done))?;
        Ok(self
            .children(bus)
            .into_iter()
            .filter_map(|c| self.outcome(bus, c))
            .collect())
    }

    /// Runs the loop until every child's current process is ready (running), or the
    /// timeout passes. For tests and start-up sequences.
    pub fn wait_ready(&self, bus: &mut Bus, timeout: Duration) -> Result<(), WaitError> {
        let id = self.id;
        let done = move |reg: &Registry| {
            reg_entry(reg, id).is_none_or(|e| e.core.running().len() == e.core.len())
        };
        run_until(bus, timeout, Box::new(done))
    }
}

fn validate(bus: &Bus, spec: &ChildSpec) -> Result<(), SuperviseError> {
    if let Some(name) = &spec.name {
        if name.is_empty() || name.len() > bus.router().config().max_name {
            return Err(SuperviseError::InvalidSpec("name is empty or too long"));
        }
    }
    if let Some(h) = spec.heartbeat {
        if h.interval.is_zero() || h.timeout.is_zero() {
            return Err(SuperviseError::InvalidSpec(
                "heartbeat interval and timeout must be positive",
            ));
        }
    }
    if spec.max_requests.is_some_and(|m| m.base == 0) {
        return Err(SuperviseError::InvalidSpec(
            "max_requests must allow at least one message",
        ));
    }
    if spec.intensity.within.is_zero() {
        return Err(SuperviseError::InvalidSpec(
            "intensity window must be positive",
        ));
    }
    Ok(())
}

fn entry(bus: &Bus, id: SupervisorId) -> Option<&Entry> {
    reg_entry(bus.service_state_ref::<Registry>()?, id)
}

/// The supervision state of a bus.
pub(crate) fn registry(bus: &mut Bus) -> &mut Registry {
    bus.service_state::<Registry>()
}

fn reg_entry(reg: &Registry, id: SupervisorId) -> Option<&Entry> {
    reg.supervisors.get(id.0 as usize)?.as_ref()
}

/// The bus's side of the state machine's effects.
struct Shell<'a> {
    bus: &'a mut Bus,
    starts: &'a [Start],
    job: Option<JobFn>,
    events: Vec<SupervisionEvent>,
    outcomes: Vec<TaskOutcome>,
}

impl Effects for Shell<'_> {
    fn fork(&mut self, order: &ForkOrder) -> Result<Pid, String> {
        let i = order.child.0 as usize;
        let start = match self.starts.get(i).cloned() {
            Some(Start::Closure(start)) => start,
            Some(Start::Program(program)) => {
                let program = *program;
                let program = match &order.name {
                    Some(name) => program.env("FORKBUS_NAME", name),
                    None => program,
                };
                return self
                    .bus
                    .exec_node(&program.env("FORKBUS_SUPERVISED", "1"))
                    .map_err(|e| e.to_string());
            }
            None => return Err("no closure for this child".to_owned()),
        };
        let limit = order.limit;
        let job = self.job.clone();
        let options = ForkOptions {
            name: order.name.clone(),
            die_with_parent: order.die_with_parent,
            keep_fds: order.keep_fds.clone(),
        };
        self.bus
            .fork(options, move |bus| {
                agent::install(bus, limit, job);
                start(bus);
                ready(bus);
            })
            .map_err(|e| e.to_string())
    }

    fn kill(&mut self, pid: Pid) {
        // Only a child not yet reaped: its pid cannot have been reused.
        if self.bus.children().contains(&pid) {
            let _ = kill(pid.nix(), Signal::SIGKILL);
        }
    }

    fn ping(&mut self, pid: Pid, seq: u64) {
        send_to(self.bus, Relation::Child(pid), &Frame::Ping(seq));
    }

    fn stop(&mut self, pid: Pid, request: StopRequest, quiet: Duration) {
        let frame = Frame::Stop {
            why: request.reason.code(),
            deadline: request.deadline,
            quiet,
        };
        send_to(self.bus, Relation::Child(pid), &frame);
    }

    fn give_up(&mut self, name: Option<&str>, restarts: u32) {
        if !self.bus.is_root() {
            let frame = Frame::GaveUp {
                restarts,
                name: name.map(str::to_owned),
            };
            send_to(self.bus, Relation::Parent, &frame);
        }
    }

    fn event(&mut self, event: SupervisionEvent) {
        tracing::debug!(?event, "supervision");
        self.events.push(event);
    }
}

fn send_to(bus: &mut Bus, to: Relation, frame: &Frame) -> bool {
    let (code, data) = frame.encode();
    bus.send_link_control(to, code, data)
}

/// Runs `op` on a supervisor's state machine (and its pool) with the bus as effects,
/// then lets the pool dispatch, re-arms the supervisor's timer, hands events and task
/// outcomes to the listeners and checks the wait in progress. `None` when there is no
/// such supervisor here.
fn operate<R>(
    bus: &mut Bus,
    id: SupervisorId,
    op: impl FnOnce(&mut Core, Option<&mut PoolState<JobFn>>, &mut Shell<'_>) -> R,
) -> Option<R> {
    let mut entry = registry(bus).supervisors.get_mut(id.0 as usize)?.take()?;
    let job = entry.pool.as_ref().map(PoolState::job);
    let draining = bus.is_stopping() && !entry.core.is_shutting_down();
    let (result, events, mut outcomes) = {
        let mut shell = Shell {
            bus,
            starts: &entry.starts,
            job,
            events: Vec::new(),
            outcomes: Vec::new(),
        };
        if draining {
            // The bus began to drain and the listener has not heard yet: start nothing.
            entry.core.shutdown(&mut shell);
        }
        let r = op(&mut entry.core, entry.pool.as_mut(), &mut shell);
        (r, shell.events, shell.outcomes)
    };
    if let Some(pool) = &mut entry.pool {
        for e in &events {
            if let SupervisionEvent::Exited { pid, .. } = e {
                outcomes.extend(pool.on_worker_gone(*pid));
            }
        }
        let now = crate::clock::monotonic_now();
        outcomes.extend(pool.handle_timeout(now));
        let workers: Vec<Pid> = entry.core.running().into_iter().map(|(_, p)| p).collect();
        pool.dispatch(&workers, &mut |pid, task, payload| {
            let frame = Frame::Job {
                id: task,
                payload: payload.to_vec(),
            };
            send_to(bus, Relation::Child(pid), &frame)
        });
        for o in &outcomes {
            pool.keep(o);
        }
    }
    custody::after_events(bus, &mut entry, &events);
    rearm(bus, id, &mut entry);
    registry(bus).supervisors[id.0 as usize] = Some(entry);
    for event in events {
        bus.defer(move |bus| bus.emit(Event::Service(ServiceEvent::Supervision(event))));
    }
    for outcome in outcomes {
        bus.defer(move |bus| bus.emit(Event::Service(ServiceEvent::Task(outcome))));
    }
    check_wait(bus);
    Some(result)
}

/// Arms the supervisor's one timer at its next deadline (or removes it).
fn rearm(bus: &mut Bus, id: SupervisorId, entry: &mut Entry) {
    let mut next = entry.core.poll_timeout();
    if let Some(t) = entry.pool.as_ref().and_then(PoolState::poll_timeout) {
        next = Some(next.map_or(t, |n| n.min(t)));
    }
    if entry.timer.map(|(_, at)| at) == next {
        return;
    }
    if let Some((timer, _)) = entry.timer.take() {
        bus.cancel_timer(timer);
    }
    if let Some(at) = next {
        let timer = bus.add_timer_at(at, move |bus| on_timer(bus, id));
        entry.timer = Some((timer, at));
    }
}

fn on_timer(bus: &mut Bus, id: SupervisorId) {
    if let Some(Some(e)) = registry(bus).supervisors.get_mut(id.0 as usize) {
        e.timer = None;
    }
    operate(bus, id, |core, _, fx| {
        let now = crate::clock::monotonic_now();
        core.handle_timeout(now, fx);
    });
}

/// Stops the loop when the condition of the blocking wait in progress holds.
fn check_wait(bus: &mut Bus) {
    let reg = registry(bus);
    let met = reg.wait.as_ref().is_some_and(|w| !w.met && (w.cond)(reg));
    if met {
        if let Some(w) = &mut registry(bus).wait {
            w.met = true;
        }
        bus.stop();
    }
}

/// Runs the loop until `cond` holds or `timeout` passes.
pub(crate) fn run_until(bus: &mut Bus, timeout: Duration, cond: WaitCond) -> Result<(), WaitError> {
    if cond(registry(bus)) {
        return Ok(());
    }
    if bus.in_loop() || registry(bus).wait.is_some() {
        return Err(WaitError::InsideLoop);
    }
    registry(bus).wait = Some(ActiveWait {
        cond,
        met: false,
        expired: false,
    });
    let timer = bus.add_timer(timeout, |bus| {
        if let Some(w) = &mut registry(bus).wait {
            w.expired = true;
        }
        bus.stop();
    });
    let ran = bus.run();
    bus.cancel_timer(timer);
    let wait = registry(bus).wait.take();
    let stop = ran.map_err(WaitError::Io)?;
    match wait {
        Some(w) if w.met || (w.cond)(registry(bus)) => Ok(()),
        Some(w) if w.expired => Err(WaitError::Timeout),
        _ => Err(WaitError::Interrupted(stop)),
    }
}

/// Supervision as a service of the bus: child exits, `SIGHUP` and the bus's shutdown go to
/// every supervisor of this process, supervision frames to the supervisors and the agent,
/// and a supervised worker's agent counts the messages its listeners handled.
pub(crate) struct SupervisionService;

impl Service for SupervisionService {
    fn on_event(&self, bus: &mut Bus, event: &Event) {
        match event {
            Event::ChildExit { pid, status } => {
                for id in supervisor_ids(bus) {
                    operate(bus, id, |core, _, fx| {
                        let now = crate::clock::monotonic_now();
                        core.handle_exit(now, *pid, *status, fx)
                    });
                }
            }
            Event::Signal(signal) if *signal == Signal::SIGHUP as i32 => {
                for id in supervisor_ids(bus) {
                    if !entry(bus, id).is_some_and(|e| e.config.reload_on_sighup) {
                        continue;
                    }
                    match (Supervisor { id }).reload(bus) {
                        Ok(n) => tracing::info!(children = n, "SIGHUP: rolling reload"),
                        Err(e) => tracing::info!(error = %e, "SIGHUP: reload refused"),
                    }
                }
            }
            Event::Shutdown => {
                agent::on_shutdown();
                for id in supervisor_ids(bus) {
                    operate(bus, id, |core, _, fx| core.shutdown(fx));
                    // Nothing restarts now: names held for down children are given up
                    // (what they held is reported lost to its origins).
                    let held = match registry(bus).supervisors.get_mut(id.0 as usize) {
                        Some(Some(e)) => std::mem::take(&mut e.held),
                        _ => BTreeMap::new(),
                    };
                    for name in held.into_values() {
                        bus.release_held_name(&name);
                    }
                }
            }
            _ => {}
        }
    }

    fn after_event(&self, bus: &mut Bus, event: &Event) {
        // A message counts once every listener has handled it.
        if let Event::Message(_) = event {
            agent::handled_one(bus);
        }
    }

    fn on_control(&self, bus: &mut Bus, from: LinkInfo, control: &Control) -> bool {
        match control {
            Control::Supervision(frame) => on_control(bus, from.relation, from.forked, frame),
            _ => false,
        }
    }
}

/// The supervisors of this process.
fn supervisor_ids(bus: &Bus) -> Vec<SupervisorId> {
    bus.service_state_ref::<Registry>()
        .map(|r| {
            (0..r.supervisors.len())
                .map(|i| SupervisorId(u32::try_from(i).unwrap_or(u32::MAX)))
                .collect()
        })
        .unwrap_or_default()
}

/// A supervision control frame from a neighbour (`forked`: a child this process forked,
/// not a program started with `Bus::exec_node`). `false`: from a neighbour that may not
/// send it ([`Frame::accepted_from`]); the bus reports it as a bad control frame and nothing
/// else happens.
fn on_control(bus: &mut Bus, from: Relation, forked: bool, frame: &Frame) -> bool {
    let sender = match from {
        Relation::Parent => Sender::Parent {
            supervised: registry(bus).agent.is_some(),
        },
        Relation::Child(pid) => Sender::Child {
            forked,
            supervised: owner_of(bus, pid).is_some(),
        },
        Relation::Attached => Sender::Attached,
    };
    if !frame.accepted_from(sender) {
        return false;
    }
    let frame = frame.clone();
    let handled = match from {
        Relation::Parent => agent::on_frame(bus, frame),
        Relation::Child(pid) => on_child_frame(bus, pid, frame),
        Relation::Attached => false,
    };
    check_wait(bus);
    handled
}

/// A well-formed supervision frame of a kind named in a test (`Bus::send_forged_control`).
pub(crate) fn forged_frame(kind: &str) -> Option<(u32, Vec<u8>)> {
    let frame = match kind {
        "ping" => Frame::Ping(1),
        "pong" => Frame::Pong(1),
        "ready" => Frame::Ready,
        "stop" => Frame::Stop {
            why: StopReason::Requested.code(),
            deadline: Duration::from_secs(1),
            quiet: Duration::from_millis(1),
        },
        "recycle" => Frame::Recycle(1),
        "gave-up" => Frame::GaveUp {
            restarts: 3,
            name: Some("forged".to_owned()),
        },
        "job" => Frame::Job {
            id: 1,
            payload: Vec::new(),
        },
        "result" => Frame::Result {
            id: 1,
            outcome: Ok(Vec::new()),
        },
        _ => return None,
    };
    Some(frame.encode())
}

/// The supervisor of this process that owns a process (until it is reaped).
fn owner_of(bus: &Bus, pid: Pid) -> Option<SupervisorId> {
    let index = bus
        .service_state_ref::<Registry>()?
        .supervisors
        .iter()
        .position(|e| e.as_ref().is_some_and(|e| e.core.owns(pid)))?;
    Some(SupervisorId(index as u32))
}

fn on_child_frame(bus: &mut Bus, pid: Pid, frame: Frame) -> bool {
    if let Frame::GaveUp { restarts, name } = frame {
        let event = SupervisionEvent::ChildGaveUp {
            from: pid,
            name,
            restarts,
        };
        bus.defer(move |bus| bus.emit(Event::Service(ServiceEvent::Supervision(event))));
        return true;
    }
    let Some(id) = owner_of(bus, pid) else {
        return false;
    };
    let now = crate::clock::monotonic_now();
    match frame {
        Frame::Ready => {
            operate(bus, id, |core, _, fx| core.handle_ready(now, pid, fx));
        }
        Frame::Pong(_) => {
            operate(bus, id, |core, _, _| core.handle_pong(pid));
        }
        Frame::Recycle(handled) => {
            operate(bus, id, |core, _, fx| {
                core.handle_recycle(now, pid, handled, fx)
            });
        }
        Frame::Result { id: task, outcome } => {
            operate(bus, id, |_, pool, fx| {
                if let Some(o) = pool.and_then(|p| p.on_result(pid, task, outcome)) {
                    fx.outcomes.push(o);
                }
            });
        }
        _ => return false,
    }
    true
}

/// The job handler and the pool state of a supervisor that runs a task pool.
pub(crate) fn attach_pool(bus: &mut Bus, id: SupervisorId, pool: PoolState<JobFn>) {
    if let Some(Some(e)) = registry(bus).supervisors.get_mut(id.0 as usize) {
        e.pool = Some(pool);
    }
}

/// Runs `op` on a supervisor's pool (then dispatches and reports like any operation).
pub(crate) fn with_pool<R>(
    bus: &mut Bus,
    id: SupervisorId,
    op: impl FnOnce(&mut PoolState<JobFn>, &mut Vec<TaskOutcome>) -> R,
) -> Option<R> {
    operate(bus, id, |_, pool, fx| pool.map(|p| op(p, &mut fx.outcomes)))?
}

/// Reads a supervisor's pool.
pub(crate) fn pool_ref(bus: &Bus, id: SupervisorId) -> Option<&PoolState<JobFn>> {
    entry(bus, id)?.pool.as_ref()
}

/// A blocking wait on a pool's condition.
pub(crate) fn wait_pool(
    bus: &mut Bus,
    id: SupervisorId,
    timeout: Duration,
    cond: impl Fn(&PoolState<JobFn>) -> bool + 'static,
) -> Result<(), WaitError> {
    let done = move |reg: &Registry| {
        reg_entry(reg, id)
            .and_then(|e| e.pool.as_ref())
            .is_none_or(&cond)
    };
    run_until(bus, timeout, Box::new(done))
}
