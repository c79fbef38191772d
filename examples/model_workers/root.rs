//! The root's state machine: one plain [`Root`] value, owned by `main`, fed every event of
//! the root's bus by [`Root::handle`] from a [`Bus::run_with`] closure. Messages (ready,
//! replies, the supervisors' reports), receipts, losses, nodes going down and its own
//! timers all arrive there, so nothing is shared and nothing needs a cell.
//!
//! What it does: keeps a window of requests in flight (by pid and by name, in turn, each
//! with a receipt), checks every reply against its own copy of the model, broadcasts the
//! new model version half-way, kills one worker, holds its last requests back until the
//! worker's new process is up, and gives every request exactly one outcome. `report.rs`
//! reads the result.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use forkbus::{to, Bus, Event, Fate, LossReport, Message, MessageId, NodeId, SendOptions};

use forkbus::bus::{monotonic_now, TimerId};

use forkbus::error::SendError;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::args::Args;
use crate::model::{input_for, Mlp};
use crate::wire::{hops, HopView, Role, Wire};

/// A process of the tree, as the root knows it (a worker keeps its entry across restarts).
#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub(crate) name: String,
    /// Its current process.
    pub(crate) pid: u32,
    pub(crate) parent: u32,
    pub(crate) role: Role,
    pub(crate) alive: bool,
    /// Replies by model version, every process of it together.
    pub(crate) replies: [u64; 2],
    /// Switches of its current process.
    pub(crate) switches: u32,
    /// The model version its current process started with.
    pub(crate) born: u32,
    pub(crate) lost: u64,
    pub(crate) sent: u64,
    /// The process before the current one, once it was restarted.
    pub(crate) old_pid: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outcome {
    Pending,
    Delivered,
    Replied,
    Lost(Fate, u32),
    /// Delivered to a worker that died before its reply left.
    ReplyLost,
}

/// A request the root sends on purpose to show what a dead address gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// By name while no process holds the name.
    Down,
    /// By the killed pid, after the restart.
    Stale,
}

#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub(crate) worker: usize,
    pub(crate) by_name: bool,
    /// The pid it was sent to: the address, or what the name resolved to at the root (0:
    /// nothing).
    pub(crate) pid: u32,
    pub(crate) traced: bool,
    pub(crate) after_switch: bool,
    pub(crate) sent_ns: u64,
    pub(crate) outcome: Outcome,
    pub(crate) latency_ns: u64,
    pub(crate) reply_trace: Vec<HopView>,
    pub(crate) request_trace: Vec<HopView>,
    pub(crate) version: u32,
    /// The pid that answered.
    pub(crate) replied_by: u32,
}

/// The kill of a worker and what the root heard of it since.
#[derive(Debug)]
pub(crate) struct Kill {
    pub(crate) worker: usize,
    /// The pid killed.
    pub(crate) old_pid: u32,
    pub(crate) after_req: u64,
    pub(crate) at: Instant,
    pub(crate) peer_lost: Vec<Wire>,
    pub(crate) exits: Vec<Wire>,
    /// The shard's report of the restart.
    pub(crate) restarted: Option<Wire>,
    /// When the root heard from the new process.
    pub(crate) back_at: Option<Instant>,
    pub(crate) down_probe: Option<u64>,
    pub(crate) stale_probe: Option<u64>,
    /// The request before which the root began to wait for the restart.
    pub(crate) held_at: Option<u64>,
    /// The wait for the restart was given up (3 s).
    waited_out: bool,
}

/// What a timer of the root's is for. [`Bus::timer`] gives an id; the loop hands the id
/// back as [`Event::Timer`], and [`Timers`] says which of these it meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// Whatever happens, the run ends: stop the loop (set by `main`).
    Watchdog,
    /// `--hang-ms` after the SIGSTOP: the frozen worker's SIGKILL, as a watchdog would.
    Kill(Pid),
    /// 3 s after the root began to hold its last requests back: stop waiting for the
    /// killed worker's restart, send them anyway.
    StopHolding,
    /// 3 s after the last outcome: stop waiting for the supervisor's reports.
    Grace,
}

/// The root's pending timers, by id.
#[derive(Debug, Default)]
struct Timers(HashMap<TimerId, Due>);

impl Timers {
    fn set(&mut self, bus: &mut Bus, after: Duration, due: Due) {
        self.0.insert(bus.timer(after), due);
    }

    fn is_set(&self, due: Due) -> bool {
        self.0.values().any(|d| *d == due)
    }

    fn cancel(&mut self, bus: &mut Bus, due: Due) {
        self.0.retain(|&id, d| {
            let keep = *d != due;
            if !keep {
                bus.cancel_timer(id);
            }
            keep
        });
    }

    /// What a timer that fired was for (`None`: not one of these).
    fn fired(&mut self, id: TimerId) -> Option<Due> {
        self.0.remove(&id)
    }
}

pub(crate) struct Root {
    pub(crate) args: Args,
    pub(crate) models: [Mlp; 2],
    pub(crate) members: Vec<Member>,
    /// The workers' indices in `members`, in shard order.
    pub(crate) workers: Vec<usize>,
    pub(crate) reqs: Vec<Request>,
    by_seq: HashMap<u64, u64>,
    pub(crate) outstanding: usize,
    rr: usize,
    pub(crate) switch_at: Option<u64>,
    pub(crate) kill: Option<Kill>,
    pub(crate) checked: u64,
    pub(crate) wrong_model: u64,
    pub(crate) wrong_version: u64,
    pub(crate) anomalies: Vec<String>,
    pub(crate) refused: u64,
    pub(crate) started: Option<Instant>,
    pub(crate) finished: Option<Instant>,
    /// The watchdog fired: the run was cut short.
    pub(crate) timed_out: bool,
    /// The requests phase is over: every outcome and report is in, or the grace ran out.
    phase_done: bool,
    broadcast: Option<MessageId>,
    pub(crate) broadcast_lost: Vec<String>,
    timers: Timers,
}

impl Root {
    pub(crate) fn new(args: Args) -> Self {
        let models = [Mlp::new(args.seed, 1), Mlp::new(args.seed, 2)];
        Self {
            args,
            models,
            members: Vec::new(),
            workers: Vec::new(),
            reqs: Vec::new(),
            by_seq: HashMap::new(),
            outstanding: 0,
            rr: 0,
            switch_at: None,
            kill: None,
            checked: 0,
            wrong_model: 0,
            wrong_version: 0,
            anomalies: Vec::new(),
            refused: 0,
            started: None,
            finished: None,
            timed_out: false,
            phase_done: false,
            broadcast: None,
            broadcast_lost: Vec::new(),
            timers: Timers::default(),
        }
    }

    /// Every event of the root's bus, in every phase of the run.
    pub(crate) fn handle(&mut self, bus: &mut Bus, event: Event) {
        match event {
            Event::Message(msg) => self.on_message(bus, &msg),
            Event::Delivered(id) => self.on_delivered(id),
            Event::Lost(report) => self.on_lost(bus, &report),
            Event::NodeDown(node) => self.on_node_down(bus, node),
            Event::SendReady => self.pump(bus),
            Event::Timer(id) => {
                if let Some(due) = self.timers.fired(id) {
                    self.on_timer(bus, due);
                }
            }
            _ => {}
        }
    }

    /// Stops the loop `after` from now, whatever happens (`timed_out` says it did).
    pub(crate) fn set_watchdog(&mut self, bus: &mut Bus, after: Duration) {
        self.timers.set(bus, after, Due::Watchdog);
    }

    /// Once the tree is up: the workers in shard order, so the round robin spreads over
    /// every shard.
    pub(crate) fn tree_is_up(&mut self, bus: &Bus) {
        self.members.sort_by(|a, b| a.name.cmp(&b.name));
        self.workers = (0..self.members.len())
            .filter(|&i| self.members[i].role == Role::Worker)
            .collect();
        let unnamed: Vec<String> = self
            .members
            .iter()
            .filter(|m| bus.router().resolve(&to::name(m.name.clone())).is_none())
            .map(|m| m.name.clone())
            .collect();
        if !unnamed.is_empty() {
            self.anomalies
                .push(format!("names not routable yet: {unnamed:?}"));
        }
    }

    /// Sends the first window of requests; the loop's events send the rest.
    pub(crate) fn start_requests(&mut self, bus: &mut Bus) {
        self.started = Some(Instant::now());
        self.pump(bus);
    }

    /// The requests phase is over: no watchdog, no grace from now on.
    pub(crate) fn cancel_deadlines(&mut self, bus: &mut Bus) {
        self.timers.cancel(bus, Due::Watchdog);
        self.timers.cancel(bus, Due::Grace);
    }

    pub(crate) fn expected(&self) -> usize {
        self.args.shards * (1 + self.args.workers)
    }

    pub(crate) fn name_of(&self, pid: u32) -> String {
        if pid == std::process::id() {
            return "root".into();
        }
        self.members
            .iter()
            .find(|m| m.pid == pid || m.old_pid == Some(pid))
            .map_or_else(|| format!("pid {pid}"), |m| m.name.clone())
    }

    // -----------------------------------------------------------------------------------
    // Events

    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let wire = match msg.decode::<Wire>() {
            Ok(w) => w,
            Err(e) => {
                self.anomalies.push(format!("undecodable message: {e}"));
                return;
            }
        };
        match wire {
            w @ Wire::Reply { .. } => self.on_reply(bus, w, hops(msg.trace())),
            Wire::Ready {
                name,
                role,
                parent,
                version,
            } => self.on_ready(bus, msg.origin().pid, name, role, parent, version),
            Wire::Loaded { worker, .. } => {
                // Counted for the process that sent it (the current one of that name).
                let pid = msg.origin().pid;
                if let Some(m) = self.members.iter_mut().find(|m| m.name == worker) {
                    if m.pid == pid {
                        m.switches += 1;
                    }
                }
            }
            w @ Wire::PeerLost { .. } => {
                if let Some(k) = &mut self.kill {
                    k.peer_lost.push(w);
                }
                self.check_done(bus);
            }
            w @ Wire::ChildExit { .. } => {
                if let Some(k) = &mut self.kill {
                    k.exits.push(w);
                }
                self.check_done(bus);
            }
            w @ Wire::Restarted { .. } => {
                if let Some(k) = &mut self.kill {
                    k.restarted = Some(w);
                }
                self.check_done(bus);
            }
            other => self.anomalies.push(format!("root got {other:?}")),
        }
    }

    fn on_timer(&mut self, bus: &mut Bus, due: Due) {
        match due {
            Due::Watchdog => {
                self.timed_out = true;
                bus.stop();
            }
            Due::Kill(pid) => {
                if let Err(e) = kill(pid, Signal::SIGKILL) {
                    eprintln!("kill -KILL {pid}: {e}");
                }
            }
            Due::StopHolding => {
                if let Some(k) = &mut self.kill {
                    k.waited_out = k.back_at.is_none();
                }
                self.pump(bus);
            }
            Due::Grace => {
                self.phase_done = true;
                bus.stop();
            }
        }
    }

    fn on_delivered(&mut self, id: MessageId) {
        if let Some(&req) = self.by_seq.get(&id.seq) {
            if let Some(r) = usize::try_from(req).ok().and_then(|i| self.reqs.get_mut(i)) {
                if r.outcome == Outcome::Pending {
                    r.outcome = Outcome::Delivered;
                }
            }
        }
    }

    fn on_lost(&mut self, bus: &mut Bus, report: &LossReport) {
        if self.broadcast == Some(report.id) {
            // A broadcast towards a node that died: lost on that branch only.
            let at = self.name_of(report.at.pid);
            self.broadcast_lost
                .push(format!("lost at {at}: {}", report.fate));
            return;
        }
        match self.by_seq.get(&report.id.seq).copied() {
            Some(req) => {
                self.finalize(req, Outcome::Lost(report.fate, report.at.pid));
                if let Some(w) = usize::try_from(req).ok().map(|i| self.reqs[i].worker) {
                    self.members[w].lost += 1;
                }
            }
            None => self.anomalies.push(format!("a loss report for {report:?}")),
        }
        self.pump(bus);
    }

    fn on_node_down(&mut self, bus: &mut Bus, node: NodeId) {
        let Some(w) = self
            .members
            .iter()
            .position(|m| m.pid == node.pid || m.old_pid == Some(node.pid))
        else {
            return;
        };
        if self.members[w].pid == node.pid {
            self.members[w].alive = false;
        }
        // Taken by that process (receipt in) but never answered: the reply died with it.
        // Replies it wrote before dying came first (links are FIFO), so none is coming.
        let orphaned: Vec<u64> = (0..self.reqs.len())
            .filter(|&i| {
                let r = &self.reqs[i];
                r.worker == w && r.pid == node.pid && r.outcome == Outcome::Delivered
            })
            .map(|i| i as u64)
            .collect();
        for req in orphaned {
            self.finalize(req, Outcome::ReplyLost);
            self.members[w].lost += 1;
        }
        self.pump(bus);
    }

    fn on_reply(&mut self, bus: &mut Bus, w: Wire, reply_trace: Vec<HopView>) {
        let Wire::Reply {
            req,
            worker,
            pid,
            version,
            class,
            score,
            trace,
        } = w
        else {
            return;
        };
        let now = monotonic_now().as_nanos();
        let Some(r) = usize::try_from(req).ok().and_then(|i| self.reqs.get_mut(i)) else {
            self.anomalies
                .push(format!("a reply to an unknown request #{req}"));
            return;
        };
        r.latency_ns = now.saturating_sub(r.sent_ns);
        r.version = version;
        r.replied_by = pid;
        r.request_trace = trace;
        r.reply_trace = reply_trace;
        let expected = if r.after_switch { 2 } else { 1 };
        let w_idx = r.worker;
        if version != expected {
            self.wrong_version += 1;
        }
        if self.members[w_idx].name != worker {
            self.anomalies
                .push(format!("request #{req} answered by {worker}"));
        }
        // Every answer is checked against the root's own copy of that model version.
        let model = &self.models[usize::from(version == 2)];
        if model.infer(&input_for(self.args.seed, req)) == (class, score) && version <= 2 {
            self.checked += 1;
        } else {
            self.wrong_model += 1;
        }
        self.members[w_idx].replies[usize::from(version == 2)] += 1;
        self.finalize(req, Outcome::Replied);
        self.pump(bus);
    }

    /// A process says it is up: a member of the tree, or a new process of a worker.
    fn on_ready(&mut self, bus: &mut Bus, pid: u32, name: String, role: Role, parent: u32, v: u32) {
        let Some(w) = self.members.iter().position(|m| m.name == name) else {
            self.members.push(Member {
                name,
                pid,
                parent,
                role,
                alive: true,
                replies: [0; 2],
                switches: 0,
                born: v,
                lost: 0,
                sent: 0,
                old_pid: None,
            });
            if self.members.len() == self.expected() {
                bus.stop(); // the tree is up
            }
            return;
        };
        // The same name in a new process: its supervisor restarted it.
        let m = &mut self.members[w];
        if m.pid != pid {
            m.old_pid = Some(m.pid);
            m.pid = pid;
        }
        m.alive = true;
        m.born = v;
        m.switches = 0;
        match &mut self.kill {
            Some(k) if k.worker == w => {
                k.back_at.get_or_insert_with(Instant::now);
                self.timers.cancel(bus, Due::StopHolding);
            }
            _ => self.anomalies.push(format!(
                "{name} restarted (pid {pid}), and nobody killed it"
            )),
        }
        self.pump(bus);
    }

    // -----------------------------------------------------------------------------------
    // Sending

    /// Sends while the window has room; at the switch point broadcasts the new model, at the
    /// kill point kills.
    fn pump(&mut self, bus: &mut Bus) {
        while (self.reqs.len() as u64) < self.args.requests && self.outstanding < self.args.window {
            let i = self.reqs.len() as u64;
            if self.switch_at.is_none() && i >= self.args.requests / 2 {
                match bus.send(to::broadcast(), &Wire::LoadModel { version: 2 }) {
                    Ok(id) => {
                        self.switch_at = Some(i);
                        self.broadcast = Some(id);
                    }
                    Err(SendError::QueueFull { .. }) => return, // `SendReady` calls again
                    Err(e) => {
                        self.anomalies.push(format!("broadcast refused: {e}"));
                        self.switch_at = Some(u64::MAX);
                    }
                }
            }
            if self.holding(bus) {
                return; // the new process's ready message calls again
            }
            let (w, probe) = self.pick(bus);
            let m = &self.members[w];
            // By pid and by name in turn, for each worker.
            let by_name = match probe {
                Some(Probe::Down) => true,
                Some(Probe::Stale) => false,
                None => m.sent % 2 == 1,
            };
            let (addr, pid) = if by_name {
                let now = bus.router().resolve(&to::name(m.name.clone()));
                (to::name(m.name.clone()), now.map_or(0, |n| n.pid))
            } else {
                let pid = match (probe, m.old_pid) {
                    (Some(Probe::Stale), Some(old)) => old,
                    _ => m.pid,
                };
                (to::pid(forkbus::Pid::from_raw(pid)), pid)
            };
            // Every Nth, shifted by one each time so that the samples visit every worker.
            let n = self.args.trace_every;
            let traced = n > 0 && i % n == (i / n) % n;
            let infer = Wire::Infer {
                req: i,
                input: input_for(self.args.seed, i),
            };
            let options = SendOptions {
                receipt: true,
                trace: traced,
                hop_limit: None,
            };
            let sent_ns = monotonic_now().as_nanos();
            match bus.send_with(addr, &infer, options) {
                Ok(id) => {
                    self.by_seq.insert(id.seq, i);
                    self.outstanding += 1;
                    self.members[w].sent += 1;
                    if let Some(k) = &mut self.kill {
                        match probe {
                            Some(Probe::Down) => k.down_probe = Some(i),
                            Some(Probe::Stale) => k.stale_probe = Some(i),
                            None => {}
                        }
                    }
                    self.reqs.push(Request {
                        worker: w,
                        by_name,
                        pid,
                        traced,
                        after_switch: self.switch_at.is_some_and(|s| s <= i),
                        sent_ns,
                        outcome: Outcome::Pending,
                        latency_ns: 0,
                        reply_trace: Vec::new(),
                        request_trace: Vec::new(),
                        version: 0,
                        replied_by: 0,
                    });
                }
                Err(SendError::QueueFull { .. }) => {
                    if probe.is_none() {
                        self.rr = self.rr.saturating_sub(1);
                    }
                    return; // `SendReady` calls again
                }
                Err(e) => {
                    // Not sent: nothing to account for, but it is a failure of the run.
                    self.anomalies.push(format!("request #{i} refused: {e}"));
                    self.refused += 1;
                    self.args.requests -= 1;
                    continue;
                }
            }
            if self.args.kill_at == Some(i) && self.kill.is_none() {
                self.kill_worker(bus, w, i);
            }
        }
        self.check_done(bus);
    }

    /// Requests the root keeps back until a killed worker is up again, so that its new
    /// process serves some of them: ten per worker.
    fn reserve(&self) -> u64 {
        10 * self.workers.len() as u64
    }

    /// Whether to keep the remaining requests back: a worker was killed, is not back, and
    /// only the reserve is left to send. Waits 3 s at most.
    fn holding(&mut self, bus: &mut Bus) -> bool {
        let left = self.args.requests - self.reqs.len() as u64;
        let i = self.reqs.len() as u64;
        let reserve = self.reserve();
        let Some(k) = &mut self.kill else {
            return false;
        };
        if k.back_at.is_some() || k.waited_out || left > reserve {
            return false;
        }
        if k.held_at.is_none() {
            k.held_at = Some(i);
            self.timers
                .set(bus, Duration::from_secs(3), Due::StopHolding);
        }
        true
    }

    /// The next worker in turn and how to address it. After the kill, the killed worker
    /// gets one request by name while no process holds its name, and one by its old pid
    /// once it is back (both lost: no route); otherwise it is skipped while down.
    fn pick(&mut self, bus: &Bus) -> (usize, Option<Probe>) {
        // The router may know before the application does (its events are still queued).
        for m in &mut self.members {
            m.alive &= bus
                .router()
                .resolve(&to::pid(forkbus::Pid::from_raw(m.pid)))
                .is_some();
        }
        if let Some(k) = &self.kill {
            let m = &self.members[k.worker];
            let unnamed = bus.router().resolve(&to::name(m.name.clone())).is_none();
            if !m.alive && unnamed && k.down_probe.is_none() {
                return (k.worker, Some(Probe::Down));
            }
            if m.alive && m.old_pid.is_some() && k.stale_probe.is_none() {
                return (k.worker, Some(Probe::Stale));
            }
        }
        let n = self.workers.len();
        for _ in 0..n {
            let w = self.workers[self.rr % n];
            self.rr += 1;
            if self.members[w].alive {
                return (w, None);
            }
        }
        (self.workers[0], None)
    }

    /// Freezes the worker (a hung worker: it reads and acknowledges nothing more), then
    /// kills it `--hang-ms` later, as a watchdog would; or kills it at once.
    fn kill_worker(&mut self, bus: &mut Bus, w: usize, after_req: u64) {
        let old_pid = self.members[w].pid;
        let pid = Pid::from_raw(i32::try_from(old_pid).unwrap_or(0));
        let first = if self.args.hang_ms > 0 {
            Signal::SIGSTOP
        } else {
            Signal::SIGKILL
        };
        if let Err(e) = kill(pid, first) {
            self.anomalies.push(format!("kill -{first} {pid}: {e}"));
            return;
        }
        if first == Signal::SIGSTOP {
            let hang = Duration::from_millis(self.args.hang_ms);
            self.timers.set(bus, hang, Due::Kill(pid));
        }
        self.kill = Some(Kill {
            worker: w,
            old_pid,
            after_req,
            at: Instant::now(),
            peer_lost: Vec::new(),
            exits: Vec::new(),
            restarted: None,
            back_at: None,
            down_probe: None,
            stale_probe: None,
            held_at: None,
            waited_out: false,
        });
    }

    // -----------------------------------------------------------------------------------
    // Outcomes

    fn finalize(&mut self, req: u64, outcome: Outcome) {
        let Some(r) = usize::try_from(req).ok().and_then(|i| self.reqs.get_mut(i)) else {
            return;
        };
        match (&r.outcome, &outcome) {
            (Outcome::Pending | Outcome::Delivered, _) => {
                r.outcome = outcome;
                self.outstanding -= 1;
            }
            (Outcome::Lost(..) | Outcome::ReplyLost, Outcome::Replied) => {
                self.anomalies.push(format!(
                    "request #{req}: a reply came after its loss report"
                ));
                r.outcome = outcome;
            }
            _ => self
                .anomalies
                .push(format!("request #{req}: a second outcome {outcome:?}")),
        }
    }

    /// Once every request has its outcome, waits (3 s at most) for the supervisor's
    /// reports of the kill and the restart too, then stops the loop.
    fn check_done(&mut self, bus: &mut Bus) {
        if self.phase_done || (self.reqs.len() as u64) < self.args.requests || self.outstanding > 0
        {
            return;
        }
        self.finished.get_or_insert_with(Instant::now);
        let reports_in = self.kill.as_ref().is_none_or(|k| {
            !k.peer_lost.is_empty()
                && !k.exits.is_empty()
                && k.restarted.is_some()
                && k.back_at.is_some()
        });
        if reports_in {
            self.phase_done = true;
            self.timers.cancel(bus, Due::Grace);
            bus.stop();
        } else if !self.timers.is_set(Due::Grace) {
            self.timers.set(bus, Duration::from_secs(3), Due::Grace);
        }
    }
}
