//! The worker's side of supervision: the agent a supervised process carries. It answers
//! pings from its loop, says when it is ready, counts handled messages and asks to be
//! recycled at its limit, runs task-pool jobs, and turns a stop request into
//! [`ServiceEvent::Stopping`] followed by a graceful drain.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use forkbus_router::Timestamp;

use super::registry;
use super::types::{StopReason, StopRequest};
use crate::bus::Bus;
use crate::event::{Event, ServiceEvent};
use crate::listener_set::panic_message;
use forkbus_node::Relation;
use forkbus_node::SupervisionFrame as Frame;

/// Set when this process was asked to stop (by its supervisor, or by a tree shutdown).
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether this process was asked to stop: by its supervisor (recycling, reload,
/// [`Supervisor::stop_child`](super::Supervisor::stop_child)) or by a graceful shutdown of
/// the tree. A worker doing long work checks it between steps; any thread may call it.
pub fn should_stop() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// A task-pool job handler, on bytes.
pub(crate) type JobFn = Rc<dyn Fn(&mut Bus, &[u8]) -> Result<Vec<u8>, String>>;

/// The agent's state in a supervised process.
pub(crate) struct Agent {
    limit: Option<u64>,
    handled: u64,
    recycle_asked: bool,
    ready_sent: bool,
    stopping: Option<Duration>,
    held: bool,
    last_message: Timestamp,
    job: Option<JobFn>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("limit", &self.limit)
            .field("handled", &self.handled)
            .field("ready_sent", &self.ready_sent)
            .field("stopping", &self.stopping)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// The bus began to drain: this process was asked to stop.
pub(super) fn on_shutdown() {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Makes this (freshly forked) process a supervised worker.
pub(crate) fn install(bus: &mut Bus, limit: Option<u64>, job: Option<JobFn>) {
    // A flag inherited from a parent that was itself asked to stop is not ours.
    STOP_REQUESTED.store(false, Ordering::SeqCst);
    let now = bus.now();
    registry(bus).agent = Some(Agent {
        limit,
        handled: 0,
        recycle_asked: false,
        ready_sent: false,
        stopping: None,
        held: false,
        last_message: now,
        job,
    });
}

/// Tells the supervisor that this worker is up, if not told already. Done automatically
/// when a supervised worker's closure returns; a worker may call it earlier. Does nothing
/// in a process that is not a supervised worker.
pub fn ready(bus: &mut Bus) {
    let Some(agent) = &mut registry(bus).agent else {
        return;
    };
    if agent.ready_sent {
        return;
    }
    agent.ready_sent = true;
    send(bus, &Frame::Ready);
}

/// Keeps a stopping worker from draining: it goes on serving until [`release_stop`] (or
/// until the supervisor's deadline kills it). For workers that finish work elsewhere (a
/// compute thread, say) after they were asked to stop.
pub fn hold_stop(bus: &mut Bus) {
    if let Some(agent) = &mut registry(bus).agent {
        agent.held = true;
    }
}

/// Lets a stopping worker drain and exit (after [`hold_stop`]).
pub fn release_stop(bus: &mut Bus) {
    if let Some(agent) = &mut registry(bus).agent {
        agent.held = false;
    }
}

fn send(bus: &mut Bus, frame: &Frame) {
    let (code, data) = frame.encode();
    if !bus.send_link_control(Relation::Parent, code, data) {
        tracing::debug!(?code, "no parent link for a supervision frame");
    }
}

/// A message or job was handled: count it, and ask for recycling at the limit.
pub(super) fn handled_one(bus: &mut Bus) {
    let now = bus.now();
    let Some(agent) = &mut registry(bus).agent else {
        return;
    };
    agent.handled += 1;
    agent.last_message = now;
    if agent.limit.is_some_and(|l| agent.handled >= l) && !agent.recycle_asked {
        agent.recycle_asked = true;
        let n = agent.handled;
        send(bus, &Frame::Recycle(n));
    }
}

/// A frame from the parent; `false` when this process is not a supervised worker (or for
/// a frame a parent does not send).
pub(crate) fn on_frame(bus: &mut Bus, frame: Frame) -> bool {
    if registry(bus).agent.is_none() {
        return false;
    }
    match frame {
        // The loop is running: that is the answer.
        Frame::Ping(seq) => send(bus, &Frame::Pong(seq)),
        Frame::Stop {
            why,
            deadline,
            quiet,
        } => stop_requested(bus, StopReason::from_code(why), deadline, quiet),
        Frame::Job { id, payload } => run_job(bus, id, &payload),
        _ => return false,
    }
    true
}

fn stop_requested(bus: &mut Bus, reason: StopReason, deadline: Duration, quiet: Duration) {
    let Some(agent) = &mut registry(bus).agent else {
        return;
    };
    if agent.stopping.is_some() {
        return;
    }
    agent.stopping = Some(quiet);
    STOP_REQUESTED.store(true, Ordering::SeqCst);
    let request = StopRequest { reason, deadline };
    bus.defer(move |bus| bus.emit(Event::Service(ServiceEvent::Stopping(request))));
    schedule_drain_check(bus, quiet);
}

/// Drains once the worker was quiet for `quiet` and nothing holds it.
fn schedule_drain_check(bus: &mut Bus, quiet: Duration) {
    let step = quiet.clamp(Duration::from_millis(1), Duration::from_millis(10));
    bus.add_timer(step, move |bus| {
        if bus.is_stopping() {
            return;
        }
        let now = bus.now();
        let ready = registry(bus)
            .agent
            .as_ref()
            .is_some_and(|a| !a.held && now.saturating_duration_since(a.last_message) >= quiet);
        if ready {
            tracing::debug!("stop requested: draining");
            bus.shutdown_tree();
        } else {
            schedule_drain_check(bus, quiet);
        }
    });
}

fn run_job(bus: &mut Bus, id: u64, payload: &[u8]) {
    let job = registry(bus).agent.as_ref().and_then(|a| a.job.clone());
    let outcome = match job {
        Some(f) => match catch_unwind(AssertUnwindSafe(|| f(bus, payload))) {
            Ok(r) => r,
            Err(panic) => Err(format!("the job panicked: {}", panic_message(&*panic))),
        },
        None => Err("this worker runs no jobs".to_owned()),
    };
    send(bus, &Frame::Result { id, outcome });
    handled_one(bus);
}
