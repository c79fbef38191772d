//! Micro-benchmark of the routing core alone: no sockets, no reactor, one thread.
//!
//! Every case times a batch of work with `std::time::Instant` after a warm-up, repeats it,
//! and reports the median (with min and max) per envelope. Payloads are 64 bytes.
//!
//! - `encode`: `wire::encode_envelope` into a reused `Vec`;
//! - `decode`: `wire::decode_frame` on one encoded envelope body;
//! - `deframe+decode`: a `Deframer` fed a buffer of many frames in 64 KiB reads, each frame
//!   through `decode_frame`; and `wire::decode_stream` over the whole buffer;
//! - `unicast`: routers A and B joined by a link (each side declared with the peer's id);
//!   A submits batches to B, bytes move by handing `pending_output` of one to `handle_input`
//!   of the other, B's events are drained, B's acknowledgements go back. Everything both
//!   routers do is counted: submit, encode, deframe, decode, deliver, acknowledge;
//! - `forward`: the line A - B - C, A sends to C; end to end, and the time spent in B's calls
//!   alone (one forwarding hop);
//! - `broadcast`: a star of a root and 8 children; the root broadcasts, every child
//!   delivers;
//! - `tables`: a link with 4k and 64k nodes behind it going down (per node removed), and
//!   envelopes from ever new origins against a full seen table (per origin).
//!
//! Prints a table and writes JSON to `forkbus-router-bench.json` in the target directory.
//! Run with `cargo bench -p forkbus-router --bench core`; append `-- unicast` (or `codec`,
//! `forward`, `broadcast`, `tables`) to run one group, e.g. under a profiler.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkbus_router::wire::{
    decode_frame, decode_stream, encode_envelope, DecodeLimits, Deframer, Frame,
};
use forkbus_router::{
    Destination, Envelope, Event, Flags, LinkId, LinkRole, MessageId, NodeId, ProtocolError,
    Router, RouterConfig, SendOptions, Timestamp,
};

const PAYLOAD: usize = 64;
const REPS: usize = 11;
const WARMUP_REPS: usize = 2;
/// Envelopes a sender submits before the bytes move (a multiple of the default `ack_every`,
/// so every frame is acknowledged in the same round).
const BATCH: usize = 256;

/// The figures of one case.
#[derive(Debug)]
struct Row {
    name: &'static str,
    unit: &'static str,
    /// Envelopes (or deliveries) per repetition.
    ops: u64,
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
    note: String,
}

/// Runs `rep` (which does `ops` operations and returns the time they took) `WARMUP_REPS`
/// times untimed, then `REPS` times; per-operation figures.
fn measure(
    name: &'static str,
    unit: &'static str,
    ops: u64,
    mut rep: impl FnMut() -> Duration,
) -> Row {
    for _ in 0..WARMUP_REPS {
        rep();
    }
    let mut per_op: Vec<f64> = (0..REPS)
        .map(|_| rep().as_nanos() as f64 / ops as f64)
        .collect();
    per_op.sort_by(f64::total_cmp);
    Row {
        name,
        unit,
        ops,
        median_ns: per_op[per_op.len() / 2],
        min_ns: per_op[0],
        max_ns: per_op[per_op.len() - 1],
        note: String::new(),
    }
}

fn envelope(origin: NodeId, dst: Destination, seq: u64) -> Envelope {
    Envelope {
        id: MessageId { origin, seq },
        destination: dst,
        hops: 1,
        hop_limit: 64,
        flags: Flags::empty(),
        trace: Vec::new(),
        payload: vec![0xa5; PAYLOAD],
    }
}

fn bench_encode() -> Row {
    const N: u64 = 500_000;
    let env = envelope(
        NodeId::new(0, 1000, 7),
        Destination::Node(NodeId::new(0, 2000, 9)),
        1 << 20,
    );
    let mut buf = Vec::with_capacity(256);
    measure("encode", "ns/envelope", N, || {
        let start = Instant::now();
        for seq in 0..N {
            buf.clear();
            black_box(encode_envelope(&mut buf, black_box(seq + 1000), &env));
        }
        start.elapsed()
    })
}

fn bench_decode() -> Row {
    const N: u64 = 500_000;
    let env = envelope(
        NodeId::new(0, 1000, 7),
        Destination::Node(NodeId::new(0, 2000, 9)),
        1 << 20,
    );
    let mut buf = Vec::new();
    encode_envelope(&mut buf, 1000, &env);
    let limits = DecodeLimits::default();
    let mut row = measure("decode", "ns/envelope", N, || {
        let start = Instant::now();
        for _ in 0..N {
            let frame = decode_frame(black_box(buf[4]), black_box(&buf[5..]), limits);
            black_box(frame.is_ok());
        }
        start.elapsed()
    });
    row.note = format!("{} B frame", buf.len());
    row
}

/// A buffer of `n` envelope frames with consecutive link sequence numbers.
fn stream(n: u64) -> Vec<u8> {
    let origin = NodeId::new(0, 1000, 7);
    let dst = Destination::Node(NodeId::new(0, 2000, 9));
    let mut buf = Vec::new();
    for seq in 0..n {
        encode_envelope(&mut buf, seq, &envelope(origin, dst.clone(), seq));
    }
    buf
}

fn bench_deframe() -> [Row; 2] {
    const N: u64 = 100_000;
    const READ: usize = 64 << 10;
    let buf = stream(N);
    let limits = DecodeLimits::default();
    let mut deframe = measure("deframe+decode (64 KiB reads)", "ns/envelope", N, || {
        let start = Instant::now();
        let mut deframer = Deframer::new(limits.max_frame);
        let mut n = 0u64;
        for read in buf.chunks(READ) {
            deframer
                .feed(read, |kind, body| {
                    black_box(decode_frame(kind, body, limits)?);
                    n += 1;
                    Ok::<_, ProtocolError>(())
                })
                .expect("a valid stream");
        }
        let elapsed = start.elapsed();
        assert_eq!(n, N);
        elapsed
    });
    deframe.note = format!("{N} frames, {} B", buf.len());
    let mut whole = measure("decode_stream (whole buffer)", "ns/envelope", N, || {
        let start = Instant::now();
        let frames = decode_stream(black_box(&buf), limits).expect("a valid stream");
        let elapsed = start.elapsed();
        assert_eq!(frames.len() as u64, N);
        assert!(matches!(frames[0], Frame::Envelope { .. }));
        drop(frames);
        elapsed
    });
    whole.note = "collects a Vec<Frame>; drop not timed".into();
    [deframe, whole]
}

/// Routers joined by links, moving bytes between them directly.
struct Net {
    nodes: Vec<Router>,
    /// `peer[node][link index]`: the node and link at the other end.
    peer: Vec<Vec<Option<(usize, LinkId)>>>,
    now: Timestamp,
    /// Envelopes delivered to each node's application.
    delivered: Vec<u64>,
    /// Time spent inside the calls of this node, when timing one.
    timed: Option<usize>,
    busy: Duration,
}

impl Net {
    fn new(n: usize) -> Self {
        let nodes = (0..n)
            .map(|i| {
                let pid = 100 + u32::try_from(i).expect("few nodes");
                Router::new(NodeId::new(0, pid, 1), RouterConfig::default())
                    .expect("default configuration is valid")
            })
            .collect();
        Self {
            nodes,
            peer: vec![Vec::new(); n],
            now: Timestamp::from_nanos(1_000_000_000),
            delivered: vec![0; n],
            timed: None,
            busy: Duration::ZERO,
        }
    }

    fn id(&self, i: usize) -> NodeId {
        self.nodes[i].node()
    }

    /// Links `a` (the parent) and `b` (the child), each side declared with the other's id, and
    /// settles the hellos and route updates.
    fn connect(&mut self, a: usize, b: usize) {
        let (ida, idb) = (self.id(a), self.id(b));
        let la = self.nodes[a].handle_link_up(self.now, Some(idb), LinkRole::Child);
        let lb = self.nodes[b].handle_link_up(self.now, Some(ida), LinkRole::Parent);
        for (node, link, other) in [(a, la, (b, lb)), (b, lb, (a, la))] {
            let slots = &mut self.peer[node];
            if slots.len() <= link.index() {
                slots.resize(link.index() + 1, None);
            }
            slots[link.index()] = Some(other);
        }
        self.settle();
    }

    /// Two distinct nodes, mutably.
    fn pair(&mut self, a: usize, b: usize) -> (&mut Router, &mut Router) {
        assert_ne!(a, b);
        if a < b {
            let (lo, hi) = self.nodes.split_at_mut(b);
            (&mut lo[a], &mut hi[0])
        } else {
            let (lo, hi) = self.nodes.split_at_mut(a);
            (&mut hi[0], &mut lo[b])
        }
    }

    /// One pass: every node's output goes to its peers, every node's events are drained.
    /// Returns whether any byte moved.
    fn pump(&mut self) -> bool {
        let mut moved = false;
        let now = self.now;
        for from in 0..self.nodes.len() {
            loop {
                let t0 = self.tick();
                let Some(link) = self.nodes[from].poll_transmit() else {
                    self.charge(from, t0);
                    break;
                };
                self.charge(from, t0);
                let (to, to_link) = self.peer[from][link.index()].expect("a connected link");
                let t0 = self.tick();
                let (src, dst) = self.pair(from, to);
                let out = src.pending_output(link).expect("an open link");
                let n = out.len();
                dst.handle_input(now, to_link, out).expect("a valid peer");
                self.charge(to, t0);
                let t0 = self.tick();
                self.nodes[from]
                    .advance_output(link, n)
                    .expect("an open link");
                self.charge(from, t0);
                moved |= n > 0;
            }
        }
        for i in 0..self.nodes.len() {
            let t0 = self.tick();
            while let Some(ev) = self.nodes[i].poll_event() {
                if let Event::Message { envelope, .. } = ev {
                    black_box(&envelope);
                    self.delivered[i] += 1;
                }
            }
            self.charge(i, t0);
        }
        moved
    }

    /// The time now when one node is being timed (the clock is not read otherwise).
    fn tick(&self) -> Option<Instant> {
        self.timed.map(|_| Instant::now())
    }

    fn charge(&mut self, node: usize, since: Option<Instant>) {
        if let (Some(t0), true) = (since, self.timed == Some(node)) {
            self.busy += t0.elapsed();
        }
    }

    /// Pumps until no byte moves; lets time pass so that delayed acknowledgements go out.
    fn settle(&mut self) {
        loop {
            while self.pump() {}
            self.now = self.now + Duration::from_millis(5);
            let mut due = false;
            for i in 0..self.nodes.len() {
                if self.nodes[i].poll_timeout().is_some_and(|t| t <= self.now) {
                    let t0 = self.tick();
                    self.nodes[i].handle_timeout(self.now);
                    self.charge(i, t0);
                    due = true;
                }
            }
            if !due && !self.pump() {
                break;
            }
        }
    }

    /// Node `from` submits `BATCH` envelopes to `to`, then the bytes move until idle.
    fn round(&mut self, from: usize, to: Destination, payload: &[u8]) {
        let now = self.now;
        let t0 = self.tick();
        for _ in 0..BATCH {
            self.nodes[from]
                .submit(now, to.clone(), payload.to_vec(), SendOptions::default())
                .expect("queues are drained between batches");
        }
        self.charge(from, t0);
        self.settle();
    }

    fn assert_idle(&self) {
        for r in &self.nodes {
            assert!(r.is_idle(), "{} still holds envelopes", r.node());
        }
    }
}

/// Rounds per repetition of the network cases.
const ROUNDS: usize = 256;
const NET_OPS: u64 = (ROUNDS * BATCH) as u64;

fn bench_unicast() -> [Row; 3] {
    let mut net = Net::new(2);
    net.connect(0, 1);
    let to = Destination::Node(net.id(1));
    let payload = [0xa5u8; PAYLOAD];
    let run = |net: &mut Net| {
        let before = net.delivered[1];
        let start = Instant::now();
        for _ in 0..ROUNDS {
            net.round(0, to.clone(), &payload);
        }
        let elapsed = start.elapsed();
        assert_eq!(net.delivered[1] - before, NET_OPS);
        net.assert_idle();
        elapsed
    };
    let mut end_to_end = measure("unicast A->B, end to end", "ns/envelope", NET_OPS, || {
        run(&mut net)
    });
    let stats = net.nodes[0].stats();
    end_to_end.note = format!(
        "{:.1} B/envelope on the wire A->B",
        stats.bytes_out as f64 / stats.sent as f64
    );
    let sides = [
        (0, "unicast, A's calls only", "submit+encode+acks"),
        (1, "unicast, B's calls only", "deframe+decode+deliver+drain"),
    ];
    let [a, b] = sides.map(|(node, name, note)| {
        net.timed = Some(node);
        let mut row = measure(name, "ns/envelope", NET_OPS, || {
            net.busy = Duration::ZERO;
            run(&mut net);
            net.busy
        });
        row.note = note.into();
        row
    });
    net.timed = None;
    [end_to_end, a, b]
}

fn bench_forward() -> [Row; 2] {
    let mut net = Net::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    let to = Destination::Node(net.id(2));
    assert_eq!(
        net.nodes[0].resolve(&to.clone().into()),
        Some(net.id(2)),
        "A knows C through B"
    );
    let payload = [0xa5u8; PAYLOAD];
    let run = |net: &mut Net| {
        let before = net.delivered[2];
        let start = Instant::now();
        for _ in 0..ROUNDS {
            net.round(0, to.clone(), &payload);
        }
        let elapsed = start.elapsed();
        assert_eq!(net.delivered[2] - before, NET_OPS);
        net.assert_idle();
        elapsed
    };
    let end_to_end = measure(
        "forward A->B->C, end to end",
        "ns/envelope",
        NET_OPS,
        || run(&mut net),
    );
    net.timed = Some(1);
    let mut hop = measure(
        "forward, B's calls only",
        "ns/envelope/hop",
        NET_OPS,
        || {
            net.busy = Duration::ZERO;
            run(&mut net);
            net.busy
        },
    );
    hop.note = "deframe+decode+route+encode+acks at B".into();
    [end_to_end, hop]
}

fn bench_broadcast() -> [Row; 2] {
    const CHILDREN: usize = 8;
    let mut net = Net::new(1 + CHILDREN);
    for child in 1..=CHILDREN {
        net.connect(0, child);
    }
    let payload = [0xa5u8; PAYLOAD];
    const ROUNDS_B: usize = 64;
    let broadcasts = (ROUNDS_B * BATCH) as u64;
    let mut per_delivery = 0.0;
    let mut per_broadcast = measure(
        "broadcast root->8 children",
        "ns/broadcast",
        broadcasts,
        || {
            let before: u64 = net.delivered[1..].iter().sum();
            let start = Instant::now();
            for _ in 0..ROUNDS_B {
                net.round(0, Destination::Broadcast, &payload);
            }
            let elapsed = start.elapsed();
            let got: u64 = net.delivered[1..].iter().sum::<u64>() - before;
            assert_eq!(got, broadcasts * CHILDREN as u64);
            net.assert_idle();
            per_delivery = elapsed.as_nanos() as f64 / got as f64;
            elapsed
        },
    );
    per_broadcast.note = format!("{CHILDREN} deliveries each");
    let deliveries = Row {
        name: "broadcast, per delivery",
        unit: "ns/delivery",
        ops: broadcasts * CHILDREN as u64,
        median_ns: per_broadcast.median_ns / CHILDREN as f64,
        min_ns: per_broadcast.min_ns / CHILDREN as f64,
        max_ns: per_broadcast.max_ns / CHILDREN as f64,
        note: format!("last repetition: {per_delivery:.1} ns"),
    };
    [per_broadcast, deliveries]
}

/// A router whose child link announced `n` nodes with two names each, ready to go down.
fn announced(n: u32) -> (Router, LinkId) {
    use forkbus_router::wire::{encode_frame, Hello, NodeInfo, RouteUpdate, WIRE_VERSION};
    let mut config = RouterConfig::default();
    config.max_nodes = 1 << 17;
    config.max_names = 1 << 18;
    let mut r = Router::new(NodeId::new(0, 1, 1), config).expect("valid");
    let now = Timestamp::from_nanos(1);
    let child = NodeId::new(0, 2, 1);
    let link = r.handle_link_up(now, Some(child), LinkRole::Child);
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        &Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: child,
        }),
    );
    for chunk in 0..n.div_ceil(1000) {
        let upsert = (chunk * 1000..((chunk + 1) * 1000).min(n))
            .map(|k| NodeInfo {
                node: NodeId::new(0, 10 + k, 1),
                version: 1,
                names: vec![format!("a{k}"), format!("b{k}")],
                groups: vec!["all".into()],
            })
            .collect();
        encode_frame(
            &mut bytes,
            &Frame::Routes(RouteUpdate {
                upsert,
                ..RouteUpdate::default()
            }),
        );
    }
    r.handle_input(now, link, &bytes).expect("valid");
    while r.poll_event().is_some() {}
    (r, link)
}

/// Teardown of a link with many nodes and names behind it, per node removed: flat from 4k
/// to 64k nodes when teardown costs what it removes (a scan per removal made it grow with
/// the table: ~10 s for 64k).
fn bench_teardown() -> [Row; 2] {
    let mut rows = Vec::new();
    for (name, n) in [
        ("teardown, 4k nodes", 4_096u32),
        ("teardown, 64k nodes", 65_536),
    ] {
        let mut row = measure(name, "ns/node removed", u64::from(n), || {
            let (mut r, link) = announced(n);
            let start = Instant::now();
            r.handle_link_down(Timestamp::from_nanos(2), link)
                .expect("open");
            let elapsed = start.elapsed();
            assert!(r.routes().is_empty());
            elapsed
        });
        row.note = "2 names and a group per node".into();
        rows.push(row);
    }
    let [a, b]: [Row; 2] = rows.try_into().expect("two rows");
    [a, b]
}

/// Envelopes each from a new origin while the seen table is full (every one evicts the
/// least recently used window): O(1) per origin, like any envelope.
fn bench_fresh_origins() -> Row {
    const N: u64 = 200_000;
    let mut seen = forkbus_router::SeenTable::new(NodeId::new(0, 1, 1), 4096);
    let mut next = 0u32;
    measure("seen table, fresh origin", "ns/origin", N, || {
        let start = Instant::now();
        for _ in 0..N {
            next = next.wrapping_add(1);
            let id = MessageId {
                origin: NodeId::new(0, next, 1),
                seq: 0,
            };
            black_box(seen.insert(id));
        }
        start.elapsed()
    })
}

/// Where the JSON goes: `CARGO_TARGET_DIR` when it is absolute, else the target directory
/// this bench was built in (the ancestor of the executable holding cargo's `CACHEDIR.TAG`),
/// else the workspace's `target/`.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file()) {
            return dir.to_path_buf();
        }
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

fn json(rows: &[Row], total: Duration) -> String {
    let mut s = String::from("{\n");
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = writeln!(s, "  \"bench\": \"forkbus-router core\",");
    let _ = writeln!(s, "  \"unix_time\": {unix},");
    let _ = writeln!(s, "  \"payload_bytes\": {PAYLOAD},");
    let _ = writeln!(s, "  \"repetitions\": {REPS},");
    let _ = writeln!(s, "  \"total_seconds\": {:.1},", total.as_secs_f64());
    let _ = writeln!(s, "  \"results\": [");
    for (i, r) in rows.iter().enumerate() {
        let comma = if i + 1 < rows.len() { "," } else { "" };
        let _ = writeln!(
            s,
            "    {{\"name\": \"{}\", \"unit\": \"{}\", \"ops_per_rep\": {}, \"median_ns\": {:.2}, \
             \"min_ns\": {:.2}, \"max_ns\": {:.2}, \"per_second\": {:.0}, \"note\": \"{}\"}}{comma}",
            r.name,
            r.unit,
            r.ops,
            r.median_ns,
            r.min_ns,
            r.max_ns,
            1e9 / r.median_ns,
            r.note.replace('"', "'"),
        );
    }
    s.push_str("  ]\n}\n");
    s
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs benches without it: then
    // there is nothing to check beyond that this compiles and starts.
    if !std::env::args().any(|a| a == "--bench") {
        println!("core bench: run with `cargo bench -p forkbus-router --bench core`");
        return;
    }
    // Further arguments not starting with `-` pick cases by group name (for profiling).
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |group: &str| only.is_empty() || only.iter().any(|o| o == group);
    let start = Instant::now();
    let mut rows = Vec::new();
    if wanted("codec") {
        rows.extend([bench_encode(), bench_decode()]);
        rows.extend(bench_deframe());
    }
    if wanted("unicast") {
        rows.extend(bench_unicast());
    }
    if wanted("forward") {
        rows.extend(bench_forward());
    }
    if wanted("broadcast") {
        rows.extend(bench_broadcast());
    }
    if wanted("tables") {
        rows.extend(bench_teardown());
        rows.push(bench_fresh_origins());
    }
    let total = start.elapsed();

    println!(
        "forkbus-router core, {PAYLOAD} B payloads, median of {REPS} (after {WARMUP_REPS} warm-up)"
    );
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>14}  {:<16} note",
        "case", "median", "min", "max", "per second", "unit"
    );
    for r in &rows {
        println!(
            "{:<32} {:>10.1} {:>10.1} {:>10.1} {:>14.0}  {:<16} {}",
            r.name,
            r.median_ns,
            r.min_ns,
            r.max_ns,
            1e9 / r.median_ns,
            r.unit,
            r.note
        );
    }
    if !only.is_empty() {
        println!("a selection of cases: JSON not written");
        return;
    }
    let path = target_dir().join("forkbus-router-bench.json");
    match std::fs::write(&path, json(&rows, total)) {
        Ok(()) => println!("wrote {} ({:.1} s)", path.display(), total.as_secs_f64()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
