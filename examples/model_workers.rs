//! Model workers as addressable actors: the forkbus main job.
//!
//! ```text
//! cargo run --release --example model_workers
//! cargo run --release --example model_workers -- --shards 3 --workers 4 --requests 5000
//! ```
//!
//! A root forks a tree: shard supervisors, each with its workers. Every worker builds a small
//! model in memory at start (a seeded 16→64→64→8 MLP, tanh and ReLU layers, no file, no
//! download) and answers inference requests with real arithmetic. The root:
//!
//! 1. sends requests to the workers by pid and by name (`shard0/w1`), a bounded window in
//!    flight, each with a delivery receipt, and checks every reply against its own copy of
//!    the model;
//! 2. half-way through broadcasts "load model version 2": every worker switches once, and
//!    every reply to a request sent after the broadcast carries version 2 (checked);
//! 3. kills one worker with `SIGKILL` and prints the loss report: the receipts give exactly
//!    one outcome per request, and the worker's supervisor reports its lost list;
//! 4. prints the routing trace of sampled requests, there and back;
//! 5. prints a summary (sent = replied + lost is checked: the exit code is 1 if not), then
//!    shuts the tree down gracefully.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use forkbus::{
    monotonic_now, to, Address, Bus, BusConfig, ExitStatus, ForkOptions, Listener, LossReason,
    LossReport, Message, MessageId, NodeId, PeerShutdown, Pid, Relation, SendError, SendOptions,
    Stop, TimerId,
};
use nix::sys::signal::{kill, Signal};
use serde::{Deserialize, Serialize};

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
  --kill-at N       kill the target of request N right after sending it
                                                                  [7/10 of --requests]
  --hang-ms N       before the SIGKILL, freeze it (SIGSTOP) N ms, so requests pile
                    up unacknowledged on its link (0: a plain SIGKILL)  [20]
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
    seed: u64,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut a = Args {
        shards: 2,
        workers: 3,
        requests: 2000,
        window: 64,
        trace_every: 500,
        kill_at: None,
        hang_ms: 20,
        seed: 42,
    };
    let mut kill = true;
    let mut kill_at = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name}: not a number: {v:?}"))
        };
        match flag.as_str() {
            "--help" | "-h" => return Ok(None),
            "--shards" => a.shards = usize::try_from(value("--shards")?).unwrap_or(usize::MAX),
            "--workers" => a.workers = usize::try_from(value("--workers")?).unwrap_or(usize::MAX),
            "--requests" => a.requests = value("--requests")?,
            "--window" => a.window = usize::try_from(value("--window")?).unwrap_or(usize::MAX),
            "--trace-every" => a.trace_every = value("--trace-every")?,
            "--kill-at" => kill_at = Some(value("--kill-at")?),
            "--hang-ms" => a.hang_ms = value("--hang-ms")?,
            "--no-kill" => kill = false,
            "--seed" => a.seed = value("--seed")?,
            other => return Err(format!("unknown flag {other:?} (try --help)")),
        }
    }
    if a.shards == 0 || a.workers == 0 || a.requests == 0 || a.window == 0 {
        return Err("--shards, --workers, --requests and --window must be positive".into());
    }
    if a.shards * a.workers > 512 {
        return Err("at most 512 workers, please".into());
    }
    a.kill_at = kill.then(|| kill_at.unwrap_or(a.requests * 7 / 10));
    Ok(Some(a))
}

// ---------------------------------------------------------------------------------------
// The model: a seeded MLP, real arithmetic per request

/// splitmix64: a tiny, good PRNG for weights and inputs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

const INPUT: usize = 16;
const SHAPE: [usize; 4] = [INPUT, 64, 64, 8];

struct Dense {
    n_in: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

/// A 16→64→64→8 perceptron: tanh, ReLU, softmax. Its weights depend on the seed and the
/// version only, so the root can rebuild any worker's model to check its answers.
struct Mlp {
    version: u32,
    layers: Vec<Dense>,
}

impl Mlp {
    fn new(seed: u64, version: u32) -> Self {
        let mut rng = SplitMix64(seed ^ u64::from(version).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let layers = SHAPE
            .windows(2)
            .map(|io| {
                let scale = 1.0 / (io[0] as f32).sqrt();
                Dense {
                    n_in: io[0],
                    w: (0..io[0] * io[1]).map(|_| rng.unit() * scale).collect(),
                    b: (0..io[1]).map(|_| rng.unit() * 0.1).collect(),
                }
            })
            .collect();
        Self { version, layers }
    }

    fn n_weights(&self) -> usize {
        self.layers.iter().map(|l| l.w.len() + l.b.len()).sum()
    }

    /// The most likely class and its probability.
    fn infer(&self, input: &[f32]) -> (u32, f32) {
        let mut x = input.to_vec();
        for (i, layer) in self.layers.iter().enumerate() {
            let mut y = layer.b.clone();
            for (o, yo) in y.iter_mut().enumerate() {
                let row = &layer.w[o * layer.n_in..(o + 1) * layer.n_in];
                *yo += row.iter().zip(&x).map(|(w, v)| w * v).sum::<f32>();
            }
            match i {
                0 => y.iter_mut().for_each(|v| *v = v.tanh()),
                1 => y.iter_mut().for_each(|v| *v = v.max(0.0)),
                _ => {}
            }
            x = y;
        }
        let max = x.iter().copied().fold(f32::MIN, f32::max);
        let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
        let (class, best) =
            x.iter().enumerate().fold(
                (0, f32::MIN),
                |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
            );
        (u32::try_from(class).unwrap_or(0), (best - max).exp() / sum)
    }
}

/// The input of request `req` (the root makes it; any process could remake it).
fn input_for(seed: u64, req: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed.rotate_left(17) ^ req.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (0..INPUT).map(|_| rng.unit()).collect()
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
    /// A process is up.
    Ready {
        name: String,
        role: Role,
        parent: u32,
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
    /// Supervisor → root: a child exited.
    ChildExit {
        supervisor: String,
        pid: u32,
        status: String,
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
// A shard supervisor: forwards (the bus does that), reports its children's ends

struct Supervisor {
    name: String,
    root: u32,
}

impl Listener for Supervisor {
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
                reason: l.reason.to_string(),
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

    fn on_child_exit(&mut self, bus: &mut Bus, pid: Pid, status: ExitStatus) {
        if bus.is_stopping() {
            return;
        }
        let status = match status {
            ExitStatus::Code(c) => format!("exited with code {c}"),
            ExitStatus::Signal(9) => "killed by signal 9 (SIGKILL)".to_owned(),
            ExitStatus::Signal(s) => format!("killed by signal {s}"),
        };
        let report = Wire::ChildExit {
            supervisor: self.name.clone(),
            pid: pid.as_raw(),
            status,
        };
        if let Err(e) = bus.send(Address::Pid(self.root), &report) {
            eprintln!("{}: cannot report a child exit: {e}", self.name);
        }
    }
}

fn say_ready(bus: &mut Bus, root: u32, name: &str, role: Role) {
    let parent = bus.parent().map_or(0, |p| p.pid);
    let ready = Wire::Ready {
        name: name.to_owned(),
        role,
        parent,
    };
    if let Err(e) = bus.send(Address::Pid(root), &ready) {
        eprintln!("{name}: cannot say ready: {e}");
    }
}

fn spawn_tree(bus: &mut Bus, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let root = bus.pid().as_raw();
    for s in 0..args.shards {
        let (workers, seed) = (args.workers, args.seed);
        let shard = format!("shard{s}");
        bus.fork(ForkOptions::named(shard.clone()), move |bus| {
            bus.add_listener(
                0,
                Supervisor {
                    name: shard.clone(),
                    root,
                },
            );
            for w in 0..workers {
                let name = format!("{shard}/w{w}");
                let forked = bus.fork(ForkOptions::named(name.clone()), move |bus| {
                    let model = Mlp::new(seed, 1);
                    bus.add_listener(
                        0,
                        Worker {
                            name: name.clone(),
                            seed,
                            model,
                        },
                    );
                    say_ready(bus, root, &name, Role::Worker);
                });
                if let Err(e) = forked {
                    eprintln!("{shard}: cannot fork worker {w}: {e}");
                }
            }
            say_ready(bus, root, &shard, Role::Supervisor);
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The root

#[derive(Clone, Debug)]
struct Member {
    name: String,
    pid: u32,
    parent: u32,
    role: Role,
    alive: bool,
    replies: [u64; 2],
    switches: u32,
    lost: u64,
    sent: u64,
}

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Pending,
    Delivered,
    Replied,
    Lost(LossReason, u32),
    /// Delivered to a worker that died before its reply left.
    ReplyLost,
}

#[derive(Clone, Debug)]
struct Request {
    worker: usize,
    by_name: bool,
    traced: bool,
    after_switch: bool,
    sent_ns: u64,
    outcome: Outcome,
    latency_ns: u64,
    reply_trace: Vec<HopView>,
    request_trace: Vec<HopView>,
    version: u32,
}

#[derive(Debug, Default)]
struct Kill {
    worker: usize,
    after_req: u64,
    peer_lost: Vec<Wire>,
    exits: Vec<Wire>,
    probe: Option<u64>,
}

struct Root {
    args: Args,
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
    fn new(args: Args) -> Self {
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
            grace: None,
            phase_done: false,
            broadcast: None,
            broadcast_lost: Vec::new(),
        }
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
            .find(|m| m.pid == pid)
            .map_or_else(|| format!("pid {pid}"), |m| m.name.clone())
    }

    /// The next worker in turn; a dead worker gets exactly one more request (by name, after
    /// its route is gone: the root itself reports it lost, "no route").
    fn pick(&mut self, bus: &Bus) -> (usize, bool) {
        // The router may know before the application does (its events are still queued).
        for m in &mut self.members {
            m.alive &= bus.router().resolve(&to::pid(m.pid)).is_some();
        }
        if let Some(k) = &mut self.kill {
            let w = k.worker;
            if !self.members[w].alive && k.probe.is_none() {
                k.probe = Some(self.reqs.len() as u64);
                return (w, true);
            }
        }
        let n = self.workers.len();
        for _ in 0..n {
            let w = self.workers[self.rr % n];
            self.rr += 1;
            if self.members[w].alive {
                return (w, false);
            }
        }
        (self.workers[0], false)
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
            let (w, probe) = self.pick(bus);
            // By pid and by name in turn, for each worker.
            let by_name = probe || self.members[w].sent % 2 == 1;
            let m = &self.members[w];
            let addr = if by_name {
                to::name(m.name.clone())
            } else {
                to::pid(m.pid)
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
                    self.reqs.push(Request {
                        worker: w,
                        by_name,
                        traced,
                        after_switch: self.switch_at.is_some_and(|s| s <= i),
                        sent_ns,
                        outcome: Outcome::Pending,
                        latency_ns: 0,
                        reply_trace: Vec::new(),
                        request_trace: Vec::new(),
                        version: 0,
                    });
                }
                Err(SendError::QueueFull { .. }) => {
                    if probe {
                        if let Some(k) = &mut self.kill {
                            k.probe = None;
                        }
                    }
                    self.rr = self.rr.saturating_sub(1);
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
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.members[w].pid).unwrap_or(0));
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
            after_req,
            ..Kill::default()
        });
    }

    fn check_done(&mut self, bus: &mut Bus) {
        if self.phase_done || (self.reqs.len() as u64) < self.args.requests || self.outstanding > 0
        {
            return;
        }
        self.finished.get_or_insert_with(Instant::now);
        // Wait (3 s at most) for the supervisor's reports of the kill too.
        let reports_in = self
            .kill
            .as_ref()
            .is_none_or(|k| !k.peer_lost.is_empty() && !k.exits.is_empty());
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
            version,
            class,
            score,
            trace,
            ..
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
            Wire::Ready { name, role, parent } => {
                let pid = msg.origin().pid;
                st.members.push(Member {
                    name,
                    pid,
                    parent,
                    role,
                    alive: true,
                    replies: [0; 2],
                    switches: 0,
                    lost: 0,
                    sent: 0,
                });
                if st.members.len() == st.expected() {
                    bus.stop();
                }
            }
            Wire::Loaded { worker, .. } => {
                if let Some(m) = st.members.iter_mut().find(|m| m.name == worker) {
                    m.switches += 1;
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
                .push(format!("lost at {at}: {}", report.reason));
            return;
        }
        match st.by_seq.get(&report.id.seq).copied() {
            Some(req) => {
                st.finalize(req, Outcome::Lost(report.reason, report.at.pid));
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
        let Some(w) = st.members.iter().position(|m| m.pid == node.pid) else {
            return;
        };
        st.members[w].alive = false;
        // Taken by the worker (receipt in) but never answered: the reply died with it.
        // Replies it wrote before dying came first (links are FIFO), so none is coming.
        let orphaned: Vec<u64> = (0..st.reqs.len())
            .filter(|&i| st.reqs[i].worker == w && st.reqs[i].outcome == Outcome::Delivered)
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
// Printing

fn section(title: &str) {
    println!(
        "\n── {title} {}",
        "─".repeat(78usize.saturating_sub(title.len() + 4))
    );
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn target(st: &Root, r: &Request) -> String {
    let m = &st.members[r.worker];
    if r.by_name {
        format!("{} by name", m.name)
    } else {
        format!("{} by pid {}", m.name, m.pid)
    }
}

/// `#3 #9 #15 … #87 #93 (16)`: a few request numbers of a list.
fn ids(list: &[u64]) -> String {
    let fmt = |v: &[u64]| {
        v.iter()
            .map(|i| format!("#{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if list.len() <= 6 {
        fmt(list)
    } else {
        format!(
            "{} … {} ({} requests)",
            fmt(&list[..3]),
            fmt(&list[list.len() - 2..]),
            list.len()
        )
    }
}

fn print_loss_report(st: &Root) {
    section("3. loss report");
    let Some(k) = &st.kill else {
        println!("no worker was killed (--no-kill, or the kill point is past the last request)");
        return;
    };
    let victim = &st.members[k.worker];
    let parent = st.name_of(victim.parent);
    if st.args.hang_ms > 0 {
        println!(
            "{} (pid {}) hung right after request #{} (SIGSTOP: it reads and acknowledges nothing), \
             then SIGKILL {} ms later.",
            victim.name, victim.pid, k.after_req, st.args.hang_ms
        );
    } else {
        println!(
            "{} (pid {}) killed with SIGKILL right after request #{}.",
            victim.name, victim.pid, k.after_req
        );
    }
    if st.args.hang_ms > 0 {
        println!(
            "The root went on sending to it in turn (it cannot tell a hung worker from a slow \
             one) until its requests filled the window."
        );
    }
    for e in &k.exits {
        if let Wire::ChildExit { pid, status, .. } = e {
            println!("{parent}, its parent, reaped pid {pid}: {status}.");
        }
    }
    for p in &k.peer_lost {
        let Wire::PeerLost {
            peer, cause, lost, ..
        } = p
        else {
            continue;
        };
        let what = if lost.is_empty() {
            "an empty lost list (nothing was queued for it or written and unacknowledged)"
                .to_owned()
        } else {
            format!("its lost list: {} envelopes, whole", lost.len())
        };
        println!("{parent} saw its link to pid {peer} go down ({cause}) and handed over {what}.");
        let mut by: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        for l in lost {
            let key = format!("{} from {}", l.what, st.name_of(l.origin));
            by.entry((key, l.reason.clone())).or_default().extend(l.req);
        }
        for ((what, reason), list) in by {
            println!(
                "    {what}, {reason}{}{}",
                if list.is_empty() { "" } else { ": " },
                ids(&list)
            );
        }
    }
    if k.exits.is_empty() || k.peer_lost.is_empty() {
        println!("(the supervisor's reports did not all arrive within 3 s)");
    }
    // The supervisor's lost list and the root's receipts must name the same requests.
    let listed: BTreeSet<u64> = k
        .peer_lost
        .iter()
        .flat_map(|p| match p {
            Wire::PeerLost { lost, .. } => lost.iter().filter_map(|l| l.req).collect(),
            _ => Vec::new(),
        })
        .collect();
    let told: BTreeSet<u64> = (0..st.reqs.len() as u64)
        .filter(|&i| {
            matches!(st.reqs[i as usize].outcome,
                Outcome::Lost(LossReason::PeerDown(_), at) if at == victim.parent)
        })
        .collect();
    if listed == told && !listed.is_empty() {
        println!(
            "{parent}'s lost list and the root's loss reports \"at {parent}: peer down\" name the \
             same {} requests ✓",
            listed.len()
        );
    } else if listed != told {
        // "Written, not acknowledged" is an upper bound: the worker may have taken one and
        // answered before it died; the receipt then says delivered, and the reply arrives.
        let answered: Vec<u64> = listed
            .iter()
            .copied()
            .filter(|&i| st.reqs[i as usize].outcome == Outcome::Replied)
            .collect();
        println!(
            "{parent}'s lost list names {} requests, the root's reports \"at {parent}: peer \
             down\" {}; answered after all (taken before it died, unacknowledged): {}",
            listed.len(),
            told.len(),
            ids(&answered)
        );
    }
    println!(
        "At the root, exactly one outcome per request sent to {} (receipts):",
        victim.name
    );
    let mut by: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let first = st
        .reqs
        .iter()
        .position(|r| r.worker == k.worker && r.outcome != Outcome::Replied)
        .unwrap_or(st.reqs.len());
    for (i, r) in st.reqs.iter().enumerate().skip(first) {
        if r.worker != k.worker {
            continue;
        }
        let outcome = match &r.outcome {
            Outcome::Replied => format!("replied (model v{})", r.version),
            Outcome::Lost(reason, at) => format!("lost at {}: {reason}", st.name_of(*at)),
            Outcome::ReplyLost => "delivered, the reply died with the worker".to_owned(),
            other => format!("{other:?}"),
        };
        let probe = if k.probe == Some(i as u64) {
            " (sent by name after its route was withdrawn)"
        } else {
            ""
        };
        by.entry(format!("{outcome}{probe}"))
            .or_default()
            .push(i as u64);
    }
    for (outcome, list) in by {
        println!("    {outcome}: {}", ids(&list));
    }
}

fn print_traces(st: &Root) {
    section("4. routing traces");
    let traced: Vec<(usize, &Request)> = st
        .reqs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.traced)
        .collect();
    if traced.is_empty() {
        println!("no request was traced (--trace-every 0)");
        return;
    }
    println!(
        "every {}th request carries a trace: each hop records node, the link it came in on (that \
         node's link index) and the time (CLOCK_MONOTONIC, shared by the tree), shown in µs after \
         the send.",
        st.args.trace_every
    );
    for (i, r) in traced.into_iter().take(6) {
        let head = format!("request #{i} → {}", target(st, r));
        let Outcome::Replied = r.outcome else {
            println!(
                "{head}: {:?} — a lost envelope brings no trace back",
                r.outcome
            );
            continue;
        };
        println!(
            "{head}: model v{}, round trip {} µs",
            r.version,
            us(r.latency_ns)
        );
        let t0 = r.request_trace.first().map_or(r.sent_ns, |h| h.at_ns);
        let legs = [("request", &r.request_trace), ("reply", &r.reply_trace)];
        for (leg, trace) in legs {
            for (n, h) in trace.iter().enumerate() {
                let how = match (n, h.link) {
                    (0, _) => format!("{leg} leaves"),
                    (_, Some(l)) => format!("in on link #{l}"),
                    (_, None) => "in".to_owned(),
                };
                println!(
                    "    {:>9} µs  {:<12} pid {:<7} {how}",
                    format!("+{}", us(h.at_ns.saturating_sub(t0))),
                    st.name_of(h.pid),
                    h.pid
                );
            }
        }
    }
}

fn tree_picture(st: &Root) -> String {
    let mut out = String::new();
    let root_pid = std::process::id();
    let _ = writeln!(out, "root  pid {root_pid}");
    let shards: Vec<&Member> = st
        .members
        .iter()
        .filter(|m| m.role == Role::Supervisor)
        .collect();
    for (si, s) in shards.iter().enumerate() {
        let last_s = si + 1 == shards.len();
        let _ = writeln!(
            out,
            "{} {}  pid {}  supervisor",
            if last_s { "└─" } else { "├─" },
            s.name,
            s.pid
        );
        let workers: Vec<&Member> = st
            .members
            .iter()
            .filter(|m| m.role == Role::Worker && m.parent == s.pid)
            .collect();
        for (wi, w) in workers.iter().enumerate() {
            let branch = if wi + 1 == workers.len() {
                "└─"
            } else {
                "├─"
            };
            let state = if w.alive {
                format!("model v{}", 1 + w.switches)
            } else {
                "✗ killed".to_owned()
            };
            let lost = if w.lost > 0 {
                format!(", lost {}", w.lost)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{}{branch} {:<10} pid {:<7} {:<9} replies {:>4} (v1 {:>4}, v2 {:>4}){lost}",
                if last_s { "   " } else { "│  " },
                w.name,
                w.pid,
                state,
                w.replies[0] + w.replies[1],
                w.replies[0],
                w.replies[1]
            );
        }
    }
    out
}

/// Prints the summary; returns whether every check held.
fn print_summary(st: &Root, tree_up: Duration) -> bool {
    section("5. summary");
    let sent = st.reqs.len() as u64;
    let replied = st
        .reqs
        .iter()
        .filter(|r| r.outcome == Outcome::Replied)
        .count() as u64;
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for r in &st.reqs {
        match &r.outcome {
            Outcome::Lost(reason, _) => *by_reason.entry(reason.to_string()).or_default() += 1,
            Outcome::ReplyLost => {
                *by_reason
                    .entry("reply died with the worker".into())
                    .or_default() += 1
            }
            _ => {}
        }
    }
    let lost: u64 = by_reason.values().sum();
    let by_name = st.reqs.iter().filter(|r| r.by_name).count();
    let v2 = st
        .reqs
        .iter()
        .filter(|r| r.outcome == Outcome::Replied && r.version == 2)
        .count();
    let mut lat: Vec<u64> = st
        .reqs
        .iter()
        .filter(|r| r.outcome == Outcome::Replied)
        .map(|r| r.latency_ns)
        .collect();
    lat.sort_unstable();
    let balanced = sent == replied + lost;
    let live_workers: Vec<&Member> = st
        .members
        .iter()
        .filter(|m| m.role == Role::Worker && m.alive)
        .collect();
    let switched_once = live_workers.iter().filter(|m| m.switches == 1).count();
    let switch_ok = st.switch_at.is_none() || switched_once == live_workers.len();
    let secs = match (st.started, st.finished) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    println!(
        "requests   {sent} sent ({} by pid, {by_name} by name), at most {} in flight, each with a receipt",
        sent - by_name as u64,
        st.args.window
    );
    println!(
        "replies    {replied} (model v1 {}, v2 {v2}); version as expected {}/{replied}; \
         checked against the root's copy of the model {}/{replied}",
        replied - v2 as u64,
        replied - st.wrong_version,
        st.checked
    );
    let reasons: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    println!(
        "lost       {lost}{}",
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" — {}", reasons.join(", "))
        }
    );
    println!(
        "balance    sent {sent} = replied {replied} + lost {lost}  {}",
        if balanced {
            "✓"
        } else {
            "✗ DOES NOT BALANCE"
        }
    );
    println!(
        "latency    send → reply: p50 {} µs, p99 {} µs, max {} µs{}",
        us(percentile(&lat, 50.0)),
        us(percentile(&lat, 99.0)),
        us(lat.last().copied().unwrap_or(0)),
        if st.args.window > 1 {
            format!(
                " ({} in flight: mostly queueing; --window 1 shows a bare round trip)",
                st.args.window
            )
        } else {
            String::new()
        }
    );
    match st.switch_at {
        Some(at) if at != u64::MAX => println!(
            "switch     \"load model version 2\" broadcast once, before request #{at}; \
             {switched_once}/{} live workers switched, each exactly once{}",
            live_workers.len(),
            if st.broadcast_lost.is_empty() {
                String::new()
            } else {
                format!(" (the broadcast was {})", st.broadcast_lost.join(", "))
            }
        ),
        _ => println!("switch     no broadcast"),
    }
    println!(
        "time       tree up in {:.1} ms; {sent} requests in {secs:.3} s ({:.0}/s)",
        tree_up.as_secs_f64() * 1e3,
        sent as f64 / secs.max(1e-9)
    );
    println!();
    print!("{}", tree_picture(st));
    for a in &st.anomalies {
        println!("anomaly: {a}");
    }
    let ok = balanced
        && st.wrong_version == 0
        && st.wrong_model == 0
        && switch_ok
        && st.refused == 0
        && st.anomalies.is_empty();
    if !ok {
        println!(
            "CHECKS FAILED: balanced {balanced}, wrong versions {}, wrong answers {}, \
             switches ok {switch_ok}, refused {}",
            st.wrong_version, st.wrong_model, st.refused
        );
    }
    ok
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
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut config = BusConfig::default();
    config.name = Some("root".into());
    // Every receipt resolves within this, whatever happens to the tree.
    config.router.receipt_timeout = Some(Duration::from_secs(5));
    let mut bus = Bus::root(config)?;
    let state = Rc::new(RefCell::new(Root::new(args.clone())));
    bus.add_listener(0, RootListener(state.clone()));
    // Whatever happens, the run ends: the loop is stopped after this.
    let timed_out = Rc::new(std::cell::Cell::new(false));
    let flag = timed_out.clone();
    let watchdog = bus.add_timer(Duration::from_secs(60), move |bus| {
        flag.set(true);
        bus.stop();
    });

    section("1. the tree");
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
        println!(
            "{} processes up in {:.1} ms: root, {} shard supervisors, {} workers each.",
            1 + st.members.len(),
            tree_up.as_secs_f64() * 1e3,
            args.shards,
            args.workers
        );
        println!(
            "Each worker built model v1 in memory: an MLP {} ({} weights, seed {}).",
            SHAPE.map(|n| n.to_string()).join("→"),
            st.models[0].n_weights(),
            args.seed
        );
    }

    section("2. requests");
    state.borrow_mut().started = Some(Instant::now());
    state.borrow_mut().pump(&mut bus);
    bus.run()?;
    {
        let st = state.borrow();
        println!(
            "{} requests sent to {} workers (by pid and by name, in turn), each with a receipt.",
            st.reqs.len(),
            st.workers.len()
        );
        if let Some(at) = st.switch_at {
            println!("\"load model version 2\" broadcast to the whole tree before request #{at}.");
        }
        if timed_out.get() {
            println!("TIMED OUT with {} requests outstanding", st.outstanding);
        }
    }
    let ok = {
        let st = state.borrow();
        print_loss_report(&st);
        print_traces(&st);
        print_summary(&st, tree_up) && !timed_out.get()
    };

    bus.cancel_timer(watchdog);
    if let Some(t) = state.borrow_mut().grace.take() {
        bus.cancel_timer(t);
    }
    bus.shutdown_tree();
    match bus.run()? {
        Stop::Shutdown(tally) => println!(
            "\nshut down: {} processes drained and exited (the killed worker was reaped by its \
             supervisor); {} left unreported.",
            tally.processes, tally.unreported
        ),
        other => println!("\nshutdown ended with {other:?}"),
    }
    if !bus.children().is_empty() {
        println!("children left: {:?}", bus.children());
    }
    drop(bus);
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
