//! Runs every example as a real program, with small flags, and checks what it prints, its
//! exit code, and that it leaves no process behind. The last line is `N passed, M failed`.
//!
//! Where the binaries come from: `cargo test` builds the examples (into
//! `target/<profile>/examples/`) before it runs any test, so this binary finds them beside
//! its own directory (`target/<profile>/deps/`). When one is missing or older than its
//! sources (`cargo test --test examples` builds no example), it is built with
//! `$CARGO build --example <name>` into a target directory of its own
//! (`target/examples-test`), because the cargo running this test holds the lock of the
//! usual one; the first such build compiles the dependencies once.
//!
//! Each example runs in a process group of its own under a deadline (the group is killed on
//! expiry), with its output in files. This process is a child subreaper: every descendant
//! an example leaves behind is reparented here, so after the example exits, the group must
//! be empty and no orphan may turn up.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The workspace root (the facade crate's manifest directory).
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Per run.
const DEADLINE: Duration = Duration::from_secs(40);

struct Run {
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs an example in its own process group; fails on a deadline, a non-zero exit, or a
/// process left behind.
fn run(example: &str, args: &[&str], scratch: &Path) -> Result<Run, String> {
    let bin = common::example_binary(example)?;
    let out_path = scratch.join(format!("{example}.out"));
    let err_path = scratch.join(format!("{example}.err"));
    let file = |p: &Path| std::fs::File::create(p).map_err(|e| e.to_string());
    let started = Instant::now();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(&bin)
            .args(args)
            .current_dir(ROOT)
            .stdin(Stdio::null())
            .stdout(file(&out_path)?)
            .stderr(file(&err_path)?)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?
    };
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let mut problems = Vec::new();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > DEADLINE => {
                problems.push(format!("deadline of {DEADLINE:?} passed: group killed"));
                let _ = killpg(pgid, Signal::SIGKILL);
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                problems.push(format!("wait: {e}"));
                break None;
            }
        }
    };
    let took = started.elapsed();
    // The example is reaped; anything still in its group, or reparented here, was left
    // behind. Give stragglers a moment, then kill them.
    let grace = Instant::now() + Duration::from_secs(3);
    let mut orphans = Vec::new();
    loop {
        reap(&mut orphans);
        let group_empty = killpg(pgid, None) == Err(Errno::ESRCH);
        let live_children =
            waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) == Ok(WaitStatus::StillAlive);
        if group_empty && !live_children {
            break;
        }
        if Instant::now() > grace {
            problems.push("processes still alive after it ended: killed".into());
            let _ = killpg(pgid, Signal::SIGKILL);
            kill_children_of_self();
            std::thread::sleep(Duration::from_millis(100));
            reap(&mut orphans);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !orphans.is_empty() {
        problems.push(format!(
            "{} processes left behind: {orphans:?}",
            orphans.len()
        ));
    }
    match status {
        Some(s) if s.success() => {}
        other => problems.push(format!("exit status {other:?}")),
    }
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if problems.is_empty() {
        Ok(Run {
            stdout,
            stderr,
            took,
        })
    } else {
        Err(format!(
            "{}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            problems.join("; ")
        ))
    }
}

/// Reaps every exited child of this process (orphans reparented here).
fn reap(into: &mut Vec<Pid>) {
    while let Ok(s) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
        match s.pid() {
            Some(pid) => into.push(pid),
            None => break,
        }
    }
}

/// Kills every process whose parent is this one.
fn kill_children_of_self() {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1));
        if ppid == Some(me.as_str()) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn has(out: &str, needle: &str) -> Result<(), String> {
    if out.contains(needle) {
        Ok(())
    } else {
        Err(format!("no {needle:?} in the output"))
    }
}

/// The number right after `label` on the line that starts with `line`.
fn number_after(out: &str, line: &str, label: &str) -> Option<u64> {
    let l = out.lines().find(|l| l.starts_with(line))?;
    let rest = &l[l.find(label)? + label.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn model_workers_checks(out: &str, killed: bool) -> Result<(), String> {
    // The program's own balance check, and the pieces of its report.
    let balance = out
        .lines()
        .find(|l| l.starts_with("balance    sent 400 = replied "))
        .ok_or("no balance line")?;
    if !balance.ends_with("  ✓") {
        return Err(format!("{balance:?}: does not balance"));
    }
    let v2 = number_after(out, "replies ", ", v2").ok_or("no v2 count")?;
    if v2 == 0 {
        return Err("no reply carried model version 2".into());
    }
    has(out, "version as expected")?;
    has(out, "live workers switched, each exactly once")?;
    has(out, "── 4. routing traces")?;
    has(out, "request leaves")?;
    has(out, "├─ shard0")?;
    has(out, "shut down: ")?;
    let lost = number_after(out, "lost ", "lost").ok_or("no lost line")?;
    if killed {
        has(out, "SIGKILL")?;
        has(out, "supervisor reaped pid")?;
        has(out, "exactly one outcome per request")?;
        has(out, "lost at ")?;
        if lost == 0 {
            return Err("a worker was killed and nothing was lost".into());
        }
        // The supervisor restarted it under the same name, in a new process.
        has(out, "supervisor restarted it: ")?;
        has(out, "restart    ")?;
        let new = number_after(out, "           the name ", "now resolves to pid")
            .ok_or("no line on the name resolving to the new pid")?;
        has(out, &format!("now resolves to pid {new} at the root ✓"))?;
        has(out, &format!(" → {new} "))?; // the tree: old → new
        has(out, "lost with pid ")?;
        let line = format!("           replies from the new pid {new}: ");
        let served = number_after(out, &line, ":").ok_or("no replies from the new pid")?;
        if served == 0 {
            return Err("the restarted worker served no request".into());
        }
        has(
            out,
            &format!("{line}{served} of the {served} requests sent to it"),
        )?;
    } else {
        has(out, "no worker was killed")?;
        if lost != 0 {
            return Err(format!("{lost} lost without a kill"));
        }
        if out.contains("restart    ") {
            return Err("a restart without a kill".into());
        }
    }
    Ok(())
}

type Check = fn(&str) -> Result<(), String>;

fn main() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        println!("cannot become a child subreaper: {e}");
        println!("0 passed, 1 failed");
        std::process::exit(1);
    }
    let scratch = std::env::temp_dir().join(format!("forkbus-examples-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        println!("cannot create {}: {e}", scratch.display());
        std::process::exit(1);
    }
    let dot_dir = scratch.join("dot");
    let dot_arg = dot_dir.to_string_lossy().into_owned();
    let dot_file = dot_dir.join("forkbus-tree.dot");
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));

    let cases: Vec<(&str, Vec<&str>, Check)> = vec![
        (
            "model_workers",
            vec!["--requests", "400", "--trace-every", "100"],
            |out| model_workers_checks(out, true),
        ),
        (
            "model_workers",
            vec!["--requests", "400", "--hang-ms", "0", "--kill-at", "300"],
            |out| model_workers_checks(out, true),
        ),
        (
            "model_workers",
            vec!["--requests", "400", "--no-kill"],
            |out| model_workers_checks(out, false),
        ),
        ("broadcast_trace", vec![], |out| {
            has(out, "40 processes up")?;
            has(out, "1.1.1 → 3.3.3 by name: 6 hops")?;
            has(out, "root → 3.3.3 by pid: 3 hops")?;
            has(out, "Duplicates dropped in the whole tree: 2.")?;
            has(out, "shut down: 40 processes, 0 unreported.")
        }),
        (
            "broadcast_trace",
            vec!["--depth", "2", "--fanout", "2", "--no-cycle"],
            |out| {
                has(out, "7 processes up")?;
                has(out, "Duplicates dropped in the whole tree: 0.")?;
                has(out, "shut down: 7 processes, 0 unreported.")
            },
        ),
        ("tree_view", vec!["--out", &dot_arg], |out| {
            has(out, "13 processes;")?;
            has(out, "2400 of the 2400 burst envelopes")?;
            has(out, "└─ 3.3")?;
            has(out, "shut down: 13 processes, 0 unreported.")
        }),
        ("lightprocess", vec![], |out| {
            let test = out.matches("onMessageReceived \"test\" from").count();
            if test != 3 {
                return Err(format!(
                    "\"test\" received {test} times, wanted 3 (child, pid2, grandchild)"
                ));
            }
            has(out, "[pid2 ")?;
            has(out, "onMessageReceived \"for pid2 only\"")?;
            has(out, "(broadcast, 2 hop(s))")?;
            has(out, "the tree is down: 4 processes")
        }),
    ];

    let (mut passed, mut failed) = (0, 0);
    for (example, args, check) in cases {
        let label = format!("{example} {}", args.join(" "))
            .trim_end()
            .to_owned();
        if filter.as_ref().is_some_and(|f| !label.contains(f.as_str())) {
            continue;
        }
        let result = run(example, &args, &scratch).and_then(|r| {
            check(&r.stdout).map_err(|e| {
                format!(
                    "{e}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    r.stdout, r.stderr
                )
            })?;
            if example == "tree_view" {
                let dot = std::fs::read_to_string(&dot_file).unwrap_or_default();
                if !dot.starts_with("digraph forkbus {") {
                    return Err(format!("{} is not the DOT graph", dot_file.display()));
                }
            }
            Ok(r.took)
        });
        match result {
            Ok(took) => {
                passed += 1;
                println!("example {label} ... ok ({took:.2?})");
            }
            Err(e) => {
                failed += 1;
                println!("example {label} ... FAILED: {e}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("{passed} passed, {failed} failed");
    std::process::exit(i32::from(failed > 0));
}
