//! Hostile peers, as real processes: a tree node that breaks the router's rules costs its
//! own link, never the tree.
//!
//! In every scenario the root forks one honest worker (named `"worker"`) and starts the
//! hostile node with `Bus::exec_node`: the `forkbus-external-node` binary in its
//! `--hostile` mode, which runs no bus but writes raw frames on the inherited link
//! (`src/bin/external-node/hostile.rs`). Throughout every attack the root pings the worker
//! (with receipts, by pid and by name) and the worker pings the root; every ping must be
//! answered within [`PING_BOUND`]. The root's and the worker's memory must grow by at most
//! a bound given per attack; the hostile link must close with the right cause, reported
//! once (one peer shutdown, one protocol error when it is one, one child exit); no forged
//! message may reach an application as another node's; routes and names stay where they
//! were; and the hostile process is killed and reaped, with `ps` showing nothing left.
//!
//! 1. forged origins, notices and announcements → `RouteConflict` / `UnknownOrigin`;
//! 2. announcements past the bounds (4000 names × 20 frames, names per node, `max_nodes`,
//!    `max_names`) → closed at the first frame over;
//! 3. a flood of 200 000 broadcasts from ever new origins of its own subtree → legal at an
//!    honest pace (the tree keeps serving, the seen table stays bounded, every copy reaches
//!    the worker); unpaced, ignoring the acknowledgement window → `WindowExceeded`;
//! 4. a frame never completed, and a peer that never reads → `Stalled` after the timeout,
//!    sends refused (`QueueFull`) until then;
//! 5. a peer that reads but never acknowledges the loss notices it is owed → `Overrun`
//!    once they pass the bound of output it does not take.
//!
//! `harness = false`: every scenario runs in a forked root of its own under a deadline
//! (`tests/common/mod.rs`).

mod common;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{ensure, nix_pid, proc_state, rss_kib, run_until, Harness};
use forkbus::error::{BusError, SendError};
use forkbus::exec::{Command, Output};
use forkbus::router::{DownCause, RouterConfig};
use forkbus::router::{LinkId, ProtocolError};
use forkbus::{
    to, Address, Bus, BusConfig, ExitStatus, Fate, ForkOptions, Listener, LossReason, LossReport,
    Message, MessageId, NodeId, PeerShutdown, Pid, Relation, SendOptions, Stop, UnknownReason,
};
use nix::sys::signal::{kill, Signal};
use serde::{Deserialize, Serialize};

const NODE_EXE: &str = env!("CARGO_BIN_EXE_forkbus-external-node");
/// Every ping is answered within this (generous: a debug build on two shared cores).
const PING_BOUND: Duration = Duration::from_secs(2);
/// How often each side pings.
const PING_EVERY: Duration = Duration::from_millis(25);
/// How long any one wait inside a scenario may take.
const WAIT: Duration = Duration::from_secs(20);
/// The deadline of a scenario.
const DEADLINE: Duration = Duration::from_secs(60);
/// Pids of the hostile node's fake nodes start here (as in `hostile.rs`).
const FAKE_PID_BASE: u32 = 0x4000_0000;
/// What the hostile node floods (CBOR text strings).
const FLOOD: &[u8] = b"\x65flood";
const FLOOD_DONE: &[u8] = b"\x6aflood-done";

/// The test's own messages between the root and the worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    Ping(u64),
    Pong(u64),
    /// Not answered: an envelope whose receipt the test watches.
    Probe,
    /// Asks for a [`Status`], resolving these names.
    Report(Vec<String>),
    Status(Status),
}

/// What the worker saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Status {
    /// Messages it did not expect (origin pid, text): a forgery that got through.
    unexpected: Vec<(u32, String)>,
    flood: u64,
    /// Flood envelopes whose origin was not a fake node of the hostile's subtree.
    flood_bad_origin: u64,
    flood_done: bool,
    routes: usize,
    seen_origins: usize,
    /// The most origins its seen table held, at a tick of its pinger.
    max_seen: usize,
    resolved: Vec<(String, Option<u32>)>,
    rss_kib: u64,
    rss_max_kib: u64,
    /// Its pings to the root: sent, answered, the slowest answer, the oldest unanswered.
    pings: u64,
    pongs: u64,
    max_rtt_ms: u64,
    oldest_unanswered_ms: u64,
    errors: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// The worker

#[derive(Default)]
struct WorkerState {
    status: Status,
    sent: BTreeMap<u64, Instant>,
    next: u64,
}

struct Worker(Rc<RefCell<WorkerState>>);

impl Listener for Worker {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let mut guard = self.0.borrow_mut();
        let st = &mut *guard;
        if msg.payload() == FLOOD {
            st.status.flood += 1;
            if msg.origin().pid < FAKE_PID_BASE {
                st.status.flood_bad_origin += 1;
            }
            return;
        }
        if msg.payload() == FLOOD_DONE {
            st.status.flood_done = true;
            return;
        }
        match msg.decode::<Wire>() {
            Ok(Wire::Ping(k)) => {
                if let Err(e) = bus.send(msg.origin(), &Wire::Pong(k)) {
                    st.status.errors.push(format!("pong {k}: {e}"));
                }
            }
            Ok(Wire::Pong(k)) => {
                if let Some(at) = st.sent.remove(&k) {
                    st.status.pongs += 1;
                    let ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
                    st.status.max_rtt_ms = st.status.max_rtt_ms.max(ms);
                }
            }
            Ok(Wire::Probe) => {}
            Ok(Wire::Report(names)) => {
                let rss = rss_kib();
                let s = &mut st.status;
                s.routes = bus.router().routes().len();
                s.seen_origins = bus.router().seen_origins();
                s.rss_kib = rss;
                s.rss_max_kib = s.rss_max_kib.max(rss);
                s.resolved = names
                    .iter()
                    .map(|n| {
                        let holder = bus.router().resolve(&to::name(n.as_str()));
                        (n.clone(), holder.map(|h| h.pid))
                    })
                    .collect();
                s.oldest_unanswered_ms = st.sent.values().next().map_or(0, |at| {
                    u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)
                });
                let reply = Wire::Status(st.status.clone());
                if let Err(e) = bus.send(msg.origin(), &reply) {
                    st.status.errors.push(format!("status: {e}"));
                }
            }
            Ok(other) => st
                .status
                .unexpected
                .push((msg.origin().pid, format!("{other:?}"))),
            Err(_) => {
                let text = msg
                    .decode::<String>()
                    .unwrap_or_else(|_| format!("{:02x?}", msg.payload()));
                st.status.unexpected.push((msg.origin().pid, text));
            }
        }
    }

    fn on_router_error(&mut self, _bus: &mut Bus, error: &BusError) {
        self.0.borrow_mut().status.errors.push(error.to_string());
    }
}

/// The worker pings the root every [`PING_EVERY`] and samples its memory.
fn worker_pinger(bus: &mut Bus, st: Rc<RefCell<WorkerState>>) {
    bus.add_timer(PING_EVERY, move |bus| {
        {
            let mut s = st.borrow_mut();
            let rss = rss_kib();
            s.status.rss_max_kib = s.status.rss_max_kib.max(rss);
            s.status.max_seen = s.status.max_seen.max(bus.router().seen_origins());
            if let Some(parent) = bus.parent() {
                // Sends fail only while the tree shuts down (or the queue is full: the
                // ping then counts as unanswered from now on, and the next one follows).
                let k = s.next;
                s.next += 1;
                s.status.pings += 1;
                s.sent.insert(k, Instant::now());
                if let Err(e) = bus.send(parent, &Wire::Ping(k)) {
                    if !matches!(e, SendError::ShuttingDown) {
                        s.status.errors.push(format!("ping {k}: {e}"));
                    }
                    s.sent.remove(&k);
                    s.status.pings -= 1;
                }
            }
        }
        if !bus.is_stopping() {
            worker_pinger(bus, st);
        }
    });
}

fn worker_main(bus: &mut Bus) {
    let st: Rc<RefCell<WorkerState>> = Rc::default();
    bus.add_listener(0, Worker(st.clone()));
    worker_pinger(bus, st);
}

// ---------------------------------------------------------------------------------------
// The root

/// A peer shutdown as the root saw it: the lost list without payloads (this test keeps
/// every record, and must not hold on to the very memory it measures).
#[derive(Clone, Debug)]
struct Down {
    peer: Option<NodeId>,
    relation: Relation,
    cause: DownCause,
    lost: Vec<(MessageId, Fate)>,
}

/// One ping from the root to the worker.
#[derive(Debug)]
struct PingState {
    start: Instant,
    id: Option<MessageId>,
    delivered: bool,
    pong: bool,
}

#[derive(Debug, Default)]
struct Log {
    pinging: bool,
    alive: bool,
    next_ping: u64,
    pings: BTreeMap<u64, PingState>,
    ping_ids: BTreeMap<MessageId, u64>,
    answered: u64,
    max_rtt: Duration,
    /// Pings the root's queue towards the worker refused (sent again on the next tick).
    ping_refused: u64,
    /// Answers to the worker's pings waiting for room.
    pongs_due: Vec<(NodeId, u64)>,
    delivered: Vec<MessageId>,
    lost: Vec<LossReport>,
    /// Messages from anyone but the worker's test traffic and the flood.
    unexpected: Vec<(NodeId, String)>,
    flood: u64,
    flood_bad_origin: u64,
    flood_done: bool,
    status: Option<Status>,
    peers_up: Vec<(Instant, NodeId)>,
    shutdowns: Vec<(Instant, Down)>,
    protocol: Vec<(Option<NodeId>, ProtocolError)>,
    /// Links closed because their peer did not read (`BusError::Overrun`), by peer.
    overruns: Vec<Option<NodeId>>,
    errors: Vec<String>,
    exits: Vec<(Pid, ExitStatus)>,
    rss_max: u64,
    last_tick: Option<Instant>,
    max_tick_gap: Duration,
    /// The most bytes any link had waiting to be written, at a tick.
    max_pending_output: usize,
    /// The most origins the root's seen table held, at a tick.
    max_seen: usize,
    worker: Option<NodeId>,
}

impl Log {
    fn settle_ping(&mut self, k: u64) {
        if let Some(p) = self.pings.get(&k) {
            if p.delivered && p.pong {
                self.max_rtt = self.max_rtt.max(p.start.elapsed());
                self.answered += 1;
                if let Some(id) = p.id {
                    self.ping_ids.remove(&id);
                }
                self.pings.remove(&k);
            }
        }
    }
}

struct Ear(Rc<RefCell<Log>>);

impl Listener for Ear {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let mut log = self.0.borrow_mut();
        if msg.payload() == FLOOD {
            log.flood += 1;
            if msg.origin().pid < FAKE_PID_BASE {
                log.flood_bad_origin += 1;
            }
            return;
        }
        if msg.payload() == FLOOD_DONE {
            log.flood_done = true;
            return;
        }
        let from_worker = Some(msg.origin()) == log.worker;
        match msg.decode::<Wire>() {
            Ok(Wire::Pong(k)) if from_worker => {
                if let Some(p) = log.pings.get_mut(&k) {
                    p.pong = true;
                }
                log.settle_ping(k);
            }
            Ok(Wire::Ping(k)) if from_worker => {
                if bus.send(msg.origin(), &Wire::Pong(k)).is_err() {
                    log.pongs_due.push((msg.origin(), k));
                }
            }
            Ok(Wire::Status(s)) if from_worker => log.status = Some(s),
            other => {
                let text = match other {
                    Ok(w) => format!("{w:?}"),
                    Err(_) => msg
                        .decode::<String>()
                        .unwrap_or_else(|_| format!("{:02x?}", msg.payload())),
                };
                log.unexpected.push((msg.origin(), text));
            }
        }
    }

    fn on_delivered(&mut self, _bus: &mut Bus, id: MessageId) {
        let mut log = self.0.borrow_mut();
        log.delivered.push(id);
        if let Some(k) = log.ping_ids.get(&id).copied() {
            if let Some(p) = log.pings.get_mut(&k) {
                p.delivered = true;
            }
            log.settle_ping(k);
        }
    }

    fn on_lost(&mut self, _bus: &mut Bus, report: &LossReport) {
        let mut r = report.clone();
        r.payload = None;
        self.0.borrow_mut().lost.push(r);
    }

    fn on_peer_up(&mut self, _bus: &mut Bus, peer: NodeId) {
        self.0.borrow_mut().peers_up.push((Instant::now(), peer));
    }

    fn on_peer_shutdown(&mut self, _bus: &mut Bus, shutdown: &PeerShutdown) {
        let down = Down {
            peer: shutdown.peer,
            relation: shutdown.relation,
            cause: shutdown.cause.clone(),
            lost: shutdown
                .lost
                .iter()
                .map(|x| (x.envelope.id, x.fate))
                .collect(),
        };
        self.0.borrow_mut().shutdowns.push((Instant::now(), down));
    }

    fn on_router_error(&mut self, _bus: &mut Bus, error: &BusError) {
        let mut log = self.0.borrow_mut();
        match error {
            BusError::Protocol { peer, error, .. } => log.protocol.push((*peer, error.clone())),
            BusError::Overrun { peer } => log.overruns.push(*peer),
            other => log.errors.push(other.to_string()),
        }
    }

    fn on_child_exit(&mut self, _bus: &mut Bus, pid: Pid, status: ExitStatus) {
        self.0.borrow_mut().exits.push((pid, status));
    }
}

/// The root pings the worker every [`PING_EVERY`] (receipts; by pid and by name in turn),
/// answers the worker's pings that waited for room, and samples its memory and how late
/// its timer fires.
fn root_pinger(bus: &mut Bus, log: Rc<RefCell<Log>>, worker: Pid) {
    bus.add_timer(PING_EVERY, move |bus| {
        {
            let mut l = log.borrow_mut();
            if !l.alive {
                return;
            }
            let now = Instant::now();
            if let Some(last) = l.last_tick {
                l.max_tick_gap = l.max_tick_gap.max(now - last);
            }
            l.last_tick = Some(now);
            l.rss_max = l.rss_max.max(rss_kib());
            l.max_seen = l.max_seen.max(bus.router().seen_origins());
            for link in bus.router().links() {
                if let Ok(s) = bus.router().link_stats(link) {
                    l.max_pending_output = l.max_pending_output.max(s.pending_output);
                }
            }
            let due = std::mem::take(&mut l.pongs_due);
            for (to, k) in due {
                if bus.send(to, &Wire::Pong(k)).is_err() {
                    l.pongs_due.push((to, k));
                }
            }
            // The ping refused last time goes first; a new one only when none waits.
            let waiting = l
                .pings
                .iter()
                .find(|(_, p)| p.id.is_none())
                .map(|(k, _)| *k);
            let k = match waiting {
                Some(k) => Some(k),
                None if l.pinging => {
                    let k = l.next_ping;
                    l.next_ping += 1;
                    l.pings.insert(
                        k,
                        PingState {
                            start: now,
                            id: None,
                            delivered: false,
                            pong: false,
                        },
                    );
                    Some(k)
                }
                None => None,
            };
            if let Some(k) = k {
                let to: Address = if k % 2 == 0 {
                    worker.into()
                } else {
                    to::name("worker")
                };
                let receipt = SendOptions {
                    receipt: true,
                    ..SendOptions::default()
                };
                match bus.send_with(to, &Wire::Ping(k), receipt) {
                    Ok(id) => {
                        if let Some(p) = l.pings.get_mut(&k) {
                            p.id = Some(id);
                        }
                        l.ping_ids.insert(id, k);
                    }
                    Err(SendError::QueueFull { .. }) => l.ping_refused += 1,
                    Err(e) => {
                        l.errors.push(format!("ping {k}: {e}"));
                        l.pings.remove(&k);
                    }
                }
            }
        }
        root_pinger(bus, log, worker);
    });
}

/// A root, its worker and the pings between them.
struct Tree {
    bus: Bus,
    log: Rc<RefCell<Log>>,
    worker: Pid,
    worker_node: NodeId,
    worker_link: LinkId,
    /// The worker's status when the tree came up (its memory's baseline).
    base: Status,
    /// The hostile processes started, for the final checks.
    hostiles: Vec<Pid>,
}

/// A hostile node started by the root.
#[derive(Clone, Copy, Debug)]
struct Hostile {
    pid: Pid,
    node: NodeId,
    /// The root's memory before it started.
    rss_before: u64,
    /// The tally's unreported count before it started.
    unreported_before: u64,
}

impl Tree {
    fn new(config: BusConfig) -> Result<Self, String> {
        let mut bus = Bus::root(config).map_err(|e| e.to_string())?;
        let log: Rc<RefCell<Log>> = Rc::default();
        bus.add_listener(0, Ear(log.clone()));
        let worker = bus
            .fork(ForkOptions::named("worker"), worker_main)
            .map_err(|e| e.to_string())?;
        let worker_node = bus.child_node(worker).ok_or("no node for the worker")?;
        let worker_link = route_of(&bus, worker_node).ok_or("no route to the worker")?;
        {
            let mut l = log.borrow_mut();
            l.worker = Some(worker_node);
            l.pinging = true;
            l.alive = true;
        }
        root_pinger(&mut bus, log.clone(), worker);
        let mut tree = Self {
            bus,
            log,
            worker,
            worker_node,
            worker_link,
            base: Status::default(),
            hostiles: Vec::new(),
        };
        // Up: pings answered both ways.
        let l = tree.log.clone();
        run_until(&mut tree.bus, WAIT, move |_| l.borrow().answered >= 2)?;
        tree.base = tree.status(&[])?;
        ensure(tree.base.pongs >= 1, || {
            format!("the worker's pings are not answered: {:?}", tree.base)
        })?;
        Ok(tree)
    }

    fn run_for(&mut self, d: Duration) -> Result<(), String> {
        let start = Instant::now();
        run_until(&mut self.bus, d + WAIT, move |_| start.elapsed() >= d)
    }

    /// Asks the worker for its status (sent again while the queue towards it is full).
    fn status(&mut self, names: &[&str]) -> Result<Status, String> {
        self.log.borrow_mut().status = None;
        let msg = Wire::Report(names.iter().map(|n| (*n).to_owned()).collect());
        let worker = self.worker;
        let failed: Rc<RefCell<Option<String>>> = Rc::default();
        let f = failed.clone();
        run_until(&mut self.bus, WAIT, move |bus| {
            match bus.send(worker, &msg) {
                Ok(_) => true,
                Err(SendError::QueueFull { .. }) => false,
                Err(e) => {
                    *f.borrow_mut() = Some(e.to_string());
                    true
                }
            }
        })?;
        if let Some(e) = failed.borrow_mut().take() {
            return Err(format!("cannot ask the worker: {e}"));
        }
        let l = self.log.clone();
        run_until(&mut self.bus, WAIT, move |_| l.borrow().status.is_some())?;
        self.log
            .borrow_mut()
            .status
            .take()
            .ok_or_else(|| "no status".to_string())
    }

    /// Starts the hostile node `kind` with its arguments; waits for its hello.
    fn hostile(&mut self, kind: &str, args: &[String]) -> Result<Hostile, String> {
        let command = Command::new(NODE_EXE)
            .arg("--hostile")
            .arg(kind)
            .args(args)
            .stdout(Output::Inherit)
            .stderr(Output::Inherit);
        let rss_before = self.log.borrow().rss_max.max(rss_kib());
        let unreported_before = self.bus.tally().unreported;
        let pid = self
            .bus
            .exec_node(&command)
            .map_err(|e| format!("exec_node {kind}: {e}"))?;
        self.hostiles.push(pid);
        let node = self.bus.child_node(pid).ok_or("no node for the hostile")?;
        let l = self.log.clone();
        run_until(&mut self.bus, WAIT, move |_| {
            let l = l.borrow();
            l.peers_up.iter().any(|(_, p)| *p == node)
                || l.shutdowns.iter().any(|(_, s)| s.peer == Some(node))
        })
        .map_err(|e| format!("the hostile {kind} node never said hello: {e}"))?;
        self.log.borrow_mut().rss_max = rss_kib();
        Ok(Hostile {
            pid,
            node,
            rss_before,
            unreported_before,
        })
    }

    /// Waits for the hostile's link to go down; returns when and how.
    fn wait_down(&mut self, h: Hostile) -> Result<(Instant, Down), String> {
        let l = self.log.clone();
        run_until(&mut self.bus, WAIT, move |_| {
            l.borrow()
                .shutdowns
                .iter()
                .any(|(_, s)| s.relation == Relation::Child(h.pid))
        })
        .map_err(|e| format!("the hostile link did not go down: {e}"))?;
        let l = self.log.borrow();
        l.shutdowns
            .iter()
            .find(|(_, s)| s.relation == Relation::Child(h.pid))
            .cloned()
            .ok_or_else(|| "no shutdown".into())
    }

    /// Waits for the hostile's link to close as the protocol violation `expected`, reported
    /// once, while the hostile process is still alive.
    fn expect_violation(&mut self, h: Hostile, expected: &ProtocolError) -> Result<(), String> {
        let (_, down) = self.wait_down(h)?;
        ensure(
            matches!(&down.cause, DownCause::Protocol(e) if e == expected)
                && down.peer == Some(h.node),
            || format!("the hostile link went down with {down:?}, not {expected:?}"),
        )?;
        ensure(alive(h.pid), || {
            "the hostile process died: the link was not closed by the root".into()
        })?;
        // A moment more: the violation is reported once.
        self.run_for(Duration::from_millis(20))?;
        let l = self.log.borrow();
        let errors: Vec<&ProtocolError> = l
            .protocol
            .iter()
            .filter(|(p, _)| *p == Some(h.node))
            .map(|(_, e)| e)
            .collect();
        ensure(errors == [expected], || {
            format!("protocol errors for the hostile: {errors:?}")
        })
    }

    /// Kills the hostile process and waits for its reaping: one child exit (SIGKILL), one
    /// peer shutdown in all, nothing of it left (`ps`), its nodes gone from the table.
    /// Returns how many nodes the tree counts unreported for it.
    fn kill(&mut self, h: Hostile) -> Result<u64, String> {
        kill(nix_pid(h.pid), Signal::SIGKILL).map_err(|e| e.to_string())?;
        let l = self.log.clone();
        run_until(&mut self.bus, WAIT, move |_| {
            l.borrow().exits.iter().any(|(p, _)| *p == h.pid)
        })
        .map_err(|e| format!("the hostile was not reaped: {e}"))?;
        // A moment more: nothing is reported twice.
        self.run_for(Duration::from_millis(50))?;
        {
            let l = self.log.borrow();
            let exits: Vec<ExitStatus> = l
                .exits
                .iter()
                .filter(|(p, _)| *p == h.pid)
                .map(|(_, s)| *s)
                .collect();
            ensure(exits == [ExitStatus::Signal(9)], || {
                format!("hostile exits: {exits:?}")
            })?;
            let downs = l
                .shutdowns
                .iter()
                .filter(|(_, s)| s.relation == Relation::Child(h.pid))
                .count();
            ensure(downs == 1, || {
                format!("{downs} peer shutdowns for the hostile")
            })?;
        }
        ensure(proc_state(h.pid.as_raw()).is_none(), || {
            format!("the hostile process {} is still there", h.pid)
        })?;
        let left = ps_children(self.bus.pid().as_raw())?;
        ensure(left == BTreeSet::from([self.worker.as_raw()]), || {
            format!("ps shows the root's children {left:?}, not only the worker")
        })?;
        let routes = self.bus.router().routes();
        ensure(routes == [(self.worker_node, self.worker_link)], || {
            format!("the root's routes after the hostile left: {routes:?}")
        })?;
        Ok(self.bus.tally().unreported - h.unreported_before)
    }

    /// Checks the root's memory grew by at most `bound_kib` since before `h` started.
    fn check_rss(&self, h: Hostile, bound_kib: u64, what: &str) -> Result<u64, String> {
        let peak = self.log.borrow().rss_max.max(rss_kib());
        let grown = peak.saturating_sub(h.rss_before);
        println!("  {what}: the root's memory grew {grown} KiB (bound {bound_kib} KiB)");
        ensure(grown <= bound_kib, || {
            format!("{what}: the root's memory grew {grown} KiB, over {bound_kib} KiB")
        })?;
        Ok(grown)
    }

    /// Stops pinging and checks every ping both ways: answered, within the bound, none lost.
    fn check_pings(&mut self) -> Result<Status, String> {
        self.log.borrow_mut().pinging = false;
        let l = self.log.clone();
        run_until(&mut self.bus, WAIT, move |_| l.borrow().pings.is_empty())
            .map_err(|e| format!("pings unanswered: {e}: {:?}", self.log.borrow().pings))?;
        let status = self.status(&[])?;
        let l = self.log.borrow();
        println!(
            "  pings: root → worker {} answered (slowest {:?}, {} refused for a full queue), \
             worker → root {} of {} (slowest {} ms); the root's timer was late by {:?} at most",
            l.answered,
            l.max_rtt,
            l.ping_refused,
            status.pongs,
            status.pings,
            status.max_rtt_ms,
            l.max_tick_gap.saturating_sub(PING_EVERY)
        );
        ensure(l.max_rtt <= PING_BOUND, || {
            format!("a ping to the worker took {:?}", l.max_rtt)
        })?;
        let worker_rtt = Duration::from_millis(status.max_rtt_ms);
        let worker_wait = Duration::from_millis(status.oldest_unanswered_ms);
        ensure(
            worker_rtt <= PING_BOUND && worker_wait <= PING_BOUND,
            || {
                format!(
                "the worker's pings to the root: slowest {worker_rtt:?}, one unanswered for {worker_wait:?}"
            )
            },
        )?;
        ensure(l.max_tick_gap <= PING_BOUND, || {
            format!("the root's timer fired {:?} apart", l.max_tick_gap)
        })?;
        ensure(status.pongs + 2 >= status.pings, || {
            format!(
                "the worker sent {} pings, {} were answered",
                status.pings, status.pongs
            )
        })?;
        let ping_losses: Vec<&LossReport> = l
            .lost
            .iter()
            .filter(|r| l.ping_ids.contains_key(&r.id) || bound_to(r, self.worker_node))
            .collect();
        ensure(ping_losses.is_empty(), || {
            format!("pings lost: {ping_losses:?}")
        })?;
        Ok(status)
    }

    /// The end of a scenario: no forgery reached either application, the worker saw no
    /// error and kept its name, the pings held, the worker's memory stayed within
    /// `worker_bound_kib`; then a graceful shutdown in which only the killed hostiles are
    /// unreported, and nothing left behind.
    fn finish(mut self, worker_bound_kib: u64) -> Result<(), String> {
        let status = self.check_pings()?;
        {
            let l = self.log.borrow();
            ensure(l.unexpected.is_empty(), || {
                format!("the root heard {:?}", l.unexpected)
            })?;
            ensure(l.errors.is_empty(), || {
                format!("the root's errors: {:?}", l.errors)
            })?;
        }
        ensure(
            status.unexpected.is_empty() && status.errors.is_empty(),
            || {
                format!(
                    "the worker heard {:?}, errors {:?}",
                    status.unexpected, status.errors
                )
            },
        )?;
        let grown = status.rss_max_kib.saturating_sub(self.base.rss_kib);
        println!("  the worker's memory grew {grown} KiB (bound {worker_bound_kib} KiB)");
        ensure(grown <= worker_bound_kib, || {
            format!("the worker's memory grew {grown} KiB, over {worker_bound_kib} KiB")
        })?;
        let by_pid = self
            .bus
            .router()
            .resolve(&Address::Pid(self.worker.as_raw()));
        let by_name = self.bus.router().resolve(&to::name("worker"));
        ensure(
            by_pid == Some(self.worker_node) && by_name == Some(self.worker_node),
            || format!("the worker resolves by pid to {by_pid:?}, by name to {by_name:?}"),
        )?;
        let unreported = self.bus.tally().unreported;
        ensure(unreported >= self.hostiles.len() as u64, || {
            format!(
                "{unreported} unreported for {} killed hostiles",
                self.hostiles.len()
            )
        })?;
        self.log.borrow_mut().alive = false;
        self.bus.shutdown_tree();
        match self.bus.run().map_err(|e| e.to_string())? {
            Stop::Shutdown(t) => ensure(
                t.unreported == unreported && t.processes == 2 && self.bus.children().is_empty(),
                || {
                    format!(
                        "shutdown tally {t:?} ({unreported} unreported before), children left {:?}",
                        self.bus.children()
                    )
                },
            )?,
            other => return Err(format!("shutdown ended with {other:?}")),
        }
        let left = ps_children(self.bus.pid().as_raw())?;
        ensure(left.is_empty(), || {
            format!("ps shows the root's children {left:?} after the shutdown")
        })
    }
}

/// Whether a loss report is of an envelope bound to `node` (by pid or by name).
fn bound_to(report: &LossReport, node: NodeId) -> bool {
    use forkbus::Destination as D;
    matches!(
        &report.destination,
        Some(D::Node(n) | D::NameAt { node: n, .. }) if *n == node
    )
}

fn route_of(bus: &Bus, node: NodeId) -> Option<LinkId> {
    bus.router()
        .routes()
        .into_iter()
        .find(|(n, _)| *n == node)
        .map(|(_, l)| l)
}

/// Whether a process exists and is not a zombie.
fn alive(pid: Pid) -> bool {
    proc_state(pid.as_raw()).is_some_and(|s| s != 'Z')
}

/// The children of `parent` as `ps` lists them (`ps` itself left out).
fn ps_children(parent: u32) -> Result<BTreeSet<u32>, String> {
    let child = std::process::Command::new("ps")
        .args(["-o", "pid=", "--ppid", &parent.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ps: {e}"))?;
    let me = child.id();
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .filter(|p| *p != me)
        .collect())
}

fn node_arg(key: &str, n: NodeId) -> String {
    format!("{key}={}:{}:{}", n.host, n.pid, n.incarnation)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Forged origins, notices and announcements

/// Envelopes from the worker's or the root's id, from a node nobody announced, notices in
/// the worker's name, announcements of the worker and of the root: each closes the hostile
/// link as a violation, moves no route and delivers nothing. A claim on the worker's name
/// is refused quietly (the link stays open) and the name stays.
fn forged_origins() -> Result<(), String> {
    let mut t = Tree::new(BusConfig::default())?;
    let root = t.bus.node();
    let w = t.worker_node;
    let host = root.host;
    let cases: Vec<(&str, Vec<String>, ProtocolError)> = vec![
        (
            "origin",
            vec![node_arg("origin", w), node_arg("to", root)],
            ProtocolError::RouteConflict { node: w },
        ),
        (
            "origin",
            vec![node_arg("origin", root), node_arg("to", w)],
            ProtocolError::RouteConflict { node: root },
        ),
        (
            "origin",
            vec![node_arg("origin", w), "to=broadcast".into()],
            ProtocolError::RouteConflict { node: w },
        ),
        (
            "unknown",
            vec![node_arg("to", w)],
            ProtocolError::UnknownOrigin {
                node: NodeId::new(host, FAKE_PID_BASE, 1),
            },
        ),
        (
            "announce",
            vec![node_arg("node", w)],
            ProtocolError::RouteConflict { node: w },
        ),
        (
            "announce",
            vec![node_arg("node", root)],
            ProtocolError::RouteConflict { node: root },
        ),
    ];
    for (kind, a, expected) in &cases {
        let h = t.hostile(kind, a)?;
        t.expect_violation(h, expected)
            .map_err(|e| format!("{kind} {a:?}: {e}"))?;
        t.check_rss(h, 4 << 10, &format!("{kind} {}", a.join(" ")))?;
        let unreported = t.kill(h)?;
        ensure(unreported == 1, || {
            format!("{unreported} nodes unreported for one hostile")
        })?;
    }

    // Notices in the worker's name about an envelope whose receipt is open: the worker is
    // stopped (pings pause, so that their answers are not held up on purpose), a probe
    // waits in its socket, and the forged receipt and loss must change nothing.
    t.check_pings()?;
    kill(nix_pid(t.worker), Signal::SIGSTOP).map_err(|e| e.to_string())?;
    let worker = t.worker;
    run_until(&mut t.bus, WAIT, move |_| {
        proc_state(worker.as_raw()) == Some('T')
    })?;
    let receipt = SendOptions {
        receipt: true,
        ..SendOptions::default()
    };
    let probe = t
        .bus
        .send_with(t.worker, &Wire::Probe, receipt)
        .map_err(|e| e.to_string())?;
    for kind in ["delivered", "lost"] {
        let a = vec![
            node_arg("from", w),
            node_arg("origin", root),
            format!("seq={}", probe.seq),
            format!("kind={kind}"),
        ];
        let h = t.hostile("notice", &a)?;
        t.expect_violation(h, &ProtocolError::RouteConflict { node: w })
            .map_err(|e| format!("notice {kind}: {e}"))?;
        t.kill(h)?;
        let l = t.log.borrow();
        ensure(
            !l.delivered.contains(&probe) && !l.lost.iter().any(|r| r.id == probe),
            || format!("a forged {kind} notice settled the probe's receipt"),
        )?;
    }
    ensure(t.bus.router().pending_receipts() == 1, || {
        format!(
            "{} receipts pending, the probe's should be",
            t.bus.router().pending_receipts()
        )
    })?;
    kill(nix_pid(t.worker), Signal::SIGCONT).map_err(|e| e.to_string())?;
    let l = t.log.clone();
    run_until(&mut t.bus, WAIT, move |_| {
        l.borrow().delivered.contains(&probe)
    })?;
    t.run_for(Duration::from_millis(50))?;
    {
        let l = t.log.borrow();
        let n = l.delivered.iter().filter(|id| **id == probe).count();
        ensure(n == 1 && !l.lost.iter().any(|r| r.id == probe), || {
            format!("the probe was delivered {n} times, lost {:?}", l.lost)
        })?;
    }
    t.log.borrow_mut().pinging = true;

    // A claim on the worker's name: refused quietly, the link stays up, the name stays.
    let refused = t.bus.router().stats().names_refused;
    let h = t.hostile("steal", &args(&["name=worker"]))?;
    run_until(&mut t.bus, WAIT, move |b| {
        b.router().stats().names_refused > refused
    })?;
    t.run_for(Duration::from_millis(100))?;
    ensure(route_of(&t.bus, h.node).is_some(), || {
        "the name claim closed the hostile link".into()
    })?;
    let holder = t.bus.router().resolve(&to::name("worker"));
    ensure(holder == Some(w), || {
        format!("\"worker\" resolves to {holder:?}")
    })?;
    t.kill(h)?;
    {
        let l = t.log.borrow();
        let down = l
            .shutdowns
            .iter()
            .find(|(_, s)| s.relation == Relation::Child(h.pid));
        ensure(
            matches!(down, Some((_, s)) if s.cause == DownCause::Closed)
                && !l.protocol.iter().any(|(p, _)| *p == Some(h.node)),
            || format!("the name thief's link went down with {down:?}"),
        )?;
    }
    let status = t.status(&["worker", "hijacked"])?;
    let wpid = t.worker.as_raw();
    ensure(
        status.resolved
            == [
                ("worker".to_owned(), Some(wpid)),
                ("hijacked".to_owned(), None),
            ],
        || format!("the worker resolves {:?}", status.resolved),
    )?;
    ensure(
        t.bus.router().resolve(&to::name("hijacked")).is_none(),
        || "the root resolves \"hijacked\"".into(),
    )?;
    t.finish(4 << 10)
}

// ---------------------------------------------------------------------------------------
// 2. Announcements past the bounds

/// The case: one node announcing 4000 names (of 200 bytes) in each of 20 frames
/// (16 MB; it used to cost 70 MiB in every process) is refused at its first frame, before
/// a name is stored; a node adding names 64 at a time is refused at the first frame past
/// the per-node bound.
fn huge_announcements() -> Result<(), String> {
    let mut t = Tree::new(BusConfig::default())?;
    let h = t.hostile("names", &args(&["count=4000", "frames=20", "len=200"]))?;
    t.expect_violation(
        h,
        &ProtocolError::TooManyNames {
            max: RouterConfig::default().max_names_per_node,
        },
    )?;
    // What the root holds for a frame it reads: its read buffer and at most one frame
    // (1 MiB) being completed; 4 MiB leaves room for the allocator's rounding.
    t.check_rss(h, 4 << 10, "4000 names x 20 frames")?;
    t.kill(h)?;

    let per = RouterConfig::default().max_names_per_node;
    let h = t.hostile(
        "name-deltas",
        &[format!("per={per}"), "frames=20".to_owned()],
    )?;
    t.expect_violation(h, &ProtocolError::TooManyNames { max: per })?;
    t.check_rss(h, 4 << 10, "names 64 at a time")?;
    t.kill(h)?;
    let names = ["h0-0-", "d0-0", "d1-0"];
    for n in names {
        ensure(t.bus.router().resolve(&to::name(n)).is_none(), || {
            format!("the root still resolves {n:?}")
        })?;
    }
    let status = t.status(&names)?;
    ensure(
        status.resolved.iter().all(|(_, holder)| holder.is_none()) && status.routes == 1,
        || {
            format!(
                "the worker resolves {:?} and has {} routes",
                status.resolved, status.routes
            )
        },
    )?;
    // Nothing of it reached the worker: only its own pings' worth of memory.
    t.finish(2 << 10)
}

const MAX_NODES: usize = 1024;
const MAX_NAMES: usize = 4096;

/// Fake nodes announced 100 to a frame, past `max_nodes`, and fake nodes with 64 names
/// each, past `max_names`: the link closes at the first node (name) over; the nodes
/// already accepted leave with it, from the root's table and the worker's.
fn announcements_past_the_table_bounds() -> Result<(), String> {
    let mut config = BusConfig::default();
    config.router.max_nodes = MAX_NODES;
    config.router.max_names = MAX_NAMES;
    let mut t = Tree::new(config)?;

    let h = t.hostile("nodes", &args(&["per=100", "frames=20", "names=0"]))?;
    t.expect_violation(h, &ProtocolError::TooManyNodes { max: MAX_NODES })?;
    // 1022 nodes in the table (a few hundred bytes each in its maps), flooded on to the
    // worker, then removed.
    t.check_rss(h, 4 << 10, "nodes past max_nodes")?;
    let unreported = t.kill(h)?;
    // The table holds the worker, the hostile and as many fakes as fit.
    ensure(unreported == (MAX_NODES - 1) as u64, || {
        format!("{unreported} nodes unreported behind the hostile")
    })?;
    let status = t.status(&["f1-0"])?;
    ensure(status.routes == 1, || {
        format!(
            "the worker has {} routes after the hostile left",
            status.routes
        )
    })?;

    // Fresh fakes: the first ones are buried (nodes that left never come back).
    let h = t.hostile(
        "nodes",
        &args(&["per=10", "frames=20", "names=64", "first=100000"]),
    )?;
    t.expect_violation(h, &ProtocolError::TooManyNames { max: MAX_NAMES })?;
    t.check_rss(h, 4 << 10, "names past max_names")?;
    t.kill(h)?;
    ensure(
        t.bus.router().resolve(&to::name("f100001-0")).is_none(),
        || "the root still resolves a fake node's name".into(),
    )?;
    let status = t.status(&["f100001-0", "f100060-63"])?;
    ensure(
        status.routes == 1 && status.resolved.iter().all(|(_, h)| h.is_none()),
        || {
            format!(
                "the worker has {} routes and resolves {:?}",
                status.routes, status.resolved
            )
        },
    )?;
    t.finish(4 << 10)
}

// ---------------------------------------------------------------------------------------
// 3. A flood from fresh origins

const FLOOD_NODES_MAX: usize = 8192;
const FLOOD_ENVELOPES: u64 = 200_000;

/// How the hostile node floods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pace {
    /// At most `max_queue_envelopes` unacknowledged, as an honest router's queue bound
    /// allows a sender.
    Honest,
    /// As fast as the root reads.
    Unpaced,
}

/// The hostile node announces as many fake nodes behind itself as the table allows (they
/// are its subtree: legal) and broadcasts 200 000 envelopes, each from the next of them in
/// turn — every one from an origin the seen tables have forgotten, so each costs an
/// eviction — then `"flood-done"` from itself. Both the root and the worker keep answering
/// pings within the bound, their seen tables stay within `max_origins`, their memory
/// within a bound, and every copy for the worker is delivered to it (the root holds back
/// what it cannot forward yet, hop by hop, instead of losing it; a ping finds room behind
/// the flood).
///
/// At the honest pace (the acknowledgement window respected) the link stays open and the
/// root takes every envelope. Unpaced, the flooder sends on while the root holds its
/// envelopes back: past twice the queue bound its link closes as `WindowExceeded` (or
/// `Overrun`, should notices pile up first), and every copy the root took still reaches
/// the worker.
fn fresh_origin_flood(pace: Pace) -> Result<(), String> {
    let mut config = BusConfig::default();
    config.router.max_nodes = FLOOD_NODES_MAX;
    if pace == Pace::Unpaced {
        config.router.max_frame = 64 << 10;
        config.router.max_queue_bytes = 1 << 20;
        // A readable link is read at most 16 times per loop iteration: with the default
        // 64 KiB reads that is ~35 000 envelopes of this flood, ~0.35 s of a debug build's
        // time alone and over 2 s on two contended cores, during which no timer fires and
        // no other link is served. A quarter of that keeps the ping bound meaningful on a
        // loaded CI machine (the burst, not the flood, sets the latency).
        config.read_buffer = 16 << 10;
    }
    let max_origins = config.router.max_origins;
    let overrun_bound = 2 * config.router.max_queue_bytes + config.router.max_frame as usize;
    let mut t = Tree::new(config)?;
    let fakes = FLOOD_NODES_MAX - t.bus.router().routes().len() - 1;
    ensure(fakes > max_origins, || {
        "the flood would not need evictions".into()
    })?;
    let lost_before = t.bus.router().stats().lost.queue_full;
    let started = Instant::now();
    let mut a = vec![
        format!("nodes={fakes}"),
        format!("envelopes={FLOOD_ENVELOPES}"),
    ];
    if pace == Pace::Honest {
        let window = RouterConfig::default().max_queue_envelopes;
        a.push(format!("window={window}"));
    }
    let h = t.hostile("flood", &a)?;
    let l = t.log.clone();
    run_until(&mut t.bus, Duration::from_secs(45), move |_| {
        let l = l.borrow();
        l.flood_done
            || l.shutdowns
                .iter()
                .any(|(_, s)| s.relation == Relation::Child(h.pid))
    })
    .map_err(|e| {
        format!(
            "the flood did not end: {e}; {} of {FLOOD_ENVELOPES} arrived",
            t.log.borrow().flood
        )
    })?;
    let took = started.elapsed();
    let lost = t.bus.router().stats().lost.queue_full - lost_before;
    // Copies for the worker may still wait at the root (held back, hop by hop, while its
    // link is full): ask until it has them all, or the wait is over.
    let took_here = {
        let l = t.log.borrow();
        l.flood + u64::from(l.flood_done)
    };
    let asked = Instant::now();
    let mut status = t.status(&[])?;
    while status.flood + u64::from(status.flood_done) + lost < took_here
        && asked.elapsed() < Duration::from_secs(20)
    {
        status = t.status(&[])?;
    }
    {
        let l = t.log.borrow();
        let down = l
            .shutdowns
            .iter()
            .find(|(_, s)| s.relation == Relation::Child(h.pid))
            .map(|(_, s)| s.cause.clone());
        println!(
            "  flood ({pace:?}): the root took {} envelopes from {fakes} origins in {took:.2?} \
             (the hostile link: {}); the worker got {}, {lost} copies were lost on the way \
             (queue full); at most {} KiB waited on a link; seen origins at most: root {}, \
             worker {} (max {max_origins})",
            l.flood,
            down.as_ref()
                .map_or("open".to_owned(), |c| format!("{c:?}")),
            status.flood,
            l.max_pending_output >> 10,
            l.max_seen,
            status.max_seen
        );
        // An unpaced flood ignores the acknowledgement window: the one violation it may be
        // closed for.
        let window = |e: &ProtocolError| matches!(e, ProtocolError::WindowExceeded { .. });
        ensure(
            l.protocol
                .iter()
                .all(|(p, e)| pace == Pace::Unpaced && *p == Some(h.node) && window(e)),
            || format!("legal traffic was taken for a violation: {:?}", l.protocol),
        )?;
        ensure(
            l.shutdowns
                .iter()
                .all(|(_, s)| s.relation == Relation::Child(h.pid)),
            || format!("another link went down: {:?}", l.shutdowns),
        )?;
        match (pace, down) {
            (_, None) => ensure(l.flood == FLOOD_ENVELOPES && l.flood_done, || {
                format!("the root took {} of {FLOOD_ENVELOPES}", l.flood)
            })?,
            (Pace::Unpaced, Some(DownCause::Overrun)) => {
                ensure(l.overruns == [Some(h.node)], || {
                    format!("overruns reported: {:?}", l.overruns)
                })?;
            }
            (Pace::Unpaced, Some(DownCause::Protocol(e))) if window(&e) => {}
            (_, Some(cause)) => return Err(format!("the flooder's link went down: {cause:?}")),
        }
        ensure(l.flood_bad_origin == 0, || {
            format!(
                "{} flood envelopes from outside the subtree",
                l.flood_bad_origin
            )
        })?;
        // Every copy for the worker was delivered to it or reported lost ("flood-done"
        // too).
        let got = status.flood + u64::from(status.flood_done);
        ensure(
            got + lost == took_here && status.flood_bad_origin == 0,
            || format!("the worker got {got}, the root lost {lost}, of the {took_here} it took"),
        )?;
        ensure(l.max_pending_output <= overrun_bound, || {
            format!(
                "{} bytes waited on a link, past the bound of {overrun_bound}",
                l.max_pending_output
            )
        })?;
    }
    let root_seen = t.log.borrow().max_seen;
    ensure(
        root_seen <= max_origins && status.max_seen <= max_origins,
        || {
            format!(
                "seen origins: root {root_seen}, worker {} (max {max_origins})",
                status.max_seen
            )
        },
    )?;
    // What the root holds: the table of 8190 fakes (a few hundred bytes each in its maps,
    // ~3 MiB), the seen windows (max_origins of ~100 bytes), the worker's queue (at most
    // max_queue_envelopes copies of ~100 bytes, held as accounting and as bytes), the
    // output waiting for the flooder (loss notices, at most the overrun bound, 2 MiB
    // unpaced, with a record each) and the events of one read burst (16 reads: unpaced
    // of 16 KiB, ~9 000 envelopes of ~30 bytes, ~3 MiB decoded; at the honest pace at
    // most the window, 4096): 16 MiB.
    t.check_rss(h, 16 << 10, "flood")?;
    let unreported = t.kill(h)?;
    ensure(unreported == 1 + fakes as u64, || {
        format!("{unreported} nodes unreported behind the hostile")
    })?;
    let status = t.status(&[])?;
    ensure(status.routes == 1, || {
        format!("the worker has {} routes after the flood", status.routes)
    })?;
    // The worker: the same table and seen windows, its copies' events.
    t.finish(16 << 10)
}

// ---------------------------------------------------------------------------------------
// 4. Stalls

const STALL: Duration = Duration::from_millis(300);

fn stall_config() -> BusConfig {
    let mut config = BusConfig::default();
    config.router.stall_timeout = Some(STALL);
    config
}

/// A length prefix announcing a 1 MiB frame, 16 bytes of it, then silence from a process
/// that stays alive: the link closes as stalled within the timeout plus a margin.
fn never_completed_frame() -> Result<(), String> {
    let mut t = Tree::new(stall_config())?;
    let h = t.hostile("partial", &args(&["len=1048576", "bytes=16"]))?;
    let up = t
        .log
        .borrow()
        .peers_up
        .iter()
        .find(|(_, p)| *p == h.node)
        .map(|(at, _)| *at)
        .ok_or("no hello")?;
    let (down_at, down) = t.wait_down(h)?;
    let after = down_at - up;
    println!("  a frame never completed: closed {after:?} after the hello (timeout {STALL:?})");
    ensure(down.cause == DownCause::Stalled, || {
        format!("the link went down with {down:?}")
    })?;
    ensure(
        after + Duration::from_millis(20) >= STALL && after <= STALL + PING_BOUND,
        || format!("closed {after:?} after the hello, the timeout is {STALL:?}"),
    )?;
    ensure(alive(h.pid), || "the hostile process died".into())?;
    ensure(t.log.borrow().protocol.is_empty(), || {
        format!("protocol errors: {:?}", t.log.borrow().protocol)
    })?;
    t.check_rss(h, 4 << 10, "a frame never completed")?;
    t.kill(h)?;
    t.finish(2 << 10)
}

/// Payload bytes of each envelope sent to the peer that never reads.
const DEAF_PAYLOAD: usize = 256;

/// A peer that never reads: the root's sends to it are accepted until its queue is full,
/// then refused (`QueueFull`, at once) until the link closes as stalled — the timeout
/// after the last byte the kernel took — with every accepted envelope in its lost list and
/// reported lost once. Afterwards sends to its pid are sure losses (no route).
fn peer_that_never_reads() -> Result<(), String> {
    let mut t = Tree::new(stall_config())?;
    let h = t.hostile("deaf", &[])?;
    let max = RouterConfig::default().max_queue_envelopes;
    let mut accepted: Vec<MessageId> = Vec::new();
    let payload = vec![0xabu8; DEAF_PAYLOAD];
    let mut refused_at = None;
    for _ in 0..=max {
        match t
            .bus
            .send_bytes(h.pid, payload.clone(), SendOptions::default())
        {
            Ok(id) => accepted.push(id),
            Err(SendError::QueueFull { peer }) if peer == Some(h.node) => {
                refused_at = Some(Instant::now());
                break;
            }
            Err(e) => return Err(format!("send {}: {e}", accepted.len())),
        }
    }
    let refused_at = refused_at.ok_or("never refused")?;
    ensure(accepted.len() == max, || {
        format!("{} accepted before the first refusal", accepted.len())
    })?;
    // Keep sending while the link stalls: every send is refused at once.
    let refusals = Rc::new(Cell::new(0u64));
    let slowest = Rc::new(Cell::new(Duration::ZERO));
    let wrong: Rc<RefCell<Option<String>>> = Rc::default();
    let (r, s, w, l) = (
        refusals.clone(),
        slowest.clone(),
        wrong.clone(),
        t.log.clone(),
    );
    let to = h.pid;
    let p = payload.clone();
    run_until(&mut t.bus, WAIT, move |bus| {
        if l.borrow()
            .shutdowns
            .iter()
            .any(|(_, x)| x.relation == Relation::Child(to))
        {
            return true;
        }
        let at = Instant::now();
        match bus.send_bytes(to, p.clone(), SendOptions::default()) {
            Err(SendError::QueueFull { .. }) => r.set(r.get() + 1),
            other => *w.borrow_mut() = Some(format!("{other:?}")),
        }
        s.set(s.get().max(at.elapsed()));
        false
    })?;
    ensure(wrong.borrow().is_none(), || {
        format!("a send while stalled was not refused: {:?}", wrong.borrow())
    })?;
    let (down_at, down) = t.wait_down(h)?;
    let after = down_at - refused_at;
    println!(
        "  a peer that never reads: {} accepted, {} refused (slowest refusal {:?}), closed {after:?} after the first refusal",
        accepted.len(),
        refusals.get(),
        slowest.get()
    );
    ensure(
        matches!(down.cause, DownCause::Stalled | DownCause::Overrun),
        || format!("the link went down with {:?}", down.cause),
    )?;
    ensure(
        after + Duration::from_millis(20) >= STALL && after <= STALL + PING_BOUND,
        || format!("closed {after:?} after the first refusal, the timeout is {STALL:?}"),
    )?;
    ensure(
        refusals.get() > 0 && slowest.get() < Duration::from_millis(50),
        || {
            format!(
                "{} refusals while stalled, the slowest took {:?}",
                refusals.get(),
                slowest.get()
            )
        },
    )?;
    let lost: Vec<MessageId> = down.lost.iter().map(|(id, _)| *id).collect();
    ensure(lost == accepted, || {
        format!(
            "{} accepted, {} in the lost list",
            accepted.len(),
            lost.len()
        )
    })?;
    ensure(
        down.lost.iter().all(|(_, fate)| {
            matches!(
                fate,
                Fate::Lost(LossReason::NeverWritten | LossReason::PartiallyWritten)
                    | Fate::Unknown(UnknownReason::Unacknowledged)
            )
        }),
        || "a lost envelope with another fate".into(),
    )?;
    t.run_for(Duration::from_millis(50))?;
    {
        let l = t.log.borrow();
        let mut reported: BTreeMap<MessageId, usize> = BTreeMap::new();
        for r in &l.lost {
            *reported.entry(r.id).or_default() += 1;
        }
        ensure(
            accepted.iter().all(|id| reported.get(id) == Some(&1)),
            || "an accepted envelope was not reported lost exactly once".into(),
        )?;
    }
    // Gone: a send to its pid is a sure loss now, not a refusal.
    let id = t
        .bus
        .send_bytes(h.pid, payload, SendOptions::default())
        .map_err(|e| e.to_string())?;
    t.run_for(Duration::from_millis(20))?;
    let fate = t
        .log
        .borrow()
        .lost
        .iter()
        .find(|r| r.id == id)
        .map(|r| r.fate);
    ensure(fate == Some(Fate::Lost(LossReason::NoRoute)), || {
        format!("a send to the gone peer: {fate:?}")
    })?;
    // Its queue: 4096 envelopes of 256 bytes, each held once in the link's accounting
    // (~350 bytes with its header) and once as unwritten frame bytes (~270): ~2.5 MiB; at
    // the teardown the lost list and the loss reports carry the payloads again (~2 MiB,
    // handed to the listeners). 8 MiB.
    t.check_rss(h, 8 << 10, "a peer that never reads")?;
    t.kill(h)?;
    t.finish(2 << 10)
}

// ---------------------------------------------------------------------------------------
// 5. A peer that never acknowledges

/// Envelopes to nowhere sent by the peer that never acknowledges.
const NO_ACK_ENVELOPES: u64 = 200_000;

/// A peer that reads everything it is sent but never acknowledges it, and sends envelopes
/// to a node that does not exist: the root loses each (no route) and owes the sender a
/// loss notice, a numbered frame that stays in the link's accounting until acknowledged.
/// Unacknowledged notices count towards the bound of output the peer does not take: the
/// link closes as `Overrun` once they pass it (here made small: twice `max_queue_bytes`
/// plus a frame, 2 MiB), and the root's memory stays within that. The peer paces itself
/// by the root's acknowledgements and reads everything, so that no notice waits
/// unwritten: only the missing acknowledgements can close the link.
///
/// Before that bound covered unacknowledged notices, they piled up without end: the root
/// grew by ~6 MiB per 100 000 envelopes (~60 bytes per notice) and the link stayed open.
fn peer_that_never_acknowledges() -> Result<(), String> {
    let mut config = BusConfig::default();
    config.router.max_frame = 64 << 10;
    config.router.max_queue_bytes = 1 << 20;
    let mut t = Tree::new(config)?;
    // At a modest pace (a small window), so that the notices never pile up unwritten, even
    // on a loaded machine: the peer takes every byte, it only never acknowledges.
    let window = 512;
    let h = t.hostile(
        "no-ack",
        &[
            format!("envelopes={NO_ACK_ENVELOPES}"),
            format!("window={window}"),
        ],
    )?;
    let l = t.log.clone();
    let done = run_until(&mut t.bus, WAIT, move |_| {
        let l = l.borrow();
        l.flood_done
            || l.shutdowns
                .iter()
                .any(|(_, s)| s.relation == Relation::Child(h.pid))
    });
    let lost = t.bus.router().stats().lost.no_route;
    let down = t
        .log
        .borrow()
        .shutdowns
        .iter()
        .find(|(_, s)| s.relation == Relation::Child(h.pid))
        .map(|(_, s)| s.cause.clone());
    println!(
        "  a peer that never acknowledges: {lost} of {NO_ACK_ENVELOPES} envelopes lost (no route) \
         and owed a notice; the link: {down:?}"
    );
    // The notices' bytes (at most the 2 MiB bound) and a record of each (~55 000 of 24
    // bytes, in a deque that may double): 8 MiB leaves room.
    t.check_rss(h, 8 << 10, "a peer that never acknowledges")?;
    done?;
    ensure(down == Some(DownCause::Overrun), || {
        format!("the link of a peer that never acknowledges went down with {down:?}")
    })?;
    let most = t.log.borrow().max_pending_output;
    ensure(most < 1 << 20, || {
        format!("{most} bytes waited unwritten: the peer did not take its output")
    })?;
    ensure(t.log.borrow().overruns == [Some(h.node)], || {
        format!("overruns reported: {:?}", t.log.borrow().overruns)
    })?;
    ensure(alive(h.pid), || "the hostile process died".into())?;
    t.kill(h)?;
    let links = t.bus.router().links();
    ensure(links == [t.worker_link], || {
        format!("the root's links once the peer is gone: {links:?}")
    })?;
    t.finish(2 << 10)
}

fn main() {
    let mut h = Harness::new();
    h.run(
        "1_forged_origins_notices_announcements",
        DEADLINE,
        forged_origins,
    );
    h.run("2a_huge_name_announcements", DEADLINE, huge_announcements);
    h.run(
        "2b_announcements_past_max_nodes_and_max_names",
        DEADLINE,
        announcements_past_the_table_bounds,
    );
    h.run("3a_fresh_origin_flood_at_an_honest_pace", DEADLINE, || {
        fresh_origin_flood(Pace::Honest)
    });
    h.run("3b_fresh_origin_flood_unpaced", DEADLINE, || {
        fresh_origin_flood(Pace::Unpaced)
    });
    h.run("4a_never_completed_frame", DEADLINE, never_completed_frame);
    h.run("4b_peer_that_never_reads", DEADLINE, peer_that_never_reads);
    h.run(
        "5_peer_that_never_acknowledges",
        DEADLINE,
        peer_that_never_acknowledges,
    );
    h.finish()
}
