//! Real-process tests of exec: external programs run from the loop (output whole past the
//! pipe buffer, exit codes and signals, failed privilege drops that never run the program,
//! cancel and its escalation, a stopped child, timeouts, input, the output bound, pipes held
//! open, descriptors, environment, shutdown) and programs that join the tree as nodes
//! (unicast by pid and name, broadcast, exit, loss report, control frames they may not
//! send).
//!
//! `harness = false`: every scenario runs in a forked process of its own under a deadline
//! (`tests/common/mod.rs`); the programs are real (`/bin/sh`, `cat`, `sleep`, and the
//! `forkbus-external-node` binary, built from `examples/external_node.rs`).

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use common::{ensure, nix_pid, proc_state, run_until, Harness, Orphans, RootEnd};
use forkbus::error::BusError;
use forkbus::exec::{
    Command, ExecError, ExecId, ExecOutput, Intervention, InvalidCommand, Output, SpawnStage,
    Stream,
};
use forkbus::identity::{Credentials, IdentityError, PrivilegeDrop};
use forkbus::supervisor::SupervisionEvent;
use forkbus::{
    to, Bus, BusConfig, ExitStatus, ForkOptions, Listener, LossReport, Message, MessageId, NodeId,
    PeerShutdown, Pid, Relation, ServiceEvent, Stop,
};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};

/// How long any one wait inside a scenario may take (generous: a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(30);
/// The deadline of a scenario.
const DEADLINE: Duration = Duration::from_secs(90);

const NODE_EXE: &str = env!("CARGO_BIN_EXE_forkbus-external-node");

fn main() {
    let mut h = Harness::new();
    h.run(
        "exec_output_larger_than_the_pipe_buffer_arrives_whole",
        DEADLINE,
        large_output,
    );
    h.run(
        "exec_exit_codes_signals_and_spawn_errors",
        DEADLINE,
        exit_codes,
    );
    h.run(
        "exec_failed_user_drop_never_runs_the_program",
        DEADLINE,
        failed_drop,
    );
    h.run_with(
        "exec_cancel_escalates_to_sigkill",
        DEADLINE,
        RootEnd::Success,
        // The shell's `sleep`, killed with its process group, is reparented to the harness's
        // subreaper when the shell dies first, and reaped there (dead, not left behind: the
        // harness fails a scenario whose processes outlive it).
        Orphans::Any,
        |_| cancel_escalates(),
        |_| Ok(()),
    );
    h.run("exec_stopped_child_is_not_exited", DEADLINE, stopped_child);
    h.run("exec_timeout", DEADLINE, timeout);
    h.run("exec_stdin_bytes_reach_the_program", DEADLINE, stdin_bytes);
    h.run("exec_output_bound_kills_and_flags", DEADLINE, output_bound);
    h.run_with(
        "exec_pipes_held_open_by_a_descendant",
        DEADLINE,
        RootEnd::Success,
        // The descendant (`sleep`) is reparented to the harness's subreaper and reaped there.
        Orphans::Any,
        |_| pipes_held_open(),
        |_| Ok(()),
    );
    h.run(
        "exec_descriptors_environment_directory_signals",
        DEADLINE,
        hygiene,
    );
    h.run(
        "exec_shutdown_cancels_running_programs",
        DEADLINE,
        shutdown_cancels,
    );
    h.run("exec_from_a_forked_child", DEADLINE, exec_in_child);
    h.run("node_unicast_broadcast_and_exit", DEADLINE, node_messages);
    h.run(
        "node_killed_with_queued_envelopes_reports_them_lost",
        DEADLINE,
        node_loss,
    );
    h.run("node_follows_a_tree_shutdown", DEADLINE, node_shutdown);
    h.run(
        "control_frames_only_from_their_relation",
        DEADLINE,
        control_by_relation,
    );
    h.finish();
}

// ---------------------------------------------------------------------------------------
// Helpers

fn root() -> Result<Bus, String> {
    Bus::root(BusConfig::default()).map_err(|e| e.to_string())
}

type Slot = Rc<RefCell<Option<ExecOutput>>>;

/// Starts a program whose result lands in the returned slot.
fn start(bus: &mut Bus, command: &Command) -> Result<(ExecId, Slot), String> {
    let slot: Slot = Rc::new(RefCell::new(None));
    let s = slot.clone();
    let id = bus
        .exec(command, move |_, out| *s.borrow_mut() = Some(out))
        .map_err(|e| format!("exec {:?}: {e}", command.program()))?;
    Ok((id, slot))
}

/// Waits for a result.
fn wait(bus: &mut Bus, slot: &Slot) -> Result<ExecOutput, String> {
    let s = slot.clone();
    run_until(bus, WAIT, move |_| s.borrow().is_some())?;
    slot.borrow_mut()
        .take()
        .ok_or_else(|| "no result".to_string())
}

/// Runs a program to its end.
fn run(bus: &mut Bus, command: &Command) -> Result<ExecOutput, String> {
    let (_, slot) = start(bus, command)?;
    wait(bus, &slot)
}

/// Runs the loop for `d`.
fn run_for(bus: &mut Bus, d: Duration) -> Result<(), String> {
    let start = std::time::Instant::now();
    run_until(bus, d + WAIT, move |_| start.elapsed() >= d)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh directory for this scenario's files.
fn scratch() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("forkbus-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display())
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

// ---------------------------------------------------------------------------------------
// Plain exec

fn large_output() -> Result<(), String> {
    let mut bus = root()?;
    // 1 MiB on stdout and 300 KiB on stderr, far past a pipe's 64 KiB, written at once.
    let cmd = Command::shell(
        "yes abcdefghijklmno | head -c 1048576; yes 0123456789 | head -c 307200 >&2",
    );
    let out = run(&mut bus, &cmd)?;
    let expect_out = b"abcdefghijklmno\n".repeat(65_536);
    let expect_err: Vec<u8> = b"0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(307_200)
        .collect();
    ensure(out.success(), || format!("not a success: {out:?}"))?;
    ensure(out.stdout == expect_out, || {
        format!("stdout: {} bytes, not the 1 MiB written", out.stdout.len())
    })?;
    ensure(out.stderr == expect_err, || {
        format!(
            "stderr: {} bytes ({:?}...), not the 300 KiB written",
            out.stderr.len(),
            text(out.stderr.get(..64).unwrap_or_default())
        )
    })?;
    // Both streams at once from concurrent programs, interleaved by the reactor.
    let a = start(&mut bus, &cmd)?;
    let b = start(&mut bus, &cmd)?;
    for (_, slot) in [a, b] {
        let out = wait(&mut bus, &slot)?;
        ensure(out.stdout == expect_out && out.stderr == expect_err, || {
            format!(
                "concurrent run: {} + {} bytes",
                out.stdout.len(),
                out.stderr.len()
            )
        })?;
    }
    ensure(bus.execs().is_empty(), || {
        format!("left: {:?}", bus.execs())
    })
}

fn exit_codes() -> Result<(), String> {
    let mut bus = root()?;
    let out = run(&mut bus, &Command::shell("echo out; echo err >&2; exit 7"))?;
    ensure(
        out.status == Some(ExitStatus::Code(7))
            && out.stdout == b"out\n"
            && out.stderr == b"err\n"
            && out.intervention.is_none()
            && !out.killed,
        || format!("exit 7: {out:?}"),
    )?;
    let out = run(&mut bus, &Command::shell("kill -KILL $$"))?;
    ensure(out.status == Some(ExitStatus::Signal(9)), || {
        format!("killed: {out:?}")
    })?;
    ensure(!out.killed, || "the bus did not kill it".to_string())?;
    let out = run(&mut bus, &Command::new("true"))?;
    ensure(out.success() && out.pid.as_raw() > 0, || {
        format!("true via PATH: {out:?}")
    })?;

    // Errors of exec itself: the program did not run, no callback.
    let dir = scratch()?;
    let marker = dir.join("ran");
    match bus.exec(&Command::new("forkbus-no-such-program"), |_, _| {}) {
        Err(ExecError::Spawn {
            stage: SpawnStage::Exec,
            errno: Errno::ENOENT,
        }) => {}
        other => return Err(format!("missing program: {other:?}")),
    }
    match bus.exec(&Command::new("/etc/passwd"), |_, _| {}) {
        Err(ExecError::Spawn {
            stage: SpawnStage::Exec,
            errno: Errno::EACCES,
        }) => {}
        other => return Err(format!("not executable: {other:?}")),
    }
    let cmd = Command::shell(format!("touch {}", sh_quote(&marker)))
        .current_dir("/forkbus-no-such-directory");
    match bus.exec(&cmd, |_, _| {}) {
        Err(ExecError::Spawn {
            stage: SpawnStage::Chdir,
            errno: Errno::ENOENT,
        }) => {}
        other => return Err(format!("missing directory: {other:?}")),
    }
    match bus.exec(&Command::new("/bin/echo").arg("a\0b"), |_, _| {}) {
        Err(ExecError::Invalid(InvalidCommand::Nul(_))) => {}
        other => return Err(format!("NUL in an argument: {other:?}")),
    }
    ensure(!marker.exists(), || "the program ran".to_string())?;
    ensure(bus.execs().is_empty(), || {
        format!("left: {:?}", bus.execs())
    })?;
    // Nothing of the failed starts is left to reap.
    run_for(&mut bus, Duration::from_millis(100))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn failed_drop() -> Result<(), String> {
    let mut bus = root()?;
    let dir = scratch()?;
    let marker = dir.join("ran");
    let touch = format!("touch {}", sh_quote(&marker));

    // An unknown user: refused before fork.
    let cmd = Command::shell(&touch).user(PrivilegeDrop::new("forkbus-no-such-user"));
    match bus.exec(&cmd, |_, _| {}) {
        Err(ExecError::Identity(IdentityError::UnknownUser(_))) => {}
        other => return Err(format!("unknown user: {other:?}")),
    }
    // A drop that fails in the child: uid 4294967295 is (uid_t)-1, which setuid refuses
    // (as root: setgroups and setgid succeed first; otherwise setgroups fails).
    let cmd = Command::shell(&touch).credentials(Credentials::new(u32::MAX, 65_534, Vec::new()));
    match bus.exec(&cmd, |_, _| {}) {
        Err(ExecError::Spawn { stage, errno })
            if matches!(stage, SpawnStage::Setuid | SpawnStage::Setgroups)
                && (errno == Errno::EINVAL || errno == Errno::EPERM) => {}
        other => return Err(format!("failing uid drop: {other:?}")),
    }
    // Same for the group.
    let cmd = Command::shell(&touch).credentials(Credentials::new(65_534, u32::MAX, Vec::new()));
    match bus.exec(&cmd, |_, _| {}) {
        Err(ExecError::Spawn {
            stage: SpawnStage::Setgid | SpawnStage::Setgroups,
            ..
        }) => {}
        other => return Err(format!("failing gid drop: {other:?}")),
    }
    // Give anything that might have run time to show itself.
    run_for(&mut bus, Duration::from_millis(300))?;
    ensure(!marker.exists(), || {
        "the program ran after a failed drop".to_string()
    })?;

    if is_root() {
        // A drop that works: the program runs as nobody, with exactly its groups.
        let cmd = Command::shell("id -u; id -g; id -G; id -un")
            .current_dir("/")
            .user(PrivilegeDrop::new("nobody"));
        let out = run(&mut bus, &cmd)?;
        ensure(
            out.success() && text(&out.stdout) == "65534\n65534\n65534\nnobody\n",
            || format!("as nobody: {:?} {:?}", text(&out.stdout), text(&out.stderr)),
        )?;
        // The directory is entered after the drop, with the new user's permissions.
        let private = dir.join("private");
        std::fs::create_dir(&private).map_err(|e| e.to_string())?;
        std::fs::set_permissions(
            &private,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| e.to_string())?;
        let cmd = Command::shell(&touch)
            .current_dir(&private)
            .user(PrivilegeDrop::new("nobody"));
        match bus.exec(&cmd, |_, _| {}) {
            Err(ExecError::Spawn {
                stage: SpawnStage::Chdir,
                errno: Errno::EACCES,
            }) => {}
            other => return Err(format!("private directory as nobody: {other:?}")),
        }
        ensure(!marker.exists(), || "the program ran".to_string())?;
    } else {
        println!("  (not root: the successful drop is not tested)");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn cancel_escalates() -> Result<(), String> {
    let mut bus = root()?;
    let dir = scratch()?;
    let ready = dir.join("ready");
    // Ignores SIGTERM (and so does its `sleep`, which inherits the ignored disposition).
    let cmd = Command::shell(format!(
        "trap '' TERM; touch {}; sleep 30",
        sh_quote(&ready)
    ))
    .kill_grace(Duration::from_millis(500));
    let (id, slot) = start(&mut bus, &cmd)?;
    let r = ready.clone();
    run_until(&mut bus, WAIT, move |_| r.exists())?;
    ensure(bus.cancel_exec(id), || "cancel refused".to_string())?;
    let out = wait(&mut bus, &slot)?;
    ensure(
        out.status == Some(ExitStatus::Signal(9))
            && out.killed
            && out.intervention == Some(Intervention::Cancelled)
            && !out.pipes_held_open,
        || format!("escalated cancel: {out:?}"),
    )?;
    // The whole group went: the sleep did not hold the pipes for 30 s.
    ensure(out.duration < Duration::from_secs(25), || {
        format!("took {:?}", out.duration)
    })?;
    ensure(!bus.cancel_exec(id), || {
        "a finished program was cancelled again".to_string()
    })?;

    // A program that honours the cancel signal ends by it, without SIGKILL.
    let (id, slot) = start(&mut bus, &Command::new("sleep").arg("30"))?;
    ensure(bus.cancel_exec(id), || "cancel refused".to_string())?;
    let out = wait(&mut bus, &slot)?;
    ensure(
        out.status == Some(ExitStatus::Signal(15)) && !out.killed,
        || format!("plain cancel: {out:?}"),
    )?;
    // A chosen signal.
    let cmd = Command::new("sleep")
        .arg("30")
        .cancel_signal(Signal::SIGINT);
    let (id, slot) = start(&mut bus, &cmd)?;
    bus.cancel_exec(id);
    let out = wait(&mut bus, &slot)?;
    ensure(out.status == Some(ExitStatus::Signal(2)), || {
        format!("SIGINT cancel: {out:?}")
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn stopped_child() -> Result<(), String> {
    let mut bus = root()?;
    let cmd = Command::shell("echo before; kill -STOP $$; echo after");
    let (id, slot) = start(&mut bus, &cmd)?;
    let pid = bus
        .exec_pid(id)
        .ok_or_else(|| "no pid for a running program".to_string())?;
    run_until(&mut bus, WAIT, move |_| {
        proc_state(pid.as_raw()) == Some('T')
    })?;
    // Stopped (SIGCHLD came, CLD_STOPPED): not an exit. Nothing is reported.
    run_for(&mut bus, Duration::from_millis(1500))?;
    ensure(slot.borrow().is_none(), || {
        format!("a stopped child was reported: {:?}", slot.borrow())
    })?;
    ensure(bus.exec_pid(id) == Some(pid), || "forgotten".to_string())?;
    kill(nix_pid(pid), Signal::SIGCONT).map_err(|e| e.to_string())?;
    let out = wait(&mut bus, &slot)?;
    ensure(out.success() && out.stdout == b"before\nafter\n", || {
        format!("after SIGCONT: {out:?}")
    })
}

fn timeout() -> Result<(), String> {
    let mut bus = root()?;
    let cmd = Command::new("sleep")
        .arg("30")
        .timeout(Duration::from_millis(300));
    let out = run(&mut bus, &cmd)?;
    ensure(
        out.intervention == Some(Intervention::Timeout)
            && out.status == Some(ExitStatus::Signal(15))
            && !out.killed,
        || format!("timed out: {out:?}"),
    )?;
    // A timeout with grace: SIGKILL follows for a program that ignores the signal (the
    // shell sets the trap long before the 5 s are up; `exec` leaves no grandchild).
    let cmd = Command::shell("trap '' TERM; exec sleep 30")
        .timeout(Duration::from_secs(5))
        .kill_grace(Duration::from_millis(300));
    let out = run(&mut bus, &cmd)?;
    ensure(
        out.intervention == Some(Intervention::Timeout)
            && out.status == Some(ExitStatus::Signal(9))
            && out.killed,
        || format!("timed out, then killed: {out:?}"),
    )?;
    // Finishing first: no intervention, and the timer does not fire later.
    let cmd = Command::shell("echo quick").timeout(Duration::from_millis(500));
    let out = run(&mut bus, &cmd)?;
    ensure(out.success() && out.intervention.is_none(), || {
        format!("quick: {out:?}")
    })?;
    run_for(&mut bus, Duration::from_millis(800))
}

fn stdin_bytes() -> Result<(), String> {
    let mut bus = root()?;
    // Writes to a pipe must not kill this process even with SIGPIPE at its default.
    // SAFETY: sets a signal disposition; no handler runs.
    unsafe { nix::libc::signal(nix::libc::SIGPIPE, nix::libc::SIG_DFL) };
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = run(&mut bus, &Command::new("cat").stdin_bytes(input.clone()))?;
    ensure(
        out.success() && out.stdout == input && out.stdin_unwritten == 0,
        || {
            format!(
                "cat: {} bytes back of {}, {} unwritten",
                out.stdout.len(),
                input.len(),
                out.stdin_unwritten
            )
        },
    )?;
    // A program that reads a little and exits: the rest is counted, nothing breaks.
    let big = vec![b'x'; 1 << 20];
    let out = run(
        &mut bus,
        &Command::new("head").arg("-c").arg("10").stdin_bytes(big),
    )?;
    ensure(
        out.success() && out.stdout == b"xxxxxxxxxx" && out.stdin_unwritten > 0,
        || format!("head: {out:?}"),
    )?;
    // Empty input: end of file at once.
    let out = run(
        &mut bus,
        &Command::new("wc").arg("-c").stdin_bytes(Vec::new()),
    )?;
    ensure(text(&out.stdout).trim() == "0", || format!("wc: {out:?}"))
}

fn output_bound() -> Result<(), String> {
    let mut bus = root()?;
    let limit = 100_000;
    let a = start(
        &mut bus,
        &Command::new("cat").arg("/dev/zero").max_output(limit),
    )?;
    let b = start(
        &mut bus,
        &Command::shell("echo fine; exec cat /dev/zero >&2").max_output(limit),
    )?;
    let out = wait(&mut bus, &a.1)?;
    ensure(
        out.stdout.len() == limit
            && out.truncated
            && out.killed
            && out.status == Some(ExitStatus::Signal(9))
            && out.intervention
                == Some(Intervention::OutputLimit {
                    stream: Stream::Stdout,
                    limit,
                })
            && !out.success(),
        || format!("stdout bound: {} bytes, {out:?}", out.stdout.len()),
    )?;
    let out = wait(&mut bus, &b.1)?;
    ensure(
        out.stdout == b"fine\n"
            && out.stderr.len() == limit
            && out.intervention
                == Some(Intervention::OutputLimit {
                    stream: Stream::Stderr,
                    limit,
                }),
        || format!("stderr bound: {} bytes, {out:?}", out.stderr.len()),
    )
}

fn pipes_held_open() -> Result<(), String> {
    let mut bus = root()?;
    // The shell exits at once; its background `sleep` keeps stdout open.
    let cmd = Command::shell("sleep 5 & echo started").pipe_grace(Duration::from_millis(300));
    let out = run(&mut bus, &cmd)?;
    // The leftover sleep is in the program's process group.
    let group = nix::unistd::Pid::from_raw(-i32::try_from(out.pid.as_raw()).unwrap_or(0));
    let _ = kill(group, Signal::SIGKILL);
    ensure(
        out.status == Some(ExitStatus::Code(0))
            && out.stdout == b"started\n"
            && out.pipes_held_open
            && out.truncated,
        || format!("held open: {out:?}"),
    )
}

fn hygiene() -> Result<(), String> {
    let mut bus = root()?;
    // A descriptor of this process without close-on-exec must not reach the program.
    // SAFETY: dup returns a new descriptor (or -1); it is closed below.
    let leaked = unsafe { nix::libc::dup(1) };
    let out = run(&mut bus, &Command::new("ls").arg("-1").arg("/proc/self/fd"))?;
    let fds: BTreeSet<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    let expected: BTreeSet<String> = ["0", "1", "2", "3"].iter().map(|s| s.to_string()).collect();
    ensure(fds == expected, || {
        format!("descriptors of the program: {fds:?} (this process leaked {leaked})")
    })?;
    // SAFETY: closes the descriptor dup'ed above.
    unsafe { nix::libc::close(leaked) };
    let out = run(&mut bus, &Command::new("readlink").arg("/proc/self/fd/0"))?;
    ensure(text(&out.stdout) == "/dev/null\n", || {
        format!("stdin: {out:?}")
    })?;

    // Signals: nothing blocked (the bus blocks four), SIGPIPE not ignored (Rust ignores
    // it); a process group of its own. (Only the standard signals' dispositions are
    // checked: a process started through glibc's posix_spawn, as cargo starts this test,
    // has glibc's internal signals 32 and 33 ignored, which no glibc call can undo.)
    let out = run(&mut bus, &Command::new("cat").arg("/proc/self/status"))?;
    let status = text(&out.stdout);
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    ensure(mask("SigBlk:") == Some(0), || format!("blocked: {status}"))?;
    ensure(mask("SigIgn:").map(|m| m & 0x7fff_ffff) == Some(0), || {
        format!("ignored: {status}")
    })?;
    let out = run(&mut bus, &Command::new("cat").arg("/proc/self/stat"))?;
    let stat = text(&out.stdout);
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state, ppid, pgrp.
    ensure(
        fields.get(2).copied() == Some(out.pid.as_raw().to_string().as_str()),
        || format!("process group: {stat}"),
    )?;
    let cmd = Command::new("cat")
        .arg("/proc/self/stat")
        .process_group(false);
    let out = run(&mut bus, &cmd)?;
    let stat = text(&out.stdout);
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ours = nix::unistd::getpgrp().as_raw().to_string();
    ensure(fields.get(2).copied() == Some(ours.as_str()), || {
        format!("shared process group: {stat}")
    })?;

    // Environment: inherited, set, removed, cleared.
    std::env::set_var("FORKBUS_EXEC_INHERITED", "yes");
    let out = run(
        &mut bus,
        &Command::shell("echo \"$FORKBUS_EXEC_INHERITED|$A|${B-unset}\"")
            .env("A", "1")
            .env("B", "2")
            .env_remove("B"),
    )?;
    ensure(text(&out.stdout) == "yes|1|unset\n", || {
        format!("environment: {out:?}")
    })?;
    let out = run(
        &mut bus,
        &Command::new("/usr/bin/env").env_clear().env("ONLY", "this"),
    )?;
    ensure(text(&out.stdout) == "ONLY=this\n", || {
        format!("cleared environment: {out:?}")
    })?;
    // Directory.
    let out = run(&mut bus, &Command::new("/bin/pwd").current_dir("/tmp"))?;
    ensure(text(&out.stdout) == "/tmp\n", || format!("cwd: {out:?}"))?;
    // Output to /dev/null.
    let out = run(
        &mut bus,
        &Command::shell("echo gone; echo kept >&2").stdout(Output::Null),
    )?;
    ensure(out.stdout.is_empty() && out.stderr == b"kept\n", || {
        format!("null stdout: {out:?}")
    })
}

fn shutdown_cancels() -> Result<(), String> {
    let mut bus = root()?;
    let (_, slot) = start(
        &mut bus,
        &Command::new("sleep")
            .arg("30")
            .kill_grace(Duration::from_secs(2)),
    )?;
    let dir = scratch()?;
    let ready = dir.join("ready");
    let (_, ignoring) = start(
        &mut bus,
        &Command::shell(format!(
            "trap '' TERM; touch {}; exec sleep 30",
            sh_quote(&ready)
        ))
        .kill_grace(Duration::from_millis(500)),
    )?;
    let r = ready.clone();
    run_until(&mut bus, WAIT, move |_| r.exists())?;
    let _ = std::fs::remove_dir_all(&dir);
    bus.shutdown_tree();
    match bus.exec(&Command::new("true"), |_, _| {}) {
        Err(ExecError::ShuttingDown) => {}
        other => return Err(format!("exec while draining: {other:?}")),
    }
    match bus.run().map_err(|e| e.to_string())? {
        Stop::Shutdown(_) => {}
        other => return Err(format!("ended with {other:?}")),
    }
    let out = slot
        .borrow_mut()
        .take()
        .ok_or_else(|| "no result before the shutdown ended".to_string())?;
    ensure(
        out.intervention == Some(Intervention::Cancelled)
            && out.status == Some(ExitStatus::Signal(15)),
        || format!("sleep: {out:?}"),
    )?;
    let out = ignoring
        .borrow_mut()
        .take()
        .ok_or_else(|| "no result for the stubborn one".to_string())?;
    ensure(
        out.killed && out.status == Some(ExitStatus::Signal(9)),
        || format!("stubborn: {out:?}"),
    )
}

/// Exec works in any bus process: a forked child runs a program and reports its output.
fn exec_in_child() -> Result<(), String> {
    let mut bus = root()?;
    let heard: Rc<RefCell<Vec<String>>> = Rc::default();
    bus.add_listener(0, Texts(heard.clone()));
    let me = bus.pid();
    let child = bus
        .fork(ForkOptions::named("runner"), move |bus| {
            let cmd = Command::shell("printf '%s' \"$((6 * 7))\"");
            let sent = bus.exec(&cmd, move |bus, out| {
                let _ = bus.send(me, &format!("child ran: {}", text(&out.stdout)));
            });
            if let Err(e) = sent {
                let _ = bus.send(me, &format!("child failed: {e}"));
            }
        })
        .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, WAIT, move |_| !h.borrow().is_empty())?;
    let got = heard.borrow().clone();
    ensure(got == ["child ran: 42"], || {
        format!("heard {got:?} from {child}")
    })?;
    common::shutdown(bus)
}

// ---------------------------------------------------------------------------------------
// Programs as nodes

/// Records string messages (with who sent them), child exits and peer shutdowns.
#[derive(Debug, Default)]
struct NodeLog {
    messages: Vec<(u32, String)>,
    exits: Vec<(Pid, ExitStatus)>,
    shutdowns: Vec<PeerShutdown>,
    lost: Vec<MessageId>,
}

struct Recorder(Rc<RefCell<NodeLog>>);

impl Listener for Recorder {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(s) = msg.decode::<String>() {
            self.0.borrow_mut().messages.push((msg.origin().pid, s));
        }
    }

    fn on_child_exit(&mut self, _bus: &mut Bus, pid: Pid, status: ExitStatus) {
        self.0.borrow_mut().exits.push((pid, status));
    }

    fn on_peer_shutdown(&mut self, _bus: &mut Bus, shutdown: &PeerShutdown) {
        self.0.borrow_mut().shutdowns.push(shutdown.clone());
    }

    fn on_lost(&mut self, _bus: &mut Bus, report: &LossReport) {
        self.0.borrow_mut().lost.push(report.id);
    }
}

/// Records string messages only.
struct Texts(Rc<RefCell<Vec<String>>>);

impl Listener for Texts {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(s) = msg.decode::<String>() {
            self.0.borrow_mut().push(s);
        }
    }
}

fn node_command(name: &str) -> Command {
    Command::new(NODE_EXE)
        .arg(name)
        .stdout(Output::Inherit)
        .stderr(Output::Inherit)
}

fn heard(log: &Rc<RefCell<NodeLog>>, from: u32, what: &str) -> bool {
    log.borrow()
        .messages
        .iter()
        .any(|(p, s)| *p == from && s == what)
}

fn wait_heard(
    bus: &mut Bus,
    log: &Rc<RefCell<NodeLog>>,
    from: u32,
    what: &str,
) -> Result<(), String> {
    let l = log.clone();
    let w = what.to_owned();
    run_until(bus, WAIT, move |_| heard(&l, from, &w)).map_err(|e| {
        format!(
            "waiting for {what:?} from {from}: {e}; log {:?}",
            log.borrow().messages
        )
    })
}

/// The external node's child exit and peer shutdown, once each.
fn wait_node_gone(
    bus: &mut Bus,
    log: &Rc<RefCell<NodeLog>>,
    pid: Pid,
) -> Result<(ExitStatus, PeerShutdown), String> {
    let l = log.clone();
    run_until(bus, WAIT, move |_| {
        let l = l.borrow();
        l.exits.iter().any(|(p, _)| *p == pid)
            && l.shutdowns
                .iter()
                .any(|s| s.relation == Relation::Child(pid))
    })?;
    // A moment more: nothing is reported twice.
    run_for(bus, Duration::from_millis(200))?;
    let l = log.borrow();
    let exits: Vec<ExitStatus> = l
        .exits
        .iter()
        .filter(|(p, _)| *p == pid)
        .map(|(_, s)| *s)
        .collect();
    let downs: Vec<&PeerShutdown> = l
        .shutdowns
        .iter()
        .filter(|s| s.relation == Relation::Child(pid))
        .collect();
    match (exits.as_slice(), downs.as_slice()) {
        ([exit], [down]) => Ok((*exit, (*down).clone())),
        _ => Err(format!("exits {exits:?}, shutdowns {downs:?}")),
    }
}

fn node_messages() -> Result<(), String> {
    let mut bus = root()?;
    let log: Rc<RefCell<NodeLog>> = Rc::default();
    bus.add_listener(0, Recorder(log.clone()));
    let root_pid = bus.pid();

    // What a node cannot have is refused before anything starts.
    match bus.exec_node(&Command::new(NODE_EXE)) {
        Err(ExecError::NotForNode(_)) => {}
        other => return Err(format!("captured node output: {other:?}")),
    }
    // A forked sibling, to check routes between the two kinds of children.
    let sibling = bus
        .fork(ForkOptions::named("sibling"), move |bus| {
            bus.add_listener(0, Relay(root_pid));
        })
        .map_err(|e| e.to_string())?;

    let pid = bus
        .exec_node(&node_command("ext"))
        .map_err(|e| e.to_string())?;
    ensure(bus.children().contains(&pid), || "not a child".to_string())?;
    let node = bus
        .child_node(pid)
        .ok_or_else(|| "no node for the child".to_string())?;
    // The route is usable at once: by pid before the program has even joined.
    bus.send(pid, &"by-pid".to_string())
        .map_err(|e| e.to_string())?;
    wait_heard(&mut bus, &log, pid.as_raw(), "echo:by-pid")?;
    // Its name arrives with its routing announcement.
    run_until(&mut bus, WAIT, move |b| {
        b.router().resolve(&to::name("ext")) == Some(node)
    })?;
    bus.send(to::name("ext"), &"by-name".to_string())
        .map_err(|e| e.to_string())?;
    wait_heard(&mut bus, &log, pid.as_raw(), "echo:by-name")?;
    // A broadcast reaches it once.
    bus.send(to::broadcast(), &"all".to_string())
        .map_err(|e| e.to_string())?;
    wait_heard(&mut bus, &log, pid.as_raw(), "ack:all")?;
    wait_heard(&mut bus, &log, sibling.as_raw(), "sibling heard: all")?;
    // A forked sibling reaches it by name through the root, and hears the answer.
    bus.send(sibling, &"go".to_string())
        .map_err(|e| e.to_string())?;
    wait_heard(
        &mut bus,
        &log,
        sibling.as_raw(),
        "sibling heard: echo:from-sibling",
    )?;
    let acks = log
        .borrow()
        .messages
        .iter()
        .filter(|(p, s)| *p == pid.as_raw() && s == "ack:all")
        .count();
    ensure(acks == 1, || format!("{acks} answers to one broadcast"))?;

    // Told to exit: it shuts itself down gracefully and exits 0; one child exit and one
    // peer shutdown, nothing lost.
    bus.send(pid, &"exit".to_string())
        .map_err(|e| e.to_string())?;
    let (exit, down) = wait_node_gone(&mut bus, &log, pid)?;
    ensure(exit == ExitStatus::Code(0), || format!("exit: {exit}"))?;
    ensure(down.lost.is_empty() && down.peer == Some(node), || {
        format!("shutdown: {down:?}")
    })?;
    ensure(!bus.children().contains(&pid), || {
        "still a child".to_string()
    })?;
    common::shutdown(bus)
}

/// The forked sibling: on "go", sends to the node by name; reports what it hears to the
/// root.
struct Relay(Pid);

impl Listener for Relay {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let Ok(s) = msg.decode::<String>() else {
            return;
        };
        if s == "go" {
            let _ = bus.send(to::name("ext"), &"from-sibling".to_string());
        } else {
            let _ = bus.send(self.0, &format!("sibling heard: {s}"));
        }
    }
}

fn node_loss() -> Result<(), String> {
    let mut bus = root()?;
    let log: Rc<RefCell<NodeLog>> = Rc::default();
    bus.add_listener(0, Recorder(log.clone()));
    let pid = bus
        .exec_node(&node_command("doomed"))
        .map_err(|e| e.to_string())?;
    bus.send(pid, &"up?".to_string())
        .map_err(|e| e.to_string())?;
    wait_heard(&mut bus, &log, pid.as_raw(), "echo:up?")?;
    // Queue envelopes and kill it before the loop runs again: they are never acknowledged.
    let mut ids: Vec<MessageId> = Vec::new();
    for i in 0..5 {
        ids.push(
            bus.send(pid, &format!("queued {i}"))
                .map_err(|e| e.to_string())?,
        );
    }
    kill(nix_pid(pid), Signal::SIGKILL).map_err(|e| e.to_string())?;
    let (exit, down) = wait_node_gone(&mut bus, &log, pid)?;
    ensure(exit == ExitStatus::Signal(9), || format!("exit: {exit}"))?;
    let lost: Vec<MessageId> = down.lost.iter().map(|l| l.envelope.id).collect();
    ensure(ids.iter().all(|id| lost.contains(id)), || {
        format!("queued {ids:?}, lost list {lost:?}")
    })?;
    // This node originated them: each is also reported to it as lost, once.
    let reported = log.borrow().lost.clone();
    ensure(
        ids.iter()
            .all(|id| reported.iter().filter(|r| *r == id).count() == 1),
        || format!("queued {ids:?}, loss reports {reported:?}"),
    )?;
    common::shutdown_after_kills(bus, 1)
}

fn node_shutdown() -> Result<(), String> {
    let mut bus = root()?;
    let log: Rc<RefCell<NodeLog>> = Rc::default();
    bus.add_listener(0, Recorder(log.clone()));
    let pid = bus
        .exec_node(&node_command("worker"))
        .map_err(|e| e.to_string())?;
    bus.send(pid, &"up?".to_string())
        .map_err(|e| e.to_string())?;
    wait_heard(&mut bus, &log, pid.as_raw(), "echo:up?")?;
    // The tree's graceful shutdown reaches the node over the wire; it drains, reports its
    // tally and exits 0.
    common::shutdown(bus)?;
    let l = log.borrow();
    ensure(l.exits == [(pid, ExitStatus::Code(0))], || {
        format!("exits: {:?}", l.exits)
    })
}

// ---------------------------------------------------------------------------------------
// Control frames by relation

/// Bad control frames by sender, and supervision events.
#[derive(Debug, Default)]
struct ControlLog {
    bad: Vec<(Option<NodeId>, u32)>,
    supervision: Vec<SupervisionEvent>,
}

struct ControlEar(Rc<RefCell<ControlLog>>);

impl Listener for ControlEar {
    fn on_router_error(&mut self, _bus: &mut Bus, error: &BusError) {
        if let BusError::BadControl { peer, code } = error {
            self.0.borrow_mut().bad.push((*peer, *code));
        }
    }

    fn on_service(&mut self, _bus: &mut Bus, event: &ServiceEvent) {
        if let ServiceEvent::Supervision(event) = event {
            self.0.borrow_mut().supervision.push(event.clone());
        }
    }
}

/// Link-level control frames are taken only from the relation that may send them: a node
/// started with `exec_node` can inject no supervision event nor a shutdown into its parent
/// (each frame is a `BadControl`, the process goes on), and refuses what a parent may not
/// send it; a forked child may tell of a supervisor of its own giving up, but its pong,
/// from a process no supervisor here owns, is refused.
fn control_by_relation() -> Result<(), String> {
    let mut bus = root()?;
    let log: Rc<RefCell<NodeLog>> = Rc::default();
    bus.add_listener(0, Recorder(log.clone()));
    let ctl: Rc<RefCell<ControlLog>> = Rc::default();
    bus.add_listener(0, ControlEar(ctl.clone()));
    let me = bus.pid();

    let forked = bus
        .fork(ForkOptions::named("forked"), move |bus| {
            let sent = bus.send_forged_control(Relation::Parent, "gave-up")
                && bus.send_forged_control(Relation::Parent, "pong");
            let _ = bus.send(me, &format!("forked sent: {sent}"));
        })
        .map_err(|e| e.to_string())?;
    let forked_node = bus
        .child_node(forked)
        .ok_or("no node for the forked child")?;
    wait_heard(&mut bus, &log, forked.as_raw(), "forked sent: true")?;

    let command = Command::new(NODE_EXE)
        .arg("--forge")
        .stdout(Output::Inherit)
        .stderr(Output::Inherit);
    let pid = bus.exec_node(&command).map_err(|e| e.to_string())?;
    let node = bus.child_node(pid).ok_or("no node for the exec'd child")?;
    // It sent its nine forged frames before this.
    wait_heard(&mut bus, &log, pid.as_raw(), "forged")?;
    // What a parent may not send to a node that is no supervised worker.
    for kind in [
        "ping", "stop", "job", "pong", "ready", "recycle", "result", "gave-up", "tally",
    ] {
        ensure(bus.send_forged_control(Relation::Child(pid), kind), || {
            format!("cannot send {kind} to the node")
        })?;
    }
    bus.send(pid, &"report".to_string())
        .map_err(|e| e.to_string())?;
    wait_heard(&mut bus, &log, pid.as_raw(), "bad:9")?;
    run_for(&mut bus, Duration::from_millis(100))?;
    {
        let c = ctl.borrow();
        let from = |n: NodeId| -> Vec<u32> {
            c.bad
                .iter()
                .filter(|(p, _)| *p == Some(n))
                .map(|(_, code)| *code)
                .collect()
        };
        let from_node = from(node);
        let distinct: BTreeSet<u32> = from_node.iter().copied().collect();
        ensure(from_node.len() == 9 && distinct.len() == 9, || {
            format!("bad control frames from the node: {from_node:x?}")
        })?;
        ensure(from(forked_node).len() == 1 && c.bad.len() == 10, || {
            format!("bad control frames: {:x?}", c.bad)
        })?;
        let gave_up: Vec<&SupervisionEvent> = c
            .supervision
            .iter()
            .filter(|e| matches!(e, SupervisionEvent::ChildGaveUp { from, .. } if *from == forked))
            .collect();
        ensure(gave_up.len() == 1 && c.supervision.len() == 1, || {
            format!("supervision events: {:?}", c.supervision)
        })?;
    }
    // The forged shutdown did not start a drain: the root still sends.
    ensure(!bus.is_stopping(), || {
        "a child's shutdown frame was obeyed".into()
    })?;

    // Told to exit, the node drains: its tally (child → parent) is taken without a word.
    bus.send(pid, &"exit".to_string())
        .map_err(|e| e.to_string())?;
    let (exit, _) = wait_node_gone(&mut bus, &log, pid)?;
    ensure(exit == ExitStatus::Code(0), || format!("node exit: {exit}"))?;
    ensure(ctl.borrow().bad.len() == 10, || {
        format!("bad control frames: {:x?}", ctl.borrow().bad)
    })?;
    common::shutdown(bus)
}
