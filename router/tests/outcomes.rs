//! Every outcome is true: receipts under adversarial load, names that move under traffic,
//! custody of a down worker's name, and unique names — over random trees in the
//! simulator.
//!
//! "True" is checked against what the destinations' applications really received:
//! `Delivered` ⇒ received exactly once; `Lost` (a sure loss) ⇒ received by nobody;
//! `Unknown` ⇒ received at most once. Exactly one outcome per receipt, none twice anywhere.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{cases, random_tree};
use forkbus_router::sim::{Sim, SimConfig};
use forkbus_router::{
    Destination, Error, Event, Fate, LossReason, MessageId, SendOptions, UnknownReason,
};
use proptest::prelude::*;

fn receipt() -> SendOptions {
    SendOptions {
        receipt: true,
        ..SendOptions::default()
    }
}

/// The one outcome an origin reported for `id`, or a failure naming what it got.
fn outcome(sim: &Sim, from: usize, id: MessageId) -> Result<Option<Fate>, String> {
    let mut got = Vec::new();
    for e in &sim.nodes[from].events {
        match e {
            Event::Delivered(x) if *x == id => got.push(None),
            Event::Lost(r) if r.id == id => got.push(Some(r.fate)),
            _ => {}
        }
    }
    match got.as_slice() {
        [one] => Ok(*one),
        other => Err(format!("{id:?}: {} outcomes {other:?}", other.len())),
    }
}

/// How many times each message id reached an application, over all nodes.
fn receptions(sim: &Sim) -> HashMap<MessageId, usize> {
    let mut m = HashMap::new();
    for node in &sim.nodes {
        for e in &node.events {
            if let Event::Message { envelope, .. } = e {
                *m.entry(envelope.id).or_default() += 1;
            }
        }
    }
    m
}

/// Checks every receipt's outcome against what was received; returns the outcomes.
fn check_truth(sim: &Sim, sent: &[(usize, MessageId)]) -> Result<Vec<Option<Fate>>, TestCaseError> {
    let got = receptions(sim);
    let mut all = Vec::new();
    for (from, id) in sent {
        if !sim.nodes[*from].alive {
            // Only the death of the origin itself leaves an outcome unreported.
            continue;
        }
        let o = outcome(sim, *from, *id).map_err(TestCaseError::fail)?;
        let n = got.get(id).copied().unwrap_or(0);
        match o {
            None => prop_assert_eq!(n, 1, "{:?} delivered but received {} times", id, n),
            Some(Fate::Lost(r)) => prop_assert_eq!(n, 0, "{:?} lost ({}) but received", id, r),
            Some(Fate::Unknown(_)) => prop_assert!(n <= 1, "{:?} received {} times", id, n),
        }
        all.push(o);
    }
    for (id, n) in &got {
        prop_assert!(*n <= 1, "{:?} received {} times", id, n);
    }
    for node in sim.nodes.iter().filter(|n| n.alive) {
        prop_assert_eq!(node.router.pending_receipts(), 0);
    }
    Ok(all)
}

/// Sends from random nodes to random nodes until `n_msgs` are accepted or refusals pile
/// up, stepping the clock a little now and then; local refusals (full queues) are retried
/// after a step, like an application waiting for room.
fn load(sim: &mut Sim, n: usize, n_msgs: usize, by_name: bool) -> Vec<(usize, MessageId)> {
    let mut sent = Vec::new();
    let mut refusals = 0;
    while sent.len() < n_msgs && refusals < 20 * n_msgs {
        let from = sim.rng().below(n as u64) as usize;
        let to = sim.rng().below(n as u64) as usize;
        if !sim.nodes[from].alive {
            refusals += 1;
            continue;
        }
        let addr: forkbus_router::Address = if by_name {
            Destination::Name(format!("w{to}")).into()
        } else {
            Sim::node_id(to).into()
        };
        match sim.send(from, addr, vec![7; 48], receipt()) {
            Ok(id) => sent.push((from, id)),
            Err(r) => {
                prop_assume_queue_full(&r.error);
                refusals += 1;
                let _ = sim.advance(Duration::from_micros(50));
            }
        }
        if sim.rng().chance(0.05) {
            let d = Duration::from_micros(sim.rng().below(100));
            let _ = sim.advance(d);
        }
    }
    sent
}

/// Every copy of every envelope ends exactly once over a quiet tree whose routers all
/// still exist: made by a submission or a fan-out, ended by a delivery, a loss where it
/// was, a dropped duplicate or redundant copy, a dead end, or custody. A copy written but
/// unacknowledged when its link went down is counted lost at the sender and may also have
/// ended at the receiver (its fate is unknown): with failures, `made` lies between the
/// sure ends and all ends; with none, they are equal.
fn check_copies_balance(sim: &Sim) -> Result<(), TestCaseError> {
    let (mut made, mut ended, mut unknown) = (0, 0, 0);
    for node in &sim.nodes {
        let s = node.router.stats();
        made += s.sent + s.fanout;
        ended += s.delivered + s.lost.copies() + s.duplicates + s.redundant + s.absorbed;
        ended += node.router.held() as u64;
        unknown += s.lost.unacknowledged;
    }
    prop_assert!(
        ended - unknown <= made && made <= ended,
        "copies made {}, ended {} ({} of unknown fate)",
        made,
        ended,
        unknown
    );
    if unknown == 0 {
        prop_assert_eq!(made, ended);
    }
    Ok(())
}

fn prop_assume_queue_full(e: &Error) {
    assert!(
        matches!(
            e,
            Error::QueueFull { .. } | Error::TooManyPendingReceipts { .. }
        ),
        "unexpected refusal {e:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), .. ProptestConfig::default() })]

    /// Under any load and no failure, every envelope sent with a receipt ends `Delivered`:
    /// no receipt is dropped, and a forwarding hop whose next link is full holds back what
    /// it receives (backpressure, hop by hop) instead of losing it. With tiny queues and
    /// socket buffers half the time, so that forwards wait and notices pile up.
    #[test]
    fn receipts_survive_any_load(
        n in 2usize..=24, seed in any::<u64>(), n_msgs in 50usize..600, tight in any::<bool>(),
    ) {
        let mut cfg = SimConfig { seed, ..SimConfig::default() };
        if tight {
            // Tiny queues and socket buffers: forwarded envelopes overflow, notices pile up.
            cfg.router.max_queue_envelopes = 2 + (seed % 7) as usize;
            cfg.router.ack_every = 1;
            cfg.wire_capacity = 256 + (seed % 1024) as usize;
        } else {
            cfg.router.max_queue_envelopes = 4 * n_msgs;
        }
        cfg.router.receipt_timeout = Some(Duration::from_secs(600));
        let mut sim = Sim::new(cfg);
        random_tree(&mut sim, n, seed);
        sim.run_until_idle().expect("settles");
        let sent = load(&mut sim, n, n_msgs, false);
        sim.run_until_idle().expect("settles");
        check_copies_balance(&sim)?;
        let outcomes = check_truth(&sim, &sent)?;
        for (o, (_, id)) in outcomes.iter().zip(&sent) {
            prop_assert!(o.is_none(), "{:?} ended {:?} with no failure", id, o);
        }

    }

    /// Broadcast, group and unicast traffic with links cut in the middle of it: every copy
    /// made (a broadcast becomes one per node) ends exactly once, up to the copies of
    /// unknown fate, so a tree's tally balances with broadcasts too.
    #[test]
    fn every_copy_ends_once_with_broadcasts_and_cuts(
        n in 2usize..=24, seed in any::<u64>(), rounds in 1usize..6,
    ) {
        let mut sim = Sim::new(SimConfig { seed, ..SimConfig::default() });
        random_tree(&mut sim, n, seed);
        for i in (0..n).step_by(3) {
            sim.nodes[i].router.join_group("g").expect("valid");
        }
        sim.run_until_idle().expect("settles");
        for _ in 0..rounds {
            for k in 0..sim.rng().below(20) + 1 {
                let from = sim.rng().below(n as u64) as usize;
                let to = sim.rng().below(n as u64) as usize;
                let dst: forkbus_router::Address = match k % 3 {
                    0 => Destination::Broadcast.into(),
                    1 => Destination::Group("g".into()).into(),
                    _ => Sim::node_id(to).into(),
                };
                let _ = sim.send(from, dst, vec![1; 32], SendOptions::default());
            }
            let d = Duration::from_micros(sim.rng().below(300));
            sim.advance(d).expect("settles");
            if sim.rng().chance(0.5) {
                let live: Vec<usize> = (0..sim.wires.len()).filter(|w| !sim.wires[*w].cut).collect();
                if !live.is_empty() {
                    let w = live[sim.rng().below(live.len() as u64) as usize];
                    sim.cut(w);
                }
            }
        }
        sim.run_until_idle().expect("settles");
        check_copies_balance(&sim)?;
    }

    /// Names move under traffic: workers are killed and restarted under their names by
    /// their parents (half the time holding the name in custody meanwhile), or replaced
    /// while the old process still lives. Every receipt sent by name has exactly one true
    /// outcome; a name never reaches two holders at once; custody loses nothing it holds.
    #[test]
    fn names_moving_under_traffic_keep_outcomes_true(
        n in 3usize..=16, seed in any::<u64>(), rounds in 1usize..8,
    ) {
        let mut cfg = SimConfig { seed, ..SimConfig::default() };
        cfg.router.receipt_timeout = Some(Duration::from_secs(5));
        let mut sim = Sim::new(cfg);
        let parents = random_tree(&mut sim, 1, seed);
        let _ = parents;
        // Workers w1..wn-1, each the child of a random earlier node, named at birth.
        let mut holder: HashMap<usize, usize> = HashMap::new(); // worker → current node
        let mut parent_of: HashMap<usize, usize> = HashMap::new();
        for w in 1..n {
            let len = sim.nodes.len() as u64;
            let p = sim.rng().below(len) as usize;
            let idx = sim.add_child_named(p, &[format!("w{w}")]).expect("free name");
            holder.insert(w, idx);
            parent_of.insert(idx, p);
        }
        sim.run_until_idle().expect("settles");
        let mut sent: Vec<(usize, MessageId)> = Vec::new();
        for _ in 0..rounds {
            for _ in 0..sim.rng().below(30) + 5 {
                let len = sim.nodes.len() as u64;
                let from = sim.rng().below(len) as usize;
                let w = 1 + sim.rng().below(n as u64 - 1) as usize;
                if !sim.nodes[from].alive {
                    continue;
                }
                if let Ok(id) = sim.send(from, Destination::Name(format!("w{w}")), vec![1; 16], receipt()) {
                    sent.push((from, id));
                }
            }
            let d = Duration::from_micros(sim.rng().below(300));
            sim.advance(d).expect("settles");
            // Move one name.
            let w = 1 + sim.rng().below(n as u64 - 1) as usize;
            let old = holder[&w];
            let p = parent_of[&old];
            if !sim.nodes[p].alive || !sim.nodes[old].alive {
                continue;
            }
            let name = format!("w{w}");
            match sim.rng().below(3) {
                0 => {
                    // Crash and restart, the name unheld in between.
                    sim.kill(old);
                    let d = Duration::from_micros(sim.rng().below(200));
                    sim.advance(d).expect("settles");
                }
                1 => {
                    // Crash; the parent holds the name in custody until the restart.
                    sim.kill(old);
                    sim.nodes[p].router.hold_name(&name, 64).expect("free after the crash");
                    let d = Duration::from_micros(sim.rng().below(200));
                    sim.advance(d).expect("settles");
                }
                _ => {
                    // A replacement takes the name over while the old one lives on.
                }
            }
            let new = sim.add_child_named(p, std::slice::from_ref(&name)).expect("sanctioned");
            holder.insert(w, new);
            parent_of.insert(new, p);
        }
        sim.run_until_idle().expect("settles");
        sim.advance(Duration::from_secs(6)).expect("settles");
        let outcomes = check_truth(&sim, &sent)?;
        // Nothing a custodian held was abandoned: every restart came.
        for o in outcomes.iter().flatten() {
            prop_assert_ne!(*o, Fate::Lost(LossReason::Abandoned));
        }
        for node in &sim.nodes {
            prop_assert_eq!(node.router.held(), 0);
        }
    }
}

/// A name that moves to a replacement while the old holder lives turns no delivery into
/// a loss: with no failure, every receipt sent by name is `Delivered`.
#[test]
fn a_replacement_taking_a_name_loses_nothing() {
    let mut sim = Sim::new(SimConfig {
        seed: 12,
        ..SimConfig::default()
    });
    let root = sim.add_root().expect("valid");
    let sup = sim.add_child(root).expect("valid");
    let other = sim.add_child(root).expect("valid");
    let names = vec!["db".to_string()];
    let mut current = sim.add_child_named(sup, &names).expect("free");
    sim.run_until_idle().expect("settles");
    let mut sent = Vec::new();
    for round in 0..20 {
        for from in [root, other] {
            for _ in 0..5 {
                let id = sim
                    .send(
                        from,
                        Destination::Name("db".into()),
                        vec![round; 8],
                        receipt(),
                    )
                    .expect("room");
                sent.push((from, id));
            }
        }
        sim.advance(Duration::from_micros(37 * u64::from(round)))
            .expect("settles");
        current = sim.add_child_named(sup, &names).expect("sanctioned");
    }
    sim.run_until_idle().expect("settles");
    let got = receptions(&sim);
    for (from, id) in &sent {
        assert_eq!(outcome(&sim, *from, *id), Ok(None), "{id:?}");
        assert_eq!(got.get(id), Some(&1));
    }
    // The name ends with the last replacement everywhere.
    for node in [root, sup, other] {
        let to = forkbus_router::Address::from(Destination::Name("db".into()));
        assert_eq!(
            sim.nodes[node].router.resolve(&to),
            Some(Sim::node_id(current))
        );
    }
}

/// Sent to a worker that crashed, by name: with custody, everything sent while it was
/// down arrives at its restart, in order, and its receipts say `Delivered`; without, the
/// sender hears a sure loss (safe to retry) or an unknown, never a false `Delivered`.
#[test]
fn custody_carries_a_down_workers_envelopes_to_its_restart() {
    for custody in [true, false] {
        let mut sim = Sim::new(SimConfig {
            seed: 3,
            ..SimConfig::default()
        });
        let root = sim.add_root().expect("valid");
        let sup = sim.add_child(root).expect("valid");
        let names = vec!["w".to_string()];
        let w = sim.add_child_named(sup, &names).expect("free");
        sim.run_until_idle().expect("settles");
        sim.kill(w);
        if custody {
            sim.nodes[sup].router.hold_name("w", 16).expect("free");
        }
        sim.run_until_idle().expect("settles");
        let mut sent = Vec::new();
        for k in 0..10u8 {
            if let Ok(id) = sim.send(root, Destination::Name("w".into()), vec![k], receipt()) {
                sent.push(id);
            }
        }
        sim.run_until_idle().expect("settles");
        let w2 = sim.add_child_named(sup, &names).expect("sanctioned");
        if !custody {
            // Without a custodian the name is nowhere until the restart is announced.
            sim.run_until_idle().expect("settles");
        }
        for k in 10..15u8 {
            let id = sim
                .send(root, Destination::Name("w".into()), vec![k], receipt())
                .expect("room");
            sent.push(id);
        }
        sim.run_until_idle().expect("settles");
        let got: Vec<u8> = sim.nodes[w2]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Message { envelope, .. } => Some(envelope.payload[0]),
                _ => None,
            })
            .collect();
        assert_eq!(sent.len(), 15);
        let outcomes: Vec<Option<Fate>> = sent
            .iter()
            .map(|id| outcome(&sim, root, *id).expect("one outcome"))
            .collect();
        if custody {
            assert_eq!(got, (0..15).collect::<Vec<u8>>(), "all, in order");
            assert!(outcomes.iter().all(Option::is_none), "{outcomes:?}");
        } else {
            assert_eq!(got, (10..15).collect::<Vec<u8>>());
            for o in &outcomes[..10] {
                assert_eq!(*o, Some(Fate::Lost(LossReason::NoRoute)));
            }
            assert!(outcomes[10..].iter().all(Option::is_none));
        }
    }
}

/// A receipt bound to a node that dies after taking the envelope ends unknown — not lost,
/// since it may have been handled.
#[test]
fn a_destination_that_dies_after_taking_it_is_unknown_not_lost() {
    let mut sim = Sim::new(SimConfig {
        seed: 5,
        ..SimConfig::default()
    });
    let root = sim.add_root().expect("valid");
    let mid = sim.add_child(root).expect("valid");
    let leaf = sim.add_child(mid).expect("valid");
    sim.run_until_idle().expect("settles");
    // The leaf takes it (and acknowledges it) but stops writing: its receipt never leaves.
    let wire = sim.wire_between(mid, leaf).expect("wire");
    let id = sim
        .send(root, Sim::node_id(leaf), vec![1], receipt())
        .expect("room");
    sim.advance(Duration::from_micros(400)).expect("settles");
    sim.set_reading(wire, mid, false);
    sim.advance(Duration::from_millis(5)).expect("settles");
    sim.kill(leaf);
    sim.run_until_idle().expect("settles");
    let o = outcome(&sim, root, id).expect("one outcome");
    assert!(
        matches!(
            o,
            Some(Fate::Unknown(
                UnknownReason::DestinationDown | UnknownReason::Unacknowledged
            )) | None
        ),
        "{o:?}"
    );
    assert!(!matches!(o, Some(Fate::Lost(_))));
}

/// Names are unique: a name held anywhere is refused to anyone else, whether registered or
/// given at a fork; only a parent hands a name on, to the child it forks.
#[test]
fn names_are_unique() {
    let mut sim = Sim::new(SimConfig::default());
    let root = sim.add_root().expect("valid");
    let a = sim.add_child(root).expect("valid");
    let b = sim.add_child(root).expect("valid");
    let names = vec!["db".to_string()];
    let a1 = sim.add_child_named(a, &names).expect("free");
    sim.run_until_idle().expect("settles");
    for node in [root, a, b] {
        assert!(matches!(
            sim.nodes[node].router.register_name("db"),
            Err(Error::NameTaken { holder, .. }) if holder == Sim::node_id(a1)
        ));
    }
    assert!(matches!(
        sim.add_child_named(b, &names),
        Err(Error::NameTaken { .. })
    ));
    assert!(matches!(
        sim.add_child_named(root, &names),
        Err(Error::NameTaken { .. })
    ));
    // a1's parent may hand it to a replacement; everyone follows.
    let a2 = sim.add_child_named(a, &names).expect("sanctioned");
    sim.run_until_idle().expect("settles");
    for node in [root, a, b, a1] {
        let to = forkbus_router::Address::from(Destination::Name("db".into()));
        let want = if node == a1 { a1 } else { a2 };
        assert_eq!(
            sim.nodes[node].router.resolve(&to),
            Some(Sim::node_id(want))
        );
    }
}
