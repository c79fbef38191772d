//! Real-process tests of supervision and the task pool: restarts with backoff and an
//! intensity limit, names across a kill -9, recycling with jitter, heartbeats, a rolling
//! reload on `SIGHUP`, exit outcomes and waits, cooperative stops, and a task pool that
//! loses a worker mid-way. Every scenario runs under a deadline in a process group of its
//! own and leaves nothing behind (see `common`).

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{ensure, nix_pid, run_until, Harness, Orphans, RootEnd};
use forkbus::error::SendError;
use forkbus::pool::{PoolConfig, TaskOptions, TaskResult};
use forkbus::pool::{TaskId, TaskOutcome, TaskPool};
use forkbus::supervisor::{
    hold_stop, AfterExit, Backoff, ChildId, Finish, KillReason, StartReason, StopReason, WhileDown,
};
use forkbus::supervisor::{should_stop, ChildSpec, Restart, SupervisionEvent, Supervisor};
use forkbus::{
    to, Address, Bus, BusConfig, ExitStatus, Fate, ForkOptions, Listener, LossReason, LossReport,
    Message, MessageId, NodeId, Pid, ServiceEvent,
};
use nix::sys::signal::{kill, Signal};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    Req {
        seq: u64,
    },
    Rep {
        seq: u64,
        pid: u32,
    },
    Sleep {
        secs: u64,
    },
    KillNow,
    Stopping {
        pid: u32,
        reason: String,
        flag: bool,
    },
    Report(Report),
}

/// What a process reports to the scenario's root at the end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Report {
    forks: u64,
    outcome: String,
    delays_ms: Vec<u64>,
    sent: u64,
    answered: u64,
    lost: u64,
    late: u64,
    lost_why: BTreeMap<String, u64>,
    /// Per pid requests were sent to: (sent, answered, lost).
    per_pid: BTreeMap<u32, (u64, u64, u64)>,
    /// The pid the name resolves to at the end.
    resolves_to: Option<u32>,
}

// ---------------------------------------------------------------------------------------
// Workers and ears.

/// Answers requests (after `work`); sleeps (its loop blocked) when told to.
struct Echo {
    work: Duration,
}

impl Listener for Echo {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.decode::<Wire>() {
            Ok(Wire::Req { seq }) => {
                if !self.work.is_zero() {
                    std::thread::sleep(self.work);
                }
                let pid = bus.pid().as_raw();
                let _ = bus.send(msg.origin(), &Wire::Rep { seq, pid });
            }
            Ok(Wire::Sleep { secs }) => std::thread::sleep(Duration::from_secs(secs)),
            _ => {}
        }
    }
}

fn echo(bus: &mut Bus) {
    bus.add_listener(
        0,
        Echo {
            work: Duration::ZERO,
        },
    );
}

/// An echo worker that takes a little time per request, so that requests are in flight
/// when it is killed.
fn slow_echo(bus: &mut Bus) {
    bus.add_listener(
        0,
        Echo {
            work: Duration::from_micros(300),
        },
    );
}

/// Records supervision events (with when) and messages for the root.
#[derive(Default)]
struct Heard {
    events: Vec<(Instant, SupervisionEvent)>,
    messages: Vec<(NodeId, Wire)>,
    tasks: Vec<TaskOutcome>,
}

#[derive(Clone)]
struct Ear(Rc<RefCell<Heard>>);

impl Listener for Ear {
    fn on_service(&mut self, _bus: &mut Bus, event: &ServiceEvent) {
        match event {
            ServiceEvent::Supervision(event) => {
                self.0
                    .borrow_mut()
                    .events
                    .push((Instant::now(), event.clone()));
            }
            ServiceEvent::Task(outcome) => {
                self.0.borrow_mut().tasks.push(outcome.clone());
            }
            _ => {}
        }
    }

    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(w) = msg.decode::<Wire>() {
            if !matches!(w, Wire::Rep { .. }) {
                self.0.borrow_mut().messages.push((msg.origin(), w));
            }
        }
    }
}

fn root_with_ear() -> Result<(Bus, Rc<RefCell<Heard>>), String> {
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let heard = Rc::new(RefCell::new(Heard::default()));
    bus.add_listener(1, Ear(heard.clone()));
    Ok((bus, heard))
}

impl Heard {
    fn count(&self, f: impl Fn(&SupervisionEvent) -> bool) -> usize {
        self.events.iter().filter(|(_, e)| f(e)).count()
    }
}

fn fast_backoff() -> Backoff {
    let mut b = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    b.reset_after = Duration::from_secs(30);
    b
}

// ---------------------------------------------------------------------------------------
// Requests with accounting: every request ends answered or lost, once.

struct Out {
    id: MessageId,
    node: Option<NodeId>,
}

/// A client: sends requests to a name (resolved to a node at send time), and counts each
/// as answered (a reply), or lost (a loss report, or its node left the tree unanswered).
#[derive(Default)]
struct Tracker {
    names: Vec<String>,
    next_name: usize,
    total: u64,
    window: usize,
    next_seq: u64,
    outstanding: BTreeMap<u64, Out>,
    by_id: HashMap<MessageId, u64>,
    answered: u64,
    lost: u64,
    late: u64,
    lost_why: BTreeMap<String, u64>,
    per_pid: BTreeMap<u32, (u64, u64, u64)>,
    paused: bool,
    /// Send to the name itself (resolved hop by hop), not to the node it resolves to here.
    by_name: bool,
    /// Requests sent to a name that resolves to nothing here, at most (then wait for it).
    unresolved_budget: u64,
}

impl Tracker {
    fn new(names: &[&str], total: u64, window: usize) -> Self {
        Self {
            names: names.iter().map(|s| (*s).to_owned()).collect(),
            total,
            window,
            unresolved_budget: 200,
            ..Self::default()
        }
    }

    fn done(&self) -> bool {
        self.next_seq == self.total && self.outstanding.is_empty()
    }

    /// Sends up to `burst` requests while the window has room.
    fn pump(&mut self, bus: &mut Bus, burst: usize) -> Result<(), String> {
        for _ in 0..burst {
            if self.paused || self.next_seq >= self.total || self.outstanding.len() >= self.window {
                return Ok(());
            }
            let name = self.names[self.next_name % self.names.len()].clone();
            let node = if self.by_name {
                None
            } else {
                bus.router().resolve(&to::name(name.as_str()))
            };
            let to: Address = match node {
                Some(n) => n.into(),
                None if self.by_name => to::name(name.as_str()),
                // Down: a few requests to the bare name (reported lost: no route), then
                // wait for it to come back.
                None if self.unresolved_budget > 0 => {
                    self.unresolved_budget -= 1;
                    to::name(name.as_str())
                }
                None => return Ok(()),
            };
            let seq = self.next_seq;
            match bus.send(to, &Wire::Req { seq }) {
                Ok(id) => {
                    self.next_seq += 1;
                    self.next_name += 1;
                    self.outstanding.insert(seq, Out { id, node });
                    self.by_id.insert(id, seq);
                    if let Some(n) = node {
                        self.per_pid.entry(n.pid).or_default().0 += 1;
                    }
                }
                Err(SendError::QueueFull { .. }) => return Ok(()),
                Err(e) => return Err(format!("send: {e}")),
            }
        }
        Ok(())
    }

    fn reply(&mut self, seq: u64, pid: u32) {
        match self.outstanding.remove(&seq) {
            Some(out) => {
                self.by_id.remove(&out.id);
                self.answered += 1;
                self.per_pid.entry(pid).or_default().1 += 1;
            }
            None => self.late += 1,
        }
    }

    fn lose(&mut self, seq: u64, why: String) {
        if let Some(out) = self.outstanding.remove(&seq) {
            self.by_id.remove(&out.id);
            self.lost += 1;
            *self.lost_why.entry(why).or_default() += 1;
            if let Some(n) = out.node {
                self.per_pid.entry(n.pid).or_default().2 += 1;
            }
        }
    }

    fn report(&self) -> Report {
        Report {
            sent: self.next_seq,
            answered: self.answered,
            lost: self.lost,
            late: self.late,
            lost_why: self.lost_why.clone(),
            per_pid: self.per_pid.clone(),
            ..Report::default()
        }
    }

    fn check(&self) -> Result<(), String> {
        let r = self.report();
        check_report(&r)
    }
}

fn check_report(r: &Report) -> Result<(), String> {
    ensure(r.sent == r.answered + r.lost, || {
        format!(
            "sent {} != answered {} + lost {}",
            r.sent, r.answered, r.lost
        )
    })?;
    ensure(r.late == 0, || {
        format!("{} replies came for requests counted already", r.late)
    })?;
    // Per pid sent to (requests sent by name count only where they were answered).
    for (pid, (s, a, l)) in r.per_pid.iter().filter(|(_, x)| x.0 > 0) {
        ensure(s == &(a + l), || {
            format!("pid {pid}: sent {s}, answered {a}, lost {l}")
        })?;
    }
    Ok(())
}

#[derive(Clone)]
struct TrackerEar(Rc<RefCell<Tracker>>);

impl Listener for TrackerEar {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::Rep { seq, pid }) = msg.decode::<Wire>() {
            self.0.borrow_mut().reply(seq, pid);
        }
    }

    fn on_lost(&mut self, _bus: &mut Bus, report: &LossReport) {
        let mut t = self.0.borrow_mut();
        if let Some(seq) = t.by_id.get(&report.id).copied() {
            t.lose(seq, report.fate.to_string());
        }
    }

    fn on_node_down(&mut self, _bus: &mut Bus, node: NodeId) {
        // Requests its application took and did not answer died with it.
        let mut t = self.0.borrow_mut();
        let gone: Vec<u64> = t
            .outstanding
            .iter()
            .filter(|(_, o)| o.node == Some(node))
            .map(|(s, _)| *s)
            .collect();
        for seq in gone {
            t.lose(seq, "node down, unanswered".into());
        }
    }
}

/// Pumps the tracker every 2 ms until it has sent everything.
fn keep_pumping(bus: &mut Bus, tracker: Rc<RefCell<Tracker>>, burst: usize) {
    bus.add_timer(Duration::from_millis(2), move |bus| {
        let r = tracker.borrow_mut().pump(bus, burst);
        if let Err(e) = r {
            eprintln!("pump: {e}");
        }
        let more = {
            let t = tracker.borrow();
            t.next_seq < t.total
        };
        if more {
            keep_pumping(bus, tracker, burst);
        }
    });
}

fn tracked(bus: &mut Bus, tracker: Tracker) -> Rc<RefCell<Tracker>> {
    let t = Rc::new(RefCell::new(tracker));
    bus.add_listener(2, TrackerEar(t.clone()));
    t
}

// ---------------------------------------------------------------------------------------
// 1. A worker that always crashes at start-up: restarted with backoff, given up on after
//    the intensity limit; the forks are bounded and the supervisor's parent is told.

fn crash_at_startup() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let root = bus.pid();
    let middle = bus
        .fork(ForkOptions::named("middle"), move |bus| {
            let report = match supervise_crasher(bus) {
                Ok(r) => r,
                Err(e) => Report {
                    outcome: format!("error: {e}"),
                    ..Report::default()
                },
            };
            let _ = bus.send(root, &Wire::Report(report));
            bus.shutdown_tree();
        })
        .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |b| {
        let h = h.borrow();
        h.messages.iter().any(|(_, w)| matches!(w, Wire::Report(_)))
            && h.count(|e| matches!(e, SupervisionEvent::ChildGaveUp { .. })) == 1
            && b.children().is_empty()
    })?;
    let h = heard.borrow();
    let report = h
        .messages
        .iter()
        .find_map(|(_, w)| match w {
            Wire::Report(r) => Some(r.clone()),
            _ => None,
        })
        .ok_or("no report")?;
    println!(
        "  {} forks, backoff {:?} ms, then {}",
        report.forks, report.delays_ms, report.outcome
    );
    ensure(report.outcome == "GaveUp", || format!("outcome {report:?}"))?;
    // Three restarts allowed: one first start and three restarts, no more.
    ensure(report.forks == 4, || format!("{} forks", report.forks))?;
    ensure(report.delays_ms == [20, 40, 80], || {
        format!("backoff delays {:?}", report.delays_ms)
    })?;
    let told: Vec<_> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            SupervisionEvent::ChildGaveUp {
                from,
                name,
                restarts,
            } => Some((*from, name.clone(), *restarts)),
            _ => None,
        })
        .collect();
    ensure(told == [(middle, Some("crasher".to_owned()), 3)], || {
        format!("the root was told {told:?}")
    })?;
    drop(h);
    // The crasher's four processes died before reporting.
    common::shutdown_after_kills(bus, 4)
}

fn supervise_crasher(bus: &mut Bus) -> Result<Report, String> {
    let (rd, wr) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let wfd: RawFd = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let heard = Rc::new(RefCell::new(Heard::default()));
    bus.add_listener(1, Ear(heard.clone()));
    let sup = Supervisor::new(bus);
    let spec = ChildSpec::named("crasher")
        .backoff(fast_backoff())
        .intensity(3, Duration::from_secs(20))
        .keep_fd(wfd);
    let child = sup
        .spawn(bus, spec, move |_bus| {
            // SAFETY: the descriptor is the pipe's write end, kept open in this forked
            // process by the spec.
            let fd = unsafe { BorrowedFd::borrow_raw(wfd) };
            let _ = nix::unistd::write(fd, b"x");
            // Crash before being ready.
            // SAFETY: ends this forked worker at once, as a crash would.
            unsafe { nix::libc::_exit(3) }
        })
        .map_err(|e| e.to_string())?;
    let outcome = sup
        .wait(bus, child, Duration::from_secs(20))
        .map_err(|e| format!("wait: {e}"))?;
    drop(wr);
    let mut buf = [0u8; 64];
    let forks = nix::unistd::read(rd.as_fd(), &mut buf).map_err(|e| e.to_string())? as u64;
    let h = heard.borrow();
    let delays_ms = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            SupervisionEvent::Exited {
                next: AfterExit::Restart { after },
                status,
                ..
            } if *status == ExitStatus::Code(3) => Some(after.as_millis() as u64),
            _ => None,
        })
        .collect();
    let started = h.count(|e| matches!(e, SupervisionEvent::Started { .. })) as u64;
    if started != forks {
        return Err(format!("{started} started events for {forks} forks"));
    }
    Ok(Report {
        forks,
        outcome: format!("{:?}", outcome.finish),
        delays_ms,
        ..Report::default()
    })
}

// ---------------------------------------------------------------------------------------
// 2. kill -9 a named worker under load: the name resolves to the new pid; every request
//    sent to the old pid is answered or reported lost (counted); none hangs.

struct Killer {
    sup: Supervisor,
    child: ChildId,
    killed: Rc<RefCell<Option<Pid>>>,
}

impl Listener for Killer {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::KillNow) = msg.decode::<Wire>() {
            if self.killed.borrow().is_none() {
                if let Some(pid) = self.sup.pid(bus, self.child) {
                    let _ = kill(nix_pid(pid), Signal::SIGKILL);
                    *self.killed.borrow_mut() = Some(pid);
                }
            }
        }
    }
}

fn kill9_named_worker() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let sup = Supervisor::new(&mut bus);
    let spec = ChildSpec::named("echo").backoff(fast_backoff());
    let child = sup
        .spawn(&mut bus, spec, slow_echo)
        .map_err(|e| e.to_string())?;
    sup.wait_ready(&mut bus, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let killed = Rc::new(RefCell::new(None));
    bus.add_listener(
        3,
        Killer {
            sup,
            child,
            killed: killed.clone(),
        },
    );
    let root = bus.pid();
    bus.fork(ForkOptions::named("client"), move |bus| {
        let t = tracked(bus, Tracker::new(&["echo"], 3000, 16));
        keep_pumping(bus, t.clone(), 8);
        let asked = Rc::new(RefCell::new(false));
        let t2 = t.clone();
        let a2 = asked.clone();
        // Ask for the kill once 500 requests were answered.
        let r = run_until(bus, Duration::from_secs(60), move |bus| {
            if !*a2.borrow() && t2.borrow().answered >= 500 {
                *a2.borrow_mut() = true;
                let _ = bus.send(root, &Wire::KillNow);
            }
            t2.borrow().done()
        });
        let mut report = t.borrow().report();
        if let Err(e) = r {
            report.outcome = format!("client: {e}; {} outstanding", t.borrow().outstanding.len());
        }
        report.resolves_to = bus.router().resolve(&to::name("echo")).map(|n| n.pid);
        let _ = bus.send(root, &Wire::Report(report));
    })
    .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(90), move |_| {
        h.borrow()
            .messages
            .iter()
            .any(|(_, w)| matches!(w, Wire::Report(_)))
    })?;
    let report = heard
        .borrow()
        .messages
        .iter()
        .find_map(|(_, w)| match w {
            Wire::Report(r) => Some(r.clone()),
            _ => None,
        })
        .ok_or("no report")?;
    ensure(report.outcome.is_empty(), || report.outcome.clone())?;
    let old = killed.borrow().ok_or("the worker was never killed")?;
    let new = sup.pid(&bus, child).ok_or("no current worker")?;
    let (s, a, l) = report
        .per_pid
        .get(&old.as_raw())
        .copied()
        .unwrap_or_default();
    println!(
        "  sent {}, answered {}, lost {} {:?}; to the killed pid {old}: sent {s}, answered {a}, lost {l}; name now {new}",
        report.sent, report.answered, report.lost, report.lost_why
    );
    check_report(&report)?;
    ensure(report.sent == 3000, || format!("sent {}", report.sent))?;
    ensure(new != old, || format!("the worker is still {old}"))?;
    ensure(report.resolves_to == Some(new.as_raw()), || {
        format!(
            "the name resolves to {:?} at the client, the worker is {new}",
            report.resolves_to
        )
    })?;
    ensure(
        bus.router().resolve(&to::name("echo")).map(|n| n.pid) == Some(new.as_raw()),
        || "the name does not resolve to the new pid at the root".into(),
    )?;
    ensure(s > 0 && report.per_pid.contains_key(&new.as_raw()), || {
        format!("requests went to {:?}", report.per_pid.keys())
    })?;
    // The death was seen once, with its status, and a restart followed.
    let h = heard.borrow();
    ensure(
        h.count(|e| {
            matches!(e, SupervisionEvent::Exited { pid, status: ExitStatus::Signal(9), next: AfterExit::Restart { .. }, .. } if *pid == old)
        }) == 1,
        || "no restart after the kill".into(),
    )?;
    drop(h);
    // The worker killed with SIGKILL never reports.
    common::shutdown_after_kills(bus, 1)
}

// ---------------------------------------------------------------------------------------
// 3. Recycling with jitter over a pool of 4: no two live workers share a limit, so no two
//    recycle at the same count; the replacement is up before the old one drains; no
//    request is lost.

fn recycling_with_jitter() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let sup = Supervisor::new(&mut bus);
    let names = ["w0", "w1", "w2", "w3"];
    for n in names {
        let spec = ChildSpec::named(n)
            .max_requests(60, 30)
            .stop_timeout(Duration::from_secs(20));
        sup.spawn(&mut bus, spec, echo).map_err(|e| e.to_string())?;
    }
    sup.wait_ready(&mut bus, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let t = tracked(&mut bus, Tracker::new(&names, 2000, 16));
    keep_pumping(&mut bus, t.clone(), 8);
    let t2 = t.clone();
    run_until(&mut bus, Duration::from_secs(60), move |_| {
        t2.borrow().done()
    })?;
    // Let the last replacements settle.
    let s2 = sup;
    run_until(&mut bus, Duration::from_secs(20), move |b| {
        s2.pids(b).len() == 4 && !s2.is_reloading(b)
    })?;
    t.borrow().check()?;
    let h = heard.borrow();
    // Every process's limit, and which were alive together.
    let mut limit_of: HashMap<Pid, u64> = HashMap::new();
    let mut live: BTreeSet<Pid> = BTreeSet::new();
    let mut recycles: Vec<(ChildId, u64)> = Vec::new();
    for (_, e) in &h.events {
        match e {
            SupervisionEvent::Started { pid, limit, .. } => {
                let l = limit.ok_or("a process without a limit")?;
                for other in &live {
                    ensure(limit_of.get(other) != Some(&l), || {
                        format!("{pid} got limit {l}, which live {other} has")
                    })?;
                }
                limit_of.insert(*pid, l);
                live.insert(*pid);
            }
            SupervisionEvent::Exited { pid, .. } => {
                live.remove(pid);
            }
            SupervisionEvent::Recycling {
                child,
                pid,
                handled,
                ..
            } => {
                ensure(limit_of.get(pid) == Some(handled), || {
                    format!(
                        "{pid} asked at {handled}, its limit is {:?}",
                        limit_of.get(pid)
                    )
                })?;
                recycles.push((child.child, *handled));
            }
            _ => {}
        }
    }
    let first_round: BTreeMap<ChildId, u64> =
        recycles.iter().rev().map(|(c, n)| (*c, *n)).collect();
    let counts: BTreeSet<u64> = first_round.values().copied().collect();
    println!(
        "  {} recycles, first counts per worker {:?}; answered {} of {}",
        recycles.len(),
        first_round,
        t.borrow().answered,
        t.borrow().next_seq
    );
    ensure(first_round.len() == 4, || format!("recycles {recycles:?}"))?;
    ensure(counts.len() == 4, || {
        format!("two workers recycled at the same count: {first_round:?}")
    })?;
    // Replacement before drain: every retirement was preceded by its replacement's
    // readiness, and retired processes exited 0 (they drained).
    let replaced = h.count(|e| {
        matches!(
            e,
            SupervisionEvent::Replaced {
                reason: StopReason::Recycle,
                ..
            }
        )
    });
    ensure(replaced == recycles.len(), || {
        format!("{replaced} replacements for {} recycles", recycles.len())
    })?;
    let retired_badly: Vec<_> = h
        .events
        .iter()
        .filter(|(_, e)| {
            matches!(e, SupervisionEvent::Exited { next: AfterExit::Retired, status, .. } if !status.success())
        })
        .collect();
    ensure(retired_badly.is_empty(), || {
        format!("retired processes did not drain: {retired_badly:?}")
    })?;
    ensure(t.borrow().lost == 0, || {
        format!(
            "lost {} during recycling: {:?}",
            t.borrow().lost,
            t.borrow().lost_why
        )
    })?;
    drop(h);
    common::shutdown(bus)
}

// ---------------------------------------------------------------------------------------
// 4. A worker whose loop is blocked in a sleep is detected by heartbeat and replaced within
//    the configured timeout.

fn hung_worker() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let sup = Supervisor::new(&mut bus);
    let (interval, timeout) = (Duration::from_millis(200), Duration::from_millis(1500));
    let spec = ChildSpec::named("sleepy")
        .heartbeat(interval, timeout)
        .backoff(fast_backoff());
    let child = sup.spawn(&mut bus, spec, echo).map_err(|e| e.to_string())?;
    sup.wait_ready(&mut bus, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let old = sup.pid(&bus, child).ok_or("no worker")?;
    // It answers heartbeats while idle: nothing happens for a while.
    run_until(&mut bus, Duration::from_millis(2500), |_| false).ok();
    ensure(sup.pid(&bus, child) == Some(old), || {
        "an idle worker was replaced".into()
    })?;
    // Block its loop for 60 s.
    bus.send(to::name("sleepy"), &Wire::Sleep { secs: 60 })
        .map_err(|e| e.to_string())?;
    let blocked = Instant::now();
    let s2 = sup;
    run_until(&mut bus, Duration::from_secs(20), move |b| {
        s2.running(b).iter().any(|(c, p)| *c == child && *p != old)
    })?;
    let took = blocked.elapsed();
    let h = heard.borrow();
    let killed_at = h
        .events
        .iter()
        .find_map(|(at, e)| match e {
            SupervisionEvent::Killed {
                pid,
                reason: KillReason::HeartbeatTimeout,
                ..
            } if *pid == old => Some(*at),
            _ => None,
        })
        .ok_or("no heartbeat kill")?;
    let detected = killed_at.duration_since(blocked);
    println!(
        "  hung worker killed {detected:.2?} after its loop blocked; replaced after {took:.2?}"
    );
    // Not before the timeout (less the ping interval it may have straddled), and long
    // before its sleep would have ended by itself.
    ensure(detected + interval >= timeout, || {
        format!("killed after {detected:?}, before the timeout")
    })?;
    ensure(took < Duration::from_secs(20), || {
        format!("replaced after {took:?}")
    })?;
    ensure(
        h.count(|e| {
            matches!(e, SupervisionEvent::Exited { pid, status: ExitStatus::Signal(9), next: AfterExit::Restart { .. }, .. } if *pid == old)
        }) == 1,
        || "the hung worker's exit was not reported once".into(),
    )?;
    drop(h);
    // The hung worker, killed by its heartbeat, never reports.
    common::shutdown_after_kills(bus, 1)
}

// ---------------------------------------------------------------------------------------
// 5. A SIGHUP reload of a busy pool: one at a time; a second reload is refused; every
//    request answered or reported lost; all pids replaced.

fn sighup_scenario(report: &common::Reporter) -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let sup = Supervisor::new(&mut bus);
    let names = ["r0", "r1", "r2", "r3"];
    for n in names {
        let spec = ChildSpec::named(n).stop_timeout(Duration::from_secs(20));
        sup.spawn(&mut bus, spec, echo).map_err(|e| e.to_string())?;
    }
    sup.wait_ready(&mut bus, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let before: BTreeSet<Pid> = sup.pids(&bus).into_iter().collect();
    let t = tracked(&mut bus, Tracker::new(&names, 4000, 16));
    keep_pumping(&mut bus, t.clone(), 4);
    let t2 = t.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        t2.borrow().answered >= 300
    })?;
    // Busy: the driver sends SIGHUP.
    report.line("busy");
    let h2 = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        h2.borrow()
            .count(|e| matches!(e, SupervisionEvent::ReloadStarted { .. }))
            > 0
    })?;
    // While it runs: the API refuses, and so does a second SIGHUP.
    let again = sup.reload(&mut bus);
    ensure(
        again == Err(forkbus::supervisor::ReloadError::InProgress),
        || format!("a reload during a reload gave {again:?}"),
    )?;
    kill(nix::unistd::getpid(), Signal::SIGHUP).map_err(|e| e.to_string())?;
    let h2 = heard.clone();
    run_until(&mut bus, Duration::from_secs(60), move |_| {
        h2.borrow()
            .count(|e| matches!(e, SupervisionEvent::ReloadFinished { .. }))
            > 0
    })?;
    let t2 = t.clone();
    run_until(&mut bus, Duration::from_secs(60), move |_| {
        t2.borrow().done()
    })?;
    t.borrow().check()?;
    let after: BTreeSet<Pid> = sup.pids(&bus).into_iter().collect();
    let h = heard.borrow();
    let finished: Vec<_> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            SupervisionEvent::ReloadFinished {
                replaced, failed, ..
            } => Some((*replaced, *failed)),
            _ => None,
        })
        .collect();
    let refused = h.count(|e| matches!(e, SupervisionEvent::ReloadRefused { .. }));
    println!(
        "  reload {finished:?}, {refused} refused; answered {}, lost {} of {}",
        t.borrow().answered,
        t.borrow().lost,
        t.borrow().next_seq
    );
    ensure(finished == [(4, 0)], || format!("reloads {finished:?}"))?;
    ensure(refused >= 2, || format!("{refused} reloads refused"))?;
    ensure(after.len() == 4 && before.is_disjoint(&after), || {
        format!("pids before {before:?}, after {after:?}")
    })?;
    // One at a time: never more than one replacement alive beside the four.
    let mut alive = 0usize;
    let mut most = 0usize;
    for (_, e) in &h.events {
        match e {
            SupervisionEvent::Started { .. } => alive += 1,
            SupervisionEvent::Exited { .. } => alive -= 1,
            _ => {}
        }
        most = most.max(alive);
    }
    ensure(most <= 5, || format!("{most} workers alive at once"))?;
    drop(h);
    common::shutdown(bus)
}

fn sighup_driver(d: &mut common::Driver) -> Result<(), String> {
    let line = d.line()?;
    ensure(line == "busy", || format!("unexpected line {line:?}"))?;
    kill(d.root, Signal::SIGHUP).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// 6. A task pool: 10,000 jobs over 4 workers with one killed mid-way: results + losses =
//    jobs; then idempotent jobs survive a kill by being sent again once.

/// The jobs that stall their worker for a second, telling the root which worker that is
/// (on a pipe: the worker's loop is blocked, its bus writes nothing meanwhile).
const STALL_A: u64 = 3000;
const STALL_B: u64 = 21_000;

/// Reads the pid a stalled worker wrote, if any.
fn read_stalled(rd: &std::os::fd::OwnedFd) -> Option<Pid> {
    let mut fds = [nix::poll::PollFd::new(
        rd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, 0u16) {
        Ok(n) if n > 0 => {
            let mut b = [0u8; 4];
            match nix::unistd::read(rd.as_fd(), &mut b) {
                Ok(4) => Some(Pid::from_raw(u32::from_le_bytes(b))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Runs the loop until a stalled worker tells its pid, and kills it.
fn kill_stalled(bus: &mut Bus, rd: &Rc<std::os::fd::OwnedFd>) -> Result<Pid, String> {
    let found = Rc::new(RefCell::new(None));
    let (f, r) = (found.clone(), rd.clone());
    run_until(bus, Duration::from_secs(60), move |_| {
        if f.borrow().is_none() {
            *f.borrow_mut() = read_stalled(&r);
        }
        f.borrow().is_some()
    })?;
    let victim = found.borrow().ok_or("no stalled worker")?;
    kill(nix_pid(victim), Signal::SIGKILL).map_err(|e| e.to_string())?;
    Ok(victim)
}

fn task_pool() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let (rd, wr) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let wfd: RawFd = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let rd = Rc::new(rd);
    let config = PoolConfig::new(4)
        .named("tasks")
        .worker(ChildSpec::new().keep_fd(wfd));
    let pool = TaskPool::start(&mut bus, config, move |bus, n: u64| {
        // Each job takes a little time, so that workers hold some when one is killed.
        std::thread::sleep(Duration::from_micros(100));
        if n == STALL_A || n == STALL_B {
            // SAFETY: the pipe's write end, kept open in this forked worker by its spec.
            let fd = unsafe { BorrowedFd::borrow_raw(wfd) };
            let _ = nix::unistd::write(fd, &bus.pid().as_raw().to_le_bytes());
            std::thread::sleep(Duration::from_secs(1));
        }
        n.wrapping_mul(3)
    })
    .map_err(|e| e.to_string())?;
    pool.supervisor()
        .wait_ready(&mut bus, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let jobs = 10_000u64;
    let mut ids: Vec<TaskId> = Vec::new();
    for n in 0..jobs {
        ids.push(pool.submit(&mut bus, &n).map_err(|e| e.to_string())?);
    }
    // Kill the worker that holds job 3000 (stalled in it), mid-way.
    let victim = kill_stalled(&mut bus, &rd)?;
    println!(
        "  killed {victim} with {} outcomes in: {:?}",
        heard.borrow().tasks.len(),
        pool.stats(&bus)
    );
    let outcomes = pool
        .wait_many(&mut bus, &ids, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    ensure(outcomes.len() == ids.len(), || {
        format!("{} outcomes for {} jobs", outcomes.len(), ids.len())
    })?;
    let mut done = 0u64;
    let mut lost = BTreeSet::new();
    for (o, n) in outcomes.iter().zip(0u64..) {
        match &o.result {
            TaskResult::Done(_) => {
                ensure(o.value::<u64>().and_then(Result::ok) == Some(n * 3), || {
                    format!("{} gave {:?}", o.task, o.value::<u64>())
                })?;
                done += 1;
            }
            TaskResult::Lost { worker } => {
                ensure(*worker == victim, || format!("{} lost at {worker}", o.task))?;
                lost.insert(n);
            }
            other => return Err(format!("{}: {other:?}", o.task)),
        }
    }
    let lost_n = lost.len() as u64;
    let stats = pool.stats(&bus);
    let events = heard.borrow().tasks.len();
    println!(
        "  {jobs} jobs: {done} results + {lost_n} lost (worker {victim} killed); {events} on_task events"
    );
    ensure(done + lost_n == jobs, || {
        format!("{done} + {lost_n} != {jobs}")
    })?;
    ensure(lost.contains(&STALL_A), || {
        format!("the stalled job is not among the lost: {lost:?}")
    })?;
    ensure(events as u64 == jobs, || format!("{events} on_task events"))?;
    ensure(stats.lost == lost_n && stats.done == done, || {
        format!("stats {stats:?}")
    })?;
    ensure(!pool.supervisor().pids(&bus).contains(&victim), || {
        "the killed worker is still counted".into()
    })?;
    // Idempotent jobs: the killed worker's jobs are sent again, once, and all succeed.
    pool.supervisor()
        .wait_ready(&mut bus, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for n in 20_000..22_000u64 {
        let id = pool
            .submit_with(&mut bus, &n, TaskOptions::default().idempotent())
            .map_err(|e| e.to_string())?;
        ids.push(id);
    }
    let victim = kill_stalled(&mut bus, &rd)?;
    let outcomes = pool
        .wait_many(&mut bus, &ids, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    let done2 = outcomes
        .iter()
        .filter(|o| matches!(o.result, TaskResult::Done(_)))
        .count();
    let retried = outcomes.iter().filter(|o| o.retried).count();
    println!(
        "  2000 idempotent jobs: {done2} results, {retried} sent again after {victim} was killed"
    );
    ensure(done2 == 2000, || {
        format!("{done2} of 2000 idempotent jobs done")
    })?;
    ensure(
        outcomes
            .iter()
            .any(|o| o.retried && o.value::<u64>().and_then(Result::ok) == Some(STALL_B * 3)),
        || "the stalled idempotent job was not sent again".into(),
    )?;
    drop(wr);
    // The two workers killed mid-job never report.
    common::shutdown_after_kills(bus, 2)
}

// ---------------------------------------------------------------------------------------
// 7. Exit outcomes and waits; cooperative stops, honoured and not.

/// Tells the root when it is asked to stop, and whether `should_stop` says so.
struct Coop {
    root: Pid,
    hold: bool,
}

impl Listener for Coop {
    fn on_service(&mut self, bus: &mut Bus, event: &ServiceEvent) {
        if let ServiceEvent::Stopping(request) = event {
            let w = Wire::Stopping {
                pid: bus.pid().as_raw(),
                reason: format!("{:?}", request.reason),
                flag: should_stop(),
            };
            let _ = bus.send(self.root, &w);
            if self.hold {
                hold_stop(bus);
            }
        }
    }
}

fn exits_waits_stops() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let root = bus.pid();
    let sup = Supervisor::new(&mut bus);
    let never = |name: &str| ChildSpec::named(name).restart(Restart::Never);
    let ok = sup
        .spawn(&mut bus, never("zero"), |bus| bus.stop())
        .map_err(|e| e.to_string())?;
    let seven = sup
        .spawn(&mut bus, never("seven"), |bus| {
            bus.set_exit_code(7);
            bus.stop();
        })
        .map_err(|e| e.to_string())?;
    let doomed = sup
        .spawn(&mut bus, never("doomed"), echo)
        .map_err(|e| e.to_string())?;
    let coop = sup
        .spawn(&mut bus, ChildSpec::named("coop"), move |bus| {
            bus.add_listener(0, Coop { root, hold: false });
        })
        .map_err(|e| e.to_string())?;
    let stubborn = sup
        .spawn(
            &mut bus,
            ChildSpec::named("stubborn").stop_timeout(Duration::from_millis(500)),
            move |bus| {
                bus.add_listener(0, Coop { root, hold: true });
            },
        )
        .map_err(|e| e.to_string())?;
    // A wait for one child.
    let out = sup
        .wait(&mut bus, ok, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    ensure(out.finish == Finish::Exited(ExitStatus::Code(0)), || {
        format!("zero: {out:?}")
    })?;
    let s2 = sup;
    run_until(&mut bus, Duration::from_secs(20), move |b| {
        s2.pid(b, doomed).is_some() && s2.pid(b, coop).is_some() && s2.pid(b, stubborn).is_some()
    })?;
    let doomed_pid = sup.pid(&bus, doomed).ok_or("doomed")?;
    kill(nix_pid(doomed_pid), Signal::SIGKILL).map_err(|e| e.to_string())?;
    // Cooperative stops.
    ensure(sup.stop_child(&mut bus, coop), || "coop not stopped".into())?;
    ensure(sup.stop_child(&mut bus, stubborn), || {
        "stubborn not stopped".into()
    })?;
    ensure(!sup.stop_child(&mut bus, ok), || {
        "a finished child was stopped".into()
    })?;
    // A wait for all.
    let all = sup
        .wait_all(&mut bus, Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    let finishes: Vec<(ChildId, Finish, Option<ExitStatus>)> =
        all.iter().map(|o| (o.child, o.finish, o.last)).collect();
    println!("  outcomes {finishes:?}");
    let want = [
        (
            ok,
            Finish::Exited(ExitStatus::Code(0)),
            Some(ExitStatus::Code(0)),
        ),
        (
            seven,
            Finish::Exited(ExitStatus::Code(7)),
            Some(ExitStatus::Code(7)),
        ),
        (
            doomed,
            Finish::Exited(ExitStatus::Signal(9)),
            Some(ExitStatus::Signal(9)),
        ),
        (coop, Finish::Stopped, Some(ExitStatus::Code(0))),
        (stubborn, Finish::Stopped, Some(ExitStatus::Signal(9))),
    ];
    ensure(finishes == want, || {
        format!("outcomes {finishes:?}, want {want:?}")
    })?;
    let h = heard.borrow();
    // One exit event per process, with the status, success told from failure.
    let exits: Vec<(Pid, ExitStatus)> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            SupervisionEvent::Exited { pid, status, .. } => Some((*pid, *status)),
            _ => None,
        })
        .collect();
    let pids: BTreeSet<Pid> = exits.iter().map(|(p, _)| *p).collect();
    ensure(exits.len() == 5 && pids.len() == 5, || {
        format!("exit events {exits:?}")
    })?;
    ensure(
        exits.iter().filter(|(_, s)| s.success()).count() == 2,
        || format!("successes among {exits:?}"),
    )?;
    let stops: Vec<(String, bool)> = h
        .messages
        .iter()
        .filter_map(|(_, w)| match w {
            Wire::Stopping { reason, flag, .. } => Some((reason.clone(), *flag)),
            _ => None,
        })
        .collect();
    ensure(
        stops.len() == 2 && stops.iter().all(|(r, f)| r == "Requested" && *f),
        || format!("stopping events in workers: {stops:?}"),
    )?;
    ensure(
        h.count(|e| {
            matches!(
                e,
                SupervisionEvent::Killed {
                    reason: KillReason::StopTimeout,
                    ..
                }
            )
        }) == 1,
        || "the stubborn worker was not killed at its deadline".into(),
    )?;
    ensure(
        h.count(|e| {
            matches!(
                e,
                SupervisionEvent::Started {
                    reason: StartReason::Restart,
                    ..
                }
            )
        }) == 0,
        || "something restarted".into(),
    )?;
    drop(h);
    // The doomed child (SIGKILL) and the stubborn one (killed at its stop deadline).
    common::shutdown_after_kills(bus, 2)
}

// ---------------------------------------------------------------------------------------
// 8. A name held while its worker is down: up to the capacity, envelopes wait in the
//    supervisor and are answered by the next process; beyond, they are reported lost.

/// Waits for the word to go.
struct Go(Rc<RefCell<bool>>);

impl Listener for Go {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::KillNow) = msg.decode::<Wire>() {
            *self.0.borrow_mut() = true;
        }
    }
}

fn queue_while_down() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let sup = Supervisor::new(&mut bus);
    let spec = ChildSpec::named("q")
        .backoff(Backoff::new(Duration::from_secs(3), Duration::from_secs(3)))
        .while_down(WhileDown::Queue { capacity: 10 });
    let child = sup.spawn(&mut bus, spec, echo).map_err(|e| e.to_string())?;
    sup.wait_ready(&mut bus, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let root = bus.pid();
    // The client: in each round, waits for the word, then sends its requests by name.
    let client = bus
        .fork(ForkOptions::named("qclient"), move |bus| {
            let go = Rc::new(RefCell::new(false));
            bus.add_listener(0, Go(go.clone()));
            for n in [30u64, 5] {
                *go.borrow_mut() = false;
                let mut tracker = Tracker::new(&["q"], n, 30);
                tracker.by_name = true;
                let t = tracked(bus, tracker);
                let g = go.clone();
                let outcome = run_until(bus, Duration::from_secs(30), move |_| *g.borrow())
                    .and_then(|()| t.borrow_mut().pump(bus, 30))
                    .and_then(|()| {
                        let t2 = t.clone();
                        run_until(bus, Duration::from_secs(30), move |_| t2.borrow().done())
                    });
                let mut report = t.borrow().report();
                if let Err(e) = outcome {
                    report.outcome = e;
                }
                let _ = bus.send(root, &Wire::Report(report));
            }
        })
        .map_err(|e| e.to_string())?;
    let reports = |heard: &Rc<RefCell<Heard>>| -> Vec<Report> {
        heard
            .borrow()
            .messages
            .iter()
            .filter_map(|(_, w)| match w {
                Wire::Report(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    };
    // Round 1: 30 requests while the worker is down; the capacity is 10.
    let old = sup.pid(&bus, child).ok_or("no worker")?;
    kill(nix_pid(old), Signal::SIGKILL).map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        h.borrow()
            .count(|e| matches!(e, SupervisionEvent::Exited { pid, .. } if *pid == old))
            == 1
    })?;
    // The supervisor holds "q" now (announced before this message, on the same link).
    ensure(
        bus.router().resolve(&to::name("q")) == Some(bus.node()),
        || "the supervisor does not hold the name".into(),
    )?;
    bus.send(client, &Wire::KillNow)
        .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(60), move |_| {
        reports(&h).len() == 1
    })?;
    let report = reports(&heard)[0].clone();
    let new = sup.pid(&bus, child).ok_or("no new worker")?;
    println!(
        "  30 sent while down: {} answered by {:?}, {} lost {:?}",
        report.answered,
        report.per_pid.keys().collect::<Vec<_>>(),
        report.lost,
        report.lost_why
    );
    ensure(report.outcome.is_empty(), || report.outcome.clone())?;
    check_report(&report)?;
    ensure(report.answered == 10 && report.lost == 20, || {
        format!("answered {}, lost {}", report.answered, report.lost)
    })?;
    ensure(
        report.per_pid.get(&new.as_raw()).map(|x| x.1) == Some(10),
        || format!("answered by {:?}, the new worker is {new}", report.per_pid),
    )?;
    ensure(
        bus.router().resolve(&to::name("q")).map(|n| n.pid) == Some(new.as_raw()),
        || "the name did not move to the new worker".into(),
    )?;
    // Round 2: 5 requests held, then the child is stopped for good: they are reported lost
    // for sure to the client (abandoned by the custodian: never delivered), not dropped.
    sup.wait_ready(&mut bus, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    kill(nix_pid(new), Signal::SIGKILL).map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        h.borrow()
            .count(|e| matches!(e, SupervisionEvent::Exited { pid, .. } if *pid == new))
            == 1
    })?;
    bus.send(client, &Wire::KillNow)
        .map_err(|e| e.to_string())?;
    run_until(&mut bus, Duration::from_secs(20), move |b| {
        b.router().held() == 5
    })?;
    ensure(sup.stop_child(&mut bus, child), || "not stopped".into())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(60), move |_| {
        reports(&h).len() == 2
    })?;
    let report = reports(&heard)[1].clone();
    println!(
        "  5 held, then the child stopped: {} answered, {} lost {:?}",
        report.answered, report.lost, report.lost_why
    );
    ensure(report.outcome.is_empty(), || report.outcome.clone())?;
    ensure(
        report.lost == 5
            && report
                .lost_why
                .get(&Fate::Lost(LossReason::Abandoned).to_string())
                == Some(&5),
        || format!("round 2: {report:?}"),
    )?;
    ensure(
        sup.outcome(&bus, child).map(|o| o.finish) == Some(Finish::Stopped),
        || "the child did not finish stopped".into(),
    )?;
    ensure(bus.router().resolve(&to::name("q")).is_none(), || {
        "the supervisor kept the name".into()
    })?;
    // Both workers were killed with SIGKILL.
    common::shutdown_after_kills(bus, 2)
}

fn main() {
    let mut h = Harness::new();
    h.run(
        "1_crash_at_startup_gives_up",
        Duration::from_secs(60),
        crash_at_startup,
    );
    h.run(
        "2_kill9_named_worker_under_load",
        Duration::from_secs(120),
        kill9_named_worker,
    );
    h.run(
        "3_recycling_with_jitter",
        Duration::from_secs(120),
        recycling_with_jitter,
    );
    h.run(
        "4_hung_worker_heartbeat",
        Duration::from_secs(60),
        hung_worker,
    );
    h.run_with(
        "5_sighup_rolling_reload",
        Duration::from_secs(120),
        RootEnd::Success,
        Orphans::None,
        sighup_scenario,
        sighup_driver,
    );
    h.run(
        "6_task_pool_10000_jobs",
        Duration::from_secs(120),
        task_pool,
    );
    h.run(
        "7_exits_waits_and_stops",
        Duration::from_secs(60),
        exits_waits_stops,
    );
    h.run(
        "8_queue_while_down",
        Duration::from_secs(60),
        queue_while_down,
    );
    h.finish()
}
