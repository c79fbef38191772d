//! The live topology of a tree, with every link's queue depth and counters, as a text tree
//! and as Graphviz DOT.
//!
//! ```text
//! cargo run --release --example tree_view
//! cargo run --release --example tree_view -- --depth 3 --fanout 2 --burst 500
//! ```
//!
//! The root broadcasts "snapshot": every process sends a burst of envelopes to the root
//! (results flowing up; the root sends one down to each child too), and one loop turn after
//! queueing them (written to the kernel, not yet acknowledged) reads its router's view — `Router::links()`, `Router::link_stats()` for each,
//! `Router::stats()` — and reports it to the root over the bus. The root prints the tree
//! with both directions of every link (envelopes in flight, their bytes, bytes not yet
//! written, frames sent), writes `target/forkbus-tree.dot`, and once the tree is down
//! renders `target/forkbus-tree.svg` when Graphviz's `dot` is installed.

#[path = "common/flags.rs"]
mod flags;
use flags::number;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use forkbus::{
    to, Address, Bus, BusConfig, ForkOptions, Listener, LossReport, Message, MessageId,
    SendOptions, Stop,
};

use forkbus::error::SendError;
use serde::{Deserialize, Serialize};

const HELP: &str = "\
tree_view: a forkbus tree's links, queues and counters, as text and Graphviz DOT

USAGE: tree_view [--depth N] [--fanout N] [--burst N] [--out DIR]

  --depth N    levels below the root                         [2]
  --fanout N   children of each inner node                   [3]
  --burst N    envelopes each process queues before its view  [200]
               (thousands fill the queues: links at their bound of 4096,
               forwarded envelopes lost, loss notices flowing back down)
  --out DIR    where forkbus-tree.dot (and .svg) go           [the target directory]";

/// One link as its router sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LinkView {
    index: usize,
    peer: u32,
    in_flight: usize,
    in_flight_bytes: usize,
    unwritten: usize,
    frames_sent: u64,
    frames_received: u64,
}

/// One process's view of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NodeView {
    name: String,
    pid: u32,
    parent: u32,
    links: Vec<LinkView>,
    sent: u64,
    forwarded: u64,
    delivered: u64,
    bytes_in: u64,
    bytes_out: u64,
    burst_sent: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    Snapshot { burst: u32 },
    Work { pad: String },
    View(NodeView),
}

/// Queues a burst of envelopes to these destinations in turn; returns how many were taken
/// (a full queue refuses the rest).
fn burst(bus: &mut Bus, name: &str, burst: u32, to: &[Address]) -> u64 {
    let work = Wire::Work {
        pad: "x".repeat(100),
    };
    let mut sent = 0;
    for i in 0..burst as usize {
        if let Some(dst) = to.get(i % to.len().max(1)) {
            if let Err(e) = bus.send(dst.clone(), &work) {
                eprintln!("{name}: burst cut short after {sent}: {e}");
                break;
            }
            sent += 1;
        }
    }
    sent
}

/// This process's view of its links and counters, as its router has them now.
fn view(bus: &Bus, name: &str, burst_sent: u64) -> NodeView {
    let router = bus.router();
    let links = router
        .links()
        .into_iter()
        .filter_map(|l| {
            let s = router.link_stats(l).ok()?;
            Some(LinkView {
                index: l.index(),
                peer: s.peer.map_or(0, |p| p.pid),
                in_flight: s.in_flight,
                in_flight_bytes: s.in_flight_bytes,
                unwritten: s.pending_output,
                frames_sent: s.frames_sent,
                frames_received: s.frames_received,
            })
        })
        .collect();
    let s = router.stats();
    NodeView {
        name: name.to_owned(),
        pid: bus.pid().as_raw(),
        parent: bus.parent().map_or(0, |p| p.pid),
        links,
        sent: s.sent,
        forwarded: s.forwarded,
        delivered: s.delivered,
        bytes_in: s.bytes_in,
        bytes_out: s.bytes_out,
        burst_sent,
    }
}

/// A process's report to the root, sent with a receipt until it is delivered.
#[derive(Default)]
struct Report {
    wire: Option<Wire>,
    /// The id of the copy in flight; `None` while waiting for room.
    id: Option<MessageId>,
}

struct Node {
    name: String,
    root: u32,
    report: Rc<RefCell<Report>>,
}

/// Sends the report (again). Under a heavy burst a full queue may refuse it here (then
/// `on_send_ready` sends it again) or on the way (a loss reported back: then `on_lost`
/// does, a moment later).
fn send_report(bus: &mut Bus, root: u32, name: &str, report: &RefCell<Report>) {
    let mut r = report.borrow_mut();
    let Some(wire) = &r.wire else {
        return;
    };
    let receipt = SendOptions {
        receipt: true,
        ..SendOptions::default()
    };
    match bus.send_with(Address::Pid(root), wire, receipt) {
        Ok(id) => r.id = Some(id),
        Err(SendError::QueueFull { .. }) => r.id = None,
        Err(e) => {
            eprintln!("{name}: cannot report: {e}");
            r.wire = None;
        }
    }
}

impl Listener for Node {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::Snapshot { burst: n }) = msg.decode::<Wire>() {
            let sent = burst(bus, &self.name, n, &[Address::Pid(self.root)]);
            // One loop turn later: the burst is written, and not yet acknowledged.
            let (name, root, report) = (self.name.clone(), self.root, self.report.clone());
            bus.add_timer(Duration::ZERO, move |bus| {
                report.borrow_mut().wire = Some(Wire::View(view(bus, &name, sent)));
                send_report(bus, root, &name, &report);
            });
        }
    }

    fn on_send_ready(&mut self, bus: &mut Bus) {
        if self.report.borrow().id.is_none() {
            send_report(bus, self.root, &self.name, &self.report);
        }
    }

    fn on_delivered(&mut self, _bus: &mut Bus, id: MessageId) {
        let mut r = self.report.borrow_mut();
        if r.id == Some(id) {
            *r = Report::default();
        }
    }

    fn on_lost(&mut self, bus: &mut Bus, lost: &LossReport) {
        if self.report.borrow().id != Some(lost.id) {
            return; // a burst envelope: its loss is the point of a too heavy burst
        }
        let (name, root, report) = (self.name.clone(), self.root, self.report.clone());
        bus.add_timer(Duration::from_millis(10), move |bus| {
            send_report(bus, root, &name, &report);
        });
    }
}

fn spawn(bus: &mut Bus, root: u32, parent: &str, depth: u32, fanout: u32) {
    for i in 1..=fanout {
        let name = if parent == "root" {
            i.to_string()
        } else {
            format!("{parent}.{i}")
        };
        let n = name.clone();
        let forked = bus.fork(ForkOptions::named(name.clone()), move |bus| {
            let report = Rc::default();
            bus.add_listener(
                0,
                Node {
                    name: n.clone(),
                    root,
                    report,
                },
            );
            if depth > 1 {
                spawn(bus, root, &n, depth - 1, fanout);
            }
        });
        if let Err(e) = forked {
            eprintln!("{parent}: cannot fork {name}: {e}");
        }
    }
}

#[derive(Default)]
struct State {
    views: BTreeMap<u32, NodeView>,
    work: u64,
}

struct RootListener(Rc<RefCell<State>>);

impl Listener for RootListener {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        let mut st = self.0.borrow_mut();
        match msg.decode::<Wire>() {
            Ok(Wire::View(v)) => {
                st.views.insert(v.pid, v);
            }
            Ok(Wire::Work { .. }) => st.work += 1,
            Ok(other) => eprintln!("root: unexpected {other:?}"),
            Err(e) => eprintln!("root: undecodable: {e}"),
        }
    }
}

/// Runs the loop until `done` holds (checked every millisecond), for 20 s at most.
fn run_until(
    bus: &mut Bus,
    st: &Rc<RefCell<State>>,
    done: impl Fn(&State) -> bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&st.borrow()) {
        if Instant::now() > deadline {
            let st = st.borrow();
            let have: Vec<&str> = st.views.values().map(|v| v.name.as_str()).collect();
            return Err(format!(
                "timed out waiting for the tree (views from {have:?}, {} burst envelopes in)",
                st.work
            )
            .into());
        }
        bus.add_timer(Duration::from_millis(1), Bus::stop);
        if bus.run()? != Stop::Stopped {
            return Err("the loop ended".into());
        }
    }
    Ok(())
}

fn kib(bytes: usize) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// The link of `from` whose peer is `to`.
fn link(views: &BTreeMap<u32, NodeView>, from: u32, to: u32) -> Option<&LinkView> {
    views.get(&from)?.links.iter().find(|l| l.peer == to)
}

fn queue(l: Option<&LinkView>) -> String {
    l.map_or_else(
        || "-".to_owned(),
        |l| {
            format!(
                "{:>4} env {:>9} {:>9} {:>6}",
                l.in_flight,
                kib(l.in_flight_bytes),
                kib(l.unwritten),
                l.frames_sent
            )
        },
    )
}

fn children(views: &BTreeMap<u32, NodeView>, pid: u32) -> Vec<&NodeView> {
    let mut kids: Vec<&NodeView> = views
        .values()
        .filter(|v| v.parent == pid && v.pid != pid)
        .collect();
    kids.sort_by_key(|v| {
        v.name
            .rsplit('.')
            .next()
            .and_then(|i| i.parse::<u32>().ok())
    });
    kids
}

fn text_tree(views: &BTreeMap<u32, NodeView>, root: u32, depth: usize) -> String {
    let width = 3 * depth + views.values().map(|v| v.name.len()).max().unwrap_or(4);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$} {:<7} {:>5} {:>5} {:>5} │ {:<34} │ {:<34}",
        "", "", "", "", "", "↑ its link to the parent", "↓ the parent's link to it"
    );
    let _ =
        writeln!(
        out,
        "{:<width$} {:<7} {:>5} {:>5} {:>5} │ {:>8} {:>9} {:>9} {:>6} │ {:>8} {:>9} {:>9} {:>6}",
        "node", "pid", "sent", "fwd", "dlv", "in-flt", "bytes", "unwrit", "frames", "in-flt",
        "bytes", "unwrit", "frames"
    );
    let mut stack: Vec<(String, &NodeView, bool, bool)> = views
        .get(&root)
        .map(|v| vec![(String::new(), v, true, true)])
        .unwrap_or_default();
    while let Some((indent, v, last, is_root)) = stack.pop() {
        let glyph = match (is_root, last) {
            (true, _) => "",
            (false, true) => "└─ ",
            (false, false) => "├─ ",
        };
        let (up, down) = if is_root {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                queue(link(views, v.pid, v.parent)),
                queue(link(views, v.parent, v.pid)),
            )
        };
        let _ = writeln!(
            out,
            "{:<width$} {:<7} {:>5} {:>5} {:>5} │ {up:<34} │ {down:<34}",
            format!("{indent}{glyph}{}", v.name),
            v.pid,
            v.sent,
            v.forwarded,
            v.delivered
        );
        let below = match (is_root, last) {
            (true, _) => String::new(),
            (false, true) => format!("{indent}   "),
            (false, false) => format!("{indent}│  "),
        };
        for (i, kid) in children(views, v.pid).into_iter().rev().enumerate() {
            stack.push((below.clone(), kid, i == 0, false));
        }
    }
    out
}

fn dot(views: &BTreeMap<u32, NodeView>) -> String {
    let mut out = String::from(
        "digraph forkbus {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n  \
         edge [fontname=\"monospace\", fontsize=9];\n",
    );
    for v in views.values() {
        let _ = writeln!(
            out,
            "  p{} [label=\"{}\\npid {}\\nsent {} fwd {} dlv {}\\nin {} out {}\"];",
            v.pid,
            v.name,
            v.pid,
            v.sent,
            v.forwarded,
            v.delivered,
            kib(usize::try_from(v.bytes_in).unwrap_or(usize::MAX)),
            kib(usize::try_from(v.bytes_out).unwrap_or(usize::MAX))
        );
    }
    for v in views.values() {
        for l in &v.links {
            // One edge per direction: the sender's queue towards that peer.
            let color = if l.in_flight > 0 { "red" } else { "gray40" };
            let _ = writeln!(
                out,
                "  p{} -> p{} [label=\"#{}: {} in flight ({})\\n{} unwritten, {} frames\", color={color}, \
                 penwidth={:.1}];",
                v.pid,
                l.peer,
                l.index,
                l.in_flight,
                kib(l.in_flight_bytes),
                kib(l.unwritten),
                l.frames_sent,
                1.0 + (l.in_flight as f64).log2().max(0.0) / 2.0
            );
        }
    }
    out.push_str("}\n");
    out
}

/// The `target` directory this example was built in, or `./target`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|a| a.file_name().is_some_and(|n| n == "target"))
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// The flags (`--depth`, `--fanout`, `--burst`, `--out`), or `None` for `--help`.
fn parse_args() -> Result<Option<(u32, u32, u32, PathBuf)>, lexopt::Error> {
    use lexopt::prelude::*;
    let (mut depth, mut fanout, mut n_burst) = (2u32, 3u32, 200u32);
    let mut out = None;
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("depth") => depth = number(&mut p, "--depth")?,
            Long("fanout") => fanout = number(&mut p, "--fanout")?,
            Long("burst") => n_burst = number(&mut p, "--burst")?,
            Long("out") => out = Some(PathBuf::from(p.value()?)),
            _ => return Err(arg.unexpected()),
        }
    }
    if depth == 0 || fanout == 0 || depth > 400 || below_root(depth, fanout) > 400 {
        return Err("--depth and --fanout must be positive, 400 processes at most".into());
    }
    let out = out.unwrap_or_else(target_dir);
    Ok(Some((depth, fanout, n_burst, out)))
}

/// The processes below the root of a tree `depth` levels deep with `fanout` children per
/// inner node (at most `u32::MAX`).
fn below_root(depth: u32, fanout: u32) -> u32 {
    (1..=depth)
        .map(|d| fanout.saturating_pow(d))
        .fold(0, u32::saturating_add)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (depth, fanout, n_burst, out) = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{HELP}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("tree_view: {e} (try --help)");
            std::process::exit(2);
        }
    };
    let total = below_root(depth, fanout);

    let mut bus = Bus::root(BusConfig::default().name("root"))?;
    let state = Rc::new(RefCell::new(State::default()));
    bus.add_listener(0, RootListener(state.clone()));
    let root = bus.pid().as_raw();
    spawn(&mut bus, root, "root", depth, fanout);

    // Everyone queues a burst and reports its view; the root does the same towards its
    // children.
    bus.send(to::broadcast(), &Wire::Snapshot { burst: n_burst })?;
    let kids: Vec<Address> = bus.children().into_iter().map(Address::from).collect();
    let sent = burst(&mut bus, "root", n_burst, &kids);
    bus.add_timer(Duration::ZERO, Bus::stop); // one loop turn: the burst is written
    bus.run()?;
    state
        .borrow_mut()
        .views
        .insert(root, view(&bus, "root", sent));
    let n = total as usize + 1;
    run_until(&mut bus, &state, move |s| s.views.len() == n)?;
    // Then every burst envelope that was taken: all of them, unless a full queue on the
    // way refused to forward some (each such loss is reported to its origin).
    let expected_work: u64 = state
        .borrow()
        .views
        .values()
        .filter(|v| v.pid != root)
        .map(|v| v.burst_sent)
        .sum();
    let last = std::cell::Cell::new((0, Instant::now()));
    run_until(&mut bus, &state, move |s| {
        if s.work != last.get().0 {
            last.set((s.work, Instant::now()));
        }
        s.work == expected_work || last.get().1.elapsed() > Duration::from_millis(300)
    })?;
    let work = state.borrow().work;

    let views = state.borrow().views.clone();
    println!(
        "{n} processes; each queued {n_burst} envelopes (the root: round robin to its children, \
         the others: to the root) and read its router's view one loop turn later (each process \
         at its own moment).\n"
    );
    print!("{}", text_tree(&views, root, depth as usize));
    println!(
        "\nin-flt: envelopes queued or written and not yet acknowledged (the link's accounting, \
         bounded by max_queue_envelopes); bytes: their frames; unwrit: bytes the kernel has not \
         taken yet; frames: envelope frames sent on the link since start.\n\
         {work} of the {expected_work} burst envelopes sent to the root reached it{}.",
        if work == expected_work {
            ""
        } else {
            " (the others were lost to a full queue on the way, and reported to their origins)"
        }
    );

    std::fs::create_dir_all(&out)?;
    let dot_path = out.join("forkbus-tree.dot");
    std::fs::write(&dot_path, dot(&views))?;
    println!("\nGraphviz DOT written to {}", dot_path.display());

    bus.shutdown_tree();
    match bus.run()? {
        Stop::Shutdown(t) => println!(
            "shut down: {} processes, {} unreported.",
            t.processes, t.unreported
        ),
        other => println!("shutdown ended with {other:?}"),
    }
    drop(bus);

    // The tree is down: no child can inherit anything of this process any more.
    let svg_path = out.join("forkbus-tree.svg");
    match std::process::Command::new("dot")
        .arg("-Tsvg")
        .arg("-o")
        .arg(&svg_path)
        .arg(&dot_path)
        .status()
    {
        Ok(s) if s.success() => println!("rendered {}", svg_path.display()),
        Ok(s) => println!("dot failed ({s}): no SVG"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("Graphviz `dot` is not installed: no SVG (the .dot file is there)");
        }
        Err(e) => println!("cannot run dot: {e}"),
    }
    Ok(())
}
