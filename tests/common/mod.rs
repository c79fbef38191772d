//! The harness of the real-process tests: every scenario runs in a forked process of its
//! own (the root of its tree, in a process group of its own) under a hard deadline; the
//! test's main process is a child subreaper, so every process a scenario leaves behind is
//! reparented to it, killed on failure and reaped. The last line printed is
//! `N passed, M failed`.

#![allow(dead_code, unreachable_pub)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use forkbus::{Bus, Pid, Stop};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid as NixPid};

/// What a scenario expects of the processes other than its root that the main process
/// ends up reaping (orphans).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orphans {
    /// None: the root reaps all its descendants.
    None,
    /// Every one exits 0.
    ExitZero,
    /// Whatever (they were killed on purpose).
    Any,
}

/// How the scenario's root must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootEnd {
    /// Exit code 0.
    Success,
    /// Whatever (the driver killed it).
    Any,
}

/// The main process's side of a running scenario.
pub struct Driver {
    /// The scenario's root.
    pub root: NixPid,
    lines: BufReader<std::fs::File>,
    deadline: Instant,
    /// Every process reaped by the driver, with its status.
    pub reaped: Vec<(NixPid, WaitStatus)>,
}

impl Driver {
    /// The next line the scenario reported, waiting at most until the deadline.
    pub fn line(&mut self) -> Result<String, String> {
        loop {
            if !self.lines.buffer().is_empty() {
                let mut s = String::new();
                self.lines.read_line(&mut s).map_err(|e| e.to_string())?;
                return Ok(s.trim_end().to_owned());
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out waiting for the scenario's report".into());
            }
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let ready = {
                use std::os::fd::AsFd;
                let mut fds = [nix::poll::PollFd::new(
                    self.lines.get_ref().as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                nix::poll::poll(&mut fds, ms)
            };
            match ready {
                Ok(0) => continue,
                Ok(_) => {
                    let mut s = String::new();
                    let n = self.lines.read_line(&mut s).map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("the scenario closed its report pipe".into());
                    }
                    return Ok(s.trim_end().to_owned());
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Reaps every process until none is left (`ECHILD`), waiting at most `limit`; returns
    /// how long it took.
    pub fn reap_all(&mut self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            match waitpid(None::<NixPid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    if start.elapsed() > limit {
                        return Err(format!("processes still alive after {limit:?}"));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        self.reaped.push((pid, status));
                    }
                }
                Err(Errno::ECHILD) => return Ok(start.elapsed()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// A pipe end a scenario reports lines on (for its driver).
#[derive(Debug)]
pub struct Reporter {
    fd: OwnedFd,
}

impl Reporter {
    /// Writes one line.
    pub fn line(&self, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(b'\n');
        let mut off = 0;
        while off < bytes.len() {
            match nix::unistd::write(&self.fd, &bytes[off..]) {
                Ok(n) => off += n,
                Err(Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }
}

/// Runs scenarios and counts.
pub struct Harness {
    passed: usize,
    failed: usize,
    filter: Option<String>,
}

impl Harness {
    /// Makes this process a child subreaper and reads an optional name filter from the
    /// command line. `FORKBUS_LOG=debug` (or `trace`, `info`) prints the bus's tracing.
    pub fn new() -> Self {
        nix::sys::prctl::set_child_subreaper(true).expect("subreaper");
        if let Ok(level) = std::env::var("FORKBUS_LOG") {
            let level = level.parse().unwrap_or(tracing::Level::DEBUG);
            let _ = tracing_subscriber::fmt()
                .with_max_level(level)
                .with_writer(std::io::stderr)
                .try_init();
        }
        let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        Self {
            passed: 0,
            failed: 0,
            filter,
        }
    }

    /// Runs a scenario whose root must exit 0 and reap everything itself.
    pub fn run(
        &mut self,
        name: &str,
        deadline: Duration,
        scenario: impl FnOnce() -> Result<(), String>,
    ) {
        self.run_with(
            name,
            deadline,
            RootEnd::Success,
            Orphans::None,
            |_| scenario(),
            |_| Ok(()),
        );
    }

    /// Runs a scenario with a driver in the main process that reads its report lines.
    pub fn run_with(
        &mut self,
        name: &str,
        deadline: Duration,
        root_end: RootEnd,
        orphans: Orphans,
        scenario: impl FnOnce(&Reporter) -> Result<(), String>,
        driver: impl FnOnce(&mut Driver) -> Result<(), String>,
    ) {
        if self
            .filter
            .as_ref()
            .is_some_and(|f| !name.contains(f.as_str()))
        {
            return;
        }
        let started = Instant::now();
        let result = run_scenario(deadline, root_end, orphans, scenario, driver);
        let took = started.elapsed();
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("scenario {name} ... ok ({took:.2?})");
            }
            Err(e) => {
                self.failed += 1;
                println!("scenario {name} ... FAILED ({took:.2?}): {e}");
            }
        }
        let _ = std::io::stdout().flush();
    }

    /// Prints the count and exits.
    pub fn finish(self) -> ! {
        println!("{} passed, {} failed", self.passed, self.failed);
        let _ = std::io::stdout().flush();
        std::process::exit(i32::from(self.failed > 0))
    }
}

fn run_scenario(
    deadline: Duration,
    root_end: RootEnd,
    orphans: Orphans,
    scenario: impl FnOnce(&Reporter) -> Result<(), String>,
    driver: impl FnOnce(&mut Driver) -> Result<(), String>,
) -> Result<(), String> {
    let (rd, wr) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: the test's main process is single-threaded (a harness = false binary that
    // starts no thread); the child runs the scenario and leaves with `_exit`.
    match unsafe { nix::unistd::fork() }.map_err(|e| e.to_string())? {
        ForkResult::Child => {
            drop(rd);
            let _ = nix::unistd::setpgid(NixPid::from_raw(0), NixPid::from_raw(0));
            let reporter = Reporter { fd: wr };
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&reporter)));
            let code = match outcome {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => {
                    eprintln!("scenario failed in its root: {e}");
                    1
                }
                Err(_) => {
                    eprintln!("scenario panicked in its root");
                    2
                }
            };
            drop(reporter);
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            // SAFETY: ends the scenario's process without returning into the harness.
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child: root } => {
            drop(wr);
            let pgid = root;
            let hard = Instant::now() + deadline;
            let mut d = Driver {
                root,
                lines: BufReader::new(std::fs::File::from(rd)),
                deadline: hard,
                reaped: Vec::new(),
            };
            let driven = driver(&mut d);
            let mut errors = Vec::new();
            if let Err(e) = driven {
                errors.push(format!("driver: {e}"));
            }
            // Reap until nothing is left; past the deadline (or a grace after the root
            // ended), kill the whole group and every orphan.
            let mut root_status = d.reaped.iter().find(|(p, _)| *p == root).map(|(_, s)| *s);
            let mut grace: Option<Instant> = None;
            let mut killed = false;
            let mut others: Vec<(NixPid, WaitStatus)> = d
                .reaped
                .iter()
                .filter(|(p, _)| *p != root)
                .copied()
                .collect();
            loop {
                match waitpid(None::<NixPid>, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {
                        let now = Instant::now();
                        let limit = grace.map_or(hard, |g| g.min(hard));
                        if now >= limit && !killed {
                            if root_status.is_none() {
                                errors.push(format!("deadline of {deadline:?} passed"));
                            } else {
                                errors.push("processes left behind after the root ended".into());
                            }
                            let _ = killpg(pgid, Signal::SIGKILL);
                            kill_children_of_self();
                            killed = true;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Ok(status) => {
                        let Some(pid) = status.pid() else { continue };
                        if pid == root {
                            root_status = Some(status);
                            grace = Some(Instant::now() + Duration::from_secs(5));
                        } else {
                            others.push((pid, status));
                        }
                    }
                    Err(Errno::ECHILD) => break,
                    Err(Errno::EINTR) => {}
                    Err(e) => {
                        errors.push(format!("waitpid: {e}"));
                        break;
                    }
                }
            }
            match (root_end, root_status) {
                (RootEnd::Success, Some(WaitStatus::Exited(_, 0))) | (RootEnd::Any, Some(_)) => {}
                (_, status) => errors.push(format!("root ended with {status:?}")),
            }
            match orphans {
                Orphans::None if !others.is_empty() => {
                    errors.push(format!(
                        "the root left {} processes to the harness: {others:?}",
                        others.len()
                    ));
                }
                Orphans::ExitZero => {
                    let bad: Vec<_> = others
                        .iter()
                        .filter(|(_, s)| !matches!(s, WaitStatus::Exited(_, 0)))
                        .collect();
                    if !bad.is_empty() {
                        errors.push(format!("orphans did not exit 0: {bad:?}"));
                    }
                }
                _ => {}
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        }
    }
}

/// Kills every process whose parent is this one (orphans reparented here).
fn kill_children_of_self() {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let _state = fields.next();
        if fields.next() == Some(me.as_str()) {
            let _ = nix::sys::signal::kill(NixPid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers for code running inside scenarios.

/// Runs the bus until `done` holds (checked every few milliseconds and after the loop
/// wakes) or `limit` passes.
pub fn run_until(
    bus: &mut Bus,
    limit: Duration,
    mut done: impl FnMut(&mut Bus) -> bool + 'static,
) -> Result<(), String> {
    if done(bus) {
        return Ok(());
    }
    let ok = Rc::new(Cell::new(false));
    let expired = Rc::new(Cell::new(false));
    let deadline = Instant::now() + limit;
    let check: Check = Rc::new(RefCell::new(move |b: &mut Bus| done(b)));
    schedule_check(bus, check, ok.clone(), expired.clone(), deadline);
    loop {
        match bus.run().map_err(|e| e.to_string())? {
            Stop::Stopped => {}
            other => return Err(format!("the loop ended: {other:?}")),
        }
        if ok.get() {
            return Ok(());
        }
        if expired.get() {
            return Err(format!("condition not met within {limit:?}"));
        }
    }
}

/// A condition checked from a timer.
type Check = Rc<RefCell<dyn FnMut(&mut Bus) -> bool>>;

fn schedule_check(
    bus: &mut Bus,
    check: Check,
    ok: Rc<Cell<bool>>,
    expired: Rc<Cell<bool>>,
    deadline: Instant,
) {
    bus.add_timer(Duration::from_millis(3), move |b| {
        if (check.borrow_mut())(b) {
            ok.set(true);
            b.stop();
        } else if Instant::now() >= deadline {
            expired.set(true);
            b.stop();
        } else {
            schedule_check(b, check, ok, expired, deadline);
        }
    });
}

/// The state letter of a process (`R`, `S`, `T`, `Z`, ...), from `/proc/<pid>/stat`.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

/// This process's open descriptors.
pub fn open_fds() -> BTreeSet<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect::<Vec<RawFd>>()
        })
        .unwrap_or_default()
        .into_iter()
        // The directory's own descriptor, closed by now.
        .filter(|fd| forkbus::bus::describe_fd(*fd).is_some())
        .collect()
}

/// Resident set size of this process, in KiB.
pub fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// Fails with a message unless `cond` holds.
pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// The nix form of a pid.
pub fn nix_pid(p: Pid) -> NixPid {
    NixPid::from_raw(i32::try_from(p.as_raw()).unwrap_or(i32::MAX))
}

/// Shuts the tree down gracefully and checks it ended cleanly: every process reported.
pub fn shutdown(bus: Bus) -> Result<(), String> {
    shutdown_after_kills(bus, 0)
}

/// Shuts the tree down gracefully after the scenario killed `killed` processes on purpose:
/// exactly those are unreported in the tally, no child is left.
pub fn shutdown_after_kills(mut bus: Bus, killed: u64) -> Result<(), String> {
    bus.shutdown_tree();
    match bus.run().map_err(|e| e.to_string())? {
        Stop::Shutdown(t) => ensure(t.unreported == killed && bus.children().is_empty(), || {
            format!(
                "shutdown tally {t:?} ({killed} killed), children left {:?}",
                bus.children()
            )
        }),
        other => Err(format!("shutdown ended with {other:?}")),
    }
}

/// The newest modification time among an example's sources and the library's. An example
/// is `examples/<name>.rs` or, with modules of its own, the folder `examples/<name>/`.
fn newest_source(example: &str) -> SystemTime {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut visit = vec![
        root.join("examples").join(format!("{example}.rs")),
        root.join("examples").join(example),
        root.join("examples").join("common"),
        root.join("Cargo.toml"),
        root.join("Cargo.lock"),
        root.join("src"),
        root.join("runtime/src"),
        root.join("node/src"),
        root.join("router/src"),
    ];
    while let Some(p) = visit.pop() {
        if let Ok(dir) = std::fs::read_dir(&p) {
            visit.extend(dir.flatten().map(|e| e.path()));
        } else if let Ok(t) = std::fs::metadata(&p).and_then(|m| m.modified()) {
            newest = newest.max(t);
        }
    }
    newest
}

/// An example's binary, fresh: beside this test's directory (`cargo test` builds the
/// examples), or built with `$CARGO build --example` into `target/examples-test` when
/// missing or older than the sources (the running cargo holds the usual target's lock).
pub fn example_binary(example: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/deps/examples-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?;
    let beside = profile_dir.join("examples").join(example);
    let fresh = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= newest_source(example))
    };
    if fresh(&beside) {
        return Ok(beside);
    }
    let target = profile_dir
        .parent()
        .ok_or("cannot locate the target directory")?
        .join("examples-test");
    let built = target.join("debug").join("examples").join(example);
    if fresh(&built) {
        return Ok(built);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("building example {example} into {} ...", target.display());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--example", example, "--target-dir"])
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --example {example}: {status}"));
    }
    Ok(built)
}
