//! Properties of the node core over random process trees in the simulator: the drain loses
//! nothing and its tally balances, every child ends in one peer shutdown and then one
//! child exit whatever order its end of file and its reaping come in, deaths during a drain
//! are counted, and control frames from the wrong relation are refused.

use std::time::Duration;

use forkbus_node::sim::{pid_of, Life, ProcSim, ProcSimConfig};
use forkbus_node::{Control, ExitStatus, NodeConfig, NodeEvent, Refusal, Relation, Tally};
use forkbus_router::sim::Sim;
use forkbus_router::{Address, Event, MessageId, SendOptions};
use proptest::prelude::*;

/// Cases per property: `PROPTEST_CASES` when set (for long runs), else the default.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(seed: u64) -> ProcSimConfig {
    ProcSimConfig {
        seed,
        node: NodeConfig::default().drain_timeout(Duration::from_secs(5)),
        ..ProcSimConfig::default()
    }
}

/// A tree of `n` processes, each forked by a random earlier one, run until every node
/// knows every other's route (before that, a send to a node not heard of yet is a sure
/// `NoRoute` loss).
fn random_tree(sim: &mut ProcSim, n: usize) {
    for i in 1..n {
        let parent = sim.rng().below(i as u64) as usize;
        sim.fork(parent).expect("valid config");
    }
    sim.run_until(Duration::from_millis(50), |_| false)
        .expect("no livelock");
}

fn receipt() -> SendOptions {
    SendOptions {
        receipt: true,
        ..SendOptions::default()
    }
}

/// Sends of `rounds` rounds from random processes to random others, with receipts, the
/// clock moving between rounds; returns what was accepted, by origin.
fn traffic(sim: &mut ProcSim, rounds: usize, per_round: usize) -> Vec<(usize, MessageId)> {
    let n = sim.procs.len();
    let mut sent = Vec::new();
    for _ in 0..rounds {
        for _ in 0..per_round {
            let from = sim.rng().below(n as u64) as usize;
            let to = sim.rng().below(n as u64) as usize;
            let to = Address::from(Sim::node_id(to));
            match sim.send(from, to, vec![7; 24], receipt()) {
                Ok(id) => sent.push((from, id)),
                Err(Refusal::Draining { .. }) => {}
                Err(e) => panic!("refused: {e:?}"),
            }
        }
        let step = Duration::from_micros(sim.rng().below(300));
        sim.advance(step).expect("no livelock");
    }
    sent
}

/// Each parent's events about each of its children: (peer shutdowns, child exits, whether
/// the shutdown came first).
fn ends_of_children(sim: &ProcSim) -> Vec<(usize, usize, usize, bool)> {
    let mut out = Vec::new();
    for (c, child) in sim.procs.iter().enumerate() {
        let Some(p) = child.parent else { continue };
        let events = &sim.procs[p].events;
        let shutdowns: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, NodeEvent::PeerShutdown(d) if d.relation == Relation::Child(child.pid)))
            .map(|(i, _)| i)
            .collect();
        let exits: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, NodeEvent::ChildExit { pid, .. } if *pid == child.pid))
            .map(|(i, _)| i)
            .collect();
        let ordered = matches!((shutdowns.first(), exits.first()), (Some(s), Some(x)) if s < x);
        out.push((c, shutdowns.len(), exits.len(), ordered));
    }
    out
}

fn outcome_of(sim: &ProcSim, from: usize, id: MessageId) -> Vec<&Event> {
    sim.procs[from]
        .events
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Router(r @ Event::Delivered(x)) if *x == id => Some(r),
            NodeEvent::Router(r @ Event::Lost(l)) if l.id == id => Some(r),
            _ => None,
        })
        .collect()
}

fn everyone_gone_but_the_root(sim: &ProcSim) -> bool {
    sim.procs[0].drained.is_some()
        && sim.procs[1..]
            .iter()
            .all(|p| matches!(p.life, Life::Reaped(_)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), .. ProptestConfig::default() })]

    /// A drain begun at the root in the middle of traffic loses nothing: every envelope
    /// accepted is delivered (its receipt says so), every process exits 0 once its subtree
    /// is gone, each child ends in one peer shutdown and then one exit, and the root's tally
    /// counts every process and balances.
    #[test]
    fn a_drain_under_traffic_loses_nothing_and_balances(
        seed in any::<u64>(), n in 1usize..=12, before in 0usize..6, after in 0usize..6, per_round in 1usize..8,
    ) {
        let mut sim = ProcSim::new(config(seed)).expect("valid config");
        random_tree(&mut sim, n);
        let mut sent = traffic(&mut sim, before, per_round);
        sim.begin_drain(0);
        // The root refuses at once; the others only once the drain reached them.
        let refused = sim.send(0, Address::from(Sim::node_id(n - 1)), vec![1], receipt());
        let refused_draining = matches!(refused, Err(Refusal::Draining { .. }));
        prop_assert!(refused_draining, "the root sent while draining");
        sent.extend(traffic(&mut sim, after, per_round));
        sim.run_until(Duration::from_secs(60), everyone_gone_but_the_root).expect("no livelock");

        let tally = sim.procs[0].drained.expect("the root drained");
        prop_assert_eq!(tally.processes, n as u64, "{:?}", tally);
        prop_assert!(tally.balanced(), "{:?}", tally);
        prop_assert_eq!(tally.lost, 0);
        for p in &sim.procs[1..] {
            prop_assert_eq!(p.life, Life::Reaped(ExitStatus::Code(0)));
        }
        for (from, id) in sent {
            let outcome = outcome_of(&sim, from, id);
            prop_assert!(matches!(outcome.as_slice(), [Event::Delivered(_)]), "{id}: {outcome:?}");
        }
        for (c, shutdowns, exits, ordered) in ends_of_children(&sim) {
            prop_assert_eq!((shutdowns, exits), (1, 1), "child {}", c);
            prop_assert!(ordered, "child {}: its exit before its peer shutdown", c);
        }
        for p in &sim.procs {
            let bad = p.events.iter().any(|e| matches!(e, NodeEvent::BadControl { .. }));
            prop_assert!(!bad, "a control frame was refused");
            prop_assert_eq!(p.events.iter().filter(|e| matches!(e, NodeEvent::Draining)).count(), 1);
        }
    }

    /// Processes killed at random moments: each child of a live parent ends in exactly one
    /// peer shutdown and then exactly one child exit, whichever the parent saw first (the
    /// end of file or the reaping); what a child's subtree had, its killer's lost lists say.
    #[test]
    fn every_child_ends_in_one_shutdown_then_one_exit(
        seed in any::<u64>(), n in 2usize..=12, kills in proptest::collection::vec((any::<u16>(), 0u64..500), 1..6),
    ) {
        let mut sim = ProcSim::new(config(seed)).expect("valid config");
        random_tree(&mut sim, n);
        traffic(&mut sim, 1, 4);
        for (who, wait) in kills {
            let victim = 1 + usize::from(who) % (n - 1);
            sim.kill(victim);
            sim.advance(Duration::from_micros(wait)).expect("no livelock");
        }
        sim.run_until(Duration::from_secs(1), |_| false).expect("no livelock");
        for (c, shutdowns, exits, ordered) in ends_of_children(&sim) {
            let parent = sim.procs[c].parent.expect("a child");
            if sim.procs[parent].life != Life::Alive {
                continue;
            }
            match sim.procs[c].life {
                Life::Alive | Life::Stopped => prop_assert_eq!((shutdowns, exits), (0, 0), "child {} alive", c),
                Life::Reaped(status) => {
                    prop_assert_eq!((shutdowns, exits), (1, 1), "child {}", c);
                    prop_assert!(ordered, "child {}", c);
                    let reported = sim.procs[parent].events.iter().find_map(|e| match e {
                        NodeEvent::ChildExit { pid, status } if *pid == sim.procs[c].pid => Some(*status),
                        _ => None,
                    });
                    prop_assert_eq!(reported, Some(status));
                }
                Life::Exited(_) => prop_assert!(false, "child {} never reaped", c),
            }
        }
    }

    /// A process killed during a drain: the drain still ends (by its deadline at worst),
    /// every process is gone, and the tally says its counts are missing.
    #[test]
    fn a_death_during_a_drain_is_counted_unreported(
        seed in any::<u64>(), n in 2usize..=10, who in any::<u16>(), wait in 0u64..3_000,
    ) {
        let mut sim = ProcSim::new(config(seed)).expect("valid config");
        random_tree(&mut sim, n);
        traffic(&mut sim, 2, 4);
        sim.begin_drain(0);
        sim.advance(Duration::from_micros(wait)).expect("no livelock");
        let victim = 1 + usize::from(who) % (n - 1);
        let killed = sim.procs[victim].life == Life::Alive;
        sim.kill(victim);
        sim.run_until(Duration::from_secs(60), everyone_gone_but_the_root).expect("no livelock");
        let tally = sim.procs[0].drained.expect("the root drained");
        for p in &sim.procs[1..] {
            prop_assert!(matches!(p.life, Life::Reaped(_)), "{:?}", p.life);
        }
        if killed {
            prop_assert!(tally.unreported >= 1, "{:?}", tally);
            prop_assert!(!tally.balanced());
            prop_assert_eq!(tally.processes + tally.unreported >= n as u64, true, "{:?}", tally);
        }
    }
}

/// Across seeds, both orders happen: the reaping before the end of file and after it.
#[test]
fn both_orders_of_eof_and_reaping_occur() {
    let mut before = 0;
    let mut after = 0;
    for seed in 0..64 {
        let mut sim = ProcSim::new(config(seed)).expect("valid config");
        random_tree(&mut sim, 4);
        for victim in 1..4 {
            sim.kill(victim);
        }
        sim.run_until(Duration::from_secs(1), |_| false)
            .expect("no livelock");
        before += sim.stats.reaped_before_eof;
        after += sim.stats.reaped_after_eof;
    }
    assert!(before > 0 && after > 0, "before {before}, after {after}");
}

/// A child that never answers the probes: the drain's deadline tells it to exit, then
/// kills it, and the tally says it never reported.
#[test]
fn a_child_that_never_answers_is_killed_at_the_deadline() {
    let mut sim = ProcSim::new(config(7)).expect("valid config");
    sim.fork(0).expect("valid config");
    sim.fork(1).expect("valid config");
    sim.run_until(Duration::from_millis(1), |_| false)
        .expect("no livelock");
    // The grandchild hangs (`SIGSTOP`): its parent's probes go unanswered.
    sim.freeze(2);
    let start = sim.now();
    sim.begin_drain(0);
    sim.run_until(Duration::from_secs(60), |s| s.procs[0].drained.is_some())
        .expect("no livelock");
    let tally = sim.procs[0].drained.expect("the root drained");
    let took = sim.now().saturating_duration_since(start);
    assert!(
        took >= Duration::from_secs(5),
        "ended before the deadline: {took:?}"
    );
    assert!(tally.unreported >= 1, "{tally:?}");
    assert_eq!(
        sim.procs[2].life,
        Life::Reaped(ExitStatus::Signal(9)),
        "killed"
    );
    assert!(matches!(sim.procs[1].life, Life::Reaped(_)));
    assert!(sim.stats.killed >= 1);
}

/// Control frames are taken only from the relation that may send them: a child cannot
/// drain or stop its parent, a parent cannot fake a child's tally.
#[test]
fn control_frames_from_the_wrong_relation_are_refused() {
    let mut sim = ProcSim::new(config(3)).expect("valid config");
    sim.fork(0).expect("valid config");
    sim.run_until(Duration::from_millis(1), |_| false)
        .expect("no livelock");
    let forged = [Control::Drain, Control::Exit, Control::Probe(1)];
    for c in &forged {
        let (code, data) = c.encode();
        assert!(sim.procs[1].node.send_control(Relation::Parent, code, data));
    }
    let (code, data) = Control::Tally(Tally::default()).encode();
    assert!(sim.procs[0]
        .node
        .send_control(Relation::Child(pid_of(1)), code, data));
    sim.run_until(Duration::from_millis(10), |_| false)
        .expect("no livelock");
    let bad = |p: usize| {
        sim.procs[p]
            .events
            .iter()
            .filter(|e| matches!(e, NodeEvent::BadControl { .. }))
            .count()
    };
    assert_eq!(
        bad(0),
        forged.len(),
        "the parent refused its child's frames"
    );
    assert_eq!(bad(1), 1, "the child refused its parent's tally");
    assert!(!sim.procs[0].node.is_draining());
    assert!(!sim.procs[1].node.is_draining());
    assert_eq!(sim.procs[1].life, Life::Alive);
}

/// A drained child goes Running → Stopping (told to exit) → gone, and its parent only
/// finishes once it is gone.
#[test]
fn the_drain_moves_children_through_stopping() {
    use forkbus_node::ChildState;
    let mut sim = ProcSim::new(config(11)).expect("valid config");
    random_tree(&mut sim, 3); // 0 → 1 → 2 or 0 → {1, 2}
    let child = pid_of(1);
    let state = |s: &ProcSim| s.procs[0].node.child(child).map(|c| c.state);
    assert!(matches!(state(&sim), Some(ChildState::Running { .. })));
    sim.begin_drain(0);
    sim.run_until(Duration::from_secs(10), |s| {
        matches!(state(s), Some(ChildState::Stopping { .. }))
    })
    .expect("no livelock");
    assert!(matches!(state(&sim), Some(ChildState::Stopping { .. })));
    assert!(sim.procs[0].drained.is_none(), "finished with a child left");
    sim.run_until(Duration::from_secs(10), |s| s.procs[0].drained.is_some())
        .expect("no livelock");
    assert_eq!(state(&sim), None, "the child is gone once the root drained");
}
