//! Process helpers for the benchmarks: fork with a closure, reap, pin, measure memory.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// A forked child that must be waited for (killed and reaped on drop otherwise).
#[derive(Debug)]
pub(crate) struct Child {
    pid: Pid,
    reaped: bool,
}

impl Child {
    pub(crate) fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits for the child; an error when it failed.
    pub(crate) fn wait(mut self) -> io::Result<()> {
        self.reaped = true;
        match waitpid(self.pid, None)? {
            WaitStatus::Exited(_, 0) => Ok(()),
            other => Err(io::Error::other(format!("child {}: {other:?}", self.pid))),
        }
    }

    /// Kills and reaps the child.
    pub(crate) fn kill(mut self) -> io::Result<()> {
        self.reaped = true;
        let _ = kill(self.pid, Signal::SIGKILL);
        waitpid(self.pid, None)?;
        Ok(())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
        }
    }
}

/// Forks; the child closes `close` (the parent's ends of its sockets: a child holding the
/// other end of its own socket would never see end of file), runs `f`, which returns its
/// exit code, and never returns here. The child dies with its parent.
pub(crate) fn fork_child(close: &[RawFd], f: impl FnOnce() -> i32) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the benchmark is single-threaded when it forks (no thread is ever started),
    // so the child may run ordinary code.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => Ok(Child {
            pid: child,
            reaped: false,
        }),
        ForkResult::Child => {
            // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; getppid checks the
            // race with a parent that died before the call.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
            }
            for &fd in close {
                let _ = nix::unistd::close(fd);
            }
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: leaves at once without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Makes this process the reaper of its orphaned descendants (a relay or a forkbus node that
/// dies leaves its children to the nearest subreaper, which is then this bench), so that
/// [`reap_strays`] can wait for every one of them.
pub(crate) fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reaps every child left (orphans adopted as a subreaper, or children nobody waited for),
/// waiting at most `patience` for those still dying. Call it only when no [`Child`] and no
/// bus is alive. Returns how many were reaped and how many are still running.
pub(crate) fn reap_strays(patience: std::time::Duration) -> (usize, usize) {
    use nix::errno::Errno;
    use nix::sys::wait::WaitPidFlag;
    let deadline = std::time::Instant::now() + patience;
    let mut reaped = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if std::time::Instant::now() >= deadline {
                    return (reaped, children_of_self().len());
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Ok(_) => reaped += 1,
            Err(Errno::EINTR) => {}
            Err(_) => return (reaped, 0),
        }
    }
}

/// The pids of this process's living children (from /proc; empty when it cannot tell).
pub(crate) fn children_of_self() -> Vec<i32> {
    let me = std::process::id();
    std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// CPU time (user + system) used so far by this process and by every descendant it has
/// reaped (a child's own reaped descendants count in its figure).
pub(crate) fn cpu_time() -> std::time::Duration {
    let of = |who: i32| {
        // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage.
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return std::time::Duration::ZERO;
        }
        let tv = |t: libc::timeval| {
            std::time::Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                + std::time::Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
        };
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    of(libc::RUSAGE_SELF) + of(libc::RUSAGE_CHILDREN)
}

/// Runs `f` and returns what it returned with the CPU time it and its reaped descendants
/// used.
pub(crate) fn with_cpu<T>(
    f: impl FnOnce() -> io::Result<T>,
) -> io::Result<(T, std::time::Duration)> {
    let before = cpu_time();
    let out = f()?;
    Ok((out, cpu_time().saturating_sub(before)))
}

/// The 1-, 5- and 15-minute load averages.
pub(crate) fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

/// Pins the calling process (and the children it forks from now on) to these CPUs; returns
/// the previous set to restore.
pub(crate) fn pin(cpus: &[usize]) -> io::Result<nix::sched::CpuSet> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    let before = sched_getaffinity(Pid::from_raw(0))?;
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(before)
}

/// Restores a CPU set saved by [`pin`].
pub(crate) fn unpin(before: &nix::sched::CpuSet) -> io::Result<()> {
    nix::sched::sched_setaffinity(Pid::from_raw(0), before)?;
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of the machine.
pub(crate) fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
    t.unwrap_or(0)
}

/// Kilobytes of resident and proportional memory of a process (from smaps_rollup).
pub(crate) fn rss_pss_kib(pid: Pid) -> io::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("Rss:"), field("Pss:")))
}

/// Timestamps in shared anonymous memory, one slot per process of a tree.
#[derive(Clone, Debug)]
pub(crate) struct SharedStamps {
    map: Rc<Mapping>,
    n: usize,
}

#[derive(Debug)]
struct Mapping {
    ptr: NonNull<AtomicU64>,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `SharedStamps::new` with this length.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

impl SharedStamps {
    pub(crate) fn new(n: usize) -> io::Result<Self> {
        use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
        let len = std::num::NonZeroUsize::new(n.max(1) * 8)
            .ok_or_else(|| io::Error::other("empty mapping"))?;
        // SAFETY: a fresh anonymous shared mapping, zero-filled, aligned to a page; AtomicU64
        // has the size and alignment of u64 and zero is a valid value.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }?;
        Ok(Self {
            map: Rc::new(Mapping {
                ptr: ptr.cast(),
                len: len.get(),
            }),
            n,
        })
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.n);
        // SAFETY: i is in bounds of the mapping, which lives as long as `self.map`.
        unsafe { &*self.map.ptr.as_ptr().add(i) }
    }

    pub(crate) fn set(&self, i: usize, v: u64) {
        self.slot(i).store(v, Ordering::SeqCst);
    }

    pub(crate) fn get(&self, i: usize) -> u64 {
        self.slot(i).load(Ordering::SeqCst)
    }
}
