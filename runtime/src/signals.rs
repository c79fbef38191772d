//! Signals as readiness: the bus's signals are blocked and read from a signalfd.
//!
//! No work is ever done in a signal handler; there is none. `SIGCHLD`, `SIGTERM`, `SIGINT`
//! and `SIGHUP` are blocked in the thread that creates the bus (threads it starts later
//! inherit the mask) and read from a non-blocking, close-on-exec signalfd registered in the
//! poller. A forked child inherits the mask (its pending signals are cleared by `fork`) and
//! makes a signalfd of its own. Programs started with `std::process::Command` get an empty
//! mask: the standard library resets it before `exec`.

use std::io;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The signals the loop handles.
pub(crate) fn bus_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks the bus's signals in this thread; returns the mask before.
pub(crate) fn block() -> io::Result<SigSet> {
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&bus_signals()), Some(&mut old))?;
    Ok(old)
}

/// Puts back a mask saved by [`block`].
pub(crate) fn restore(old: &SigSet) {
    if let Err(e) = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(old), None) {
        tracing::warn!(error = %e, "cannot restore the signal mask");
    }
}

/// A signalfd for the bus's signals (which must be blocked already).
pub(crate) fn signalfd() -> io::Result<SignalFd> {
    Ok(SignalFd::with_flags(
        &bus_signals(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}
