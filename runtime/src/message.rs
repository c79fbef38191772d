//! Received messages and the CBOR payload codec.

use std::cell::RefCell;
use std::io;

use forkbus_router::{Destination, Envelope, Hop, LinkId, MessageId, NodeId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{DecodeError, EncodeError};

/// An envelope delivered to this node.
#[derive(Clone, Debug)]
pub struct Message {
    envelope: Envelope,
    link: Option<LinkId>,
}

impl Message {
    pub(crate) fn new(envelope: Envelope, link: Option<LinkId>) -> Self {
        Self { envelope, link }
    }

    /// Its id (origin and the origin's sequence number).
    pub fn id(&self) -> MessageId {
        self.envelope.id
    }

    /// The node that sent it.
    pub fn origin(&self) -> NodeId {
        self.envelope.id.origin
    }

    /// Where it was addressed (this node, a name of it, a group it is in, or broadcast).
    pub fn destination(&self) -> &Destination {
        &self.envelope.destination
    }

    /// Links it crossed to get here (the tree distance for unicast; zero when this node sent
    /// it to itself).
    pub fn hops(&self) -> u8 {
        if self.link.is_none() {
            0
        } else {
            self.envelope.hops
        }
    }

    /// Its routing trace, origin first, when the sender asked for one.
    pub fn trace(&self) -> &[Hop] {
        &self.envelope.trace
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.envelope.payload
    }

    /// The link it came in on (`None` when this node sent it to itself).
    pub fn link(&self) -> Option<LinkId> {
        self.link
    }

    /// The whole envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Decodes the payload as a `T`, with an error naming `T` when it is not one.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        decode(&self.envelope.payload)
    }
}

thread_local! {
    /// The decoder's scratch buffer, reused instead of zeroing a fresh 4 KiB per call.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 4096]);
}

/// Decodes a CBOR payload as a `T`; every byte must belong to the value.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let expected = std::any::type_name::<T>();
    let mut reader = payload;
    let result = SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => ciborium::de::from_reader_with_buffer(&mut reader, &mut scratch[..]),
        // Re-entered from inside a Deserialize impl: use a buffer of its own.
        Err(_) => ciborium::de::from_reader_with_buffer(&mut reader, &mut [0u8; 4096][..]),
    });
    let value = result.map_err(|e| DecodeError::from_ciborium(e, expected, payload.len()))?;
    if !reader.is_empty() {
        return Err(DecodeError::TrailingBytes {
            expected,
            trailing: reader.len(),
        });
    }
    Ok(value)
}

/// Encodes a value as CBOR into `scratch` (reused, so it grows once) and returns an exactly
/// sized copy for the envelope.
#[cfg(test)]
pub(crate) fn encode<T: Serialize + ?Sized>(
    value: &T,
    scratch: &mut Vec<u8>,
) -> Result<Vec<u8>, EncodeError> {
    encode_capped(value, scratch, usize::MAX)
}

/// Encodes a value as CBOR onto the end of `buf`, refused as soon as `buf` would hold more
/// than `cap` bytes ([`EncodeError::TooLarge`]; `buf` never grows beyond `cap`).
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    buf: &mut Vec<u8>,
    cap: usize,
) -> Result<(), EncodeError> {
    let mut writer = Capped {
        buf,
        cap,
        refused: false,
    };
    match ciborium::ser::into_writer(value, &mut writer) {
        Ok(()) if !writer.refused => Ok(()),
        Err(ciborium::ser::Error::Value(message)) if !writer.refused => {
            Err(EncodeError::Serialize { message })
        }
        // The writer fails only by refusing a write past the cap (and a `Serialize` that
        // swallowed the refusal is refused all the same).
        _ => Err(EncodeError::TooLarge { limit: cap }),
    }
}

/// [`encode`] for a payload that must fit in a frame of at most `max_frame` bytes: the
/// encoding stops as soon as it passes `max_frame` bytes (the frame holds the payload and
/// more, so such a payload can never fit), and `scratch` never grows beyond that, so a huge
/// value is refused before it costs its size again ([`EncodeError::TooLarge`] with the
/// limit `max_frame`). A payload within the bound may still be refused by the router, which
/// knows the exact envelope
/// ([`PayloadTooLarge`](forkbus_router::Error::PayloadTooLarge)).
pub(crate) fn encode_capped<T: Serialize + ?Sized>(
    value: &T,
    scratch: &mut Vec<u8>,
    max_frame: usize,
) -> Result<Vec<u8>, EncodeError> {
    scratch.clear();
    encode_into(value, scratch, max_frame)?;
    let out = scratch.as_slice().to_vec();
    if scratch.capacity() > 1 << 20 {
        // Do not keep a huge buffer around for one huge message.
        *scratch = Vec::new();
    }
    Ok(out)
}

/// A writer into a buffer that refuses a write which would make it hold more than `cap`
/// bytes (the encoder stops at the first error) and grows the buffer at most to `cap`.
struct Capped<'a> {
    buf: &'a mut Vec<u8>,
    cap: usize,
    /// Whether a write was refused.
    refused: bool,
}

impl io::Write for Capped<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let len = self.buf.len().saturating_add(data.len());
        if len > self.cap {
            self.refused = true;
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "payload over the frame limit",
            ));
        }
        if len > self.buf.capacity() {
            // Doubling, as a `Vec` grows, but never past the cap.
            let target = len.max(self.buf.capacity().saturating_mul(2)).min(self.cap);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

thread_local! {
    /// The encoder's scratch buffer for threads without a bus (handles).
    static ENCODE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// [`encode`] with this thread's scratch buffer.
pub(crate) fn encode_local<T: Serialize + ?Sized>(
    value: &T,
    max_frame: usize,
) -> Result<Vec<u8>, EncodeError> {
    ENCODE_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => encode_capped(value, &mut scratch, max_frame),
        Err(_) => encode_capped(value, &mut Vec::new(), max_frame),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn the_thread_local_encoder_is_capped_too() {
        // What `BusHandle::send` and the task pool use: refused at the cap, not after.
        let big = vec![7u8; 100_000];
        match encode_local(&big, 1000) {
            Err(EncodeError::TooLarge { limit: 1000 }) => {}
            other => panic!("not refused at the cap: {other:?}"),
        }
        let small = encode_local(&7u8, 1000).expect("fits");
        assert_eq!(decode::<u8>(&small).expect("decodes"), 7);
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
        text: String,
    }

    #[test]
    fn round_trip() {
        let mut scratch = Vec::new();
        let bytes = encode(
            &Ping {
                n: 7,
                text: "hi".into(),
            },
            &mut scratch,
        )
        .expect("encodes");
        let back: Ping = decode(&bytes).expect("decodes");
        assert_eq!(
            back,
            Ping {
                n: 7,
                text: "hi".into()
            }
        );
    }

    #[test]
    fn wrong_type_names_the_type() {
        let mut scratch = Vec::new();
        let bytes = encode(&"just text", &mut scratch).expect("encodes");
        let err = decode::<Ping>(&bytes).expect_err("not a Ping");
        assert!(matches!(err, DecodeError::Mismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("Ping"), "{err}");
    }

    /// A sequence of `n` five-byte integers that counts the elements the encoder asked for.
    struct Counted<'a> {
        n: u32,
        taken: &'a std::cell::Cell<u32>,
    }

    impl Serialize for Counted<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = s.serialize_seq(Some(self.n as usize))?;
            for i in 0..self.n {
                self.taken.set(self.taken.get() + 1);
                seq.serialize_element(&(0x1000_0000 | i))?;
            }
            seq.end()
        }
    }

    fn too_large(r: &Result<Vec<u8>, EncodeError>) -> Option<usize> {
        match r {
            Err(EncodeError::TooLarge { limit }) => Some(*limit),
            _ => None,
        }
    }

    #[test]
    fn a_value_over_the_cap_is_refused_before_it_is_encoded_whole() {
        // Not a power of two: a buffer grown by plain doubling would pass it.
        const CAP: usize = 60_000;
        // 5 MB of CBOR, written element by element: the encoder stops at the cap.
        let taken = std::cell::Cell::new(0);
        let mut scratch = Vec::new();
        let r = encode_capped(
            &Counted {
                n: 1 << 20,
                taken: &taken,
            },
            &mut scratch,
            CAP,
        );
        let limit = too_large(&r).unwrap_or_else(|| panic!("not refused: {r:?}"));
        assert_eq!(limit, CAP);
        assert!(scratch.capacity() <= CAP + 16, "{}", scratch.capacity());
        assert!(
            (taken.get() as usize) <= CAP / 5 + 2,
            "encoded {} elements",
            taken.get()
        );
        // One big string, written in one piece: refused without being copied at all.
        let mut scratch = Vec::new();
        let big = "x".repeat(16 << 20);
        let r = encode_capped(big.as_str(), &mut scratch, CAP);
        assert!(too_large(&r).is_some(), "{r:?}");
        assert!(scratch.capacity() <= CAP + 16, "{}", scratch.capacity());
    }

    #[test]
    fn a_value_up_to_the_cap_round_trips() {
        const CAP: usize = 60_000;
        let mut scratch = Vec::new();
        // A text of n < 65536 bytes encodes as 3 + n bytes: exactly the cap here.
        let text = "y".repeat(CAP - 3);
        let bytes = encode_capped(text.as_str(), &mut scratch, CAP).expect("fits");
        assert_eq!(bytes.len(), CAP);
        assert_eq!(decode::<String>(&bytes).expect("decodes"), text);
        assert!(scratch.capacity() <= CAP + 16, "{}", scratch.capacity());
        // One byte more does not fit.
        let text = "y".repeat(CAP - 2);
        let r = encode_capped(text.as_str(), &mut scratch, CAP);
        assert_eq!(too_large(&r), Some(CAP));
        // The same buffer serves a small value afterwards.
        let ping = Ping {
            n: 1,
            text: "small".into(),
        };
        let bytes = encode_capped(&ping, &mut scratch, CAP).expect("fits");
        assert_eq!(decode::<Ping>(&bytes).expect("decodes"), ping);
    }

    #[test]
    fn garbage_and_trailing_bytes() {
        let err = decode::<u32>(&[0xff, 0xff]).expect_err("garbage");
        assert!(err.to_string().contains("u32"), "{err}");
        let mut scratch = Vec::new();
        let mut bytes = encode(&5u32, &mut scratch).expect("encodes");
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(DecodeError::TrailingBytes { trailing: 1, .. })
        ));
        assert!(matches!(
            decode::<u32>(&[]),
            Err(DecodeError::Truncated { len: 0, .. })
        ));
        // A text header announcing five bytes, with two.
        assert!(matches!(
            decode::<String>(&[0x65, b'a', b'b']),
            Err(DecodeError::Truncated { len: 3, .. })
        ));
    }

    /// A value whose `Serialize` fails with a custom serde error.
    struct Unserializable;

    impl Serialize for Unserializable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no wire form"))
        }
    }

    #[test]
    fn a_failing_serialize_keeps_its_message() {
        let mut scratch = Vec::new();
        let r = encode_capped(&Unserializable, &mut scratch, 1000);
        assert_eq!(
            r,
            Err(EncodeError::Serialize {
                message: "no wire form".into()
            })
        );
        let e = crate::SendError::from(r.expect_err("refused"));
        assert_eq!(
            e.to_string(),
            "cannot encode the payload: the value failed to serialize: no wire form"
        );
    }
}
