//! The forkbus side of every figure: the same work as `raw.rs`, through [`Bus`] with the
//! default configuration, sending with [`Bus::send_bytes`] (raw payload bytes, no serde
//! encoding: the lowest-overhead public send path) and receiving with a [`Listener`].
//!
//! Every tree ends with a graceful [`Bus::shutdown_tree`] (every process reaped, bottom-up)
//! and its tally is checked: a figure whose run lost envelopes says so.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use forkbus::{
    to, Bus, BusConfig, ForkOptions, Listener, Message, NodeId, Pid, SendOptions, Stop, Tally,
};

use forkbus::error::SendError;

use crate::proc::{monotonic_ns, rss_pss_kib, SharedStamps};
use crate::stats::Samples;

/// Longest any one phase may take before the figure is abandoned (a bench must not hang).
const WATCHDOG: Duration = Duration::from_secs(60);

/// Message kinds: the first payload byte.
const READY: u8 = b'R';
const DATA: u8 = b'B';
const DONE: u8 = b'D';
const SNAPSHOT: u8 = b'S';
const PROBE: u8 = b'U';
const FORWARD: u8 = b'F';
/// A broadcast that is only stamped (no convergecast: nothing but its own frames).
const MARK: u8 = b'M';

/// The configuration every figure runs with: the default, unless `FORKBUS_BENCH_READ_BUFFER`
/// (bytes per `read`) says otherwise (for experiments; recorded in the JSON).
pub(crate) fn config() -> BusConfig {
    let mut config = BusConfig::default();
    if let Some(n) = std::env::var("FORKBUS_BENCH_READ_BUFFER")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.read_buffer = n;
    }
    config
}

fn root_bus() -> io::Result<Bus> {
    Bus::root(config())
}

fn send(bus: &mut Bus, to: impl Into<forkbus::Address>, payload: Vec<u8>) {
    if let Err(e) = bus.send_bytes(to, payload, SendOptions::default()) {
        eprintln!("forkbus bench: send failed in {}: {e}", std::process::id());
    }
}

/// Runs the loop until a listener or timer calls `stop`, at most [`WATCHDOG`].
fn run_until_stopped(bus: &mut Bus, what: &str) -> io::Result<()> {
    let fired = Rc::new(Cell::new(false));
    let flag = fired.clone();
    let timer = bus.add_timer(WATCHDOG, move |bus| {
        flag.set(true);
        bus.stop();
    });
    let stop = bus.run()?;
    bus.cancel_timer(timer);
    if fired.get() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what}: nothing within {WATCHDOG:?}"),
        ));
    }
    match stop {
        Stop::Stopped => Ok(()),
        // SIGINT or SIGTERM reached the root's bus (it blocks them and drains the tree):
        // the bench was asked to stop.
        Stop::Shutdown(_) => Err(io::Error::new(
            io::ErrorKind::Interrupted,
            format!("{what}: interrupted (SIGINT or SIGTERM)"),
        )),
        other => Err(io::Error::other(format!(
            "{what}: the loop ended: {other:?}"
        ))),
    }
}

/// Runs the loop until `cond` holds (checked every `every`), at most [`WATCHDOG`].
fn run_until(
    bus: &mut Bus,
    every: Duration,
    what: &str,
    cond: impl Fn() -> bool + 'static,
) -> io::Result<()> {
    fn arm(bus: &mut Bus, every: Duration, cond: Rc<dyn Fn() -> bool>) {
        bus.add_timer(every, move |bus| {
            if cond() {
                bus.stop();
            } else {
                arm(bus, every, cond);
            }
        });
    }
    let cond: Rc<dyn Fn() -> bool> = Rc::new(cond);
    if cond() {
        return Ok(());
    }
    arm(bus, every, cond);
    run_until_stopped(bus, what)
}

/// Shuts the tree down gracefully and returns its tally.
fn finish(mut bus: Bus) -> io::Result<Tally> {
    bus.shutdown_tree();
    match bus.run()? {
        Stop::Shutdown(tally) => Ok(tally),
        other => Err(io::Error::other(format!("shutdown ended with {other:?}"))),
    }
}

/// A tally with losses or unreported processes is worth a line on stderr.
fn check(tally: &Tally, what: &str) -> Tally {
    if tally.lost > 0 || tally.unreported > 0 {
        eprintln!("forkbus bench: {what}: {tally:?}");
    }
    *tally
}

// ---------------------------------------------------------------------------------------
// Round trip

/// The far end: echoes every payload to its origin.
struct Echo;

impl Listener for Echo {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        send(bus, msg.origin(), msg.payload().to_vec());
    }
}

/// The root's side of the ping-pong: one sample per round trip, from just before the send
/// is queued until the reply is handed to the listener.
struct Pinger {
    leaf: Option<NodeId>,
    warmup: usize,
    left: usize,
    payload: Vec<u8>,
    t: Instant,
    samples: Rc<RefCell<Samples>>,
}

impl Listener for Pinger {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let elapsed = self.t.elapsed();
        match self.leaf {
            None => self.leaf = Some(msg.origin()),
            Some(_) if self.warmup > 0 => self.warmup -= 1,
            Some(_) => {
                self.samples.borrow_mut().push(elapsed);
                self.left -= 1;
                if self.left == 0 {
                    bus.stop();
                    return;
                }
            }
        }
        if let Some(leaf) = self.leaf {
            self.t = Instant::now();
            send(bus, leaf, self.payload.clone());
        }
    }
}

/// One process of the chain: forks the next, or echoes (and says it is ready to the root)
/// when it is the last. The middle processes only route.
fn chain(bus: &mut Bus, root: NodeId, below: usize) {
    if below == 0 {
        bus.add_listener(0, Echo);
        send(bus, root, vec![READY]);
    } else if let Err(e) = bus.fork(ForkOptions::default(), move |bus| {
        chain(bus, root, below - 1)
    }) {
        eprintln!("forkbus bench: fork failed: {e}");
    }
}

/// Round trips of a 64-byte payload from the root to the end of a chain of `hops` links
/// and back (the middle processes forward inside their routers). `after_fork` runs in the
/// root once the chain's first process is forked.
pub(crate) fn round_trip(
    hops: usize,
    rounds: usize,
    warmup: usize,
    after_fork: impl FnOnce() -> io::Result<()>,
) -> io::Result<(Samples, Tally)> {
    assert!(hops >= 1);
    let mut bus = root_bus()?;
    let root = bus.node();
    bus.fork(ForkOptions::default(), move |bus| {
        chain(bus, root, hops - 1)
    })
    .map_err(io::Error::from)?;
    after_fork()?;
    ping(bus, rounds, warmup, "round trip", |_| Ok(()))
}

/// Adds the root's [`Pinger`], runs `start` (which brings up the far end: it says it is up
/// with one message, then echoes), takes `rounds` round trips after `warmup`, and shuts
/// the tree down.
fn ping(
    mut bus: Bus,
    rounds: usize,
    warmup: usize,
    what: &str,
    start: impl FnOnce(&mut Bus) -> io::Result<()>,
) -> io::Result<(Samples, Tally)> {
    let samples = Rc::new(RefCell::new(Samples::with_capacity(rounds)));
    bus.add_listener(
        0,
        Pinger {
            leaf: None,
            warmup,
            left: rounds,
            payload: vec![7; 64],
            t: Instant::now(),
            samples: samples.clone(),
        },
    );
    start(&mut bus)?;
    run_until_stopped(&mut bus, what)?;
    let tally = check(&finish(bus)?, what);
    let samples = samples.take();
    Ok((samples, tally))
}

/// Round trips of a 64-byte payload from the root to a Python leaf worker
/// (`benches/python/echo.py` on the package in `python/src`, joined with `Bus::exec_node`)
/// and back.
pub(crate) fn python_round_trip(
    python: &str,
    rounds: usize,
    warmup: usize,
) -> io::Result<(Samples, Tally)> {
    let root_dir = env!("CARGO_MANIFEST_DIR");
    let command = forkbus::exec::Command::new(python)
        .arg(format!("{root_dir}/benches/python/echo.py"))
        .env("PYTHONPATH", format!("{root_dir}/python/src"))
        .stdout(forkbus::exec::Output::Inherit)
        .stderr(forkbus::exec::Output::Inherit);
    ping(root_bus()?, rounds, warmup, "python round trip", |bus| {
        bus.exec_node(&command).map(drop).map_err(io::Error::from)
    })
}

// ---------------------------------------------------------------------------------------
// Throughput

/// The receiving child: counts envelopes and says so to the sender after the last.
struct Counter {
    seen: usize,
    count: usize,
}

impl Listener for Counter {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        self.seen += 1;
        if self.seen == self.count {
            send(bus, msg.origin(), vec![DONE]);
        }
    }
}

/// The sending root: queues envelopes until the link is full, then again on `on_send_ready`.
struct Streamer {
    child: Option<NodeId>,
    sent: usize,
    count: usize,
    payload: Vec<u8>,
    t: Instant,
    elapsed: Rc<Cell<Option<Duration>>>,
    refusals: Rc<Cell<u64>>,
}

impl Streamer {
    fn fill(&mut self, bus: &mut Bus) {
        let Some(child) = self.child else {
            return;
        };
        while self.sent < self.count {
            match bus.send_bytes(child, self.payload.clone(), SendOptions::default()) {
                Ok(_) => self.sent += 1,
                Err(SendError::QueueFull { .. }) => {
                    self.refusals.set(self.refusals.get() + 1);
                    return;
                }
                Err(e) => {
                    eprintln!("forkbus bench: throughput send failed: {e}");
                    bus.stop();
                    return;
                }
            }
        }
    }
}

impl Listener for Streamer {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.payload().first() {
            Some(&READY) => {
                self.child = Some(msg.origin());
                self.t = Instant::now();
                self.fill(bus);
            }
            Some(&DONE) => {
                self.elapsed.set(Some(self.t.elapsed()));
                bus.stop();
            }
            _ => {}
        }
    }

    fn on_send_ready(&mut self, bus: &mut Bus) {
        self.fill(bus);
    }
}

/// One-way streaming of `count` envelopes of `size` payload bytes from the root to a child.
/// Returns the time from the first send until the child had counted the last (it says it
/// is ready first, so its start-up is not timed), the sender's queue-full refusals and the
/// tally.
pub(crate) fn throughput(size: usize, count: usize) -> io::Result<(Duration, u64, Tally)> {
    let mut bus = root_bus()?;
    bus.fork(ForkOptions::default(), move |bus| {
        bus.add_listener(0, Counter { seen: 0, count });
        if let Some(parent) = bus.parent() {
            send(bus, parent, vec![READY]);
        }
    })
    .map_err(io::Error::from)?;
    let elapsed = Rc::new(Cell::new(None));
    let refusals = Rc::new(Cell::new(0));
    bus.add_listener(
        0,
        Streamer {
            child: None,
            sent: 0,
            count,
            payload: vec![9; size],
            t: Instant::now(),
            elapsed: elapsed.clone(),
            refusals: refusals.clone(),
        },
    );
    run_until_stopped(&mut bus, "throughput")?;
    let tally = check(&finish(bus)?, "throughput");
    let elapsed = elapsed
        .get()
        .ok_or_else(|| io::Error::other("throughput: the stream did not complete"))?;
    Ok((elapsed, refusals.get(), tally))
}

// ---------------------------------------------------------------------------------------
// Trees: broadcast and frames per unicast

/// Shared memory of a tree of `n` processes, one slot of each kind per process.
#[derive(Clone, Debug)]
struct TreeShm {
    s: SharedStamps,
    n: usize,
}

impl TreeShm {
    const STAMP: usize = 0;
    const FRAMES: usize = 1;
    const SNAPSHOT: usize = 2;
    const PROBE_HOPS: usize = 3;
    const PROBES: usize = 4;
    const PID: usize = 5;
    const KINDS: usize = 6;

    fn new(n: usize) -> io::Result<Self> {
        Ok(Self {
            s: SharedStamps::new(n * Self::KINDS)?,
            n,
        })
    }

    fn set(&self, kind: usize, node: usize, v: u64) {
        self.s.set(kind * self.n + node, v);
    }

    fn get(&self, kind: usize, node: usize) -> u64 {
        self.s.get(kind * self.n + node)
    }
}

/// Envelope frames this process has queued on all its links so far.
fn frames_sent(bus: &Bus) -> u64 {
    let r = bus.router();
    r.links()
        .into_iter()
        .filter_map(|l| r.link_stats(l).ok())
        .map(|s| s.frames_sent)
        .sum()
}

/// The root's side of the broadcast rounds.
#[derive(Debug)]
struct Rounds {
    round: u64,
    rounds: u64,
    warmup: u64,
    t0: u64,
    samples: Samples,
}

/// One process of the tree (node `me` of a complete binary tree of `n`; node `i` has
/// children `2i+1` and `2i+2`).
struct TreeNode {
    me: usize,
    parent: Option<NodeId>,
    children: usize,
    ready_from: usize,
    done_from: usize,
    got: bool,
    shm: TreeShm,
    /// At the root only.
    rounds: Option<Rc<RefCell<Rounds>>>,
}

impl TreeNode {
    fn start_round(bus: &mut Bus, r: &mut Rounds) {
        r.round += 1;
        let mut payload = vec![DATA];
        payload.extend_from_slice(&r.round.to_be_bytes());
        r.t0 = monotonic_ns();
        send(bus, to::broadcast(), payload);
    }

    /// This subtree has the broadcast: tell the parent, or (at the root) end the round.
    fn subtree_done(&mut self, bus: &mut Bus) {
        match (&self.parent, &self.rounds) {
            (Some(parent), _) => send(bus, *parent, vec![DONE]),
            (None, Some(rounds)) => {
                let mut r = rounds.borrow_mut();
                if r.round > r.warmup {
                    let last = (1..self.shm.n)
                        .map(|i| self.shm.get(TreeShm::STAMP, i))
                        .max()
                        .unwrap_or(r.t0);
                    let took = Duration::from_nanos(last.saturating_sub(r.t0));
                    r.samples.push(took);
                }
                if r.round < r.rounds + r.warmup {
                    self.done_from = 0;
                    Self::start_round(bus, &mut r);
                } else {
                    bus.stop();
                }
            }
            (None, None) => {}
        }
    }
}

impl Listener for TreeNode {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let payload = msg.payload();
        match payload.first() {
            Some(&READY) => {
                self.ready_from += 1;
                if self.ready_from == self.children {
                    match self.parent {
                        Some(parent) => send(bus, parent, vec![READY]),
                        None => bus.stop(),
                    }
                }
            }
            Some(&DATA) => {
                self.shm.set(TreeShm::STAMP, self.me, monotonic_ns());
                self.got = true;
                self.done_from = 0;
                if self.children == 0 {
                    self.subtree_done(bus);
                }
            }
            Some(&MARK) => self.shm.set(TreeShm::STAMP, self.me, monotonic_ns()),
            Some(&DONE) => {
                self.done_from += 1;
                if self.done_from == self.children && (self.got || self.parent.is_none()) {
                    self.got = false;
                    self.subtree_done(bus);
                }
            }
            Some(&SNAPSHOT) => {
                let mut k = [0u8; 8];
                if let Some(b) = payload.get(1..9) {
                    k.copy_from_slice(b);
                }
                self.shm.set(TreeShm::FRAMES, self.me, frames_sent(bus));
                self.shm
                    .set(TreeShm::SNAPSHOT, self.me, u64::from_be_bytes(k));
            }
            Some(&(PROBE | FORWARD)) => {
                self.shm
                    .set(TreeShm::PROBE_HOPS, self.me, u64::from(msg.hops()));
                let probes = self.shm.get(TreeShm::PROBES, self.me);
                self.shm.set(TreeShm::PROBES, self.me, probes + 1);
                if payload[0] == FORWARD {
                    let mut pid = [0u8; 4];
                    if let Some(b) = payload.get(1..5) {
                        pid.copy_from_slice(b);
                    }
                    send(
                        bus,
                        to::pid(Pid::from_raw(u32::from_be_bytes(pid))),
                        vec![PROBE],
                    );
                }
            }
            _ => {}
        }
    }
}

/// Forks this node's children (each forks its own), then says it is ready once they are.
fn tree_node(bus: &mut Bus, me: usize, shm: TreeShm) {
    shm.set(TreeShm::PID, me, u64::from(std::process::id()));
    let mut children = 0;
    for c in [2 * me + 1, 2 * me + 2] {
        if c < shm.n {
            let s = shm.clone();
            match bus.fork(ForkOptions::default(), move |bus| tree_node(bus, c, s)) {
                Ok(_) => children += 1,
                Err(e) => eprintln!("forkbus bench: fork failed: {e}"),
            }
        }
    }
    let parent = bus.parent();
    bus.add_listener(
        0,
        TreeNode {
            me,
            parent,
            children,
            ready_from: 0,
            done_from: 0,
            got: false,
            shm,
            rounds: None,
        },
    );
    if children == 0 {
        if let Some(parent) = parent {
            send(bus, parent, vec![READY]);
        }
    }
}

/// A forkbus tree of `n` processes, every one of them up. Returns the bus, the shared
/// memory, the round state and how long it took from the first fork until the root heard
/// that every process was ready.
fn build_tree(n: usize) -> io::Result<(Bus, TreeShm, Rc<RefCell<Rounds>>, Duration)> {
    assert!(n >= 2);
    let shm = TreeShm::new(n)?;
    let mut bus = root_bus()?;
    let t = Instant::now();
    let mut children = 0;
    for c in [1, 2] {
        if c < n {
            let s = shm.clone();
            bus.fork(ForkOptions::default(), move |bus| tree_node(bus, c, s))
                .map_err(io::Error::from)?;
            children += 1;
        }
    }
    let rounds = Rc::new(RefCell::new(Rounds {
        round: 0,
        rounds: 0,
        warmup: 0,
        t0: 0,
        samples: Samples::default(),
    }));
    bus.add_listener(
        0,
        TreeNode {
            me: 0,
            parent: None,
            children,
            ready_from: 0,
            done_from: 0,
            got: false,
            shm: shm.clone(),
            rounds: Some(rounds.clone()),
        },
    );
    run_until_stopped(&mut bus, "tree start")?;
    Ok((bus, shm, rounds, t.elapsed()))
}

/// Broadcast over a forkbus tree of `n` processes, `rounds` times (after 5 untimed): per
/// round, the time from the root's send until the last process had it, each process
/// stamping its arrival in shared memory; the next round starts once every subtree
/// answered (a convergecast, as the raw relay does). Also returns the time to start the
/// tree.
pub(crate) fn broadcast(n: usize, rounds: usize) -> io::Result<(Samples, Duration, Tally)> {
    let (mut bus, _shm, state, started) = build_tree(n)?;
    {
        let mut r = state.borrow_mut();
        r.rounds = rounds as u64;
        r.warmup = 5;
        TreeNode::start_round(&mut bus, &mut r);
    }
    run_until_stopped(&mut bus, "broadcast")?;
    let tally = check(&finish(bus)?, "broadcast");
    let samples = std::mem::take(&mut state.borrow_mut().samples);
    Ok((samples, started, tally))
}

/// What [`frames`] counted.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Frames {
    /// Frames written for one unicast from the root to the last node (depth 5 of 63).
    pub(crate) root_to_leaf: u64,
    /// Its hop count as the receiver saw it.
    pub(crate) root_to_leaf_hops: u64,
    /// Frames written for one unicast between the two outermost leaves (across the root).
    pub(crate) leaf_to_leaf: u64,
    /// Its hop count as the receiver saw it.
    pub(crate) leaf_to_leaf_hops: u64,
    /// Frames written for one broadcast.
    pub(crate) broadcast: u64,
    /// Processes in the tree.
    pub(crate) n: usize,
}

/// Envelope frames written per unicast in a tree of `n` processes, from the routers' link
/// counters (`LinkStats::frames_sent`, summed over every link of every process). Each
/// process writes its count to shared memory when a snapshot broadcast reaches it; a
/// snapshot broadcast itself adds `n - 1` frames, subtracted.
pub(crate) fn frames(n: usize) -> io::Result<(Frames, Tally)> {
    let (mut bus, shm, _state, _) = build_tree(n)?;
    let last = n - 1;
    let first_leaf = n / 2;
    let mut k = 0u64;
    let mut snapshot = |bus: &mut Bus| -> io::Result<u64> {
        k += 1;
        let mut payload = vec![SNAPSHOT];
        payload.extend_from_slice(&k.to_be_bytes());
        send(bus, to::broadcast(), payload);
        let mine = frames_sent(bus);
        let s = shm.clone();
        let want = k;
        run_until(bus, Duration::from_micros(200), "snapshot", move || {
            (1..s.n).all(|i| s.get(TreeShm::SNAPSHOT, i) == want)
        })?;
        Ok(mine + (1..n).map(|i| shm.get(TreeShm::FRAMES, i)).sum::<u64>())
    };
    let flood = (n - 1) as u64;
    // Also settles the routes: every route update the root had forwarded is ahead of it.
    let s0 = snapshot(&mut bus)?;
    let leaf_pid = u32::try_from(shm.get(TreeShm::PID, last)).unwrap_or(0);
    let first_pid = u32::try_from(shm.get(TreeShm::PID, first_leaf)).unwrap_or(0);

    send(&mut bus, to::pid(Pid::from_raw(leaf_pid)), vec![PROBE]);
    let s = shm.clone();
    run_until(&mut bus, Duration::from_micros(200), "unicast", move || {
        s.get(TreeShm::PROBES, last) == 1
    })?;
    let s1 = snapshot(&mut bus)?;
    let root_to_leaf_hops = shm.get(TreeShm::PROBE_HOPS, last);

    let before = shm.get(TreeShm::STAMP, last);
    let mut payload = vec![MARK];
    payload.extend_from_slice(&u64::MAX.to_be_bytes());
    send(&mut bus, to::broadcast(), payload);
    let s = shm.clone();
    run_until(
        &mut bus,
        Duration::from_micros(200),
        "broadcast",
        move || (1..s.n).all(|i| s.get(TreeShm::STAMP, i) > before),
    )?;
    let s2 = snapshot(&mut bus)?;

    let mut payload = vec![FORWARD];
    payload.extend_from_slice(&leaf_pid.to_be_bytes());
    send(&mut bus, to::pid(Pid::from_raw(first_pid)), payload);
    let s = shm.clone();
    run_until(
        &mut bus,
        Duration::from_micros(200),
        "leaf to leaf",
        move || s.get(TreeShm::PROBES, last) == 2,
    )?;
    let s3 = snapshot(&mut bus)?;
    let instruction_hops = shm.get(TreeShm::PROBE_HOPS, first_leaf);
    let leaf_to_leaf_hops = shm.get(TreeShm::PROBE_HOPS, last);

    let tally = check(&finish(bus)?, "frames");
    let f = Frames {
        root_to_leaf: (s1 - s0).saturating_sub(flood),
        root_to_leaf_hops,
        broadcast: (s2 - s1).saturating_sub(flood),
        leaf_to_leaf: (s3 - s2).saturating_sub(flood + instruction_hops),
        leaf_to_leaf_hops,
        n,
    };
    Ok((f, tally))
}

// ---------------------------------------------------------------------------------------
// Fork-to-ready and memory at rest

/// Stops the loop on every READY.
struct OnReady;

impl Listener for OnReady {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        if msg.payload().first() == Some(&READY) {
            bus.stop();
        }
    }
}

/// What [`idle_children`] measured.
#[derive(Debug)]
pub(crate) struct Idle {
    /// Per child: from just before `fork` until the root's listener had its first message.
    pub(crate) ready: Samples,
    /// Per child at rest: (RSS, PSS) in KiB.
    pub(crate) memory: Vec<(u64, u64)>,
}

/// Forks `k` children one after the other from one root, each saying it is ready with its
/// first message; after `rest`, reads every child's memory.
pub(crate) fn idle_children(k: usize, rest: Duration) -> io::Result<(Idle, Tally)> {
    let mut bus = root_bus()?;
    bus.add_listener(0, OnReady);
    let mut ready = Samples::with_capacity(k);
    for _ in 0..k {
        let t = Instant::now();
        bus.fork(ForkOptions::default(), |bus| {
            if let Some(parent) = bus.parent() {
                send(bus, parent, vec![READY]);
            }
        })
        .map_err(io::Error::from)?;
        run_until_stopped(&mut bus, "fork to ready")?;
        ready.push(t.elapsed());
    }
    std::thread::sleep(rest);
    let mut memory = Vec::with_capacity(k);
    for pid in bus.children() {
        memory.push(rss_pss_kib(nix::unistd::Pid::from_raw(
            i32::try_from(pid.as_raw()).unwrap_or(0),
        ))?);
    }
    let tally = check(&finish(bus)?, "idle children");
    Ok((Idle { ready, memory }, tally))
}
