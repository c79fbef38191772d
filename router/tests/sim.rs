//! The promises of the routing core, checked over random trees in the simulator.
//!
//! Every property runs random trees of 1–64 nodes under random traffic, with chunks split
//! and delayed at random so links interleave in every order.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use common::{cases, random_tree};
use forkbus_router::sim::{Sim, SimConfig};
use forkbus_router::{
    Address, Destination, DownCause, Error, Event, Fate, LinkId, LossReason, MessageId, NodeId,
    SendOptions, UnknownReason,
};
use proptest::prelude::*;

fn depth(parents: &[Option<usize>], mut n: usize) -> usize {
    let mut d = 0;
    while let Some(p) = parents[n] {
        n = p;
        d += 1;
    }
    d
}

fn distance(parents: &[Option<usize>], a: usize, b: usize) -> usize {
    let ancestors = |mut n: usize| {
        let mut v = vec![n];
        while let Some(p) = parents[n] {
            n = p;
            v.push(n);
        }
        v
    };
    let of_a: HashSet<usize> = ancestors(a).into_iter().collect();
    let lca = ancestors(b)
        .into_iter()
        .find(|n| of_a.contains(n))
        .expect("one root");
    depth(parents, a) + depth(parents, b) - 2 * depth(parents, lca)
}

/// Ids of the messages node `n` received, with hop counts and the order they came in.
fn received(sim: &Sim, n: usize) -> Vec<(MessageId, u8, Vec<u8>)> {
    sim.nodes[n]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Message { envelope, .. } => {
                Some((envelope.id, envelope.hops, envelope.payload.clone()))
            }
            _ => None,
        })
        .collect()
}

fn node_index(id: NodeId) -> usize {
    (id.pid - 100) as usize
}

fn config(seed: u64) -> SimConfig {
    SimConfig {
        seed,
        ..SimConfig::default()
    }
}

fn opts(receipt: bool, trace: bool) -> SendOptions {
    SendOptions {
        receipt,
        trace,
        ..SendOptions::default()
    }
}

/// The expected next hop from every alive node to every node it can reach over uncut wires.
fn expected_routes(sim: &Sim) -> Vec<Vec<(NodeId, LinkId)>> {
    let mut adj: HashMap<usize, Vec<(usize, LinkId)>> = HashMap::new();
    for w in sim.wires.iter().filter(|w| !w.cut) {
        let [(a, la), (b, lb)] = w.ends;
        adj.entry(a).or_default().push((b, la));
        adj.entry(b).or_default().push((a, lb));
    }
    (0..sim.nodes.len())
        .map(|start| {
            if !sim.nodes[start].alive {
                return Vec::new();
            }
            let mut first_hop: BTreeMap<NodeId, LinkId> = BTreeMap::new();
            let mut seen = HashSet::from([start]);
            let mut queue = VecDeque::new();
            for &(nb, link) in adj.get(&start).into_iter().flatten() {
                if seen.insert(nb) {
                    queue.push_back((nb, link));
                }
            }
            while let Some((n, link)) = queue.pop_front() {
                first_hop.insert(Sim::node_id(n), link);
                for &(nb, _) in adj.get(&n).into_iter().flatten() {
                    if seen.insert(nb) {
                        queue.push_back((nb, link));
                    }
                }
            }
            first_hop.into_iter().collect()
        })
        .collect()
}

fn check_bounds(sim: &Sim) {
    let c = &sim.nodes[0].router.config().clone();
    for node in sim.nodes.iter().filter(|n| n.alive) {
        for link in node.router.links() {
            let s = node.router.link_stats(link).expect("open link");
            // Notices may use a reserve as large as the bound itself.
            assert!(s.in_flight <= 2 * c.max_queue_envelopes, "{s:?}");
            assert!(s.in_flight_bytes <= 2 * c.max_queue_bytes, "{s:?}");
            assert!(
                s.pending_output <= 2 * c.max_queue_bytes + c.max_frame as usize,
                "{s:?}"
            );
        }
        assert!(node.router.seen_origins() <= c.max_origins);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), .. ProptestConfig::default() })]

    /// Broadcast reaches every node but the sender exactly once.
    #[test]
    fn broadcast_reaches_every_live_node_exactly_once(
        n in 1usize..=64, seed in any::<u64>(), n_msgs in 1usize..12,
    ) {
        let mut cfg = config(seed);
        // Fewer seen windows than origins half the time: eviction must not matter on a tree.
        if seed % 2 == 0 {
            cfg.router.max_origins = 1 + (seed % 8) as usize;
        }
        let mut sim = Sim::new(cfg);
        let parents = random_tree(&mut sim, n, seed);
        sim.run_until_idle().expect("settles");
        let mut sent = Vec::new();
        for k in 0..n_msgs {
            let from = sim.rng().below(n as u64) as usize;
            let id = sim
                .send(from, Destination::Broadcast, vec![k as u8; 64], opts(false, false))
                .expect("room");
            sent.push((from, id));
            if sim.rng().chance(0.5) {
                let d = Duration::from_micros(sim.rng().below(300));
                sim.advance(d).expect("settles");
            }
        }
        sim.run_until_idle().expect("settles");
        check_bounds(&sim);
        for node in 0..n {
            let mut counts: HashMap<MessageId, usize> = HashMap::new();
            for (id, hops, _) in received(&sim, node) {
                *counts.entry(id).or_default() += 1;
                let from = node_index(id.origin);
                prop_assert_eq!(hops as usize, distance(&parents, from, node), "hops of {:?} at {}", id, node);
            }
            for (from, id) in &sent {
                let expect = usize::from(*from != node);
                prop_assert_eq!(counts.get(id).copied().unwrap_or(0), expect,
                    "node {} broadcast {:?}", node, id);
            }
        }
        for (from, id) in &sent {
            let events = &sim.nodes[*from].events;
            prop_assert_eq!(events.iter().filter(|e| **e == Event::Sent(*id)).count(), 1);
        }
    }

    /// Unicast by node id, pid and name arrives exactly once, in order per origin, with the
    /// tree distance as its hop count, and nowhere else.
    #[test]
    fn unicast_exactly_once_in_order_with_tree_distance(
        n in 1usize..=64, seed in any::<u64>(), n_msgs in 1usize..80,
    ) {
        let mut sim = Sim::new(config(seed));
        let parents = random_tree(&mut sim, n, seed);
        for i in 0..n {
            sim.nodes[i].router.register_name(&format!("w{i}")).expect("valid name");
        }
        sim.run_until_idle().expect("settles");
        let mut sent: Vec<(usize, usize, MessageId)> = Vec::new();
        for k in 0..n_msgs {
            let from = sim.rng().below(n as u64) as usize;
            let to = sim.rng().below(n as u64) as usize;
            let addr: Address = match k % 3 {
                0 => Sim::node_id(to).into(),
                1 => Address::Pid(Sim::node_id(to).pid),
                _ => Destination::Name(format!("w{to}")).into(),
            };
            let id = sim.send(from, addr, (k as u32).to_be_bytes().to_vec(), opts(false, k % 5 == 0))
                .expect("room");
            sent.push((from, to, id));
            if sim.rng().chance(0.3) {
                let d = Duration::from_micros(sim.rng().below(300));
                sim.advance(d).expect("settles");
            }
        }
        sim.run_until_idle().expect("settles");
        check_bounds(&sim);
        let mut got: HashMap<usize, Vec<(MessageId, u8)>> = HashMap::new();
        for node in 0..n {
            got.insert(node, received(&sim, node).into_iter().map(|(i, h, _)| (i, h)).collect());
        }
        for (from, to, id) in &sent {
            for node in 0..n {
                let copies: Vec<u8> = got[&node].iter().filter(|(i, _)| i == id).map(|(_, h)| *h).collect();
                if node == *to {
                    prop_assert_eq!(copies.len(), 1, "{:?} to {}", id, to);
                    prop_assert_eq!(copies[0] as usize, distance(&parents, *from, *to));
                } else {
                    prop_assert!(copies.is_empty(), "{:?} also reached {}", id, node);
                }
            }
        }
        // Order per origin at every destination.
        for node in 0..n {
            let mut last: HashMap<NodeId, u64> = HashMap::new();
            for (id, _) in &got[&node] {
                if let Some(prev) = last.insert(id.origin, id.seq) {
                    prop_assert!(prev < id.seq, "out of order at {}: {} after {}", node, id.seq, prev);
                }
            }
        }
        // Traced envelopes list every node on the path with increasing times.
        for node in 0..n {
            for e in &sim.nodes[node].events {
                if let Event::Message { envelope, .. } = e {
                    if !envelope.trace.is_empty() {
                        prop_assert_eq!(envelope.trace.len(), envelope.hops as usize + 1);
                        prop_assert_eq!(envelope.trace[0].node, envelope.id.origin);
                        prop_assert_eq!(envelope.trace.last().map(|h| h.node), Some(Sim::node_id(node)));
                        prop_assert!(envelope.trace.windows(2).all(|w| w[0].at <= w[1].at));
                    }
                }
            }
        }
    }

    /// With links cut mid-traffic, every envelope sent with a receipt ends at its (live)
    /// origin as exactly one outcome; a Delivered outcome means the destination has it;
    /// nothing is delivered twice.
    #[test]
    fn cuts_mid_traffic_give_exactly_one_outcome_per_receipt(
        n in 2usize..=64, seed in any::<u64>(), rounds in 1usize..10,
    ) {
        let mut cfg = config(seed);
        // On a tree, cuts alone never need the timeout: a loss notice or the withdrawal of
        // the destination's route always reaches the origin. Half the cases prove it.
        cfg.router.receipt_timeout = (seed % 2 == 1).then(|| Duration::from_secs(2));
        // Small queues a third of the time: forwarded envelopes overflow and are reported.
        // A notice that meets a full queue is dropped too, so these need the timeout.
        if seed % 3 == 0 {
            cfg.router.max_queue_envelopes = 2 + (seed % 6) as usize;
            cfg.wire_capacity = 1024;
            cfg.router.receipt_timeout = Some(Duration::from_secs(2));
        }
        let mut sim = Sim::new(cfg);
        random_tree(&mut sim, n, seed);
        sim.run_until_idle().expect("settles");
        let mut sent: Vec<(usize, usize, MessageId, bool)> = Vec::new();
        for _ in 0..rounds {
            for _ in 0..sim.rng().below(20) + 1 {
                let from = sim.rng().below(n as u64) as usize;
                let to = sim.rng().below(n as u64) as usize;
                let receipt = sim.rng().chance(0.7);
                if let Ok(id) = sim.send(from, Sim::node_id(to), vec![7; 64], opts(receipt, false)) {
                    sent.push((from, to, id, receipt));
                }
            }
            let d = Duration::from_micros(sim.rng().below(400));
            sim.advance(d).expect("settles");
            if sim.rng().chance(0.6) {
                let live: Vec<usize> = (0..sim.wires.len()).filter(|w| !sim.wires[*w].cut).collect();
                if !live.is_empty() {
                    let w = live[sim.rng().below(live.len() as u64) as usize];
                    sim.cut(w);
                }
            }
            check_bounds(&sim);
        }
        sim.run_until_idle().expect("settles");
        sim.advance(Duration::from_secs(3)).expect("settles");
        for (from, to, id, receipt) in &sent {
            let events = &sim.nodes[*from].events;
            let delivered = events.iter().filter(|e| **e == Event::Delivered(*id)).count();
            let lost = events.iter().filter(|e| matches!(e, Event::Lost(r) if r.id == *id)).count();
            let copies = received(&sim, *to).iter().filter(|(i, _, _)| i == id).count();
            prop_assert!(copies <= 1, "{:?} delivered {} times", id, copies);
            if *receipt {
                prop_assert_eq!(delivered + lost, 1, "{:?}: {} delivered, {} lost", id, delivered, lost);
                if delivered == 1 {
                    prop_assert_eq!(copies, 1, "{:?} receipted but not received", id);
                }
            } else {
                prop_assert_eq!(delivered, 0);
            }
        }
        for node in &sim.nodes {
            prop_assert_eq!(node.router.pending_receipts(), 0);
        }
    }

    /// Replayed link frames and redundant paths (cycles) never deliver anything twice.
    #[test]
    fn injected_duplicates_are_never_delivered_twice(
        n in 2usize..=40, seed in any::<u64>(), extra in 0usize..4, n_msgs in 1usize..10,
    ) {
        let mut cfg = config(seed);
        cfg.duplicate_rate = 0.3;
        let mut sim = Sim::new(cfg);
        random_tree(&mut sim, n, seed);
        for _ in 0..extra {
            let a = sim.rng().below(n as u64) as usize;
            let b = sim.rng().below(n as u64) as usize;
            if a != b {
                sim.connect(a, b);
            }
        }
        sim.run_until_idle().expect("settles");
        let mut sent = Vec::new();
        for k in 0..n_msgs {
            let from = sim.rng().below(n as u64) as usize;
            let id = sim.send(from, Destination::Broadcast, vec![k as u8; 32], opts(false, false))
                .expect("room");
            sent.push((from, id));
        }
        sim.run_until_idle().expect("settles");
        for node in 0..n {
            for (from, id) in &sent {
                let copies = received(&sim, node).iter().filter(|(i, _, _)| i == id).count();
                prop_assert_eq!(copies, usize::from(*from != node), "node {} {:?}", node, id);
            }
        }
        let stats: Vec<_> = sim.nodes.iter().map(|n| n.router.stats()).collect();
        let link_dups: u64 = stats.iter().map(|s| s.link_duplicates).sum();
        let dups: u64 = stats.iter().map(|s| s.duplicates + s.redundant).sum();
        // Every replayed envelope frame is caught by its link's sequence numbers.
        prop_assert!(sim.duplicated == 0 || link_dups > 0);
        // A cycle sends every broadcast round both ways: the seen windows and the origin
        // checks of peer links catch those.
        if sim.wires.len() >= n {
            prop_assert!(dups > 0, "a cycle but no duplicate suppressed");
        }
        check_bounds(&sim);
    }

    /// Routing tables converge after joins and leaves: every live node knows exactly the
    /// nodes it can reach, each through the right link, and their names.
    #[test]
    fn routing_tables_converge_after_joins_and_leaves(
        n in 1usize..=48, seed in any::<u64>(), ops in proptest::collection::vec(any::<(bool, u16)>(), 0..24),
    ) {
        let mut sim = Sim::new(config(seed));
        random_tree(&mut sim, n, seed);
        for i in 0..n {
            sim.nodes[i].router.register_name(&format!("w{i}")).expect("valid name");
        }
        for (join, pick) in ops {
            let alive: Vec<usize> = (0..sim.nodes.len()).filter(|i| sim.nodes[*i].alive).collect();
            let node = alive[pick as usize % alive.len()];
            if join || node == 0 {
                let child = sim.add_child(node).expect("valid config");
                sim.nodes[child].router.register_name(&format!("w{child}")).expect("valid name");
            } else {
                sim.kill(node);
            }
            if pick % 3 == 0 {
                sim.run_until_idle().expect("settles");
            } else {
                let d = Duration::from_micros(u64::from(pick % 200));
                sim.advance(d).expect("settles");
            }
        }
        sim.run_until_idle().expect("settles");
        let expected = expected_routes(&sim);
        for (i, node) in sim.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
            prop_assert_eq!(&node.router.routes(), &expected[i], "node {}", i);
            for (peer, _) in &expected[i] {
                let name = format!("w{}", node_index(*peer));
                prop_assert_eq!(node.router.resolve(&Destination::Name(name).into()), Some(*peer));
            }
        }
    }
}

/// A consumer that stops reading: local sends are refused at the bound, nothing is lost,
/// and everything arrives once it reads again.
#[test]
fn backpressure_refuses_local_sends_and_loses_nothing() {
    let mut cfg = config(9);
    cfg.router.max_queue_envelopes = 16;
    cfg.wire_capacity = 4096;
    let mut sim = Sim::new(cfg);
    let a = sim.add_root().expect("valid");
    let b = sim.add_child(a).expect("valid");
    sim.run_until_idle().expect("settles");
    let wire = sim.wire_between(a, b).expect("wire");
    sim.set_reading(wire, b, false);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for k in 0..200u32 {
        match sim.send(
            a,
            Sim::node_id(b),
            k.to_be_bytes().to_vec(),
            opts(true, false),
        ) {
            Ok(id) => accepted.push(id),
            Err(r) => {
                assert!(matches!(r.error, Error::QueueFull { .. }), "{r:?}");
                assert_eq!(r.payload, k.to_be_bytes().to_vec(), "payload handed back");
                refused += 1;
            }
        }
        sim.run_until_idle().expect("settles");
    }
    assert_eq!(accepted.len(), 16, "exactly the bound is accepted");
    assert_eq!(refused, 200 - 16);
    check_bounds(&sim);
    sim.set_reading(wire, b, true);
    sim.run_until_idle().expect("settles");
    let got: Vec<MessageId> = received(&sim, b).into_iter().map(|(i, _, _)| i).collect();
    assert_eq!(got, accepted);
    let ev = &sim.nodes[a].events;
    assert!(ev.iter().any(|e| matches!(e, Event::LinkReady(_))));
    for id in &accepted {
        assert!(ev.contains(&Event::Delivered(*id)));
    }
}

/// A forwarding hop whose next link is full holds back what it receives instead of losing
/// it: the backpressure reaches the origin as refused local sends, nothing is lost, and
/// everything arrives, in order, once the consumer reads again. Cutting the held link
/// then turns what waited for it into sure losses.
#[test]
fn a_full_forward_holds_back_its_input_and_loses_nothing() {
    let mut cfg = config(3);
    cfg.router.max_queue_envelopes = 8;
    cfg.wire_capacity = 2048;
    let mut sim = Sim::new(cfg);
    let a = sim.add_root().expect("valid");
    let b = sim.add_child(a).expect("valid");
    let c = sim.add_child(b).expect("valid");
    sim.run_until_idle().expect("settles");
    let wire = sim.wire_between(b, c).expect("wire");
    sim.set_reading(wire, c, false);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for k in 0..40u32 {
        match sim.send(a, Sim::node_id(c), vec![k as u8; 200], opts(true, false)) {
            Ok(id) => accepted.push(id),
            Err(r) => {
                assert!(matches!(r.error, Error::QueueFull { .. }), "{r:?}");
                refused += 1;
            }
        }
        sim.run_until_idle().expect("settles");
    }
    assert!(refused > 0, "the backpressure never reached the origin");
    assert!(
        sim.nodes[b].router.stats().parked > 0,
        "B never held a forward back"
    );
    assert!(!sim.nodes[b].router.is_idle());
    sim.set_reading(wire, c, true);
    sim.run_until_idle().expect("settles");
    let ev = &sim.nodes[a].events;
    for id in &accepted {
        assert!(ev.contains(&Event::Delivered(*id)), "{id:?}");
        assert!(!ev
            .iter()
            .any(|e| matches!(e, Event::Lost(r) if r.id == *id)));
    }
    let got: Vec<MessageId> = received(&sim, c).into_iter().map(|(i, _, _)| i).collect();
    assert_eq!(got, accepted, "all of it, in order");
    assert_eq!(sim.nodes[b].router.stats().lost.copies(), 0);

    // Again, and the held link dies: what waited on it was never written, for sure.
    sim.set_reading(wire, c, false);
    let mut second = Vec::new();
    for k in 0..40u32 {
        if let Ok(id) = sim.send(a, Sim::node_id(c), vec![k as u8; 200], opts(true, false)) {
            second.push(id);
        }
        sim.run_until_idle().expect("settles");
    }
    sim.kill(c);
    sim.run_until_idle().expect("settles");
    let ev = &sim.nodes[a].events;
    let mut never_written = 0;
    for id in &second {
        let fates: Vec<Fate> = ev
            .iter()
            .filter_map(|e| match e {
                Event::Lost(r) if r.id == *id => Some(r.fate),
                _ => None,
            })
            .collect();
        assert_eq!(fates.len(), 1, "{id:?}: {fates:?}");
        never_written += usize::from(fates[0] == Fate::Lost(LossReason::NeverWritten));
    }
    assert!(never_written > 0, "nothing waited at B");
    assert!(
        sim.nodes[b].router.is_idle(),
        "B holds nothing for the dead link"
    );
}

/// A link going down hands over every envelope not acknowledged, whole, with its state.
#[test]
fn lost_list_holds_exactly_the_unacknowledged_envelopes() {
    let mut cfg = config(5);
    // Room on the wire for a few frames: the rest stay queued, one is cut in half.
    cfg.wire_capacity = 450;
    let mut sim = Sim::new(cfg);
    let a = sim.add_root().expect("valid");
    let b = sim.add_child(a).expect("valid");
    sim.run_until_idle().expect("settles");
    let wire = sim.wire_between(a, b).expect("wire");
    sim.set_reading(wire, b, false);
    let ids: Vec<MessageId> = (0..10u8)
        .map(|k| {
            sim.send(a, Sim::node_id(b), vec![k; 100], opts(false, false))
                .expect("room")
        })
        .collect();
    sim.run_until_idle().expect("settles");
    sim.kill(b);
    sim.run_until_idle().expect("settles");
    let down = sim.nodes[a]
        .events
        .iter()
        .find_map(|e| match e {
            Event::LinkDown(d) => Some(d.clone()),
            _ => None,
        })
        .expect("link down");
    assert_eq!(down.cause, DownCause::Closed);
    assert_eq!(down.peer, Some(Sim::node_id(b)));
    let lost: Vec<MessageId> = down.lost.iter().map(|l| l.envelope.id).collect();
    assert_eq!(lost, ids);
    let rank = |f: Fate| match f {
        Fate::Unknown(UnknownReason::Unacknowledged) => 0,
        Fate::Lost(LossReason::PartiallyWritten) => 1,
        Fate::Lost(LossReason::NeverWritten) => 2,
        other => panic!("unexpected fate {other:?}"),
    };
    let ranks: Vec<u8> = down.lost.iter().map(|l| rank(l.fate)).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{ranks:?}");
    assert!(ranks.iter().filter(|r| **r == 1).count() <= 1, "{ranks:?}");
    assert_eq!(ranks.first(), Some(&0), "{ranks:?}");
    assert_eq!(ranks.last(), Some(&2), "{ranks:?}");
    for (k, l) in down.lost.iter().enumerate() {
        assert_eq!(l.envelope.payload, vec![k as u8; 100], "whole envelope");
    }
    // The origin is told of each, once.
    for id in &ids {
        let n = sim.nodes[a]
            .events
            .iter()
            .filter(|e| matches!(e, Event::Lost(r) if r.id == *id))
            .count();
        assert_eq!(n, 1);
    }
}

/// A loss on a hop that did not originate the envelope reaches its origin as a notice.
#[test]
fn losses_elsewhere_are_noticed_at_the_origin() {
    let mut sim = Sim::new(config(11));
    let a = sim.add_root().expect("valid");
    let b = sim.add_child(a).expect("valid");
    let c = sim.add_child(b).expect("valid");
    sim.run_until_idle().expect("settles");
    let wire = sim.wire_between(b, c).expect("wire");
    sim.set_reading(wire, c, false);
    let ids: Vec<MessageId> = (0..5u8)
        .map(|k| {
            sim.send(a, Sim::node_id(c), vec![k; 10], opts(false, false))
                .expect("room")
        })
        .collect();
    sim.run_until_idle().expect("settles");
    sim.kill(c);
    sim.run_until_idle().expect("settles");
    for id in &ids {
        let reports: Vec<_> = sim.nodes[a]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Lost(r) if r.id == *id => Some(r.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(reports.len(), 1, "{id:?}");
        assert_eq!(reports[0].at, Sim::node_id(b));
        assert!(matches!(
            reports[0].fate,
            Fate::Lost(LossReason::NeverWritten | LossReason::PartiallyWritten)
                | Fate::Unknown(UnknownReason::Unacknowledged)
        ));
    }
    assert!(sim.nodes[a]
        .events
        .contains(&Event::NodeDown(Sim::node_id(c))));
}

/// Unknown destinations are reported lost by default, and flooded when configured.
#[test]
fn no_route_policy() {
    let mut sim = Sim::new(config(2));
    let a = sim.add_root().expect("valid");
    sim.add_child(a).expect("valid");
    sim.run_until_idle().expect("settles");
    let ghost = NodeId::new(0, 9999, 1);
    let id = sim
        .send(a, ghost, vec![1], opts(true, false))
        .expect("accepted");
    let pid = sim
        .send(a, Address::Pid(9999), vec![1], opts(false, false))
        .expect("accepted");
    sim.run_until_idle().expect("settles");
    for x in [id, pid] {
        assert!(sim.nodes[a]
            .events
            .iter()
            .any(|e| matches!(e, Event::Lost(r) if r.id == x && r.fate == Fate::Lost(LossReason::NoRoute))));
    }

    let mut cfg = config(2);
    cfg.router.no_route = forkbus_router::NoRoutePolicy::Flood { hop_limit: 3 };
    let mut sim = Sim::new(cfg);
    let parents = random_tree(&mut sim, 12, 77);
    sim.run_until_idle().expect("settles");
    // Forget routes by asking for a node the tree has but the sender was never told of:
    // a fresh node joined with no announcement is what flooding is for; here we check
    // that an unknown id is flooded without duplicates and dies out.
    let id = sim
        .send(0, ghost, vec![1], opts(false, false))
        .expect("accepted");
    sim.run_until_idle().expect("settles");
    let _ = parents;
    for node in 0..12 {
        assert!(received(&sim, node).iter().all(|(i, _, _)| *i != id));
    }
    let dead_ends: u64 = sim
        .nodes
        .iter()
        .map(|n| n.router.stats().absorbed + n.router.stats().lost.hop_limit)
        .sum();
    assert!(dead_ends > 0, "the flood went nowhere");
}

/// Hop limits drop and report envelopes that would go too far.
#[test]
fn hop_limit_is_enforced_and_reported() {
    let mut sim = Sim::new(config(4));
    let mut prev = sim.add_root().expect("valid");
    for _ in 0..5 {
        prev = sim.add_child(prev).expect("valid");
    }
    sim.run_until_idle().expect("settles");
    let id = sim
        .send(
            0,
            Sim::node_id(prev),
            vec![1],
            SendOptions {
                receipt: true,
                hop_limit: Some(3),
                ..SendOptions::default()
            },
        )
        .expect("accepted");
    sim.run_until_idle().expect("settles");
    let lost: Vec<_> = sim.nodes[0]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Lost(r) if r.id == id => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].fate, Fate::Lost(LossReason::HopLimit));
    assert_eq!(lost[0].at, Sim::node_id(3));
    assert!(received(&sim, prev).is_empty());
}

/// Groups reach every member once, and only members.
#[test]
fn groups_reach_members_once() {
    let mut sim = Sim::new(config(8));
    let parents = random_tree(&mut sim, 30, 8);
    let _ = parents;
    let members: Vec<usize> = (0..30).filter(|i| i % 3 == 0).collect();
    for &m in &members {
        sim.nodes[m].router.join_group("g").expect("valid");
    }
    sim.run_until_idle().expect("settles");
    let id = sim
        .send(
            7,
            Destination::Group("g".into()),
            vec![1],
            opts(false, false),
        )
        .expect("room");
    sim.run_until_idle().expect("settles");
    for node in 0..30 {
        let copies = received(&sim, node)
            .iter()
            .filter(|(i, _, _)| *i == id)
            .count();
        assert_eq!(copies, usize::from(members.contains(&node)), "node {node}");
    }
}

/// Garbage on one link closes that link only.
#[test]
fn garbage_closes_only_its_link() {
    let mut sim = Sim::new(config(6));
    let a = sim.add_root().expect("valid");
    let b = sim.add_child(a).expect("valid");
    let c = sim.add_child(a).expect("valid");
    sim.run_until_idle().expect("settles");
    let links = sim.nodes[a].router.links();
    let bad = links[0];
    let now = sim.now();
    let err = sim.nodes[a]
        .router
        .handle_input(now, bad, &[0xff; 64])
        .expect_err("oversized length");
    assert!(matches!(err, Error::Protocol(_)));
    assert_eq!(sim.nodes[a].router.links(), vec![links[1]]);
    let w = sim.wire_between(a, b).expect("wire");
    sim.cut(w);
    sim.run_until_idle().expect("settles");
    let id = sim
        .send(a, Sim::node_id(c), vec![1], opts(true, false))
        .expect("room");
    sim.run_until_idle().expect("settles");
    assert!(sim.nodes[a].events.contains(&Event::Delivered(id)));
    assert!(sim.nodes[a].events.iter().any(|e| matches!(
        e,
        Event::LinkDown(d) if d.link == bad && matches!(d.cause, DownCause::Protocol(_))
    )));
}

/// A peer that never reads cannot make control output grow without bound: local control
/// sends are refused (backpressure, the link stays), and once what the router must pass on
/// (announcements, notices) piles past the bound, the link closes as overrun.
#[test]
fn a_peer_that_never_reads_is_cut_off() {
    use forkbus_router::wire::{encode_frame, Frame, Hello, NodeInfo, RouteUpdate, WIRE_VERSION};
    use forkbus_router::{LinkRole, Router, RouterConfig, Timestamp};
    let mut cfg = RouterConfig::default();
    cfg.max_frame = 4096;
    cfg.max_queue_bytes = 8192;
    let mut r = Router::new(Sim::node_id(0), cfg).expect("valid");
    let now = Timestamp::from_nanos(1);
    let deaf = r.handle_link_up(now, Some(Sim::node_id(1)), LinkRole::Child);
    let talker = r.handle_link_up(now, Some(Sim::node_id(2)), LinkRole::Child);
    let mut sent = 0;
    let refused = loop {
        match r.send_control(deaf, 1, vec![0; 1000]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100, "never refused");
    };
    assert!(sent >= 12, "refused early, after {sent}");
    assert_eq!(refused, Error::QueueFull { link: deaf });
    assert!(r.links().contains(&deaf), "a refusal is not a cut");
    // The talker's subtree grows; every announcement must be passed on to the deaf link.
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        &Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: Sim::node_id(2),
        }),
    );
    for k in 0..200u32 {
        let info = NodeInfo {
            node: NodeId::new(0, 10_000 + k, 1),
            version: 1,
            names: vec![format!("{k:0>200}")],
            groups: Vec::new(),
        };
        encode_frame(
            &mut bytes,
            &Frame::Routes(RouteUpdate {
                upsert: vec![info],
                ..RouteUpdate::default()
            }),
        );
    }
    r.handle_input(now, talker, &bytes).expect("valid");
    let down = std::iter::from_fn(|| r.poll_event())
        .find_map(|e| match e {
            Event::LinkDown(d) => Some(d),
            _ => None,
        })
        .expect("link down");
    assert_eq!(down.cause, DownCause::Overrun);
    assert_eq!(down.link, deaf);
    assert_eq!(r.links(), vec![talker]);
}

/// A forked child routes to every node its parent knew before a byte has moved, and the
/// rest of the tree learns of it.
#[test]
fn a_forked_child_routes_at_once() {
    let mut sim = Sim::new(config(21));
    random_tree(&mut sim, 20, 21);
    for i in 0..20 {
        sim.nodes[i]
            .router
            .register_name(&format!("w{i}"))
            .expect("valid name");
    }
    sim.run_until_idle().expect("settles");
    let child = sim.add_child(13).expect("valid config");
    let ids: Vec<MessageId> = (0..20)
        .map(|to| {
            let addr: Address = if to % 2 == 0 {
                Address::Pid(Sim::node_id(to).pid)
            } else {
                Destination::Name(format!("w{to}")).into()
            };
            sim.send(child, addr, vec![1], opts(true, false))
                .expect("room")
        })
        .collect();
    assert!(
        !sim.nodes[child]
            .events
            .iter()
            .any(|e| matches!(e, Event::Lost(_))),
        "no route before the first byte moved"
    );
    sim.run_until_idle().expect("settles");
    for id in &ids {
        assert!(sim.nodes[child].events.contains(&Event::Delivered(*id)));
    }
    let expected = expected_routes(&sim);
    for (i, (node, want)) in sim.nodes.iter().zip(&expected).enumerate() {
        assert_eq!(&node.router.routes(), want, "node {i}");
    }
}

/// Found by fuzzing: a receipt for a flooded envelope to an unknown name had no outcome.
/// Now it ends by its timeout, and flooding without one is refused as a configuration.
#[test]
fn a_flooded_receipt_ends_by_its_timeout() {
    let mut cfg = config(31);
    cfg.router.no_route = forkbus_router::NoRoutePolicy::Flood { hop_limit: 4 };
    cfg.router.receipt_timeout = None;
    assert!(matches!(
        forkbus_router::Router::new(Sim::node_id(0), cfg.router.clone()),
        Err(Error::InvalidConfig(_))
    ));
    cfg.router.receipt_timeout = Some(Duration::from_secs(1));
    let mut sim = Sim::new(cfg);
    random_tree(&mut sim, 6, 31);
    sim.run_until_idle().expect("settles");
    let id = sim
        .send(
            0,
            Destination::Name("nobody".into()),
            vec![1],
            opts(true, false),
        )
        .expect("accepted");
    sim.run_until_idle().expect("settles");
    assert_eq!(sim.nodes[0].router.pending_receipts(), 1);
    sim.advance(Duration::from_secs(2)).expect("settles");
    let outcomes: Vec<_> = sim.nodes[0]
        .events
        .iter()
        .filter(|e| matches!(e, Event::Lost(r) if r.id == id) || **e == Event::Delivered(id))
        .collect();
    assert_eq!(outcomes.len(), 1);
    assert!(
        matches!(outcomes[0], Event::Lost(r) if r.fate == Fate::Unknown(UnknownReason::Timeout))
    );
}

/// Found by reading the fuzz target's report: a traced envelope of the largest accepted size
/// grew past the frame limit on its way and made an honest hop close its link. The sender
/// now reserves room for the trace, and a hop never forwards a frame over the limit.
#[test]
fn the_largest_traced_envelope_crosses_every_hop() {
    let mut cfg = config(41);
    cfg.router.max_frame = 4096;
    cfg.router.max_queue_bytes = 1 << 16;
    cfg.router.hop_limit = 6;
    let mut sim = Sim::new(cfg);
    let mut last = sim.add_root().expect("valid");
    for _ in 0..6 {
        last = sim.add_child(last).expect("valid");
    }
    sim.run_until_idle().expect("settles");
    let mut size = 4096;
    let id = loop {
        match sim.send(0, Sim::node_id(last), vec![7; size], opts(true, true)) {
            Ok(id) => break id,
            Err(r) => {
                assert!(matches!(r.error, Error::PayloadTooLarge { .. }), "{r:?}");
                size -= 1;
            }
        }
    };
    assert!(size > 3000, "the reservation is modest: {size}");
    sim.run_until_idle().expect("settles");
    assert!(sim.nodes[0].events.contains(&Event::Delivered(id)));
    for node in &sim.nodes {
        assert!(
            !node.events.iter().any(|e| matches!(e, Event::LinkDown(_))),
            "a link went down"
        );
    }
    let got = received(&sim, last);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, 6);
}

/// A route update passed on while forwards wait for room does not overtake them: an
/// origin that leaves while its envelopes wait at a hop still has them delivered, since
/// its removal follows them on the link.
#[test]
fn a_removal_does_not_overtake_the_envelopes_of_the_node_removed() {
    let mut cfg = config(17);
    cfg.router.max_queue_envelopes = 4;
    cfg.wire_capacity = 1024;
    let mut sim = Sim::new(cfg);
    let hop = sim.add_root().expect("valid");
    let origin = sim.add_child(hop).expect("valid");
    let dest = sim.add_child(hop).expect("valid");
    sim.run_until_idle().expect("settles");
    let slow = sim.wire_between(hop, dest).expect("wire");
    sim.set_reading(slow, dest, false);
    let mut sent = Vec::new();
    for k in 0..30u8 {
        if let Ok(id) = sim.send(origin, Sim::node_id(dest), vec![k; 100], opts(false, false)) {
            sent.push(id);
        }
        sim.advance(Duration::from_micros(500)).expect("settles");
    }
    assert!(
        sim.nodes[hop].router.stats().parked > 0,
        "nothing waited at the hop"
    );
    // The origin leaves; its removal reaches the destination only after what waited.
    let w = sim.wire_between(origin, hop).expect("wire");
    sim.cut(w);
    sim.set_reading(slow, dest, true);
    sim.run_until_idle().expect("settles");
    let got: Vec<MessageId> = received(&sim, dest)
        .into_iter()
        .map(|(i, _, _)| i)
        .collect();
    let acked: Vec<MessageId> = sent.iter().copied().filter(|id| got.contains(id)).collect();
    assert_eq!(got, acked, "in order");
    assert_eq!(got.len(), sent.len(), "all of it arrived");
    assert_eq!(
        sim.nodes[dest].router.stats().absorbed,
        0,
        "late envelopes dropped"
    );
    assert!(!sim.nodes[dest]
        .router
        .routes()
        .iter()
        .any(|(n, _)| *n == Sim::node_id(origin)));
}
