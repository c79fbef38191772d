//! The runtime's link-level control frames of the drain, and the shutdown tally.
//!
//! ```text
//!   code      direction        data
//!   DRAIN     parent → child   none: refuse new sends from now on, answer probes
//!   TALLY     child → parent   CBOR Tally of the child's whole subtree, its last frame
//!   PROBE     parent → child   wave u64 LE: is your subtree quiet?
//!   QUIET     child → parent   wave u64 LE, still u8: my subtree was quiet (1) or not (0)
//!   EXIT      parent → child   none: the tree is quiet, exit once your children have
//! ```
//!
//! Each is accepted only from the relation that may send it (`Control::from_parent`,
//! `Control::from_child`); anything else is a bad control frame.

use std::ops::AddAssign;

use forkbus_router::RouterStats;
use serde::{Deserialize, Serialize};

/// Parent → child: drain.
const CONTROL_DRAIN: u32 = 0x4642_0001;
/// Child → parent: the tally of my subtree; my last frame.
const CONTROL_TALLY: u32 = 0x4642_0002;
/// Parent → child: a quiescence probe.
const CONTROL_PROBE: u32 = 0x4642_0003;
/// Child → parent: the answer to a probe.
const CONTROL_QUIET: u32 = 0x4642_0004;
/// Parent → child: exit.
const CONTROL_EXIT: u32 = 0x4642_0005;

/// A runtime control frame of the drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Drain,
    Probe(u64),
    Exit,
    Quiet { wave: u64, still: bool },
    Tally(Tally),
}

impl Control {
    /// Whether a code is the drain's.
    pub(crate) fn is_drain_code(code: u32) -> bool {
        (CONTROL_DRAIN..=CONTROL_EXIT).contains(&code)
    }

    /// Its code and data.
    pub(crate) fn encode(&self) -> (u32, Vec<u8>) {
        match self {
            Self::Drain => (CONTROL_DRAIN, Vec::new()),
            Self::Exit => (CONTROL_EXIT, Vec::new()),
            Self::Probe(w) => (CONTROL_PROBE, w.to_le_bytes().to_vec()),
            Self::Quiet { wave, still } => {
                let mut d = wave.to_le_bytes().to_vec();
                d.push(u8::from(*still));
                (CONTROL_QUIET, d)
            }
            Self::Tally(t) => {
                let mut scratch = Vec::new();
                let bytes = crate::message::encode(t, &mut scratch).unwrap_or_default();
                (CONTROL_TALLY, bytes)
            }
        }
    }

    /// A frame that came from this node's parent; `None` for one a parent may not send
    /// or data of the wrong shape.
    pub(crate) fn from_parent(code: u32, data: &[u8]) -> Option<Self> {
        match code {
            CONTROL_DRAIN if data.is_empty() => Some(Self::Drain),
            CONTROL_EXIT if data.is_empty() => Some(Self::Exit),
            CONTROL_PROBE => Some(Self::Probe(u64::from_le_bytes(data.try_into().ok()?))),
            _ => None,
        }
    }

    /// A frame that came from a child; `None` for one a child may not send or data of
    /// the wrong shape.
    pub(crate) fn from_child(code: u32, data: &[u8]) -> Option<Self> {
        match code {
            CONTROL_QUIET if data.len() == 9 => {
                let wave = u64::from_le_bytes(data[..8].try_into().ok()?);
                let still = match data[8] {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                Some(Self::Quiet { wave, still })
            }
            CONTROL_TALLY => crate::message::decode::<Tally>(data).ok().map(Self::Tally),
            _ => None,
        }
    }
}

/// What a (sub)tree did, summed over its processes at the end of a graceful shutdown.
///
/// Every process counts what it originated (`sent`), the extra copies it made fanning an
/// envelope out (`copies`: a broadcast leaving on three links and delivered here is one
/// copy in, four out), and how each copy that reached it ended: delivered to its
/// application, lost there (`lost`), dropped as a duplicate or a redundant copy, or absorbed
/// (a dead end). Every copy ends exactly once, so over a tree that drained with no process
/// lost ([`unreported`](Self::unreported) zero) and no link failed
/// ([`unknown`](Self::unknown) zero):
///
/// ```text
///   sent + copies == delivered + lost + duplicates + absorbed + held
/// ```
///
/// ([`balanced`](Self::balanced)). A copy written but unacknowledged when its link went down
/// is counted lost at the sender and may also have been delivered: with failures the left
/// side lies between the right side minus `unknown` and the right side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Tally {
    /// Processes that reported (this one included).
    pub processes: u64,
    /// Processes of the subtree that never reported: killed or crashed before the end
    /// (every process the tree ever heard of, restarts included; their counts are
    /// missing, so the tally cannot balance).
    pub unreported: u64,
    /// Envelopes originated.
    pub sent: u64,
    /// Extra copies made by fanning envelopes out (broadcast and group traffic).
    pub copies: u64,
    /// Copies delivered to applications.
    pub delivered: u64,
    /// Copies lost where they were (by the node that lost them), of sure or unknown fate.
    pub lost: u64,
    /// Of `lost`: written but unacknowledged when a link went down (fate unknown).
    pub unknown: u64,
    /// Copies dropped as duplicates or as redundant copies over peer links.
    pub duplicates: u64,
    /// Copies that ended with nowhere to go (a broadcast in a tree of one, a flood's dead
    /// end, a late envelope of a node that left).
    pub absorbed: u64,
    /// Copies still held in custody.
    pub held: u64,
    /// Loss reports that reached their origins ([`Listener::on_lost`](crate::Listener::on_lost)).
    pub lost_reports: u64,
    /// Receipts that ended unknown at their origins (timeout, destination down).
    pub receipt_failures: u64,
}

impl Tally {
    /// One process's own counts.
    pub(crate) fn of_node(stats: &RouterStats, lost_reports: u64, held: usize) -> Self {
        Self {
            processes: 1,
            unreported: 0,
            sent: stats.sent,
            copies: stats.fanout,
            delivered: stats.delivered,
            lost: stats.lost.copies(),
            unknown: stats.lost.unacknowledged,
            duplicates: stats.duplicates + stats.redundant,
            absorbed: stats.absorbed,
            held: held as u64,
            lost_reports,
            receipt_failures: stats.lost.receipt_failures(),
        }
    }

    /// Whether every copy made ended exactly once: true of a tree that drained with every
    /// process reporting and no link failing (see the type's doc).
    pub fn balanced(&self) -> bool {
        self.unreported == 0
            && self.unknown == 0
            && self.sent + self.copies
                == self.delivered + self.lost + self.duplicates + self.absorbed + self.held
    }
}

impl AddAssign for Tally {
    fn add_assign(&mut self, o: Self) {
        self.processes += o.processes;
        self.unreported += o.unreported;
        self.sent += o.sent;
        self.copies += o.copies;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.unknown += o.unknown;
        self.duplicates += o.duplicates;
        self.absorbed += o.absorbed;
        self.held += o.held;
        self.lost_reports += o.lost_reports;
        self.receipt_failures += o.receipt_failures;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_and_balance() {
        let mut a = Tally {
            processes: 1,
            sent: 10,
            copies: 6,
            delivered: 4,
            lost: 1,
            ..Tally::default()
        };
        let b = Tally {
            processes: 2,
            delivered: 9,
            duplicates: 1,
            absorbed: 1,
            ..Tally::default()
        };
        assert!(!a.balanced());
        a += b;
        assert_eq!(a.processes, 3);
        assert!(a.balanced());
        a.unreported = 1;
        assert!(!a.balanced(), "a process lost: its counts are missing");
    }

    #[test]
    fn control_frames_round_trip_and_keep_to_their_direction() {
        let t = Tally {
            processes: 7,
            sent: 100,
            delivered: 90,
            lost: 10,
            ..Tally::default()
        };
        for c in [Control::Drain, Control::Probe(u64::MAX), Control::Exit] {
            let (code, data) = c.encode();
            assert!(Control::is_drain_code(code));
            assert_eq!(Control::from_parent(code, &data), Some(c.clone()));
            assert_eq!(Control::from_child(code, &data), None, "{c:?} from a child");
        }
        for c in [
            Control::Quiet {
                wave: 3,
                still: true,
            },
            Control::Tally(t),
        ] {
            let (code, data) = c.encode();
            assert_eq!(Control::from_child(code, &data), Some(c.clone()));
            assert_eq!(
                Control::from_parent(code, &data),
                None,
                "{c:?} from the parent"
            );
        }
        assert_eq!(Control::from_parent(CONTROL_PROBE, &[1, 2]), None);
        assert_eq!(Control::from_child(CONTROL_QUIET, &[0; 8]), None);
        assert_eq!(
            Control::from_child(CONTROL_QUIET, &[0, 0, 0, 0, 0, 0, 0, 0, 2]),
            None
        );
        assert_eq!(Control::from_child(CONTROL_TALLY, &[0xff]), None);
        assert_eq!(Control::from_parent(CONTROL_DRAIN, &[0]), None);
    }
}
