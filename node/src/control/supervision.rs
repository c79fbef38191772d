//! The supervision protocol's control frames (the runtime's supervisors and task pools, and
//! the workers they run): between a supervisor and the processes it forked, never routed,
//! never seen by listeners.
//!
//! ```text
//!   code      direction          data (little-endian)
//!   PING      parent → child     seq u64
//!   PONG      child → parent     seq u64                       (answered by the child's loop)
//!   READY     child → parent     none                          (its closure returned)
//!   STOP      parent → child     why u8, deadline ms u64, quiet ms u64
//!   RECYCLE   child → parent     messages handled u64          (its limit is reached)
//!   GAVE_UP   child → parent     restarts u32, name (UTF-8)    (a supervisor gave up a child)
//!   JOB       parent → child     task id u64, job bytes        (task pool)
//!   RESULT    child → parent     task id u64, ok u8, bytes     (task pool; error text when not ok)
//! ```
//!
//! Frames are decoded strictly: a wrong length is a malformed frame, never a panic. They
//! are taken only from the neighbour that may send them ([`SupervisionFrame::accepted_from`]): `PING`, `STOP` and
//! `JOB` from the parent of a supervised worker; `PONG`, `READY`, `RECYCLE` and `RESULT`
//! from a child that a supervisor of this process owns; `GAVE_UP` from a child this
//! process forked (a supervisor of its own gave up), never from a program started with
//! `Bus::exec_node`. Anything else is reported as a bad control frame and ignored.

use std::time::Duration;

/// The first code of the supervision range.
const BASE: u32 = 0x4642_0100;
const PING: u32 = BASE + 1;
const PONG: u32 = BASE + 2;
const READY: u32 = BASE + 3;
const STOP: u32 = BASE + 4;
const RECYCLE: u32 = BASE + 5;
const GAVE_UP: u32 = BASE + 6;
const JOB: u32 = BASE + 7;
const RESULT: u32 = BASE + 8;

/// Whether a control code belongs to supervision.
pub(crate) fn is_supervision(code: u32) -> bool {
    (PING..=RESULT).contains(&code)
}

/// Who a supervision frame came from, as far as taking it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SupervisionSender {
    /// This process's parent.
    Parent {
        /// This process is a supervised worker (it carries an agent).
        supervised: bool,
    },
    /// A child of this process.
    Child {
        /// Forked by this process (not started with `Bus::exec_node`).
        forked: bool,
        /// Owned by one of this process's supervisors.
        supervised: bool,
    },
    /// An attached link.
    Attached,
}

/// Whether a frame with this code may come from `from` (see the module documentation).
fn accepted(code: u32, from: SupervisionSender) -> bool {
    match (code, from) {
        (PING | STOP | JOB, SupervisionSender::Parent { supervised }) => supervised,
        (PONG | READY | RECYCLE | RESULT, SupervisionSender::Child { supervised, .. }) => {
            supervised
        }
        (GAVE_UP, SupervisionSender::Child { forked, .. }) => forked,
        _ => false,
    }
}

/// A supervision frame.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SupervisionFrame {
    /// Supervisor → worker: a heartbeat.
    Ping(u64),
    /// Worker → supervisor: the answer to a heartbeat, from the worker's loop.
    Pong(u64),
    /// Worker → supervisor: it is up (its start closure returned, or it said so).
    Ready,
    /// Supervisor → worker: finish what is in hand and exit.
    Stop {
        /// Why (a `StopReason` code of the runtime).
        why: u8,
        /// When it is killed if still running.
        deadline: Duration,
        /// How long it must be quiet before it drains.
        quiet: Duration,
    },
    /// Worker → supervisor: it handled this many messages, its recycling limit.
    Recycle(u64),
    /// Child → parent: a supervisor of the child's gave up on one of its children.
    GaveUp {
        /// Restarts it made before giving up.
        restarts: u32,
        /// The child's name, if it had one.
        name: Option<String>,
    },
    /// Pool owner → worker: a job.
    Job {
        /// The task.
        id: u64,
        /// The job's bytes.
        payload: Vec<u8>,
    },
    /// Worker → pool owner: a job's result (the error text when the handler failed).
    Result {
        /// The task.
        id: u64,
        /// The value's bytes, or the failure.
        outcome: Result<Vec<u8>, String>,
    },
}

impl SupervisionFrame {
    /// Whether a frame of this kind may come from `from`: `Ping`, `Stop` and `Job` from the
    /// parent of a supervised worker; `Pong`, `Ready`, `Recycle` and `Result` from a child
    /// a supervisor here owns; `GaveUp` from a child this process forked.
    pub fn accepted_from(&self, from: SupervisionSender) -> bool {
        accepted(self.code(), from)
    }

    fn code(&self) -> u32 {
        match self {
            Self::Ping(_) => PING,
            Self::Pong(_) => PONG,
            Self::Ready => READY,
            Self::Stop { .. } => STOP,
            Self::Recycle(_) => RECYCLE,
            Self::GaveUp { .. } => GAVE_UP,
            Self::Job { .. } => JOB,
            Self::Result { .. } => RESULT,
        }
    }

    /// Its code and data.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        let mut d = Vec::new();
        let code = match self {
            Self::Ping(seq) => {
                d.extend_from_slice(&seq.to_le_bytes());
                PING
            }
            Self::Pong(seq) => {
                d.extend_from_slice(&seq.to_le_bytes());
                PONG
            }
            Self::Ready => READY,
            Self::Stop {
                why,
                deadline,
                quiet,
            } => {
                d.push(*why);
                d.extend_from_slice(&millis(*deadline).to_le_bytes());
                d.extend_from_slice(&millis(*quiet).to_le_bytes());
                STOP
            }
            Self::Recycle(n) => {
                d.extend_from_slice(&n.to_le_bytes());
                RECYCLE
            }
            Self::GaveUp { restarts, name } => {
                d.extend_from_slice(&restarts.to_le_bytes());
                if let Some(n) = name {
                    d.extend_from_slice(n.as_bytes());
                }
                GAVE_UP
            }
            Self::Job { id, payload } => {
                d.reserve(8 + payload.len());
                d.extend_from_slice(&id.to_le_bytes());
                d.extend_from_slice(payload);
                JOB
            }
            Self::Result { id, outcome } => {
                d.extend_from_slice(&id.to_le_bytes());
                match outcome {
                    Ok(bytes) => {
                        d.push(1);
                        d.extend_from_slice(bytes);
                    }
                    Err(text) => {
                        d.push(0);
                        d.extend_from_slice(text.as_bytes());
                    }
                }
                RESULT
            }
        };
        (code, d)
    }

    /// The frame of a code and its data; `None` for a code outside the range or data of the
    /// wrong shape.
    pub fn decode(code: u32, data: &[u8]) -> Option<Self> {
        let u64_at = |at: usize| -> Option<u64> {
            let b: [u8; 8] = data.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(b))
        };
        let exactly = |n: usize| (data.len() == n).then_some(());
        Some(match code {
            PING => {
                exactly(8)?;
                Self::Ping(u64_at(0)?)
            }
            PONG => {
                exactly(8)?;
                Self::Pong(u64_at(0)?)
            }
            READY => {
                exactly(0)?;
                Self::Ready
            }
            STOP => {
                exactly(17)?;
                Self::Stop {
                    why: data[0],
                    deadline: Duration::from_millis(u64_at(1)?),
                    quiet: Duration::from_millis(u64_at(9)?),
                }
            }
            RECYCLE => {
                exactly(8)?;
                Self::Recycle(u64_at(0)?)
            }
            GAVE_UP => {
                let b: [u8; 4] = data.get(..4)?.try_into().ok()?;
                let name = std::str::from_utf8(&data[4..]).ok()?;
                Self::GaveUp {
                    restarts: u32::from_le_bytes(b),
                    name: (!name.is_empty()).then(|| name.to_owned()),
                }
            }
            JOB => Self::Job {
                id: u64_at(0)?,
                payload: data[8..].to_vec(),
            },
            RESULT => {
                let id = u64_at(0)?;
                let rest = data.get(9..)?;
                let outcome = match data[8] {
                    1 => Ok(rest.to_vec()),
                    0 => Err(String::from_utf8_lossy(rest).into_owned()),
                    _ => return None,
                };
                Self::Result { id, outcome }
            }
            _ => return None,
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            SupervisionFrame::Ping(7),
            SupervisionFrame::Pong(u64::MAX),
            SupervisionFrame::Ready,
            SupervisionFrame::Stop {
                why: 2,
                deadline: Duration::from_millis(1500),
                quiet: Duration::from_millis(20),
            },
            SupervisionFrame::Recycle(123),
            SupervisionFrame::GaveUp {
                restarts: 5,
                name: Some("db".into()),
            },
            SupervisionFrame::GaveUp {
                restarts: 1,
                name: None,
            },
            SupervisionFrame::Job {
                id: 9,
                payload: vec![1, 2, 3],
            },
            SupervisionFrame::Job {
                id: 10,
                payload: Vec::new(),
            },
            SupervisionFrame::Result {
                id: 9,
                outcome: Ok(vec![4, 5]),
            },
            SupervisionFrame::Result {
                id: 9,
                outcome: Err("boom".into()),
            },
        ];
        for f in frames {
            let (code, data) = f.encode();
            assert!(is_supervision(code));
            assert_eq!(SupervisionFrame::decode(code, &data), Some(f));
        }
    }

    #[test]
    fn frames_are_taken_only_from_who_may_send_them() {
        let senders = [
            SupervisionSender::Parent { supervised: true },
            SupervisionSender::Parent { supervised: false },
            SupervisionSender::Child {
                forked: true,
                supervised: true,
            },
            SupervisionSender::Child {
                forked: true,
                supervised: false,
            },
            SupervisionSender::Child {
                forked: false,
                supervised: false,
            },
            SupervisionSender::Child {
                forked: false,
                supervised: true,
            },
            SupervisionSender::Attached,
        ];
        let from_supervisor =
            |s: SupervisionSender| s == SupervisionSender::Parent { supervised: true };
        let from_worker = |s: SupervisionSender| {
            matches!(
                s,
                SupervisionSender::Child {
                    supervised: true,
                    ..
                }
            )
        };
        let from_forked =
            |s: SupervisionSender| matches!(s, SupervisionSender::Child { forked: true, .. });
        let rules: [(u32, &dyn Fn(SupervisionSender) -> bool); 8] = [
            (PING, &from_supervisor),
            (STOP, &from_supervisor),
            (JOB, &from_supervisor),
            (PONG, &from_worker),
            (READY, &from_worker),
            (RECYCLE, &from_worker),
            (RESULT, &from_worker),
            (GAVE_UP, &from_forked),
        ];
        for (code, may) in rules {
            for s in senders {
                assert_eq!(accepted(code, s), may(s), "{code:#x} from {s:?}");
            }
        }
        // An exec'd node no supervisor owns can send no supervision frame at all; nor can
        // an attached peer.
        for code in [PING, PONG, READY, STOP, RECYCLE, GAVE_UP, JOB, RESULT] {
            let exec = SupervisionSender::Child {
                forked: false,
                supervised: false,
            };
            assert!(!accepted(code, exec), "{code:#x}");
            assert!(!accepted(code, SupervisionSender::Attached), "{code:#x}");
        }
        for s in senders {
            assert!(!accepted(BASE, s) && !accepted(BASE + 99, s), "{s:?}");
        }
    }

    #[test]
    fn malformed_frames_are_refused_without_panicking() {
        assert_eq!(SupervisionFrame::decode(PING, &[1, 2, 3]), None);
        assert_eq!(SupervisionFrame::decode(READY, &[0]), None);
        assert_eq!(SupervisionFrame::decode(STOP, &[0; 16]), None);
        assert_eq!(SupervisionFrame::decode(JOB, &[0; 7]), None);
        assert_eq!(SupervisionFrame::decode(RESULT, &[0; 8]), None);
        assert_eq!(
            SupervisionFrame::decode(RESULT, &[0, 0, 0, 0, 0, 0, 0, 0, 7]),
            None
        );
        assert_eq!(SupervisionFrame::decode(GAVE_UP, &[0, 0, 0, 0, 0xff]), None);
        assert_eq!(SupervisionFrame::decode(BASE + 99, &[]), None);
        assert!(!is_supervision(BASE));
        assert!(!is_supervision(0x4642_0001));
    }
}
