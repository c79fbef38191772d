//! The supervision protocol: link-level control frames between a supervisor and the
//! processes it forked (never routed, never seen by listeners' `on_message`).
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
//! are taken only from the neighbour that may send them ([`accepted`]): `PING`, `STOP` and
//! `JOB` from the parent of a supervised worker; `PONG`, `READY`, `RECYCLE` and `RESULT`
//! from a child that a supervisor of this process owns; `GAVE_UP` from a child this
//! process forked (a supervisor of its own gave up), never from a program started with
//! `Bus::exec_node`. Anything else is reported as a bad control frame and ignored.

use std::time::Duration;

/// The first code of the supervision range.
const BASE: u32 = 0x4642_0100;
pub(crate) const PING: u32 = BASE + 1;
pub(crate) const PONG: u32 = BASE + 2;
pub(crate) const READY: u32 = BASE + 3;
pub(crate) const STOP: u32 = BASE + 4;
pub(crate) const RECYCLE: u32 = BASE + 5;
pub(crate) const GAVE_UP: u32 = BASE + 6;
pub(crate) const JOB: u32 = BASE + 7;
pub(crate) const RESULT: u32 = BASE + 8;

/// Whether a control code belongs to supervision.
#[cfg(test)]
fn is_supervision(code: u32) -> bool {
    (PING..=RESULT).contains(&code)
}

/// Who a supervision frame came from, as far as taking it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sender {
    /// This process's parent; `supervised`: this process is a supervised worker (it has
    /// an agent).
    Parent { supervised: bool },
    /// A child of this process: `forked` by it (not started with `Bus::exec_node`),
    /// `supervised` (owned by one of its supervisors).
    Child { forked: bool, supervised: bool },
    /// An attached link.
    Attached,
}

/// Whether a frame with this code may come from `from` (see the module documentation).
pub(crate) fn accepted(code: u32, from: Sender) -> bool {
    match (code, from) {
        (PING | STOP | JOB, Sender::Parent { supervised }) => supervised,
        (PONG | READY | RECYCLE | RESULT, Sender::Child { supervised, .. }) => supervised,
        (GAVE_UP, Sender::Child { forked, .. }) => forked,
        _ => false,
    }
}

/// A decoded supervision frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Ping(u64),
    Pong(u64),
    Ready,
    Stop {
        why: u8,
        deadline: Duration,
        quiet: Duration,
    },
    Recycle(u64),
    GaveUp {
        restarts: u32,
        name: Option<String>,
    },
    Job {
        id: u64,
        payload: Vec<u8>,
    },
    Result {
        id: u64,
        outcome: Result<Vec<u8>, String>,
    },
}

impl Frame {
    /// Its code and data.
    pub(crate) fn encode(&self) -> (u32, Vec<u8>) {
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
    pub(crate) fn decode(code: u32, data: &[u8]) -> Option<Self> {
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
            Frame::Ping(7),
            Frame::Pong(u64::MAX),
            Frame::Ready,
            Frame::Stop {
                why: 2,
                deadline: Duration::from_millis(1500),
                quiet: Duration::from_millis(20),
            },
            Frame::Recycle(123),
            Frame::GaveUp {
                restarts: 5,
                name: Some("db".into()),
            },
            Frame::GaveUp {
                restarts: 1,
                name: None,
            },
            Frame::Job {
                id: 9,
                payload: vec![1, 2, 3],
            },
            Frame::Job {
                id: 10,
                payload: Vec::new(),
            },
            Frame::Result {
                id: 9,
                outcome: Ok(vec![4, 5]),
            },
            Frame::Result {
                id: 9,
                outcome: Err("boom".into()),
            },
        ];
        for f in frames {
            let (code, data) = f.encode();
            assert!(is_supervision(code));
            assert_eq!(Frame::decode(code, &data), Some(f));
        }
    }

    #[test]
    fn frames_are_taken_only_from_who_may_send_them() {
        let senders = [
            Sender::Parent { supervised: true },
            Sender::Parent { supervised: false },
            Sender::Child {
                forked: true,
                supervised: true,
            },
            Sender::Child {
                forked: true,
                supervised: false,
            },
            Sender::Child {
                forked: false,
                supervised: false,
            },
            Sender::Child {
                forked: false,
                supervised: true,
            },
            Sender::Attached,
        ];
        let from_supervisor = |s: Sender| s == Sender::Parent { supervised: true };
        let from_worker = |s: Sender| {
            matches!(
                s,
                Sender::Child {
                    supervised: true,
                    ..
                }
            )
        };
        let from_forked = |s: Sender| matches!(s, Sender::Child { forked: true, .. });
        let rules: [(u32, &dyn Fn(Sender) -> bool); 8] = [
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
            let exec = Sender::Child {
                forked: false,
                supervised: false,
            };
            assert!(!accepted(code, exec), "{code:#x}");
            assert!(!accepted(code, Sender::Attached), "{code:#x}");
        }
        for s in senders {
            assert!(!accepted(BASE, s) && !accepted(BASE + 99, s), "{s:?}");
        }
    }

    #[test]
    fn malformed_frames_are_refused_without_panicking() {
        assert_eq!(Frame::decode(PING, &[1, 2, 3]), None);
        assert_eq!(Frame::decode(READY, &[0]), None);
        assert_eq!(Frame::decode(STOP, &[0; 16]), None);
        assert_eq!(Frame::decode(JOB, &[0; 7]), None);
        assert_eq!(Frame::decode(RESULT, &[0; 8]), None);
        assert_eq!(Frame::decode(RESULT, &[0, 0, 0, 0, 0, 0, 0, 0, 7]), None);
        assert_eq!(Frame::decode(GAVE_UP, &[0, 0, 0, 0, 0xff]), None);
        assert_eq!(Frame::decode(BASE + 99, &[]), None);
        assert!(!is_supervision(BASE));
        assert!(!is_supervision(0x4642_0001));
    }
}
