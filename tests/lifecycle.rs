//! Real-process tests of the life of a tree: the root killed, descriptor hygiene (a child
//! holds its links, stdio and what it was told to keep), fork in a threaded process, a
//! handle from another thread, and a graceful shutdown of a busy tree on `SIGTERM`.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;

use common::{ensure, open_fds, proc_state, run_until, Harness, Orphans, RootEnd};
use forkbus::bus::describe_fd;
use forkbus::error::{ForkError, NameError, SendError};
use forkbus::{
    Address, Bus, BusConfig, ExitStatus, ForkOptions, Listener, Message, Pid, Relation, Stop,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid as NixPid;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    Hello { name: String },
    Verdict { ok: bool, detail: String },
    Num(u32),
    Report,
    Count { n: u32, in_order: bool },
    Roster(Vec<u32>),
}

/// Records what the root hears.
#[derive(Debug, Default)]
struct Heard {
    hellos: BTreeMap<String, u32>,
    verdicts: Vec<(u32, bool, String)>,
    counts: Vec<(u32, bool)>,
    exits: Vec<(Pid, ExitStatus)>,
    child_shutdowns: usize,
    other: Vec<String>,
}

struct Ear(Rc<RefCell<Heard>>);

impl Listener for Ear {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        let mut h = self.0.borrow_mut();
        match msg.decode::<Wire>() {
            Ok(Wire::Hello { name }) => {
                h.hellos.insert(name, msg.origin().pid);
            }
            Ok(Wire::Verdict { ok, detail }) => h.verdicts.push((msg.origin().pid, ok, detail)),
            Ok(Wire::Count { n, in_order }) => h.counts.push((n, in_order)),
            Ok(other) => h.other.push(format!("{other:?}")),
            Err(e) => h.other.push(e.to_string()),
        }
    }

    fn on_child_exit(&mut self, _bus: &mut Bus, pid: Pid, status: ExitStatus) {
        self.0.borrow_mut().exits.push((pid, status));
    }

    fn on_peer_shutdown(&mut self, _bus: &mut Bus, s: &forkbus::PeerShutdown) {
        if matches!(s.relation, Relation::Child(_)) {
            self.0.borrow_mut().child_shutdowns += 1;
        }
    }
}

fn root_with_ear() -> Result<(Bus, Rc<RefCell<Heard>>), String> {
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let heard = Rc::new(RefCell::new(Heard::default()));
    bus.add_listener(0, Ear(heard.clone()));
    Ok((bus, heard))
}

fn hello(bus: &mut Bus, root: u32, name: &str) {
    let _ = bus.send(Address::Pid(root), &Wire::Hello { name: name.into() });
}

// ---------------------------------------------------------------------------------------
// 4. SIGKILL the root: every descendant is gone within 2 seconds.

fn kill_root_scenario(report: &common::Reporter) -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let root = bus.pid().as_raw();
    for (name, kids) in [("a", vec!["a1", "a2"]), ("b", vec!["b1"])] {
        bus.fork(ForkOptions::named(name), move |bus| {
            hello(bus, root, name);
            for k in kids {
                let _ = bus.fork(ForkOptions::named(k), move |bus| hello(bus, root, k));
            }
        })
        .map_err(|e| e.to_string())?;
    }
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        h.borrow().hellos.len() == 5
    })?;
    let pids: Vec<String> = heard.borrow().hellos.values().map(u32::to_string).collect();
    report.line(&pids.join(" "));
    // Wait to be killed.
    let _ = bus.run();
    Err("the root's loop ended".into())
}

fn kill_root_driver(d: &mut common::Driver) -> Result<(), String> {
    let line = d.line()?;
    let pids: BTreeSet<i32> = line
        .split_whitespace()
        .map(|p| p.parse().map_err(|_| format!("bad pid in {line:?}")))
        .collect::<Result<_, _>>()?;
    ensure(pids.len() == 5, || {
        format!("expected 5 descendants, got {line:?}")
    })?;
    kill(d.root, Signal::SIGKILL).map_err(|e| e.to_string())?;
    let took = d.reap_all(Duration::from_secs(10))?;
    let reaped: BTreeSet<i32> = d.reaped.iter().map(|(p, _)| p.as_raw()).collect();
    ensure(pids.is_subset(&reaped), || {
        format!("descendants {pids:?} not all reaped: {reaped:?}")
    })?;
    ensure(took < Duration::from_secs(2), || {
        format!("the descendants took {took:?} to go")
    })?;
    println!("  all 5 descendants gone {took:.2?} after the root was killed");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 6. Descriptor hygiene.

/// Checks this process's descriptors: exactly `allowed` (stdio as the harness left it, and
/// what its parent told it to keep) plus its bus's, the bus's being one epoll, one eventfd,
/// one timerfd, one signalfd and sockets for its links, one of them the parent link.
fn check_fds(bus: &Bus, allowed: &BTreeSet<RawFd>, children: usize) -> Result<(), String> {
    let d = bus.descriptors();
    let mut expected: BTreeSet<RawFd> = allowed.clone();
    expected.extend(d.all());
    let actual = open_fds();
    let describe = |set: &BTreeSet<RawFd>| -> Vec<String> {
        set.iter()
            .map(|fd| format!("{fd}={}", describe_fd(*fd).unwrap_or_default()))
            .collect()
    };
    ensure(actual == expected, || {
        format!(
            "pid {}: descriptors {:?}, expected {:?}",
            bus.pid(),
            describe(&actual),
            describe(&expected)
        )
    })?;
    let mut kinds: Vec<String> = d
        .poller
        .iter()
        .map(|fd| describe_fd(*fd).unwrap_or_default())
        .collect();
    kinds.sort();
    ensure(
        kinds
            == [
                "anon_inode:[eventfd]",
                "anon_inode:[eventpoll]",
                "anon_inode:[timerfd]",
            ],
        || format!("poller descriptors are {kinds:?}"),
    )?;
    ensure(
        describe_fd(d.signal).as_deref() == Some("anon_inode:[signalfd]"),
        || format!("signal descriptor is {:?}", describe_fd(d.signal)),
    )?;
    let parents = d
        .links
        .iter()
        .filter(|(_, r)| *r == Relation::Parent)
        .count();
    let kids = d
        .links
        .iter()
        .filter(|(_, r)| matches!(r, Relation::Child(_)))
        .count();
    ensure(
        parents == 1 && kids == children && d.links.len() == 1 + children,
        || {
            format!(
                "links {:?}, expected the parent and {children} children",
                d.links
            )
        },
    )?;
    for (fd, _) in &d.links {
        ensure(
            describe_fd(*fd).is_some_and(|s| s.starts_with("socket:")),
            || format!("link {fd} is {:?}", describe_fd(*fd)),
        )?;
    }
    ensure(d.user.is_empty(), || "user descriptors".into())
}

/// What `/proc/self/fd` says of the descriptors the root opened after its bus: a file
/// nobody keeps, and a pipe whose write end the child "c" keeps (both ends of a pipe read
/// `pipe:[inode]`). Compared by what they are, not by number: a child's bus may reuse the
/// number of a descriptor the fork closed.
#[derive(Clone, Debug)]
struct Strays {
    file: String,
    pipe: String,
}

/// Checks that of the root's descriptors opened after its bus this process holds only the
/// kept pipe end (`kept`, under the root's number), and that the kept end works.
fn check_strays(strays: &Strays, kept: Option<&std::os::fd::OwnedFd>) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let held: Vec<(RawFd, String)> = open_fds()
        .into_iter()
        .filter_map(|fd| describe_fd(fd).map(|d| (fd, d)))
        .filter(|(_, d)| *d == strays.file || *d == strays.pipe)
        .collect();
    let want: Vec<(RawFd, String)> = kept
        .map(|fd| (fd.as_raw_fd(), strays.pipe.clone()))
        .into_iter()
        .collect();
    ensure(held == want, || {
        format!(
            "pid {}: holds {held:?} of the root's later descriptors, expected {want:?}",
            std::process::id()
        )
    })?;
    if let Some(fd) = kept {
        let n = nix::unistd::write(fd, b"kept").map_err(|e| format!("write kept: {e}"))?;
        ensure(n == 4, || format!("wrote {n} bytes to the kept pipe"))?;
    }
    Ok(())
}

fn verdict(bus: &mut Bus, root: u32, result: Result<(), String>) {
    let (ok, detail) = match result {
        Ok(()) => (true, String::new()),
        Err(e) => (false, e),
    };
    let _ = bus.send(Address::Pid(root), &Wire::Verdict { ok, detail });
}

fn hygiene() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // Stdio is all a child may hold of what this process had before its bus (the harness's
    // report pipe, say).
    let stdio: BTreeSet<RawFd> = open_fds().into_iter().filter(|fd| *fd <= 2).collect();
    let (mut bus, heard) = root_with_ear()?;
    let root = bus.pid().as_raw();
    // Opened after the bus: a file no child keeps, and a pipe whose write end "c" keeps.
    let path = std::env::temp_dir().join(format!("forkbus-hygiene-{root}"));
    let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&path);
    let (back_rd, back_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| e.to_string())?;
    let strays = Strays {
        file: describe_fd(file.as_raw_fd()).ok_or("no description of the file")?,
        pipe: describe_fd(back_rd.as_raw_fd()).ok_or("no description of the pipe")?,
    };
    // A child with two children of its own; it keeps the pipe's write end (moved into its
    // closure: the parent's copy closes when `fork` returns), its children do not.
    let (st, stdio2) = (strays.clone(), stdio.clone());
    let options = ForkOptions::named("c").keep_fd(back_wr.as_raw_fd());
    bus.fork(options, move |bus| {
        for k in ["c1", "c2"] {
            let (st, stdio) = (st.clone(), stdio2.clone());
            let _ = bus.fork(ForkOptions::named(k), move |bus| {
                let r = check_fds(bus, &stdio, 0).and_then(|()| check_strays(&st, None));
                verdict(bus, root, r);
            });
        }
        let mut allowed = stdio2.clone();
        allowed.insert(back_wr.as_raw_fd());
        let r = check_fds(bus, &allowed, 2).and_then(|()| check_strays(&st, Some(&back_wr)));
        verdict(bus, root, r);
    })
    .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        h.borrow().verdicts.len() == 3
    })?;
    {
        let h = heard.borrow();
        let bad: Vec<_> = h.verdicts.iter().filter(|v| !v.1).collect();
        ensure(bad.is_empty(), || format!("failed checks: {bad:?}"))?;
    }
    // "c" wrote to the kept end before its verdict.
    let mut buf = [0u8; 16];
    let n = nix::unistd::read(&back_rd, &mut buf).map_err(|e| format!("read kept pipe: {e}"))?;
    ensure(&buf[..n] == b"kept", || {
        format!("the kept pipe carried {:?}", &buf[..n])
    })?;
    // 200 children, 25 alive at a time, each checking that it holds none of its siblings'
    // links nor the root's later descriptors; then the root's descriptors are what they
    // were.
    let before = open_fds();
    for batch in 0..8 {
        for _ in 0..25 {
            let (st, stdio) = (strays.clone(), stdio.clone());
            bus.fork(ForkOptions::default(), move |bus| {
                let r = check_fds(bus, &stdio, 0).and_then(|()| check_strays(&st, None));
                verdict(bus, root, r);
                bus.stop();
            })
            .map_err(|e| format!("fork in batch {batch}: {e}"))?;
        }
        let h = heard.clone();
        let want = 3 + 25 * (batch + 1);
        run_until(&mut bus, Duration::from_secs(30), move |bus| {
            h.borrow().verdicts.len() == want && bus.children().len() == 1
        })?;
    }
    let after = open_fds();
    ensure(before == after, || {
        format!("root descriptors before {before:?}, after 200 children {after:?}")
    })?;
    {
        let h = heard.borrow();
        let bad: Vec<_> = h.verdicts.iter().filter(|v| !v.1).collect();
        ensure(bad.is_empty(), || format!("failed checks: {bad:?}"))?;
        ensure(h.exits.len() == 200, || {
            format!("{} child exits", h.exits.len())
        })?;
        ensure(h.exits.iter().all(|(_, s)| s.success()), || {
            format!("child exits {:?}", h.exits)
        })?;
    }
    drop((file, back_rd));
    common::shutdown(bus)
}

// ---------------------------------------------------------------------------------------
// 7. fork in a process with a second thread returns an error and forks nothing.

fn threaded_fork() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    let refused = bus.fork(ForkOptions::default(), |bus| bus.stop());
    match refused {
        Err(ForkError::Threaded { threads }) => {
            ensure(threads == 2, || format!("counted {threads} threads"))?;
        }
        other => {
            let _ = tx.send(());
            let _ = thread.join();
            return Err(format!("fork with two threads gave {other:?}"));
        }
    }
    ensure(bus.children().is_empty(), || "a child was recorded".into())?;
    // No process was forked at all: this process has no child.
    let none = nix::sys::wait::waitpid(None::<NixPid>, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    ensure(none == Err(nix::errno::Errno::ECHILD), || {
        format!("waitpid found a child: {none:?}")
    })?;
    let _ = tx.send(());
    thread.join().map_err(|_| "thread panicked".to_owned())?;
    // Once alone again, fork works.
    let pid = bus
        .fork(ForkOptions::default(), |bus| bus.stop())
        .map_err(|e| format!("fork after join: {e}"))?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        !h.borrow().exits.is_empty()
    })?;
    ensure(heard.borrow().exits == [(pid, ExitStatus::Code(0))], || {
        format!("exits {:?}", heard.borrow().exits)
    })?;
    common::shutdown(bus)
}

// ---------------------------------------------------------------------------------------
// 8. A handle used from another thread sends and stops the bus.

struct Counter {
    next: u32,
    in_order: bool,
}

impl Listener for Counter {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.decode::<Wire>() {
            Ok(Wire::Num(i)) => {
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

struct Notify(Rc<RefCell<Heard>>, std::sync::mpsc::Sender<()>);

impl Listener for Notify {
    fn on_message(&mut self, _bus: &mut Bus, _msg: &Message) {
        if !self.0.borrow().counts.is_empty() {
            let _ = self.1.send(());
        }
    }
}

/// What the root heard of its handle's sends.
#[derive(Debug, Default)]
struct Outcomes {
    submitted: BTreeMap<forkbus::bus::Ticket, forkbus::MessageId>,
    delivered: BTreeSet<forkbus::MessageId>,
}

struct OutcomeEar(Rc<RefCell<Outcomes>>);

impl Listener for OutcomeEar {
    fn on_submitted(
        &mut self,
        _bus: &mut Bus,
        ticket: forkbus::bus::Ticket,
        id: forkbus::MessageId,
    ) {
        self.0.borrow_mut().submitted.insert(ticket, id);
    }

    fn on_delivered(&mut self, _bus: &mut Bus, id: forkbus::MessageId) {
        self.0.borrow_mut().delivered.insert(id);
    }
}

fn handle_from_thread() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let root = bus.pid().as_raw();
    let early = bus.handle();
    let child = bus
        .fork(ForkOptions::named("counter"), move |bus| {
            bus.add_listener(
                0,
                Counter {
                    next: 0,
                    in_order: true,
                },
            );
            // A handle copied into a child refuses: it belongs to the parent's bus.
            let refused = matches!(
                early.send(Address::Pid(root), &Wire::Num(0)),
                Err(SendError::OtherProcess)
            ) && matches!(early.stop(), Err(SendError::OtherProcess));
            verdict(
                bus,
                root,
                ensure(refused, || "copied handle did not refuse".into()),
            );
        })
        .map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel();
    bus.add_listener(1, Notify(heard.clone(), tx));
    let outcomes = Rc::new(RefCell::new(Outcomes::default()));
    bus.add_listener(2, OutcomeEar(outcomes.clone()));
    let handle = bus.handle();
    let thread = std::thread::spawn(move || -> Result<Vec<forkbus::bus::Ticket>, String> {
        let receipt = forkbus::SendOptions {
            receipt: true,
            ..forkbus::SendOptions::default()
        };
        // Every tenth with a receipt: the thread keeps its tickets to match them.
        let mut tickets = Vec::new();
        for i in 0..500 {
            if i % 10 == 0 {
                let t = handle
                    .send_with(child, &Wire::Num(i), receipt)
                    .map_err(|e| e.to_string())?;
                tickets.push(t);
            } else {
                handle
                    .send(child, &Wire::Num(i))
                    .map_err(|e| e.to_string())?;
            }
        }
        handle
            .send(child, &Wire::Report)
            .map_err(|e| e.to_string())?;
        rx.recv_timeout(Duration::from_secs(20))
            .map_err(|_| "no count came back".to_owned())?;
        handle.stop().map_err(|e| e.to_string())?;
        Ok(tickets)
    });
    let stop = bus.run().map_err(|e| e.to_string());
    let joined = thread.join().map_err(|_| "thread panicked".to_owned())?;
    let tickets = joined?;
    {
        // Each ticket with a receipt names its envelope, and that envelope's receipt came.
        let o = outcomes.borrow();
        let distinct: BTreeSet<forkbus::bus::Ticket> = tickets.iter().copied().collect();
        ensure(tickets.len() == 50 && distinct.len() == 50, || {
            format!("tickets {tickets:?}")
        })?;
        let ids: Vec<Option<&forkbus::MessageId>> =
            tickets.iter().map(|t| o.submitted.get(t)).collect();
        ensure(
            o.submitted.len() == 50 && ids.iter().all(Option::is_some),
            || format!("submitted {:?} for tickets {tickets:?}", o.submitted),
        )?;
        ensure(
            ids.iter().flatten().all(|id| o.delivered.contains(id)),
            || format!("delivered {:?}, submitted {:?}", o.delivered, o.submitted),
        )?;
    }
    ensure(stop? == Stop::Stopped, || "the loop did not stop".into())?;
    {
        let h = heard.borrow();
        ensure(h.counts == [(500, true)], || {
            format!("counts {:?}", h.counts)
        })?;
        ensure(h.verdicts.len() == 1 && h.verdicts[0].1, || {
            format!("verdicts {:?}", h.verdicts)
        })?;
    }
    common::shutdown(bus)
}

// ---------------------------------------------------------------------------------------
// 10. SIGTERM to the root of a busy tree.

/// Sends a few envelopes to random members of the roster every millisecond until the
/// tree shuts down.
fn chatter(bus: &mut Bus, roster: Rc<RefCell<Vec<u32>>>, mut seed: u64) {
    bus.add_timer(Duration::from_millis(1), move |bus| {
        if bus.is_stopping() {
            return;
        }
        let pids = roster.borrow().clone();
        if !pids.is_empty() {
            for _ in 0..5 {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let to = pids[(seed >> 33) as usize % pids.len()];
                match bus.send(Address::Pid(to), &Wire::Num((seed >> 40) as u32)) {
                    Ok(_) | Err(SendError::QueueFull { .. } | SendError::ShuttingDown) => {}
                    Err(e) => eprintln!("{}: chatter send: {e}", bus.pid()),
                }
            }
        }
        chatter(bus, roster, seed);
    });
}

/// A node of the busy tree: learns the roster, chatters, and exits non-zero if one of its
/// children did not exit 0.
struct Busy(Rc<RefCell<Vec<u32>>>);

impl Listener for Busy {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::Roster(pids)) = msg.decode::<Wire>() {
            *self.0.borrow_mut() = pids;
        }
    }

    fn on_child_exit(&mut self, bus: &mut Bus, pid: Pid, status: ExitStatus) {
        if !status.success() {
            eprintln!("{}: child {pid} {status}", bus.pid());
            bus.set_exit_code(3);
        }
    }
}

fn busy_node(bus: &mut Bus, root: u32, name: &str) {
    let roster = Rc::new(RefCell::new(Vec::new()));
    bus.add_listener(0, Busy(roster.clone()));
    chatter(bus, roster, u64::from(bus.pid().as_raw()));
    hello(bus, root, name);
}

fn sigterm_scenario(report: &common::Reporter) -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let root = bus.pid().as_raw();
    for (name, kids) in [("a", ["a1", "a2"]), ("b", ["b1", "b2"])] {
        bus.fork(ForkOptions::named(name), move |bus| {
            busy_node(bus, root, name);
            for k in kids {
                let _ = bus.fork(ForkOptions::named(k), move |bus| busy_node(bus, root, k));
            }
        })
        .map_err(|e| e.to_string())?;
    }
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        h.borrow().hellos.len() == 6
    })?;
    let mut pids: Vec<u32> = heard.borrow().hellos.values().copied().collect();
    pids.push(root);
    for p in &pids {
        if *p != root {
            bus.send(Address::Pid(*p), &Wire::Roster(pids.clone()))
                .map_err(|e| e.to_string())?;
        }
    }
    let roster = Rc::new(RefCell::new(pids));
    chatter(&mut bus, roster, 7);
    // Let it get busy, then tell the driver.
    let start = std::time::Instant::now();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        start.elapsed() > Duration::from_millis(500)
    })?;
    report.line("busy");
    let stop = bus.run().map_err(|e| e.to_string())?;
    let Stop::Shutdown(tally) = stop else {
        return Err(format!("the loop ended with {stop:?}"));
    };
    println!("  tally: {tally:?}");
    ensure(tally.processes == 7 && tally.unreported == 0, || {
        format!("tally {tally:?}")
    })?;
    ensure(tally.sent > 1000, || format!("not busy: {tally:?}"))?;
    ensure(tally.balanced(), || {
        format!(
            "sent {} != delivered {} + lost {}: {tally:?}",
            tally.sent, tally.delivered, tally.lost
        )
    })?;
    ensure(bus.children().is_empty(), || "children left".into())?;
    let h = heard.borrow();
    ensure(
        h.exits.len() == 2 && h.exits.iter().all(|(_, s)| s.success()),
        || format!("child exits {:?}", h.exits),
    )?;
    Ok(())
}

fn sigterm_driver(d: &mut common::Driver) -> Result<(), String> {
    let line = d.line()?;
    ensure(line == "busy", || format!("unexpected report {line:?}"))?;
    kill(d.root, Signal::SIGTERM).map_err(|e| e.to_string())?;
    // The harness checks the root exits 0, reaped everything itself, and no zombie is left.
    let _ = proc_state(d.root.as_raw().unsigned_abs());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The loop's own sources: listener order and panics, timers, registered descriptors.

struct Recorder {
    name: &'static str,
    log: Rc<RefCell<Vec<String>>>,
    panic: bool,
}

impl Listener for Recorder {
    fn on_message(&mut self, _bus: &mut Bus, _msg: &Message) {
        self.log.borrow_mut().push(format!("{}:message", self.name));
        if self.panic {
            panic!("listener {} panics on purpose", self.name);
        }
    }

    fn on_router_error(&mut self, _bus: &mut Bus, error: &forkbus::error::BusError) {
        if matches!(error, forkbus::error::BusError::ListenerPanicked { .. }) {
            self.log.borrow_mut().push(format!("{}:error", self.name));
        }
    }
}

fn loop_sources() -> Result<(), String> {
    // One line for the panic on purpose, not a backtrace.
    std::panic::set_hook(Box::new(|info| eprintln!("  (expected) {info}")));
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let log = Rc::new(RefCell::new(Vec::new()));
    for (priority, name, panic) in [
        (5, "e", false),
        (-1, "a", false),
        (0, "b", true),
        (5, "f", false),
        (0, "c", false),
    ] {
        bus.add_listener(
            priority,
            Recorder {
                name,
                log: log.clone(),
                panic,
            },
        );
    }
    let me = bus.pid();
    bus.send(me, &Wire::Report).map_err(|e| e.to_string())?;
    let l = log.clone();
    run_until(&mut bus, Duration::from_secs(10), move |_| {
        l.borrow().len() >= 9
    })?;
    let got = log.borrow().clone();
    ensure(
        got == [
            "a:message",
            "b:message",
            "c:message",
            "e:message",
            "f:message",
            "a:error",
            "c:error",
            "e:error",
            "f:error",
        ],
        || format!("listener calls {got:?}"),
    )?;
    // Timers fire in deadline order, a cancelled one never; a registered pipe's callback
    // reads what a timer wrote.
    let fired = Rc::new(RefCell::new(Vec::new()));
    for (ms, tag) in [(30, 3), (10, 1), (20, 2)] {
        let f = fired.clone();
        bus.add_timer(Duration::from_millis(ms), move |_| f.borrow_mut().push(tag));
    }
    let f = fired.clone();
    let cancelled = bus.add_timer(Duration::from_millis(15), move |_| f.borrow_mut().push(99));
    ensure(bus.cancel_timer(cancelled), || "cancel failed".into())?;
    ensure(!bus.cancel_timer(cancelled), || "cancelled twice".into())?;
    let (rd, wr) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let read_back = Rc::new(RefCell::new(Vec::new()));
    let r = read_back.clone();
    let id = bus
        .add_fd(rd, forkbus::bus::Interest::READABLE, move |bus, ready| {
            let mut buf = [0u8; 64];
            if let Some(fd) = bus.fd(ready.id) {
                if let Ok(n) = nix::unistd::read(fd, &mut buf) {
                    r.borrow_mut().extend_from_slice(&buf[..n]);
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let fds_with_pipe = bus.descriptors().user.len();
    bus.add_timer(Duration::from_millis(25), move |_| {
        let _ = nix::unistd::write(&wr, b"ping");
    });
    let (f, r) = (fired.clone(), read_back.clone());
    run_until(&mut bus, Duration::from_secs(10), move |_| {
        f.borrow().len() == 3 && r.borrow().len() == 4
    })?;
    ensure(*fired.borrow() == [1, 2, 3], || {
        format!("timers fired {:?}", fired.borrow())
    })?;
    ensure(read_back.borrow().as_slice() == b"ping", || {
        "pipe not read".into()
    })?;
    ensure(fds_with_pipe == 1, || "pipe not registered".into())?;
    let back = bus.remove_fd(id).ok_or("remove_fd")?;
    drop(back);
    ensure(
        bus.descriptors().user.is_empty() && bus.remove_fd(id).is_none(),
        || "descriptor still registered".into(),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// One event stream: `run_with` hands messages, receipts, timers and errors to one closure
// whose state is a plain local (no shared cell); listeners hear the same events first.

/// What the root's `run_with` handler saw.
#[derive(Debug, Default)]
struct Stream {
    replies: Vec<u32>,
    delivered: usize,
    timers: Vec<forkbus::bus::TimerId>,
    errors: Vec<String>,
}

struct TimerEar(Rc<RefCell<Vec<forkbus::bus::TimerId>>>);

impl Listener for TimerEar {
    fn on_timer(&mut self, _bus: &mut Bus, timer: forkbus::bus::TimerId) {
        self.0.borrow_mut().push(timer);
    }
}

fn one_event_stream() -> Result<(), String> {
    std::panic::set_hook(Box::new(|info| eprintln!("  (expected) {info}")));
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let heard_timers = Rc::new(RefCell::new(Vec::new()));
    bus.add_listener(0, TimerEar(heard_timers.clone()));
    let echo = bus
        .fork(ForkOptions::named("echo"), |bus| {
            bus.add_listener(0, Echo);
        })
        .map_err(|e| e.to_string())?;
    let receipt = forkbus::SendOptions {
        receipt: true,
        ..forkbus::SendOptions::default()
    };
    for n in 0..5u32 {
        bus.send_with(echo, &Wire::Num(n), receipt)
            .map_err(|e| e.to_string())?;
    }
    let tick = bus.timer(Duration::from_millis(20));
    let cancelled = bus.timer(Duration::from_millis(10));
    ensure(bus.cancel_timer(cancelled), || "cancel failed".into())?;
    let deadline = bus.timer(Duration::from_secs(20));
    let mut seen = Stream::default();
    bus.run_with(|bus, event| {
        match event {
            forkbus::Event::Message(m) => {
                if let Ok(Wire::Num(n)) = m.decode::<Wire>() {
                    seen.replies.push(n);
                }
            }
            forkbus::Event::Delivered(_) => seen.delivered += 1,
            forkbus::Event::Timer(t) => {
                seen.timers.push(t);
                if t == deadline {
                    bus.stop();
                }
            }
            forkbus::Event::Error(e) => seen.errors.push(e.to_string()),
            _ => {}
        }
        if seen.replies.len() == 5 && seen.delivered == 5 && seen.timers.contains(&tick) {
            bus.stop();
        }
    })
    .map_err(|e| e.to_string())?;
    ensure(seen.replies == [0, 1, 2, 3, 4], || {
        format!("replies {:?}", seen.replies)
    })?;
    ensure(seen.delivered == 5, || {
        format!("{} receipts", seen.delivered)
    })?;
    ensure(seen.timers == [tick], || {
        format!(
            "timers {:?} (tick {tick}, deadline {deadline})",
            seen.timers
        )
    })?;
    ensure(bus.cancel_timer(deadline), || "the deadline fired".into())?;
    ensure(*heard_timers.borrow() == seen.timers, || {
        "listeners heard other timers".into()
    })?;
    ensure(seen.errors.is_empty(), || {
        format!("errors {:?}", seen.errors)
    })?;
    // A handler that panics is caught; the panic comes back to it as an error event, and the
    // loop goes on.
    bus.send(echo, &Wire::Num(7)).map_err(|e| e.to_string())?;
    let mut after_panic = Vec::new();
    let stop = bus.timer(Duration::from_secs(20));
    bus.run_with(|bus, event| match event {
        forkbus::Event::Message(_) => panic!("the handler panics on purpose"),
        forkbus::Event::Error(e) => {
            after_panic.push(e.to_string());
            bus.stop();
        }
        forkbus::Event::Timer(t) if t == stop => bus.stop(),
        _ => {}
    })
    .map_err(|e| e.to_string())?;
    ensure(
        after_panic.len() == 1 && after_panic[0].contains("panics on purpose"),
        || format!("after the panic: {after_panic:?}"),
    )?;
    ensure(bus.cancel_timer(stop), || {
        "the run ended by its deadline".into()
    })?;
    common::shutdown_after_kills(bus, 0)
}

/// Answers each number with the same number.
struct Echo;

impl Listener for Echo {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::Num(n)) = msg.decode::<Wire>() {
            let _ = bus.send(msg.origin(), &Wire::Num(n));
        }
    }
}

// ---------------------------------------------------------------------------------------
// A child whose closure panics exits non-zero and never returns into the caller.

fn child_panics() -> Result<(), String> {
    std::panic::set_hook(Box::new(|info| eprintln!("  (expected) {info}")));
    let (mut bus, heard) = root_with_ear()?;
    let returned = Rc::new(RefCell::new(false));
    let pid = bus
        .fork(ForkOptions::default(), |_| {
            panic!("the child's closure panics on purpose")
        })
        .map_err(|e| e.to_string())?;
    // Only the parent gets here.
    *returned.borrow_mut() = true;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        !h.borrow().exits.is_empty()
    })?;
    ensure(
        heard.borrow().exits == [(pid, ExitStatus::Code(forkbus::bus::EXIT_PANIC))],
        || format!("exits {:?}", heard.borrow().exits),
    )?;
    ensure(
        *returned.borrow() && heard.borrow().child_shutdowns == 1,
        || "wrong events".into(),
    )?;
    // It crashed: its counts never came, and the tally says so.
    common::shutdown_after_kills(bus, 1)
}

// ---------------------------------------------------------------------------------------
// Names are unique: a fork or a registration with a name held elsewhere is refused; a
// grandchild cannot take its uncle's name, and a refused fork forks nothing.

fn unique_names() -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let root = bus.pid().as_raw();
    let a = bus
        .fork(ForkOptions::named("a"), move |bus| {
            let _ = bus.fork(ForkOptions::named("a1"), move |bus| hello(bus, root, "a1"));
            hello(bus, root, "a");
        })
        .map_err(|e| e.to_string())?;
    let b = bus
        .fork(ForkOptions::named("b"), move |bus| {
            // "a" is the root's other child's: refused here, for a fork and a registration.
            let forked = bus.fork(ForkOptions::named("a"), |_| {});
            let registered = bus.register_name("a");
            let refused = matches!(forked, Err(ForkError::Name(NameError::Taken { .. })))
                && matches!(registered, Err(NameError::Taken { .. }))
                && bus.children().is_empty();
            hello(bus, root, if refused { "b: refused" } else { "b: taken!" });
        })
        .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        h.borrow().hellos.len() == 3
    })?;
    ensure(heard.borrow().hellos.contains_key("b: refused"), || {
        format!("hellos {:?}", heard.borrow().hellos)
    })?;
    // A grandchild's name is not the root's to give; nothing is forked.
    let before = bus.children().len();
    let grab = bus.fork(ForkOptions::named("a1"), |_| {});
    ensure(
        matches!(grab, Err(ForkError::Name(NameError::Taken { .. })))
            && bus.children().len() == before,
        || format!("forking a second \"a1\": {grab:?}"),
    )?;
    ensure(
        matches!(bus.register_name("a"), Err(NameError::Taken { holder, .. }) if holder.pid == a.as_raw()),
        || "the root took its child's name".into(),
    )?;
    // The one sanctioned move: a parent gives its child's name to a replacement.
    let b2 = bus
        .fork(ForkOptions::named("b"), |_| {})
        .map_err(|e| e.to_string())?;
    ensure(
        bus.router().resolve(&forkbus::to::name("b")).map(|n| n.pid) == Some(b2.as_raw())
            && b2 != b,
        || "the replacement did not take the name".into(),
    )?;
    ensure(
        bus.router().resolve(&forkbus::to::name("a")).map(|n| n.pid) == Some(a.as_raw()),
        || "a name moved".into(),
    )?;
    common::shutdown(bus)
}

// ---------------------------------------------------------------------------------------
// SIGINT to the root shuts the tree down too.

fn sigint_scenario(report: &common::Reporter) -> Result<(), String> {
    let (mut bus, heard) = root_with_ear()?;
    let root = bus.pid().as_raw();
    bus.fork(ForkOptions::named("a"), move |bus| {
        hello(bus, root, "a");
        let _ = bus.fork(ForkOptions::named("a1"), move |bus| hello(bus, root, "a1"));
    })
    .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(20), move |_| {
        h.borrow().hellos.len() == 2
    })?;
    report.line("ready");
    match bus.run().map_err(|e| e.to_string())? {
        Stop::Shutdown(t) => ensure(t.processes == 3 && t.unreported == 0, || {
            format!("tally {t:?}")
        })?,
        other => return Err(format!("the loop ended with {other:?}")),
    }
    let h = heard.borrow();
    ensure(h.exits.len() == 1 && h.exits[0].1.success(), || {
        format!("exits {:?}", h.exits)
    })
}

fn sigint_driver(d: &mut common::Driver) -> Result<(), String> {
    let line = d.line()?;
    ensure(line == "ready", || format!("unexpected report {line:?}"))?;
    kill(d.root, Signal::SIGINT).map_err(|e| e.to_string())
}

fn main() {
    let mut h = Harness::new();
    h.run_with(
        "4_sigkill_root",
        Duration::from_secs(60),
        RootEnd::Any,
        Orphans::Any,
        kill_root_scenario,
        kill_root_driver,
    );
    h.run("6_descriptor_hygiene", Duration::from_secs(120), hygiene);
    h.run(
        "7_fork_refused_with_threads",
        Duration::from_secs(60),
        threaded_fork,
    );
    h.run(
        "8_handle_from_thread",
        Duration::from_secs(60),
        handle_from_thread,
    );
    h.run(
        "listeners_timers_fds",
        Duration::from_secs(60),
        loop_sources,
    );
    h.run(
        "one_event_stream",
        Duration::from_secs(60),
        one_event_stream,
    );
    h.run(
        "child_closure_panics",
        Duration::from_secs(60),
        child_panics,
    );
    h.run("names_are_unique", Duration::from_secs(60), unique_names);
    h.run_with(
        "sigint_root",
        Duration::from_secs(60),
        RootEnd::Success,
        Orphans::None,
        sigint_scenario,
        sigint_driver,
    );
    h.run_with(
        "10_sigterm_busy_tree",
        Duration::from_secs(120),
        RootEnd::Success,
        Orphans::None,
        sigterm_scenario,
        sigterm_driver,
    );
    h.finish()
}
