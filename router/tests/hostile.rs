//! Bytes from a peer are untrusted: whatever arrives on one link, the router never panics,
//! never grows without bound, and closes only that link.

use forkbus_router::wire::{encode_frame, Frame, Hello, WIRE_VERSION};
use forkbus_router::{
    Destination, DownCause, Event, LinkRole, NodeId, Router, RouterConfig, SendOptions, Timestamp,
};
use proptest::prelude::*;

fn me() -> NodeId {
    NodeId::new(0, 1, 1)
}

fn peer(pid: u32) -> NodeId {
    NodeId::new(0, pid, 9)
}

fn hello(node: NodeId) -> Vec<u8> {
    let mut b = Vec::new();
    encode_frame(
        &mut b,
        &Frame::Hello(Hello {
            version: WIRE_VERSION,
            node,
        }),
    );
    b
}

/// A router with a quiet good link and a link whose peer said hello; some envelopes queued.
fn setup(config: RouterConfig) -> (Router, forkbus_router::LinkId, forkbus_router::LinkId) {
    let mut r = Router::new(me(), config).expect("valid config");
    let now = Timestamp::from_nanos(1);
    let good = r.handle_link_up(now, Some(peer(2)), LinkRole::Peer);
    let bad = r.handle_link_up(now, None, LinkRole::Child);
    r.handle_input(now, good, &hello(peer(2))).expect("hello");
    r.handle_input(now, bad, &hello(peer(3))).expect("hello");
    // Two envelopes on each link: lost lists are not empty, and the tight bound (4) leaves
    // room for the final check.
    for k in 0..2u8 {
        let _ = r.submit(
            now,
            Destination::Broadcast,
            vec![k; 32],
            SendOptions::default(),
        );
    }
    (r, good, bad)
}

/// Drains outputs, writing half of what is pending (partial writes are the hard case).
fn drain(r: &mut Router) -> Vec<Event> {
    drain_part(r, 2)
}

fn drain_part(r: &mut Router, div: usize) -> Vec<Event> {
    while let Some(link) = r.poll_transmit() {
        let n = r.pending_output(link).map(<[u8]>::len).unwrap_or(0);
        let _ = r.advance_output(link, n / div);
    }
    std::iter::from_fn(|| r.poll_event()).collect()
}

/// A stream of valid frames from peer 3, for mutation.
fn valid_stream() -> Vec<u8> {
    let mut b = Vec::new();
    let env = forkbus_router::Envelope {
        id: forkbus_router::MessageId {
            origin: peer(3),
            seq: 0,
        },
        destination: Destination::Broadcast,
        hops: 1,
        hop_limit: 8,
        flags: forkbus_router::Flags::TRACE,
        trace: Vec::new(),
        payload: vec![5; 40],
    };
    for seq in 0..3 {
        let mut e = env.clone();
        e.id.seq = seq;
        encode_frame(
            &mut b,
            &Frame::Envelope {
                link_seq: seq,
                envelope: e,
            },
        );
    }
    encode_frame(&mut b, &Frame::Ack(1));
    encode_frame(
        &mut b,
        &Frame::Routes(forkbus_router::wire::RouteUpdate {
            upsert: vec![forkbus_router::wire::NodeInfo {
                node: peer(4),
                version: 2,
                names: vec!["x".into()],
                groups: vec!["g".into()],
            }],
            remove: vec![peer(5)],
            ..forkbus_router::wire::RouteUpdate::default()
        }),
    );
    b
}

fn feed_and_check(config: RouterConfig, chunks: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let (mut r, good, bad) = setup(config.clone());
    drain(&mut r);
    let base_in = r.stats().bytes_in;
    let mut closed = false;
    for (i, chunk) in chunks.iter().enumerate() {
        let now = Timestamp::from_nanos(10 + i as u64);
        match r.handle_input(now, bad, chunk) {
            Ok(()) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
        drain(&mut r);
        if let Ok(s) = r.link_stats(bad) {
            prop_assert!(s.in_flight <= config.max_queue_envelopes);
        }
        let fed: u64 = chunks[..=i].iter().map(|c| c.len() as u64).sum();
        prop_assert_eq!(r.stats().bytes_in - base_in, fed);
    }
    let events = drain(&mut r);
    prop_assert!(r.links().contains(&good), "the good link stays");
    if closed {
        prop_assert!(!r.links().contains(&bad), "the bad link is closed");
        prop_assert!(events.iter().any(|e| matches!(
            e,
            Event::LinkDown(d) if d.link == bad && matches!(d.cause, DownCause::Protocol(_))
        )));
        // The closed link's id is dead for good.
        prop_assert!(r
            .handle_input(Timestamp::from_nanos(99), bad, b"x")
            .is_err());
    } else {
        prop_assert!(r.links().contains(&bad));
    }
    // The good link still carries traffic (or is full of what the bad peer broadcast
    // through it, which is backpressure, not damage).
    match r.submit(
        Timestamp::from_nanos(100),
        peer(2),
        vec![1],
        SendOptions::default(),
    ) {
        Ok(id) => prop_assert_eq!(id.origin, me()),
        Err(refused) => prop_assert_eq!(
            refused.error,
            forkbus_router::Error::QueueFull { link: good }
        ),
    }
    Ok(())
}

fn small() -> RouterConfig {
    let mut c = RouterConfig::default();
    c.max_frame = 256;
    c.max_queue_bytes = 1024;
    c.max_queue_envelopes = 4;
    c.max_nodes = 4;
    c.max_origins = 2;
    c.max_name = 8;
    c.max_names_per_node = 4;
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, .. ProptestConfig::default() })]

    /// Arbitrary bytes, in arbitrary chunks.
    #[test]
    fn arbitrary_bytes_close_at_most_their_link(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
        tight in any::<bool>(),
    ) {
        let config = if tight { small() } else { RouterConfig::default() };
        feed_and_check(config, &chunks)?;
    }

    /// Valid frames with a few bytes flipped, split anywhere: reaches the deep paths.
    #[test]
    fn mutated_valid_frames_close_at_most_their_link(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        tight in any::<bool>(),
    ) {
        let mut bytes = valid_stream();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        let c = cut.index(bytes.len() + 1);
        let chunks = vec![bytes[..c].to_vec(), bytes[c..].to_vec()];
        let config = if tight { small() } else { RouterConfig::default() };
        feed_and_check(config, &chunks)?;
    }
}

#[test]
fn the_valid_stream_is_accepted() {
    let (mut r, _good, bad) = setup(RouterConfig::default());
    drain_part(&mut r, 1);
    r.handle_input(Timestamp::from_nanos(5), bad, &valid_stream())
        .expect("valid");
    let events = drain(&mut r);
    let messages = events
        .iter()
        .filter(|e| matches!(e, Event::Message { .. }))
        .count();
    assert_eq!(messages, 3);
}
