//! The supervisor's decisions as a pure state machine: no fork, no clock, no bus.
//!
//! Inputs are `handle_*` calls with `now`; effects (fork, kill, ping, stop, events) go out
//! through an [`Effects`] the caller provides, so the whole logic runs in unit tests with a
//! fake. The shell (`super`) feeds it child exits, control frames and its timer.
//!
//! One child (a *slot*) is incarnated by one process after another:
//!
//! ```text
//!   slot:     Up { current, next } ──exit──► Backoff { at } ──timer──► Up ...
//!                    │                 └───► Done(finish)   (policy, intensity, stop, shutdown)
//!   process:  Starting ──READY──► Running ──stop asked──► Stopping ──reaped──► (gone)
//!                 │                  │                       │
//!                 └──start timeout───┴──heartbeat timeout────┴──deadline──► Killed ──reaped──►
//! ```
//!
//! `next` is a replacement being started while `current` still serves (recycling, reload);
//! once it is ready, `current` moves to `retiring` (asked to stop) and the replacement
//! becomes `current`. A process's state carries only what is true in it: a `Starting`
//! process has no heartbeat, a `Killed` one no deadline.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::Duration;

use forkbus_router::Timestamp;

use super::policy::{pick_limit, RestartWindow, Rng};
use super::types::{
    AfterExit, ChildId, ChildOutcome, ChildRef, ChildSpec, Finish, KillReason, Restart,
    StartReason, StopReason, StopRequest, SupervisionEvent, SupervisorId,
};
use forkbus_node::{ExitStatus, Pid};

/// A process to fork for a child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ForkOrder {
    pub(crate) child: ChildId,
    pub(crate) name: Option<String>,
    pub(crate) die_with_parent: bool,
    pub(crate) keep_fds: Vec<RawFd>,
    pub(crate) generation: u32,
    pub(crate) reason: StartReason,
    pub(crate) limit: Option<u64>,
}

/// What the state machine does to the world.
pub(crate) trait Effects {
    /// Forks a process for a child.
    fn fork(&mut self, order: &ForkOrder) -> Result<Pid, String>;
    /// Sends `SIGKILL` to a process not yet reaped.
    fn kill(&mut self, pid: Pid);
    /// Pings a process's loop.
    fn ping(&mut self, pid: Pid, seq: u64);
    /// Asks a process to stop.
    fn stop(&mut self, pid: Pid, request: StopRequest, quiet: Duration);
    /// Tells this process's parent that a child was given up on.
    fn give_up(&mut self, name: Option<&str>, restarts: u32);
    /// Reports an event.
    fn event(&mut self, event: SupervisionEvent);
}

/// Why a reload could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReloadRefusal {
    InProgress,
    ShuttingDown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Beat {
    next_ping: Timestamp,
    /// When the oldest ping still unanswered was sent.
    unanswered_since: Option<Timestamp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Starting {
        deadline: Option<Timestamp>,
    },
    Running {
        since: Timestamp,
        beat: Option<Beat>,
    },
    Stopping {
        deadline: Timestamp,
    },
    Killed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Proc {
    pid: Pid,
    limit: Option<u64>,
    phase: Phase,
    /// Set once it was asked to stop: why (its exit is then planned).
    retire: Option<StopReason>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Next {
    /// A replacement process is starting.
    Starting { proc: Proc, reason: StopReason },
    /// Starting a replacement failed: try again at `at`.
    Retry { at: Timestamp, reason: StopReason },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SlotState {
    Up { current: Proc, next: Option<Next> },
    Backoff { at: Timestamp },
    Done(Finish),
}

#[derive(Clone, Debug)]
struct Slot {
    spec: ChildSpec,
    generations: u32,
    state: SlotState,
    /// Older processes asked to stop (or killed), until reaped.
    retiring: Vec<Proc>,
    /// Unplanned exits in a row (the backoff exponent).
    in_a_row: u32,
    window: RestartWindow,
    last: Option<ExitStatus>,
}

#[derive(Clone, Debug)]
struct Reload {
    queue: VecDeque<ChildId>,
    /// The child being replaced and its old process.
    step: Option<(ChildId, Pid)>,
    replaced: usize,
    failed: usize,
}

/// Where a pid sits in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Current,
    Next,
    Retiring(usize),
}

/// The decisions of one supervisor over its children.
#[derive(Clone, Debug)]
pub(crate) struct Core {
    id: SupervisorId,
    slots: Vec<Slot>,
    reload: Option<Reload>,
    shutting_down: bool,
    ping_seq: u64,
    rng: Rng,
}

impl Core {
    pub(crate) fn new(id: SupervisorId, seed: u64) -> Self {
        Self {
            id,
            slots: Vec::new(),
            reload: None,
            shutting_down: false,
            ping_seq: 0,
            rng: Rng::new(seed),
        }
    }

    // -----------------------------------------------------------------------------------
    // Getters

    /// Whether a pid is a process of this supervisor not yet reaped.
    pub(crate) fn owns(&self, pid: Pid) -> bool {
        self.find(pid).is_some()
    }

    /// The child a live process belongs to.
    pub(crate) fn child_of(&self, pid: Pid) -> Option<ChildId> {
        self.find(pid).map(|(c, _)| c)
    }

    /// The number of children.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The spec of a child.
    pub(crate) fn spec(&self, child: ChildId) -> Option<&ChildSpec> {
        self.slot(child).map(|s| &s.spec)
    }

    /// The current process of a child (starting, running).
    pub(crate) fn current(&self, child: ChildId) -> Option<Pid> {
        match &self.slot(child)?.state {
            SlotState::Up { current, .. } => Some(current.pid),
            _ => None,
        }
    }

    /// Every process not yet reaped.
    pub(crate) fn pids(&self) -> Vec<Pid> {
        let mut v = Vec::new();
        for s in &self.slots {
            if let SlotState::Up { current, next } = &s.state {
                v.push(current.pid);
                if let Some(Next::Starting { proc, .. }) = next {
                    v.push(proc.pid);
                }
            }
            v.extend(s.retiring.iter().map(|p| p.pid));
        }
        v
    }

    /// Children whose current process is running (ready and not asked to stop).
    pub(crate) fn running(&self) -> Vec<(ChildId, Pid)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match &s.state {
                SlotState::Up { current, .. } if matches!(current.phase, Phase::Running { .. }) => {
                    Some((ChildId(i as u32), current.pid))
                }
                _ => None,
            })
            .collect()
    }

    /// Whether a child is finished: no process will start again and none is left.
    pub(crate) fn is_finished(&self, child: ChildId) -> bool {
        self.slot(child)
            .is_some_and(|s| matches!(s.state, SlotState::Done(_)) && s.retiring.is_empty())
    }

    /// Whether no process of a child will start again (some may still be retiring).
    pub(crate) fn is_done(&self, child: ChildId) -> bool {
        self.slot(child)
            .is_some_and(|s| matches!(s.state, SlotState::Done(_)))
    }

    /// Whether every child is finished.
    pub(crate) fn all_finished(&self) -> bool {
        (0..self.slots.len()).all(|i| self.is_finished(ChildId(i as u32)))
    }

    /// How a finished child ended.
    pub(crate) fn outcome(&self, child: ChildId) -> Option<ChildOutcome> {
        let s = self.slot(child)?;
        match s.state {
            SlotState::Done(finish) if s.retiring.is_empty() => Some(ChildOutcome {
                child,
                name: s.spec.name.clone(),
                finish,
                last: s.last,
                generations: s.generations,
            }),
            _ => None,
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    pub(crate) fn is_reloading(&self) -> bool {
        self.reload.is_some()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next.
    pub(crate) fn poll_timeout(&self) -> Option<Timestamp> {
        let mut next: Option<Timestamp> = None;
        let mut consider = |t: Timestamp| next = Some(next.map_or(t, |n| n.min(t)));
        for s in &self.slots {
            match &s.state {
                SlotState::Backoff { at } => consider(*at),
                SlotState::Up { current, next: n } => {
                    if let Some(t) = self.proc_deadline(s, current) {
                        consider(t);
                    }
                    match n {
                        Some(Next::Starting { proc, .. }) => {
                            if let Some(t) = self.proc_deadline(s, proc) {
                                consider(t);
                            }
                        }
                        Some(Next::Retry { at, .. }) => consider(*at),
                        None => {}
                    }
                }
                SlotState::Done(_) => {}
            }
            for p in &s.retiring {
                if let Phase::Stopping { deadline } = p.phase {
                    consider(deadline);
                }
            }
        }
        next
    }

    fn proc_deadline(&self, s: &Slot, p: &Proc) -> Option<Timestamp> {
        match p.phase {
            Phase::Starting { deadline } if !self.shutting_down => deadline,
            Phase::Running { beat: Some(b), .. } if !self.shutting_down => {
                let timeout = s.spec.heartbeat.map(|h| h.timeout)?;
                Some(match b.unanswered_since {
                    Some(since) => b.next_ping.min(since + timeout),
                    None => b.next_ping,
                })
            }
            Phase::Stopping { deadline } => Some(deadline),
            _ => None,
        }
    }

    fn slot(&self, child: ChildId) -> Option<&Slot> {
        self.slots.get(child.0 as usize)
    }

    fn find(&self, pid: Pid) -> Option<(ChildId, Place)> {
        for (i, s) in self.slots.iter().enumerate() {
            let id = ChildId(i as u32);
            if let SlotState::Up { current, next } = &s.state {
                if current.pid == pid {
                    return Some((id, Place::Current));
                }
                if matches!(next, Some(Next::Starting { proc, .. }) if proc.pid == pid) {
                    return Some((id, Place::Next));
                }
            }
            if let Some(at) = s.retiring.iter().position(|p| p.pid == pid) {
                return Some((id, Place::Retiring(at)));
            }
        }
        None
    }

    fn at(&self, child: ChildId) -> ChildRef {
        ChildRef {
            supervisor: self.id,
            child,
        }
    }

    // -----------------------------------------------------------------------------------
    // Inputs

    /// Adds a child and starts its first process.
    pub(crate) fn add(
        &mut self,
        now: Timestamp,
        spec: ChildSpec,
        fx: &mut impl Effects,
    ) -> ChildId {
        let id = ChildId(self.slots.len() as u32);
        let done = self.shutting_down;
        self.slots.push(Slot {
            spec,
            generations: 0,
            state: if done {
                SlotState::Done(Finish::Shutdown)
            } else {
                SlotState::Backoff { at: now }
            },
            retiring: Vec::new(),
            in_a_row: 0,
            window: RestartWindow::default(),
            last: None,
        });
        if !done {
            self.start_current(id, now, StartReason::First, fx);
        }
        id
    }

    /// A process was reaped. `false` when it is not one of this supervisor's.
    pub(crate) fn handle_exit(
        &mut self,
        now: Timestamp,
        pid: Pid,
        status: ExitStatus,
        fx: &mut impl Effects,
    ) -> bool {
        let Some((child, place)) = self.find(pid) else {
            return false;
        };
        let at = self.at(child);
        let i = child.0 as usize;
        self.slots[i].last = Some(status);
        match place {
            Place::Retiring(k) => {
                let p = self.slots[i].retiring.remove(k);
                let next = match p.retire {
                    Some(StopReason::Requested) => AfterExit::Finished(Finish::Stopped),
                    Some(StopReason::GaveUp) => AfterExit::Finished(Finish::GaveUp),
                    _ => AfterExit::Retired,
                };
                fx.event(SupervisionEvent::Exited {
                    child: at,
                    pid,
                    status,
                    next,
                });
            }
            Place::Next => {
                // `find` placed the pid in `next`: it is a starting replacement.
                let reason = match &mut self.slots[i].state {
                    SlotState::Up { next, .. } => match next.take() {
                        Some(Next::Starting { reason, .. }) => reason,
                        other => {
                            *next = other;
                            StopReason::Recycle
                        }
                    },
                    _ => StopReason::Recycle,
                };
                fx.event(SupervisionEvent::Exited {
                    child: at,
                    pid,
                    status,
                    next: AfterExit::Retired,
                });
                self.replacement_failed(child, now, reason, fx);
            }
            Place::Current => {
                // Taken out whole; every branch below sets the slot's new state.
                let SlotState::Up { current, next } =
                    std::mem::replace(&mut self.slots[i].state, SlotState::Done(Finish::Shutdown))
                else {
                    return true;
                };
                match next {
                    Some(Next::Starting { proc, .. }) => {
                        // The replacement already starting takes over.
                        self.slots[i].state = SlotState::Up {
                            current: proc,
                            next: None,
                        };
                        fx.event(SupervisionEvent::Exited {
                            child: at,
                            pid,
                            status,
                            next: AfterExit::Replaced,
                        });
                    }
                    _ => {
                        let ran_since = match current.phase {
                            Phase::Running { since, .. } => Some(since),
                            _ => None,
                        };
                        let next = self.unplanned_end(child, now, Some(status), ran_since);
                        fx.event(SupervisionEvent::Exited {
                            child: at,
                            pid,
                            status,
                            next,
                        });
                        self.after_end(child, next, fx);
                    }
                }
            }
        }
        self.reload_saw_exit(child, pid, now, fx);
        true
    }

    /// A process said it is up.
    pub(crate) fn handle_ready(&mut self, now: Timestamp, pid: Pid, fx: &mut impl Effects) {
        let Some((child, place)) = self.find(pid) else {
            return;
        };
        let i = child.0 as usize;
        let at = self.at(child);
        let beat = self.slots[i].spec.heartbeat.map(|h| Beat {
            next_ping: now + h.interval,
            unanswered_since: None,
        });
        let running = Phase::Running { since: now, beat };
        match place {
            Place::Current => {
                if let SlotState::Up { current, .. } = &mut self.slots[i].state {
                    if matches!(current.phase, Phase::Starting { .. }) {
                        current.phase = running;
                        fx.event(SupervisionEvent::Ready { child: at, pid });
                    }
                }
            }
            Place::Next => {
                let SlotState::Up { current, next } = &mut self.slots[i].state else {
                    return;
                };
                let Some(Next::Starting { mut proc, reason }) = next.take() else {
                    return;
                };
                proc.phase = running;
                let old = std::mem::replace(current, proc);
                fx.event(SupervisionEvent::Ready { child: at, pid });
                fx.event(SupervisionEvent::Replaced {
                    child: at,
                    old: old.pid,
                    new: pid,
                    reason,
                });
                self.retire(child, old, reason, now, fx);
            }
            Place::Retiring(_) => {}
        }
    }

    /// A process answered a ping.
    pub(crate) fn handle_pong(&mut self, pid: Pid) {
        for s in &mut self.slots {
            if let SlotState::Up { current, .. } = &mut s.state {
                if current.pid == pid {
                    if let Phase::Running { beat: Some(b), .. } = &mut current.phase {
                        b.unanswered_since = None;
                    }
                    return;
                }
            }
        }
    }

    /// A worker reached its request limit.
    pub(crate) fn handle_recycle(
        &mut self,
        now: Timestamp,
        pid: Pid,
        handled: u64,
        fx: &mut impl Effects,
    ) {
        if self.shutting_down {
            return;
        }
        let Some((child, Place::Current)) = self.find(pid) else {
            return;
        };
        let i = child.0 as usize;
        let eligible = matches!(
            &self.slots[i].state,
            SlotState::Up { current, next: None } if matches!(current.phase, Phase::Running { .. })
        );
        if eligible {
            fx.event(SupervisionEvent::Recycling {
                child: self.at(child),
                pid,
                handled,
            });
            self.start_replacement(child, now, StopReason::Recycle, fx);
        }
    }

    /// Time passed: restarts due, pings, and processes past their deadlines.
    pub(crate) fn handle_timeout(&mut self, now: Timestamp, fx: &mut impl Effects) {
        for i in 0..self.slots.len() {
            let child = ChildId(i as u32);
            match self.slots[i].state.clone() {
                SlotState::Backoff { at } if at <= now => {
                    if self.shutting_down {
                        self.slots[i].state = SlotState::Done(Finish::Shutdown);
                    } else {
                        self.start_current(child, now, StartReason::Restart, fx);
                    }
                }
                SlotState::Up { next, .. } => {
                    self.check_proc(child, Place::Current, now, fx);
                    match next {
                        Some(Next::Starting { .. }) => self.check_proc(child, Place::Next, now, fx),
                        Some(Next::Retry { at, reason }) if at <= now => {
                            if let SlotState::Up { next, .. } = &mut self.slots[i].state {
                                *next = None;
                            }
                            self.start_replacement(child, now, reason, fx);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            for k in 0..self.slots[i].retiring.len() {
                self.check_proc(child, Place::Retiring(k), now, fx);
            }
        }
    }

    /// Asks a child's processes to stop, for good. `false` when it is finished already.
    pub(crate) fn stop_child(
        &mut self,
        now: Timestamp,
        child: ChildId,
        fx: &mut impl Effects,
    ) -> bool {
        let i = child.0 as usize;
        let Some(s) = self.slots.get_mut(i) else {
            return false;
        };
        match std::mem::replace(&mut s.state, SlotState::Done(Finish::Stopped)) {
            SlotState::Up { current, next } => {
                self.retire(child, current, StopReason::Requested, now, fx);
                if let Some(Next::Starting { proc, .. }) = next {
                    self.retire(child, proc, StopReason::Requested, now, fx);
                }
                true
            }
            SlotState::Backoff { .. } => true,
            done @ SlotState::Done(_) => {
                s.state = done;
                false
            }
        }
    }

    /// Begins a rolling reload: each running child, one at a time, gets a replacement; once
    /// it is ready the old process is asked to stop, and once that one is reaped the next
    /// child follows. Returns the number of children to replace.
    pub(crate) fn reload(
        &mut self,
        now: Timestamp,
        fx: &mut impl Effects,
    ) -> Result<usize, ReloadRefusal> {
        if self.reload.is_some() {
            fx.event(SupervisionEvent::ReloadRefused {
                supervisor: self.id,
            });
            return Err(ReloadRefusal::InProgress);
        }
        if self.shutting_down {
            return Err(ReloadRefusal::ShuttingDown);
        }
        let queue: VecDeque<ChildId> = self.running().into_iter().map(|(c, _)| c).collect();
        let n = queue.len();
        fx.event(SupervisionEvent::ReloadStarted {
            supervisor: self.id,
            children: n,
        });
        self.reload = Some(Reload {
            queue,
            step: None,
            replaced: 0,
            failed: 0,
        });
        self.advance_reload(now, fx);
        Ok(n)
    }

    /// The bus is shutting down: nothing starts again; children end as the bus drains them.
    pub(crate) fn shutdown(&mut self, fx: &mut impl Effects) {
        self.shutting_down = true;
        for s in &mut self.slots {
            match &mut s.state {
                SlotState::Backoff { .. } => s.state = SlotState::Done(Finish::Shutdown),
                SlotState::Up { next, .. } => {
                    if matches!(next, Some(Next::Retry { .. })) {
                        *next = None;
                    }
                }
                SlotState::Done(_) => {}
            }
        }
        if let Some(r) = self.reload.take() {
            fx.event(SupervisionEvent::ReloadFinished {
                supervisor: self.id,
                replaced: r.replaced,
                failed: r.failed + r.queue.len() + usize::from(r.step.is_some()),
            });
        }
    }

    // -----------------------------------------------------------------------------------
    // Transitions

    /// Forks the child's current process (its first, or a restart).
    fn start_current(
        &mut self,
        child: ChildId,
        now: Timestamp,
        reason: StartReason,
        fx: &mut impl Effects,
    ) {
        let i = child.0 as usize;
        let Some(order) = self.order(child, reason) else {
            return;
        };
        let at = self.at(child);
        match fx.fork(&order) {
            Ok(pid) => {
                let s = &mut self.slots[i];
                s.state = SlotState::Up {
                    current: Proc {
                        pid,
                        limit: order.limit,
                        phase: Phase::Starting {
                            deadline: s.spec.start_timeout.map(|t| now + t),
                        },
                        retire: None,
                    },
                    next: None,
                };
                fx.event(SupervisionEvent::Started {
                    child: at,
                    pid,
                    generation: order.generation,
                    reason,
                    limit: order.limit,
                });
            }
            Err(error) => {
                fx.event(SupervisionEvent::ForkFailed { child: at, error });
                let next = self.unplanned_end(child, now, None, None);
                self.after_end(child, next, fx);
            }
        }
    }

    /// Forks a replacement beside a running current process.
    fn start_replacement(
        &mut self,
        child: ChildId,
        now: Timestamp,
        reason: StopReason,
        fx: &mut impl Effects,
    ) {
        let i = child.0 as usize;
        let start = match reason {
            StopReason::Reload => StartReason::Reload,
            _ => StartReason::Recycle,
        };
        let Some(order) = self.order(child, start) else {
            return;
        };
        let at = self.at(child);
        match fx.fork(&order) {
            Ok(pid) => {
                let deadline = self.slots[i].spec.start_timeout.map(|t| now + t);
                if let SlotState::Up { next, .. } = &mut self.slots[i].state {
                    *next = Some(Next::Starting {
                        proc: Proc {
                            pid,
                            limit: order.limit,
                            phase: Phase::Starting { deadline },
                            retire: None,
                        },
                        reason,
                    });
                }
                fx.event(SupervisionEvent::Started {
                    child: at,
                    pid,
                    generation: order.generation,
                    reason: start,
                    limit: order.limit,
                });
            }
            Err(error) => {
                fx.event(SupervisionEvent::ForkFailed { child: at, error });
                self.replacement_failed(child, now, reason, fx);
            }
        }
    }

    /// The next process's number and request limit (distinct from the other live ones').
    fn order(&mut self, child: ChildId, reason: StartReason) -> Option<ForkOrder> {
        let i = child.0 as usize;
        let max = self.slots.get(i)?.spec.max_requests;
        let limit = max.map(|m| {
            let taken = self.live_limits();
            pick_limit(&mut self.rng, m, &taken)
        });
        let s = &mut self.slots[i];
        s.generations += 1;
        Some(ForkOrder {
            child,
            name: s.spec.name.clone(),
            die_with_parent: s.spec.die_with_parent,
            keep_fds: s.spec.keep_fds.clone(),
            generation: s.generations,
            reason,
            limit,
        })
    }

    /// The request limits of every process alive (retiring ones too: distinct limits then
    /// hold for any two processes that are alive at the same time).
    fn live_limits(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for s in &self.slots {
            if let SlotState::Up { current, next } = &s.state {
                v.extend(current.limit);
                if let Some(Next::Starting { proc, .. }) = next {
                    v.extend(proc.limit);
                }
            }
            v.extend(s.retiring.iter().filter_map(|p| p.limit));
        }
        v
    }

    /// A replacement could not be started or died before it was ready: the current
    /// process keeps serving. A recycle is tried again after a backoff (counted against
    /// the intensity); a reload moves on to the next child.
    fn replacement_failed(
        &mut self,
        child: ChildId,
        now: Timestamp,
        reason: StopReason,
        fx: &mut impl Effects,
    ) {
        let i = child.0 as usize;
        if reason == StopReason::Reload || self.shutting_down {
            if let Some(r) = &mut self.reload {
                if r.step.is_some_and(|(c, _)| c == child) {
                    r.step = None;
                    r.failed += 1;
                }
            }
            self.advance_reload(now, fx);
            return;
        }
        let s = &mut self.slots[i];
        if !matches!(s.state, SlotState::Up { .. }) {
            return;
        }
        if s.window.admit(&s.spec.intensity, now) {
            s.in_a_row += 1;
            let at = now + s.spec.backoff.delay(s.in_a_row);
            if let SlotState::Up { next, .. } = &mut s.state {
                *next = Some(Next::Retry { at, reason });
            }
        } else {
            let SlotState::Up { current, .. } =
                std::mem::replace(&mut s.state, SlotState::Done(Finish::GaveUp))
            else {
                return;
            };
            let restarts = s.window.len() as u32;
            self.retire(child, current, StopReason::GaveUp, now, fx);
            self.gave_up(child, restarts, fx);
        }
    }

    /// The current process ended unplanned (or could not be forked): restart after a
    /// backoff, or finish the child. Sets the slot's state.
    fn unplanned_end(
        &mut self,
        child: ChildId,
        now: Timestamp,
        status: Option<ExitStatus>,
        ran_since: Option<Timestamp>,
    ) -> AfterExit {
        let shutting_down = self.shutting_down;
        let s = &mut self.slots[child.0 as usize];
        let finish = |s: &mut Slot, f: Finish| {
            s.state = SlotState::Done(f);
            AfterExit::Finished(f)
        };
        if shutting_down {
            return finish(s, Finish::Shutdown);
        }
        let restart = match (s.spec.restart, status) {
            (Restart::Always, _) => true,
            (Restart::OnFailure, Some(st)) => !st.success(),
            (Restart::OnFailure, None) => true,
            (Restart::Never, _) => false,
        };
        if !restart {
            return match status {
                Some(st) => finish(s, Finish::Exited(st)),
                None => finish(s, Finish::GaveUp),
            };
        }
        if ran_since.is_some_and(|t| now.saturating_duration_since(t) >= s.spec.backoff.reset_after)
        {
            s.in_a_row = 0;
        }
        if !s.window.admit(&s.spec.intensity, now) {
            return finish(s, Finish::GaveUp);
        }
        s.in_a_row += 1;
        let after = s.spec.backoff.delay(s.in_a_row);
        s.state = SlotState::Backoff { at: now + after };
        AfterExit::Restart { after }
    }

    fn after_end(&mut self, child: ChildId, next: AfterExit, fx: &mut impl Effects) {
        if next == AfterExit::Finished(Finish::GaveUp) {
            let restarts = self.slots[child.0 as usize].window.len() as u32;
            self.gave_up(child, restarts, fx);
        }
    }

    fn gave_up(&mut self, child: ChildId, restarts: u32, fx: &mut impl Effects) {
        fx.event(SupervisionEvent::GaveUp {
            child: self.at(child),
            restarts,
        });
        let name = self.slots[child.0 as usize].spec.name.clone();
        fx.give_up(name.as_deref(), restarts);
    }

    /// Moves a process to `retiring`, asking it to stop (unless killed already).
    fn retire(
        &mut self,
        child: ChildId,
        mut p: Proc,
        reason: StopReason,
        now: Timestamp,
        fx: &mut impl Effects,
    ) {
        let i = child.0 as usize;
        let spec = &self.slots[i].spec;
        p.retire = Some(reason);
        if p.phase != Phase::Killed {
            p.phase = Phase::Stopping {
                deadline: now + spec.stop_timeout,
            };
            fx.stop(
                p.pid,
                StopRequest {
                    reason,
                    deadline: spec.stop_timeout,
                },
                spec.drain_quiet,
            );
            fx.event(SupervisionEvent::Stopping {
                child: self.at(child),
                pid: p.pid,
                reason,
            });
        }
        self.slots[i].retiring.push(p);
    }

    /// Checks one process's deadlines: start timeout, heartbeat, stop deadline.
    fn check_proc(&mut self, child: ChildId, place: Place, now: Timestamp, fx: &mut impl Effects) {
        let i = child.0 as usize;
        let shutting_down = self.shutting_down;
        let heartbeat = self.slots[i].spec.heartbeat;
        let at = self.at(child);
        let s = &mut self.slots[i];
        let p = match (place, &mut s.state) {
            (Place::Current, SlotState::Up { current, .. }) => current,
            (
                Place::Next,
                SlotState::Up {
                    next: Some(Next::Starting { proc, .. }),
                    ..
                },
            ) => proc,
            (Place::Retiring(k), _) => match s.retiring.get_mut(k) {
                Some(p) => p,
                None => return,
            },
            _ => return,
        };
        let kill = match &mut p.phase {
            Phase::Starting { deadline: Some(d) } if *d <= now && !shutting_down => {
                Some(KillReason::StartTimeout)
            }
            Phase::Running { beat: Some(b), .. } if !shutting_down => {
                let timeout = heartbeat.map_or(Duration::MAX, |h| h.timeout);
                let interval = heartbeat.map_or(Duration::MAX, |h| h.interval);
                if b.unanswered_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= timeout)
                {
                    Some(KillReason::HeartbeatTimeout)
                } else {
                    if b.next_ping <= now {
                        self.ping_seq += 1;
                        fx.ping(p.pid, self.ping_seq);
                        b.unanswered_since.get_or_insert(now);
                        b.next_ping = now + interval;
                    }
                    None
                }
            }
            Phase::Stopping { deadline } if *deadline <= now => Some(KillReason::StopTimeout),
            _ => None,
        };
        if let Some(reason) = kill {
            p.phase = Phase::Killed;
            let pid = p.pid;
            fx.kill(pid);
            fx.event(SupervisionEvent::Killed {
                child: at,
                pid,
                reason,
            });
        }
    }

    fn reload_saw_exit(&mut self, child: ChildId, pid: Pid, now: Timestamp, fx: &mut impl Effects) {
        let Some(r) = &mut self.reload else {
            return;
        };
        if r.step != Some((child, pid)) {
            return;
        }
        r.step = None;
        let replaced = matches!(
            &self.slots[child.0 as usize].state,
            SlotState::Up { current, .. } if current.pid != pid
        );
        if replaced {
            r.replaced += 1;
        } else {
            r.failed += 1;
        }
        self.advance_reload(now, fx);
    }

    fn advance_reload(&mut self, now: Timestamp, fx: &mut impl Effects) {
        loop {
            let Some(r) = &mut self.reload else {
                return;
            };
            if r.step.is_some() {
                return;
            }
            let Some(child) = r.queue.pop_front() else {
                let (replaced, failed) = (r.replaced, r.failed);
                self.reload = None;
                fx.event(SupervisionEvent::ReloadFinished {
                    supervisor: self.id,
                    replaced,
                    failed,
                });
                return;
            };
            let i = child.0 as usize;
            let (old, pending) = match &mut self.slots[i].state {
                SlotState::Up { current, next }
                    if matches!(current.phase, Phase::Running { .. }) =>
                {
                    let pending = match next {
                        Some(Next::Starting { .. }) => true,
                        Some(Next::Retry { .. }) => {
                            *next = None;
                            false
                        }
                        None => false,
                    };
                    (current.pid, pending)
                }
                _ => {
                    r.failed += 1;
                    continue;
                }
            };
            if let Some(r) = &mut self.reload {
                r.step = Some((child, old));
            }
            if !pending {
                // Its old process is retired once the replacement is ready; a replacement
                // already starting (a recycle) serves the reload as well.
                self.start_replacement(child, now, StopReason::Reload, fx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::policy::Backoff;

    /// Records effects; hands out pids from 100 up; fails forks on demand.
    #[derive(Default)]
    struct Fake {
        next_pid: u32,
        forks: Vec<ForkOrder>,
        fail_forks: bool,
        kills: Vec<Pid>,
        pings: Vec<(Pid, u64)>,
        stops: Vec<(Pid, StopReason)>,
        gave_up: Vec<(Option<String>, u32)>,
        events: Vec<SupervisionEvent>,
    }

    impl Effects for Fake {
        fn fork(&mut self, order: &ForkOrder) -> Result<Pid, String> {
            self.forks.push(order.clone());
            if self.fail_forks {
                return Err("EAGAIN".into());
            }
            self.next_pid += 1;
            Ok(Pid::from_raw(99 + self.next_pid))
        }
        fn kill(&mut self, pid: Pid) {
            self.kills.push(pid);
        }
        fn ping(&mut self, pid: Pid, seq: u64) {
            self.pings.push((pid, seq));
        }
        fn stop(&mut self, pid: Pid, request: StopRequest, _quiet: Duration) {
            self.stops.push((pid, request.reason));
        }
        fn give_up(&mut self, name: Option<&str>, restarts: u32) {
            self.gave_up.push((name.map(str::to_owned), restarts));
        }
        fn event(&mut self, event: SupervisionEvent) {
            self.events.push(event);
        }
    }

    impl Fake {
        fn last_pid(&self) -> Pid {
            Pid::from_raw(99 + self.next_pid)
        }

        fn exits(&self) -> Vec<AfterExit> {
            self.events
                .iter()
                .filter_map(|e| match e {
                    SupervisionEvent::Exited { next, .. } => Some(*next),
                    _ => None,
                })
                .collect()
        }
    }

    fn ms(n: u64) -> Timestamp {
        Timestamp::from_nanos(n * 1_000_000)
    }

    fn core() -> Core {
        Core::new(SupervisorId(0), 1)
    }

    fn fast(spec: ChildSpec) -> ChildSpec {
        spec.backoff(Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(80),
            factor: 2,
            reset_after: Duration::from_secs(1),
        })
    }

    const FAIL: ExitStatus = ExitStatus::Code(3);
    const OK: ExitStatus = ExitStatus::Code(0);

    /// Drives time forward in 1 ms steps to `until`, firing every deadline.
    fn run_to(c: &mut Core, fx: &mut Fake, from: u64, until: u64) {
        for t in from..=until {
            if c.poll_timeout().is_some_and(|d| d <= ms(t)) {
                c.handle_timeout(ms(t), fx);
            }
        }
    }

    #[test]
    fn a_child_that_always_crashes_backs_off_then_is_given_up() {
        let mut c = core();
        let mut fx = Fake::default();
        let spec = fast(ChildSpec::named("crash")).intensity(3, Duration::from_secs(10));
        let child = c.add(ms(0), spec, &mut fx);
        let mut t = 0;
        let mut delays = Vec::new();
        while !c.is_finished(child) {
            let pid = fx.last_pid();
            assert!(c.handle_exit(ms(t), pid, FAIL, &mut fx));
            if let Some(AfterExit::Restart { after }) = fx.exits().last() {
                delays.push(after.as_millis());
                // Not a millisecond early.
                let at = t + after.as_millis() as u64;
                run_to(&mut c, &mut fx, t, at - 1);
                assert_eq!(c.current(child), None, "restarted before its backoff");
                run_to(&mut c, &mut fx, at, at);
                t = at;
            }
        }
        assert_eq!(delays, [10, 20, 40]);
        // One first start and three restarts: four forks, bounded.
        assert_eq!(fx.forks.len(), 4);
        assert_eq!(fx.gave_up, [(Some("crash".to_owned()), 3)]);
        assert_eq!(
            fx.exits().last(),
            Some(&AfterExit::Finished(Finish::GaveUp))
        );
        let out = c.outcome(child).expect("finished");
        assert_eq!(out.finish, Finish::GaveUp);
        assert_eq!(out.last, Some(FAIL));
        assert_eq!(out.generations, 4);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn restart_policies() {
        for (restart, status, restarts) in [
            (Restart::Always, OK, true),
            (Restart::Always, FAIL, true),
            (Restart::OnFailure, OK, false),
            (Restart::OnFailure, FAIL, true),
            (Restart::OnFailure, ExitStatus::Signal(9), true),
            (Restart::Never, FAIL, false),
            (Restart::Never, OK, false),
        ] {
            let mut c = core();
            let mut fx = Fake::default();
            let child = c.add(ms(0), fast(ChildSpec::new()).restart(restart), &mut fx);
            c.handle_exit(ms(5), fx.last_pid(), status, &mut fx);
            assert_eq!(
                !c.is_finished(child),
                restarts,
                "{restart:?} after {status:?}"
            );
            if !restarts {
                assert_eq!(
                    c.outcome(child).map(|o| o.finish),
                    Some(Finish::Exited(status))
                );
            }
        }
    }

    #[test]
    fn exits_of_strangers_are_not_ours() {
        let mut c = core();
        let mut fx = Fake::default();
        c.add(ms(0), ChildSpec::new(), &mut fx);
        assert!(!c.handle_exit(ms(1), Pid::from_raw(7), OK, &mut fx));
        assert!(c.owns(fx.last_pid()));
        assert!(!c.owns(Pid::from_raw(7)));
    }

    #[test]
    fn a_long_run_resets_the_backoff() {
        let mut c = core();
        let mut fx = Fake::default();
        let child = c.add(ms(0), fast(ChildSpec::new()), &mut fx);
        c.handle_exit(ms(0), fx.last_pid(), FAIL, &mut fx);
        run_to(&mut c, &mut fx, 0, 10);
        c.handle_exit(ms(10), fx.last_pid(), FAIL, &mut fx);
        assert_eq!(
            fx.exits().last(),
            Some(&AfterExit::Restart {
                after: Duration::from_millis(20)
            })
        );
        run_to(&mut c, &mut fx, 10, 30);
        // Up for two seconds (reset_after is one): the next delay is the first again.
        c.handle_ready(ms(30), fx.last_pid(), &mut fx);
        c.handle_exit(ms(2030), fx.last_pid(), FAIL, &mut fx);
        assert_eq!(
            fx.exits().last(),
            Some(&AfterExit::Restart {
                after: Duration::from_millis(10)
            })
        );
        assert!(!c.is_finished(child));
    }

    #[test]
    fn heartbeats_ping_and_a_silent_process_is_killed_and_restarted() {
        let mut c = core();
        let mut fx = Fake::default();
        let spec =
            fast(ChildSpec::new()).heartbeat(Duration::from_millis(10), Duration::from_millis(35));
        let child = c.add(ms(0), spec, &mut fx);
        let pid = fx.last_pid();
        run_to(&mut c, &mut fx, 0, 50);
        assert!(fx.pings.is_empty(), "no pings before it is ready");
        c.handle_ready(ms(50), pid, &mut fx);
        // Answering every ping keeps it alive.
        for t in 51..=150 {
            let before = fx.pings.len();
            run_to(&mut c, &mut fx, t, t);
            if fx.pings.len() > before {
                c.handle_pong(pid);
            }
        }
        assert_eq!(fx.pings.len(), 10);
        assert!(fx.kills.is_empty());
        // Silent from now on (its loop is blocked): killed once the oldest unanswered ping
        // is 35 ms old, and not before.
        run_to(&mut c, &mut fx, 151, 194);
        assert!(fx.kills.is_empty(), "killed early");
        run_to(&mut c, &mut fx, 195, 195);
        assert_eq!(fx.kills, [pid]);
        assert!(fx.events.iter().any(|e| matches!(
            e,
            SupervisionEvent::Killed { reason: KillReason::HeartbeatTimeout, pid: p, .. } if *p == pid
        )));
        // Its death is a failure: restarted.
        c.handle_exit(ms(196), pid, ExitStatus::Signal(9), &mut fx);
        run_to(&mut c, &mut fx, 196, 206);
        assert_ne!(c.current(child), Some(pid));
        assert!(c.current(child).is_some());
    }

    #[test]
    fn a_slow_start_is_killed_at_the_start_timeout() {
        let mut c = core();
        let mut fx = Fake::default();
        let spec = fast(ChildSpec::new()).start_timeout(Some(Duration::from_millis(100)));
        c.add(ms(0), spec, &mut fx);
        run_to(&mut c, &mut fx, 0, 99);
        assert!(fx.kills.is_empty());
        run_to(&mut c, &mut fx, 100, 100);
        assert_eq!(fx.kills, [fx.last_pid()]);
        // Killed once only, while it waits to be reaped.
        run_to(&mut c, &mut fx, 101, 500);
        assert_eq!(fx.kills.len(), 1);
    }

    #[test]
    fn recycling_starts_the_replacement_before_the_old_one_stops() {
        let mut c = core();
        let mut fx = Fake::default();
        let spec = ChildSpec::named("w").max_requests(100, 10);
        let child = c.add(ms(0), spec, &mut fx);
        let old = fx.last_pid();
        c.handle_ready(ms(1), old, &mut fx);
        let limit = fx.forks[0].limit.expect("a limit");
        assert!((100..=110).contains(&limit));
        c.handle_recycle(ms(2), old, limit, &mut fx);
        let new = fx.last_pid();
        assert_ne!(new, old);
        // The old one serves on until the new one is ready.
        assert!(fx.stops.is_empty());
        assert_eq!(c.current(child), Some(old));
        // A second request while one is in progress changes nothing.
        c.handle_recycle(ms(3), old, limit + 1, &mut fx);
        assert_eq!(fx.forks.len(), 2);
        c.handle_ready(ms(4), new, &mut fx);
        assert_eq!(c.current(child), Some(new));
        assert_eq!(fx.stops, [(old, StopReason::Recycle)]);
        c.handle_exit(ms(5), old, OK, &mut fx);
        assert_eq!(fx.exits(), [AfterExit::Retired]);
        assert!(!c.is_finished(child));
        assert_eq!(c.pids(), [new]);
    }

    #[test]
    fn live_processes_get_distinct_limits() {
        let mut c = core();
        let mut fx = Fake::default();
        for _ in 0..4 {
            c.add(ms(0), ChildSpec::new().max_requests(100, 4), &mut fx);
        }
        let mut limits: Vec<u64> = fx.forks.iter().filter_map(|o| o.limit).collect();
        limits.sort_unstable();
        limits.dedup();
        assert_eq!(limits.len(), 4, "{limits:?}");
        // A replacement, beside the four live ones, gets the one value left.
        let free = (100..=104).find(|l| !limits.contains(l)).expect("one left");
        let pids: Vec<Pid> = (0..4).map(|i| c.current(ChildId(i)).expect("up")).collect();
        for p in &pids {
            c.handle_ready(ms(1), *p, &mut fx);
        }
        c.handle_recycle(ms(2), pids[0], 100, &mut fx);
        assert_eq!(fx.forks[4].limit, Some(free));
    }

    #[test]
    fn a_stop_not_honoured_becomes_a_kill() {
        let mut c = core();
        let mut fx = Fake::default();
        let spec = ChildSpec::new().stop_timeout(Duration::from_millis(50));
        let child = c.add(ms(0), spec, &mut fx);
        let pid = fx.last_pid();
        c.handle_ready(ms(1), pid, &mut fx);
        assert!(c.stop_child(ms(10), child, &mut fx));
        // Asked once; the child is finishing.
        assert!(!c.stop_child(ms(10), child, &mut fx));
        assert_eq!(fx.stops, [(pid, StopReason::Requested)]);
        run_to(&mut c, &mut fx, 10, 59);
        assert!(fx.kills.is_empty());
        run_to(&mut c, &mut fx, 60, 60);
        assert_eq!(fx.kills, [pid]);
        assert!(!c.is_finished(child), "finished only once reaped");
        c.handle_exit(ms(61), pid, ExitStatus::Signal(9), &mut fx);
        assert_eq!(fx.exits(), [AfterExit::Finished(Finish::Stopped)]);
        assert_eq!(c.outcome(child).map(|o| o.finish), Some(Finish::Stopped));
        assert_eq!(fx.forks.len(), 1, "a stopped child is not restarted");
    }

    #[test]
    fn rolling_reload_one_at_a_time_and_a_second_is_refused() {
        let mut c = core();
        let mut fx = Fake::default();
        let kids: Vec<ChildId> = (0..3)
            .map(|_| c.add(ms(0), ChildSpec::new(), &mut fx))
            .collect();
        let old: Vec<Pid> = kids.iter().map(|k| c.current(*k).expect("up")).collect();
        for p in &old {
            c.handle_ready(ms(1), *p, &mut fx);
        }
        assert_eq!(c.reload(ms(2), &mut fx), Ok(3));
        assert_eq!(c.reload(ms(2), &mut fx), Err(ReloadRefusal::InProgress));
        assert!(fx
            .events
            .iter()
            .any(|e| matches!(e, SupervisionEvent::ReloadRefused { .. })));
        for (k, p) in kids.iter().zip(&old) {
            // Exactly one replacement at a time.
            assert_eq!(c.pids().len(), 4);
            let new = fx.last_pid();
            c.handle_ready(ms(3), new, &mut fx);
            assert_eq!(fx.stops.last(), Some(&(*p, StopReason::Reload)));
            assert_eq!(c.current(*k), Some(new));
            c.handle_exit(ms(4), *p, OK, &mut fx);
        }
        assert!(!c.is_reloading());
        assert!(fx.events.iter().any(|e| matches!(
            e,
            SupervisionEvent::ReloadFinished {
                replaced: 3,
                failed: 0,
                ..
            }
        )));
        assert_eq!(c.pids().len(), 3);
        assert!(c.pids().iter().all(|p| !old.contains(p)));
        // Done: a new reload is accepted.
        assert_eq!(c.reload(ms(5), &mut fx), Ok(3));
    }

    #[test]
    fn a_replacement_that_dies_leaves_the_old_one_serving() {
        let mut c = core();
        let mut fx = Fake::default();
        let child = c.add(ms(0), fast(ChildSpec::new()).max_requests(5, 0), &mut fx);
        let old = fx.last_pid();
        c.handle_ready(ms(1), old, &mut fx);
        c.handle_recycle(ms(2), old, 5, &mut fx);
        let broken = fx.last_pid();
        c.handle_exit(ms(3), broken, FAIL, &mut fx);
        assert_eq!(c.current(child), Some(old));
        assert!(fx.stops.is_empty());
        // Tried again after the backoff.
        run_to(&mut c, &mut fx, 3, 13);
        let good = fx.last_pid();
        assert_ne!(good, broken);
        c.handle_ready(ms(14), good, &mut fx);
        assert_eq!(c.current(child), Some(good));
        assert_eq!(fx.stops, [(old, StopReason::Recycle)]);
    }

    #[test]
    fn a_reload_skips_a_failed_replacement() {
        let mut c = core();
        let mut fx = Fake::default();
        let a = c.add(ms(0), ChildSpec::new(), &mut fx);
        let b = c.add(ms(0), ChildSpec::new(), &mut fx);
        let (pa, pb) = (c.current(a).expect("a"), c.current(b).expect("b"));
        c.handle_ready(ms(1), pa, &mut fx);
        c.handle_ready(ms(1), pb, &mut fx);
        c.reload(ms(2), &mut fx).expect("reload");
        c.handle_exit(ms(3), fx.last_pid(), FAIL, &mut fx);
        assert_eq!(c.current(a), Some(pa));
        // On to b.
        let nb = fx.last_pid();
        c.handle_ready(ms(4), nb, &mut fx);
        c.handle_exit(ms(5), pb, OK, &mut fx);
        assert!(fx.events.iter().any(|e| matches!(
            e,
            SupervisionEvent::ReloadFinished {
                replaced: 1,
                failed: 1,
                ..
            }
        )));
    }

    #[test]
    fn failed_forks_back_off_like_crashes() {
        let mut c = core();
        let mut fx = Fake {
            fail_forks: true,
            ..Fake::default()
        };
        let child = c.add(
            ms(0),
            fast(ChildSpec::new()).intensity(2, Duration::from_secs(5)),
            &mut fx,
        );
        run_to(&mut c, &mut fx, 0, 1000);
        assert!(c.is_finished(child));
        assert_eq!(fx.forks.len(), 3);
        assert_eq!(
            fx.events
                .iter()
                .filter(|e| matches!(e, SupervisionEvent::ForkFailed { .. }))
                .count(),
            3
        );
        assert_eq!(c.outcome(child).map(|o| o.finish), Some(Finish::GaveUp));
    }

    #[test]
    fn nothing_restarts_during_a_shutdown() {
        let mut c = core();
        let mut fx = Fake::default();
        let a = c.add(ms(0), fast(ChildSpec::new()), &mut fx);
        let b = c.add(ms(0), fast(ChildSpec::new()), &mut fx);
        c.handle_exit(ms(1), c.current(a).expect("a"), FAIL, &mut fx);
        c.shutdown(&mut fx);
        assert!(c.is_finished(a));
        let pb = c.current(b).expect("b");
        c.handle_exit(ms(2), pb, OK, &mut fx);
        assert_eq!(c.outcome(b).map(|o| o.finish), Some(Finish::Shutdown));
        run_to(&mut c, &mut fx, 2, 1000);
        assert_eq!(fx.forks.len(), 2);
        assert!(c.all_finished());
        let mut later = Fake::default();
        let d = c.add(ms(3), ChildSpec::new(), &mut later);
        assert!(later.forks.is_empty());
        assert!(c.is_finished(d));
    }

    #[test]
    fn an_exit_during_a_replacement_hands_over_to_it() {
        let mut c = core();
        let mut fx = Fake::default();
        let child = c.add(ms(0), ChildSpec::new().max_requests(3, 0), &mut fx);
        let old = fx.last_pid();
        c.handle_ready(ms(1), old, &mut fx);
        c.handle_recycle(ms(2), old, 3, &mut fx);
        let new = fx.last_pid();
        c.handle_exit(ms(3), old, ExitStatus::Signal(9), &mut fx);
        assert_eq!(fx.exits(), [AfterExit::Replaced]);
        assert_eq!(c.current(child), Some(new));
        assert_eq!(fx.forks.len(), 2, "no restart on top of the replacement");
        c.handle_ready(ms(4), new, &mut fx);
        assert_eq!(c.running(), [(child, new)]);
    }
}
