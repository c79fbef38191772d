//! Arbitrary bytes from a peer through the frame decoder, three ways that must agree.
//!
//! Input: two bytes choosing a split point, then the stream. For a small and the default set
//! of limits:
//!
//! 1. `wire::decode_stream` over the whole stream;
//! 2. a `Deframer` fed the stream in two pieces split at the chosen point, each frame through
//!    `decode_frame` — the router's own path, which must see the same frames (or the same
//!    error after the same frames) and hold the same unfinished tail;
//! 3. every decoded frame re-encoded with `encode_frame` (length as predicted for
//!    envelopes) and decoded again, which must give the frame back (notices and route
//!    updates with deltas included).
#![no_main]

use forkbus_router::wire::{
    decode_frame, decode_stream, encode_frame, envelope_frame_len, DecodeLimits, Deframer, Frame,
};
use forkbus_router::ProtocolError;
use libfuzzer_sys::fuzz_target;

/// Frames decoded before the stream ended or failed, the outcome, and the unfinished tail.
type Outcome = (Vec<Frame>, Result<(), ProtocolError>, Option<usize>);

fn deframe(pieces: &[&[u8]], limits: DecodeLimits) -> Outcome {
    let mut deframer = Deframer::new(limits.max_frame);
    let mut frames = Vec::new();
    for piece in pieces {
        let fed = deframer.feed(piece, |kind, body| {
            frames.push(decode_frame(kind, body, limits)?);
            Ok::<_, ProtocolError>(())
        });
        if let Err(e) = fed {
            // The deframer is in no defined state after an error: stop, as the router does.
            return (frames, Err(e), None);
        }
    }
    let tail = deframer.buffered();
    assert!(
        tail < 4 + limits.max_frame as usize,
        "deframer holds {tail} bytes, more than one frame"
    );
    (frames, Ok(()), Some(tail))
}

fn check_round_trip(frame: &Frame, limits: DecodeLimits) {
    let mut buf = Vec::new();
    let len = encode_frame(&mut buf, frame);
    assert_eq!(len, buf.len(), "encode_frame misreports its length");
    if let Frame::Envelope { link_seq, envelope } = frame {
        assert_eq!(
            envelope_frame_len(*link_seq, envelope),
            len,
            "envelope_frame_len mispredicts {frame:?}"
        );
    }
    // Canonical CBOR is never longer than what was accepted, so the limits still hold.
    match decode_stream(&buf, limits) {
        Ok(again) => assert_eq!(
            again,
            std::slice::from_ref(frame),
            "frame does not round-trip"
        ),
        Err(e) => panic!("re-encoded {frame:?} does not decode: {e}"),
    }
}

fn check(stream: &[u8], split: usize, limits: DecodeLimits) {
    let whole = decode_stream(stream, limits);
    let (head, rest) = stream.split_at(split);
    let one_piece = deframe(&[stream], limits);
    let two_pieces = deframe(&[head, rest], limits);
    assert_eq!(one_piece, two_pieces, "split at {split} changes the frames");
    match &whole {
        Ok(frames) => {
            assert_eq!(one_piece.1, Ok(()));
            assert_eq!(frames, &one_piece.0);
        }
        Err(e) => assert_eq!(one_piece.1.as_ref(), Err(e)),
    }
    for frame in &one_piece.0 {
        check_round_trip(frame, limits);
    }
}

fuzz_target!(|data: &[u8]| {
    let [a, b, stream @ ..] = data else {
        return;
    };
    let split = usize::from(u16::from_le_bytes([*a, *b])) % (stream.len() + 1);
    let small = DecodeLimits {
        max_frame: 64,
        max_name: 8,
        max_names_per_node: 2,
    };
    check(stream, split, small);
    check(stream, split, DecodeLimits::default());
});
