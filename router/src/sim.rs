//! A deterministic simulator of many routers joined by links, on a virtual clock.
//!
//! Like `quinn-proto`'s test `Pair`, but for a whole tree: every node is a [`Router`], every
//! link a [`Wire`] with two byte queues. The simulator moves bytes the way a socketpair
//! would — in order within a direction, split at random points, each chunk arriving after a
//! random delay — so traffic on different links interleaves in every order. A test can cut
//! a wire, kill a node, stop a node reading (its peer's socket buffer fills), duplicate
//! frames on a wire, and add a redundant wire that closes a cycle.
//!
//! Everything is driven by one seeded generator: a failing seed replays exactly.

use std::collections::VecDeque;
use std::time::Duration;

use crate::error::Error;
use crate::event::Event;
use crate::id::{Address, LinkId, LinkRole, MessageId, NodeId, Timestamp};
use crate::router::{Refused, Router, RouterConfig, SendOptions};
use crate::wire::{decode_stream, DecodeLimits, Frame};

/// How the simulated links behave.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The configuration of every router.
    pub router: RouterConfig,
    /// Seed of the one random generator.
    pub seed: u64,
    /// Shortest delay of a chunk on a wire.
    pub min_delay: Duration,
    /// Longest delay of a chunk on a wire.
    pub max_delay: Duration,
    /// Bytes a direction of a wire holds unread at most (the socket buffer).
    pub wire_capacity: usize,
    /// Probability (0..=1) that a chunk written to a wire is followed by a copy of one of
    /// its whole frames (a replayed link frame).
    pub duplicate_rate: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            router: RouterConfig::default(),
            seed: 1,
            min_delay: Duration::from_micros(1),
            max_delay: Duration::from_micros(200),
            wire_capacity: 256 << 10,
            duplicate_rate: 0.0,
        }
    }
}

/// A small, fast, deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is zero).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

/// One simulated process.
#[derive(Debug)]
pub struct SimNode {
    /// Its router.
    pub router: Router,
    /// Whether it is alive (a killed node does nothing more).
    pub alive: bool,
    /// Every event its router produced, in order.
    pub events: Vec<Event>,
    /// The node it was forked from.
    pub parent: Option<usize>,
}

/// One direction of a wire: chunks in flight, in order.
#[derive(Debug, Default)]
struct Lane {
    chunks: VecDeque<(Timestamp, Vec<u8>)>,
    bytes: usize,
    reading: bool,
}

impl Lane {
    fn reading() -> Self {
        Self {
            reading: true,
            ..Self::default()
        }
    }
}

/// A simulated socketpair between two nodes.
#[derive(Debug)]
pub struct Wire {
    /// The two ends: node index and that node's link id.
    pub ends: [(usize, LinkId); 2],
    /// Whether it was cut (both ends told, bytes in flight gone).
    pub cut: bool,
    /// `lanes[i]` carries bytes from `ends[i]` to `ends[1 - i]`.
    lanes: [Lane; 2],
}

/// The simulator.
#[derive(Debug)]
pub struct Sim {
    config: SimConfig,
    rng: SimRng,
    now: Timestamp,
    /// The nodes, by index.
    pub nodes: Vec<SimNode>,
    /// The wires, by index.
    pub wires: Vec<Wire>,
    /// Frames the simulator duplicated.
    pub duplicated: u64,
}

/// The simulation did not settle within its step bound: a livelock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Livelock {
    /// Steps taken.
    pub steps: usize,
}

impl Sim {
    /// An empty simulation.
    pub fn new(config: SimConfig) -> Self {
        Self {
            rng: SimRng::new(config.seed),
            config,
            now: Timestamp::from_nanos(1_000_000_000),
            nodes: Vec::new(),
            wires: Vec::new(),
            duplicated: 0,
        }
    }

    /// The virtual time.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The generator, for tests that draw their own choices from the same seed.
    pub fn rng(&mut self) -> &mut SimRng {
        &mut self.rng
    }

    /// The id the simulator gives node `idx`.
    pub fn node_id(idx: usize) -> NodeId {
        let idx = u32::try_from(idx).unwrap_or(u32::MAX);
        NodeId::new(0, 100 + idx, idx.wrapping_mul(2_654_435_761) | 1)
    }

    /// Adds a node with no links (a root).
    pub fn add_root(&mut self) -> Result<usize, Error> {
        self.add_node()
    }

    /// Forks a child of `parent` the way the runtime does ([`Router::handle_fork`] and
    /// [`Router::forked_child`]): the child knows its parent's whole table from the start.
    pub fn add_child(&mut self, parent: usize) -> Result<usize, Error> {
        self.add_child_named(parent, &[])
    }

    /// Forks a child holding `names` from birth, as the runtime forks a named child:
    /// refused ([`Error::NameTaken`]) unless each name is free, the parent's, or one of the
    /// parent's children's (a replacement takes it over).
    pub fn add_child_named(&mut self, parent: usize, names: &[String]) -> Result<usize, Error> {
        let idx = self.nodes.len();
        let me = Self::node_id(idx);
        let now = self.now;
        self.nodes[parent].router.check_fork_names(names)?;
        let (router, lc) =
            self.nodes[parent]
                .router
                .forked_child(now, me, names, self.config.router.clone())?;
        let lp = self.nodes[parent].router.handle_fork(now, me, names);
        self.nodes.push(SimNode {
            router,
            alive: true,
            events: Vec::new(),
            parent: Some(parent),
        });
        self.wires.push(Wire {
            ends: [(parent, lp), (idx, lc)],
            cut: false,
            lanes: [Lane::reading(), Lane::reading()],
        });
        Ok(idx)
    }

    fn add_node(&mut self) -> Result<usize, Error> {
        let idx = self.nodes.len();
        let router = Router::new(Self::node_id(idx), self.config.router.clone())?;
        self.nodes.push(SimNode {
            router,
            alive: true,
            events: Vec::new(),
            parent: None,
        });
        Ok(idx)
    }

    /// Joins two nodes with a new wire as peers (beyond the tree: a redundant path that
    /// carries floods, which the seen windows and origin checks drop). Returns the wire's
    /// index.
    pub fn connect(&mut self, a: usize, b: usize) -> usize {
        let now = self.now;
        let (ida, idb) = (Self::node_id(a), Self::node_id(b));
        let la = self.nodes[a]
            .router
            .handle_link_up(now, Some(idb), LinkRole::Peer);
        let lb = self.nodes[b]
            .router
            .handle_link_up(now, Some(ida), LinkRole::Peer);
        self.wires.push(Wire {
            ends: [(a, la), (b, lb)],
            cut: false,
            lanes: [Lane::reading(), Lane::reading()],
        });
        self.wires.len() - 1
    }

    /// Submits from node `from`.
    pub fn send(
        &mut self,
        from: usize,
        to: impl Into<Address>,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> Result<MessageId, Refused> {
        let now = self.now;
        self.nodes[from].router.submit(now, to, payload, options)
    }

    /// Cuts a wire: bytes in flight are gone and both ends are told.
    pub fn cut(&mut self, wire: usize) {
        let now = self.now;
        let w = &mut self.wires[wire];
        if w.cut {
            return;
        }
        w.cut = true;
        for lane in &mut w.lanes {
            lane.chunks.clear();
            lane.bytes = 0;
        }
        let ends = w.ends;
        for (node, link) in ends {
            if self.nodes[node].alive {
                // The link is open unless the router closed it itself (protocol error).
                let _ = self.nodes[node].router.handle_link_down(now, link);
            }
        }
    }

    /// Kills a node: it stops, and every wire it had is cut.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].alive = false;
        for w in 0..self.wires.len() {
            if self.wires[w].ends.iter().any(|(n, _)| *n == node) {
                self.cut(w);
            }
        }
    }

    /// Makes `node` stop or resume reading `wire` (its peer's writes back up).
    pub fn set_reading(&mut self, wire: usize, node: usize, reading: bool) {
        let w = &mut self.wires[wire];
        for i in 0..2 {
            if w.ends[1 - i].0 == node {
                w.lanes[i].reading = reading;
            }
        }
    }

    /// The wire between two nodes, if any.
    pub fn wire_between(&self, a: usize, b: usize) -> Option<usize> {
        self.wires.iter().position(|w| {
            !w.cut
                && ((w.ends[0].0 == a && w.ends[1].0 == b)
                    || (w.ends[0].0 == b && w.ends[1].0 == a))
        })
    }

    /// Bytes in flight on all wires.
    pub fn bytes_in_flight(&self) -> usize {
        self.wires
            .iter()
            .flat_map(|w| w.lanes.iter())
            .map(|l| l.bytes)
            .sum()
    }

    /// Moves every node's output onto its wires (as far as the wires take it) and collects
    /// events. Returns whether any byte moved.
    fn flush(&mut self) -> bool {
        let mut moved = false;
        for w in 0..self.wires.len() {
            if self.wires[w].cut {
                continue;
            }
            for dir in 0..2 {
                moved |= self.write_lane(w, dir);
            }
        }
        for node in &mut self.nodes {
            while node.router.poll_transmit().is_some() {}
            while let Some(e) = node.router.poll_event() {
                node.events.push(e);
            }
        }
        moved
    }

    fn write_lane(&mut self, w: usize, dir: usize) -> bool {
        let (node, link) = self.wires[w].ends[dir];
        if !self.nodes[node].alive {
            return false;
        }
        let room = self
            .config
            .wire_capacity
            .saturating_sub(self.wires[w].lanes[dir].bytes);
        let Ok(out) = self.nodes[node].router.pending_output(link) else {
            return false;
        };
        let n = out.len().min(room);
        if n == 0 {
            return false;
        }
        let bytes = out[..n].to_vec();
        // Model a short write now and then: the rest goes on a later flush.
        let n = if self.rng.chance(0.1) {
            1 + self.rng.below(n as u64) as usize
        } else {
            n
        };
        let mut bytes = bytes;
        bytes.truncate(n);
        let _ = self.nodes[node].router.advance_output(link, n);
        let dup = if self.rng.chance(self.config.duplicate_rate) {
            self.duplicate_frame(&bytes)
        } else {
            None
        };
        self.push_chunks(w, dir, bytes);
        if let Some(copy) = dup {
            self.duplicated += 1;
            self.push_chunks(w, dir, copy);
        }
        true
    }

    /// A copy of the first whole envelope frame in `bytes`, if the chunk begins at a frame
    /// boundary and holds one (the simulator only duplicates what it can see whole).
    fn duplicate_frame(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        if bytes.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let frame = bytes.get(..4 + len)?;
        let limits = DecodeLimits::from(&self.config.router);
        match decode_stream(frame, limits).ok()?.as_slice() {
            [Frame::Envelope { .. }] if bytes.len() == frame.len() => Some(frame.to_vec()),
            _ => None,
        }
    }

    fn push_chunks(&mut self, w: usize, dir: usize, bytes: Vec<u8>) {
        let (min, max) = (
            self.config.min_delay.as_nanos() as u64,
            self.config.max_delay.as_nanos() as u64,
        );
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let take = if self.rng.chance(0.3) {
                1 + self.rng.below(rest.len() as u64) as usize
            } else {
                rest.len()
            };
            let delay = min + self.rng.below(max.saturating_sub(min) + 1);
            let lane = &mut self.wires[w].lanes[dir];
            let last = lane.chunks.back().map_or(Timestamp::ZERO, |c| c.0);
            let at = (self.now + Duration::from_nanos(delay)).max(last);
            lane.chunks.push_back((at, rest[..take].to_vec()));
            lane.bytes += take;
            rest = &rest[take..];
        }
    }

    /// The earliest moment something is due: a chunk arrival or a router timer.
    fn next_due(&self) -> Option<Timestamp> {
        let chunks = self
            .wires
            .iter()
            .filter(|w| !w.cut)
            .flat_map(|w| w.lanes.iter())
            .filter(|l| l.reading)
            .filter_map(|l| l.chunks.front().map(|c| c.0));
        let timers = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .filter_map(|n| n.router.poll_timeout());
        chunks.chain(timers).min()
    }

    /// Delivers every chunk and fires every timer due at `now`.
    fn deliver_due(&mut self) {
        let now = self.now;
        for w in 0..self.wires.len() {
            for dir in 0..2 {
                loop {
                    let wire = &mut self.wires[w];
                    if wire.cut || !wire.lanes[dir].reading {
                        break;
                    }
                    let Some((at, _)) = wire.lanes[dir].chunks.front() else {
                        break;
                    };
                    if *at > now {
                        break;
                    }
                    let Some((_, bytes)) = wire.lanes[dir].chunks.pop_front() else {
                        break;
                    };
                    wire.lanes[dir].bytes -= bytes.len();
                    let (node, link) = wire.ends[1 - dir];
                    if !self.nodes[node].alive {
                        continue;
                    }
                    if self.nodes[node]
                        .router
                        .handle_input(now, link, &bytes)
                        .is_err()
                    {
                        // The router closed its end: the socket closes, the peer sees EOF.
                        self.cut(w);
                        break;
                    }
                }
            }
        }
        for node in &mut self.nodes {
            if node.alive && node.router.poll_timeout().is_some_and(|t| t <= now) {
                node.router.handle_timeout(now);
            }
        }
    }

    /// Runs until no byte is in flight or waiting to be written (on a wire someone reads)
    /// and no timer is due within `settle`; receipt timeouts further out stay pending.
    pub fn run_until_idle(&mut self) -> Result<(), Livelock> {
        self.run_inner(None)
    }

    /// Runs until the virtual clock has advanced by `d`, firing every timer on the way.
    pub fn advance(&mut self, d: Duration) -> Result<(), Livelock> {
        let until = self.now + d;
        self.run_inner(Some(until))?;
        self.now = self.now.max(until);
        Ok(())
    }

    fn run_inner(&mut self, until: Option<Timestamp>) -> Result<(), Livelock> {
        const MAX_STEPS: usize = 5_000_000;
        let settle = Duration::from_millis(50);
        for steps in 0..MAX_STEPS {
            self.flush();
            let Some(due) = self.next_due() else {
                return Ok(());
            };
            let horizon = until.unwrap_or(self.now + settle);
            if due > horizon {
                return Ok(());
            }
            self.now = self.now.max(due);
            self.deliver_due();
            let _ = steps;
        }
        Err(Livelock { steps: MAX_STEPS })
    }
}
