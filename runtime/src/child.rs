//! Pids and exit statuses (the node core's types) as the OS gives them.

use forkbus_node::ExitStatus;
use nix::sys::wait::WaitStatus;

pub(crate) use forkbus_node::Pid;

/// A pid as `nix` takes it.
pub(crate) trait PidExt {
    /// The `nix` pid (`i32::MAX`, no process, for a number beyond `i32`).
    fn nix(self) -> nix::unistd::Pid;
}

impl PidExt for Pid {
    fn nix(self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.as_raw()).unwrap_or(i32::MAX))
    }
}

/// The exit of a `waitpid` status; `None` for a child that did not end (stopped,
/// continued, still alive).
pub(crate) fn exit_of(status: WaitStatus) -> Option<ExitStatus> {
    match status {
        WaitStatus::Exited(_, code) => Some(ExitStatus::Code(code)),
        WaitStatus::Signaled(_, signal, _) => Some(ExitStatus::Signal(signal as i32)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_status_from_wait() {
        let p = nix::unistd::Pid::from_raw(42);
        assert_eq!(exit_of(WaitStatus::Exited(p, 3)), Some(ExitStatus::Code(3)));
        assert_eq!(
            exit_of(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(ExitStatus::Signal(9))
        );
        assert_eq!(exit_of(WaitStatus::Stopped(p, Signal::SIGSTOP)), None);
        assert_eq!(exit_of(WaitStatus::StillAlive), None);
    }

    #[test]
    fn pids_convert_for_nix() {
        assert_eq!(Pid::from_raw(7).nix().as_raw(), 7);
        assert_eq!(Pid::from_raw(u32::MAX).nix().as_raw(), i32::MAX);
    }
}
