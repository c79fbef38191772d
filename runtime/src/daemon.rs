//! Becoming a daemon properly: double fork with `setsid` between, `chdir`, `umask`, standard
//! streams to `/dev/null` or a log file, an optional pid file, and a report back to the
//! process that asked.
//!
//! ```text
//!  original ──fork──► intermediate ──setsid, fork──► daemon
//!     │                   │ _exit(0) at once              │ chdir, umask, stdio, pid file
//!     │ reaps it          ▼                               │ writes "ready, pid" or the error
//!     │◄────────────── report pipe (close-on-exec) ──────┘ to the pipe, closes it
//!     ▼
//!  returns Daemonized::Original { daemon_pid }  or  Err(the daemon's error)
//! ```
//!
//! **Which process returns:** [`daemonize`] returns twice, like `fork`: in the original
//! process with [`Daemonized::Original`] (only after the daemon reported that it is ready;
//! the original usually exits then), and in the daemon with [`Daemonized::Daemon`]. The
//! intermediate process never returns: it `_exit`s. When the daemon fails to set itself up,
//! it reports the error and `_exit`s, and the original gets `Err` with that error; when it
//! dies without a word, the original gets [`DaemonError::NoReport`]. So "started" is never
//! guessed.
//!
//! The daemon is in a new session whose leader (the intermediate) is gone: it has no
//! controlling terminal and, not being a session leader, can never acquire one by opening a
//! terminal. Its session id is therefore the intermediate's pid, not its own. It is
//! re-parented to the nearest subreaper or to init.
//!
//! Forking a process with several threads is unsafe (only async-signal-safe calls are
//! allowed in the child), so `daemonize` refuses unless `/proc/self/task` lists one thread.
//! Call it first thing in `main`. Buffered standard output is flushed before forking so no
//! line is written twice.
//!
//! # The pid file
//!
//! [`PidFile::create`] writes the pid into a temporary file in the same directory and
//! `link`s it to the pid file's name, so the pid file appears atomically, whole, and only if
//! no file of that name exists. If one exists, it is locked (`flock`, held only while it is
//! examined), checked to still be the file at that name, and its pid probed with
//! `kill(pid, 0)`: a live process (or `EPERM`: alive, someone else's) is
//! [`DaemonError::PidFileHeld`]; a dead one, unreadable contents or this very pid (a stale
//! file from an earlier process that had the same pid) mean the file is stale, and it is
//! replaced. The guard removes the file when dropped in the process that created it, and
//! only if the name still refers to its file. A process killed by `SIGKILL` (or ended by
//! `std::process::exit`, which runs no destructors) leaves its pid file behind; the next
//! start finds the pid dead and takes it over. A pid reused by an unrelated live process
//! makes the file look held: remove it by hand then.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::{fmt, fs};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::libc;
use nix::sys::signal::kill;
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid};

/// Where the daemon's standard output and error go (its standard input is always
/// `/dev/null`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DaemonStdio {
    /// `/dev/null`.
    #[default]
    DevNull,
    /// This file, created if absent (mode 0640 less the umask) and appended to.
    LogFile(PathBuf),
}

/// How to [`daemonize`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The daemon's working directory (default `/`, so it holds no mount busy).
    pub chdir: PathBuf,
    /// The daemon's file mode creation mask (default `0o022`).
    pub umask: u32,
    /// Where standard output and error go.
    pub stdio: DaemonStdio,
    /// A pid file to create with the daemon's pid (none by default).
    pub pid_file: Option<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            chdir: PathBuf::from("/"),
            umask: 0o022,
            stdio: DaemonStdio::DevNull,
            pid_file: None,
        }
    }
}

impl DaemonConfig {
    /// The defaults: `/`, `0o022`, `/dev/null`, no pid file.
    pub fn new() -> Self {
        Self::default()
    }

    /// The working directory.
    #[must_use]
    pub fn chdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.chdir = dir.into();
        self
    }

    /// The umask.
    #[must_use]
    pub fn umask(mut self, umask: u32) -> Self {
        self.umask = umask;
        self
    }

    /// Standard output and error appended to this file.
    #[must_use]
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.stdio = DaemonStdio::LogFile(path.into());
        self
    }

    /// A pid file.
    #[must_use]
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }
}

/// The step of daemonizing at which an OS call failed, in [`DaemonError::Os`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonStage {
    /// Making paths absolute against the original working directory.
    ResolvePath,
    /// Opening `/dev/null` or the log file (in the original process).
    OpenStdio,
    /// Creating the report pipe.
    ReportPipe,
    /// The first or second `fork`.
    Fork,
    /// `setsid` in the intermediate process.
    Setsid,
    /// `chdir` in the daemon.
    Chdir,
    /// `dup2` of the standard streams in the daemon.
    Redirect,
    /// Creating, reading, locking or linking the pid file.
    PidFile,
    /// Reading the daemon's report in the original process.
    Report,
}

impl DaemonStage {
    fn code(self) -> u8 {
        match self {
            Self::ResolvePath => 1,
            Self::OpenStdio => 2,
            Self::ReportPipe => 3,
            Self::Fork => 4,
            Self::Setsid => 5,
            Self::Chdir => 6,
            Self::Redirect => 7,
            Self::PidFile => 8,
            Self::Report => 9,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::ResolvePath,
            2 => Self::OpenStdio,
            3 => Self::ReportPipe,
            4 => Self::Fork,
            5 => Self::Setsid,
            6 => Self::Chdir,
            7 => Self::Redirect,
            8 => Self::PidFile,
            9 => Self::Report,
            _ => return None,
        })
    }
}

impl fmt::Display for DaemonStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ResolvePath => "making the paths absolute",
            Self::OpenStdio => "opening /dev/null or the log file",
            Self::ReportPipe => "creating the report pipe",
            Self::Fork => "forking",
            Self::Setsid => "starting a session",
            Self::Chdir => "changing directory",
            Self::Redirect => "redirecting the standard streams",
            Self::PidFile => "taking the pid file",
            Self::Report => "reading the daemon's report",
        })
    }
}

/// What went wrong while daemonizing or with a pid file.
#[non_exhaustive]
#[derive(Debug)]
pub enum DaemonError {
    /// The process has more than one thread; forking it is unsafe.
    MultiThreaded {
        /// How many threads it has.
        n_threads: usize,
    },
    /// Counting the threads (`/proc/self/task`) failed.
    ThreadCount(io::Error),
    /// An OS call failed (in whichever process reached that stage).
    Os {
        /// The step.
        stage: DaemonStage,
        /// The OS error.
        source: io::Error,
    },
    /// The pid file names a live process.
    PidFileHeld {
        /// The pid file.
        path: PathBuf,
        /// The live pid it holds.
        pid: i32,
    },
    /// Replacing a stale pid file kept losing races with other starters.
    PidFileContended(PathBuf),
    /// The daemon (or the intermediate process) ended without reporting success or failure.
    NoReport,
    /// The report from the daemon was malformed.
    BadReport,
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MultiThreaded { n_threads } => {
                write!(
                    f,
                    "refusing to daemonize a process with {n_threads} threads"
                )
            }
            Self::ThreadCount(e) => write!(f, "counting threads failed: {e}"),
            Self::Os { stage, source } => write!(f, "daemonize failed {stage}: {source}"),
            Self::PidFileHeld { path, pid } => {
                write!(
                    f,
                    "pid file {} is held by running process {pid}",
                    path.display()
                )
            }
            Self::PidFileContended(path) => {
                write!(
                    f,
                    "pid file {} kept changing while being taken over",
                    path.display()
                )
            }
            Self::NoReport => f.write_str("the daemon ended without reporting whether it started"),
            Self::BadReport => f.write_str("the daemon's start-up report was malformed"),
        }
    }
}

impl std::error::Error for DaemonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::ThreadCount(e) | Self::Os { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

impl From<DaemonError> for io::Error {
    fn from(e: DaemonError) -> Self {
        match e {
            DaemonError::Os { source, .. } | DaemonError::ThreadCount(source) => source,
            DaemonError::PidFileHeld { .. } | DaemonError::PidFileContended(_) => {
                Self::new(io::ErrorKind::AlreadyExists, e)
            }
            _ => Self::other(e),
        }
    }
}

fn os(stage: DaemonStage) -> impl Fn(io::Error) -> DaemonError {
    move |source| DaemonError::Os { stage, source }
}

fn errno(stage: DaemonStage) -> impl Fn(Errno) -> DaemonError {
    move |e| DaemonError::Os {
        stage,
        source: io::Error::from(e),
    }
}

/// Which side of [`daemonize`] returned.
#[must_use]
#[derive(Debug)]
pub enum Daemonized {
    /// In the original process: the daemon is running and ready.
    Original {
        /// The daemon's pid.
        daemon_pid: i32,
    },
    /// In the daemon. Keep the guard for the daemon's life: dropping it removes the pid file.
    Daemon(DaemonGuard),
}

/// Held by the daemon for its life; removes the pid file (if any) when dropped.
#[must_use = "dropping the guard removes the pid file"]
#[derive(Debug)]
pub struct DaemonGuard {
    pid_file: Option<PidFile>,
}

impl DaemonGuard {
    /// The pid file, if one was asked for.
    pub fn pid_file(&self) -> Option<&PidFile> {
        self.pid_file.as_ref()
    }
}

/// Turns the calling process into a daemon. See the [module documentation](self) for the
/// steps, which process returns what, and the pid file.
pub fn daemonize(config: DaemonConfig) -> Result<Daemonized, DaemonError> {
    let n_threads =
        crate::identity::thread_count().map_err(|e| DaemonError::ThreadCount(e.into()))?;
    if n_threads != 1 {
        return Err(DaemonError::MultiThreaded { n_threads });
    }
    // Everything that can be decided or opened here is, so relative paths mean what the
    // caller meant and errors come back directly.
    let chdir = std::path::absolute(&config.chdir).map_err(os(DaemonStage::ResolvePath))?;
    let pid_path = match &config.pid_file {
        Some(p) => Some(std::path::absolute(p).map_err(os(DaemonStage::ResolvePath))?),
        None => None,
    };
    let null: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(os(DaemonStage::OpenStdio))?
        .into();
    let log: Option<OwnedFd> = match &config.stdio {
        DaemonStdio::DevNull => None,
        DaemonStdio::LogFile(path) => Some(
            OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(path)
                .map_err(os(DaemonStage::OpenStdio))?
                .into(),
        ),
    };
    let (report_rx, report_tx) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(errno(DaemonStage::ReportPipe))?;
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();

    // SAFETY: the process has one thread (checked above), so the child may do anything.
    match unsafe { nix::unistd::fork() }.map_err(errno(DaemonStage::Fork))? {
        ForkResult::Parent { child } => {
            drop(report_tx);
            let report = read_report(report_rx, pid_path.as_deref());
            // The intermediate exits at once; reap it so it leaves no zombie.
            while let Err(Errno::EINTR) = waitpid(child, None) {}
            report
        }
        ForkResult::Child => {
            drop(report_rx);
            let report = File::from(report_tx);
            intermediate(report, &chdir, config.umask, null, log, pid_path)
        }
    }
}

/// In the intermediate process: new session, second fork, exit. Returns only in the daemon.
fn intermediate(
    report: File,
    chdir: &Path,
    umask: u32,
    null: OwnedFd,
    log: Option<OwnedFd>,
    pid_path: Option<PathBuf>,
) -> Result<Daemonized, DaemonError> {
    if let Err(e) = nix::unistd::setsid() {
        fail(report, DaemonStage::Setsid, e as i32, 0);
    }
    // SAFETY: this process is a fork of a single-threaded one, so it has one thread.
    match unsafe { nix::unistd::fork() } {
        Err(e) => fail(report, DaemonStage::Fork, e as i32, 0),
        Ok(ForkResult::Parent { .. }) => {
            // SAFETY: _exit ends the process without running anything of the parent's (no
            // atexit handlers, no destructors, no buffered output written twice).
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Child) => daemon_setup(report, chdir, umask, null, log, pid_path),
    }
}

/// In the daemon: directory, mask, streams, pid file, report. Returns only on success.
fn daemon_setup(
    mut report: File,
    chdir: &Path,
    umask: u32,
    null: OwnedFd,
    log: Option<OwnedFd>,
    pid_path: Option<PathBuf>,
) -> Result<Daemonized, DaemonError> {
    if let Err(e) = std::env::set_current_dir(chdir) {
        fail(report, DaemonStage::Chdir, e.raw_os_error().unwrap_or(0), 0);
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(umask as libc::mode_t));
    let out = log.as_ref().unwrap_or(&null);
    for (src, dst) in [(&null, 0), (out, 1), (out, 2)] {
        let rc = if src.as_raw_fd() == dst {
            // Already in place (a standard descriptor was closed when it was opened):
            // dup2 would do nothing, so clear close-on-exec by hand.
            // SAFETY: F_SETFD on an open descriptor of ours changes only its flags.
            unsafe { libc::fcntl(dst, libc::F_SETFD, 0) }
        } else {
            // SAFETY: dup2 onto the standard descriptors, which Rust's std treats as always
            // open; they stay open (now on /dev/null or the log) and close-on-exec is clear
            // on the copies, as a daemon's children should inherit them.
            unsafe { libc::dup2(src.as_raw_fd(), dst) }
        };
        if rc < 0 {
            fail(report, DaemonStage::Redirect, Errno::last_raw(), 0);
        }
    }
    // Close the originals, unless one of them is itself a standard descriptor now.
    for fd in std::iter::once(null).chain(log) {
        if fd.as_raw_fd() <= 2 {
            let _ = fd.into_raw_fd();
        }
    }
    let pid_file = match pid_path {
        None => None,
        Some(path) => match PidFile::create(&path) {
            Ok(p) => Some(p),
            Err(DaemonError::PidFileHeld { pid, .. }) => fail(report, DaemonStage::PidFile, 0, pid),
            Err(DaemonError::PidFileContended(_)) => fail(report, DaemonStage::PidFile, -1, 0),
            Err(DaemonError::Os { source, .. }) => fail(
                report,
                DaemonStage::PidFile,
                source.raw_os_error().unwrap_or(0),
                0,
            ),
            Err(_) => fail(report, DaemonStage::PidFile, 0, -1),
        },
    };
    let pid = nix::unistd::getpid().as_raw();
    // If the original is gone, nobody is waiting: carry on as a daemon anyway.
    let _ = report.write_all(&encode_report(Report::Ready { pid }));
    drop(report);
    Ok(Daemonized::Daemon(DaemonGuard { pid_file }))
}

/// Reports a failure to the original and ends this process (intermediate or daemon).
fn fail(mut report: File, stage: DaemonStage, errno: i32, pid: i32) -> ! {
    let _ = report.write_all(&encode_report(Report::Failed { stage, errno, pid }));
    drop(report);
    // SAFETY: as in `intermediate`: end this forked process without running the original's
    // exit-time code.
    unsafe { libc::_exit(1) }
}

/// What the daemon tells the original, 10 bytes on the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    /// Set up; this is the daemon's pid.
    Ready { pid: i32 },
    /// Failed at `stage` with `errno`; for a held pid file, errno 0 and the holder's `pid`;
    /// errno -1 for a contended pid file; pid -1 for anything else.
    Failed {
        stage: DaemonStage,
        errno: i32,
        pid: i32,
    },
}

const REPORT_LEN: usize = 10;

fn encode_report(report: Report) -> [u8; REPORT_LEN] {
    let mut out = [0_u8; REPORT_LEN];
    let (tag, stage, errno, pid) = match report {
        Report::Ready { pid } => (b'R', 0, 0, pid),
        Report::Failed { stage, errno, pid } => (b'F', stage.code(), errno, pid),
    };
    out[0] = tag;
    out[1] = stage;
    out[2..6].copy_from_slice(&errno.to_le_bytes());
    out[6..10].copy_from_slice(&pid.to_le_bytes());
    out
}

fn decode_report(bytes: &[u8]) -> Option<Report> {
    if bytes.len() != REPORT_LEN {
        return None;
    }
    let errno = i32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
    let pid = i32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
    match bytes[0] {
        b'R' if pid > 0 => Some(Report::Ready { pid }),
        b'F' => Some(Report::Failed {
            stage: DaemonStage::from_code(bytes[1])?,
            errno,
            pid,
        }),
        _ => None,
    }
}

/// The daemon's report; `pid_path` is the pid file it was to take, if any.
fn read_report(rx: OwnedFd, pid_path: Option<&Path>) -> Result<Daemonized, DaemonError> {
    let mut buf = Vec::with_capacity(REPORT_LEN);
    // read_to_end retries EINTR and stops at EOF: when the daemon and the intermediate have
    // both closed their ends (by reporting, by exiting or by dying).
    File::from(rx)
        .take(64)
        .read_to_end(&mut buf)
        .map_err(os(DaemonStage::Report))?;
    if buf.is_empty() {
        return Err(DaemonError::NoReport);
    }
    match decode_report(&buf).ok_or(DaemonError::BadReport)? {
        Report::Ready { pid } => Ok(Daemonized::Original { daemon_pid: pid }),
        // A pid file refused without a pid file to take is no report the daemon writes.
        Report::Failed {
            stage: DaemonStage::PidFile,
            errno: 0,
            pid,
        } if pid > 0 => {
            Err(
                pid_path.map_or(DaemonError::BadReport, |path| DaemonError::PidFileHeld {
                    path: path.to_owned(),
                    pid,
                }),
            )
        }
        Report::Failed {
            stage: DaemonStage::PidFile,
            errno: -1,
            ..
        } => Err(pid_path.map_or(DaemonError::BadReport, |path| {
            DaemonError::PidFileContended(path.to_owned())
        })),
        Report::Failed { errno: 0, .. } => Err(DaemonError::BadReport),
        Report::Failed { stage, errno, .. } => Err(DaemonError::Os {
            stage,
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Pid files
// ---------------------------------------------------------------------------------------

/// Pid files this process holds (path and pid: a forked child is not their holder).
static HELD: Mutex<Vec<(PathBuf, i32)>> = Mutex::new(Vec::new());

/// A pid file holding this process's pid, removed when dropped in this process.
#[must_use = "dropping the pid file removes it"]
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: i32,
    dev: u64,
    ino: u64,
}

impl PidFile {
    /// Creates `path` holding this process's pid, or takes over a stale one; refuses with
    /// [`DaemonError::PidFileHeld`] when it names a live process. See the
    /// [module documentation](self).
    pub fn create(path: impl AsRef<Path>) -> Result<Self, DaemonError> {
        let path = std::path::absolute(path.as_ref()).map_err(os(DaemonStage::ResolvePath))?;
        let pid = nix::unistd::getpid().as_raw();
        let held_here = HELD
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .any(|(p, owner)| *p == path && *owner == pid);
        if held_here {
            return Err(DaemonError::PidFileHeld { path, pid });
        }
        let tmp = temp_name(&path, pid);
        let _ = fs::remove_file(&tmp);
        let written = write_temp(&tmp, pid);
        let result = written.and_then(|(dev, ino)| {
            publish(&path, &tmp, pid)?;
            Ok(Self {
                path: path.clone(),
                pid,
                dev,
                ino,
            })
        });
        let _ = fs::remove_file(&tmp);
        let this = result?;
        HELD.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((this.path.clone(), pid));
        Ok(this)
    }

    /// The pid file's absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pid it holds.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Removes the file now (if it is still ours); `Ok(false)` when the name no longer
    /// refers to our file, which is then left alone.
    pub fn remove(mut self) -> Result<bool, DaemonError> {
        let removed = self.remove_if_ours();
        self.pid = 0; // Drop does nothing more.
        removed
    }

    fn remove_if_ours(&mut self) -> Result<bool, DaemonError> {
        if self.pid != nix::unistd::getpid().as_raw() {
            return Ok(false);
        }
        HELD.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|(p, owner)| !(*p == self.path && *owner == self.pid));
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(os(DaemonStage::PidFile)(e)),
        };
        let locked = lock_file(file)?;
        let meta = fs::metadata(&self.path);
        let ours = meta.is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            fs::remove_file(&self.path).map_err(os(DaemonStage::PidFile))?;
        }
        drop(locked);
        Ok(ours)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = self.remove_if_ours();
    }
}

fn temp_name(path: &Path, pid: i32) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{pid}.tmp"));
    path.with_file_name(name)
}

/// Writes `pid` into a fresh temporary file; returns its device and inode.
fn write_temp(tmp: &Path, pid: i32) -> Result<(u64, u64), DaemonError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(tmp)
        .map_err(os(DaemonStage::PidFile))?;
    f.write_all(format!("{pid}\n").as_bytes())
        .map_err(os(DaemonStage::PidFile))?;
    let meta = f.metadata().map_err(os(DaemonStage::PidFile))?;
    Ok((meta.dev(), meta.ino()))
}

fn lock_file(file: File) -> Result<Flock<File>, DaemonError> {
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(locked) => return Ok(locked),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(errno(DaemonStage::PidFile)(e)),
        }
    }
}

/// Links the temporary file to `path`, taking over a stale file in the way.
fn publish(path: &Path, tmp: &Path, pid: i32) -> Result<(), DaemonError> {
    const ATTEMPTS: usize = 16;
    for _ in 0..ATTEMPTS {
        match fs::hard_link(tmp, path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(os(DaemonStage::PidFile)(e)),
        }
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(os(DaemonStage::PidFile)(e)),
        };
        let mut locked = lock_file(file)?;
        // Still the file at that name? (A starter that took it over replaced it.)
        let here = locked.metadata().map_err(os(DaemonStage::PidFile))?;
        match fs::metadata(path) {
            Ok(m) if m.dev() == here.dev() && m.ino() == here.ino() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(os(DaemonStage::PidFile)(e)),
        }
        let mut text = String::new();
        let holder = match locked.read_to_string(&mut text) {
            Ok(_) => parse_pid(&text),
            Err(_) => None,
        };
        if let Some(holder) = holder {
            if holder != pid && is_alive(holder) {
                return Err(DaemonError::PidFileHeld {
                    path: path.to_owned(),
                    pid: holder,
                });
            }
        }
        // Stale: remove it while holding its lock, then try to link again.
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(os(DaemonStage::PidFile)(e)),
        }
        drop(locked);
    }
    Err(DaemonError::PidFileContended(path.to_owned()))
}

/// The pid in a pid file's text: one positive decimal number, surrounding whitespace allowed.
fn parse_pid(text: &str) -> Option<i32> {
    text.trim().parse::<i32>().ok().filter(|p| *p > 0)
}

/// Whether a process with this pid exists (`EPERM`: it does, and is someone else's).
fn is_alive(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == Errno::EPERM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        for r in [
            Report::Ready { pid: 4242 },
            Report::Failed {
                stage: DaemonStage::Chdir,
                errno: libc::ENOENT,
                pid: 0,
            },
            Report::Failed {
                stage: DaemonStage::PidFile,
                errno: 0,
                pid: 77,
            },
        ] {
            assert_eq!(decode_report(&encode_report(r)), Some(r));
        }
        assert_eq!(decode_report(b"R"), None);
        assert_eq!(
            decode_report(&[b'R', 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            None,
            "pid 0 is no daemon"
        );
        assert_eq!(
            decode_report(&[b'F', 200, 0, 0, 0, 0, 0, 0, 0, 0]),
            None,
            "unknown stage"
        );
        assert_eq!(decode_report(&[b'X'; REPORT_LEN]), None);
    }

    #[test]
    fn stages_have_distinct_codes() {
        let all = [
            DaemonStage::ResolvePath,
            DaemonStage::OpenStdio,
            DaemonStage::ReportPipe,
            DaemonStage::Fork,
            DaemonStage::Setsid,
            DaemonStage::Chdir,
            DaemonStage::Redirect,
            DaemonStage::PidFile,
            DaemonStage::Report,
        ];
        for s in all {
            assert_eq!(DaemonStage::from_code(s.code()), Some(s));
        }
        assert_eq!(DaemonStage::from_code(0), None);
    }

    #[test]
    fn pid_text_is_parsed_strictly() {
        assert_eq!(parse_pid("123\n"), Some(123));
        assert_eq!(parse_pid("  9 "), Some(9));
        assert_eq!(parse_pid(""), None);
        assert_eq!(parse_pid("0"), None);
        assert_eq!(parse_pid("-5"), None);
        assert_eq!(parse_pid("12abc"), None);
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("forkbus-pidfile-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::create_dir_all(&dir);
        dir
    }

    #[test]
    fn pid_files_are_exclusive_taken_over_when_stale_and_removed_on_drop() -> Result<(), DaemonError>
    {
        let dir = scratch_dir("cycle");
        let path = dir.join("x.pid");
        let me = std::process::id() as i32;
        let file = PidFile::create(&path)?;
        assert_eq!(
            fs::read_to_string(&path).ok().as_deref(),
            Some(format!("{me}\n").as_str())
        );
        // This process holds it already.
        assert!(
            matches!(PidFile::create(&path), Err(DaemonError::PidFileHeld { pid, .. }) if pid == me)
        );
        drop(file);
        assert!(!path.exists());
        // A live process other than us: pid 1 always exists.
        fs::write(&path, "1\n").map_err(os(DaemonStage::PidFile))?;
        assert!(matches!(
            PidFile::create(&path),
            Err(DaemonError::PidFileHeld { pid: 1, .. })
        ));
        // Garbage and our own (stale) pid are taken over.
        fs::write(&path, "not a pid").map_err(os(DaemonStage::PidFile))?;
        let file = PidFile::create(&path)?;
        assert_eq!(file.pid(), me);
        assert!(file.remove()?);
        fs::write(&path, format!("{me}\n")).map_err(os(DaemonStage::PidFile))?;
        let file = PidFile::create(&path)?;
        // Someone replaced the file: ours is no longer at the name and is left alone.
        fs::remove_file(&path).map_err(os(DaemonStage::PidFile))?;
        fs::write(&path, "1\n").map_err(os(DaemonStage::PidFile))?;
        assert!(!file.remove()?);
        assert!(path.exists());
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .map_err(os(DaemonStage::PidFile))?
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }
}
