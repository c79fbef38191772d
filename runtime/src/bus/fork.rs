//! Processes: [`Bus::fork`] on both sides (the parent registers the child's link; the child
//! closes what it inherited, builds a fresh bus, runs its closure and its loop, and exits
//! without returning into the caller's code), and the bus's `Drop`, which closes the links
//! and reaps the children, killing what does not end in time.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Duration;

use forkbus_node::Relation;
use forkbus_router::NodeId;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::ForkResult;

use super::config::{node_config, KILL_GRACE};
use super::{Bus, ForkOptions, Stop, BUS_PID, EXIT_OS_ERROR, EXIT_PANIC, EXIT_PARENT_GONE};
use crate::child::{Pid, PidExt};
use crate::clock::{monotonic_now, nonce};
use crate::error::{ForkError, NameError};
use crate::listener_set::panic_message;
use crate::signals;

impl Bus {
    /// Forks a child that runs `child` with a bus of its own, then its loop, then exits; it
    /// never returns into the caller's code (a panic in `child` is caught and the child
    /// exits with [`EXIT_PANIC`]). Returns the child's pid; its route is usable at once.
    ///
    /// Refused, with nothing forked, when this process has more than one thread or the bus
    /// is draining. In the child: the parent's links, signalfd, poller and registered
    /// descriptors are closed, and so is every other descriptor but 0, 1, 2, its parent
    /// link and those named in [`ForkOptions::keep_fds`] (before the child's bus opens its
    /// own); its router, queues, timers, listeners and child table are dropped (forgotten:
    /// their destructors belong to the parent); with [`ForkOptions::die_with_parent`], the
    /// child gets `SIGKILL` when this process dies.
    ///
    /// A value the child inherits that owns a descriptor it did not keep (a `File`, a
    /// socket, an `OwnedFd` moved into `child`) refers to a closed number, which the
    /// child's bus may reuse: the child must neither use nor drop it (forget it, or
    /// release it with `into_raw_fd`), or keep its descriptor.
    pub fn fork<F>(&mut self, options: ForkOptions, child: F) -> Result<Pid, ForkError>
    where
        F: FnOnce(&mut Self),
    {
        if self.is_stopping() {
            return Err(ForkError::ShuttingDown);
        }
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        if threads > 1 {
            return Err(ForkError::Threaded { threads });
        }
        let names: Vec<String> = options.name.iter().cloned().collect();
        // Names are unique: only a free name, one of this node's, or one a child of this
        // node holds (its replacement takes it over) may be given to the new child.
        self.node
            .router()
            .check_fork_names(&names)
            .map_err(|e| ForkError::Name(NameError::from_router(e)))?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )?;
        let incarnation = nonce(u32::try_from(self.node.children().len()).unwrap_or(0));
        let parent_pid = nix::unistd::getpid();
        // Whatever sits in the standard buffers would be written twice otherwise.
        let _ = io::stdout().flush();
        let _ = io::stderr().flush();
        // SAFETY: this process has exactly one thread (counted just above; the bus starts
        // none, and nothing ran in between), so the child may run any code, not only
        // async-signal-safe functions. The child never returns into the caller: it ends in
        // `_exit`.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Child => {
                self.become_child(options, parent_pid, incarnation, theirs, ours, child)
            }
            ForkResult::Parent { child: raw } => {
                drop(theirs);
                let pid = Pid::from_raw(u32::try_from(raw.as_raw()).unwrap_or(0));
                let node = NodeId::new(self.me.host, pid.as_raw(), incarnation);
                // The child's router was made from this router's copy at fork time: it
                // knows this node and its table already (`Router::forked_child`), and this
                // router knows the child's name at once.
                let now = self.now();
                let link = self.node.handle_fork(now, pid, node, &names);
                match self.register_link(ours, link, Some(node), Relation::Child(pid)) {
                    Ok(_) => {
                        tracing::debug!(parent: &self.span, child = %node, "forked");
                        Ok(pid)
                    }
                    Err(e) => {
                        let _ = kill(raw, Signal::SIGKILL);
                        let _ = waitpid(raw, None);
                        Err(ForkError::Io(e))
                    }
                }
            }
        }
    }

    fn become_child<F: FnOnce(&mut Self)>(
        &mut self,
        options: ForkOptions,
        parent_pid: nix::unistd::Pid,
        incarnation: u32,
        link_fd: OwnedFd,
        parent_end: OwnedFd,
        child: F,
    ) -> ! {
        drop(parent_end);
        if options.die_with_parent && nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
            exit_now(EXIT_OS_ERROR);
        }
        // The parent may have died before the death signal was armed: then nobody will
        // send it, and the child is an orphan already.
        if nix::unistd::getppid() != parent_pid {
            exit_now(EXIT_PARENT_GONE);
        }
        let parent_node = self.me;
        let config = self.config.clone();
        let pid = std::process::id();
        let me = NodeId::new(config.host, pid, incarnation);
        // The child's router knows the parent's whole table from the start, so its first
        // sends have routes; the parent sends it nothing it knows already.
        let now = self.now();
        let names: Vec<String> = options.name.iter().cloned().collect();
        let forked =
            self.node
                .forked_child(now, me, &names, config.router.clone(), node_config(&config));
        BUS_PID.store(pid, Ordering::SeqCst);
        // Close every descriptor of the parent's bus before opening ours, so no number is
        // closed twice.
        self.reactor.abandon();
        // Then every other descriptor but stdio, the parent link and what the caller keeps:
        // the child holds only what it was given. Before the new bus opens its own.
        let mut keep = options.keep_fds;
        keep.extend([0, 1, 2, link_fd.as_raw_fd()]);
        keep.retain(|fd| *fd >= 0);
        keep.sort_unstable();
        keep.dedup();
        if let Err(e) = close_all_but(&keep) {
            tracing::error!(error = %e, "cannot close the inherited descriptors");
            exit_now(EXIT_OS_ERROR);
        }
        let built = forked
            .map_err(io::Error::from)
            .and_then(|(node, link)| Self::build(config, node).map(|bus| (bus, link)));
        let code = match built {
            Ok((fresh, link)) => {
                let inherited = std::mem::replace(self, fresh);
                // The parent's router, listeners, timers, queues and children: its memory,
                // its destructors.
                std::mem::forget(inherited);
                match self.register_link(link_fd, link, Some(parent_node), Relation::Parent) {
                    Ok(_) => {
                        // The name was registered by `forked_child`, before the child's
                        // first announcement.
                        self.run_child(child)
                    }
                    Err(e) => {
                        tracing::error!(parent: &self.span, error = %e, "cannot register the parent link");
                        EXIT_OS_ERROR
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the child's bus");
                EXIT_OS_ERROR
            }
        };
        exit_now(code)
    }

    fn run_child<F: FnOnce(&mut Self)>(&mut self, child: F) -> i32 {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.span.clone().in_scope(|| child(self));
            self.run()
        }));
        if let Ok(Ok(Stop::Stopped)) = outcome {
            // Leaving on its own (not drained): its counts still go to the parent, so the
            // tree's tally counts it as reported.
            if let Some(link) = self.node.leave() {
                self.flush_final(link);
            }
        }
        match outcome {
            Ok(Ok(stop)) => match (self.exit_code, stop) {
                (Some(code), _) => code,
                (None, Stop::ParentGone) => EXIT_PARENT_GONE,
                (None, _) => 0,
            },
            Ok(Err(e)) => {
                tracing::error!(parent: &self.span, error = %e, "the loop failed");
                EXIT_OS_ERROR
            }
            Err(panic) => {
                tracing::error!(
                    parent: &self.span, panic = %panic_message(&*panic), "the child's closure panicked"
                );
                EXIT_PANIC
            }
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            return;
        }
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            service.on_drop(self);
            i += 1;
        }
        // Close every link: children see the end of file and end their loops.
        let keys: Vec<usize> = self.links.drain().map(|(_, k)| k).collect();
        for key in keys {
            drop(self.reactor.remove(key));
        }
        // Reap them, killing what does not end in time.
        let deadline = monotonic_now() + KILL_GRACE;
        for pid in self.node.children() {
            loop {
                match waitpid(pid.nix(), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) if monotonic_now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Ok(WaitStatus::StillAlive) => {
                        let _ = kill(pid.nix(), Signal::SIGKILL);
                        let _ = waitpid(pid.nix(), None);
                        break;
                    }
                    Err(Errno::EINTR) => {}
                    _ => break,
                }
            }
        }
        if let Some(mask) = self.root_mask.take() {
            signals::restore(&mask);
        }
        let _ = BUS_PID.compare_exchange(self.owner, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Closes every descriptor of this process but those in `keep` (sorted, without
/// duplicates or negative numbers): `close_range` over the gaps, or one by one from
/// `/proc/self/fd` where `close_range` fails.
fn close_all_but(keep: &[RawFd]) -> io::Result<()> {
    let mut gaps = Vec::with_capacity(keep.len() + 1);
    let mut from: u32 = 0;
    for &fd in keep {
        let Ok(fd) = u32::try_from(fd) else {
            continue;
        };
        if fd > from {
            gaps.push((from, fd - 1));
        }
        from = from.max(fd.saturating_add(1));
    }
    gaps.push((from, u32::MAX));
    for (first, last) in gaps {
        let (first, last, flags): (nix::libc::c_uint, nix::libc::c_uint, nix::libc::c_uint) =
            (first, last, 0);
        // SAFETY: close_range only closes descriptor numbers. Their owners in this forked
        // process are the parent's values: the bus's were abandoned or are forgotten, the
        // application's must not be used or dropped in the child (see `Bus::fork`).
        let rc = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, first, last, flags) };
        if rc != 0 {
            // ENOSYS before Linux 5.9; EPERM under seccomp filters that predate it.
            for fd in crate::reactor::open_fds()? {
                if keep.binary_search(&fd).is_err() {
                    // The directory read above had a descriptor of its own, closed by
                    // now: its EBADF is ignored with the rest.
                    let _ = nix::unistd::close(fd);
                }
            }
            return Ok(());
        }
    }
    Ok(())
}

/// Ends a forked child without unwinding into the caller's code.
fn exit_now(code: i32) -> ! {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: `_exit` ends the process at once. It is called only in a forked child, which
    // must never return into the code that called `fork` nor run the parent's atexit
    // handlers or destructors.
    unsafe { nix::libc::_exit(code) }
}
