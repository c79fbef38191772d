//! Starting a program: the preparation before `fork` (every check, and every C string
//! `execve` needs, built in the parent by [`prepare`]), then `fork` and the child's code up to
//! `execve` ([`child_main`]: async-signal-safe calls only, on that memory, nothing
//! allocated), and the close-on-exec report pipe through which the child tells the parent
//! the [`SpawnStage`] it failed at. [`start`] is the entry, for [`Bus::exec`] and
//! [`Bus::exec_node`]; it returns once the child reached `execve`.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use nix::libc::{self, c_char};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;

#[cfg(doc)]
use crate::bus::Bus;
use crate::child::Pid;
use crate::identity::{CredentialCall, Credentials, IdentityError};

use super::{
    Command, ExecError, Identity, Input, InvalidCommand, Output, Part, SpawnStage,
    EXIT_SPAWN_FAILED, MAX_CHILD_GROUPS,
};

/// How long [`Bus::exec`] waits at most for the child to reach `execve`.
const SPAWN_WAIT: Duration = Duration::from_secs(30);
/// Descriptors handed to the child are moved to this number or above before `fork`, so
/// that no `dup2` onto 0..=3 overwrites another one still to be copied.
const LOW_FD: RawFd = 10;
/// The length of the child's failure report: stage (u32) and errno (i32), little-endian.
const REPORT_LEN: usize = 8;
/// `close_range` flag: mark close-on-exec instead of closing (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// Without `close_range`, descriptors below this are marked close-on-exec one by one.
const FALLBACK_FD_LIMIT: libc::c_int = 65_536;

// ---------------------------------------------------------------------------------------
// Preparing (pure)

/// Everything `execve` needs, as C strings, built before `fork`.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The paths to try in order (one when the program has a `/`).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
    creds: Option<Credentials>,
}

fn c_string(bytes: &OsStr, part: Part) -> Result<CString, ExecError> {
    CString::new(bytes.as_bytes()).map_err(|_| ExecError::Invalid(InvalidCommand::Nul(part)))
}

/// The program's environment: this process's (`base`) unless cleared, then the command's
/// sets and removals in order, then `extra` (which wins). Sorted by name.
pub(crate) fn build_env(
    base: impl IntoIterator<Item = (OsString, OsString)>,
    clear: bool,
    ops: &[(OsString, Option<OsString>)],
    extra: &[(OsString, OsString)],
) -> Result<Vec<CString>, ExecError> {
    let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
    if !clear {
        env.extend(base);
    }
    let check = |name: &OsStr| {
        let b = name.as_bytes();
        if b.is_empty() || b.contains(&b'=') {
            Err(ExecError::Invalid(InvalidCommand::EnvName(
                name.to_string_lossy().into_owned(),
            )))
        } else {
            Ok(())
        }
    };
    for (name, value) in ops {
        check(name)?;
        match value {
            Some(v) => env.insert(name.clone(), v.clone()),
            None => env.remove(name),
        };
    }
    for (name, value) in extra {
        check(name)?;
        env.insert(name.clone(), value.clone());
    }
    env.into_iter()
        .map(|(name, value)| {
            let mut entry = name.clone().into_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            CString::new(entry).map_err(|_| {
                ExecError::Invalid(InvalidCommand::Nul(Part::Env(
                    name.to_string_lossy().into_owned(),
                )))
            })
        })
        .collect()
}

/// The paths `execvp` would try for `program`: itself when it holds a `/`, else each
/// directory of `path` in order (an empty entry is the working directory).
pub(crate) fn candidates(program: &OsStr, path: Option<&OsStr>) -> Vec<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return vec![PathBuf::from(program)];
    }
    let path = path.unwrap_or_else(|| OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    path.as_bytes()
        .split(|b| *b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
            PathBuf::from(OsStr::from_bytes(dir)).join(program)
        })
        .collect()
}

/// Checks and converts a command for `execve`, with `extra` environment variables.
pub(crate) fn prepare(
    command: &Command,
    extra_env: &[(OsString, OsString)],
) -> Result<Prepared, ExecError> {
    if command.program.is_empty() {
        return Err(ExecError::Invalid(InvalidCommand::EmptyProgram));
    }
    c_string(&command.program, Part::Program)?;
    let arg0 = match &command.arg0 {
        Some(a) => c_string(a, Part::Arg0)?,
        None => c_string(&command.program, Part::Program)?,
    };
    let mut argv = vec![arg0];
    for (i, a) in command.args.iter().enumerate() {
        argv.push(c_string(a, Part::Arg(i))?);
    }
    let envp = build_env(
        std::env::vars_os(),
        command.env_clear,
        &command.env,
        extra_env,
    )?;
    // The child's PATH when its environment has one (as std::process does), else ours.
    let child_path = envp
        .iter()
        .find_map(|e| e.as_bytes().strip_prefix(b"PATH="))
        .map(|p| OsStr::from_bytes(p).to_owned());
    let path = child_path.or_else(|| std::env::var_os("PATH"));
    let candidates = candidates(&command.program, path.as_deref())
        .into_iter()
        .map(|p| c_string(p.as_os_str(), Part::Program))
        .collect::<Result<Vec<_>, _>>()?;
    if candidates.is_empty() {
        return Err(ExecError::Invalid(InvalidCommand::NoPath));
    }
    let cwd = match &command.cwd {
        Some(d) => Some(c_string(d.as_os_str(), Part::Dir)?),
        None => None,
    };
    let creds = match &command.identity {
        Identity::Inherit => None,
        Identity::Drop(drop) => Some(drop.resolve().map_err(ExecError::Identity)?),
        Identity::Exact(c) => Some(c.clone()),
    };
    if let Some(c) = &creds {
        if c.groups().len() > MAX_CHILD_GROUPS {
            return Err(ExecError::Invalid(InvalidCommand::TooManyGroups {
                n_groups: c.groups().len(),
            }));
        }
    }
    Ok(Prepared {
        candidates,
        argv,
        envp,
        cwd,
        creds,
    })
}

fn encode_report(stage: SpawnStage, errno: i32) -> [u8; REPORT_LEN] {
    let mut out = [0; REPORT_LEN];
    let (s, e) = out.split_at_mut(4);
    s.copy_from_slice(&stage.code().to_le_bytes());
    e.copy_from_slice(&errno.to_le_bytes());
    out
}

fn decode_report(bytes: &[u8]) -> Option<(SpawnStage, Errno)> {
    let stage: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let errno: [u8; 4] = bytes.get(4..REPORT_LEN)?.try_into().ok()?;
    let stage = SpawnStage::from_code(u32::from_le_bytes(stage))?;
    Some((stage, Errno::from_raw(i32::from_le_bytes(errno))))
}

// ---------------------------------------------------------------------------------------
// Starting (fork, the child, exec)

/// A descriptor the child gets at a fixed number.
#[derive(Debug)]
pub(crate) struct Redirect {
    /// Close-on-exec, at [`LOW_FD`] or above.
    src: OwnedFd,
    dst: RawFd,
}

impl Redirect {
    /// `fd` as the child's `dst` (moved out of the way of the standard numbers first).
    pub(crate) fn new(fd: OwnedFd, dst: RawFd) -> io::Result<Self> {
        Ok(Self {
            src: raise(fd)?,
            dst,
        })
    }
}

/// The descriptor at [`LOW_FD`] or above, close-on-exec.
fn raise(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= LOW_FD {
        return Ok(fd);
    }
    let raw = nix::fcntl::fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(LOW_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(nix::fcntl::fcntl(fd, FcntlArg::F_GETFL)?);
    nix::fcntl::fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// What the child runs between `fork` and `execve`: pointers into memory the parent built
/// before `fork` (the child has its own copy of it), so the child allocates nothing.
struct ChildPlan<'a> {
    candidates: &'a [*const c_char],
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: Option<&'a CStr>,
    creds: Option<&'a Credentials>,
    redirects: &'a [(RawFd, RawFd)],
    close_from: RawFd,
    report: RawFd,
    process_group: bool,
    die_with_parent: bool,
    parent: libc::pid_t,
}

/// The parent's ends of a started program's pipes.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) pid: Pid,
    pub(crate) stdin: Option<OwnedFd>,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
}

/// Forks and executes `command` with `extra_env` and `extra` descriptors (beyond the
/// standard three); marks every other descriptor from `close_from` on close-on-exec in the
/// child. Returns once the child reached `execve`, or with its failure.
pub(crate) fn start(
    command: &Command,
    extra_env: &[(OsString, OsString)],
    extra: Vec<Redirect>,
    close_from: RawFd,
) -> Result<Started, ExecError> {
    let prepared = prepare(command, extra_env)?;
    let mut redirects = extra;
    let mut null: Option<OwnedFd> = None;
    let mut dev_null = || -> io::Result<OwnedFd> {
        if null.is_none() {
            let fd = nix::fcntl::open(
                "/dev/null",
                OFlag::O_RDWR | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            null = Some(raise(fd)?);
        }
        match &null {
            Some(fd) => Ok(fd.try_clone()?),
            None => Err(io::Error::other("cannot open /dev/null")),
        }
    };
    let stdin = match &command.stdin {
        Input::Null => {
            redirects.push(Redirect::new(dev_null()?, 0)?);
            None
        }
        Input::Bytes(_) => {
            let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            redirects.push(Redirect::new(rd, 0)?);
            set_nonblocking(&wr)?;
            Some(wr)
        }
        Input::Inherit => None,
    };
    let mut output = |how: Output, dst: RawFd| -> Result<Option<OwnedFd>, ExecError> {
        match how {
            Output::Capture => {
                let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                redirects.push(Redirect::new(wr, dst)?);
                set_nonblocking(&rd)?;
                Ok(Some(rd))
            }
            Output::Null => {
                redirects.push(Redirect::new(dev_null()?, dst)?);
                Ok(None)
            }
            Output::Inherit => Ok(None),
        }
    };
    let stdout = output(command.stdout, 1)?;
    let stderr = output(command.stderr, 2)?;
    let pid = spawn(
        &prepared,
        &redirects,
        close_from,
        command.process_group,
        command.die_with_parent,
    )?;
    Ok(Started {
        pid,
        stdin,
        stdout,
        stderr,
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn spawn(
    prepared: &Prepared,
    redirects: &[Redirect],
    close_from: RawFd,
    process_group: bool,
    die_with_parent: bool,
) -> Result<Pid, ExecError> {
    let candidates: Vec<*const c_char> = prepared.candidates.iter().map(|c| c.as_ptr()).collect();
    let argv = null_terminated(&prepared.argv);
    let envp = null_terminated(&prepared.envp);
    let pairs: Vec<(RawFd, RawFd)> = redirects
        .iter()
        .map(|r| (r.src.as_raw_fd(), r.dst))
        .collect();
    let (report_rd, report_wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let report_wr = raise(report_wr)?;
    let plan = ChildPlan {
        candidates: &candidates,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: prepared.cwd.as_deref(),
        creds: prepared.creds.as_ref(),
        redirects: &pairs,
        close_from,
        report: report_wr.as_raw_fd(),
        process_group,
        die_with_parent,
        parent: nix::unistd::getpid().as_raw(),
    };
    // SAFETY: the child runs `child_main` only, which makes async-signal-safe system calls on
    // memory prepared above and never returns (it ends in `execve` or `_exit`), so forking
    // is sound even if this process has other threads.
    let child = match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => child_main(&plan),
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(report_wr);
    let pid = Pid::from_raw(u32::try_from(child.as_raw()).unwrap_or(0));
    match wait_report(&report_rd) {
        Ok(None) => Ok(pid),
        Ok(Some((stage, errno))) => {
            reap_blocking(child);
            Err(ExecError::from_report(stage, errno))
        }
        Err(e) => {
            let _ = kill(child, Signal::SIGKILL);
            reap_blocking(child);
            Err(e)
        }
    }
}

/// Reads the child's report: end of file (`None`) when `execve` succeeded.
fn wait_report(rd: &OwnedFd) -> Result<Option<(SpawnStage, Errno)>, ExecError> {
    let deadline = crate::clock::monotonic_now() + SPAWN_WAIT;
    let mut buf = [0u8; REPORT_LEN];
    let mut got = 0;
    loop {
        let left = deadline.saturating_duration_since(crate::clock::monotonic_now());
        if left.is_zero() {
            return Err(ExecError::SpawnTimedOut);
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(
            rd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        match nix::unistd::read(rd, buf.get_mut(got..).unwrap_or_default()) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ExecError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the child's report was cut short",
                )))
            }
            Ok(n) => {
                got += n;
                if got == REPORT_LEN {
                    return decode_report(&buf).map(Some).ok_or_else(|| {
                        ExecError::Io(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "malformed report from the child",
                        ))
                    });
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits for a child that is ending (it failed before `execve`, or was sent `SIGKILL`).
pub(super) fn reap_blocking(pid: nix::unistd::Pid) {
    while let Err(Errno::EINTR) = waitpid(pid, None) {}
}

/// The child, between `fork` and `execve`. Async-signal-safe system calls only; nothing
/// allocates, nothing panics (no indexing, no `unwrap`); every failure ends in
/// [`child_fail`].
fn child_main(plan: &ChildPlan<'_>) -> ! {
    let report = plan.report;
    // SAFETY (every libc call below): plain system calls on integers and on pointers into
    // NUL-terminated strings and null-terminated arrays the parent built before fork; all
    // are async-signal-safe.
    if plan.process_group && unsafe { libc::setpgid(0, 0) } != 0 {
        child_fail(report, SpawnStage::ProcessGroup, Errno::last_raw());
    }
    for &(src, dst) in plan.redirects {
        let rc = if src == dst {
            // SAFETY: see above.
            unsafe { libc::fcntl(dst, libc::F_SETFD, 0) }
        } else {
            // SAFETY: see above; dup2 clears close-on-exec on `dst`.
            unsafe { libc::dup2(src, dst) }
        };
        if rc < 0 {
            child_fail(report, SpawnStage::Stdio, Errno::last_raw());
        }
    }
    mark_cloexec_from(plan.close_from, report);
    if let Some(creds) = plan.creds {
        if let Err(e) = creds.apply() {
            let (stage, errno) = match e {
                IdentityError::CredentialCall { call, errno } => (
                    match call {
                        CredentialCall::Setgroups => SpawnStage::Setgroups,
                        CredentialCall::Setgid => SpawnStage::Setgid,
                        CredentialCall::Setuid => SpawnStage::Setuid,
                        _ => SpawnStage::VerifyCredentials,
                    },
                    errno as i32,
                ),
                _ => (SpawnStage::VerifyCredentials, 0),
            };
            child_fail(report, stage, errno);
        }
    }
    // After the drop: the directory is entered with the program's own permissions.
    if let Some(dir) = plan.cwd {
        // SAFETY: see above.
        if unsafe { libc::chdir(dir.as_ptr()) } != 0 {
            child_fail(report, SpawnStage::Chdir, Errno::last_raw());
        }
    }
    if plan.die_with_parent {
        // After the drop: a change of credentials clears the parent-death signal.
        // SAFETY: see above.
        let sig = libc::c_ulong::try_from(libc::SIGKILL).unwrap_or(9);
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) } != 0 {
            child_fail(report, SpawnStage::ParentDeathSignal, Errno::last_raw());
        }
        // SAFETY: see above.
        if unsafe { libc::getppid() } != plan.parent {
            child_fail(report, SpawnStage::ParentGone, libc::ESRCH);
        }
    }
    // The bus blocks SIGCHLD, SIGTERM, SIGINT and SIGHUP and Rust ignores SIGPIPE; a
    // program expects neither.
    // SAFETY: see above; `empty` is a local sigset_t initialised by sigemptyset.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
            || libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0
        {
            child_fail(report, SpawnStage::Signals, Errno::last_raw());
        }
    }
    // execvp's search, on paths built before fork: go on past "not here", remember
    // "here but not permitted".
    let mut errno = libc::ENOENT;
    let mut denied = false;
    for &path in plan.candidates {
        // SAFETY: see above; execve returns only on failure.
        unsafe { libc::execve(path, plan.argv, plan.envp) };
        errno = Errno::last_raw();
        match errno {
            libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG => {}
            libc::EACCES => denied = true,
            _ => break,
        }
    }
    if denied && errno != libc::E2BIG && errno != libc::ENOEXEC {
        errno = libc::EACCES;
    }
    child_fail(report, SpawnStage::Exec, errno)
}

/// Marks every descriptor from `first` on close-on-exec (the report pipe is one already).
fn mark_cloexec_from(first: RawFd, report: RawFd) {
    let Ok(first) = libc::c_uint::try_from(first) else {
        return;
    };
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on descriptors; it is a
    // plain system call, async-signal-safe.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    // Kernels before 5.11: one by one, up to a bound.
    let Ok(first) = libc::c_int::try_from(first) else {
        return;
    };
    for fd in first..FALLBACK_FD_LIMIT {
        // SAFETY: fcntl on a descriptor number; EBADF for one not open is ignored.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0 {
                child_fail(report, SpawnStage::CloseDescriptors, Errno::last_raw());
            }
        }
    }
}

/// Writes the failure report and leaves, without running the program.
fn child_fail(report: RawFd, stage: SpawnStage, errno: i32) -> ! {
    let bytes = encode_report(stage, errno);
    let mut off = 0;
    while off < bytes.len() {
        let rest = bytes.get(off..).unwrap_or_default();
        // SAFETY: writes from a live stack buffer to the report pipe.
        let n = unsafe { libc::write(report, rest.as_ptr().cast(), rest.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => off += n,
            _ if Errno::last_raw() == libc::EINTR => {}
            _ => break,
        }
    }
    // SAFETY: ends the child at once, running no destructor and no atexit handler of the
    // parent's.
    unsafe { libc::_exit(EXIT_SPAWN_FAILED) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrivilegeDrop;

    fn os(s: &str) -> OsString {
        OsString::from(s)
    }

    fn env_of(entries: &[CString]) -> Vec<String> {
        entries
            .iter()
            .map(|e| e.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn environment_inherit_set_remove_and_clear() {
        let base = vec![(os("HOME"), os("/root")), (os("PATH"), os("/bin"))];
        let ops = vec![
            (os("A"), Some(os("1"))),
            (os("HOME"), None),
            (os("A"), Some(os("2"))),
        ];
        let env = build_env(base.clone(), false, &ops, &[]).map(|e| env_of(&e));
        assert_eq!(env.ok(), Some(vec!["A=2".into(), "PATH=/bin".into()]));
        let env = build_env(base.clone(), true, &ops, &[]).map(|e| env_of(&e));
        assert_eq!(env.ok(), Some(vec!["A=2".into()]));
        // Extra variables win over the command's.
        let extra = vec![(os("A"), os("node"))];
        let env = build_env(base, true, &ops, &extra).map(|e| env_of(&e));
        assert_eq!(env.ok(), Some(vec!["A=node".into()]));
        // An inherited variable may hold '=' in its value.
        let env = build_env(vec![(os("X"), os("a=b"))], false, &[], &[]).map(|e| env_of(&e));
        assert_eq!(env.ok(), Some(vec!["X=a=b".into()]));
    }

    #[test]
    fn environment_names_and_values_are_checked() {
        for bad in ["", "A=B"] {
            let r = build_env(Vec::new(), true, &[(os(bad), Some(os("v")))], &[]);
            assert!(
                matches!(r, Err(ExecError::Invalid(InvalidCommand::EnvName(_)))),
                "{bad:?}"
            );
        }
        let r = build_env(Vec::new(), true, &[(os("A"), Some(os("x\0y")))], &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Env(ref n)))) if n == "A"
        ));
        let r = build_env(Vec::new(), true, &[(os("A\0"), None)], &[]);
        assert!(r.is_ok(), "removing a name that cannot exist is harmless");
    }

    #[test]
    fn arguments_with_nul_bytes_are_refused() {
        let r = prepare(&Command::new("/bin/echo").arg("ok").arg("a\0b"), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Arg(1))))
        ));
        let r = prepare(&Command::new("/bin/e\0cho"), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Program)))
        ));
        let r = prepare(&Command::new("/bin/echo").current_dir("/t\0mp"), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Dir)))
        ));
        let r = prepare(&Command::new(""), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::EmptyProgram))
        ));
        let r = prepare(&Command::new("/bin/echo").arg0("e\0"), &[]);
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::Nul(Part::Arg0)))
        ));
    }

    #[test]
    fn prepared_argv_and_shell() {
        let p = prepare(&Command::shell("echo hi").env_clear().env("K", "v"), &[]);
        let p = p.ok();
        let argv: Option<Vec<String>> = p
            .as_ref()
            .map(|p| p.argv.iter().map(|a| a.to_string_lossy().into()).collect());
        assert_eq!(argv, Some(vec!["sh".into(), "-c".into(), "echo hi".into()]));
        let cands: Option<Vec<String>> = p.as_ref().map(|p| {
            p.candidates
                .iter()
                .map(|a| a.to_string_lossy().into())
                .collect()
        });
        assert_eq!(cands, Some(vec!["/bin/sh".into()]));
        assert_eq!(p.map(|p| env_of(&p.envp)), Some(vec!["K=v".into()]));
    }

    #[test]
    fn program_lookup_follows_path() {
        let c = candidates(OsStr::new("ls"), Some(OsStr::new("/a:/b/c::/d")));
        let c: Vec<String> = c.iter().map(|p| p.to_string_lossy().into()).collect();
        assert_eq!(c, ["/a/ls", "/b/c/ls", "./ls", "/d/ls"]);
        let c = candidates(OsStr::new("./x"), Some(OsStr::new("/a")));
        assert_eq!(c, [PathBuf::from("./x")]);
        let c = candidates(OsStr::new("sh"), None);
        assert_eq!(c.len(), 3);
        // The child's PATH is the one searched when its environment sets one.
        let p = prepare(&Command::new("prog").env("PATH", "/x:/y"), &[]);
        let cands: Option<Vec<String>> = p.ok().map(|p| {
            p.candidates
                .iter()
                .map(|a| a.to_string_lossy().into())
                .collect()
        });
        assert_eq!(cands, Some(vec!["/x/prog".into(), "/y/prog".into()]));
    }

    #[test]
    fn unknown_users_and_too_many_groups_are_refused_before_fork() {
        let r = prepare(
            &Command::new("/bin/true").user(PrivilegeDrop::new("forkbus-no-such-user")),
            &[],
        );
        assert!(matches!(
            r,
            Err(ExecError::Identity(IdentityError::UnknownUser(_)))
        ));
        let groups: Vec<u32> = (1000..1000 + 200).collect();
        let r = prepare(
            &Command::new("/bin/true").credentials(Credentials::new(1, 1, groups)),
            &[],
        );
        assert!(matches!(
            r,
            Err(ExecError::Invalid(InvalidCommand::TooManyGroups {
                n_groups: 200
            }))
        ));
    }

    #[test]
    fn reports_round_trip_and_stages_are_distinct() {
        for stage in SpawnStage::ALL {
            let bytes = encode_report(stage, libc::EPERM);
            assert_eq!(decode_report(&bytes), Some((stage, Errno::EPERM)));
        }
        let mut codes: Vec<u32> = SpawnStage::ALL.iter().map(|s| s.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), SpawnStage::ALL.len());
        assert_eq!(decode_report(&[0; 8]), None);
        assert_eq!(decode_report(&[1, 0, 0]), None);
    }
}
