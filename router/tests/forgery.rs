//! A hostile peer costs its own link, never the tree: forged origins, forged
//! announcements, forged notices and oversized announcements from a child link (an exec'd
//! node, say) close that link and move no route, no name and no outcome elsewhere.

use std::time::Duration;

use forkbus_router::sim::{Sim, SimConfig, SimRng};
use forkbus_router::wire::{
    encode_frame, Envelope, Flags, Frame, Hello, NodeDelta, NodeInfo, Notice, NoticeKind,
    RouteUpdate, WIRE_VERSION,
};
use forkbus_router::{
    Destination, DownCause, Event, Fate, LinkRole, LossReason, MessageId, NodeId, ProtocolError,
    SendOptions,
};
use proptest::prelude::*;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const FORGER: NodeId = NodeId::new(0, 66_666, 0xbad);

/// What a hostile child may send.
#[derive(Clone, Debug)]
enum Forgery {
    /// An envelope whose origin is another node of the tree (by index), to a node.
    Origin { origin: usize, to: usize, seq: u64 },
    /// An envelope from the forger itself (honest), to a node.
    Honest { to: usize },
    /// An announcement of a node of the tree as living behind the forger.
    Announce { node: usize },
    /// A claim on another node's name, announced for the forger itself.
    StealName { of: usize },
    /// A notice said in another node's name.
    Notice {
        from: usize,
        origin: usize,
        seq: u64,
        delivered: bool,
    },
    /// The forger's subtree has a thousand names in one announcement.
    TooManyNames,
    /// A removal of a node of the tree (stale: not behind the forger).
    Remove { node: usize },
}

fn forgery(n: usize) -> impl Strategy<Value = Forgery> {
    prop_oneof![
        (0..n, 0..n, 0u64..8).prop_map(|(origin, to, seq)| Forgery::Origin { origin, to, seq }),
        (0..n).prop_map(|to| Forgery::Honest { to }),
        (0..n).prop_map(|node| Forgery::Announce { node }),
        (0..n).prop_map(|of| Forgery::StealName { of }),
        (0..n, 0..n, 0u64..8, any::<bool>()).prop_map(|(from, origin, seq, delivered)| {
            Forgery::Notice {
                from,
                origin,
                seq,
                delivered,
            }
        }),
        Just(Forgery::TooManyNames),
        (0..n).prop_map(|node| Forgery::Remove { node }),
    ]
}

fn envelope(origin: NodeId, seq: u64, to: NodeId) -> Envelope {
    Envelope {
        id: MessageId { origin, seq },
        destination: Destination::Node(to),
        hops: 1,
        hop_limit: 16,
        flags: Flags::empty(),
        trace: Vec::new(),
        payload: b"forged".to_vec(),
    }
}

/// Encodes the forgeries as the forger's byte stream; returns it and whether every item
/// was honest (the link must then stay open).
fn stream(items: &[Forgery], ids: &[NodeId]) -> (Vec<u8>, bool) {
    let mut b = Vec::new();
    encode_frame(
        &mut b,
        &Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: FORGER,
        }),
    );
    let mut link_seq = 0;
    let mut honest_seq = 0;
    let mut honest = true;
    let mut version = 1;
    for item in items {
        let frame = match item {
            Forgery::Origin { origin, to, seq } => {
                honest = false;
                link_seq += 1;
                Frame::Envelope {
                    link_seq: link_seq - 1,
                    envelope: envelope(ids[*origin], *seq, ids[*to]),
                }
            }
            Forgery::Honest { to } => {
                link_seq += 1;
                honest_seq += 1;
                Frame::Envelope {
                    link_seq: link_seq - 1,
                    envelope: envelope(FORGER, honest_seq - 1, ids[*to]),
                }
            }
            Forgery::Announce { node } => {
                honest = false;
                Frame::Routes(RouteUpdate {
                    upsert: vec![NodeInfo {
                        node: ids[*node],
                        version: 1 << 40,
                        names: vec!["hijacked".into()],
                        groups: Vec::new(),
                    }],
                    ..RouteUpdate::default()
                })
            }
            Forgery::StealName { of } => {
                version += 1;
                // Refused quietly (another node holds it), not a violation: the name must
                // stay where it is.
                Frame::Routes(RouteUpdate {
                    change: vec![NodeDelta {
                        node: FORGER,
                        version,
                        add_names: vec![format!("w{of}")],
                        ..NodeDelta::default()
                    }],
                    ..RouteUpdate::default()
                })
            }
            Forgery::Notice {
                from,
                origin,
                seq,
                delivered,
            } => {
                honest = false;
                link_seq += 1;
                Frame::Notice {
                    link_seq: link_seq - 1,
                    notice: Notice {
                        origin: ids[*origin],
                        seq: *seq,
                        from: ids[*from],
                        hops: 1,
                        kind: if *delivered {
                            NoticeKind::Delivered
                        } else {
                            NoticeKind::Lost {
                                fate: Fate::Lost(LossReason::NoRoute),
                                receipt: true,
                            }
                        },
                    },
                }
            }
            Forgery::TooManyNames => {
                honest = false;
                version += 1;
                Frame::Routes(RouteUpdate {
                    change: vec![NodeDelta {
                        node: FORGER,
                        version,
                        add_names: (0..1000).map(|i| format!("n{i}")).collect(),
                        ..NodeDelta::default()
                    }],
                    ..RouteUpdate::default()
                })
            }
            Forgery::Remove { node } => Frame::Routes(RouteUpdate {
                remove: vec![ids[*node]],
                ..RouteUpdate::default()
            }),
        };
        encode_frame(&mut b, &frame);
    }
    (b, honest)
}

fn receipt() -> SendOptions {
    SendOptions {
        receipt: true,
        ..SendOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), .. ProptestConfig::default() })]

    /// Whatever a hostile child of some node sends: every other node's routes and names
    /// stay as they were, the forged link alone closes (as a protocol error, when anything
    /// was forged), nothing forged reaches an application as another node's, and
    /// receipts between honest nodes, sent while it happens, all end `Delivered`.
    #[test]
    fn forgeries_move_no_route_and_cost_only_their_link(
        n in 2usize..=20, seed in any::<u64>(),
        items in proptest::collection::vec(forgery(20), 1..12),
    ) {
        let mut sim = Sim::new(SimConfig { seed, ..SimConfig::default() });
        let mut rng = SimRng::new(seed);
        sim.add_root().expect("valid");
        for i in 1..n {
            let p = rng.below(i as u64) as usize;
            sim.add_child(p).expect("valid");
        }
        for i in 0..n {
            sim.nodes[i].router.register_name(&format!("w{i}")).expect("free");
        }
        sim.run_until_idle().expect("settles");
        let before: Vec<_> = sim.nodes.iter().map(|x| x.router.routes()).collect();
        let ids: Vec<NodeId> = (0..20).map(|i| Sim::node_id(i % n)).collect();
        let victim = rng.below(n as u64) as usize;
        let now = sim.now();
        let link = sim.nodes[victim]
            .router
            .handle_link_up(now, Some(FORGER), LinkRole::Child);
        let (bytes, honest) = stream(&items, &ids);
        let mut sent = Vec::new();
        for k in 0..20 {
            let from = rng.below(n as u64) as usize;
            let to = rng.below(n as u64) as usize;
            let id = sim.send(from, Sim::node_id(to), vec![k], receipt()).expect("room");
            sent.push((from, to, id));
        }
        let result = sim.nodes[victim].router.handle_input(now, link, &bytes);
        sim.run_until_idle().expect("settles");
        sim.advance(Duration::from_millis(20)).expect("settles");
        if honest {
            prop_assert!(result.is_ok(), "{result:?}");
        }
        let closed = !sim.nodes[victim].router.links().contains(&link);
        prop_assert_eq!(closed, result.is_err());
        if closed {
            let down = sim.nodes[victim].events.iter().find_map(|e| match e {
                Event::LinkDown(d) if d.link == link => Some(d.cause.clone()),
                _ => None,
            });
            prop_assert!(matches!(down, Some(DownCause::Protocol(_))), "{down:?}");
        }
        // Routes: as before, plus (while its link is open) the forger behind the victim.
        for (i, node) in sim.nodes.iter().enumerate() {
            let mut now_routes: Vec<_> = node.router.routes();
            now_routes.retain(|(x, _)| *x != FORGER);
            prop_assert_eq!(&now_routes, &before[i], "node {}", i);
            for j in 0..n {
                let to = forkbus_router::Address::from(Destination::Name(format!("w{j}")));
                prop_assert_eq!(node.router.resolve(&to), Some(Sim::node_id(j)), "node {} name w{}", i, j);
            }
        }
        // Nothing forged reached an application in another node's name.
        for node in &sim.nodes {
            for e in &node.events {
                if let Event::Message { envelope, .. } = e {
                    prop_assert!(
                        envelope.payload != b"forged" || envelope.id.origin == FORGER,
                        "a forged envelope was delivered: {:?}", envelope.id
                    );
                }
            }
        }
        // Honest receipts are untouched by forged notices: all delivered, exactly once.
        for (from, to, id) in sent {
            let ev = &sim.nodes[from].events;
            let delivered = ev.iter().filter(|e| **e == Event::Delivered(id)).count();
            let lost = ev.iter().filter(|e| matches!(e, Event::Lost(r) if r.id == id)).count();
            prop_assert_eq!((delivered, lost), (1, 0), "{:?} {} → {}", id, from, to);
        }
    }
}

/// The hijack: an exec'd child sends one envelope in the name of a live sibling.
/// Today's router moved the sibling's route onto the forger; now the forger's link closes
/// and the sibling stays reachable, also after the forger is gone.
#[test]
fn one_forged_origin_does_not_hijack_a_route() {
    let mut sim = Sim::new(SimConfig::default());
    let root = sim.add_root().expect("valid");
    let child = sim.add_child(root).expect("valid");
    sim.run_until_idle().expect("settles");
    let now = sim.now();
    let link = sim.nodes[root]
        .router
        .handle_link_up(now, Some(FORGER), LinkRole::Child);
    let (bytes, _) = stream(
        &[Forgery::Origin {
            origin: 1,
            to: 0,
            seq: 1000,
        }],
        &[Sim::node_id(root), Sim::node_id(child)],
    );
    let err = sim.nodes[root]
        .router
        .handle_input(now, link, &bytes)
        .expect_err("a violation");
    assert_eq!(
        err,
        forkbus_router::Error::Protocol(ProtocolError::RouteConflict {
            node: Sim::node_id(child)
        })
    );
    sim.run_until_idle().expect("settles");
    let id = sim
        .send(root, Sim::node_id(child), vec![1], receipt())
        .expect("room");
    let back = sim
        .send(child, Sim::node_id(root), vec![2], receipt())
        .expect("room");
    sim.run_until_idle().expect("settles");
    assert!(sim.nodes[root].events.contains(&Event::Delivered(id)));
    assert!(sim.nodes[child].events.contains(&Event::Delivered(back)));
    assert_eq!(
        sim.nodes[root].router.resolve(&Sim::node_id(child).into()),
        Some(Sim::node_id(child))
    );
}

/// Announcements are bounded: a child announcing more names than a node may hold, or
/// more nodes than the table may hold, is closed, and the table holds no more than the
/// bound.
#[test]
fn announcements_past_the_bounds_close_the_link() {
    let mut cfg = SimConfig::default();
    cfg.router.max_nodes = 64;
    let mut sim = Sim::new(cfg);
    let root = sim.add_root().expect("valid");
    sim.run_until_idle().expect("settles");
    let now = sim.now();
    let link = sim.nodes[root]
        .router
        .handle_link_up(now, Some(FORGER), LinkRole::Child);
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        &Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: FORGER,
        }),
    );
    for k in 0..100u32 {
        encode_frame(
            &mut bytes,
            &Frame::Routes(RouteUpdate {
                upsert: vec![NodeInfo {
                    node: NodeId::new(0, 70_000 + k, 1),
                    version: 1,
                    names: vec![format!("x{k}")],
                    groups: Vec::new(),
                }],
                ..RouteUpdate::default()
            }),
        );
    }
    let err = sim.nodes[root]
        .router
        .handle_input(now, link, &bytes)
        .expect_err("past the bound");
    assert_eq!(
        err,
        forkbus_router::Error::Protocol(ProtocolError::TooManyNodes { max: 64 })
    );
    assert!(
        sim.nodes[root].router.routes().is_empty(),
        "all of it gone with the link"
    );
    let (bytes, _) = stream(&[Forgery::TooManyNames], &[Sim::node_id(root)]);
    let now = sim.now();
    let link = sim.nodes[root]
        .router
        .handle_link_up(now, Some(FORGER), LinkRole::Child);
    assert!(matches!(
        sim.nodes[root].router.handle_input(now, link, &bytes),
        Err(forkbus_router::Error::Protocol(_))
    ));
    // Locally: past the bound of names per node, registration is refused.
    let r = &mut sim.nodes[root].router;
    let max = r.config().max_names_per_node;
    for i in 0..max {
        r.register_name(&format!("own{i}"))
            .expect("below the bound");
    }
    assert!(matches!(
        r.register_name("one-more"),
        Err(forkbus_router::Error::TooManyNames { .. })
    ));
}
