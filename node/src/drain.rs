//! The graceful drain of a subtree, as states: decisions only, no syscalls, no clock.
//!
//! ```text
//!   Running ──begin──► Draining ──two quiet waves (or the deadline)──► Exiting ──► done
//!                       refuse sends,                                  EXIT down,
//!                       DRAIN down,                                    children reaped,
//!                       probe waves                                    router idle
//! ```
//!
//! A drain must lose nothing that is in flight: every node stops originating, but
//! envelopes already sent keep moving and must reach their destinations before anyone
//! exits. The node that begins the drain (the root, for the whole tree) runs probe waves
//! down its subtree: every node answers once all its children answered, saying whether
//! its whole subtree was *still* — each process idle (nothing queued, unacknowledged or
//! awaiting a receipt: receipts and notices are acknowledged like envelopes, so idle means
//! nothing of its is in flight) and nothing received since its previous answer. Sends are
//! refused everywhere and a node only ever sends in answer to what it receives, so two
//! still waves in a row mean the subtree is quiet; then EXIT goes down and the subtree
//! exits bottom-up, each process once its children are reaped and its router is idle. A
//! drain that cannot get quiet (a child that does not answer, traffic from outside the
//! subtree) exits at its deadline.

use std::collections::BTreeSet;
use std::time::Duration;

use forkbus_router::Timestamp;

use crate::control::Control;
use crate::process::Pid;

/// Time between probe waves.
const WAVE_INTERVAL: Duration = Duration::from_millis(2);

/// Still waves in a row that prove the subtree quiet.
const STILL_WAVES: u32 = 2;

/// A wave this node waits on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Wave {
    id: u64,
    waiting: BTreeSet<Pid>,
    still: bool,
}

/// Where the drain is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not draining.
    Running,
    /// Sends refused, waiting for the subtree to get quiet.
    Draining {
        deadline: Timestamp,
        /// This node began the drain and runs the waves (else its parent does).
        initiator: bool,
        wave: Option<Wave>,
        /// Consecutive still waves (initiator).
        still_waves: u32,
        next_wave: u64,
        next_wave_at: Timestamp,
        /// Frames received at the last answer.
        rx_mark: u64,
    },
    /// Quiet (or out of time): children are told to exit; this node exits when they are
    /// reaped and its router is idle.
    Exiting { deadline: Timestamp, killed: bool },
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send a control frame to a child.
    ToChild(Pid, Control),
    /// Send a control frame to the parent.
    ToParent(Control),
    /// Kill the children left (the exit deadline passed).
    KillChildren,
    /// Done: report the tally to the parent and stop the loop.
    Finish,
}

/// What the driver knows of this node when the drain asks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NodeState<'a> {
    pub(crate) now: Timestamp,
    /// Children with an open link.
    pub(crate) children: &'a [Pid],
    /// No child left to reap, no program running.
    pub(crate) no_children: bool,
    /// The router is idle.
    pub(crate) idle: bool,
    /// Frames received so far.
    pub(crate) rx: u64,
}

/// The drain of one node.
#[derive(Debug)]
pub(crate) struct Drain {
    phase: Phase,
    timeout: Duration,
    grace: Duration,
    actions: Vec<Action>,
}

impl Drain {
    /// A drain that waits `timeout` for quiet and then as long for children to exit,
    /// killing them after that and waiting `grace` more.
    pub(crate) fn new(timeout: Duration, grace: Duration) -> Self {
        Self {
            phase: Phase::Running,
            timeout,
            grace,
            actions: Vec::new(),
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    #[cfg(test)]
    pub(crate) fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The actions to carry out, in order.
    pub(crate) fn poll_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// When [`tick`](Self::tick) is due next.
    pub(crate) fn poll_timeout(&self) -> Option<Timestamp> {
        match &self.phase {
            Phase::Running => None,
            Phase::Draining {
                deadline,
                initiator,
                wave,
                next_wave_at,
                ..
            } => {
                if *initiator && wave.is_none() {
                    Some((*deadline).min(*next_wave_at))
                } else {
                    Some(*deadline)
                }
            }
            Phase::Exiting { deadline, .. } => Some(*deadline),
        }
    }

    /// Begins draining: this node's own decision (`initiator`) or its parent's.
    pub(crate) fn begin(&mut self, s: NodeState<'_>, initiator: bool) {
        if !self.is_running() {
            return;
        }
        self.phase = Phase::Draining {
            deadline: s.now + self.timeout,
            initiator,
            wave: None,
            still_waves: 0,
            next_wave: 1,
            next_wave_at: s.now,
            rx_mark: s.rx,
        };
        for &pid in s.children {
            self.actions.push(Action::ToChild(pid, Control::Drain));
        }
    }

    /// The parent probes: pass the wave on, answer when the children did.
    pub(crate) fn handle_probe(&mut self, s: NodeState<'_>, id: u64) {
        self.begin(s, false);
        if let Phase::Draining { wave, .. } = &mut self.phase {
            *wave = Some(Wave {
                id,
                waiting: s.children.iter().copied().collect(),
                still: true,
            });
            for &pid in s.children {
                self.actions.push(Action::ToChild(pid, Control::Probe(id)));
            }
        }
        self.complete_wave(s);
    }

    /// A child answered a probe.
    pub(crate) fn handle_quiet(&mut self, s: NodeState<'_>, from: Pid, id: u64, still: bool) {
        if let Phase::Draining { wave: Some(w), .. } = &mut self.phase {
            if w.id == id && w.waiting.remove(&from) {
                w.still &= still;
            }
        }
        self.complete_wave(s);
    }

    /// A child went away (its link is down): no answer will come from it, and its going
    /// changed things (what it held is being reported lost).
    pub(crate) fn handle_child_gone(&mut self, s: NodeState<'_>, pid: Pid) {
        if let Phase::Draining { wave: Some(w), .. } = &mut self.phase {
            if w.waiting.remove(&pid) {
                w.still = false;
            }
        }
        self.complete_wave(s);
    }

    /// The parent says exit.
    pub(crate) fn handle_exit(&mut self, s: NodeState<'_>) {
        self.begin(s, false);
        self.exit(s);
    }

    /// Time passed or something changed: start a wave, move to exiting, finish.
    pub(crate) fn tick(&mut self, s: NodeState<'_>) {
        match &mut self.phase {
            Phase::Running => {}
            Phase::Draining {
                deadline,
                initiator,
                wave,
                next_wave,
                next_wave_at,
                ..
            } => {
                if s.now >= *deadline {
                    tracing::warn!("drain deadline passed before the subtree was quiet");
                    self.exit(s);
                } else if *initiator && wave.is_none() && s.now >= *next_wave_at {
                    let id = *next_wave;
                    *next_wave += 1;
                    *wave = Some(Wave {
                        id,
                        waiting: s.children.iter().copied().collect(),
                        still: true,
                    });
                    for &pid in s.children {
                        self.actions.push(Action::ToChild(pid, Control::Probe(id)));
                    }
                    self.complete_wave(s);
                }
            }
            Phase::Exiting { deadline, killed } => {
                if s.no_children && s.idle {
                    self.finish();
                } else if s.now >= *deadline && !*killed {
                    *killed = true;
                    *deadline = s.now + self.grace;
                    self.actions.push(Action::KillChildren);
                } else if s.now >= *deadline {
                    self.finish();
                }
            }
        }
    }

    fn complete_wave(&mut self, s: NodeState<'_>) {
        let Phase::Draining {
            initiator,
            wave,
            still_waves,
            next_wave_at,
            rx_mark,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if !wave.as_ref().is_some_and(|w| w.waiting.is_empty()) {
            return;
        }
        let Some(w) = wave.take() else {
            return;
        };
        let still = w.still && s.idle && s.rx == *rx_mark;
        *rx_mark = s.rx;
        if !*initiator {
            self.actions
                .push(Action::ToParent(Control::Quiet { wave: w.id, still }));
            return;
        }
        *still_waves = if still { *still_waves + 1 } else { 0 };
        *next_wave_at = s.now + WAVE_INTERVAL;
        if *still_waves >= STILL_WAVES {
            self.exit(s);
        }
    }

    fn exit(&mut self, s: NodeState<'_>) {
        if matches!(self.phase, Phase::Exiting { .. }) {
            return;
        }
        self.phase = Phase::Exiting {
            deadline: s.now + self.timeout,
            killed: false,
        };
        for &pid in s.children {
            self.actions.push(Action::ToChild(pid, Control::Exit));
        }
        self.tick(s);
    }

    fn finish(&mut self) {
        self.phase = Phase::Running;
        self.actions.push(Action::Finish);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_nanos(ms * 1_000_000)
    }

    fn state(now: u64, children: &[Pid], idle: bool, rx: u64) -> NodeState<'_> {
        NodeState {
            now: t(now),
            children,
            no_children: children.is_empty(),
            idle,
            rx,
        }
    }

    fn actions(d: &mut Drain) -> Vec<Action> {
        d.poll_actions().collect()
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn an_initiator_exits_after_two_still_waves_and_not_before() {
        let kids = [Pid::from_raw(7)];
        let mut d = Drain::new(TIMEOUT, Duration::from_secs(1));
        d.begin(state(0, &kids, true, 0), true);
        assert_eq!(
            actions(&mut d),
            vec![Action::ToChild(kids[0], Control::Drain)]
        );
        d.tick(state(0, &kids, true, 0));
        assert_eq!(
            actions(&mut d),
            vec![Action::ToChild(kids[0], Control::Probe(1))]
        );
        // The child's subtree was busy.
        d.handle_quiet(state(1, &kids, true, 0), kids[0], 1, false);
        d.tick(state(3, &kids, true, 0));
        assert_eq!(
            actions(&mut d),
            vec![Action::ToChild(kids[0], Control::Probe(2))]
        );
        d.handle_quiet(state(3, &kids, true, 0), kids[0], 2, true);
        // Something arrived here meanwhile: not still.
        d.tick(state(5, &kids, true, 4));
        assert_eq!(
            actions(&mut d),
            vec![Action::ToChild(kids[0], Control::Probe(3))]
        );
        d.handle_quiet(state(5, &kids, true, 4), kids[0], 3, true);
        d.tick(state(7, &kids, true, 4));
        assert_eq!(
            actions(&mut d),
            vec![Action::ToChild(kids[0], Control::Probe(4))]
        );
        // A stale answer to an old wave changes nothing.
        d.handle_quiet(state(7, &kids, true, 4), kids[0], 3, true);
        assert!(actions(&mut d).is_empty());
        d.handle_quiet(state(7, &kids, true, 4), kids[0], 4, true);
        assert!(
            actions(&mut d).is_empty(),
            "one still wave after a busy one"
        );
        d.tick(state(9, &kids, true, 4));
        assert_eq!(
            actions(&mut d),
            vec![Action::ToChild(kids[0], Control::Probe(5))]
        );
        d.handle_quiet(state(9, &kids, true, 4), kids[0], 5, true);
        assert_eq!(
            actions(&mut d),
            vec![Action::ToChild(kids[0], Control::Exit)]
        );
        assert!(matches!(d.phase(), Phase::Exiting { .. }));
        // Exits once the child is reaped and the router idle.
        d.tick(state(10, &[], false, 4));
        assert!(actions(&mut d).is_empty());
        d.tick(state(11, &[], true, 4));
        assert_eq!(actions(&mut d), vec![Action::Finish]);
        assert!(d.is_running());
    }

    #[test]
    fn a_follower_answers_once_its_children_did() {
        let kids = [Pid::from_raw(7), Pid::from_raw(8)];
        let mut d = Drain::new(TIMEOUT, Duration::from_secs(1));
        d.handle_probe(state(0, &kids, true, 3), 5);
        assert_eq!(
            actions(&mut d),
            vec![
                Action::ToChild(kids[0], Control::Drain),
                Action::ToChild(kids[1], Control::Drain),
                Action::ToChild(kids[0], Control::Probe(5)),
                Action::ToChild(kids[1], Control::Probe(5)),
            ]
        );
        d.handle_quiet(state(1, &kids, true, 3), kids[1], 5, true);
        assert!(actions(&mut d).is_empty());
        d.handle_child_gone(state(1, &kids[..1], true, 3), kids[0]);
        assert_eq!(
            actions(&mut d),
            vec![Action::ToParent(Control::Quiet {
                wave: 5,
                still: false
            })],
            "a child gone is not still"
        );
        // A leaf answers at once; still only when idle.
        let mut leaf = Drain::new(TIMEOUT, Duration::from_secs(1));
        leaf.handle_probe(state(0, &[], false, 0), 1);
        assert_eq!(
            actions(&mut leaf),
            vec![Action::ToParent(Control::Quiet {
                wave: 1,
                still: false
            })]
        );
        leaf.handle_probe(state(1, &[], true, 0), 2);
        assert_eq!(
            actions(&mut leaf),
            vec![Action::ToParent(Control::Quiet {
                wave: 2,
                still: true
            })]
        );
        leaf.handle_exit(state(2, &[], true, 0));
        assert_eq!(actions(&mut leaf), vec![Action::Finish]);
    }

    #[test]
    fn deadlines_end_a_drain_that_never_gets_quiet() {
        let kids = [Pid::from_raw(7)];
        let mut d = Drain::new(TIMEOUT, Duration::from_secs(1));
        d.begin(state(0, &kids, true, 0), true);
        d.tick(state(0, &kids, true, 0));
        let _ = actions(&mut d);
        // The child never answers.
        d.tick(state(10_000, &kids, true, 0));
        assert_eq!(
            actions(&mut d),
            vec![Action::ToChild(kids[0], Control::Exit)]
        );
        d.tick(state(20_000, &kids, true, 0));
        assert_eq!(actions(&mut d), vec![Action::KillChildren]);
        d.tick(state(20_500, &kids, true, 0));
        assert!(actions(&mut d).is_empty());
        d.tick(state(21_000, &kids, true, 0));
        assert_eq!(actions(&mut d), vec![Action::Finish]);
    }
}
