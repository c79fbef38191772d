//! The node's link-level control frames: the drain and the shutdown tally.
//!
//! ```text
//!   code      direction        data
//!   DRAIN     parent → child   none: refuse new sends from now on, answer probes
//!   TALLY     child → parent   Tally: twelve u64 LE counters of the child's whole subtree;
//!                              its last frame
//!   PROBE     parent → child   wave u64 LE: is your subtree quiet?
//!   QUIET     child → parent   wave u64 LE, still u8: my subtree was quiet (1) or not (0)
//!   EXIT      parent → child   none: the tree is quiet, exit once your children have
//! ```
//!
//! Each is accepted only from the relation that may send it ([`Control::from_parent`],
//! [`Control::from_child`]); anything else is a bad control frame. The runtime's services
//! bring their frames into the same enum ([`Control::Supervision`]: supervision and the
//! task pool: [`SupervisionFrame`]); the node decodes them and hands them to the services,
//! which know who may send what.

pub(crate) mod supervision;

use self::supervision::SupervisionFrame;
use crate::tally::Tally;

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

/// A control frame of the node core.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Control {
    /// Parent → child: drain (refuse sends, answer probes).
    Drain,
    /// Parent → child: probe wave `n`.
    Probe(u64),
    /// Parent → child: the tree is quiet; exit once your children have.
    Exit,
    /// Child → parent: the answer to probe `wave`; `still` when the whole subtree was idle
    /// and received nothing since its previous answer.
    Quiet {
        /// The wave answered.
        wave: u64,
        /// Whether the subtree was still.
        still: bool,
    },
    /// Child → parent: its subtree's tally, its last frame.
    Tally(Tally),
    /// A frame of supervision or the task pool, for the runtime's supervision service.
    Supervision(SupervisionFrame),
}

impl Control {
    /// Whether a code is the node core's (else a service's).
    pub fn is_node_code(code: u32) -> bool {
        (CONTROL_DRAIN..=CONTROL_EXIT).contains(&code)
    }

    /// Its code and data.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        match self {
            Self::Drain => (CONTROL_DRAIN, Vec::new()),
            Self::Exit => (CONTROL_EXIT, Vec::new()),
            Self::Probe(w) => (CONTROL_PROBE, w.to_le_bytes().to_vec()),
            Self::Quiet { wave, still } => {
                let mut d = wave.to_le_bytes().to_vec();
                d.push(u8::from(*still));
                (CONTROL_QUIET, d)
            }
            Self::Tally(t) => (CONTROL_TALLY, t.encode()),
            Self::Supervision(f) => f.encode(),
        }
    }

    /// A service's frame (any code that is not the node's): `None` for a code nobody
    /// knows or data of the wrong shape.
    pub fn decode_service(code: u32, data: &[u8]) -> Option<Self> {
        if supervision::is_supervision(code) {
            return SupervisionFrame::decode(code, data).map(Self::Supervision);
        }
        None
    }

    /// A frame that came from this node's parent; `None` for one a parent may not send
    /// or data of the wrong shape.
    pub fn from_parent(code: u32, data: &[u8]) -> Option<Self> {
        match code {
            CONTROL_DRAIN if data.is_empty() => Some(Self::Drain),
            CONTROL_EXIT if data.is_empty() => Some(Self::Exit),
            CONTROL_PROBE => Some(Self::Probe(u64::from_le_bytes(data.try_into().ok()?))),
            _ => None,
        }
    }

    /// A frame that came from a child; `None` for one a child may not send or data of
    /// the wrong shape.
    pub fn from_child(code: u32, data: &[u8]) -> Option<Self> {
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
            CONTROL_TALLY => Tally::decode(data).map(Self::Tally),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert!(Control::is_node_code(code));
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
            assert!(Control::is_node_code(code));
            assert_eq!(Control::from_child(code, &data), Some(c.clone()));
            assert_eq!(
                Control::from_parent(code, &data),
                None,
                "{c:?} from the parent"
            );
        }
        assert!(!Control::is_node_code(CONTROL_DRAIN - 1));
        assert!(!Control::is_node_code(CONTROL_EXIT + 1));
        assert_eq!(Control::from_parent(CONTROL_PROBE, &[1, 2]), None);
        assert_eq!(Control::from_child(CONTROL_QUIET, &[0; 8]), None);
        assert_eq!(
            Control::from_child(CONTROL_QUIET, &[0, 0, 0, 0, 0, 0, 0, 0, 2]),
            None
        );
        assert_eq!(Control::from_child(CONTROL_TALLY, &[0xff]), None);
        assert_eq!(Control::from_parent(CONTROL_DRAIN, &[0]), None);
    }

    #[test]
    fn service_frames_share_the_enum_and_not_the_codes() {
        let c = Control::Supervision(SupervisionFrame::Ping(9));
        let (code, data) = c.encode();
        assert!(!Control::is_node_code(code));
        assert_eq!(Control::decode_service(code, &data), Some(c));
        assert_eq!(Control::from_parent(code, &data), None);
        assert_eq!(Control::decode_service(code, &[1]), None, "malformed");
        let (drain, none) = Control::Drain.encode();
        assert_eq!(Control::decode_service(drain, &none), None, "a node frame");
        assert_eq!(Control::decode_service(0xdead_beef, &[]), None);
    }
}
