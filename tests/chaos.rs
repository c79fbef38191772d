//! The chaos test (issue 9, "Proof"): a 16-process tree under load, drained gracefully
//! (nothing may be lost) or SIGKILLed at random under supervision (every outcome must be
//! true), checked from what every process wrote to a log of its own.
//!
//! ```text
//!                            root
//!          ┌──────────────────┼──────────────────┐
//!          m1                 m2                 m3
//!    ┌────┬┴───┬────┐   ┌────┬┴───┬────┐   ┌────┬┴───┬────┐
//!  m1/l1 m1/l2 …  m1/l4 m2/l1 …      m2/l4 m3/l1 …      m3/l4
//! ```
//!
//! **Traffic.** The root and every leaf keep `W` envelopes with receipts in flight to random
//! leaves (themselves included), half by name and half by pid (the pid the name resolves
//! to at the sender), sending a new one whenever an outcome comes, and after
//! `on_send_ready` when a send was refused with `QueueFull`. The payload is a per-sender
//! counter `n`.
//!
//! **Logs.** Every process opens `<pid>.<incarnation>.log` itself (O_APPEND; a forked child
//! keeps no inherited descriptor) and writes every line with one `write(2)`, so what it
//! wrote before a SIGKILL survives, line by line. Not quite whole lines: Linux checks for a
//! fatal signal between the pages of a buffered write, so a line that crosses a 4 KiB
//! boundary of the file can be cut there (seen twice in 130 runs, both at an exact
//! multiple of 4096 bytes). The checker drops a last line without its newline, which only
//! a killed process can leave: cut in a handler, it changes nothing the checks rely on
//! (an envelope whose `sent` line was cut never left its dead sender):
//!
//! ```text
//!   start   <me> <role> <name> <ppid>
//!   sent    <me> <seq> <n> name:<name>@<bound pid>|pid:<pid> <time>
//!   recv    <origin> <seq> <n> <me>
//!   outcome <me> <seq> <n> delivered|lost:<reason>|unknown:<reason> <payload n> <at>
//!   refused <me> shutting-down           drain  <me>         exit <pid> code:<c>|signal:<s>
//!   spawn   <pid> <generation> <time>    kill   leaf|middle <name> <pid>
//!   tally   <processes> <unreported> <balanced> <Tally {..}>
//!   done    <me> <queue-full refusals> <send-ready wake-ups>   (the bus returned Shutdown)
//! ```
//!
//! where `<me>`, `<origin>` are `pid.incarnation`, `<seq>` is the router's sequence
//! number of the envelope (`MessageId::seq`) and `<time>` is `CLOCK_MONOTONIC` in
//! nanoseconds (one clock for every process). Children run their loop inside their closure
//! so that they can write `done` when it returns `Stop::Shutdown`, then leave with `_exit`
//! as the library does.
//!
//! **The checker** (in the harness's main process, once every process was reaped) reads
//! every log and checks: at most one outcome per envelope, exactly one at every sender that
//! wrote `done`; outcomes only for envelopes sent, with the payload of a loss given back
//! whole; `delivered` ⇒ received exactly once; a sure loss ⇒ received nowhere; nothing
//! received twice, nothing received that was not sent or not as sent (payload), nothing
//! received elsewhere than addressed (the holder of the name, the node with the pid); per
//! (origin, receiving node) sequence numbers in increasing order; no send accepted after
//! the drain began there; every child exit 0 unless the schedule killed it. Names are
//! bound at the sender: a sender logs the pid its name resolved to in its own table (what
//! its router binds the envelope to, `Destination::NameAt`), and the envelope must be
//! received by that very process (a pid may be reused, an incarnation not: the checker
//! compares pids, which only a reuse within one run could fool) — or, with
//! `WhileDown::Queue`, bound to the custodian (the leaf's supervising middle) and handed
//! by it to the restart. In queue mode such hand-overs must happen. Its own teeth
//! are tested on hand-made logs (`0_checker_*`).
//!
//! **Scenarios.**
//! - `1_drain_w32`: middles and leaves are plain forks. After 300 ms of traffic the root
//!   SIGTERMs itself. Nothing may be lost: every outcome `delivered`, every process wrote
//!   `done` and exited 0, the root's tally is `balanced()` with 16 processes and none
//!   unreported.
//! - `1_drain_w32_queue64`, `2_drain_w128_queue64`: the same with
//!   `max_queue_envelopes = 64` in every process, so that 13 senders funnelled through the
//!   root overflow its links: a forwarding node whose next link is full holds back its
//!   input (backpressure, hop by hop) and loses nothing, so these are lossless too. With
//!   `W` = 128 over a bound of 64, the senders' own sends are refused and retried after
//!   `on_send_ready`, and the check demands that this happened. The heavy `1_drain_w4096`
//!   (13 × 4096 in flight over the default bound of 4096) is lossless as well.
//! - `3_chaos_seed<N>`: leaves are supervised by their middle (`Restart::Always`, fast
//!   backoff, generous intensity), middles by the root (the same: a killed middle comes
//!   back and starts four new leaves under the same names). A schedule seeded with `N`
//!   SIGKILLs a random leaf every 40–200 ms for 2.2 s, a middle one time in ten (its
//!   leaves die with it: `PR_SET_PDEATHSIG`), then the root SIGTERMs itself. Killed
//!   middles' leaves are reparented to the harness: the driver checks that every process
//!   it reaped is such a leaf (or a process that left no log), killed or gone with its
//!   parent, at most four per middle killed.
//! - `4_chaos_queue64_seed<N>`: the same with `WhileDown::Queue { capacity: 64 }` on the
//!   leaves: envelopes sent by name while a leaf is down are held by its middle and
//!   delivered to the restart.
//!
//! **Knobs.** `FORKBUS_CHAOS_SEEDS` (`1,2,3` by default; a list, ranges `a..b` allowed),
//! `FORKBUS_CHAOS_QUEUE_SEEDS` (`1`), `FORKBUS_CHAOS_LOAD=<W>` sets the window of the heavy drain
//! (4096 by default: the issue's heavy case),
//! `FORKBUS_CHAOS_KEEP_LOGS=1` keeps the log directory, `FORKBUS_CHAOS_CHECK=<dir>` checks
//! a kept scenario directory again (and runs nothing else). A
//! command-line argument filters scenarios by name, as in every process test.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{run_until, Driver, Harness, Orphans, RootEnd};
use forkbus::error::{BusError, SendError};
use forkbus::supervisor::{Backoff, ChildId, WhileDown};
use forkbus::supervisor::{ChildSpec, Restart, SupervisionEvent, Supervisor};
use forkbus::{
    to, Address, Bus, BusConfig, ExitStatus, Fate, ForkOptions, Listener, LossReport, Message,
    MessageId, NodeId, Pid, SendOptions, ServiceEvent, Stop,
};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;

const MIDDLES: usize = 3;
const LEAVES_PER_MIDDLE: usize = 4;
/// Root, middles, leaves.
const PROCESSES: usize = 1 + MIDDLES + MIDDLES * LEAVES_PER_MIDDLE;

/// Traffic before the drain's SIGTERM.
const DRAIN_TRAFFIC: Duration = Duration::from_millis(300);
/// How long the chaos schedule kills.
const CHAOS_PHASE: Duration = Duration::from_millis(2200);
/// Hard deadline of a scenario (normal runs take 1–5 s).
const DEADLINE: Duration = Duration::from_secs(50);

fn middle_name(m: usize) -> String {
    format!("m{m}")
}

fn leaf_name(m: usize, l: usize) -> String {
    format!("m{m}/l{l}")
}

fn leaf_names() -> Vec<String> {
    (1..=MIDDLES)
        .flat_map(|m| (1..=LEAVES_PER_MIDDLE).map(move |l| leaf_name(m, l)))
        .collect()
}

fn middle_names() -> Vec<String> {
    (1..=MIDDLES).map(middle_name).collect()
}

// ---------------------------------------------------------------------------------------
// Small tools.

/// SplitMix64: a seeded generator good enough for schedules.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A node as the logs write it: `pid.incarnation`.
#[derive(Clone, Copy)]
struct N(NodeId);

impl fmt::Display for N {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:x}", self.0.pid, self.0.incarnation)
    }
}

/// An optional number as the logs write it (`-` for none).
struct Opt(Option<u64>);

impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => n.fmt(f),
            None => f.write_str("-"),
        }
    }
}

fn fate_token(fate: Fate) -> String {
    match fate {
        Fate::Lost(r) => format!("lost:{r:?}"),
        Fate::Unknown(r) => format!("unknown:{r:?}"),
    }
}

fn status_token(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(c) => format!("code:{c}"),
        ExitStatus::Signal(s) => format!("signal:{s}"),
    }
}

/// A process's own log: every line one `write(2)` on an `O_APPEND` descriptor opened in
/// this process (a SIGKILL may cut the last line at a page boundary; see the module doc).
struct Log {
    fd: OwnedFd,
    line: String,
}

impl Log {
    fn create(dir: &Path, me: NodeId) -> Self {
        let path = dir.join(format!("{}.{:x}.log", me.pid, me.incarnation));
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self {
            fd: file.into(),
            line: String::with_capacity(160),
        }
    }

    fn write(&mut self, args: fmt::Arguments<'_>) {
        self.line.clear();
        let _ = self.line.write_fmt(args);
        self.line.push('\n');
        let bytes = self.line.as_bytes();
        loop {
            match nix::unistd::write(&self.fd, bytes) {
                // A regular file takes a short line whole; a short count would only come
                // with a full disk, and the checker would see a broken line.
                Ok(_) => return,
                Err(Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }
}

macro_rules! logln {
    ($log:expr, $($arg:tt)*) => {
        $log.write(format_args!($($arg)*))
    };
}

// ---------------------------------------------------------------------------------------
// What every process runs: a log, a listener, and (root and leaves) a sender.

/// What a scenario's processes are told.
#[derive(Clone, Debug)]
struct Ctx {
    dir: PathBuf,
    /// Envelopes each sender keeps in flight.
    window: usize,
    /// `RouterConfig::max_queue_envelopes`, when not the default.
    max_queue: Option<usize>,
    seed: u64,
    /// Supervised tree, kills, and a periodic retry besides `on_send_ready`.
    chaos: bool,
    /// `WhileDown::Queue` capacity of the leaves.
    hold: Option<usize>,
}

/// A sender: `window` envelopes with receipts in flight to random leaves.
struct Sender {
    rng: Rng,
    window: usize,
    leaves: Vec<String>,
    middles: Vec<String>,
    /// The last pid each leaf name resolved to here.
    pids: HashMap<String, u32>,
    /// In flight: router sequence number → payload counter.
    inflight: HashMap<u64, u64>,
    next_n: u64,
    started: bool,
    /// Refused for a full queue: wait for `on_send_ready` (or, in chaos, the retry tick).
    blocked: bool,
    /// Refused for shutting down: the drain began.
    refused: bool,
    queue_full: u64,
    ready: u64,
}

impl Sender {
    /// A random leaf, by name or by the pid its name resolves to here (a leaf that is
    /// down: its last known pid, else its name).
    fn pick(&mut self, bus: &Bus) -> (Address, String) {
        let name = self.leaves[self.rng.below(self.leaves.len())].clone();
        let router = bus.router();
        let by_name = |name: &str| {
            // What the router binds it to (`NameAt`): the holder in this table.
            let bound = router.resolve(&to::name(name)).map(|n| u64::from(n.pid));
            (to::name(name), format!("name:{name}@{}", Opt(bound)))
        };
        if self.rng.below(2) == 0 {
            return by_name(&name);
        }
        let middle_pids: Vec<u32> = self
            .middles
            .iter()
            .filter_map(|m| router.resolve(&to::name(m.as_str())).map(|n| n.pid))
            .collect();
        // While a leaf is down its name may be held by its middle (custody): not a leaf.
        let node = router
            .resolve(&to::name(name.as_str()))
            .filter(|n| !middle_pids.contains(&n.pid));
        if let Some(n) = node {
            self.pids.insert(name.clone(), n.pid);
        }
        match self.pids.get(&name) {
            Some(&pid) => (to::pid(Pid::from_raw(pid)), format!("pid:{pid}")),
            None => by_name(&name),
        }
    }
}

/// One process's state, shared by its listener, timers and code.
struct Proc {
    me: NodeId,
    log: Log,
    sender: Option<Sender>,
}

type Shared = Rc<RefCell<Proc>>;

impl Proc {
    /// Opens this process's log, writes its start line and listens.
    fn install(bus: &mut Bus, ctx: &Ctx, role: &str, name: &str, sends: bool) -> Shared {
        let me = bus.node();
        let mut log = Log::create(&ctx.dir, me);
        logln!(
            log,
            "start {} {role} {name} {}",
            N(me),
            nix::unistd::getppid()
        );
        let seed = ctx.seed ^ (u64::from(me.pid) << 32 | u64::from(me.incarnation));
        let sender = sends.then(|| Sender {
            rng: Rng::new(seed),
            window: ctx.window,
            leaves: leaf_names(),
            middles: middle_names(),
            pids: HashMap::new(),
            inflight: HashMap::new(),
            next_n: 0,
            started: false,
            blocked: false,
            refused: false,
            queue_full: 0,
            ready: 0,
        });
        let shared = Rc::new(RefCell::new(Self { me, log, sender }));
        bus.add_listener(0, Ear(shared.clone()));
        shared
    }

    /// Sends until the window is full (or a send is refused).
    fn pump(&mut self, bus: &mut Bus) {
        let me = self.me;
        let Some(s) = self.sender.as_mut() else {
            return;
        };
        let receipt = SendOptions {
            receipt: true,
            ..SendOptions::default()
        };
        while s.started && !s.blocked && !s.refused && s.inflight.len() < s.window {
            let (to, desc) = s.pick(bus);
            let n = s.next_n;
            match bus.send_with(to, &n, receipt) {
                Ok(id) => {
                    s.next_n += 1;
                    s.inflight.insert(id.seq, n);
                    let t = forkbus::bus::monotonic_now().as_nanos();
                    logln!(self.log, "sent {} {} {n} {desc} {t}", N(me), id.seq);
                }
                Err(SendError::QueueFull { .. }) => {
                    s.blocked = true;
                    s.queue_full += 1;
                }
                Err(SendError::ShuttingDown) => {
                    s.refused = true;
                    logln!(self.log, "refused {} shutting-down", N(me));
                }
                Err(e) => {
                    s.refused = true;
                    logln!(self.log, "error {} send refused: {e}", N(me));
                }
            }
        }
    }

    fn outcome(
        &mut self,
        bus: &mut Bus,
        id: MessageId,
        fate: &str,
        payload: Option<u64>,
        at: &str,
    ) {
        let me = self.me;
        let n = self
            .sender
            .as_mut()
            .and_then(|s| s.inflight.remove(&id.seq));
        logln!(
            self.log,
            "outcome {} {} {} {fate} {} {at}",
            N(me),
            id.seq,
            Opt(n),
            Opt(payload)
        );
        self.pump(bus);
    }
}

struct Ear(Shared);

impl Listener for Ear {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        let id = msg.id();
        let n = msg.decode::<u64>().ok();
        let mut p = self.0.borrow_mut();
        let me = p.me;
        logln!(
            p.log,
            "recv {} {} {} {}",
            N(id.origin),
            id.seq,
            Opt(n),
            N(me)
        );
    }

    fn on_delivered(&mut self, bus: &mut Bus, id: MessageId) {
        self.0.borrow_mut().outcome(bus, id, "delivered", None, "-");
    }

    fn on_lost(&mut self, bus: &mut Bus, r: &LossReport) {
        let payload = r
            .payload
            .as_deref()
            .and_then(|b| forkbus::bus::decode::<u64>(b).ok());
        let at = N(r.at).to_string();
        self.0
            .borrow_mut()
            .outcome(bus, r.id, &fate_token(r.fate), payload, &at);
    }

    fn on_send_ready(&mut self, bus: &mut Bus) {
        let mut p = self.0.borrow_mut();
        if let Some(s) = p.sender.as_mut() {
            s.ready += 1;
            s.blocked = false;
        }
        p.pump(bus);
    }

    fn on_shutdown(&mut self, _bus: &mut Bus) {
        let mut p = self.0.borrow_mut();
        let me = p.me;
        logln!(p.log, "drain {}", N(me));
    }

    fn on_child_exit(&mut self, _bus: &mut Bus, pid: Pid, status: ExitStatus) {
        logln!(
            self.0.borrow_mut().log,
            "exit {pid} {}",
            status_token(status)
        );
    }

    fn on_service(&mut self, _bus: &mut Bus, event: &ServiceEvent) {
        if let ServiceEvent::Supervision(event) = event {
            let mut p = self.0.borrow_mut();
            match event {
                // Written before the new process's name can be announced (the announcement
                // leaves with the next write): no sender can know it before this time.
                SupervisionEvent::Started {
                    pid, generation, ..
                } => {
                    let t = forkbus::bus::monotonic_now().as_nanos();
                    logln!(p.log, "spawn {pid} {generation} {t}");
                }
                SupervisionEvent::GaveUp { child, restarts } => {
                    logln!(
                        p.log,
                        "error gave up on {child:?} after {restarts} restarts"
                    );
                }
                _ => {}
            }
        }
    }

    fn on_router_error(&mut self, _bus: &mut Bus, error: &BusError) {
        let text = error.to_string().replace('\n', " ");
        let kind = if matches!(
            error,
            BusError::ListenerPanicked { .. } | BusError::CallbackPanicked { .. }
        ) {
            "panic"
        } else {
            "bus"
        };
        logln!(self.0.borrow_mut().log, "error {kind} {text}");
    }
}

/// Starts sending once every leaf and middle name resolves here, or after `patience`.
fn start_when_known(bus: &mut Bus, p: Shared, patience: Instant) {
    bus.add_timer(Duration::from_millis(2), move |bus| {
        if names_known(bus) || Instant::now() >= patience {
            let mut q = p.borrow_mut();
            if let Some(s) = q.sender.as_mut() {
                s.started = true;
            }
            q.pump(bus);
        } else {
            start_when_known(bus, p, patience);
        }
    });
}

fn names_known(bus: &Bus) -> bool {
    leaf_names()
        .iter()
        .chain(middle_names().iter())
        .all(|n| bus.router().resolve(&to::name(n.as_str())).is_some())
}

/// In chaos, a refused send may wait on a link that goes down before it has room: retry
/// every 20 ms besides `on_send_ready`.
fn retry_tick(bus: &mut Bus, p: Shared) {
    bus.add_timer(Duration::from_millis(20), move |bus| {
        {
            let mut q = p.borrow_mut();
            if let Some(s) = q.sender.as_mut() {
                s.blocked = false;
            }
            q.pump(bus);
        }
        if !bus.is_stopping() {
            retry_tick(bus, p);
        }
    });
}

/// Runs a child's loop and leaves as the library would (`_exit` with 0 after a drain),
/// having written `done` when the loop returned `Stop::Shutdown`.
fn serve(bus: &mut Bus, p: &Shared) -> ! {
    // A supervised worker says it is up here, since its closure never returns.
    forkbus::supervisor::ready(bus);
    let stop = bus.run();
    let code = {
        let mut q = p.borrow_mut();
        let me = q.me;
        let (qf, ready) = q
            .sender
            .as_ref()
            .map_or((0, 0), |s| (s.queue_full, s.ready));
        match stop {
            Ok(Stop::Shutdown(_)) => {
                logln!(q.log, "done {} {qf} {ready}", N(me));
                0
            }
            Ok(Stop::ParentGone) => {
                logln!(q.log, "gone {}", N(me));
                forkbus::bus::EXIT_PARENT_GONE
            }
            Ok(other) => {
                logln!(q.log, "error bus loop ended with {other:?}");
                3
            }
            Err(e) => {
                logln!(q.log, "error bus loop failed: {e}");
                forkbus::bus::EXIT_OS_ERROR
            }
        }
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: ends this forked child at once, as the library's own child exit does after
    // its loop: it never returns into the code that forked it.
    unsafe { nix::libc::_exit(code) }
}

fn leaf(bus: &mut Bus, ctx: &Ctx, name: &str) -> ! {
    let p = Proc::install(bus, ctx, "leaf", name, true);
    let patience = if ctx.chaos {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(20)
    };
    start_when_known(bus, p.clone(), Instant::now() + patience);
    if ctx.chaos {
        retry_tick(bus, p.clone());
    }
    serve(bus, &p)
}

/// A middle of the drain scenario: four plainly forked leaves.
fn plain_middle(bus: &mut Bus, ctx: &Ctx, m: usize) -> ! {
    let p = Proc::install(bus, ctx, "middle", &middle_name(m), false);
    for l in 1..=LEAVES_PER_MIDDLE {
        let name = leaf_name(m, l);
        let c = ctx.clone();
        let n = name.clone();
        if let Err(e) = bus.fork(ForkOptions::named(name), move |bus| leaf(bus, &c, &n)) {
            logln!(p.borrow_mut().log, "error fork leaf: {e}");
        }
    }
    serve(bus, &p)
}

fn fast_backoff() -> Backoff {
    let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
    b.reset_after = Duration::from_millis(200);
    b
}

fn spec(name: String) -> ChildSpec {
    ChildSpec::named(name)
        .restart(Restart::Always)
        .backoff(fast_backoff())
        .intensity(10_000, Duration::from_secs(60))
}

/// A middle of the chaos scenario: supervises its four leaves.
fn supervising_middle(bus: &mut Bus, ctx: &Ctx, m: usize) -> ! {
    let p = Proc::install(bus, ctx, "middle", &middle_name(m), false);
    let sup = Supervisor::new(bus);
    for l in 1..=LEAVES_PER_MIDDLE {
        let name = leaf_name(m, l);
        let mut s = spec(name.clone());
        if let Some(capacity) = ctx.hold {
            s = s.while_down(WhileDown::Queue { capacity });
        }
        let c = ctx.clone();
        if let Err(e) = sup.spawn(bus, s, move |bus| leaf(bus, &c, &name)) {
            logln!(p.borrow_mut().log, "error spawn leaf: {e}");
        }
    }
    serve(bus, &p)
}

// ---------------------------------------------------------------------------------------
// The root.

/// The kill schedule.
struct Chaos {
    rng: Rng,
    sup: Supervisor,
    middles: Vec<ChildId>,
    end: Instant,
}

fn sigterm_self(p: &Shared) {
    logln!(p.borrow_mut().log, "sigterm");
    let _ = kill(nix::unistd::getpid(), Signal::SIGTERM);
}

/// Whether a pid is a live process of this scenario (its process group, not a zombie the
/// routing table has not buried yet): never kill another, nor count a dead one.
fn ours(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(raw)));
    group == Ok(nix::unistd::getpgrp()) && !matches!(common::proc_state(pid), None | Some('Z'))
}

fn kill_one(bus: &mut Bus, p: &Shared, c: &mut Chaos) {
    if c.rng.below(10) == 0 {
        let m = c.rng.below(MIDDLES);
        let Some(pid) = c.sup.pid(bus, c.middles[m]) else {
            return;
        };
        if bus.children().contains(&pid) && ours(pid.as_raw()) {
            logln!(
                p.borrow_mut().log,
                "kill middle {} {pid}",
                middle_name(m + 1)
            );
            let _ = kill(common::nix_pid(pid), Signal::SIGKILL);
        }
        return;
    }
    let name = leaf_name(1 + c.rng.below(MIDDLES), 1 + c.rng.below(LEAVES_PER_MIDDLE));
    let middles = c.sup.pids(bus);
    let Some(node) = bus.router().resolve(&to::name(name.as_str())) else {
        return; // down
    };
    if node == bus.node() || middles.iter().any(|m| m.as_raw() == node.pid) {
        return; // held in custody by its middle: down
    }
    if ours(node.pid) {
        logln!(p.borrow_mut().log, "kill leaf {name} {}", node.pid);
        let _ = kill(common::nix_pid(Pid::from_raw(node.pid)), Signal::SIGKILL);
    }
}

fn schedule_kills(bus: &mut Bus, p: Shared, c: Rc<RefCell<Chaos>>) {
    let delay = Duration::from_millis(40 + c.borrow_mut().rng.below(161) as u64);
    bus.add_timer(delay, move |bus| {
        if Instant::now() >= c.borrow().end {
            sigterm_self(&p);
            return;
        }
        kill_one(bus, &p, &mut c.borrow_mut());
        schedule_kills(bus, p, c);
    });
}

fn root(ctx: &Ctx) -> Result<(), String> {
    let mut config = BusConfig::default();
    if let Some(q) = ctx.max_queue {
        config.router.max_queue_envelopes = q;
    }
    let mut bus = Bus::root(config).map_err(|e| format!("root bus: {e}"))?;
    let p = Proc::install(&mut bus, ctx, "root", "root", true);
    let mut chaos = None;
    if ctx.chaos {
        let sup = Supervisor::new(&mut bus);
        let mut middles = Vec::new();
        for m in 1..=MIDDLES {
            let c = ctx.clone();
            let child = sup
                .spawn(&mut bus, spec(middle_name(m)), move |bus| {
                    supervising_middle(bus, &c, m)
                })
                .map_err(|e| format!("spawn middle: {e}"))?;
            middles.push(child);
        }
        chaos = Some(Rc::new(RefCell::new(Chaos {
            rng: Rng::new(ctx.seed),
            sup,
            middles,
            end: Instant::now(),
        })));
    } else {
        for m in 1..=MIDDLES {
            let c = ctx.clone();
            bus.fork(ForkOptions::named(middle_name(m)), move |bus| {
                plain_middle(bus, &c, m)
            })
            .map_err(|e| format!("fork middle: {e}"))?;
        }
    }
    run_until(&mut bus, Duration::from_secs(20), |b| names_known(b))
        .map_err(|e| format!("the tree did not come up: {e}"))?;
    {
        let mut q = p.borrow_mut();
        if let Some(s) = q.sender.as_mut() {
            s.started = true;
        }
        q.pump(&mut bus);
    }
    match chaos {
        Some(c) => {
            c.borrow_mut().end = Instant::now() + CHAOS_PHASE;
            retry_tick(&mut bus, p.clone());
            schedule_kills(&mut bus, p.clone(), c);
        }
        None => {
            let q = p.clone();
            bus.add_timer(DRAIN_TRAFFIC, move |_| sigterm_self(&q));
        }
    }
    let stop = bus.run().map_err(|e| format!("root loop: {e}"))?;
    let Stop::Shutdown(t) = stop else {
        return Err(format!("the root's loop ended with {stop:?}"));
    };
    {
        let mut q = p.borrow_mut();
        let me = q.me;
        let (qf, ready) = q
            .sender
            .as_ref()
            .map_or((0, 0), |s| (s.queue_full, s.ready));
        logln!(
            q.log,
            "tally {} {} {} {t:?}",
            t.processes,
            t.unreported,
            t.balanced()
        );
        logln!(q.log, "done {} {qf} {ready}", N(me));
    }
    let clean = t.balanced() && t.unreported == 0 && t.processes == PROCESSES as u64;
    if !ctx.chaos && !clean {
        return Err(format!("the drain's tally is off: {t:?}"));
    }
    if !bus.children().is_empty() {
        return Err(format!("children left: {:?}", bus.children()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The checker.

#[derive(Clone, Debug, PartialEq, Eq)]
enum To {
    /// A name, and the pid it was bound to at the sender (none: unknown there).
    Name(String, Option<u32>),
    Pid(u32),
}

#[derive(Clone, Debug)]
struct SentLine {
    n: u64,
    to: To,
    /// Line number in its log.
    at: usize,
}

#[derive(Clone, Debug)]
struct OutcomeLine {
    n: Option<u64>,
    fate: String,
    payload: Option<u64>,
    /// Where it was lost (`-` for a receipt).
    at: String,
}

#[derive(Clone, Debug)]
struct RecvLine {
    origin: String,
    seq: u64,
    n: Option<u64>,
}

/// One process's log, parsed.
#[derive(Clone, Debug, Default)]
struct ProcLog {
    file: String,
    me: String,
    pid: u32,
    role: String,
    name: String,
    ppid: u32,
    done: bool,
    drain_at: Option<usize>,
    sent: HashMap<u64, SentLine>,
    outcomes: BTreeMap<u64, Vec<OutcomeLine>>,
    recvs: Vec<RecvLine>,
    exits: Vec<(u32, String)>,
    kills: Vec<(String, String, u32)>,
    /// Processes its supervisors spawned.
    spawns: usize,
    refused: usize,
    errors: Vec<String>,
    tally: Option<(u64, u64, bool, String)>,
    queue_full: u64,
    ready: u64,
    /// The last line was cut (no newline): dropped.
    torn: bool,
    problems: Vec<String>,
}

fn num<T: std::str::FromStr>(s: Option<&str>) -> Option<T> {
    s.and_then(|s| s.parse().ok())
}

fn opt_num(s: Option<&str>) -> Option<Option<u64>> {
    match s {
        Some("-") => Some(None),
        Some(s) => s.parse().ok().map(Some),
        None => None,
    }
}

fn parse_log(file: &str, text: &str) -> ProcLog {
    // A line cut by a SIGKILL is the last one, without its newline.
    let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
    let mut p = ProcLog {
        file: file.to_owned(),
        torn: whole.len() < text.len(),
        ..ProcLog::default()
    };
    let text = whole;
    for (i, line) in text.lines().enumerate() {
        let mut f = line.split_whitespace();
        let kind = f.next().unwrap_or("");
        let ok = match kind {
            "start" => (|| {
                p.me = f.next()?.to_owned();
                p.pid = num(p.me.split('.').next())?;
                p.role = f.next()?.to_owned();
                p.name = f.next()?.to_owned();
                p.ppid = num(f.next())?;
                Some(())
            })(),
            "sent" => (|| {
                let _me = f.next()?;
                let seq: u64 = num(f.next())?;
                let n = num(f.next())?;
                let to = f.next()?;
                let to = if let Some(name) = to.strip_prefix("name:") {
                    let (name, bound) = name.split_once('@')?;
                    let bound = opt_num(Some(bound))?.map(u32::try_from).transpose().ok()?;
                    To::Name(name.to_owned(), bound)
                } else {
                    To::Pid(num(to.strip_prefix("pid:"))?)
                };
                let _time: u64 = num(f.next())?;
                if p.sent.insert(seq, SentLine { n, to, at: i }).is_some() {
                    p.problems.push(format!("{file}: seq {seq} sent twice"));
                }
                Some(())
            })(),
            "recv" => (|| {
                let origin = f.next()?.to_owned();
                let seq = num(f.next())?;
                let n = opt_num(f.next())?;
                p.recvs.push(RecvLine { origin, seq, n });
                Some(())
            })(),
            "outcome" => (|| {
                let _me = f.next()?;
                let seq = num(f.next())?;
                let n = opt_num(f.next())?;
                let fate = f.next()?.to_owned();
                let payload = opt_num(f.next())?;
                let at = f.next()?.to_owned();
                p.outcomes.entry(seq).or_default().push(OutcomeLine {
                    n,
                    fate,
                    payload,
                    at,
                });
                Some(())
            })(),
            "exit" => (|| {
                let pid = num(f.next())?;
                p.exits.push((pid, f.next()?.to_owned()));
                Some(())
            })(),
            "kill" => (|| {
                let what = f.next()?.to_owned();
                let name = f.next()?.to_owned();
                let pid = num(f.next())?;
                p.kills.push((what, name, pid));
                Some(())
            })(),
            "tally" => (|| {
                let processes = num(f.next())?;
                let unreported = num(f.next())?;
                let balanced = num(f.next())?;
                let rest: Vec<&str> = f.collect();
                p.tally = Some((processes, unreported, balanced, rest.join(" ")));
                Some(())
            })(),
            "done" => (|| {
                let _me = f.next()?;
                p.queue_full = num(f.next())?;
                p.ready = num(f.next())?;
                p.done = true;
                Some(())
            })(),
            "drain" => {
                p.drain_at = Some(i);
                Some(())
            }
            "spawn" => {
                p.spawns += 1;
                Some(())
            }
            "refused" => {
                p.refused += 1;
                Some(())
            }
            "error" => {
                p.errors.push(line.to_owned());
                Some(())
            }
            "sigterm" | "gone" => Some(()),
            _ => None,
        };
        if ok.is_none() {
            p.problems
                .push(format!("{file}:{}: cannot parse {line:?}", i + 1));
        }
    }
    if p.me.is_empty() && !text.is_empty() {
        p.problems.push(format!("{file}: no start line"));
    }
    if p.torn && p.done {
        p.problems
            .push(format!("{file}: its last line was cut, yet it wrote done"));
    }
    p
}

fn read_logs(dir: &Path) -> Result<Vec<ProcLog>, String> {
    let mut logs = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        // A process killed between creating its log and its first line left nothing (or
        // a first line cut short).
        if text.contains('\n') {
            logs.push(parse_log(&file, &text));
        }
    }
    logs.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(logs)
}

/// What a scenario demands beyond the promises every run must keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// A drain without kills: nothing lost, everyone `done`, every exit 0, the tally
    /// balanced over 16 processes. With `refusals`, senders must have been refused for a
    /// full queue and woken by `on_send_ready`.
    Lossless {
        /// Local sends refused and retried must have happened.
        refusals: bool,
    },
    /// Kills: any true outcome. With `custody` (`WhileDown::Queue`), envelopes sent by
    /// name while their leaf was down must have reached its restart.
    Chaos {
        /// The leaves' names are held in custody while they are down.
        custody: bool,
    },
}

/// What a run did, for the summary line.
#[derive(Debug, Default)]
struct Summary {
    processes: usize,
    done: usize,
    sent: u64,
    delivered: u64,
    lost: BTreeMap<String, u64>,
    /// Of `lost`, `NoRoute` for envelopes sent by name.
    no_route_by_name: u64,
    /// Bound to a custodian and received by the leaf it held the name for.
    handed: u64,
    unknown: BTreeMap<String, u64>,
    /// Sent by processes that were killed, with no outcome logged.
    open: u64,
    received: u64,
    /// Logs whose last line a SIGKILL cut.
    torn: usize,
    kills_leaf: usize,
    kills_middle: usize,
    refused: usize,
    queue_full: u64,
    ready: u64,
    bus_errors: usize,
    tally: Option<(u64, u64, bool, String)>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} processes ({} done), sent {}, delivered {}, lost {:?} (no route by name {}), \
             unknown {:?}, open at killed senders {}, received {}, cut lines {}, kills {} \
             leaves + {} \
             middles, handed to a restart {}, refused while draining {}, queue-full refusals {} \
             (send-ready {}), bus errors {}",
            self.processes,
            self.done,
            self.sent,
            self.delivered,
            self.lost,
            self.no_route_by_name,
            self.unknown,
            self.open,
            self.received,
            self.torn,
            self.kills_leaf,
            self.kills_middle,
            self.handed,
            self.refused,
            self.queue_full,
            self.ready,
            self.bus_errors
        )?;
        if let Some((p, u, b, _)) = &self.tally {
            write!(
                f,
                "; root tally: {p} processes, {u} unreported, balanced {b}"
            )?;
        }
        Ok(())
    }
}

/// Checks every promise over a run's logs; the violations, or what the run did.
fn check(logs: &[ProcLog], x: Expect) -> Result<Summary, Vec<String>> {
    let mut errs: Vec<String> = Vec::new();
    let mut s = Summary {
        processes: logs.len(),
        ..Summary::default()
    };
    let by_me: HashMap<&str, &ProcLog> = logs.iter().map(|p| (p.me.as_str(), p)).collect();
    for p in logs {
        errs.extend(p.problems.iter().cloned());
        for e in &p.errors {
            if e.starts_with("error bus ") {
                s.bus_errors += 1;
            } else {
                errs.push(format!("{}: {e}", p.file));
            }
        }
        s.done += usize::from(p.done);
        s.torn += usize::from(p.torn);
        s.refused += p.refused;
        s.queue_full += p.queue_full;
        s.ready += p.ready;
        s.sent += p.sent.len() as u64;
        if p.tally.is_some() {
            s.tally.clone_from(&p.tally);
        }
        for (what, _, _) in &p.kills {
            if what == "middle" {
                s.kills_middle += 1;
            } else {
                s.kills_leaf += 1;
            }
        }
    }
    // Receptions: once each, as sent, where addressed, in order per origin.
    let custody = matches!(x, Expect::Chaos { custody: true });
    let mut received: HashMap<(&str, u64), Vec<&str>> = HashMap::new();
    for p in logs {
        let mut last: HashMap<&str, u64> = HashMap::new();
        for r in &p.recvs {
            s.received += 1;
            if let Some(prev) = last.insert(r.origin.as_str(), r.seq) {
                if r.seq <= prev {
                    errs.push(format!(
                        "out of order: {} received {}/{} after {}/{prev}",
                        p.me, r.origin, r.seq, r.origin
                    ));
                }
            }
            received
                .entry((r.origin.as_str(), r.seq))
                .or_default()
                .push(p.me.as_str());
            let Some(sent) = by_me
                .get(r.origin.as_str())
                .and_then(|o| o.sent.get(&r.seq))
            else {
                errs.push(format!(
                    "{} received {}/{}, which was never sent",
                    p.me, r.origin, r.seq
                ));
                continue;
            };
            if r.n != Some(sent.n) {
                errs.push(format!(
                    "{} received {}/{} with payload {:?}, sent with {}",
                    p.me, r.origin, r.seq, r.n, sent.n
                ));
            }
            let right_place = match &sent.to {
                To::Name(name, Some(bound)) if &p.name == name => {
                    if *bound == p.pid {
                        true
                    } else if custody && *bound == p.ppid {
                        // Held by its supervisor while it was down, handed to this one.
                        s.handed += 1;
                        true
                    } else {
                        false
                    }
                }
                To::Name(..) => false,
                To::Pid(pid) => p.pid == *pid,
            };
            if !right_place {
                errs.push(format!(
                    "{} ({}, pid {}, parent {}) received {}/{}, which was sent to {:?}",
                    p.me, p.name, p.pid, p.ppid, r.origin, r.seq, sent.to
                ));
            }
        }
    }
    for ((origin, seq), at) in &received {
        if at.len() > 1 {
            errs.push(format!(
                "{origin}/{seq} received {} times: at {at:?}",
                at.len()
            ));
        }
    }
    // Outcomes: at most one, for what was sent, true; exactly one at senders that lived.
    for p in logs {
        for (seq, outs) in &p.outcomes {
            if outs.len() > 1 {
                let fates: Vec<&str> = outs.iter().map(|o| o.fate.as_str()).collect();
                errs.push(format!(
                    "{}/{seq} has {} outcomes: {fates:?}",
                    p.me,
                    outs.len()
                ));
            }
            let o = &outs[0];
            let Some(sent) = p.sent.get(seq) else {
                errs.push(format!("{}/{seq} has an outcome but was never sent", p.me));
                continue;
            };
            match o.fate.split_once(':') {
                None if o.fate == "delivered" => s.delivered += 1,
                Some(("lost", why)) => {
                    let key = if o.at == p.me {
                        why.to_owned()
                    } else {
                        format!("{why} (at a hop)")
                    };
                    *s.lost.entry(key).or_default() += 1;
                    if why == "NoRoute" && matches!(sent.to, To::Name(..)) {
                        s.no_route_by_name += 1;
                    }
                }
                Some(("unknown", why)) => *s.unknown.entry(why.to_owned()).or_default() += 1,
                _ => errs.push(format!("{}/{seq}: strange outcome {:?}", p.me, o.fate)),
            }
            if o.n != Some(sent.n) {
                errs.push(format!(
                    "{}/{seq}: outcome for payload {:?}, sent with {}",
                    p.me, o.n, sent.n
                ));
            }
            if o.fate != "delivered" && o.payload != Some(sent.n) {
                errs.push(format!(
                    "{}/{seq} {}: the payload came back as {:?}, sent with {}",
                    p.me, o.fate, o.payload, sent.n
                ));
            }
            let times = received.get(&(p.me.as_str(), *seq)).map_or(0, Vec::len);
            if o.fate == "delivered" && times != 1 {
                errs.push(format!(
                    "{}/{seq} (to {:?}) is delivered but was received {times} times",
                    p.me, sent.to
                ));
            }
            if o.fate.starts_with("lost:") && times != 0 {
                errs.push(format!(
                    "{}/{seq} (to {:?}) is surely {} but was received at {:?}",
                    p.me,
                    sent.to,
                    o.fate,
                    received.get(&(p.me.as_str(), *seq))
                ));
            }
        }
        for (seq, sent) in &p.sent {
            if p.drain_at.is_some_and(|d| sent.at > d) {
                errs.push(format!("{}/{seq} was accepted after the drain began", p.me));
            }
            if p.outcomes.contains_key(seq) {
                continue;
            }
            if p.done {
                errs.push(format!(
                    "{}/{seq} (to {:?}) has no outcome, yet its sender lived to the end",
                    p.me, sent.to
                ));
            } else {
                s.open += 1;
            }
        }
    }
    // Exits: 0, unless the schedule killed the process.
    let killed: HashSet<u32> = logs
        .iter()
        .flat_map(|p| p.kills.iter().map(|(_, _, pid)| *pid))
        .collect();
    let mut exits = 0;
    for p in logs {
        for (pid, status) in &p.exits {
            exits += 1;
            let ok = status == "code:0" || (status == "signal:9" && killed.contains(pid));
            if !ok {
                errs.push(format!("{} saw its child {pid} end with {status}", p.me));
            }
        }
    }
    if let Expect::Lossless { refusals: true } = x {
        if s.queue_full == 0 || s.ready == 0 {
            errs.push(format!(
                "no local send was refused and woken ({} refusals, {} send-ready)",
                s.queue_full, s.ready
            ));
        }
    }
    if custody && s.kills_leaf > 0 && s.handed == 0 {
        errs.push("no envelope held in custody reached a restarted leaf".into());
    }
    if !matches!(x, Expect::Chaos { .. }) {
        if matches!(x, Expect::Lossless { .. })
            && (s.delivered != s.sent || !s.lost.is_empty() || !s.unknown.is_empty())
        {
            errs.push(format!(
                "a drain lost envelopes: sent {}, delivered {}, lost {:?}, unknown {:?}",
                s.sent, s.delivered, s.lost, s.unknown
            ));
        }
        if s.processes != PROCESSES || s.done != PROCESSES {
            errs.push(format!(
                "{} processes logged, {} done; {PROCESSES} expected",
                s.processes, s.done
            ));
        }
        if exits != PROCESSES - 1 {
            errs.push(format!(
                "{exits} child exits seen, {} expected",
                PROCESSES - 1
            ));
        }
        match &s.tally {
            Some((p, 0, true, _)) if *p == PROCESSES as u64 => {}
            other => errs.push(format!("the root's tally: {other:?}")),
        }
    } else if let Some((processes, _, _, _)) = &s.tally {
        if *processes != s.done as u64 {
            errs.push(format!(
                "the root's tally counts {processes} processes, {} logged done",
                s.done
            ));
        }
    } else {
        errs.push("the root wrote no tally".into());
    }
    if errs.is_empty() {
        Ok(s)
    } else {
        Err(errs)
    }
}

/// Processes the harness reaped in a chaos run (not the root): leaves of killed middles,
/// killed with them or gone after them, at most four per middle killed.
fn check_orphans(d: &Driver, logs: &[ProcLog]) -> Result<usize, String> {
    let killed_middles: HashSet<u32> = logs
        .iter()
        .flat_map(|p| p.kills.iter())
        .filter(|(what, _, _)| what == "middle")
        .map(|(_, _, pid)| *pid)
        .collect();
    let mut n = 0;
    for (pid, status) in &d.reaped {
        if *pid == d.root {
            continue;
        }
        n += 1;
        let raw = u32::try_from(pid.as_raw()).unwrap_or(0);
        let how_ok = matches!(
            status,
            WaitStatus::Signaled(_, Signal::SIGKILL, _)
                | WaitStatus::Exited(_, forkbus::bus::EXIT_PARENT_GONE)
        );
        let known = logs.iter().find(|p| p.pid == raw);
        let who_ok = known.is_none_or(|p| p.role == "leaf" && killed_middles.contains(&p.ppid));
        if !how_ok || !who_ok {
            return Err(format!(
                "the harness reaped {pid} ({status:?}, {:?}) which is no leaf of a killed middle",
                known.map(|p| (&p.role, &p.name, p.ppid))
            ));
        }
    }
    if n > LEAVES_PER_MIDDLE * killed_middles.len() {
        return Err(format!(
            "the harness reaped {n} processes, {} middles were killed",
            killed_middles.len()
        ));
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// Scenarios.

fn scenario(h: &mut Harness, base: &Path, name: &str, ctx: Ctx, x: Expect) {
    let dir = base.join(name);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        println!(
            "scenario {name} ... FAILED: cannot create {}: {e}",
            dir.display()
        );
        return;
    }
    let ctx = Ctx {
        dir: dir.clone(),
        ..ctx
    };
    let chaos = ctx.chaos;
    let started = Instant::now();
    let orphans = if chaos { Orphans::Any } else { Orphans::None };
    h.run_with(
        name,
        DEADLINE,
        RootEnd::Success,
        orphans,
        move |_| root(&ctx),
        move |d| {
            // Everything ends first (the root reaps its tree; orphans come here).
            let left = DEADLINE.saturating_sub(started.elapsed() + Duration::from_secs(2));
            d.reap_all(left)?;
            let logs = read_logs(&dir)?;
            let orphans = if chaos { check_orphans(d, &logs)? } else { 0 };
            match check(&logs, x) {
                Ok(s) => {
                    println!("  {s}; orphans reaped by the harness {orphans}");
                    Ok(())
                }
                Err(errs) => {
                    for e in errs.iter().take(12) {
                        println!("  violation: {e}");
                    }
                    let logs = if std::env::var_os("FORKBUS_CHAOS_KEEP_LOGS").is_some() {
                        format!("logs in {}", dir.display())
                    } else {
                        "FORKBUS_CHAOS_KEEP_LOGS=1 keeps the logs".to_owned()
                    };
                    Err(format!("{} violations ({logs})", errs.len()))
                }
            }
        },
    );
}

/// Seeds from a list like `1,2,5..9`.
fn seeds(var: &str, default: &[u64]) -> Vec<u64> {
    let Ok(text) = std::env::var(var) else {
        return default.to_vec();
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once("..") {
            Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(a), Ok(b)) => out.extend(a..b),
                _ => panic!("{var}: cannot read {part:?}"),
            },
            None => out.push(
                part.parse()
                    .unwrap_or_else(|_| panic!("{var}: cannot read {part:?}")),
            ),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The checker's own test: hand-made logs, each with one broken promise.

fn checker_catches_violations() -> Result<(), String> {
    let s = "1.a";
    let r = "2.b";
    // Envelope 0 goes by name (bound at the sender to `bound`), 1 by pid, both to r.
    let sender_bound = |bound: &str, extra: &str| {
        format!(
            "start {s} root root 0\nsent {s} 0 0 name:x@{bound} 10\nsent {s} 1 1 pid:2 20\n\
             {extra}tally 2 0 true Tally\ndone {s} 0 0\n"
        )
    };
    let sender = |extra: &str| sender_bound("2", extra);
    let good_out = "outcome 1.a 0 0 delivered - -\noutcome 1.a 1 1 delivered - -\n";
    let receiver = |extra: &str| format!("start {r} leaf x 1\n{extra}done {r} 0 0\n");
    let good_recv = "recv 1.a 0 0 2.b\nrecv 1.a 1 1 2.b\n";
    let run = |a: &str, b: &str| {
        let logs = vec![parse_log("s", &sender(a)), parse_log("r", &receiver(b))];
        check(&logs, Expect::Chaos { custody: false }).map(|_| ())
    };
    if let Err(e) = run(good_out, good_recv) {
        return Err(format!("good logs refused: {e:?}"));
    }
    let cases: [(&str, &str, &str, &str); 9] = [
        (
            "a receipt without a reception",
            good_out,
            "recv 1.a 1 1 2.b\n",
            "received 0 times",
        ),
        (
            "a duplicate",
            good_out,
            "recv 1.a 0 0 2.b\nrecv 1.a 0 0 2.b\nrecv 1.a 1 1 2.b\n",
            "received 2 times",
        ),
        (
            "a sure loss received",
            "outcome 1.a 0 0 lost:NoRoute 0 1.a\noutcome 1.a 1 1 delivered - -\n",
            good_recv,
            "surely",
        ),
        (
            "two outcomes",
            "outcome 1.a 0 0 delivered - -\noutcome 1.a 0 0 lost:NoRoute 0 1.a\n\
             outcome 1.a 1 1 delivered - -\n",
            good_recv,
            "2 outcomes",
        ),
        (
            "a missing outcome",
            "outcome 1.a 0 0 delivered - -\n",
            good_recv,
            "no outcome",
        ),
        (
            "out of order",
            good_out,
            "recv 1.a 1 1 2.b\nrecv 1.a 0 0 2.b\n",
            "out of order",
        ),
        (
            "a payload not given back",
            "outcome 1.a 0 0 delivered - -\noutcome 1.a 1 1 unknown:Timeout - 1.a\n",
            good_recv,
            "payload came back",
        ),
        (
            "the wrong payload",
            good_out,
            "recv 1.a 0 7 2.b\nrecv 1.a 1 1 2.b\n",
            "with payload",
        ),
        (
            "a reception never sent",
            good_out,
            "recv 1.a 0 0 2.b\nrecv 1.a 1 1 2.b\nrecv 1.a 9 9 2.b\n",
            "never sent",
        ),
    ];
    for (what, out, recv, needle) in cases {
        match run(out, recv) {
            Ok(()) => return Err(format!("the checker missed {what}")),
            Err(errs) if errs.iter().any(|e| e.contains(needle)) => {}
            Err(errs) => return Err(format!("{what}: unexpected complaint {errs:?}")),
        }
    }
    // Received by a node that does not hold the name it was sent to.
    let logs = vec![
        parse_log("s", &sender(good_out)),
        parse_log(
            "r",
            &format!("start {r} leaf y 1\n{good_recv}done {r} 0 0\n"),
        ),
    ];
    match check(&logs, Expect::Chaos { custody: false }) {
        Err(errs) if errs.iter().any(|e| e.contains("which was sent to")) => {}
        other => return Err(format!("the checker missed a misdelivery: {other:?}")),
    }
    // Accepted after the drain began.
    let logs = vec![
        parse_log(
            "s",
            &format!(
                "start {s} root root 0\nsent {s} 0 0 name:x@2 10\ndrain {s}\nsent {s} 1 1 pid:2 20\n\
                 {good_out}tally 2 0 true Tally\ndone {s} 0 0\n"
            ),
        ),
        parse_log("r", &receiver(good_recv)),
    ];
    match check(&logs, Expect::Chaos { custody: false }) {
        Err(errs) if errs.iter().any(|e| e.contains("after the drain began")) => {}
        other => {
            return Err(format!(
                "the checker missed a send while draining: {other:?}"
            ))
        }
    }
    // Names bound at the sender: received by another holder than the one bound (pid 5),
    // or unbound there, is refused; bound to the receiver's parent (pid 1, its custodian)
    // is a hand-over with custody and refused without; with custody, kills without a
    // single hand-over are refused.
    let mid = "start 1.c middle m 0\nkill leaf x 9\n";
    let bound = |to: &str, custody: bool| {
        let logs = vec![
            parse_log("s", &sender_bound(to, good_out)),
            parse_log("r", &receiver(good_recv)),
            parse_log("m", mid),
        ];
        check(&logs, Expect::Chaos { custody })
    };
    for (to, custody) in [("5", false), ("5", true), ("-", true), ("1", false)] {
        match bound(to, custody) {
            Err(errs) if errs.iter().any(|e| e.contains("which was sent to")) => {}
            other => {
                return Err(format!(
                    "bound to {to} (custody {custody}), received by 2: {other:?}"
                ))
            }
        }
    }
    match bound("1", true) {
        Ok(s) if s.handed == 1 => {}
        other => return Err(format!("a custody hand-over refused: {other:?}")),
    }
    match bound("2", true) {
        Err(errs) if errs.iter().any(|e| e.contains("no envelope held")) => {}
        other => return Err(format!("custody without a hand-over passed: {other:?}")),
    }
    // A last line cut by a SIGKILL is dropped; in a log that says done it cannot be.
    let killed = parse_log(
        "k",
        "start 4.d leaf z 1\nsent 4.d 0 0 pid:2 5\nsent 4.d 1 1 pi",
    );
    if !(killed.torn && killed.sent.len() == 1 && killed.problems.is_empty()) {
        return Err(format!("a cut last line: {killed:?}"));
    }
    let cut = parse_log("k", "start 4.d leaf z 1\ndone 4.d 0 0\nsent 4.d 1 1 pi");
    if !cut.problems.iter().any(|e| e.contains("was cut")) {
        return Err(format!("a cut line after done: {cut:?}"));
    }
    // A lossless drain refuses any loss, even a true one.
    let logs = vec![
        parse_log(
            "s",
            &sender("outcome 1.a 0 0 lost:NoRoute 0 1.a\noutcome 1.a 1 1 delivered - -\n"),
        ),
        parse_log("r", &receiver("recv 1.a 1 1 2.b\n")),
    ];
    match check(&logs, Expect::Lossless { refusals: false }) {
        Err(errs) if errs.iter().any(|e| e.contains("a drain lost")) => {}
        other => return Err(format!("a lossless drain with a loss: {other:?}")),
    }
    // A forwarding node's queue-full loss is a loss too: forwards wait for room.
    let logs = vec![
        parse_log(
            "s",
            &sender("outcome 1.a 0 0 lost:QueueFull 0 3.c\noutcome 1.a 1 1 delivered - -\n"),
        ),
        parse_log("r", &receiver("recv 1.a 1 1 2.b\n")),
    ];
    match check(&logs, Expect::Lossless { refusals: false }) {
        Err(errs) if errs.iter().any(|e| e.contains("a drain lost")) => {}
        other => return Err(format!("a hop's overflow passed as lossless: {other:?}")),
    }
    Ok(())
}

/// What a scenario of this name expects (for `FORKBUS_CHAOS_CHECK`).
fn expect_of(name: &str) -> Expect {
    if name.starts_with("4_chaos") {
        Expect::Chaos { custody: true }
    } else if name.starts_with("3_chaos") {
        Expect::Chaos { custody: false }
    } else {
        Expect::Lossless {
            refusals: name.starts_with("2_"),
        }
    }
}

/// Checks the kept logs of a scenario again (`FORKBUS_CHAOS_CHECK=<dir>`).
fn recheck(dir: &Path) -> ! {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let outcome = read_logs(dir).map(|logs| check(&logs, expect_of(&name)));
    let ok = match outcome {
        Ok(Ok(s)) => {
            println!("{name}: {s}");
            true
        }
        Ok(Err(errs)) => {
            errs.iter().for_each(|e| println!("  violation: {e}"));
            false
        }
        Err(e) => {
            println!("{e}");
            false
        }
    };
    std::process::exit(i32::from(!ok))
}

fn main() {
    if let Some(dir) = std::env::var_os("FORKBUS_CHAOS_CHECK") {
        recheck(Path::new(&dir));
    }
    let mut h = Harness::new();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let base = std::env::temp_dir().join(format!("forkbus-chaos-{}-{stamp:x}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("a temporary directory for the logs");
    let ctx = Ctx {
        dir: base.clone(),
        window: 32,
        max_queue: None,
        seed: 0x5eed,
        chaos: false,
        hold: None,
    };
    h.run(
        "0_checker_catches_violations",
        Duration::from_secs(10),
        checker_catches_violations,
    );
    let lossless = Expect::Lossless { refusals: false };
    let lossy = Expect::Chaos { custody: false };
    let small = |refusals| Expect::Lossless { refusals };
    scenario(&mut h, &base, "1_drain_w32", ctx.clone(), lossless);
    scenario(
        &mut h,
        &base,
        "1_drain_w32_queue64",
        Ctx {
            max_queue: Some(64),
            ..ctx.clone()
        },
        small(false),
    );
    // A window over the queue bound: local sends are refused and retried on send-ready.
    scenario(
        &mut h,
        &base,
        "2_drain_w128_queue64",
        Ctx {
            window: 128,
            max_queue: Some(64),
            ..ctx.clone()
        },
        small(true),
    );
    // The issue's heavy case by default; FORKBUS_CHAOS_LOAD picks another window.
    let heavy = std::env::var("FORKBUS_CHAOS_LOAD")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(4096);
    {
        let w = heavy;
        scenario(
            &mut h,
            &base,
            &format!("1_drain_w{w}"),
            Ctx {
                window: w,
                ..ctx.clone()
            },
            // 13 senders of 4096 overflow the default queue bound at the root.
            lossless,
        );
    }
    for seed in seeds("FORKBUS_CHAOS_SEEDS", &[1, 2, 3]) {
        scenario(
            &mut h,
            &base,
            &format!("3_chaos_seed{seed}"),
            Ctx {
                seed,
                chaos: true,
                ..ctx.clone()
            },
            lossy,
        );
    }
    for seed in seeds("FORKBUS_CHAOS_QUEUE_SEEDS", &[1]) {
        scenario(
            &mut h,
            &base,
            &format!("4_chaos_queue64_seed{seed}"),
            Ctx {
                seed,
                chaos: true,
                hold: Some(64),
                ..ctx.clone()
            },
            Expect::Chaos { custody: true },
        );
    }
    if std::env::var_os("FORKBUS_CHAOS_KEEP_LOGS").is_some() {
        println!("logs kept in {}", base.display());
    } else {
        let _ = std::fs::remove_dir_all(&base);
    }
    h.finish()
}
