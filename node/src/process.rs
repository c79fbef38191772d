//! Processes as the node core sees them: a pid and how a process ended.

use std::fmt;

use forkbus_router::Address;

/// A process id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(u32);

impl Pid {
    /// A pid from its number.
    pub const fn from_raw(pid: u32) -> Self {
        Self(pid)
    }

    /// Its number.
    pub const fn as_raw(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Pid> for Address {
    fn from(p: Pid) -> Self {
        Self::Pid(p.0)
    }
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The exit of a raw Linux `wait` status word; `None` for one that is not an end
    /// (stopped, continued).
    pub fn from_raw(status: i32) -> Option<Self> {
        // <sys/wait.h>: the signal in the low seven bits (0 for an exit, 0x7f for a stop),
        // the exit code in the second byte.
        let signal = status & 0x7f;
        if signal == 0 {
            Some(Self::Code((status >> 8) & 0xff))
        } else if signal != 0x7f && status & 0xffff != 0xffff {
            Some(Self::Signal(signal))
        } else {
            None
        }
    }

    /// Whether it exited with code zero.
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exited with code {c}"),
            Self::Signal(s) => match signal_name(*s) {
                Some(name) => write!(f, "killed by {name}"),
                None => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// The Linux name of a standard signal.
fn signal_name(signal: i32) -> Option<&'static str> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    let at = usize::try_from(signal.checked_sub(1)?).ok()?;
    NAMES.get(at).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_from_raw_words() {
        // Exit code in the second byte, signal in the low seven bits, 0x7f means stopped.
        assert_eq!(ExitStatus::from_raw(0), Some(ExitStatus::Code(0)));
        assert_eq!(ExitStatus::from_raw(3 << 8), Some(ExitStatus::Code(3)));
        assert_eq!(ExitStatus::from_raw(255 << 8), Some(ExitStatus::Code(255)));
        assert_eq!(ExitStatus::from_raw(9), Some(ExitStatus::Signal(9)));
        assert_eq!(
            ExitStatus::from_raw(15 | 0x80),
            Some(ExitStatus::Signal(15))
        );
        assert_eq!(ExitStatus::from_raw((19 << 8) | 0x7f), None);
        assert_eq!(ExitStatus::from_raw(0xffff), None, "continued");
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Code(1).success());
        assert!(!ExitStatus::Signal(9).success());
    }

    #[test]
    fn exit_status_display() {
        assert_eq!(ExitStatus::Code(2).to_string(), "exited with code 2");
        assert_eq!(ExitStatus::Signal(9).to_string(), "killed by SIGKILL");
        assert_eq!(ExitStatus::Signal(15).to_string(), "killed by SIGTERM");
        assert_eq!(ExitStatus::Signal(31).to_string(), "killed by SIGSYS");
        assert_eq!(ExitStatus::Signal(99).to_string(), "killed by signal 99");
        assert_eq!(ExitStatus::Signal(0).to_string(), "killed by signal 0");
    }

    #[test]
    fn pid_is_an_address() {
        assert_eq!(Address::from(Pid::from_raw(7)), Address::Pid(7));
        assert_eq!(Pid::from_raw(7).to_string(), "7");
    }
}
