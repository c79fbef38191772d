//! The wire's conformance vectors (`docs/vectors/frames.json`, described in `docs/wire.md`):
//! frames built from Rust values, encoded, shown in CBOR diagnostic notation, and decoded
//! back. The file is what this test generates; a difference fails the test, so the spec's
//! vectors cannot drift from the code. After a deliberate wire change, regenerate with
//! `FORKBUS_WRITE_VECTORS=1 cargo test -p forkbus-node --test vectors` and review the diff.

use std::time::Duration;

use forkbus_node::{Control, SupervisionFrame, Tally};
use forkbus_router::wire::{
    decode_stream, encode_ack_fixed, encode_frame, DecodeLimits, Envelope, Flags, Frame, Hello,
    Hop, NodeDelta, NodeInfo, Notice, NoticeKind, RouteUpdate, WIRE_VERSION,
};
use forkbus_router::{Destination, Fate, LossReason, MessageId, NodeId, Timestamp};
use serde_json::{json, Value};

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/vectors/frames.json");

fn worker() -> NodeId {
    NodeId::new(0, 4242, 7)
}

fn parent() -> NodeId {
    NodeId::new(0, 4000, 1)
}

fn envelope(destination: Destination, flags: Flags, payload: &[u8]) -> Envelope {
    Envelope {
        id: MessageId {
            origin: worker(),
            seq: 3,
        },
        destination,
        hops: 0,
        hop_limit: 64,
        flags,
        trace: Vec::new(),
        payload: payload.to_vec(),
    }
}

fn control(c: &Control) -> Frame {
    let (code, data) = c.encode();
    Frame::Control { code, data }
}

/// Every vector: its name, what it shows, and the frame.
fn frames() -> Vec<(&'static str, &'static str, Frame)> {
    // The CBOR text string "hi": what the Rust API puts in a payload for `send(.., &"hi")`.
    let hi = [0x62, b'h', b'i'];
    let mut traced = envelope(
        Destination::Name("echo".into()),
        Flags::RECEIPT.with(Flags::TRACE),
        &hi,
    );
    traced.trace.push(Hop {
        node: worker(),
        link: None,
        at: Timestamp::from_nanos(1_000_000),
    });
    let notice = |kind| Notice {
        origin: parent(),
        seq: 9,
        from: worker(),
        hops: 0,
        kind,
    };
    // A tally of one process that sent and delivered ten (counters in declaration order:
    // processes, unreported, sent, copies, delivered, ...).
    let counts: [u64; 12] = [1, 0, 10, 0, 10, 0, 0, 0, 0, 0, 0, 0];
    let data: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
    let (tally_code, _) = Control::Tally(Tally::default()).encode();
    let tally = Control::from_child(tally_code, &data).expect("a tally's shape");
    vec![
        (
            "hello",
            "the first frame each side writes",
            Frame::Hello(Hello {
                version: WIRE_VERSION,
                node: worker(),
            }),
        ),
        (
            "envelope-to-node",
            "unicast to a node, no receipt",
            Frame::Envelope {
                link_seq: 0,
                envelope: envelope(Destination::Node(parent()), Flags::empty(), &hi),
            },
        ),
        (
            "envelope-to-name-traced",
            "to a name, with a receipt and a trace of one hop",
            Frame::Envelope {
                link_seq: 1,
                envelope: traced,
            },
        ),
        (
            "envelope-to-group",
            "to every member of a group",
            Frame::Envelope {
                link_seq: 2,
                envelope: envelope(Destination::Group("models".into()), Flags::empty(), &[]),
            },
        ),
        (
            "envelope-broadcast",
            "to every node but the origin",
            Frame::Envelope {
                link_seq: 3,
                envelope: envelope(Destination::Broadcast, Flags::empty(), &hi),
            },
        ),
        (
            "envelope-to-name-at",
            "to a name as bound at the sender",
            Frame::Envelope {
                link_seq: 4,
                envelope: envelope(
                    Destination::NameAt {
                        name: "echo".into(),
                        node: parent(),
                    },
                    Flags::RECEIPT,
                    &hi,
                ),
            },
        ),
        (
            "ack",
            "five numbered frames received (shortest head)",
            Frame::Ack(5),
        ),
        (
            "routes-announce-self",
            "a leaf announcing its first name and group (a change of itself, version 1)",
            Frame::Routes(RouteUpdate {
                change: vec![NodeDelta {
                    node: worker(),
                    version: 1,
                    add_names: vec!["worker.0".into()],
                    join_groups: vec!["models".into()],
                    ..NodeDelta::default()
                }],
                ..RouteUpdate::default()
            }),
        ),
        (
            "routes-table",
            "a parent's table: a node with its names and groups; a node gone",
            Frame::Routes(RouteUpdate {
                upsert: vec![NodeInfo {
                    node: parent(),
                    version: 3,
                    names: vec!["root".into()],
                    groups: vec!["models".into()],
                }],
                remove: vec![NodeId::new(0, 4100, 2)],
                ..RouteUpdate::default()
            }),
        ),
        (
            "notice-delivered",
            "a receipt for envelope 9 of the parent",
            Frame::Notice {
                link_seq: 5,
                notice: notice(NoticeKind::Delivered),
            },
        ),
        (
            "notice-lost",
            "envelope 9 lost here: no route (sure), it had a receipt",
            Frame::Notice {
                link_seq: 6,
                notice: notice(NoticeKind::Lost {
                    fate: Fate::Lost(LossReason::NoRoute),
                    receipt: true,
                }),
            },
        ),
        (
            "notice-moved",
            "custody handed envelope 9 to a new holder",
            Frame::Notice {
                link_seq: 7,
                notice: notice(NoticeKind::Moved(NodeId::new(0, 4300, 3))),
            },
        ),
        ("control-drain", "parent: drain", control(&Control::Drain)),
        (
            "control-probe",
            "parent: probe wave 3",
            control(&Control::Probe(3)),
        ),
        (
            "control-quiet",
            "child: wave 3, still",
            control(&Control::Quiet {
                wave: 3,
                still: true,
            }),
        ),
        ("control-exit", "parent: exit", control(&Control::Exit)),
        (
            "control-tally",
            "child: its subtree's tally, its last frame",
            control(&tally),
        ),
        (
            "control-ping",
            "supervisor: heartbeat 1",
            control(&Control::Supervision(SupervisionFrame::Ping(1))),
        ),
        (
            "control-pong",
            "worker: heartbeat 1 answered",
            control(&Control::Supervision(SupervisionFrame::Pong(1))),
        ),
        (
            "control-ready",
            "worker: started",
            control(&Control::Supervision(SupervisionFrame::Ready)),
        ),
        (
            "control-stop",
            "supervisor: stop (why 1), killed after 5 s, drain after 20 ms quiet",
            control(&Control::Supervision(SupervisionFrame::Stop {
                why: 1,
                deadline: Duration::from_secs(5),
                quiet: Duration::from_millis(20),
            })),
        ),
        (
            "control-recycle",
            "worker: 100 messages handled",
            control(&Control::Supervision(SupervisionFrame::Recycle(100))),
        ),
        (
            "control-gave-up",
            "forked child: a supervisor gave up \"db\" after 3 restarts",
            control(&Control::Supervision(SupervisionFrame::GaveUp {
                restarts: 3,
                name: Some("db".into()),
            })),
        ),
        (
            "control-job",
            "pool owner: task 7",
            control(&Control::Supervision(SupervisionFrame::Job {
                id: 7,
                payload: vec![1, 2, 3],
            })),
        ),
        (
            "control-result-ok",
            "pool worker: task 7 done",
            control(&Control::Supervision(SupervisionFrame::Result {
                id: 7,
                outcome: Ok(vec![4]),
            })),
        ),
        (
            "control-result-failed",
            "pool worker: task 7 failed",
            control(&Control::Supervision(SupervisionFrame::Result {
                id: 7,
                outcome: Err("boom".into()),
            })),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One CBOR item of the wire's subset in diagnostic notation; `None` for anything else.
fn diag(buf: &[u8], pos: &mut usize) -> Option<String> {
    let first = *buf.get(*pos)?;
    let (major, info) = (first >> 5, first & 0x1f);
    let extra = match info {
        0..=23 => 0,
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let mut v = u64::from(info);
    if extra > 0 {
        v = buf
            .get(*pos + 1..*pos + 1 + extra)?
            .iter()
            .fold(0, |a, b| (a << 8) | u64::from(*b));
    }
    *pos += 1 + extra;
    let len = usize::try_from(v).ok()?;
    Some(match major {
        0 => v.to_string(),
        2 => {
            let b = buf.get(*pos..*pos + len)?;
            *pos += len;
            format!("h'{}'", hex(b))
        }
        3 => {
            let b = buf.get(*pos..*pos + len)?;
            *pos += len;
            serde_json::to_string(std::str::from_utf8(b).ok()?).ok()?
        }
        4 => {
            let items: Option<Vec<String>> = (0..len).map(|_| diag(buf, pos)).collect();
            format!("[{}]", items?.join(", "))
        }
        _ => return None,
    })
}

fn vector(name: &str, note: &str, frame: &Frame) -> Value {
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, frame);
    let mut pos = 5;
    let body = diag(&bytes, &mut pos).expect("the wire's CBOR subset");
    assert_eq!(pos, bytes.len(), "{name}: one item per body");
    let decoded = decode_stream(&bytes, DecodeLimits::default()).expect("decodes");
    assert_eq!(decoded, std::slice::from_ref(frame), "{name}: round trip");
    json!({ "name": name, "note": note, "kind": bytes[4], "hex": hex(&bytes), "diag": body })
}

fn generated() -> Value {
    let mut vectors: Vec<Value> = frames()
        .iter()
        .map(|(name, note, frame)| vector(name, note, frame))
        .collect();
    // The fixed-width acknowledgement forkbus itself writes (readers take any head width).
    let mut fixed = Vec::new();
    encode_ack_fixed(&mut fixed, 5);
    let decoded = decode_stream(&fixed, DecodeLimits::default()).expect("decodes");
    assert_eq!(decoded, [Frame::Ack(5)]);
    let mut pos = 5;
    let body = diag(&fixed, &mut pos).expect("the wire's CBOR subset");
    vectors.push(json!({
        "name": "ack-fixed-width",
        "note": "five numbered frames received, the count 8 bytes wide as forkbus writes it",
        "kind": fixed[4],
        "hex": hex(&fixed),
        "diag": body,
    }));
    json!({ "wire_version": WIRE_VERSION, "vectors": vectors })
}

#[test]
fn the_vectors_on_file_are_what_the_code_encodes() {
    let now = serde_json::to_string_pretty(&generated()).expect("json") + "\n";
    if std::env::var_os("FORKBUS_WRITE_VECTORS").is_some() {
        std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/vectors"))
            .expect("create docs/vectors");
        std::fs::write(FILE, &now).expect("write the vectors");
    }
    let on_file = std::fs::read_to_string(FILE).expect("docs/vectors/frames.json exists");
    assert!(
        on_file == now,
        "docs/vectors/frames.json differs from what the code encodes; after a deliberate \
         wire change run with FORKBUS_WRITE_VECTORS=1 and review the diff"
    );
}

#[test]
fn every_vector_on_file_decodes_to_its_diagnostic() {
    let on_file: Value =
        serde_json::from_str(&std::fs::read_to_string(FILE).expect("exists")).expect("json");
    let vectors = on_file["vectors"].as_array().expect("a list");
    assert!(vectors.len() >= 26, "{} vectors", vectors.len());
    for v in vectors {
        let hex = v["hex"].as_str().expect("hex");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digits"))
            .collect();
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert_eq!(len + 4, bytes.len(), "{}: the length prefix", v["name"]);
        assert_eq!(u64::from(bytes[4]), v["kind"].as_u64().expect("kind"));
        let frames = decode_stream(&bytes, DecodeLimits::default()).expect("decodes");
        assert_eq!(frames.len(), 1, "{}", v["name"]);
        let mut pos = 5;
        assert_eq!(
            diag(&bytes, &mut pos).as_deref(),
            v["diag"].as_str(),
            "{}",
            v["name"]
        );
    }
}
