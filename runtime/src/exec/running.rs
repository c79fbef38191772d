//! The running state machine, on the bus side: the [`ExecTable`] of the programs a bus runs,
//! each a [`Running`] entry whose [`Life`] goes from running to reaped while its captured
//! [`Pipe`]s are read and its input [`Feeder`] written through the reactor, under its
//! timeout, kill and pipe timers; and the `impl Bus` block ([`Bus::exec`],
//! [`Bus::cancel_exec`], the `SIGCHLD` reaping, the shutdown hooks) that delivers the
//! [`ExecOutput`] once the exit is known and both pipes are closed.

use crate::child::PidExt;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use forkbus_router::Timestamp;
use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use crate::bus::Bus;
use crate::event::Event;
use crate::listener::Service;
use crate::reactor::{FdId, Interest};
use crate::timer::TimerId;
use forkbus_node::{ExitStatus, Pid};

use super::spawn::{reap_blocking, start, Started};
use super::{Command, ExecError, ExecId, ExecOutput, Input, Intervention, Stream};

/// Bytes read per `read` call from a pipe.
const READ_CHUNK: usize = 64 << 10;
/// Reads per pipe per wake-up (level-triggered: the rest is reported again).
const MAX_READS: usize = 16;

type DoneFn = Box<dyn FnOnce(&mut Bus, ExecOutput)>;

/// A captured stream.
#[derive(Debug, Default)]
struct Pipe {
    /// Its registration while open.
    fd: Option<FdId>,
    bytes: Vec<u8>,
}

/// Input being written.
#[derive(Debug)]
struct Feeder {
    fd: FdId,
    data: Vec<u8>,
    off: usize,
}

/// Where a program is in its life.
///
/// ```text
///   Running ──reaped──► Exited ──both pipes at EOF (or closed after pipe_grace)──► done
///      │                                                                    (callback)
///      └──(someone else reaped it: ECHILD)──► Vanished ──pipes──► done
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Running,
    Exited(ExitStatus),
    Vanished,
}

struct Running {
    pid: Pid,
    group: bool,
    started: Timestamp,
    life: Life,
    stdout: Pipe,
    stderr: Pipe,
    stdin: Option<Feeder>,
    max_output: usize,
    intervention: Option<Intervention>,
    killed: bool,
    truncated: bool,
    pipes_held_open: bool,
    stdin_unwritten: usize,
    cancel_signal: Signal,
    kill_grace: Duration,
    pipe_grace: Duration,
    timeout_timer: Option<TimerId>,
    kill_timer: Option<TimerId>,
    pipe_timer: Option<TimerId>,
    done: Option<DoneFn>,
}

impl Running {
    fn pipe(&mut self, stream: Stream) -> &mut Pipe {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }

    fn pipes_open(&self) -> bool {
        self.stdout.fd.is_some() || self.stderr.fd.is_some()
    }

    /// Sends `signal` to the program (its group when it has one) while it is not reaped.
    fn signal(&self, signal: Signal) {
        if self.life != Life::Running {
            return;
        }
        let raw = i32::try_from(self.pid.as_raw()).unwrap_or(i32::MAX);
        let target = nix::unistd::Pid::from_raw(if self.group { -raw } else { raw });
        if let Err(e) = kill(target, signal) {
            if e != Errno::ESRCH {
                tracing::warn!(pid = %self.pid, %signal, error = %e, "cannot signal a program");
            }
        }
    }
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("pid", &self.pid)
            .field("life", &self.life)
            .field("intervention", &self.intervention)
            .finish_non_exhaustive()
    }
}

/// The programs a bus runs, by id.
#[derive(Debug, Default)]
pub(crate) struct ExecTable {
    running: BTreeMap<ExecId, Running>,
    next: u64,
    rbuf: Vec<u8>,
}

/// The exec service: programs are reaped on `SIGCHLD`, cancelled when the bus drains,
/// killed at the drain's deadline, and killed and reaped when the bus is dropped.
pub(crate) struct ExecService;

impl Service for ExecService {
    fn on_event(&self, bus: &mut Bus, event: &Event) {
        if let Event::Shutdown = event {
            bus.cancel_all_execs();
        }
    }

    fn on_sigchld(&self, bus: &mut Bus) {
        bus.reap_execs();
    }

    fn kill(&self, bus: &mut Bus, pid: Pid) -> bool {
        bus.kill_exec_pid(pid)
    }

    fn on_drop(&self, bus: &mut Bus) {
        bus.abort_execs();
    }
}

impl Bus {
    /// The programs this bus runs.
    fn exec_table(&mut self) -> &mut ExecTable {
        self.service_state::<ExecTable>()
    }

    /// Runs an external program; `done` gets its [`ExecOutput`] from the loop once it has
    /// exited (reaped) and both its pipes are at end of file. See the
    /// [module documentation](crate::exec) for what is promised.
    ///
    /// Returns once the program is running: after `fork`, the child's setup and `execve`
    /// (this waits for the child to reach `execve`, never for the program). Any error means
    /// the program did not run and `done` will not be called: the command is malformed, the
    /// user is unknown, or the child failed before `execve` ([`ExecError::Spawn`] with the
    /// stage and `errno`; the child never runs the program as the wrong user). Refused while
    /// the bus drains for shutdown; a shutdown cancels the programs still running and waits
    /// for their results.
    ///
    /// Works in a process with several threads too: the child runs async-signal-safe calls
    /// only.
    pub fn exec(
        &mut self,
        command: &Command,
        done: impl FnOnce(&mut Self, ExecOutput) + 'static,
    ) -> Result<ExecId, ExecError> {
        if self.is_stopping() {
            return Err(ExecError::ShuttingDown);
        }
        let started = self.now();
        let Started {
            pid,
            stdin,
            stdout,
            stderr,
        } = start(command, &[], Vec::new(), 3)?;
        let id = ExecId(self.exec_table().next);
        self.exec_table().next += 1;
        let mut entry = Running {
            pid,
            group: command.process_group,
            started,
            life: Life::Running,
            stdout: Pipe::default(),
            stderr: Pipe::default(),
            stdin: None,
            max_output: command.max_output,
            intervention: None,
            killed: false,
            truncated: false,
            pipes_held_open: false,
            stdin_unwritten: 0,
            cancel_signal: command.cancel_signal,
            kill_grace: command.kill_grace,
            pipe_grace: command.pipe_grace,
            timeout_timer: None,
            kill_timer: None,
            pipe_timer: None,
            done: Some(Box::new(done)),
        };
        let registered = self.register_exec_fds(id, &mut entry, command, stdin, stdout, stderr);
        if let Err(e) = registered {
            entry.signal(Signal::SIGKILL);
            reap_blocking(pid.nix());
            for fd in [entry.stdout.fd, entry.stderr.fd, entry.stdin.map(|f| f.fd)]
                .into_iter()
                .flatten()
            {
                drop(self.remove_fd(fd));
            }
            return Err(ExecError::Io(e));
        }
        if let Some(after) = command.timeout {
            entry.timeout_timer = Some(self.add_timer(after, move |bus| {
                bus.intervene(id, Intervention::Timeout);
            }));
        }
        tracing::debug!(%id, %pid, program = ?command.program, "exec started");
        self.exec_table().running.insert(id, entry);
        self.hold_process(pid);
        Ok(id)
    }

    fn register_exec_fds(
        &mut self,
        id: ExecId,
        entry: &mut Running,
        command: &Command,
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    ) -> io::Result<()> {
        for (fd, stream) in [(stdout, Stream::Stdout), (stderr, Stream::Stderr)] {
            if let Some(fd) = fd {
                let reg = self.add_fd(fd, Interest::READABLE, move |bus, ready| {
                    bus.exec_readable(id, stream, ready.fd);
                })?;
                entry.pipe(stream).fd = Some(reg);
            }
        }
        if let (Some(fd), Input::Bytes(data)) = (stdin, &command.stdin) {
            if data.is_empty() {
                // End of file at once.
                drop(fd);
            } else {
                let reg = self.add_fd(fd, Interest::WRITABLE, move |bus, ready| {
                    bus.exec_writable(id, ready.fd);
                })?;
                entry.stdin = Some(Feeder {
                    fd: reg,
                    data: data.clone(),
                    off: 0,
                });
            }
        }
        Ok(())
    }

    /// Cancels a program: sends its [cancel signal](Command::cancel_signal) (and `SIGCONT`),
    /// then `SIGKILL` after its [grace period](Command::kill_grace) if it is still running.
    /// Its result still comes to its callback, with [`Intervention::Cancelled`]. `false`
    /// when there is no such program or it has exited already.
    pub fn cancel_exec(&mut self, id: ExecId) -> bool {
        self.intervene(id, Intervention::Cancelled)
    }

    /// The process id of a program still running or awaiting its result.
    pub fn exec_pid(&self, id: ExecId) -> Option<Pid> {
        self.service_state_ref::<ExecTable>()?
            .running
            .get(&id)
            .map(|r| r.pid)
    }

    /// The programs running or awaiting their results.
    pub fn execs(&self) -> Vec<(ExecId, Pid)> {
        self.service_state_ref::<ExecTable>()
            .map(|t| t.running.iter().map(|(id, r)| (*id, r.pid)).collect())
            .unwrap_or_default()
    }

    fn intervene(&mut self, id: ExecId, why: Intervention) -> bool {
        let Some(r) = self.exec_table().running.get_mut(&id) else {
            return false;
        };
        if r.life != Life::Running {
            return false;
        }
        if r.intervention.is_none() {
            r.intervention = Some(why);
        }
        tracing::debug!(%id, pid = %r.pid, %why, "cancelling a program");
        r.signal(r.cancel_signal);
        r.signal(Signal::SIGCONT);
        if r.kill_timer.is_none() {
            let grace = r.kill_grace;
            let timer = self.add_timer(grace, move |bus| bus.kill_exec(id));
            if let Some(r) = self.exec_table().running.get_mut(&id) {
                r.kill_timer = Some(timer);
            }
        }
        true
    }

    fn kill_exec(&mut self, id: ExecId) {
        if let Some(r) = self.exec_table().running.get_mut(&id) {
            r.kill_timer = None;
            if r.life == Life::Running {
                tracing::debug!(%id, pid = %r.pid, "grace period over: SIGKILL");
                r.signal(Signal::SIGKILL);
                r.killed = true;
            }
        }
    }

    /// A graceful shutdown began: cancel every program still running.
    fn cancel_all_execs(&mut self) {
        let ids: Vec<ExecId> = self.exec_table().running.keys().copied().collect();
        for id in ids {
            self.intervene(id, Intervention::Cancelled);
        }
    }

    /// The drain deadline passed for the program with this pid: `SIGKILL` it; `false`
    /// when no program has this pid.
    fn kill_exec_pid(&mut self, pid: Pid) -> bool {
        let id = self
            .exec_table()
            .running
            .iter()
            .find(|(_, r)| r.pid == pid)
            .map(|(id, _)| *id);
        id.inspect(|id| self.kill_exec(*id)).is_some()
    }

    /// The bus is dropped: kill and reap every program still running (no callback runs).
    fn abort_execs(&mut self) {
        for (_, r) in std::mem::take(&mut self.exec_table().running) {
            if r.life == Life::Running {
                r.signal(Signal::SIGKILL);
                reap_blocking(r.pid.nix());
            }
        }
    }

    /// `SIGCHLD`: reaps the programs that exited (by pid, without `WUNTRACED`: a stopped
    /// program is still running).
    fn reap_execs(&mut self) {
        let ids: Vec<ExecId> = self
            .exec_table()
            .running
            .iter()
            .filter(|(_, r)| r.life == Life::Running)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(pid) = self.exec_table().running.get(&id).map(|r| r.pid) else {
                continue;
            };
            let life = loop {
                match waitpid(pid.nix(), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => break None,
                    Ok(status) => break crate::child::exit_of(status).map(Life::Exited),
                    Err(Errno::EINTR) => {}
                    Err(Errno::ECHILD) => {
                        tracing::warn!(%id, %pid, "a program was reaped by someone else: its exit is unknown");
                        break Some(Life::Vanished);
                    }
                    Err(e) => {
                        tracing::warn!(%id, %pid, error = %e, "cannot wait for a program");
                        break None;
                    }
                }
            };
            let Some(life) = life else { continue };
            let Some(r) = self.exec_table().running.get_mut(&id) else {
                continue;
            };
            r.life = life;
            tracing::debug!(%id, %pid, ?life, "program reaped");
            if r.pipes_open() {
                let grace = r.pipe_grace;
                let timer = self.add_timer(grace, move |bus| bus.pipes_expired(id));
                if let Some(r) = self.exec_table().running.get_mut(&id) {
                    r.pipe_timer = Some(timer);
                }
            }
            self.exec_check(id);
        }
    }

    fn pipes_expired(&mut self, id: ExecId) {
        let fds: Vec<(FdId, Stream)> = match self.exec_table().running.get_mut(&id) {
            Some(r) => {
                r.pipe_timer = None;
                [(r.stdout.fd, Stream::Stdout), (r.stderr.fd, Stream::Stderr)]
                    .into_iter()
                    .filter_map(|(fd, s)| fd.map(|fd| (fd, s)))
                    .collect()
            }
            None => return,
        };
        for (fd, stream) in fds {
            // Take what is there, then close.
            if let Some(raw) = self.fd(fd).map(|f| f.as_raw_fd()) {
                self.exec_readable(id, stream, raw);
            }
            if let Some(r) = self.exec_table().running.get_mut(&id) {
                if let Some(fd) = r.pipe(stream).fd.take() {
                    tracing::warn!(%id, %stream, "pipe held open after the exit: closed");
                    r.pipes_held_open = true;
                    r.truncated = true;
                    drop(self.remove_fd(fd));
                }
            }
        }
        self.exec_check(id);
    }

    fn exec_readable(&mut self, id: ExecId, stream: Stream, raw: RawFd) {
        let mut buf = std::mem::take(&mut self.exec_table().rbuf);
        buf.resize(READ_CHUNK, 0);
        // SAFETY: `raw` is the descriptor of a registration the bus owns (this is its
        // callback, or the registration was just looked up); it stays open until
        // `remove_fd` below, after the last use of `fd`.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let mut end = false;
        for _ in 0..MAX_READS {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => {
                    end = true;
                    break;
                }
                Ok(n) => {
                    self.exec_take(id, stream, buf.get(..n).unwrap_or_default());
                    if n < buf.len() {
                        break;
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(%id, %stream, error = %e, "cannot read a program's output");
                    if let Some(r) = self.exec_table().running.get_mut(&id) {
                        r.truncated = true;
                    }
                    end = true;
                    break;
                }
            }
        }
        self.exec_table().rbuf = buf;
        if end {
            let reg = self
                .exec_table()
                .running
                .get_mut(&id)
                .and_then(|r| r.pipe(stream).fd.take());
            if let Some(reg) = reg {
                drop(self.remove_fd(reg));
            }
            self.exec_check(id);
        }
    }

    /// Keeps output up to the bound; past it, kills the program and discards the rest.
    fn exec_take(&mut self, id: ExecId, stream: Stream, bytes: &[u8]) {
        let Some(r) = self.exec_table().running.get_mut(&id) else {
            return;
        };
        let limit = r.max_output;
        let pipe = r.pipe(stream);
        let room = limit.saturating_sub(pipe.bytes.len());
        let keep = bytes.get(..room.min(bytes.len())).unwrap_or_default();
        pipe.bytes.extend_from_slice(keep);
        if keep.len() < bytes.len() && !r.truncated {
            r.truncated = true;
            if r.intervention.is_none() {
                r.intervention = Some(Intervention::OutputLimit { stream, limit });
            }
            tracing::warn!(%id, pid = %r.pid, %stream, limit, "output bound passed: killing the program");
            if r.life == Life::Running {
                r.signal(Signal::SIGKILL);
                r.killed = true;
            }
        }
    }

    fn exec_writable(&mut self, id: ExecId, raw: RawFd) {
        let Some(feeder) = self
            .exec_table()
            .running
            .get_mut(&id)
            .and_then(|r| r.stdin.as_mut())
        else {
            return;
        };
        // SAFETY: as in `exec_readable`: the bus owns this registration's descriptor until
        // `remove_fd` below.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let mut finished = false;
        loop {
            let rest = feeder.data.get(feeder.off..).unwrap_or_default();
            if rest.is_empty() {
                finished = true;
                break;
            }
            match write_pipe(fd, rest) {
                Ok(n) => feeder.off += n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    if e != Errno::EPIPE {
                        tracing::warn!(%id, error = %e, "cannot write a program's input");
                    }
                    finished = true;
                    break;
                }
            }
        }
        if finished {
            let Some(r) = self.exec_table().running.get_mut(&id) else {
                return;
            };
            if let Some(feeder) = r.stdin.take() {
                r.stdin_unwritten = feeder.data.len().saturating_sub(feeder.off);
                drop(self.remove_fd(feeder.fd));
            }
        }
    }

    /// Delivers the result once the exit is known and both pipes are closed.
    fn exec_check(&mut self, id: ExecId) {
        let ready = self
            .exec_table()
            .running
            .get(&id)
            .is_some_and(|r| r.life != Life::Running && !r.pipes_open());
        if !ready {
            return;
        }
        let Some(mut r) = self.exec_table().running.remove(&id) else {
            return;
        };
        self.release_process(r.pid);
        for timer in [r.timeout_timer, r.kill_timer, r.pipe_timer]
            .into_iter()
            .flatten()
        {
            self.cancel_timer(timer);
        }
        if let Some(feeder) = r.stdin.take() {
            r.stdin_unwritten = feeder.data.len().saturating_sub(feeder.off);
            drop(self.remove_fd(feeder.fd));
        }
        let now = self.now();
        let output = ExecOutput {
            id,
            pid: r.pid,
            status: match r.life {
                Life::Exited(s) => Some(s),
                _ => None,
            },
            stdout: std::mem::take(&mut r.stdout.bytes),
            stderr: std::mem::take(&mut r.stderr.bytes),
            duration: now.saturating_duration_since(r.started),
            intervention: r.intervention,
            killed: r.killed,
            truncated: r.truncated,
            pipes_held_open: r.pipes_held_open,
            stdin_unwritten: r.stdin_unwritten,
        };
        tracing::debug!(%id, pid = %r.pid, status = ?output.status, "exec done");
        if let Some(done) = r.done.take() {
            // From a timer: at the loop's top level, under catch_unwind.
            self.add_timer(Duration::ZERO, move |bus| done(bus, output));
        }
    }
}

/// Writes to a pipe without dying of `SIGPIPE` when the reader is gone: unless `SIGPIPE` is
/// ignored already (as Rust programs do at start-up), it is blocked for the write and a
/// `SIGPIPE` the write raised is taken off the pending set.
fn write_pipe(fd: BorrowedFd<'_>, bytes: &[u8]) -> Result<usize, Errno> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    if sigpipe_ignored() {
        return nix::unistd::write(fd, bytes);
    }
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&pipe), Some(&mut old))?;
    // SAFETY: sigpending fills a local sigset_t; sigismember reads it.
    let was_pending = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set) == 0 && libc::sigismember(&set, libc::SIGPIPE) == 1
    };
    let result = nix::unistd::write(fd, bytes);
    if result == Err(Errno::EPIPE) && !was_pending && !old.contains(Signal::SIGPIPE) {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: sigtimedwait reads a live sigset and timespec; the signal is blocked, so
        // this only takes the SIGPIPE this write raised off the pending set.
        unsafe { libc::sigtimedwait(pipe.as_ref(), std::ptr::null_mut(), &zero) };
    }
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    result
}

fn sigpipe_ignored() -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}
