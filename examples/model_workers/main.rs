//! Model workers as addressable actors: the forkbus main job.
//!
//! ```text
//! cargo run --release --example model_workers
//! cargo run --release --example model_workers -- --shards 3 --workers 4 --requests 5000
//! ```
//!
//! A root forks a tree: shard supervisors, each supervising its workers with a
//! [`Supervisor`] (restart always, a short backoff, each worker under its own name). Every
//! worker builds a small model in memory at start (a seeded 16→64→64→8 MLP, tanh and ReLU
//! layers, no file, no download) and answers inference requests with real arithmetic. The
//! root:
//!
//! 1. sends requests to the workers by pid and by name (`shard0/w1`), a bounded window in
//!    flight, each with a delivery receipt, and checks every reply against its own copy of
//!    the model;
//! 2. half-way through broadcasts "load model version 2": every worker switches once, and
//!    every reply to a request sent after the broadcast carries version 2 (checked);
//! 3. kills one worker with `SIGKILL` and prints the loss report: the receipts give exactly
//!    one outcome per request, and the worker's supervisor reports its lost list. The
//!    supervisor restarts the worker under the same name with a new pid, on the model
//!    version its shard last heard of; the root sends to the name again, and once to the
//!    old pid (lost: no route);
//! 4. prints the routing trace of sampled requests, there and back;
//! 5. prints a summary (sent = replied + lost, the restart, the name now resolving to the
//!    new pid, every reply's version: checked, the exit code is 1 if not), then shuts the
//!    tree down gracefully.
//!
//! The files: this one is the program top to bottom (the flags, what travels on the bus,
//! a worker, a shard supervisor, the root, `main`); `model.rs` is the toy MLP the workers
//! serve; `report.rs` prints what the root saw, reading its state only.

mod model;
mod report;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use forkbus::supervisor::{AfterExit, Backoff, ChildId};
use forkbus::{
    monotonic_now, to, Address, Bus, BusConfig, ChildSpec, ExitStatus, Fate, ForkOptions, Listener,
    LossReport, Message, MessageId, NodeId, PeerShutdown, Relation, Restart, SendError,
    SendOptions, ServiceEvent, Stop, SupervisionEvent, Supervisor, TimerId,
};
use nix::sys::signal::{kill, Signal};
use serde::{Deserialize, Serialize};

use model::{input_for, Mlp};

// ---------------------------------------------------------------------------------------
// Flags

const HELP: &str = "\
model_workers: a forkbus tree of model-serving workers

USAGE: model_workers [FLAGS]

  --shards N        shard supervisors under the root              [2]
  --workers N       workers per shard                             [3]
  --requests N      inference requests the root sends             [2000]
  --window N        requests in flight at most                    [64]
  --trace-every N   trace every Nth request (0: none)             [500]
  --kill-at N       kill the target of request N right after sending it; its
                    shard's supervisor restarts it          [7/10 of --requests]
  --hang-ms N       before the SIGKILL, freeze it (SIGSTOP) N ms, so requests pile
                    up unacknowledged on its link (0: a plain SIGKILL)  [20]
  --backoff-ms N    the supervisors' delay before a restart               [20]
  --no-kill         kill nobody
  --seed N          seed of the models and the inputs             [42]
  --help            this text";

#[derive(Clone, Debug)]
struct Args {
    shards: usize,
    workers: usize,
    requests: u64,
    window: usize,
    trace_every: u64,
    kill_at: Option<u64>,
    hang_ms: u64,
    backoff_ms: u64,
    seed: u64,
}

/// The flags, or `None` for `--help`.
fn parse_args() -> Result<Option<Args>, lexopt::Error> {
    use lexopt::prelude::*;
    let mut a = Args {
        shards: 2,
        workers: 3,
        requests: 2000,
        window: 64,
        trace_every: 500,
        kill_at: None,
        hang_ms: 20,
        backoff_ms: 20,
        seed: 42,
    };
    let mut kill = true;
    let mut kill_at = None;
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("shards") => a.shards = number(&mut p, "--shards")?,
            Long("workers") => a.workers = number(&mut p, "--workers")?,
            Long("requests") => a.requests = number(&mut p, "--requests")?,
            Long("window") => a.window = number(&mut p, "--window")?,
            Long("trace-every") => a.trace_every = number(&mut p, "--trace-every")?,
            Long("kill-at") => kill_at = Some(number(&mut p, "--kill-at")?),
            Long("hang-ms") => a.hang_ms = number(&mut p, "--hang-ms")?,
            Long("backoff-ms") => a.backoff_ms = number(&mut p, "--backoff-ms")?,
            Long("no-kill") => kill = false,
            Long("seed") => a.seed = number(&mut p, "--seed")?,
            _ => return Err(arg.unexpected()),
        }
    }
    if a.shards == 0 || a.workers == 0 || a.requests == 0 || a.window == 0 {
        return Err("--shards, --workers, --requests and --window must be positive".into());
    }
    if a.shards.saturating_mul(a.workers) > 512 {
        return Err("at most 512 workers, please".into());
    }
    a.kill_at = kill.then(|| kill_at.unwrap_or(a.requests * 7 / 10));
    Ok(Some(a))
}

/// The value of `flag`, a number.
fn number<T>(p: &mut lexopt::Parser, flag: &str) -> Result<T, lexopt::Error>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    use lexopt::ValueExt as _;
    let v = p.value()?.string()?;
    v.parse().map_err(|e| format!("{flag} {v:?}: {e}").into())
}

// ---------------------------------------------------------------------------------------
// What travels on the bus (CBOR through serde)

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Role {
    Supervisor,
    Worker,
}

/// One hop of a routing trace, as a worker echoes it back.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct HopView {
    pid: u32,
    link: Option<u32>,
    at_ns: u64,
}

/// One envelope of a supervisor's lost list.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LostView {
    origin: u32,
    /// What it was, read from its payload.
    what: String,
    req: Option<u64>,
    reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    /// A process is up (a worker: with the model version it built).
    Ready {
        name: String,
        role: Role,
        parent: u32,
        version: u32,
    },
    /// Root → worker.
    Infer { req: u64, input: Vec<f32> },
    /// Worker → root.
    Reply {
        req: u64,
        worker: String,
        pid: u32,
        version: u32,
        class: u32,
        score: f32,
        /// The request's own trace, when it had one.
        trace: Vec<HopView>,
    },
    /// Root → everyone.
    LoadModel { version: u32 },
    /// Worker → root: switched (once).
    Loaded { worker: String, version: u32 },
    /// Supervisor → root: a child's link went down, with its lost list.
    PeerLost {
        supervisor: String,
        peer: u32,
        cause: String,
        lost: Vec<LostView>,
    },
    /// Supervisor → root: a child's process exited, and what follows.
    ChildExit {
        supervisor: String,
        pid: u32,
        status: String,
        next: String,
    },
    /// Supervisor → root: a child is back under its name, in a new process.
    Restarted {
        supervisor: String,
        name: String,
        old: u32,
        new: u32,
        generation: u32,
        /// From the old process reaped to the new one ready.
        down_us: u64,
    },
}

fn hops(trace: &[forkbus::router::Hop]) -> Vec<HopView> {
    trace
        .iter()
        .map(|h| HopView {
            pid: h.node.pid,
            link: h.link,
            at_ns: h.at.as_nanos(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// A worker

struct Worker {
    name: String,
    seed: u64,
    model: Mlp,
}

impl Listener for Worker {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.decode::<Wire>() {
            Ok(Wire::Infer { req, input }) => {
                let (class, score) = self.model.infer(&input);
                let reply = Wire::Reply {
                    req,
                    worker: self.name.clone(),
                    pid: bus.pid().as_raw(),
                    version: self.model.version,
                    class,
                    score,
                    trace: hops(msg.trace()),
                };
                // A traced request gets a traced reply: the root sees the way back too.
                let options = SendOptions {
                    trace: !msg.trace().is_empty(),
                    ..SendOptions::default()
                };
                if let Err(e) = bus.send_with(msg.origin(), &reply, options) {
                    eprintln!("{}: reply to request #{req} refused: {e}", self.name);
                }
            }
            // Switch once; a repeated or older version is ignored.
            Ok(Wire::LoadModel { version }) if version > self.model.version => {
                self.model = Mlp::new(self.seed, version);
                let loaded = Wire::Loaded {
                    worker: self.name.clone(),
                    version,
                };
                if let Err(e) = bus.send(msg.origin(), &loaded) {
                    eprintln!("{}: cannot report the switch: {e}", self.name);
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("{}: undecodable message: {e}", self.name),
        }
    }
}

// ---------------------------------------------------------------------------------------
// A shard supervisor: forwards (the bus does that), supervises its workers (a
// `Supervisor` forks, reaps and restarts them), reports their ends and restarts

struct Shard {
    name: String,
    root: u32,
    sup: Supervisor,
    /// The model version this shard last heard of (the broadcast passes through it). A
    /// restarted worker is forked from this process, so it starts with this value.
    version: Rc<Cell<u32>>,
    /// Each child's generation (processes it has had); a reaped process, until the next
    /// one is ready.
    generation: HashMap<ChildId, u32>,
    reaped: HashMap<ChildId, (u32, Instant)>,
}

impl Listener for Shard {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::LoadModel { version }) = msg.decode::<Wire>() {
            self.version.set(self.version.get().max(version));
        }
    }

    fn on_service(&mut self, bus: &mut Bus, event: &ServiceEvent) {
        if let ServiceEvent::Supervision(event) = event {
            match event {
                SupervisionEvent::Started {
                    child, generation, ..
                } => {
                    self.generation.insert(child.child, *generation);
                }
                SupervisionEvent::Exited {
                    child,
                    pid,
                    status,
                    next,
                } if !bus.is_stopping() => {
                    self.reaped
                        .insert(child.child, (pid.as_raw(), Instant::now()));
                    let status = match status {
                        ExitStatus::Code(c) => format!("exited with code {c}"),
                        ExitStatus::Signal(9) => "killed by signal 9 (SIGKILL)".to_owned(),
                        ExitStatus::Signal(s) => format!("killed by signal {s}"),
                    };
                    let next = match next {
                        AfterExit::Restart { after } => {
                            format!("restart in {} ms (backoff)", after.as_millis())
                        }
                        other => format!("{other:?}"),
                    };
                    let report = Wire::ChildExit {
                        supervisor: self.name.clone(),
                        pid: pid.as_raw(),
                        status,
                        next,
                    };
                    if let Err(e) = bus.send(Address::Pid(self.root), &report) {
                        eprintln!("{}: cannot report a child exit: {e}", self.name);
                    }
                }
                SupervisionEvent::Ready { child, pid } => {
                    let Some((old, at)) = self.reaped.remove(&child.child) else {
                        return; // a first start
                    };
                    let report = Wire::Restarted {
                        supervisor: self.name.clone(),
                        name: self.sup.name(bus, child.child).unwrap_or_default(),
                        old,
                        new: pid.as_raw(),
                        generation: self.generation.get(&child.child).copied().unwrap_or(0),
                        down_us: u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX),
                    };
                    if let Err(e) = bus.send(Address::Pid(self.root), &report) {
                        eprintln!("{}: cannot report a restart: {e}", self.name);
                    }
                }
                _ => {}
            }
        }
    }

    fn on_peer_shutdown(&mut self, bus: &mut Bus, s: &PeerShutdown) {
        let Relation::Child(pid) = s.relation else {
            return;
        };
        if bus.is_stopping() {
            return; // the graceful end of the run: nothing to report
        }
        let lost = s
            .lost
            .iter()
            .map(|l| LostView {
                origin: l.envelope.id.origin.pid,
                // The lost list holds whole envelopes: what each was is readable.
                what: match forkbus::runtime::decode::<Wire>(&l.envelope.payload) {
                    Ok(Wire::Infer { .. }) => "requests".into(),
                    Ok(Wire::LoadModel { version }) => format!("\"load model v{version}\""),
                    Ok(_) => "a message".into(),
                    Err(_) => format!("seq {}", l.envelope.id.seq),
                },
                req: match forkbus::runtime::decode::<Wire>(&l.envelope.payload) {
                    Ok(Wire::Infer { req, .. }) => Some(req),
                    _ => None,
                },
                reason: l.fate.to_string(),
            })
            .collect();
        let report = Wire::PeerLost {
            supervisor: self.name.clone(),
            peer: pid.as_raw(),
            cause: format!("{:?}", s.cause),
            lost,
        };
        if let Err(e) = bus.send(Address::Pid(self.root), &report) {
            eprintln!("{}: cannot report a lost list: {e}", self.name);
        }
    }
}

fn say_ready(bus: &mut Bus, root: u32, name: &str, role: Role, version: u32) {
    let parent = bus.parent().map_or(0, |p| p.pid);
    let ready = Wire::Ready {
        name: name.to_owned(),
        role,
        parent,
        version,
    };
    if let Err(e) = bus.send(Address::Pid(root), &ready) {
        eprintln!("{name}: cannot say ready: {e}");
    }
}

fn spawn_tree(bus: &mut Bus, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let root = bus.pid().as_raw();
    for s in 0..args.shards {
        let (workers, seed) = (args.workers, args.seed);
        let backoff = Duration::from_millis(args.backoff_ms);
        let shard = format!("shard{s}");
        bus.fork(ForkOptions::named(shard.clone()), move |bus| {
            let sup = Supervisor::new(bus);
            let version = Rc::new(Cell::new(1));
            // Before the first spawn: supervision events are handed to listeners later,
            // from the loop, and this one hears them all.
            bus.add_listener(
                0,
                Shard {
                    name: shard.clone(),
                    root,
                    sup,
                    version: version.clone(),
                    generation: HashMap::new(),
                    reaped: HashMap::new(),
                },
            );
            for w in 0..workers {
                let name = format!("{shard}/w{w}");
                let spec = ChildSpec::named(name.clone())
                    .restart(Restart::Always)
                    .backoff(Backoff::new(backoff, backoff * 8));
                let version = version.clone();
                // Runs in every process of this worker, the first and each restart: a
                // restarted worker builds the model version its shard holds at the fork.
                let spawned = sup.spawn(bus, spec, move |bus| {
                    let model = Mlp::new(seed, version.get());
                    let v = model.version;
                    bus.add_listener(
                        0,
                        Worker {
                            name: name.clone(),
                            seed,
                            model,
                        },
                    );
                    say_ready(bus, root, &name, Role::Worker, v);
                });
                if let Err(e) = spawned {
                    eprintln!("{shard}: cannot supervise worker {w}: {e}");
                }
            }
            say_ready(bus, root, &shard, Role::Supervisor, 0);
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The root

#[derive(Clone, Debug)]
struct Member {
    name: String,
    /// Its current process.
    pid: u32,
    parent: u32,
    role: Role,
    alive: bool,
    /// Replies by model version, every process of it together.
    replies: [u64; 2],
    /// Switches of its current process.
    switches: u32,
    /// The model version its current process started with.
    born: u32,
    lost: u64,
    sent: u64,
    /// The process before the current one, once it was restarted.
    old_pid: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
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
struct Request {
    worker: usize,
    by_name: bool,
    /// The pid it was sent to: the address, or what the name resolved to at the root (0:
    /// nothing).
    pid: u32,
    traced: bool,
    after_switch: bool,
    sent_ns: u64,
    outcome: Outcome,
    latency_ns: u64,
    reply_trace: Vec<HopView>,
    request_trace: Vec<HopView>,
    version: u32,
    /// The pid that answered.
    replied_by: u32,
}

#[derive(Debug)]
struct Kill {
    worker: usize,
    /// The pid killed.
    old_pid: u32,
    after_req: u64,
    at: Instant,
    peer_lost: Vec<Wire>,
    exits: Vec<Wire>,
    /// The shard's report of the restart.
    restarted: Option<Wire>,
    /// When the root heard from the new process.
    back_at: Option<Instant>,
    down_probe: Option<u64>,
    stale_probe: Option<u64>,
    /// The request before which the root began to wait for the restart.
    held_at: Option<u64>,
    /// The wait for the restart was given up (3 s).
    waited_out: bool,
    hold_timer: Option<TimerId>,
}

struct Root {
    args: Args,
    me: Weak<RefCell<Self>>,
    models: [Mlp; 2],
    members: Vec<Member>,
    workers: Vec<usize>,
    reqs: Vec<Request>,
    by_seq: HashMap<u64, u64>,
    outstanding: usize,
    rr: usize,
    switch_at: Option<u64>,
    kill: Option<Kill>,
    checked: u64,
    wrong_model: u64,
    wrong_version: u64,
    anomalies: Vec<String>,
    refused: u64,
    started: Option<Instant>,
    finished: Option<Instant>,
    grace: Option<TimerId>,
    phase_done: bool,
    broadcast: Option<MessageId>,
    broadcast_lost: Vec<String>,
}

impl Root {
    fn new(args: Args) -> Rc<RefCell<Self>> {
        let models = [Mlp::new(args.seed, 1), Mlp::new(args.seed, 2)];
        Rc::new_cyclic(|me| {
            RefCell::new(Self {
                args,
                me: me.clone(),
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
                grace: None,
                phase_done: false,
                broadcast: None,
                broadcast_lost: Vec::new(),
            })
        })
    }

    fn expected(&self) -> usize {
        self.args.shards * (1 + self.args.workers)
    }

    fn name_of(&self, pid: u32) -> String {
        if pid == std::process::id() {
            return "root".into();
        }
        self.members
            .iter()
            .find(|m| m.pid == pid || m.old_pid == Some(pid))
            .map_or_else(|| format!("pid {pid}"), |m| m.name.clone())
    }

    /// Requests the root keeps back until a killed worker is up again, so that its new
    /// process serves some of them: ten per worker.
    fn reserve(&self) -> u64 {
        10 * self.workers.len() as u64
    }

    /// The next worker in turn and how to address it. After the kill, the killed worker
    /// gets one request by name while no process holds its name, and one by its old pid
    /// once it is back (both lost: no route); otherwise it is skipped while down.
    fn pick(&mut self, bus: &Bus) -> (usize, Option<Probe>) {
        // The router may know before the application does (its events are still queued).
        for m in &mut self.members {
            m.alive &= bus.router().resolve(&to::pid(m.pid)).is_some();
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
            let me = self.me.clone();
            k.hold_timer = Some(bus.add_timer(Duration::from_secs(3), move |bus| {
                let Some(root) = me.upgrade() else { return };
                let mut st = root.borrow_mut();
                if let Some(k) = &mut st.kill {
                    k.waited_out = k.back_at.is_none();
                }
                st.pump(bus);
            }));
        }
        true
    }

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
                    Err(SendError::QueueFull { .. }) => return, // on_send_ready calls again
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
                (to::pid(pid), pid)
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
                    return; // on_send_ready calls again
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

    /// Freezes the worker (a hung worker: it reads and acknowledges nothing more), then
    /// kills it `--hang-ms` later, as a watchdog would; or kills it at once.
    fn kill_worker(&mut self, bus: &mut Bus, w: usize, after_req: u64) {
        let old_pid = self.members[w].pid;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(old_pid).unwrap_or(0));
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
            bus.add_timer(Duration::from_millis(self.args.hang_ms), move |_| {
                if let Err(e) = kill(pid, Signal::SIGKILL) {
                    eprintln!("kill -KILL {pid}: {e}");
                }
            });
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
            hold_timer: None,
        });
    }

    fn check_done(&mut self, bus: &mut Bus) {
        if self.phase_done || (self.reqs.len() as u64) < self.args.requests || self.outstanding > 0
        {
            return;
        }
        self.finished.get_or_insert_with(Instant::now);
        // Wait (3 s at most) for the supervisor's reports of the kill and the restart too.
        let reports_in = self.kill.as_ref().is_none_or(|k| {
            !k.peer_lost.is_empty()
                && !k.exits.is_empty()
                && k.restarted.is_some()
                && k.back_at.is_some()
        });
        if reports_in {
            self.phase_done = true;
            if let Some(t) = self.grace.take() {
                bus.cancel_timer(t);
            }
            bus.stop();
        } else if self.grace.is_none() {
            self.grace = Some(bus.add_timer(Duration::from_secs(3), Bus::stop));
        }
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
                bus.stop();
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
                if let Some(t) = k.hold_timer.take() {
                    bus.cancel_timer(t);
                }
            }
            _ => self.anomalies.push(format!(
                "{name} restarted (pid {pid}), and nobody killed it"
            )),
        }
        self.pump(bus);
    }
}

#[derive(Clone)]
struct RootListener(Rc<RefCell<Root>>);

impl Listener for RootListener {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let mut st = self.0.borrow_mut();
        let wire = match msg.decode::<Wire>() {
            Ok(w) => w,
            Err(e) => {
                st.anomalies.push(format!("undecodable message: {e}"));
                return;
            }
        };
        match wire {
            w @ Wire::Reply { .. } => st.on_reply(bus, w, hops(msg.trace())),
            Wire::Ready {
                name,
                role,
                parent,
                version,
            } => st.on_ready(bus, msg.origin().pid, name, role, parent, version),
            Wire::Loaded { worker, .. } => {
                // Counted for the process that sent it (the current one of that name).
                let pid = msg.origin().pid;
                if let Some(m) = st.members.iter_mut().find(|m| m.name == worker) {
                    if m.pid == pid {
                        m.switches += 1;
                    }
                }
            }
            w @ Wire::PeerLost { .. } => {
                if let Some(k) = &mut st.kill {
                    k.peer_lost.push(w);
                }
                st.check_done(bus);
            }
            w @ Wire::ChildExit { .. } => {
                if let Some(k) = &mut st.kill {
                    k.exits.push(w);
                }
                st.check_done(bus);
            }
            w @ Wire::Restarted { .. } => {
                if let Some(k) = &mut st.kill {
                    k.restarted = Some(w);
                }
                st.check_done(bus);
            }
            other => st.anomalies.push(format!("root got {other:?}")),
        }
    }

    fn on_delivered(&mut self, _bus: &mut Bus, id: MessageId) {
        let mut st = self.0.borrow_mut();
        if let Some(&req) = st.by_seq.get(&id.seq) {
            if let Some(r) = usize::try_from(req).ok().and_then(|i| st.reqs.get_mut(i)) {
                if r.outcome == Outcome::Pending {
                    r.outcome = Outcome::Delivered;
                }
            }
        }
    }

    fn on_lost(&mut self, bus: &mut Bus, report: &LossReport) {
        let mut st = self.0.borrow_mut();
        if st.broadcast == Some(report.id) {
            // A broadcast towards a node that died: lost on that branch only.
            let at = st.name_of(report.at.pid);
            st.broadcast_lost
                .push(format!("lost at {at}: {}", report.fate));
            return;
        }
        match st.by_seq.get(&report.id.seq).copied() {
            Some(req) => {
                st.finalize(req, Outcome::Lost(report.fate, report.at.pid));
                if let Some(w) = usize::try_from(req).ok().map(|i| st.reqs[i].worker) {
                    st.members[w].lost += 1;
                }
            }
            None => st.anomalies.push(format!("a loss report for {report:?}")),
        }
        st.pump(bus);
    }

    fn on_node_down(&mut self, bus: &mut Bus, node: NodeId) {
        let mut st = self.0.borrow_mut();
        let Some(w) = st
            .members
            .iter()
            .position(|m| m.pid == node.pid || m.old_pid == Some(node.pid))
        else {
            return;
        };
        if st.members[w].pid == node.pid {
            st.members[w].alive = false;
        }
        // Taken by that process (receipt in) but never answered: the reply died with it.
        // Replies it wrote before dying came first (links are FIFO), so none is coming.
        let orphaned: Vec<u64> = (0..st.reqs.len())
            .filter(|&i| {
                let r = &st.reqs[i];
                r.worker == w && r.pid == node.pid && r.outcome == Outcome::Delivered
            })
            .map(|i| i as u64)
            .collect();
        for req in orphaned {
            st.finalize(req, Outcome::ReplyLost);
            st.members[w].lost += 1;
        }
        st.pump(bus);
    }

    fn on_send_ready(&mut self, bus: &mut Bus) {
        self.0.borrow_mut().pump(bus);
    }
}

// ---------------------------------------------------------------------------------------

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{HELP}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("model_workers: {e} (try --help)");
            std::process::exit(2);
        }
    };
    let mut config = BusConfig::default();
    config.name = Some("root".into());
    // Every receipt resolves within this, whatever happens to the tree.
    config.router.receipt_timeout = Some(Duration::from_secs(5));
    let mut bus = Bus::root(config)?;
    let state = Root::new(args.clone());
    bus.add_listener(0, RootListener(state.clone()));
    // Whatever happens, the run ends: the loop is stopped after this.
    let timed_out = Rc::new(Cell::new(false));
    let flag = timed_out.clone();
    let watchdog = bus.add_timer(Duration::from_secs(60), move |bus| {
        flag.set(true);
        bus.stop();
    });

    report::section("1. the tree");
    let t0 = Instant::now();
    spawn_tree(&mut bus, &args)?;
    let stop = bus.run()?;
    let tree_up = t0.elapsed();
    let ready = state.borrow().members.len();
    if stop != Stop::Stopped || timed_out.get() || ready != state.borrow().expected() {
        eprintln!("the tree did not come up ({ready} processes ready)");
        bus.shutdown_tree();
        bus.run()?;
        std::process::exit(1);
    }
    {
        let mut st = state.borrow_mut();
        // Workers in shard order, so the round robin spreads over every shard.
        st.members.sort_by(|a, b| a.name.cmp(&b.name));
        st.workers = (0..st.members.len())
            .filter(|&i| st.members[i].role == Role::Worker)
            .collect();
        let unnamed: Vec<String> = st
            .members
            .iter()
            .filter(|m| bus.router().resolve(&to::name(m.name.clone())).is_none())
            .map(|m| m.name.clone())
            .collect();
        if !unnamed.is_empty() {
            st.anomalies
                .push(format!("names not routable yet: {unnamed:?}"));
        }
        report::print_tree_up(&st, tree_up);
    }

    report::section("2. requests");
    state.borrow_mut().started = Some(Instant::now());
    state.borrow_mut().pump(&mut bus);
    bus.run()?;
    let ok = {
        let st = state.borrow();
        report::print_requests(&st, timed_out.get());
        // Sections 3 to 5: the kill, the traces, the summary and its checks.
        report::print_report(&st, &bus, tree_up) && !timed_out.get()
    };

    bus.cancel_timer(watchdog);
    if let Some(t) = state.borrow_mut().grace.take() {
        bus.cancel_timer(t);
    }
    bus.shutdown_tree();
    let killed = state.borrow().kill.is_some();
    let stop = bus.run()?;
    report::print_shutdown(&stop, killed, &bus);
    drop(bus);
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
