//! Real-process tests of routing over a three-level tree: unicast by pid and by name
//! (hop counts, order per origin), broadcast and groups (exactly once per live member).
//!
//! ```text
//!            root
//!          /      \
//!         a        b
//!        / \      / \
//!      a1   a2  b1   b2
//! ```

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use common::{ensure, run_until, Harness};
use forkbus::{to, Address, Bus, BusConfig, ForkOptions, Listener, Message, Stop};
use serde::{Deserialize, Serialize};

const NAMES: [&str; 7] = ["root", "a", "b", "a1", "a2", "b1", "b2"];

fn parent_of(name: &str) -> Option<&'static str> {
    match name {
        "a" | "b" => Some("root"),
        "a1" | "a2" => Some("a"),
        "b1" | "b2" => Some("b"),
        _ => None,
    }
}

fn depth(name: &str) -> u8 {
    parent_of(name).map_or(0, |p| depth(p) + 1)
}

/// Tree distance between two nodes.
fn dist(x: &str, y: &str) -> u8 {
    let mut ancestors = vec![x.to_owned()];
    let mut cur = x;
    while let Some(p) = parent_of(cur) {
        ancestors.push(p.to_owned());
        cur = p;
    }
    let mut lca = y;
    while !ancestors.iter().any(|a| a == lca) {
        lca = parent_of(lca).unwrap_or("root");
    }
    depth(x) + depth(y) - 2 * depth(lca)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Target {
    Pid(u32),
    Name(String),
    Group(String),
    Broadcast,
}

impl Target {
    fn address(&self) -> Address {
        match self {
            Self::Pid(p) => Address::Pid(*p),
            Self::Name(n) => to::name(n.clone()),
            Self::Group(g) => to::group(g.clone()),
            Self::Broadcast => to::broadcast(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    origin: u32,
    tag: u32,
    i: u32,
    hops: u8,
    /// The pids of the routing trace, when the sender asked for one.
    trace: Vec<u32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Got {
    records: Vec<Record>,
    ends: Vec<(u32, u32)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    Hello { name: String },
    Send { to: Target, tag: u32, count: u32 },
    Seq { tag: u32, i: u32 },
    End { tag: u32 },
    Report,
    Got(Got),
}

/// What every node records of the test traffic.
#[derive(Debug, Default)]
struct Seen {
    got: Got,
}

impl Seen {
    fn on(&mut self, msg: &Message, wire: &Wire) -> bool {
        match wire {
            Wire::Seq { tag, i } => {
                self.got.records.push(Record {
                    origin: msg.origin().pid,
                    tag: *tag,
                    i: *i,
                    hops: msg.hops(),
                    trace: msg.trace().iter().map(|h| h.node.pid).collect(),
                });
                true
            }
            Wire::End { tag } => {
                self.got.ends.push((msg.origin().pid, *tag));
                true
            }
            _ => false,
        }
    }
}

fn send_batch(bus: &mut Bus, to: &Target, tag: u32, count: u32) {
    for i in 0..count {
        if let Err(e) = bus.send(to.address(), &Wire::Seq { tag, i }) {
            eprintln!("{}: send {tag}/{i} to {to:?} refused: {e}", bus.pid());
        }
    }
    if let Err(e) = bus.send(to.address(), &Wire::End { tag }) {
        eprintln!("{}: end {tag} to {to:?} refused: {e}", bus.pid());
    }
}

/// The listener of every node but the root.
struct Agent {
    seen: Seen,
}

impl Listener for Agent {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let wire: Wire = match msg.decode() {
            Ok(w) => w,
            Err(e) => {
                eprintln!("{}: undecodable message: {e}", bus.pid());
                return;
            }
        };
        if self.seen.on(msg, &wire) {
            return;
        }
        match wire {
            Wire::Send { to, tag, count } => send_batch(bus, &to, tag, count),
            Wire::Report => {
                let _ = bus.send(msg.origin(), &Wire::Got(self.seen.got.clone()));
            }
            other => eprintln!("{}: unexpected {other:?}", bus.pid()),
        }
    }
}

fn agent(bus: &mut Bus, root: u32, name: &str, groups: &[String]) {
    for g in groups {
        bus.join_group(g).expect("group");
    }
    bus.add_listener(
        0,
        Agent {
            seen: Seen::default(),
        },
    );
    bus.send(Address::Pid(root), &Wire::Hello { name: name.into() })
        .expect("hello");
}

/// The root's view.
#[derive(Debug, Default)]
struct RootState {
    pids: BTreeMap<String, u32>,
    hello_hops: BTreeMap<String, u8>,
    latest: BTreeMap<u32, Got>,
    mine: Seen,
    delivered: Vec<forkbus::MessageId>,
    problems: Vec<String>,
}

struct RootListener(Rc<RefCell<RootState>>);

impl Listener for RootListener {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let mut st = self.0.borrow_mut();
        let wire: Wire = match msg.decode() {
            Ok(w) => w,
            Err(e) => {
                st.problems.push(format!("undecodable: {e}"));
                return;
            }
        };
        if st.mine.on(msg, &wire) {
            return;
        }
        match wire {
            Wire::Hello { name } => {
                st.hello_hops.insert(name.clone(), msg.hops());
                st.pids.insert(name, msg.origin().pid);
            }
            Wire::Got(got) => {
                st.latest.insert(msg.origin().pid, got);
            }
            other => st.problems.push(format!("root got {other:?}")),
        }
        let _ = bus;
    }

    fn on_delivered(&mut self, _bus: &mut Bus, id: forkbus::MessageId) {
        self.0.borrow_mut().delivered.push(id);
    }

    fn on_lost(&mut self, _bus: &mut Bus, report: &forkbus::LossReport) {
        self.0
            .borrow_mut()
            .problems
            .push(format!("loss report: {report:?}"));
    }
}

fn spawn_tree(bus: &mut Bus, groups: fn(&str) -> Vec<String>) -> Result<(), String> {
    let root = bus.pid().as_raw();
    for (name, kids) in [("a", ["a1", "a2"]), ("b", ["b1", "b2"])] {
        bus.fork(ForkOptions::named(name), move |bus| {
            agent(bus, root, name, &groups(name));
            for k in kids {
                if let Err(e) = bus.fork(ForkOptions::named(k), move |bus| {
                    agent(bus, root, k, &groups(k));
                }) {
                    eprintln!("fork {k}: {e}");
                }
            }
        })
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Sets up the root and its tree, waits for every hello.
fn start(groups: fn(&str) -> Vec<String>) -> Result<(Bus, Rc<RefCell<RootState>>), String> {
    let mut config = BusConfig::default();
    config.name = Some("root".into());
    let mut bus = Bus::root(config).map_err(|e| e.to_string())?;
    for g in groups("root") {
        bus.join_group(&g).map_err(|e| e.to_string())?;
    }
    let state = Rc::new(RefCell::new(RootState::default()));
    bus.add_listener(0, RootListener(state.clone()));
    spawn_tree(&mut bus, groups)?;
    let st = state.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        st.borrow().pids.len() == 6
    })?;
    {
        let st = state.borrow();
        for (name, hops) in &st.hello_hops {
            ensure(*hops == depth(name), || {
                format!(
                    "hello from {name} took {hops} hops, its depth is {}",
                    depth(name)
                )
            })?;
        }
    }
    Ok((bus, state))
}

/// Every expected `(receiver, origin, tag)` has its End; returns when so.
fn collect(
    bus: &mut Bus,
    state: &Rc<RefCell<RootState>>,
    expected: &BTreeSet<(String, String, u32)>,
) -> Result<(), String> {
    let st = state.clone();
    let exp = expected.clone();
    let mut last_poll = std::time::Instant::now() - Duration::from_secs(1);
    run_until(bus, Duration::from_secs(30), move |bus| {
        let st_ref = st.borrow();
        let done = exp.iter().all(|(rx, origin, tag)| {
            let opid = st_ref
                .pids
                .get(origin)
                .copied()
                .unwrap_or(bus.pid().as_raw());
            let ends = if rx == "root" {
                &st_ref.mine.got.ends
            } else {
                match st_ref.pids.get(rx).and_then(|p| st_ref.latest.get(p)) {
                    Some(g) => &g.ends,
                    None => return false,
                }
            };
            ends.contains(&(opid, *tag))
        });
        drop(st_ref);
        if !done && last_poll.elapsed() > Duration::from_millis(30) {
            last_poll = std::time::Instant::now();
            let _ = bus.send(to::broadcast(), &Wire::Report);
        }
        done
    })?;
    // One more round of reports, so that late duplicates would show.
    state.borrow_mut().latest.clear();
    let _ = bus.send(to::broadcast(), &Wire::Report);
    let st = state.clone();
    run_until(bus, Duration::from_secs(30), move |_| {
        st.borrow().latest.len() == 6
    })
}

fn records_of<'a>(state: &'a RootState, rx: &str) -> Option<&'a Got> {
    if rx == "root" {
        Some(&state.mine.got)
    } else {
        state.pids.get(rx).and_then(|p| state.latest.get(p))
    }
}

/// Checks that `rx` got exactly `count` in order from `origin` under `tag`, each after the
/// tree distance in hops (0 for its own).
fn check_stream(
    state: &RootState,
    rx: &str,
    origin: &str,
    tag: u32,
    count: u32,
) -> Result<(), String> {
    let root_pid = std::process::id();
    let opid = state.pids.get(origin).copied().unwrap_or(root_pid);
    let got = records_of(state, rx).ok_or_else(|| format!("no report from {rx}"))?;
    let stream: Vec<&Record> = got
        .records
        .iter()
        .filter(|r| r.origin == opid && r.tag == tag)
        .collect();
    let order: Vec<u32> = stream.iter().map(|r| r.i).collect();
    ensure(order == (0..count).collect::<Vec<_>>(), || {
        format!("{rx} got {order:?} from {origin} under tag {tag}, wanted 0..{count} in order")
    })?;
    let want = dist(rx, origin);
    for r in stream {
        ensure(r.hops == want, || {
            format!(
                "{rx} got {origin}'s {tag}/{} after {} hops, distance is {want}",
                r.i, r.hops
            )
        })?;
    }
    Ok(())
}

fn shutdown(mut bus: Bus, expect_processes: u64) -> Result<(), String> {
    bus.shutdown_tree();
    match bus.run().map_err(|e| e.to_string())? {
        Stop::Shutdown(tally) => {
            ensure(
                tally.processes == expect_processes && tally.unreported == 0,
                || format!("tally {tally:?}"),
            )?;
            ensure(bus.children().is_empty(), || "children left".into())
        }
        other => Err(format!("shutdown ended with {other:?}")),
    }
}

fn unicast() -> Result<(), String> {
    let (mut bus, state) = start(|_| Vec::new())?;
    let pid = |n: &str| state.borrow().pids[n];
    let count = 20;
    // Root to grandchildren, by pid and by name.
    send_batch(&mut bus, &Target::Pid(pid("a1")), 1, count);
    send_batch(&mut bus, &Target::Name("b2".into()), 2, count);
    // One with a delivery receipt and a routing trace.
    let options = forkbus::SendOptions {
        receipt: true,
        trace: true,
        hop_limit: None,
    };
    let traced = bus
        .send_with(to::name("a2"), &Wire::Seq { tag: 8, i: 0 }, options)
        .map_err(|e| e.to_string())?;
    bus.send(to::name("a2"), &Wire::End { tag: 8 })
        .map_err(|e| e.to_string())?;
    // Grandchild to grandchild across branches, by name and by pid.
    let commands = [
        ("a1", Target::Name("b1".into()), 3),
        ("a1", Target::Pid(pid("b2")), 4),
        ("b2", Target::Name("a2".into()), 5),
        ("b1", Target::Pid(pid("a1")), 6),
        ("a2", Target::Name("root".into()), 7),
    ];
    for (from, to, tag) in &commands {
        bus.send(
            Address::Pid(pid(from)),
            &Wire::Send {
                to: to.clone(),
                tag: *tag,
                count,
            },
        )
        .map_err(|e| e.to_string())?;
    }
    let streams = [
        ("a1", "root", 1),
        ("b2", "root", 2),
        ("b1", "a1", 3),
        ("b2", "a1", 4),
        ("a2", "b2", 5),
        ("a1", "b1", 6),
        ("root", "a2", 7),
        ("a2", "root", 8),
    ];
    let expected: BTreeSet<(String, String, u32)> = streams
        .iter()
        .map(|(rx, o, t)| ((*rx).to_owned(), (*o).to_owned(), *t))
        .collect();
    collect(&mut bus, &state, &expected)?;
    {
        let st = state.borrow();
        ensure(st.problems.is_empty(), || {
            format!("problems: {:?}", st.problems)
        })?;
        for (rx, origin, tag) in streams {
            check_stream(&st, rx, origin, tag, if tag == 8 { 1 } else { count })?;
        }
        // The receipt came back once, and the trace names every hop.
        ensure(st.delivered == [traced], || {
            format!("receipts {:?}", st.delivered)
        })?;
        let trace = records_of(&st, "a2")
            .and_then(|g| g.records.iter().find(|r| r.tag == 8))
            .map(|r| r.trace.clone());
        let want = vec![std::process::id(), st.pids["a"], st.pids["a2"]];
        ensure(trace.as_ref() == Some(&want), || {
            format!("trace {trace:?}, the path is {want:?}")
        })?;
        // Without a trace asked for, none is carried.
        ensure(
            records_of(&st, "a1").is_some_and(|g| g.records.iter().all(|r| r.trace.is_empty())),
            || "untraced envelopes carry a trace".into(),
        )?;
        // Nobody else got any of it.
        for rx in NAMES {
            let Some(got) = records_of(&st, rx) else {
                continue;
            };
            for r in &got.records {
                ensure(
                    streams.iter().any(|(x, _, t)| *x == rx && *t == r.tag),
                    || format!("{rx} got a stray {r:?}"),
                )?;
            }
        }
    }
    shutdown(bus, 7)
}

fn in_group(name: &str) -> bool {
    matches!(name, "a" | "a1" | "b2")
}

fn broadcast_and_groups() -> Result<(), String> {
    let (mut bus, state) = start(|name| {
        if in_group(name) {
            vec!["g".to_owned()]
        } else {
            Vec::new()
        }
    })?;
    let pid = |n: &str| state.borrow().pids[n];
    let count = 10;
    send_batch(&mut bus, &Target::Broadcast, 10, count);
    send_batch(&mut bus, &Target::Group("g".into()), 11, count);
    let commands = [
        ("a2", Target::Broadcast, 12),
        ("a2", Target::Group("g".into()), 13),
        ("b2", Target::Group("g".into()), 14),
        ("b", Target::Broadcast, 15),
    ];
    for (from, to, tag) in &commands {
        bus.send(
            Address::Pid(pid(from)),
            &Wire::Send {
                to: to.clone(),
                tag: *tag,
                count,
            },
        )
        .map_err(|e| e.to_string())?;
    }
    // Who must get what: broadcast to all but the sender, group to every member (a member
    // sending to its own group gets it too).
    let origins = [
        ("root", 10, false),
        ("root", 11, true),
        ("a2", 12, false),
        ("a2", 13, true),
        ("b2", 14, true),
        ("b", 15, false),
    ];
    let mut expected = BTreeSet::new();
    for (origin, tag, group) in origins {
        for rx in NAMES {
            let gets = if group { in_group(rx) } else { rx != origin };
            if gets {
                expected.insert((rx.to_owned(), origin.to_owned(), tag));
            }
        }
    }
    collect(&mut bus, &state, &expected)?;
    {
        let st = state.borrow();
        ensure(st.problems.is_empty(), || {
            format!("problems: {:?}", st.problems)
        })?;
        for (rx, origin, tag) in &expected {
            let st_count = records_of(&st, rx)
                .map(|g| {
                    let opid = st
                        .pids
                        .get(origin.as_str())
                        .copied()
                        .unwrap_or(std::process::id());
                    g.records
                        .iter()
                        .filter(|r| r.origin == opid && r.tag == *tag)
                        .count()
                })
                .unwrap_or(0);
            ensure(st_count == count as usize, || {
                format!("{rx} got {st_count} of {origin}'s tag {tag}, wanted {count} exactly")
            })?;
            if rx != origin {
                check_stream(&st, rx, origin, *tag, count)?;
            }
        }
        // Non-members and senders got nothing they should not have.
        for rx in NAMES {
            let Some(got) = records_of(&st, rx) else {
                continue;
            };
            for r in &got.records {
                let origin = st
                    .pids
                    .iter()
                    .find(|(_, p)| **p == r.origin)
                    .map_or("root", |(n, _)| n.as_str());
                ensure(
                    expected.contains(&(rx.to_owned(), origin.to_owned(), r.tag)),
                    || format!("{rx} got {r:?} from {origin}, which it must not"),
                )?;
            }
        }
    }
    shutdown(bus, 7)
}

fn main() {
    let mut h = Harness::new();
    h.run("1_unicast_three_levels", Duration::from_secs(60), unicast);
    h.run(
        "2_broadcast_and_groups",
        Duration::from_secs(60),
        broadcast_and_groups,
    );
    h.finish()
}
