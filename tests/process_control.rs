//! Real-process tests of process control: the shared map and its robust lock, daemonize,
//! process identity and priority, dropping privileges.
//!
//! `harness = false`: forking from libtest's threads is unsafe, so `main` runs the scenarios
//! one after another on the only thread. Each scenario runs in a forked process of its own
//! group with a deadline (`alarm` in the scenario, whose default action kills it, and a
//! SIGKILL to its group from here after a grace period). This process is a child subreaper:
//! whatever a scenario leaves behind (daemons included) is re-parented here, killed and
//! reaped after each scenario, and a passing scenario that left a live process fails.
//! The last line is `N passed, M failed`; the exit status is non-zero on any failure.
//! Arguments that do not start with `-` select scenarios by substring.

use std::fmt::Display;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkbus::daemon::{self, DaemonConfig, DaemonError, DaemonStage, Daemonized};
use forkbus::identity::{
    self, ArgvSkip, ArgvTitle, IdentityError, PrivilegeDrop, SupplementaryGroups,
};
use forkbus::shm::{MapConfig, SharedMap, SharedRegion, ShmError};
use nix::errno::Errno;
use nix::libc;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

type Outcome = Result<(), String>;

struct Scenario {
    name: &'static str,
    run: fn() -> Outcome,
    deadline_secs: u32,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "shm_counters_from_four_children",
        run: shm_counters,
        deadline_secs: 60,
    },
    Scenario {
        name: "shm_lock_holder_killed_while_holding",
        run: shm_holder_killed,
        deadline_secs: 90,
    },
    Scenario {
        name: "shm_only_the_creator_removes",
        run: shm_only_creator_removes,
        deadline_secs: 30,
    },
    Scenario {
        name: "daemonize_detaches_and_keeps_its_pid_file",
        run: daemonize_scenario,
        deadline_secs: 60,
    },
    Scenario {
        name: "identity_title_nice_affinity",
        run: identity_scenario,
        deadline_secs: 30,
    },
    Scenario {
        name: "drop_privileges_or_die",
        run: privileges_scenario,
        deadline_secs: 30,
    },
];

fn main() {
    // The whole run's deadline: SIGALRM's default action ends this process if it hangs.
    let total: u32 = SCENARIOS.iter().map(|s| s.deadline_secs + 5).sum();
    nix::unistd::alarm::set(total + 30);
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        println!("cannot become a child subreaper ({e}); leftovers go to init");
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0_usize, 0_usize);
    for s in SCENARIOS {
        if !filters.is_empty() && !filters.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        if run_scenario(s) {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    let _ = std::io::stdout().flush();
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

fn run_scenario(s: &Scenario) -> bool {
    print!("scenario {} ... ", s.name);
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    // SAFETY: this process has one thread (harness = false, no thread is ever started here).
    let child = match unsafe { fork() } {
        Err(e) => {
            println!("FAILED (fork: {e})");
            return false;
        }
        Ok(ForkResult::Child) => {
            let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
            nix::unistd::alarm::set(s.deadline_secs);
            let code = match catch_unwind(s.run) {
                Ok(Ok(())) => 0,
                Ok(Err(msg)) => {
                    println!("\n    {msg}");
                    1
                }
                Err(_) => 101,
            };
            exit_now(code);
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    let _ = nix::unistd::setpgid(child, child);
    let hard = started + Duration::from_secs(u64::from(s.deadline_secs) + 3);
    let status = loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() > hard {
                    let _ = kill(Pid::from_raw(-child.as_raw()), Signal::SIGKILL);
                    let _ = kill(child, Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => break Some(status),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(_) => break None,
        }
    };
    // Anything of the scenario still in its group, then whatever was re-parented here.
    let _ = kill(Pid::from_raw(-child.as_raw()), Signal::SIGKILL);
    let leftovers = sweep();
    let elapsed = started.elapsed().as_millis();
    let ok = matches!(status, Some(WaitStatus::Exited(_, 0)));
    match (ok, leftovers.is_empty()) {
        (true, true) => {
            println!("ok ({elapsed} ms)");
            true
        }
        (true, false) => {
            println!("FAILED: left processes behind: {leftovers:?}");
            false
        }
        (false, _) => {
            let why = match status {
                Some(WaitStatus::Signaled(_, Signal::SIGALRM, _)) => "deadline exceeded".to_owned(),
                Some(WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig:?}"),
                Some(WaitStatus::Exited(_, 101)) => "panicked".to_owned(),
                other => format!("{other:?}"),
            };
            println!("FAILED ({why}, {elapsed} ms)");
            false
        }
    }
}

/// Kills and reaps every process re-parented to this one. Returns the ones that were still
/// running (zombies are just reaped: a process that exited cleanly is no leftover).
fn sweep() -> Vec<i32> {
    let me = nix::unistd::getpid().as_raw();
    let mut alive_found = Vec::new();
    for _ in 0..200 {
        let kids = children_of(me);
        for (pid, state) in &kids {
            if *state != 'Z' && !alive_found.contains(pid) {
                alive_found.push(*pid);
            }
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if kids.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    alive_found
}

/// (pid, state) of every process whose parent is `ppid`.
fn children_of(ppid: i32) -> Vec<(i32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let mut fields = after.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let parent = fields.next()?.parse::<i32>().ok()?;
            (parent == ppid).then_some((pid, state))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("line {}: {}", line!(), format!($($fmt)+)));
        }
    };
}

trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn exit_now(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: ends a forked process without running the parent's exit-time code twice.
    unsafe { libc::_exit(code) }
}

/// Forks a child that runs `f` and `_exit`s with its result (101 if it panics).
fn fork_child(f: impl FnOnce() -> i32) -> Result<Pid, String> {
    let _ = std::io::stdout().flush();
    // SAFETY: scenario processes are single-threaded.
    match unsafe { fork() }.ctx("fork")? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            let code = catch_unwind(AssertUnwindSafe(f)).unwrap_or(101);
            exit_now(code)
        }
    }
}

struct Pipe {
    rx: OwnedFd,
    tx: OwnedFd,
}

fn pipe() -> Result<Pipe, String> {
    let (rx, tx) = nix::unistd::pipe().ctx("pipe")?;
    Ok(Pipe { rx, tx })
}

fn send(fd: &OwnedFd, line: &str) {
    let mut bytes = line.as_bytes().to_vec();
    bytes.push(b'\n');
    let mut done = 0;
    while done < bytes.len() {
        match nix::unistd::write(fd.as_fd(), &bytes[done..]) {
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// One line from `fd`, waiting at most `timeout`. `Ok(None)` at end of file.
fn recv_line(fd: &OwnedFd, timeout: Duration) -> Result<Option<String>, String> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "timed out waiting for a line (got {:?})",
                String::from_utf8_lossy(&line)
            ));
        }
        let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let mut byte = [0_u8; 1];
        match nix::unistd::read(fd.as_fd(), &mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Ok(Some(String::from_utf8_lossy(&line).into_owned())),
            Ok(_) if byte[0] == b'\n' => {
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()))
            }
            Ok(_) => line.push(byte[0]),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

fn expect_line(fd: &OwnedFd, timeout: Duration) -> Result<String, String> {
    recv_line(fd, timeout)?.ok_or_else(|| "end of file where a line was expected".to_owned())
}

/// Waits for `pid` to end; kills it after `timeout`.
fn wait_exit(pid: Pid, timeout: Duration) -> Result<WaitStatus, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() > deadline {
                    let _ = kill(pid, Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                    return Err(format!("child {pid} did not exit in {timeout:?}; killed"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Ok(status),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("waitpid {pid}: {e}")),
        }
    }
}

fn expect_exit(pid: Pid, code: i32) -> Outcome {
    let status = wait_exit(pid, Duration::from_secs(20))?;
    ensure!(
        status == WaitStatus::Exited(pid, code),
        "child {pid}: expected exit {code}, got {status:?}"
    );
    Ok(())
}

fn proc_stat(pid: i32) -> Result<Vec<String>, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ctx("read stat")?;
    let close = stat.rfind(')').ok_or("no ) in stat")?;
    // Index 0 is field 3 (the state), so field n is at n - 3.
    Ok(stat[close + 1..]
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

fn stat_field(pid: i32, n: usize) -> Result<String, String> {
    proc_stat(pid)?
        .get(n - 3)
        .cloned()
        .ok_or_else(|| format!("no field {n}"))
}

fn status_line(pid: i32, key: &str) -> Result<String, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ctx("read status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .ok_or_else(|| format!("no {key} in /proc/{pid}/status"))
}

/// The command line a process shows (`/proc/<pid>/cmdline`), split at NULs, trailing empty
/// parts (the title's zero padding) dropped.
fn read_cmdline(pid: i32) -> Result<Vec<String>, String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ctx("read cmdline")?;
    let mut parts: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    while parts.last().is_some_and(String::is_empty) {
        parts.pop();
    }
    Ok(parts)
}

/// Kills a process that is not our child when dropped, unless disarmed.
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A small deterministic generator for kill timings (no dependency needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn scratch_dir(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("forkbus-pc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ctx("create scratch dir")?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------------
// Shared memory
// ---------------------------------------------------------------------------------------

fn shm_counters() -> Outcome {
    const N_CHILDREN: usize = 4;
    const N_INCREMENTS: u64 = 500;
    let map: SharedMap<String, u64> =
        SharedMap::new(MapConfig::new(16, 24, 9)).ctx("create map")?;
    map.insert("total", &0).ctx("insert total")?;
    let gate = pipe()?;
    let mut kids = Vec::new();
    for i in 0..N_CHILDREN {
        let (map, gate) = (&map, &gate);
        kids.push(fork_child(move || {
            // Start together, so the children really contend.
            if recv_line(&gate.rx, Duration::from_secs(10))
                .ok()
                .flatten()
                .is_none()
            {
                return 2;
            }
            let own = format!("child-{i}");
            for _ in 0..N_INCREMENTS {
                let Ok(mut g) = map.lock() else { return 3 };
                let (Ok(total), Ok(mine)) = (g.get("total"), g.get(own.as_str())) else {
                    return 4;
                };
                if g.insert("total", &(total.unwrap_or(0) + 1)).is_err()
                    || g.insert(own.as_str(), &(mine.unwrap_or(0) + 1)).is_err()
                {
                    return 5;
                }
            }
            // Reads of absent keys, in a child too, create nothing.
            for k in 0..50 {
                let key = format!("absent-{i}-{k}");
                if !matches!(map.get(key.as_str()), Ok(None))
                    || !matches!(map.contains_key(key.as_str()), Ok(false))
                {
                    return 6;
                }
            }
            0
        })?);
    }
    for _ in 0..N_CHILDREN {
        send(&gate.tx, "go");
    }
    for kid in kids {
        expect_exit(kid, 0)?;
    }
    let total = map.get("total").ctx("get total")?;
    ensure!(
        total == Some(N_CHILDREN as u64 * N_INCREMENTS),
        "total is {total:?}"
    );
    for i in 0..N_CHILDREN {
        let mine = map
            .get(format!("child-{i}").as_str())
            .ctx("get child count")?;
        ensure!(mine == Some(N_INCREMENTS), "child-{i} counted {mine:?}");
    }
    let len = map.len().ctx("len")?;
    ensure!(
        len == 1 + N_CHILDREN,
        "len {len} after the children (absent reads created entries?)"
    );

    // Reads never create entries, here either.
    ensure!(map.get("nope").ctx("get")?.is_none(), "absent key found");
    ensure!(
        !map.contains_key("nope").ctx("contains")?,
        "absent key contained"
    );
    ensure!(map.len().ctx("len")? == len, "a read created an entry");

    // Size limits are errors that change nothing.
    let long_key = "k".repeat(100);
    let r = map.insert(long_key.as_str(), &1);
    ensure!(
        matches!(r, Err(ShmError::KeyTooLarge { max: 24, .. })),
        "oversize key: {r:?}"
    );
    let r = map.get(long_key.as_str());
    ensure!(
        matches!(r, Err(ShmError::KeyTooLarge { .. })),
        "oversize key read: {r:?}"
    );
    let small: SharedMap<u32, String> =
        SharedMap::new(MapConfig::new(4, 8, 16)).ctx("small map")?;
    let r = small.insert(&1, &"x".repeat(40));
    ensure!(
        matches!(r, Err(ShmError::ValueTooLarge { len: 42, max: 16 })),
        "oversize value: {r:?}"
    );
    ensure!(small.len().ctx("len")? == 0, "oversize value stored");

    // Fill to capacity: a new key is refused, an old one can still change.
    for j in len..map.capacity() {
        map.insert(format!("fill-{j}").as_str(), &(j as u64))
            .ctx("fill")?;
    }
    let before = map.entries().ctx("entries")?;
    ensure!(before.len() == 16, "full map has {} entries", before.len());
    let r = map.insert("one-more", &1);
    ensure!(
        matches!(r, Err(ShmError::MapFull { capacity: 16 })),
        "insert into a full map: {r:?}"
    );
    let after = map.entries().ctx("entries")?;
    ensure!(after == before, "a refused insert changed the map");
    ensure!(
        map.insert("total", &7).ctx("replace in a full map")? == Some(2000),
        "replace"
    );
    ensure!(map.remove("fill-9").ctx("remove")? == Some(9), "remove");
    ensure!(
        map.insert("one-more", &1)
            .ctx("insert after remove")?
            .is_none(),
        "insert after remove"
    );
    ensure!(map.len().ctx("len")? == 16, "len after remove and insert");
    Ok(())
}

fn shm_holder_killed() -> Outcome {
    region_holder_killed()?;
    map_holder_killed_between_operations()?;
    map_holder_killed_mid_operation()
}

fn region_holder_killed() -> Outcome {
    let region = SharedRegion::new(64).ctx("region")?;
    let held = pipe()?;
    let holder = fork_child(|| {
        let Ok(mut g) = region.lock() else { return 2 };
        g.data_mut()[..4].copy_from_slice(&[0xAB; 4]);
        send(&held.tx, "held");
        std::thread::sleep(Duration::from_secs(30));
        0
    })?;
    ensure!(
        expect_line(&held.rx, Duration::from_secs(10))? == "held",
        "holder did not report"
    );
    ensure!(
        matches!(region.try_lock(), Ok(None)),
        "try_lock succeeded while another process holds the lock"
    );
    kill(holder, Signal::SIGKILL).ctx("kill holder")?;
    let status = wait_exit(holder, Duration::from_secs(10))?;
    ensure!(
        matches!(status, WaitStatus::Signaled(_, Signal::SIGKILL, _)),
        "holder: {status:?}"
    );

    let g = region.lock().ctx("lock after the holder died")?;
    ensure!(g.recovered(), "the lock did not say its holder died");
    ensure!(
        g.data()[..4] == [0xAB; 4],
        "the dead holder's writes are not visible"
    );
    drop(g);
    let g = region.lock().ctx("lock again")?;
    ensure!(!g.recovered(), "recovered reported twice");
    drop(g);
    ensure!(
        region.recoveries().ctx("recoveries")? == 1,
        "recoveries not counted"
    );

    // Usable by others afterwards.
    let other = fork_child(|| match region.lock() {
        Ok(mut g) if !g.recovered() => {
            g.data_mut()[4] = 1;
            0
        }
        Ok(_) => 3,
        Err(_) => 2,
    })?;
    expect_exit(other, 0)?;
    ensure!(
        region.lock().ctx("lock")?.data()[4] == 1,
        "another process's write is missing"
    );
    Ok(())
}

fn map_holder_killed_between_operations() -> Outcome {
    let map: SharedMap<String, String> = SharedMap::new(MapConfig::new(8, 16, 32)).ctx("map")?;
    map.insert("stable", &"v0".to_owned()).ctx("insert")?;
    let held = pipe()?;
    let holder = fork_child(|| {
        let Ok(mut g) = map.lock() else { return 2 };
        if g.insert("a", &"done before death".to_owned()).is_err() {
            return 3;
        }
        send(&held.tx, "held");
        std::thread::sleep(Duration::from_secs(30));
        0
    })?;
    ensure!(
        expect_line(&held.rx, Duration::from_secs(10))? == "held",
        "holder did not report"
    );
    kill(holder, Signal::SIGKILL).ctx("kill")?;
    wait_exit(holder, Duration::from_secs(10))?;
    let g = map.lock().ctx("lock after death")?;
    ensure!(g.recovered(), "not told that the holder died");
    ensure!(
        !g.rolled_back(),
        "nothing was in progress, yet something was rolled back"
    );
    // Documented: operations completed before the death stay done.
    ensure!(
        g.get("a").ctx("get a")?.as_deref() == Some("done before death"),
        "completed insert lost"
    );
    ensure!(
        g.get("stable").ctx("get stable")?.as_deref() == Some("v0"),
        "other entry damaged"
    );
    ensure!(g.len() == 2, "len {}", g.len());
    Ok(())
}

/// A holder hammers the map with large inserts and removes under one guard and is killed at
/// a random moment, many times: whatever it was doing, the map afterwards is consistent (each
/// value whole, the count right), and an operation cut in half is rolled back.
fn map_holder_killed_mid_operation() -> Outcome {
    const ROUNDS: u64 = 40;
    const KEYS: u32 = 40;
    let map: SharedMap<u32, String> = SharedMap::new(MapConfig::new(64, 8, 70_016)).ctx("map")?;
    // Values built once, so the holder spends its time in the map, not in building them:
    // "<len>:<c>:" then <len> times <c>.
    let values: Vec<String> = (0..13_u8)
        .map(|v| {
            let len = 10_000 + usize::from(v) * 4_999;
            let c = char::from(b'a' + v);
            format!("{len}:{c}:{}", c.to_string().repeat(len))
        })
        .collect();
    let mut rng = Lcg(u64::from(std::process::id()) ^ 0x5eed);
    let mut rolled_back = 0;
    for round in 0..ROUNDS {
        let go = pipe()?;
        let holder = fork_child(|| {
            let Ok(mut g) = map.lock() else { return 2 };
            let mut rng = Lcg(round * 7919 + 1);
            for j in 0_u64.. {
                let key = (rng.next() % u64::from(KEYS)) as u32;
                if j % 4 == 3 {
                    if g.remove(&key).is_err() {
                        return 3;
                    }
                } else {
                    let value = &values[(rng.next() % values.len() as u64) as usize];
                    if g.insert(&key, value).is_err() {
                        return 4;
                    }
                }
                if j == 0 {
                    send(&go.tx, "go");
                }
            }
            0
        })?;
        ensure!(
            expect_line(&go.rx, Duration::from_secs(10))? == "go",
            "holder did not start"
        );
        std::thread::sleep(Duration::from_micros(rng.next() % 3_000));
        kill(holder, Signal::SIGKILL).ctx("kill")?;
        let status = wait_exit(holder, Duration::from_secs(10))?;
        ensure!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGKILL, _)),
            "holder ended early: {status:?}"
        );

        let mut g = map.lock().ctx("lock after death")?;
        ensure!(
            g.recovered(),
            "round {round}: not told that the holder died"
        );
        if g.rolled_back() {
            rolled_back += 1;
        }
        let mut n = 0;
        for entry in g.iter() {
            let (key, value) = entry.ctx("decode after death")?;
            ensure!(key < KEYS, "round {round}: key {key} was never written");
            let mut parts = value.splitn(3, ':');
            let (Some(len), Some(c), Some(body)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("round {round}: malformed value for {key}"));
            };
            let len: usize = len.parse().ctx("value length")?;
            ensure!(
                body.len() == len && body.bytes().all(|b| c.as_bytes() == [b]),
                "round {round}: torn value"
            );
            n += 1;
        }
        ensure!(
            n == g.len(),
            "round {round}: {n} entries but len {}",
            g.len()
        );
        // The lock and the map work on.
        g.insert(&0, &"1:z:z".to_owned())
            .ctx("insert after recovery")?;
    }
    ensure!(
        map.rollbacks().ctx("rollbacks")? == rolled_back,
        "rollback count"
    );
    println!(
        "\n    {rolled_back} of {ROUNDS} killed holders were cut mid-operation and rolled back"
    );
    Ok(())
}

fn shm_only_creator_removes() -> Outcome {
    let mut map: SharedMap<String, u64> = SharedMap::new(MapConfig::new(4, 16, 9)).ctx("map")?;
    map.insert("k", &1).ctx("insert")?;
    let me = nix::unistd::getpid().as_raw();
    let (to_child, from_child) = (pipe()?, pipe()?);
    let child = fork_child(|| {
        let report = |s: &str| send(&from_child.tx, s);
        let r = map.destroy();
        if !matches!(r, Err(ShmError::NotCreator { creator_pid }) if creator_pid == me) {
            report(&format!("child destroy: {r:?}"));
            return 2;
        }
        if map.is_creator() || !matches!(map.get("k"), Ok(Some(1))) {
            report("child cannot use the map after a refused destroy");
            return 3;
        }
        report("refused");
        if recv_line(&to_child.rx, Duration::from_secs(10))
            .ok()
            .flatten()
            .as_deref()
            != Some("destroyed")
        {
            return 4;
        }
        let all_removed = matches!(map.get("k"), Err(ShmError::Removed))
            && matches!(map.insert("k", &2), Err(ShmError::Removed))
            && matches!(map.remove("k"), Err(ShmError::Removed))
            && matches!(map.len(), Err(ShmError::Removed))
            && matches!(map.entries(), Err(ShmError::Removed))
            && matches!(map.lock(), Err(ShmError::Removed))
            && map.region().is_removed();
        report(if all_removed {
            "all removed"
        } else {
            "an operation worked after removal"
        });
        0
    })?;
    let line = expect_line(&from_child.rx, Duration::from_secs(10))?;
    ensure!(line == "refused", "child: {line}");
    ensure!(
        map.get("k").ctx("get after the refused destroy")? == Some(1),
        "map damaged by a refused destroy"
    );
    map.destroy().ctx("creator destroy")?;
    ensure!(
        matches!(map.get("k"), Err(ShmError::Removed)),
        "creator used the map after destroying it"
    );
    ensure!(
        matches!(map.destroy(), Err(ShmError::Removed)),
        "second destroy"
    );
    send(&to_child.tx, "destroyed");
    let line = expect_line(&from_child.rx, Duration::from_secs(10))?;
    ensure!(line == "all removed", "child: {line}");
    expect_exit(child, 0)
}

// ---------------------------------------------------------------------------------------
// Daemonize
// ---------------------------------------------------------------------------------------

fn daemonize_scenario() -> Outcome {
    let dir = scratch_dir("daemon")?;
    let result = daemonize_checks(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn daemonize_checks(dir: &Path) -> Outcome {
    let pid_path = dir.join("d.pid");
    let log_path = dir.join("d.log");
    let me = nix::unistd::getpid().as_raw();
    let my_sid = nix::unistd::getsid(None).ctx("getsid")?.as_raw();
    let subreaper = nix::unistd::getppid().as_raw();

    // A stale pid file (a pid that just died) is taken over.
    let dead = fork_child(|| 0)?;
    expect_exit(dead, 0)?;
    std::fs::write(&pid_path, format!("{dead}\n")).ctx("write stale pid file")?;

    let (orig, dmn, cmd) = (pipe()?, pipe()?, pipe()?);
    let config = DaemonConfig::new()
        .umask(0o027)
        .log_file(&log_path)
        .pid_file(&pid_path);
    let original = fork_child(|| match daemon::daemonize(config.clone()) {
        Ok(Daemonized::Original { daemon_pid }) => {
            send(&orig.tx, &format!("original {daemon_pid}"));
            0
        }
        Err(e) => {
            send(&orig.tx, &format!("error {e}"));
            1
        }
        Ok(Daemonized::Daemon(guard)) => {
            println!("hello from the daemon");
            let _ = std::io::stdout().flush();
            let pid = nix::unistd::getpid().as_raw();
            let sid = nix::unistd::getsid(None).map_or(-1, Pid::as_raw);
            let pgid = nix::unistd::getpgrp().as_raw();
            send(&dmn.tx, &format!("daemon {pid} {sid} {pgid}"));
            // Never outlive the test: leave after the command or a timeout.
            let command = recv_line(&cmd.rx, Duration::from_secs(40)).ok().flatten();
            drop(guard);
            if command.as_deref() == Some("exit") {
                send(&dmn.tx, "bye");
                0
            } else {
                2
            }
        }
    })?;
    expect_exit(original, 0)?;
    let line = expect_line(&orig.rx, Duration::from_secs(10))?;
    let daemon_pid: i32 = line
        .strip_prefix("original ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("original reported {line:?}"))?;
    let mut guard = KillOnDrop(Some(daemon_pid));
    let line = expect_line(&dmn.rx, Duration::from_secs(10))?;
    let f: Vec<i32> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(
        line.starts_with("daemon ") && f.len() == 3,
        "daemon reported {line:?}"
    );
    let (pid, sid, pgid) = (f[0], f[1], f[2]);
    ensure!(
        pid == daemon_pid,
        "the original was told {daemon_pid}, the daemon is {pid}"
    );
    // A new session whose leader (the intermediate) is gone; the daemon is not a leader.
    ensure!(sid != my_sid, "the daemon stayed in the test's session");
    ensure!(
        sid == pgid && sid != pid,
        "sid {sid} pgid {pgid} pid {pid}: not a fresh session of the intermediate"
    );
    ensure!(
        sid != original.as_raw() && pid != original.as_raw(),
        "no double fork"
    );
    ensure!(
        !Path::new(&format!("/proc/{sid}")).exists()
            || stat_field(sid, 3).map(|s| s == "Z").unwrap_or(true),
        "the intermediate {sid} is still running"
    );
    // Re-parented: its parent is the subreaper running these tests, not the intermediate.
    let ppid: i32 = stat_field(pid, 4)?.parse().ctx("ppid")?;
    ensure!(
        ppid == subreaper && ppid != sid && ppid != me,
        "daemon's parent is {ppid}"
    );
    ensure!(
        stat_field(pid, 7)? == "0",
        "the daemon has a controlling terminal"
    );
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ctx("cwd")?;
    ensure!(cwd == Path::new("/"), "daemon cwd {cwd:?}");
    ensure!(
        status_line(pid, "Umask:")? == "0027",
        "umask {}",
        status_line(pid, "Umask:")?
    );
    let stdin = std::fs::read_link(format!("/proc/{pid}/fd/0")).ctx("fd 0")?;
    let stdout = std::fs::read_link(format!("/proc/{pid}/fd/1")).ctx("fd 1")?;
    let stderr = std::fs::read_link(format!("/proc/{pid}/fd/2")).ctx("fd 2")?;
    ensure!(stdin == Path::new("/dev/null"), "stdin {stdin:?}");
    ensure!(
        stdout == log_path && stderr == log_path,
        "stdout {stdout:?}, stderr {stderr:?}"
    );
    let log = std::fs::read_to_string(&log_path).ctx("log")?;
    ensure!(log.contains("hello from the daemon"), "log holds {log:?}");
    let held = std::fs::read_to_string(&pid_path).ctx("pid file")?;
    ensure!(held.trim() == pid.to_string(), "pid file holds {held:?}");

    // A second daemon with the same pid file is refused, and the original hears why.
    let second = fork_child(|| match daemon::daemonize(config.clone()) {
        Err(DaemonError::PidFileHeld { pid: holder, path }) => {
            send(&orig.tx, &format!("held {holder} {}", path.display()));
            0
        }
        Err(e) => {
            send(&orig.tx, &format!("error {e}"));
            1
        }
        Ok(Daemonized::Original { daemon_pid }) => {
            send(&orig.tx, &format!("started {daemon_pid}"));
            1
        }
        Ok(Daemonized::Daemon(_)) => exit_now(3),
    })?;
    let line = expect_line(&orig.rx, Duration::from_secs(10))?;
    expect_exit(second, 0)?;
    ensure!(
        line == format!("held {pid} {}", pid_path.display()),
        "second daemonize: {line}"
    );
    let held = std::fs::read_to_string(&pid_path).ctx("pid file")?;
    ensure!(
        held.trim() == pid.to_string(),
        "the refused start touched the pid file: {held:?}"
    );

    // A failure inside the daemon reaches the original as an error, not as a success.
    let failing = fork_child(|| {
        let config = DaemonConfig::new().chdir("/nonexistent-forkbus-dir");
        match daemon::daemonize(config) {
            Err(DaemonError::Os {
                stage: DaemonStage::Chdir,
                source,
            }) if source.raw_os_error() == Some(libc::ENOENT) => {
                send(&orig.tx, "chdir refused");
                0
            }
            Err(e) => {
                send(&orig.tx, &format!("error {e}"));
                1
            }
            Ok(Daemonized::Original { .. }) => 1,
            Ok(Daemonized::Daemon(_)) => exit_now(3),
        }
    })?;
    let line = expect_line(&orig.rx, Duration::from_secs(10))?;
    expect_exit(failing, 0)?;
    ensure!(line == "chdir refused", "failing daemonize: {line}");

    // A threaded process is refused before anything forks.
    let threaded = fork_child(|| {
        let _t = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(30)));
        match daemon::daemonize(DaemonConfig::new()) {
            Err(DaemonError::MultiThreaded { n_threads }) if n_threads >= 2 => exit_now(0),
            _ => exit_now(1),
        }
    })?;
    expect_exit(threaded, 0)?;

    // A clean exit removes the pid file.
    send(&cmd.tx, "exit");
    let line = expect_line(&dmn.rx, Duration::from_secs(10))?;
    ensure!(line == "bye", "daemon said {line:?}");
    ensure!(!pid_path.exists(), "pid file left after a clean exit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stat_field(pid, 3).is_ok_and(|s| s != "Z") {
        ensure!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    guard.0 = None;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Identity and priority
// ---------------------------------------------------------------------------------------

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff), which moving the
/// argument area (PR_SET_MM_ARG_START/END) needs. Root does not always have it.
fn can_relocate_title() -> bool {
    status_line(nix::unistd::getpid().as_raw(), "CapEff:")
        .ok()
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn identity_scenario() -> Outcome {
    let relocatable = can_relocate_title();
    if !relocatable {
        println!("\n    note: no CAP_SYS_RESOURCE here: long titles are cut, not relocated");
    }
    let (report, done) = (pipe()?, pipe()?);
    const TITLE: &str = "forkbus-test-title";
    let child = fork_child(|| {
        let say = |s: &str| send(&report.tx, s);
        match identity::set_process_title(TITLE) {
            Ok(out) => say(&format!("title {:?} {}", out.argv, out.comm_len)),
            Err(e) => say(&format!("title error {e}")),
        }
        let nice_ok = identity::set_nice(5).is_ok() && matches!(identity::nice(), Ok(5));
        let nice_refused = matches!(
            identity::set_nice(42),
            Err(IdentityError::NiceOutOfRange(42))
        ) && matches!(
            identity::set_nice(-21),
            Err(IdentityError::NiceOutOfRange(-21))
        ) && matches!(identity::nice(), Ok(5));
        let pinned =
            identity::pin_to_cpus(&[0]).is_ok() && identity::cpu_affinity().ok() == Some(vec![0]);
        let empty_refused = matches!(identity::pin_to_cpus(&[]), Err(IdentityError::EmptyCpuSet));
        let n = identity::cpu_count();
        let out_of_range = matches!(identity::pin_to_cpus(&[n]), Err(IdentityError::CpuOutOfRange { cpu, .. }) if cpu == n);
        say(&format!(
            "nice {nice_ok} {nice_refused} cpus {pinned} {empty_refused} {out_of_range}"
        ));
        let _ = recv_line(&done.rx, Duration::from_secs(20));
        0
    })?;
    let title_line = expect_line(&report.rx, Duration::from_secs(10))?;
    ensure!(title_line == "title InPlace 15", "title: {title_line}");
    let line = expect_line(&report.rx, Duration::from_secs(10))?;
    ensure!(
        line == "nice true true cpus true true true",
        "priority/affinity in the child: {line}"
    );
    let pid = child.as_raw();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ctx("comm")?;
    ensure!(comm.trim_end() == "forkbus-test-ti", "comm {comm:?}");
    let cmdline = read_cmdline(pid).ctx("cmdline")?;
    ensure!(cmdline == [TITLE], "cmdline {cmdline:?}");
    if let Ok(out) = std::process::Command::new("ps")
        .args(["-o", "args=", "-p", &pid.to_string()])
        .output()
    {
        let shown = String::from_utf8_lossy(&out.stdout);
        ensure!(shown.trim() == TITLE, "ps shows {shown:?}");
    }
    ensure!(
        stat_field(pid, 19)? == "5",
        "nice in /proc: {}",
        stat_field(pid, 19)?
    );
    ensure!(
        status_line(pid, "Cpus_allowed_list:")? == "0",
        "affinity in /proc"
    );
    send(&done.tx, "done");
    expect_exit(child, 0)?;

    // A title longer than the argument area: moved to a page of its own when permitted
    // (root here), cut to the area otherwise.
    let long_title = format!("forkbus-long-title-{}", "x".repeat(300));
    let (report, done) = (pipe()?, pipe()?);
    let child = fork_child(|| {
        let out = identity::set_process_title(&long_title);
        send(&report.tx, &format!("{:?}", out.map(|o| o.argv)));
        let _ = recv_line(&done.rx, Duration::from_secs(20));
        0
    })?;
    let line = expect_line(&report.rx, Duration::from_secs(10))?;
    let cmdline = read_cmdline(child.as_raw()).ctx("cmdline")?;
    send(&done.tx, "done");
    expect_exit(child, 0)?;
    if relocatable {
        ensure!(
            line == format!("Ok(Relocated {{ kept: {} }})", long_title.len()),
            "long title: {line}"
        );
        ensure!(
            cmdline == [long_title.as_str()],
            "long title cmdline {cmdline:?}"
        );
    } else {
        ensure!(line.starts_with("Ok(Truncated"), "long title: {line}");
        ensure!(
            cmdline.len() == 1 && long_title.starts_with(cmdline[0].as_str()),
            "cmdline {cmdline:?}"
        );
    }

    // With several threads the argument area is not written in place.
    let (report, done) = (pipe()?, pipe()?);
    let child = fork_child(|| {
        let _t = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(30)));
        let out = identity::set_process_title("forkbus-mt-title");
        send(&report.tx, &format!("{:?}", out.map(|o| o.argv)));
        let _ = recv_line(&done.rx, Duration::from_secs(20));
        exit_now(0)
    })?;
    let line = expect_line(&report.rx, Duration::from_secs(10))?;
    let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).ctx("comm")?;
    let cmdline = read_cmdline(child.as_raw()).ctx("cmdline")?;
    send(&done.tx, "done");
    expect_exit(child, 0)?;
    ensure!(
        comm.trim_end() == "forkbus-mt-titl",
        "threaded comm {comm:?}"
    );
    if relocatable {
        ensure!(
            line == "Ok(Relocated { kept: 16 })",
            "threaded title: {line}"
        );
        ensure!(
            cmdline == ["forkbus-mt-title"],
            "threaded cmdline {cmdline:?}"
        );
    } else {
        ensure!(
            line == format!("Ok({:?})", ArgvTitle::Unchanged(ArgvSkip::MultiThreaded)),
            "threaded: {line}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Dropping privileges
// ---------------------------------------------------------------------------------------

fn privileges_scenario() -> Outcome {
    if !nix::unistd::Uid::effective().is_root() {
        println!("\n    note: not running as root; drop_privileges checks skipped");
        return Ok(());
    }
    let (Ok(Some(nobody)), Ok(Some(nogroup))) = (
        nix::unistd::User::from_name("nobody"),
        nix::unistd::Group::from_name("nogroup"),
    ) else {
        println!("\n    note: no nobody/nogroup on this system; drop_privileges checks skipped");
        return Ok(());
    };
    let (uid, gid) = (nobody.uid.as_raw(), nogroup.gid.as_raw());

    // By name: uid, gid, groups are nobody's and root cannot be regained; a later attempt to
    // become root again is an error and the child leaves.
    let (report, next) = (pipe()?, pipe()?);
    let child = fork_child(|| {
        let say = |s: &str| send(&report.tx, s);
        if let Err(e) = identity::drop_privileges("nobody", "nogroup") {
            say(&format!("error {e}"));
            exit_now(70);
        }
        let r = nix::unistd::getresuid();
        let g = nix::unistd::getresgid();
        let groups =
            nix::unistd::getgroups().map(|v| v.into_iter().map(|g| g.as_raw()).collect::<Vec<_>>());
        let root_back = nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok();
        say(&format!("now {r:?} {g:?} {groups:?} root_back={root_back}"));
        let _ = recv_line(&next.rx, Duration::from_secs(10));
        if let Err(e) = identity::drop_privileges("root", "root") {
            say(&format!("second error {e}"));
            exit_now(71);
        }
        say("became root again");
        0
    })?;
    let line = expect_line(&report.rx, Duration::from_secs(10))?;
    let u = nix::unistd::Uid::from_raw(uid);
    let g = nix::unistd::Gid::from_raw(gid);
    let expected = format!(
        "now {:?} {:?} Ok([{gid}]) root_back=false",
        Ok::<_, Errno>(nix::unistd::ResUid {
            real: u,
            effective: u,
            saved: u
        }),
        Ok::<_, Errno>(nix::unistd::ResGid {
            real: g,
            effective: g,
            saved: g
        }),
    );
    ensure!(
        line == expected,
        "after the drop: {line}\n    expected: {expected}"
    );
    drop(report.tx);
    let pid = child.as_raw();
    ensure!(
        status_line(pid, "Uid:")?
            .split_whitespace()
            .all(|x| x == uid.to_string()),
        "Uid in /proc"
    );
    ensure!(
        status_line(pid, "Gid:")?
            .split_whitespace()
            .all(|x| x == gid.to_string()),
        "Gid in /proc"
    );
    ensure!(
        status_line(pid, "Groups:")? == gid.to_string(),
        "Groups in /proc"
    );
    send(&next.tx, "next");
    let line = expect_line(&report.rx, Duration::from_secs(10))?;
    ensure!(
        line.starts_with("second error ") && line.contains("setgroups failed"),
        "regaining root: {line}"
    );
    ensure!(
        recv_line(&report.rx, Duration::from_secs(10))?.is_none(),
        "the child went on after an error"
    );
    expect_exit(child, 71)?;

    // A user that does not exist: an error, and the child never reaches its next step.
    let report = pipe()?;
    let child = fork_child(|| {
        if let Err(e) =
            identity::drop_privileges("forkbus-no-such-user", identity::GroupSpec::OfUser)
        {
            send(&report.tx, &format!("error {e}"));
            exit_now(70);
        }
        let me = nix::unistd::getuid();
        send(&report.tx, &format!("next step as uid {me}"));
        0
    })?;
    let line = expect_line(&report.rx, Duration::from_secs(10))?;
    ensure!(
        line == "error no such user: forkbus-no-such-user",
        "nonexistent user: {line}"
    );
    drop(report.tx);
    ensure!(
        recv_line(&report.rx, Duration::from_secs(10))?.is_none(),
        "the child went on after a failed drop"
    );
    expect_exit(child, 70)?;

    // By number, and by number with no user database entry and explicit (no) groups.
    let report = pipe()?;
    let child = fork_child(|| {
        let by_id =
            identity::drop_privileges(uid, gid).is_ok() && nix::unistd::getuid().as_raw() == uid;
        send(&report.tx, &format!("{by_id}"));
        i32::from(!by_id)
    })?;
    ensure!(
        expect_line(&report.rx, Duration::from_secs(10))? == "true",
        "drop by id"
    );
    expect_exit(child, 0)?;
    let child = fork_child(|| {
        let creds = PrivilegeDrop::new(54_321_u32)
            .group(54_321_u32)
            .supplementary(SupplementaryGroups::Only(vec![]));
        let ok = creds.resolve().and_then(|c| c.apply()).is_ok()
            && nix::unistd::getgroups().is_ok_and(|g| g.is_empty())
            && nix::unistd::getegid().as_raw() == 54_321;
        send(&report.tx, &format!("{ok}"));
        i32::from(!ok)
    })?;
    ensure!(
        expect_line(&report.rx, Duration::from_secs(10))? == "true",
        "drop to an id without an entry"
    );
    expect_exit(child, 0)
}
