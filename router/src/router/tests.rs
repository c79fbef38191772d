//! Unit tests of the router: acknowledgements, forks, names, custody, stalls.

use std::time::Duration;

use super::*;
use crate::wire::decode_stream;

fn node(pid: u32) -> NodeId {
    NodeId::new(0, pid, 1)
}

fn t(nanos: u64) -> Timestamp {
    Timestamp::from_nanos(nanos)
}

// ---------------------------------------------------------------------------------------
// tests
/// Two routers joined by one link; returns them and their link ids.
fn pair() -> (Router, Router, LinkId, LinkId) {
    let mut a = Router::new(node(1), RouterConfig::default()).expect("valid");
    let mut b = Router::new(node(2), RouterConfig::default()).expect("valid");
    let la = a.handle_link_up(t(0), Some(node(2)), LinkRole::Peer);
    let lb = b.handle_link_up(t(0), Some(node(1)), LinkRole::Peer);
    let mut r = (a, b, la, lb);
    pump(&mut r);
    r
}

/// Moves all bytes both ways once; returns the frames that went a → b and b → a.
fn pump(r: &mut (Router, Router, LinkId, LinkId)) -> (Vec<Frame>, Vec<Frame>) {
    let (a, b, la, lb) = r;
    let ab = a.pending_output(*la).expect("open").to_vec();
    a.advance_output(*la, ab.len()).expect("open");
    b.handle_input(t(1), *lb, &ab).expect("valid");
    let ba = b.pending_output(*lb).expect("open").to_vec();
    b.advance_output(*lb, ba.len()).expect("open");
    a.handle_input(t(1), *la, &ba).expect("valid");
    let limits = DecodeLimits::default();
    (
        decode_stream(&ab, limits).expect("valid"),
        decode_stream(&ba, limits).expect("valid"),
    )
}

#[test]
fn a_reply_carries_the_acknowledgement() {
    let mut r = pair();
    r.0.submit(t(2), node(2), vec![1], SendOptions::default())
        .expect("room");
    let ab = r.0.pending_output(r.2).expect("open").to_vec();
    r.0.advance_output(r.2, ab.len()).expect("open");
    r.1.handle_input(t(3), r.3, &ab).expect("valid");
    // Nothing to say back yet: the acknowledgement waits for a ride or the timer.
    assert!(r.1.pending_output(r.3).expect("open").is_empty());
    assert_eq!(
        r.1.poll_timeout(),
        Some(t(3) + RouterConfig::default().ack_delay)
    );
    r.1.submit(t(4), node(1), vec![2], SendOptions::default())
        .expect("room");
    let ba = decode_stream(
        r.1.pending_output(r.3).expect("open"),
        DecodeLimits::default(),
    )
    .expect("valid");
    assert!(matches!(
        ba.as_slice(),
        [Frame::Ack(1), Frame::Envelope { .. }]
    ));
    let stall = RouterConfig::default()
        .stall_timeout
        .expect("on by default");
    assert_eq!(
        r.1.poll_timeout(),
        Some(t(4) + stall),
        "the ack timer is off once acked; the unwritten output's stall timer is on"
    );
}

#[test]
fn the_ack_timer_sends_a_lone_acknowledgement() {
    let mut r = pair();
    r.0.submit(t(2), node(2), vec![1], SendOptions::default())
        .expect("room");
    let ab = r.0.pending_output(r.2).expect("open").to_vec();
    r.0.advance_output(r.2, ab.len()).expect("open");
    r.1.handle_input(t(3), r.3, &ab).expect("valid");
    let due = r.1.poll_timeout().expect("ack timer");
    r.1.handle_timeout(due);
    assert_eq!(r.1.poll_transmit(), Some(r.3));
    let ba = r.1.pending_output(r.3).expect("open").to_vec();
    assert_eq!(
        decode_stream(&ba, DecodeLimits::default()),
        Ok(vec![Frame::Ack(1)])
    );
    r.0.handle_input(t(4), r.2, &ba).expect("valid");
    assert_eq!(r.0.link_stats(r.2).map(|s| s.in_flight), Ok(0));
    assert!(r.0.is_idle());
}

#[test]
fn a_queued_acknowledgement_is_raised_in_place() {
    let mut r = pair();
    r.1.config = RouterConfig {
        ack_every: 1,
        ..RouterConfig::default()
    };
    for k in 0..3u8 {
        r.0.submit(t(2), node(2), vec![k], SendOptions::default())
            .expect("room");
        let ab = r.0.pending_output(r.2).expect("open").to_vec();
        r.0.advance_output(r.2, ab.len()).expect("open");
        r.1.handle_input(t(3), r.3, &ab).expect("valid");
    }
    // B never wrote: one acknowledgement frame, counting all three.
    let ba = r.1.pending_output(r.3).expect("open");
    assert_eq!(
        decode_stream(ba, DecodeLimits::default()),
        Ok(vec![Frame::Ack(3)])
    );
}

#[test]
fn sent_comes_once_every_byte_is_written() {
    let mut r = pair();
    let id =
        r.0.submit(t(2), node(2), vec![7; 100], SendOptions::default())
            .expect("room");
    let n = r.0.pending_output(r.2).expect("open").len();
    r.0.advance_output(r.2, n - 1).expect("open");
    assert!(std::iter::from_fn(|| r.0.poll_event()).all(|e| e != Event::Sent(id)));
    r.0.advance_output(r.2, 1).expect("open");
    assert_eq!(r.0.poll_event(), Some(Event::Sent(id)));
}

#[test]
fn a_dead_link_id_stays_dead_when_its_slot_is_reused() {
    let (mut a, _, la, _) = pair();
    a.handle_link_down(t(5), la).expect("open");
    let again = a.handle_link_up(t(6), Some(node(3)), LinkRole::Peer);
    assert_eq!(again.index(), la.index(), "the slot is reused");
    assert_ne!(again, la);
    assert_eq!(a.handle_input(t(7), la, b"x"), Err(Error::UnknownLink(la)));
    assert!(a.pending_output(again).is_ok());
}

#[test]
fn a_forked_childs_name_is_known_at_once_and_kept() {
    let mut p = Router::new(node(1), RouterConfig::default()).expect("valid");
    let names = vec!["worker".to_string()];
    let (c, lc) = p
        .forked_child(t(0), node(2), &names, RouterConfig::default())
        .expect("valid");
    let lp = p.handle_fork(t(0), node(2), &names);
    let by_name = Address::from(Destination::Name("worker".into()));
    assert_eq!(p.resolve(&by_name), Some(node(2)), "before a byte moved");
    assert_eq!(c.resolve(&Address::Pid(1)), Some(node(1)));
    // The child's own announcement (a newer version) keeps the name.
    let mut r = (p, c, lp, lc);
    pump(&mut r);
    pump(&mut r);
    assert_eq!(r.0.resolve(&by_name), Some(node(2)));
}

#[test]
fn a_receipt_to_oneself_is_delivered_at_once() {
    let mut a = Router::new(node(1), RouterConfig::default()).expect("valid");
    a.register_name("me").expect("valid");
    let id = a
        .submit(
            t(1),
            Destination::Name("me".into()),
            vec![1],
            SendOptions {
                receipt: true,
                ..SendOptions::default()
            },
        )
        .expect("accepted");
    let events: Vec<Event> = std::iter::from_fn(|| a.poll_event()).collect();
    assert!(events.contains(&Event::Delivered(id)));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Message { link: None, .. })));
    assert_eq!(a.pending_receipts(), 0);
}

#[test]
fn refusals_hand_the_payload_back() {
    let mut a = Router::new(node(1), RouterConfig::default()).expect("valid");
    let r = a
        .submit(
            t(1),
            Destination::Broadcast,
            vec![9; 3],
            SendOptions {
                receipt: true,
                ..SendOptions::default()
            },
        )
        .expect_err("receipts need unicast");
    assert_eq!(r.error, Error::ReceiptNeedsUnicast);
    assert_eq!(r.payload, vec![9; 3]);
    let big = vec![0; a.config().max_frame as usize];
    let r = a
        .submit(t(1), node(2), big, SendOptions::default())
        .expect_err("too large");
    assert!(matches!(r.error, Error::PayloadTooLarge { .. }));
    assert!(a.register_name("").is_err());
    assert!(a.join_group(&"x".repeat(1000)).is_err());
}

// ---------------------------------------------------------------------------------------
// custody tests
/// Moves bytes over every link of the given routers until nothing moves.
fn settle(rs: &mut [(&mut Router, LinkId, usize, LinkId)]) {
    // (router, its link, index of the peer router in rs, the peer's link)
    for _ in 0..20 {
        let mut moved = false;
        for i in 0..rs.len() {
            let (link, peer, plink) = (rs[i].1, rs[i].2, rs[i].3);
            let out = rs[i]
                .0
                .pending_output(link)
                .map(<[u8]>::to_vec)
                .unwrap_or_default();
            if out.is_empty() {
                continue;
            }
            moved = true;
            let _ = rs[i].0.advance_output(link, out.len());
            let _ = rs[peer].0.handle_input(t(10), plink, &out);
        }
        if !moved {
            return;
        }
    }
}

#[test]
fn a_held_name_keeps_its_envelopes_and_hands_them_to_the_next_holder() {
    let mut s = Router::new(node(1), RouterConfig::default()).expect("valid");
    s.hold_name("w", 4).expect("free");
    for k in 0..6u8 {
        let opts = SendOptions {
            receipt: true,
            ..SendOptions::default()
        };
        let id = s
            .submit(t(1), Destination::Name("w".into()), vec![k], opts)
            .expect("accepted");
        assert_eq!(id.seq, u64::from(k));
    }
    let ev: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
    let held = ev
        .iter()
        .filter(|e| matches!(e, Event::Held { .. }))
        .count();
    assert_eq!(held, 4, "{ev:?}");
    let full: Vec<&LossReport> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Lost(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(full.len(), 2);
    assert!(full
        .iter()
        .all(|r| r.fate == Fate::Lost(LossReason::QueueFull)));
    assert_eq!(
        full[0].payload.as_deref(),
        Some(&[4u8][..]),
        "the payload comes back"
    );
    assert!(
        !ev.iter().any(|e| matches!(e, Event::Delivered(_))),
        "receipts stay open"
    );
    assert_eq!(s.held(), 4);

    // The next holder is forked: it gets the held envelopes first, then new ones.
    let names = vec!["w".to_string()];
    s.check_fork_names(&names)
        .expect("the custodian may give it");
    let (mut w, lw) = s
        .forked_child(t(2), node(2), &names, RouterConfig::default())
        .expect("valid");
    let ls = s.handle_fork(t(2), node(2), &names);
    assert_eq!(s.held(), 0);
    assert!(!s.is_idle());
    let later = s
        .submit(
            t(3),
            Destination::Name("w".into()),
            vec![9],
            SendOptions::default(),
        )
        .expect("room");
    settle(&mut [(&mut s, ls, 1, lw), (&mut w, lw, 0, ls)]);
    let got: Vec<(MessageId, Vec<u8>)> = std::iter::from_fn(|| w.poll_event())
        .filter_map(|e| match e {
            Event::Message { envelope, .. } => Some((envelope.id, envelope.payload)),
            _ => None,
        })
        .collect();
    let payloads: Vec<u8> = got.iter().map(|(_, p)| p[0]).collect();
    assert_eq!(payloads, vec![0, 1, 2, 3, 9], "held ones first, in order");
    assert_eq!(got[4].0, later);
    let ev: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
    let delivered = ev
        .iter()
        .filter(|e| matches!(e, Event::Delivered(_)))
        .count();
    assert_eq!(delivered, 4, "the receipts follow the envelopes: {ev:?}");
    assert_eq!(s.pending_receipts(), 0);
}

#[test]
fn giving_a_held_name_up_reports_its_envelopes_lost_for_sure() {
    let mut s = Router::new(node(1), RouterConfig::default()).expect("valid");
    s.hold_name("w", 4).expect("free");
    let opts = SendOptions {
        receipt: true,
        ..SendOptions::default()
    };
    let id = s
        .submit(t(1), Destination::Name("w".into()), vec![7], opts)
        .expect("accepted");
    s.unregister_name("w").expect("held");
    let lost: Vec<LossReport> = std::iter::from_fn(|| s.poll_event())
        .filter_map(|e| match e {
            Event::Lost(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].id, id);
    assert_eq!(lost[0].fate, Fate::Lost(LossReason::Abandoned));
    assert!(lost[0].is_sure_loss());
    assert!(s.is_idle());
}

#[test]
fn names_are_unique_and_only_a_parent_hands_one_on() {
    let mut p = Router::new(node(1), RouterConfig::default()).expect("valid");
    let names = vec!["db".to_string()];
    p.check_fork_names(&names).expect("free");
    let (_c, _) = p
        .forked_child(t(0), node(2), &names, RouterConfig::default())
        .expect("valid");
    p.handle_fork(t(0), node(2), &names);
    // A replacement of that child may take it over...
    assert_eq!(p.check_fork_names(&names), Ok(()));
    // ... but this node may not register it, nor a grandchild take it.
    assert_eq!(
        p.register_name("db"),
        Err(Error::NameTaken {
            name: "db".into(),
            holder: node(2)
        })
    );
}

// ---------------------------------------------------------------------------------------
// stall tests

fn ms(ms: u64) -> Timestamp {
    Timestamp::from_nanos(ms * 1_000_000)
}

fn stalling_router() -> Router {
    let config = RouterConfig {
        stall_timeout: Some(Duration::from_millis(100)),
        ..RouterConfig::default()
    };
    Router::new(NodeId::new(0, 1, 1), config).expect("valid")
}

fn downs(r: &mut Router) -> Vec<DownCause> {
    std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            Event::LinkDown(d) => Some(d.cause),
            _ => None,
        })
        .collect()
}

#[test]
fn output_nobody_takes_closes_the_link_and_slow_progress_does_not() {
    let mut r = stalling_router();
    let deaf = r.handle_link_up(ms(0), Some(NodeId::new(0, 2, 1)), LinkRole::Child);
    let slow = r.handle_link_up(ms(0), Some(NodeId::new(0, 3, 1)), LinkRole::Child);
    // The peer of `slow` takes a byte every 60 ms: progress, however slow.
    for step in 1..=10 {
        let now = ms(step * 60);
        let _ = r.advance_output(slow, 1);
        if r.poll_timeout().is_some_and(|d| d <= now) {
            r.handle_timeout(now);
        }
    }
    assert!(!r.links().contains(&deaf), "the deaf link stays open");
    assert!(r.links().contains(&slow), "a slow reader is not stalled");
    assert_eq!(downs(&mut r), vec![DownCause::Stalled]);
    assert_eq!(r.stats().stalls, 1);
}

#[test]
fn a_frame_begun_and_never_finished_closes_the_link() {
    let mut r = stalling_router();
    let peer = NodeId::new(0, 2, 1);
    let link = r.handle_link_up(ms(0), Some(peer), LinkRole::Child);
    // Whatever it has to say is taken at once: only the input can stall.
    let n = r.pending_output(link).map(<[u8]>::len).unwrap_or(0);
    r.advance_output(link, n).expect("open");
    let mut hello = Vec::new();
    encode_frame(
        &mut hello,
        &Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: peer,
        }),
    );
    r.handle_input(ms(0), link, &hello).expect("hello");
    // A 1000-byte frame announced, three bytes of it sent, then silence.
    r.handle_input(ms(10), link, &[0, 0, 3, 232, 2, 0x8d, 0])
        .expect("a partial frame");
    assert_eq!(r.poll_timeout(), Some(ms(110)));
    r.handle_timeout(ms(109));
    assert!(r.links().contains(&link));
    r.handle_timeout(ms(110));
    assert!(!r.links().contains(&link));
    assert!(downs(&mut r).contains(&DownCause::Stalled));
}
