//! One broadcast and a few unicasts over a deeper tree, with full routing traces, and
//! duplicate suppression made visible by closing a cycle.
//!
//! ```text
//! cargo run --release --example broadcast_trace
//! cargo run --release --example broadcast_trace -- --depth 2 --fanout 4 --no-cycle
//! ```
//!
//! The root forks a tree (3 levels × 3 children: 1 + 3 + 9 + 27 processes by default), then:
//!
//! 1. broadcasts one traced envelope: every node reports the trace it arrived with (each hop:
//!    node, the link it came in on, the time);
//! 2. sends traced unicasts: root → the last leaf by pid, first leaf → last leaf by name (across
//!    the tree), last leaf → root by name;
//! 3. joins the first and the last leaf by one more socketpair (`Bus::attach_link`, a peer
//!    link), closing a cycle, and broadcasts again: each end of the redundant link gets a
//!    second copy over it, which it drops — its origin lives behind the tree, which carries
//!    the same envelope (`RouterStats::redundant`); each node still delivers it once;
//! 4. prints every node's counters (delivered, forwarded, duplicates and redundant copies
//!    dropped) in a picture of the tree.

#[path = "common/flags.rs"]
mod flags;
use flags::number;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use forkbus::{
    to, Address, Bus, BusConfig, ForkOptions, Listener, Message, NodeId, Pid, SendOptions, Stop,
};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use serde::{Deserialize, Serialize};

const HELP: &str = "\
broadcast_trace: routing traces and duplicate suppression over a forkbus tree

USAGE: broadcast_trace [--depth N] [--fanout N] [--no-cycle]

  --depth N    levels below the root        [3]
  --fanout N   children of each inner node  [3]
  --no-cycle   do not add the redundant link (step 3)";

type Hop = (u32, Option<u32>, u64);

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    Ready {
        name: String,
    },
    Ping {
        tag: u32,
    },
    /// Send a traced `Ping { tag }` to this pid (or name).
    Send {
        pid: Option<u32>,
        name: Option<String>,
        tag: u32,
    },
    Got {
        tag: u32,
        name: String,
        trace: Vec<Hop>,
    },
    /// Adopt your end of the redundant link.
    Attach,
    Attached {
        name: String,
    },
    Report,
    Stats {
        name: String,
        delivered: u64,
        forwarded: u64,
        duplicates: u64,
    },
}

thread_local! {
    /// The two ends of the redundant link, by the name of the node that will adopt each.
    /// Every process gets a copy of the list at fork, but only the ends meant for its
    /// subtree stay open in it (`ForkOptions::keep_fd`): it forgets the others, and
    /// closes an end once it passed it on, so that no stray copy masks an end of file.
    static CROSS: RefCell<Vec<(String, OwnedFd)>> = const { RefCell::new(Vec::new()) };
}

/// Closes the ends not kept here.
fn keep_cross(keep: impl Fn(&str) -> bool) {
    CROSS.with(|c| c.borrow_mut().retain(|(owner, _)| keep(owner)));
}

/// In a freshly forked node: forgets the ends meant for other subtrees. The fork closed
/// them (they were not kept), so they must not be closed again.
fn forget_cross(keep: impl Fn(&str) -> bool) {
    CROSS.with(|c| {
        let all = std::mem::take(&mut *c.borrow_mut());
        for (owner, fd) in all {
            if keep(&owner) {
                c.borrow_mut().push((owner, fd));
            } else {
                let _closed_by_fork = fd.into_raw_fd();
            }
        }
    });
}

/// The descriptors of the ends meant for a subtree.
fn cross_fds_for(name: &str) -> Vec<RawFd> {
    CROSS.with(|c| {
        c.borrow()
            .iter()
            .filter(|(owner, _)| in_subtree(owner, name))
            .map(|(_, fd)| fd.as_raw_fd())
            .collect()
    })
}

fn in_subtree(owner: &str, name: &str) -> bool {
    owner == name || owner.starts_with(&format!("{name}."))
}

fn trace_of(msg: &Message) -> Vec<Hop> {
    msg.trace()
        .iter()
        .map(|h| (h.node.pid, h.link, h.at.as_nanos()))
        .collect()
}

fn traced() -> SendOptions {
    SendOptions {
        trace: true,
        ..SendOptions::default()
    }
}

/// Every process but the root.
struct Node {
    name: String,
    root: u32,
}

impl Node {
    fn report(&self, bus: &mut Bus, wire: &Wire) {
        if let Err(e) = bus.send(Address::Pid(self.root), wire) {
            eprintln!("{}: cannot report: {e}", self.name);
        }
    }
}

impl Listener for Node {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.decode::<Wire>() {
            Ok(Wire::Ping { tag }) => {
                let got = Wire::Got {
                    tag,
                    name: self.name.clone(),
                    trace: trace_of(msg),
                };
                self.report(bus, &got);
            }
            Ok(Wire::Send { pid, name, tag }) => {
                let to = match (pid, name) {
                    (Some(p), _) => to::pid(Pid::from_raw(p)),
                    (None, Some(n)) => to::name(n),
                    (None, None) => return,
                };
                if let Err(e) = bus.send_with(to, &Wire::Ping { tag }, traced()) {
                    eprintln!("{}: send refused: {e}", self.name);
                }
            }
            Ok(Wire::Attach) => {
                let fd = CROSS.with(|c| {
                    let mut c = c.borrow_mut();
                    let at = c.iter().position(|(owner, _)| *owner == self.name)?;
                    Some(c.swap_remove(at).1)
                });
                match fd.map(|fd| bus.attach_link(fd, None)) {
                    Some(Ok(_)) => {} // reported when the peer's hello arrives
                    Some(Err(e)) => eprintln!("{}: attach_link: {e}", self.name),
                    None => eprintln!("{}: no end of the redundant link here", self.name),
                }
            }
            Ok(Wire::Report) => {
                let s = bus.router().stats();
                let stats = Wire::Stats {
                    name: self.name.clone(),
                    delivered: s.delivered,
                    forwarded: s.forwarded,
                    duplicates: s.duplicates + s.redundant,
                };
                self.report(bus, &stats);
            }
            Ok(_) => {}
            Err(e) => eprintln!("{}: undecodable: {e}", self.name),
        }
    }

    fn on_peer_up(&mut self, bus: &mut Bus, peer: NodeId) {
        // Neither the parent nor a child: the redundant link is up.
        let known =
            bus.parent() == Some(peer) || bus.children().iter().any(|c| c.as_raw() == peer.pid);
        if !known {
            let attached = Wire::Attached {
                name: self.name.clone(),
            };
            self.report(bus, &attached);
        }
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
        let mut options = ForkOptions::named(name.clone());
        for fd in cross_fds_for(&name) {
            options = options.keep_fd(fd);
        }
        let forked = bus.fork(options, move |bus| {
            forget_cross(|owner| in_subtree(owner, &n));
            bus.add_listener(
                0,
                Node {
                    name: n.clone(),
                    root,
                },
            );
            if let Err(e) = bus.send(Address::Pid(root), &Wire::Ready { name: n.clone() }) {
                eprintln!("{n}: cannot say ready: {e}");
            }
            if depth > 1 {
                spawn(bus, root, &n, depth - 1, fanout);
            }
            keep_cross(|owner| owner == n);
        });
        if let Err(e) = forked {
            eprintln!("{parent}: cannot fork {name}: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The root

#[derive(Default)]
struct State {
    pids: BTreeMap<String, u32>,
    got: BTreeMap<(u32, String), Vec<Hop>>,
    /// Envelopes that reached a node's application more than once (must stay empty).
    twice: Vec<(u32, String)>,
    attached: Vec<String>,
    stats: BTreeMap<String, [u64; 3]>,
}

struct RootListener(Rc<RefCell<State>>);

impl Listener for RootListener {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let mut st = self.0.borrow_mut();
        match msg.decode::<Wire>() {
            Ok(Wire::Ready { name }) => {
                st.pids.insert(name, msg.origin().pid);
            }
            Ok(Wire::Got { tag, name, trace }) => {
                if let Some(_earlier) = st.got.insert((tag, name.clone()), trace) {
                    st.twice.push((tag, name));
                }
            }
            Ok(Wire::Ping { tag }) => {
                st.got.insert((tag, "root".into()), trace_of(msg));
            }
            Ok(Wire::Attached { name }) => st.attached.push(name),
            Ok(Wire::Stats {
                name,
                delivered,
                forwarded,
                duplicates,
            }) => {
                st.stats.insert(name, [delivered, forwarded, duplicates]);
            }
            Ok(other) => eprintln!("root: unexpected {other:?}"),
            Err(e) => eprintln!("root: undecodable: {e}"),
        }
        let _ = bus;
    }
}

/// Runs the loop until `done` holds (checked every millisecond), for 20 s at most.
fn run_until(
    bus: &mut Bus,
    st: &Rc<RefCell<State>>,
    what: &str,
    done: impl Fn(&State) -> bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&st.borrow()) {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        bus.add_timer(Duration::from_millis(1), Bus::stop);
        if bus.run()? != Stop::Stopped {
            return Err("the loop ended".into());
        }
    }
    Ok(())
}

fn name_of(st: &State, pid: u32) -> String {
    if pid == std::process::id() {
        return "root".into();
    }
    st.pids
        .iter()
        .find(|(_, p)| **p == pid)
        .map_or_else(|| pid.to_string(), |(n, _)| n.clone())
}

fn print_trace(st: &State, title: &str, trace: &[Hop]) {
    let hops = trace.len().saturating_sub(1);
    println!("{title}: {hops} hop{}", if hops == 1 { "" } else { "s" });
    let t0 = trace.first().map_or(0, |h| h.2);
    for (i, (pid, link, at)) in trace.iter().enumerate() {
        let how = match (i, link) {
            (0, _) => "origin".to_owned(),
            (_, Some(l)) => format!("in on link #{l}"),
            (_, None) => "in".to_owned(),
        };
        println!(
            "    {:>9} µs  {:<8} pid {:<7} {how}",
            format!("+{:.1}", at.saturating_sub(t0) as f64 / 1e3),
            name_of(st, *pid),
            pid
        );
    }
}

/// The children of a node, in order ("1.10" after "1.9").
fn children<'a>(st: &'a State, parent: &str) -> Vec<&'a String> {
    let mut kids: Vec<&String> = st
        .pids
        .keys()
        .filter(|n| match n.rsplit_once('.') {
            Some((p, _)) => p == parent,
            None => parent == "root",
        })
        .collect();
    kids.sort_by_key(|n| n.rsplit('.').next().and_then(|i| i.parse::<u32>().ok()));
    kids
}

/// One line per node: the tree, where each broadcast came from and when, and counters.
fn print_tree(st: &State, tags: &[u32], depth: usize) {
    let width = 3 * depth + st.pids.keys().map(String::len).max().unwrap_or(4);
    let cell = |tag: u32, name: &str| match st.got.get(&(tag, name.to_owned())) {
        Some(t) if t.len() >= 2 => {
            let us = t[t.len() - 1].2.saturating_sub(t[0].2) as f64 / 1e3;
            let via = name_of(st, t[t.len() - 2].0);
            format!(" │ {:>4} {us:>8.1} {via:<6}", t.len() - 1)
        }
        _ if name == "root" => format!(" │ {:>4} {:>8} {:<6}", "", "origin", ""),
        _ => format!(" │ {:>4} {:>8} {:<6}", "-", "-", "-"),
    };
    let counters = |name: &str| {
        st.stats
            .get(name)
            .map_or_else(String::new, |[d, f, x]| format!(" │ {d:>9} {f:>9} {x:>10}"))
    };
    let mut head1 = format!("{:<width$} {:<7}", "", "");
    let mut head2 = format!("{:<width$} {:<7}", "node", "pid");
    for tag in tags {
        head1 += &format!(
            " │ {:<20}",
            format!("broadcast #{}", if *tag == 1 { 1 } else { 2 })
        );
        head2 += &format!(" │ {:>4} {:>8} {:<6}", "hops", "µs", "via");
    }
    println!("{head1} │ counters since start");
    println!("{head2} │ delivered forwarded duplicates");
    let line = |prefix: &str, name: &str, pid: u32| {
        let mut l = format!("{:<width$} {pid:<7}", format!("{prefix}{name}"));
        for tag in tags {
            l += &cell(*tag, name);
        }
        println!("{l}{}", counters(name));
    };
    line("", "root", std::process::id());
    // Depth first, with the box-drawing prefix of each level.
    let mut stack: Vec<(String, &String, bool)> = children(st, "root")
        .into_iter()
        .rev()
        .enumerate()
        .map(|(i, n)| (String::new(), n, i == 0))
        .collect();
    while let Some((indent, name, last)) = stack.pop() {
        let glyph = if last { "└─ " } else { "├─ " };
        line(&format!("{indent}{glyph}"), name, st.pids[name]);
        let below = format!("{indent}{}", if last { "   " } else { "│  " });
        for (i, kid) in children(st, name).into_iter().rev().enumerate() {
            stack.push((below.clone(), kid, i == 0));
        }
    }
}

/// The flags (`--depth`, `--fanout`, whether to add the redundant link), or `None` for
/// `--help`.
fn parse_args() -> Result<Option<(u32, u32, bool)>, lexopt::Error> {
    use lexopt::prelude::*;
    let (mut depth, mut fanout, mut cycle) = (3u32, 3u32, true);
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("depth") => depth = number(&mut p, "--depth")?,
            Long("fanout") => fanout = number(&mut p, "--fanout")?,
            Long("no-cycle") => cycle = false,
            _ => return Err(arg.unexpected()),
        }
    }
    if depth == 0 || fanout == 0 || depth > 400 || below_root(depth, fanout) > 400 {
        return Err("--depth and --fanout must be positive, 400 processes at most".into());
    }
    Ok(Some((depth, fanout, cycle)))
}

/// The processes below the root of a tree `depth` levels deep with `fanout` children per
/// inner node (at most `u32::MAX`).
fn below_root(depth: u32, fanout: u32) -> u32 {
    (1..=depth)
        .map(|d| fanout.saturating_pow(d))
        .fold(0, u32::saturating_add)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (depth, fanout, cycle) = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{HELP}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("broadcast_trace: {e} (try --help)");
            std::process::exit(2);
        }
    };
    let total = below_root(depth, fanout);
    // The redundant link joins the first and the last leaf (none if they are the same).
    let first = vec!["1"; depth as usize].join(".");
    let last = vec![fanout.to_string(); depth as usize].join(".");
    let cycle = cycle && first != last;

    let mut bus = Bus::root(BusConfig::default().name("root"))?;
    let state = Rc::new(RefCell::new(State::default()));
    bus.add_listener(0, RootListener(state.clone()));
    if cycle {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        CROSS.with(|c| {
            c.borrow_mut()
                .extend([(first.clone(), a), (last.clone(), b)])
        });
    }
    let root = bus.pid().as_raw();
    let t0 = Instant::now();
    spawn(&mut bus, root, "root", depth, fanout);
    keep_cross(|_| false);
    let n = total as usize;
    run_until(&mut bus, &state, "every node to say ready", move |s| {
        s.pids.len() == n
    })?;
    println!(
        "{} processes up in {:.1} ms ({depth} levels × {fanout} children under the root).",
        total + 1,
        t0.elapsed().as_secs_f64() * 1e3
    );

    // 1. One traced broadcast.
    println!("\n── 1. one traced broadcast (every node reports the trace it arrived with)");
    bus.send_with(to::broadcast(), &Wire::Ping { tag: 1 }, traced())?;
    run_until(&mut bus, &state, "broadcast #1", move |s| {
        s.got.keys().filter(|(t, _)| *t == 1).count() == n
    })?;
    if let Some(t) = state.borrow().got.get(&(1, last.clone())) {
        print_trace(
            &state.borrow(),
            &format!("broadcast #1 at the last leaf {last}"),
            t,
        );
    }
    println!("(every node's arrival is in the table at the end)");

    // 2. Traced unicasts.
    println!("\n── 2. traced unicasts");
    let pid_of = |name: &str| state.borrow().pids.get(name).copied().unwrap_or(0);
    bus.send_with(
        to::pid(Pid::from_raw(pid_of(&last))),
        &Wire::Ping { tag: 2 },
        traced(),
    )?;
    let cmd = |pid: Option<u32>, name: Option<&str>, tag| Wire::Send {
        pid,
        name: name.map(str::to_owned),
        tag,
    };
    bus.send(
        to::pid(Pid::from_raw(pid_of(&first))),
        &cmd(None, Some(&last), 3),
    )?;
    bus.send(
        to::pid(Pid::from_raw(pid_of(&last))),
        &cmd(None, Some("root"), 4),
    )?;
    let unicasts = [
        (2, last.clone(), format!("root → {last} by pid")),
        (3, last.clone(), format!("{first} → {last} by name")),
        (4, "root".to_owned(), format!("{last} → root by name")),
    ];
    let wanted: Vec<(u32, String)> = unicasts.iter().map(|(t, d, _)| (*t, d.clone())).collect();
    run_until(&mut bus, &state, "the unicasts", move |s| {
        wanted.iter().all(|k| s.got.contains_key(k))
    })?;
    for (tag, dst, title) in &unicasts {
        print_trace(
            &state.borrow(),
            title,
            &state.borrow().got[&(*tag, dst.clone())],
        );
    }

    // 3. A redundant link closes a cycle; broadcast again.
    let mut tags = vec![1];
    if cycle {
        println!("\n── 3. a redundant link {first} ═ {last}, then broadcast #2");
        bus.send(to::pid(Pid::from_raw(pid_of(&first))), &Wire::Attach)?;
        bus.send(to::pid(Pid::from_raw(pid_of(&last))), &Wire::Attach)?;
        run_until(&mut bus, &state, "the redundant link", |s| {
            s.attached.len() == 2
        })?;
        bus.send_with(to::broadcast(), &Wire::Ping { tag: 5 }, traced())?;
        run_until(&mut bus, &state, "broadcast #2", move |s| {
            s.got.keys().filter(|(t, _)| *t == 5).count() == n
        })?;
        tags.push(5);
        bus.send(
            to::pid(Pid::from_raw(pid_of(&first))),
            &cmd(None, Some(&last), 6),
        )?;
        let key6 = (6, last.clone());
        run_until(&mut bus, &state, "the last unicast", move |s| {
            s.got.contains_key(&key6)
        })?;
        print_trace(
            &state.borrow(),
            &format!("{first} → {last} by name, with the redundant link up"),
            &state.borrow().got[&(6, last.clone())],
        );
    }

    // 4. Counters, asked node by node (a broadcast would cross the cycle too), once the
    // last second copies have landed.
    let settle = Instant::now() + Duration::from_millis(50);
    run_until(&mut bus, &state, "a moment", move |_| {
        Instant::now() >= settle
    })?;
    let pids: Vec<u32> = state.borrow().pids.values().copied().collect();
    for pid in pids {
        bus.send(to::pid(Pid::from_raw(pid)), &Wire::Report)?;
    }
    run_until(&mut bus, &state, "the counters", move |s| {
        s.stats.len() == n
    })?;
    let s = bus.router().stats();
    state.borrow_mut().stats.insert(
        "root".into(),
        [s.delivered, s.forwarded, s.duplicates + s.redundant],
    );
    println!(
        "\n── 4. the tree: broadcast #1{} (hops, µs after the send, the hop it came from), and \
         each node's counters",
        if cycle { " and #2" } else { "" }
    );
    print_tree(&state.borrow(), &tags, depth as usize);
    let dups: u64 = state.borrow().stats.values().map(|v| v[2]).sum();
    println!(
        "\nForwarded counts every envelope a node passed on since start (the reports going up \
         included). Duplicates dropped in the whole tree: {dups}."
    );
    println!(
        "On a tree each node has exactly one path from any origin, and a flood never goes back \
         the way it came, so broadcast #1 made no duplicate: the seen-ID windows are there for \
         redundant paths and replayed frames."
    );
    let twice = &state.borrow().twice;
    if !twice.is_empty() {
        println!("DELIVERED MORE THAN ONCE: {twice:?}");
        std::process::exit(1);
    }
    if cycle {
        println!(
            "The redundant link {first} ═ {last} closed a cycle through the root, so broadcast #2 \
             crossed it both ways: each end dropped the copy that came over it, since its origin \
             lives behind the tree, which carries the same envelope (the duplicates column: one \
             redundant copy at each end; a peer link speaks for its two ends only and passes \
             nothing on). Every node delivered #2 once (each reported it once, with the trace of \
             its first copy)."
        );
    }

    bus.shutdown_tree();
    match bus.run()? {
        Stop::Shutdown(t) => println!(
            "\nshut down: {} processes, {} unreported.",
            t.processes, t.unreported
        ),
        other => println!("\nshutdown ended with {other:?}"),
    }
    Ok(())
}
