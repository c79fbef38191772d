//! Real-process tests of what is lost and how it is told: a middle node killed with
//! envelopes queued towards it, garbage on a link, and a consumer that stops reading.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use common::{ensure, proc_state, rss_kib, run_until, Harness, Orphans, RootEnd};
use forkbus::error::{BusError, SendError};
use forkbus::router::wire::{encode_frame, Frame, Hello, WIRE_VERSION};
use forkbus::router::DownCause;
use forkbus::{
    Address, Bus, BusConfig, Destination, ExitStatus, Fate, ForkOptions, Listener, LossReason,
    LossReport, Message, MessageId, NodeId, PeerShutdown, Pid, Relation, UnknownReason,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use serde::{Deserialize, Serialize};

/// Whether a lost list's entry went down with its link (its one kind of fate there).
fn peer_down(fate: Fate) -> bool {
    matches!(
        fate,
        Fate::Lost(LossReason::NeverWritten | LossReason::PartiallyWritten)
            | Fate::Unknown(UnknownReason::Unacknowledged)
    )
}

type Id = (u32, u32, u64);

fn id_of(m: MessageId) -> Id {
    (m.origin.pid, m.origin.incarnation, m.seq)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    Hello { name: String },
    Num { i: u32, pad: Vec<u8> },
    Go { to: u32, count: u32 },
    Sent { ids: Vec<Id> },
    Report,
    Lost { ids: Vec<(Id, String, u32)> },
    Verdict { ok: bool, detail: String },
    Ping,
    Pong,
    Count { n: u32, in_order: bool },
}

fn num(i: u32, pad: usize) -> Wire {
    Wire::Num {
        i,
        pad: vec![0xab; pad],
    }
}

/// Everything a node hears, shared with the scenario's code.
#[derive(Debug, Default)]
struct Heard {
    messages: Vec<(u32, Wire)>,
    shutdowns: Vec<PeerShutdown>,
    errors: Vec<String>,
    protocol_errors: usize,
    lost: Vec<LossReport>,
    exits: Vec<(Pid, ExitStatus)>,
    peers_up: Vec<NodeId>,
    ready: usize,
}

struct Ear(Rc<RefCell<Heard>>);

impl Listener for Ear {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(w) = msg.decode::<Wire>() {
            self.0.borrow_mut().messages.push((msg.origin().pid, w));
        }
    }

    fn on_peer_shutdown(&mut self, _bus: &mut Bus, s: &PeerShutdown) {
        self.0.borrow_mut().shutdowns.push(s.clone());
    }

    fn on_router_error(&mut self, _bus: &mut Bus, e: &BusError) {
        let mut h = self.0.borrow_mut();
        if matches!(e, BusError::Protocol { .. }) {
            h.protocol_errors += 1;
        }
        h.errors.push(e.to_string());
    }

    fn on_lost(&mut self, _bus: &mut Bus, r: &LossReport) {
        self.0.borrow_mut().lost.push(r.clone());
    }

    fn on_child_exit(&mut self, _bus: &mut Bus, pid: Pid, status: ExitStatus) {
        self.0.borrow_mut().exits.push((pid, status));
    }

    fn on_peer_up(&mut self, _bus: &mut Bus, peer: NodeId) {
        self.0.borrow_mut().peers_up.push(peer);
    }

    fn on_send_ready(&mut self, _bus: &mut Bus) {
        self.0.borrow_mut().ready += 1;
    }
}

fn with_ear(bus: &mut Bus) -> Rc<RefCell<Heard>> {
    let heard = Rc::new(RefCell::new(Heard::default()));
    bus.add_listener(0, Ear(heard.clone()));
    heard
}

fn hello(bus: &mut Bus, root: u32, name: &str) {
    let _ = bus.send(Address::Pid(root), &Wire::Hello { name: name.into() });
}

fn pid_of(heard: &Heard, name: &str) -> Option<u32> {
    heard.messages.iter().find_map(|(p, w)| match w {
        Wire::Hello { name: n } if n == name => Some(*p),
        _ => None,
    })
}

fn touch(dir: &Path, file: &str) {
    let _ = std::fs::write(dir.join(file), b"");
}

// ---------------------------------------------------------------------------------------
// 3. SIGKILL a middle node while envelopes are queued towards it.
//
//            root
//           /    \
//          m      o
//         / \
//       l1   l2      (l1, l2 do not die with m: they see its link go down)
//
// Every link to m is made idle (all acknowledged), then m is stopped (SIGSTOP, so it never
// reads or acknowledges again), then envelopes are queued towards it from every side, then
// it is killed. Every neighbour's lost list must be exactly what it sent after the stop,
// and o, whose envelopes were lost at the root, must get a loss notice for each.

const AFTER_STOP: u32 = 12;
const PAD: usize = 4096;

/// l1 and l2: wait until their link to m is idle, say so, wait for m to stop, send, say
/// so, then check their lost list when m dies.
struct Leaf {
    name: &'static str,
    sent: Rc<RefCell<Vec<Id>>>,
}

impl Listener for Leaf {
    fn on_peer_shutdown(&mut self, bus: &mut Bus, s: &PeerShutdown) {
        if s.relation != Relation::Parent {
            return;
        }
        let lost: BTreeSet<Id> = s.lost.iter().map(|l| id_of(l.envelope.id)).collect();
        let sent: BTreeSet<Id> = self.sent.borrow().iter().copied().collect();
        let reasons_ok = s
            .lost
            .iter()
            .all(|l| peer_down(l.fate) && l.envelope.payload.len() > PAD);
        if lost == sent && sent.len() == AFTER_STOP as usize && reasons_ok {
            bus.set_exit_code(0);
        } else {
            eprintln!(
                "{}: lost list {lost:?} != sent after the stop {sent:?} (reasons ok: {reasons_ok})",
                self.name
            );
            bus.set_exit_code(4);
        }
    }
}

fn leaf(bus: &mut Bus, name: &'static str, dir: PathBuf, root: u32) {
    let sent = Rc::new(RefCell::new(Vec::new()));
    bus.add_listener(
        0,
        Leaf {
            name,
            sent: sent.clone(),
        },
    );
    hello(bus, root, name);
    leaf_idle(bus, name, dir, root, sent);
}

/// Phase 1: wait until every envelope towards m is acknowledged.
fn leaf_idle(
    bus: &mut Bus,
    name: &'static str,
    dir: PathBuf,
    root: u32,
    sent: Rc<RefCell<Vec<Id>>>,
) {
    bus.add_timer(Duration::from_millis(5), move |bus| {
        let idle = bus
            .router()
            .links()
            .first()
            .and_then(|l| bus.router().link_stats(*l).ok())
            .is_some_and(|s| s.in_flight == 0 && s.pending_output == 0);
        if idle {
            touch(&dir, &format!("{name}.idle"));
            leaf_wait_stop(bus, name, dir, root, sent);
        } else {
            leaf_idle(bus, name, dir, root, sent);
        }
    });
}

/// Phase 2: once m is stopped, queue envelopes towards the root through it.
fn leaf_wait_stop(
    bus: &mut Bus,
    name: &'static str,
    dir: PathBuf,
    root: u32,
    sent: Rc<RefCell<Vec<Id>>>,
) {
    bus.add_timer(Duration::from_millis(5), move |bus| {
        let parent = nix::unistd::getppid().as_raw().unsigned_abs();
        if proc_state(parent) == Some('T') {
            for i in 0..AFTER_STOP {
                match bus.send(Address::Pid(root), &num(i, PAD)) {
                    Ok(id) => sent.borrow_mut().push(id_of(id)),
                    Err(e) => eprintln!("{name}: send refused: {e}"),
                }
            }
            touch(&dir, &format!("{name}.sent"));
        } else {
            leaf_wait_stop(bus, name, dir, root, sent);
        }
    });
}

/// o: on Go, sends towards l2 through the root and m, reports the ids; on Report, reports
/// its loss notices.
struct Other {
    sent: Vec<Id>,
    lost: Vec<(Id, String, u32)>,
}

impl Listener for Other {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.decode::<Wire>() {
            Ok(Wire::Go { to, count }) => {
                for i in 0..count {
                    if let Ok(id) = bus.send(Address::Pid(to), &num(i, PAD)) {
                        self.sent.push(id_of(id));
                    }
                }
                let _ = bus.send(
                    msg.origin(),
                    &Wire::Sent {
                        ids: self.sent.clone(),
                    },
                );
            }
            Ok(Wire::Report) => {
                let _ = bus.send(
                    msg.origin(),
                    &Wire::Lost {
                        ids: self.lost.clone(),
                    },
                );
            }
            _ => {}
        }
    }

    fn on_lost(&mut self, _bus: &mut Bus, r: &LossReport) {
        self.lost.push((id_of(r.id), r.fate.to_string(), r.at.pid));
    }
}

fn kill_middle() -> Result<(), String> {
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let heard = with_ear(&mut bus);
    let root = bus.pid().as_raw();
    let dir = std::env::temp_dir().join(format!("forkbus-kill-middle-{root}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = kill_middle_in(&mut bus, &heard, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    // The middle node and its two leaves (which die with it) never report.
    common::shutdown_after_kills(bus, 3)
}

fn kill_middle_in(bus: &mut Bus, heard: &Rc<RefCell<Heard>>, dir: &Path) -> Result<(), String> {
    let root = bus.pid().as_raw();
    let d = dir.to_path_buf();
    let m = bus
        .fork(ForkOptions::named("m"), move |bus| {
            hello(bus, root, "m");
            for name in ["l1", "l2"] {
                let d = d.clone();
                let _ = bus.fork(
                    ForkOptions::named(name).die_with_parent(false),
                    move |bus| {
                        leaf(bus, name, d, root);
                    },
                );
            }
        })
        .map_err(|e| e.to_string())?;
    bus.fork(ForkOptions::named("o"), move |bus| {
        bus.add_listener(
            0,
            Other {
                sent: Vec::new(),
                lost: Vec::new(),
            },
        );
        hello(bus, root, "o");
    })
    .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(bus, Duration::from_secs(20), move |_| {
        ["m", "l1", "l2", "o"]
            .iter()
            .all(|n| pid_of(&h.borrow(), n).is_some())
    })?;
    let (l1, l2, o) = {
        let h = heard.borrow();
        (pid_of(&h, "l1"), pid_of(&h, "l2"), pid_of(&h, "o"))
    };
    let (Some(l1), Some(l2), Some(o)) = (l1, l2, o) else {
        return Err("missing hellos".into());
    };
    let m_node = bus.child_node(m).ok_or("m has no node")?;
    let m_link = bus
        .router()
        .routes()
        .into_iter()
        .find(|(n, _)| *n == m_node)
        .map(|(_, l)| l)
        .ok_or("no route to m")?;
    // Every link to m idle: ours, and l1's and l2's (they tell by files).
    let d = dir.to_path_buf();
    run_until(bus, Duration::from_secs(20), move |bus| {
        let ours = bus
            .router()
            .link_stats(m_link)
            .is_ok_and(|s| s.in_flight == 0 && s.pending_output == 0);
        ours && d.join("l1.idle").exists() && d.join("l2.idle").exists()
    })?;
    kill(common::nix_pid(m), Signal::SIGSTOP).map_err(|e| e.to_string())?;
    run_until(bus, Duration::from_secs(20), move |_| {
        proc_state(m.as_raw()) == Some('T')
    })?;
    // Queue envelopes towards m: ours to m and to l1 through it, o's to l2 through us.
    let mut ours = BTreeSet::new();
    for i in 0..AFTER_STOP {
        ours.insert(id_of(bus.send(m, &num(i, PAD)).map_err(|e| e.to_string())?));
        ours.insert(id_of(
            bus.send(Address::Pid(l1), &num(i, PAD))
                .map_err(|e| e.to_string())?,
        ));
    }
    bus.send(
        Address::Pid(o),
        &Wire::Go {
            to: l2,
            count: AFTER_STOP,
        },
    )
    .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(bus, Duration::from_secs(20), move |_| {
        h.borrow()
            .messages
            .iter()
            .any(|(_, w)| matches!(w, Wire::Sent { .. }))
    })?;
    let o_sent: BTreeSet<Id> = heard
        .borrow()
        .messages
        .iter()
        .find_map(|(_, w)| match w {
            Wire::Sent { ids } => Some(ids.iter().copied().collect()),
            _ => None,
        })
        .unwrap_or_default();
    ensure(o_sent.len() == AFTER_STOP as usize, || {
        format!("o sent {o_sent:?}")
    })?;
    let queued = 2 * AFTER_STOP as usize + o_sent.len();
    let d = dir.to_path_buf();
    run_until(bus, Duration::from_secs(20), move |bus| {
        bus.router()
            .link_stats(m_link)
            .is_ok_and(|s| s.in_flight == queued)
            && d.join("l1.sent").exists()
            && d.join("l2.sent").exists()
    })?;
    // Now kill it.
    kill(common::nix_pid(m), Signal::SIGKILL).map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(bus, Duration::from_secs(20), move |_| {
        let h = h.borrow();
        !h.exits.is_empty() && !h.shutdowns.is_empty()
    })?;
    // o's loss notices come through the root.
    bus.send(Address::Pid(o), &Wire::Report)
        .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(bus, Duration::from_secs(20), move |_| {
        h.borrow()
            .messages
            .iter()
            .any(|(_, w)| matches!(w, Wire::Lost { .. }))
    })?;
    // Give a second event, were there one, the chance to show.
    let t = std::time::Instant::now();
    run_until(bus, Duration::from_secs(5), move |_| {
        t.elapsed() > Duration::from_millis(100)
    })?;

    let h = heard.borrow();
    ensure(h.exits == [(m, ExitStatus::Signal(9))], || {
        format!("exits {:?}", h.exits)
    })?;
    ensure(h.shutdowns.len() == 1, || {
        format!("{} peer shutdowns", h.shutdowns.len())
    })?;
    let s = &h.shutdowns[0];
    ensure(
        s.relation == Relation::Child(m) && s.peer == Some(m_node),
        || format!("shutdown of {:?} {:?}", s.relation, s.peer),
    )?;
    let lost: BTreeSet<Id> = s.lost.iter().map(|l| id_of(l.envelope.id)).collect();
    let want: BTreeSet<Id> = ours.union(&o_sent).copied().collect();
    ensure(lost == want, || {
        format!("lost list {lost:?}\n differs from what was queued after the stop {want:?}")
    })?;
    let mut by_reason = std::collections::BTreeMap::new();
    for l in &s.lost {
        *by_reason.entry(l.fate.to_string()).or_insert(0) += 1;
    }
    println!(
        "  the root's lost list: {} envelopes, {by_reason:?}",
        s.lost.len()
    );
    for l in &s.lost {
        ensure(peer_down(l.fate), || format!("fate {:?}", l.fate))?;
        ensure(
            matches!(forkbus::bus::decode::<Wire>(&l.envelope.payload), Ok(Wire::Num { ref pad, .. }) if pad.len() == PAD),
            || "a lost envelope is not whole".into(),
        )?;
    }
    // Our own envelopes: one loss report each.
    let reported: BTreeSet<Id> = h.lost.iter().map(|r| id_of(r.id)).collect();
    ensure(reported == ours && h.lost.len() == ours.len(), || {
        format!("loss reports {reported:?} for ours {ours:?}")
    })?;
    // o's: one loss notice each, from the root.
    let o_lost = h
        .messages
        .iter()
        .find_map(|(_, w)| match w {
            Wire::Lost { ids } => Some(ids.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let o_lost_ids: BTreeSet<Id> = o_lost.iter().map(|(i, _, _)| *i).collect();
    ensure(o_lost_ids == o_sent && o_lost.len() == o_sent.len(), || {
        format!("o's loss notices {o_lost:?} for {o_sent:?}")
    })?;
    ensure(o_lost.iter().all(|(_, _, at)| *at == root), || {
        format!("notices not from the root: {o_lost:?}")
    })?;
    // Nothing l1 or l2 sent after the stop arrived.
    let arrived = h
        .messages
        .iter()
        .filter(|(p, w)| (*p == l1 || *p == l2) && matches!(w, Wire::Num { .. }))
        .count();
    ensure(arrived == 0, || {
        format!("{arrived} envelopes from l1/l2 arrived")
    })?;
    ensure(h.protocol_errors == 0, || format!("errors {:?}", h.errors))
}

// ---------------------------------------------------------------------------------------
// 5. Garbage and an oversized length written into a link.

fn raw_pair() -> Result<(OwnedFd, OwnedFd), String> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| e.to_string())
}

fn write_all(fd: &OwnedFd, bytes: &[u8]) -> Result<(), String> {
    let mut off = 0;
    while off < bytes.len() {
        off += nix::unistd::write(fd, &bytes[off..]).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Attaches a raw socket as a link and writes garbage into it: the link must close with a
/// protocol error and a peer shutdown, and nothing else.
fn garbage_here(bus: &mut Bus, heard: &Rc<RefCell<Heard>>) -> Result<(), String> {
    let before = (
        heard.borrow().protocol_errors,
        heard.borrow().shutdowns.len(),
    );
    let (ours, theirs) = raw_pair()?;
    bus.attach_link(ours, None).map_err(|e| e.to_string())?;
    let mut junk = vec![0, 0, 0, 9, 0xee];
    let mut x: u32 = 0x1234_5678;
    for _ in 0..64 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        junk.push((x >> 16) as u8);
    }
    write_all(&theirs, &junk)?;
    let h = heard.clone();
    run_until(bus, Duration::from_secs(20), move |_| {
        let h = h.borrow();
        h.protocol_errors > before.0 && h.shutdowns.len() > before.1
    })?;
    let h = heard.borrow();
    let s = h.shutdowns.last().ok_or("no shutdown")?;
    ensure(
        s.relation == Relation::Attached && matches!(s.cause, DownCause::Protocol(_)),
        || format!("shutdown {s:?}"),
    )?;
    drop(theirs);
    Ok(())
}

/// The child: answers pings.
struct Pinger;

impl Listener for Pinger {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::Ping) = msg.decode::<Wire>() {
            let _ = bus.send(msg.origin(), &Wire::Pong);
        }
    }
}

fn pongs(heard: &Heard) -> usize {
    heard
        .messages
        .iter()
        .filter(|(_, w)| matches!(w, Wire::Pong))
        .count()
}

fn ping(bus: &mut Bus, heard: &Rc<RefCell<Heard>>, to: Pid) -> Result<(), String> {
    let before = pongs(&heard.borrow());
    bus.send(to, &Wire::Ping).map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(bus, Duration::from_secs(20), move |_| {
        pongs(&h.borrow()) > before
    })
}

fn garbage() -> Result<(), String> {
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let heard = with_ear(&mut bus);
    let root = bus.pid().as_raw();
    let child = bus
        .fork(ForkOptions::named("c"), move |bus| {
            let heard = with_ear(bus);
            bus.add_listener(1, Pinger);
            // The same check inside a child: garbage on one of its links, then it goes on
            // answering its parent.
            let result = garbage_here(bus, &heard);
            let (ok, detail) = match result {
                Ok(()) => (true, String::new()),
                Err(e) => (false, e),
            };
            let _ = bus.send(Address::Pid(root), &Wire::Verdict { ok, detail });
        })
        .map_err(|e| e.to_string())?;
    ping(&mut bus, &heard, child)?;

    // Random garbage on an attached link of the root.
    garbage_here(&mut bus, &heard)?;
    ping(&mut bus, &heard, child)?;

    // A peer that says hello properly, has envelopes queued towards it, then announces a
    // frame of 4 GiB.
    let fake = NodeId::new(0, 4_000_000, 77);
    let (ours, theirs) = raw_pair()?;
    bus.attach_link(ours, Some(fake))
        .map_err(|e| e.to_string())?;
    let mut queued = BTreeSet::new();
    for i in 0..3 {
        queued.insert(id_of(
            bus.send(Address::To(Destination::Node(fake)), &num(i, 100))
                .map_err(|e| e.to_string())?,
        ));
    }
    let t = std::time::Instant::now();
    run_until(&mut bus, Duration::from_secs(5), move |_| {
        t.elapsed() > Duration::from_millis(50)
    })?;
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        &Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: fake,
        }),
    );
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 2]);
    write_all(&theirs, &bytes)?;
    let before = heard.borrow().shutdowns.len();
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        let h = h.borrow();
        h.shutdowns.len() > before && h.lost.len() >= 3
    })?;
    {
        let h = heard.borrow();
        ensure(h.peers_up.contains(&fake), || {
            "the fake peer's hello was not taken".into()
        })?;
        let s = h.shutdowns.last().ok_or("no shutdown")?;
        ensure(
            matches!(
                &s.cause,
                DownCause::Protocol(forkbus::router::ProtocolError::FrameTooLarge {
                    len: u32::MAX,
                    ..
                })
            ),
            || format!("cause {:?}", s.cause),
        )?;
        let lost: BTreeSet<Id> = s.lost.iter().map(|l| id_of(l.envelope.id)).collect();
        ensure(lost == queued, || {
            format!("lost list {lost:?}, queued {queued:?}")
        })?;
        ensure(
            s.lost
                .iter()
                .all(|l| l.fate == Fate::Unknown(UnknownReason::Unacknowledged)),
            || {
                format!(
                    "reasons {:?}",
                    s.lost.iter().map(|l| l.fate).collect::<Vec<_>>()
                )
            },
        )?;
        let reported: BTreeSet<Id> = h.lost.iter().map(|r| id_of(r.id)).collect();
        ensure(reported == queued, || format!("loss reports {reported:?}"))?;
        ensure(h.protocol_errors == 2, || format!("errors {:?}", h.errors))?;
    }
    drop(theirs);
    // The process is up and its child link works; the child's own check passed.
    ping(&mut bus, &heard, child)?;
    {
        let h = heard.borrow();
        let verdicts: Vec<_> = h
            .messages
            .iter()
            .filter_map(|(_, w)| match w {
                Wire::Verdict { ok, detail } => Some((*ok, detail.clone())),
                _ => None,
            })
            .collect();
        ensure(verdicts == [(true, String::new())], || {
            format!("child verdicts {verdicts:?}")
        })?;
    }
    common::shutdown(bus)
}

// ---------------------------------------------------------------------------------------
// 9. A consumer that stops reading.

struct Consumer {
    next: u32,
    in_order: bool,
}

impl Listener for Consumer {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.decode::<Wire>() {
            Ok(Wire::Num { i, .. }) => {
                self.in_order &= i == self.next;
                self.next += 1;
            }
            Ok(Wire::Report) => {
                let _ = bus.send(
                    msg.origin(),
                    &Wire::Count {
                        n: self.next,
                        in_order: self.in_order,
                    },
                );
            }
            _ => {}
        }
    }
}

const TOTAL: u32 = 3000;
const MAX_ENVELOPES: usize = 64;
const MAX_BYTES: usize = 32 << 10;

/// Sends Num(next..) to the consumer until refused; returns how many were accepted.
fn pump(bus: &mut Bus, to: Pid, next: &mut u32, limit: u32) -> Result<u32, String> {
    let start = *next;
    while *next < limit {
        match bus.send(to, &num(*next, 200)) {
            Ok(_) => *next += 1,
            Err(SendError::QueueFull { .. }) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(*next - start)
}

fn backpressure() -> Result<(), String> {
    let mut config = BusConfig::default();
    config.router.max_frame = 16 << 10;
    config.router.max_queue_envelopes = MAX_ENVELOPES;
    config.router.max_queue_bytes = MAX_BYTES;
    config.router.ack_every = 16;
    let mut bus = Bus::root(config).map_err(|e| e.to_string())?;
    let heard = with_ear(&mut bus);
    let root = bus.pid().as_raw();
    let child = bus
        .fork(ForkOptions::named("consumer"), move |bus| {
            bus.add_listener(
                0,
                Consumer {
                    next: 0,
                    in_order: true,
                },
            );
            hello(bus, root, "consumer");
        })
        .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        pid_of(&h.borrow(), "consumer").is_some()
    })?;
    let node = bus.child_node(child).ok_or("no node")?;
    let link = bus
        .router()
        .routes()
        .into_iter()
        .find(|(n, _)| *n == node)
        .map(|(_, l)| l)
        .ok_or("no route")?;

    // The consumer stops reading.
    kill(common::nix_pid(child), Signal::SIGSTOP).map_err(|e| e.to_string())?;
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        proc_state(child.as_raw()) == Some('T')
    })?;
    let mut next = 0;
    let first = pump(&mut bus, child, &mut next, TOTAL)?;
    // Let the loop write what the kernel takes, then fill up again.
    let t = std::time::Instant::now();
    run_until(&mut bus, Duration::from_secs(5), move |_| {
        t.elapsed() > Duration::from_millis(100)
    })?;
    pump(&mut bus, child, &mut next, TOTAL)?;
    let accepted = next;
    ensure(first > 0 && (accepted as usize) <= MAX_ENVELOPES, || {
        format!("accepted {first} then {accepted} envelopes with the consumer stopped")
    })?;
    let stats = bus.router().link_stats(link).map_err(|e| e.to_string())?;
    ensure(
        stats.in_flight <= MAX_ENVELOPES && stats.in_flight_bytes <= MAX_BYTES,
        || {
            format!(
                "link holds {} envelopes, {} bytes",
                stats.in_flight, stats.in_flight_bytes
            )
        },
    )?;
    // Keep trying: every send is refused, and memory does not grow.
    let rss = rss_kib();
    let mut refused = 0;
    for _ in 0..20_000 {
        if matches!(
            bus.send(child, &num(next, 200)),
            Err(SendError::QueueFull { .. })
        ) {
            refused += 1;
        }
    }
    let grown = rss_kib().saturating_sub(rss);
    println!("  consumer stopped: {accepted} envelopes accepted, then 20000 refused; memory grew {grown} KiB");
    ensure(refused == 20_000, || {
        format!("only {refused} of 20000 refused")
    })?;
    ensure(grown < 2048, || {
        format!("memory grew by {grown} KiB while refusing")
    })?;
    let stats = bus.router().link_stats(link).map_err(|e| e.to_string())?;
    ensure(stats.in_flight == accepted as usize, || {
        format!(
            "link holds {} envelopes, {accepted} were accepted",
            stats.in_flight
        )
    })?;

    // The consumer resumes: everything queued arrives, and the rest follows as room
    // frees up (on_send_ready).
    kill(common::nix_pid(child), Signal::SIGCONT).map_err(|e| e.to_string())?;
    let next = Rc::new(RefCell::new(next));
    let n2 = next.clone();
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(60), move |bus| {
        let mut n = n2.borrow_mut();
        if *n < TOTAL && pump(bus, child, &mut n, TOTAL).is_err() {
            return false;
        }
        *n == TOTAL && h.borrow().ready > 0
    })?;
    bus.send(child, &Wire::Report).map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        h.borrow()
            .messages
            .iter()
            .any(|(_, w)| matches!(w, Wire::Count { .. }))
    })?;
    {
        let h = heard.borrow();
        let count = h.messages.iter().find_map(|(_, w)| match w {
            Wire::Count { n, in_order } => Some((*n, *in_order)),
            _ => None,
        });
        ensure(count == Some((TOTAL, true)), || {
            format!("the consumer counted {count:?}")
        })?;
        ensure(h.lost.is_empty() && h.errors.is_empty(), || {
            format!("losses {:?}, errors {:?}", h.lost, h.errors)
        })?;
    }
    common::shutdown(bus)
}

fn main() {
    let mut h = Harness::new();
    h.run_with(
        "3_sigkill_middle_node",
        Duration::from_secs(120),
        RootEnd::Success,
        Orphans::ExitZero,
        |_| kill_middle(),
        |_| Ok(()),
    );
    h.run("5_garbage_on_a_link", Duration::from_secs(60), garbage);
    h.run(
        "9_consumer_stops_reading",
        Duration::from_secs(120),
        backpressure,
    );
    h.finish()
}
