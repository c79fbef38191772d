//! A deterministic simulator of a process tree: [`Node`]s joined by socketpairs, and a fake
//! process table that forks, exits, kills and reaps.
//!
//! Where `forkbus_router::sim::Sim` models links in detail (socket buffers, short writes,
//! replayed frames, redundant paths), this one models what a process's life adds: a
//! process that exits closes its descriptors, so each neighbour reads what was already in
//! the socket and then the end of file; its parent is told by `SIGCHLD` and reaps it after
//! a random delay, before or after that end of file arrives (and reads the link to its end
//! before reaping, as the runtime does). A node's [`Action::Kill`] kills, a drained node
//! exits 0, a node whose parent is gone exits 1. Every arrival is an entry of one timed
//! queue, so the orders a real tree can produce interleave in every way.
//!
//! One seeded generator drives everything: a failing seed replays exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use forkbus_router::sim::{Sim, SimRng};
use forkbus_router::{
    Address, Error, LinkId, MessageId, Router, RouterConfig, SendOptions, Timestamp,
};

use crate::node::{Action, Node, NodeConfig, NodeEvent, Refusal};
use crate::process::{ExitStatus, Pid};
use crate::tally::Tally;

/// How the simulated tree behaves.
#[derive(Clone, Debug)]
pub struct ProcSimConfig {
    /// The configuration of every router.
    pub router: RouterConfig,
    /// The configuration of every node.
    pub node: NodeConfig,
    /// Seed of the one random generator.
    pub seed: u64,
    /// Longest delay of a chunk on a link (the shortest is 1 µs).
    pub max_delay: Duration,
    /// Longest delay between a process's exit and its reaping by its parent.
    pub max_reap_delay: Duration,
}

impl Default for ProcSimConfig {
    fn default() -> Self {
        Self {
            router: RouterConfig::default(),
            node: NodeConfig::default(),
            seed: 1,
            max_delay: Duration::from_micros(200),
            max_reap_delay: Duration::from_micros(400),
        }
    }
}

/// Where a simulated process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    /// Running.
    Alive,
    /// Stopped (`SIGSTOP`): it reads, writes and decides nothing, and never resumes; its
    /// descriptors stay open until it is killed.
    Stopped,
    /// Ended; not reaped yet.
    Exited(ExitStatus),
    /// Ended and reaped by its parent (or ended with no parent to reap it).
    Reaped(ExitStatus),
}

impl Life {
    /// How it ended, once it did.
    pub fn status(self) -> Option<ExitStatus> {
        match self {
            Self::Alive | Self::Stopped => None,
            Self::Exited(s) | Self::Reaped(s) => Some(s),
        }
    }
}

/// One simulated process.
#[derive(Debug)]
pub struct SimProcess {
    /// Its pid.
    pub pid: Pid,
    /// Its node.
    pub node: Node,
    /// The process that forked it.
    pub parent: Option<usize>,
    /// Where it is.
    pub life: Life,
    /// Every event its node produced, in order.
    pub events: Vec<NodeEvent>,
    /// The tally of its drain, once drained (a root stays alive after that).
    pub drained: Option<Tally>,
}

/// A socketpair between a parent and a child.
#[derive(Debug)]
struct SimLink {
    /// The two ends: process index and that node's link id.
    ends: [(usize, LinkId); 2],
    /// Whether each end's descriptor is open.
    open: [bool; 2],
    /// When the last chunk written from each end arrives (arrivals keep their order).
    last: [Timestamp; 2],
}

/// Something due at a moment.
#[derive(Debug)]
enum Due {
    /// Bytes written from `ends[from]` arrive at the other end.
    Chunk {
        link: usize,
        from: usize,
        bytes: Vec<u8>,
    },
    /// `ends[from]` was closed: the other end reads the end of file.
    Eof { link: usize, from: usize },
    /// The parent of `proc` reaps it.
    Reap { proc: usize },
}

/// Counts of how things happened, for tests that want both orders covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcSimStats {
    /// Children reaped while their parent's end of their link was still open.
    pub reaped_before_eof: u64,
    /// Children reaped after their link had gone down at the parent.
    pub reaped_after_eof: u64,
    /// Processes killed by an [`Action::Kill`] or by the test.
    pub killed: u64,
}

/// The simulated process tree.
#[derive(Debug)]
pub struct ProcSim {
    config: ProcSimConfig,
    rng: SimRng,
    now: Timestamp,
    seq: u64,
    /// The processes, by index.
    pub procs: Vec<SimProcess>,
    links: Vec<SimLink>,
    queue: BTreeMap<(Timestamp, u64), Due>,
    /// How things happened.
    pub stats: ProcSimStats,
}

/// The simulation did not settle within its step bound: a livelock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Livelock;

impl ProcSim {
    /// A tree of one process, the root (index 0).
    pub fn new(config: ProcSimConfig) -> Result<Self, Error> {
        let router = Router::new(Sim::node_id(0), config.router.clone())?;
        let now = Timestamp::from_nanos(1_000_000_000);
        let root = SimProcess {
            pid: pid_of(0),
            node: Node::new(router, config.node.clone()),
            parent: None,
            life: Life::Alive,
            events: Vec::new(),
            drained: None,
        };
        Ok(Self {
            rng: SimRng::new(config.seed),
            config,
            now,
            seq: 0,
            procs: vec![root],
            links: Vec::new(),
            queue: BTreeMap::new(),
            stats: ProcSimStats::default(),
        })
    }

    /// The virtual time.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The generator, for tests that draw their own choices from the same seed.
    pub fn rng(&mut self) -> &mut SimRng {
        &mut self.rng
    }

    /// Forks a child of `parent`; returns its index.
    pub fn fork(&mut self, parent: usize) -> Result<usize, Error> {
        let idx = self.procs.len();
        let me = Sim::node_id(idx);
        let pid = pid_of(idx);
        let now = self.now;
        let (node, lc) = self.procs[parent].node.forked_child(
            now,
            me,
            &[],
            self.config.router.clone(),
            self.config.node.clone(),
        )?;
        let lp = self.procs[parent].node.handle_fork(now, pid, me, &[]);
        self.procs.push(SimProcess {
            pid,
            node,
            parent: Some(parent),
            life: Life::Alive,
            events: Vec::new(),
            drained: None,
        });
        self.links.push(SimLink {
            ends: [(parent, lp), (idx, lc)],
            open: [true, true],
            last: [now, now],
        });
        self.settle();
        Ok(idx)
    }

    /// The index of the process with this pid.
    pub fn index_of(&self, pid: Pid) -> Option<usize> {
        self.procs.iter().position(|p| p.pid == pid)
    }

    /// Sends from process `from`.
    pub fn send(
        &mut self,
        from: usize,
        to: impl Into<Address>,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> Result<MessageId, Refusal> {
        let now = self.now;
        let r = self.procs[from].node.submit(now, to, payload, options);
        self.settle();
        r
    }

    /// Process `proc` begins a graceful drain of its subtree.
    pub fn begin_drain(&mut self, proc: usize) {
        let now = self.now;
        self.procs[proc].node.begin_drain(now);
        self.settle();
    }

    /// Stops a process (`SIGSTOP`) for good: a hung process.
    pub fn freeze(&mut self, proc: usize) {
        if self.procs[proc].life == Life::Alive {
            self.procs[proc].life = Life::Stopped;
        }
    }

    /// Kills a process (`SIGKILL`).
    pub fn kill(&mut self, proc: usize) {
        if matches!(self.procs[proc].life, Life::Alive | Life::Stopped) {
            self.stats.killed += 1;
            self.exit(proc, ExitStatus::Signal(9));
        }
    }

    /// Runs until `done` holds, nothing is due, or the virtual clock passed `limit` from
    /// now.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<(), Livelock> {
        const MAX_STEPS: usize = 2_000_000;
        let until = self.now + limit;
        self.settle();
        for _ in 0..MAX_STEPS {
            if done(self) {
                return Ok(());
            }
            let Some(due) = self.next_due() else {
                return Ok(());
            };
            if due > until {
                self.now = until;
                return Ok(());
            }
            self.now = self.now.max(due);
            self.step();
        }
        Err(Livelock)
    }

    /// Runs for `d` of virtual time.
    pub fn advance(&mut self, d: Duration) -> Result<(), Livelock> {
        let until = self.now + d;
        self.run_until(d, |s| s.now >= until)?;
        self.now = self.now.max(until);
        Ok(())
    }

    fn next_due(&self) -> Option<Timestamp> {
        let queued = self.queue.keys().next().map(|(t, _)| *t);
        let timers = self
            .procs
            .iter()
            .filter(|p| p.life == Life::Alive)
            .filter_map(|p| p.node.poll_timeout());
        queued.into_iter().chain(timers).min()
    }

    /// Everything due now, then the reactions to it.
    fn step(&mut self) {
        let now = self.now;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let due = entry.remove();
            self.handle_due(due);
        }
        for p in 0..self.procs.len() {
            let proc = &mut self.procs[p];
            if proc.life == Life::Alive && proc.node.poll_timeout().is_some_and(|t| t <= now) {
                proc.node.handle_timeout(now);
            }
        }
        self.settle();
    }

    fn handle_due(&mut self, due: Due) {
        let now = self.now;
        match due {
            Due::Chunk { link, from, bytes } => {
                let to = 1 - from;
                let l = &self.links[link];
                let (proc, id) = l.ends[to];
                if l.open[to] && self.procs[proc].life == Life::Alive {
                    // A malformed stream closes the link: its peer shutdown follows.
                    let _ = self.procs[proc].node.handle_input(now, id, &bytes);
                }
            }
            Due::Eof { link, from } => {
                let to = 1 - from;
                let l = &self.links[link];
                let (proc, id) = l.ends[to];
                if l.open[to] && self.procs[proc].life == Life::Alive {
                    self.procs[proc].node.handle_link_closed(now, id);
                }
            }
            Due::Reap { proc } => self.reap(proc),
        }
    }

    fn reap(&mut self, child: usize) {
        let Some(parent) = self.procs[child].parent else {
            return;
        };
        let Life::Exited(status) = self.procs[child].life else {
            return;
        };
        if self.procs[parent].life != Life::Alive {
            // Reparented to init, which reaps it; nobody of the tree hears of it.
            self.procs[child].life = Life::Reaped(status);
            return;
        }
        // What the child wrote before it died is in the socket: the parent reads it first.
        let now = self.now;
        let link = self
            .links
            .iter()
            .position(|l| l.ends[0].0 == parent && l.ends[1].0 == child);
        if let Some(link) = link {
            let open = self.links[link].open[0];
            if open {
                self.stats.reaped_before_eof += 1;
                let ready: Vec<(Timestamp, u64)> = self
                    .queue
                    .iter()
                    .filter(|(_, d)| matches!(d, Due::Chunk { link: l, from: 1, .. } if *l == link))
                    .map(|(k, _)| *k)
                    .collect();
                for key in ready {
                    if let Some(Due::Chunk { bytes, .. }) = self.queue.remove(&key) {
                        let id = self.links[link].ends[0].1;
                        let _ = self.procs[parent].node.handle_input(now, id, &bytes);
                    }
                }
            } else {
                self.stats.reaped_after_eof += 1;
            }
        }
        let pid = self.procs[child].pid;
        self.procs[child].life = Life::Reaped(status);
        self.procs[parent].node.handle_reaped(now, pid, status);
    }

    /// A process ends: its descriptors close, its neighbours read to the end of file, its
    /// parent gets `SIGCHLD`, and its children still running get `SIGKILL` (the runtime's
    /// parent-death signal).
    fn exit(&mut self, proc: usize, status: ExitStatus) {
        self.procs[proc].life = Life::Exited(status);
        for child in 0..self.procs.len() {
            if self.procs[child].parent == Some(proc) {
                self.kill(child);
            }
        }
        for link in 0..self.links.len() {
            for end in 0..2 {
                if self.links[link].ends[end].0 == proc {
                    self.close_end(link, end);
                }
            }
        }
        match self.procs[proc].parent {
            Some(parent) if self.procs[parent].life == Life::Alive => {
                let max = self.config.max_reap_delay.as_nanos() as u64;
                let at = self.now + Duration::from_nanos(self.rng.below(max + 1));
                self.schedule(at, Due::Reap { proc });
            }
            _ => self.procs[proc].life = Life::Reaped(status),
        }
    }

    fn close_end(&mut self, link: usize, end: usize) {
        let l = &mut self.links[link];
        if !l.open[end] {
            return;
        }
        l.open[end] = false;
        // The end of file comes after every byte already written from this end, and the
        // peer's loop wakes for it a while later.
        let max = self.config.max_delay.as_nanos() as u64;
        let at = l.last[end].max(self.now) + Duration::from_nanos(1 + self.rng.below(max));
        let l = &mut self.links[link];
        l.last[end] = at;
        self.schedule(at, Due::Eof { link, from: end });
    }

    fn schedule(&mut self, at: Timestamp, due: Due) {
        self.seq += 1;
        self.queue.insert((at, self.seq), due);
    }

    /// Reactions until nothing changes: events and actions of every node, then every
    /// node's output onto its links.
    fn settle(&mut self) {
        loop {
            let mut changed = false;
            for p in 0..self.procs.len() {
                changed |= self.react(p);
            }
            for link in 0..self.links.len() {
                for end in 0..2 {
                    self.write(link, end);
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// Carries out what process `p`'s node asks; whether it asked anything.
    fn react(&mut self, p: usize) -> bool {
        let mut changed = false;
        loop {
            if self.procs[p].life != Life::Alive {
                return changed;
            }
            if let Some(Action::Kill(pid)) = self.procs[p].node.poll_action() {
                changed = true;
                if let Some(target) = self.index_of(pid) {
                    self.kill(target);
                }
                continue;
            }
            let Some(event) = self.procs[p].node.poll_event() else {
                return changed;
            };
            changed = true;
            match &event {
                NodeEvent::PeerShutdown(down) => {
                    // The driver closes the link's descriptor.
                    let link = self.links.iter().enumerate().find_map(|(i, l)| {
                        (0..2)
                            .find(|e| l.ends[*e] == (p, down.link))
                            .map(|e| (i, e))
                    });
                    if let Some((link, end)) = link {
                        self.close_end(link, end);
                    }
                }
                NodeEvent::Drained(tally) => {
                    self.procs[p].drained = Some(*tally);
                    if self.procs[p].parent.is_some() {
                        // The tally is its last frame: written out, then the process exits.
                        for link in 0..self.links.len() {
                            for end in 0..2 {
                                self.write(link, end);
                            }
                        }
                        self.procs[p].events.push(event);
                        self.exit(p, ExitStatus::Code(0));
                        return true;
                    }
                }
                NodeEvent::ParentGone => {
                    self.procs[p].events.push(event);
                    self.exit(p, ExitStatus::Code(1));
                    return true;
                }
                _ => {}
            }
            self.procs[p].events.push(event);
        }
    }

    /// Moves what `ends[end]` has to write onto the link, in chunks with random delays.
    fn write(&mut self, link: usize, end: usize) {
        let (proc, id) = self.links[link].ends[end];
        if !self.links[link].open[end] || self.procs[proc].life != Life::Alive {
            return;
        }
        let Ok(out) = self.procs[proc].node.pending_output(id) else {
            return;
        };
        if out.is_empty() {
            return;
        }
        let bytes = out.to_vec();
        let _ = self.procs[proc].node.advance_output(id, bytes.len());
        let max = self.config.max_delay.as_nanos() as u64;
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let take = if self.rng.chance(0.3) {
                1 + self.rng.below(rest.len() as u64) as usize
            } else {
                rest.len()
            };
            let delay = Duration::from_nanos(1_000 + self.rng.below(max.saturating_sub(1_000) + 1));
            let at = (self.now + delay).max(self.links[link].last[end]);
            self.links[link].last[end] = at;
            self.schedule(
                at,
                Due::Chunk {
                    link,
                    from: end,
                    bytes: rest[..take].to_vec(),
                },
            );
            rest = &rest[take..];
        }
    }
}

/// The pid the simulator gives process `idx` (the pid of [`Sim::node_id`]).
pub fn pid_of(idx: usize) -> Pid {
    Pid::from_raw(Sim::node_id(idx).pid)
}
