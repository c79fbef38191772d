//! Received messages and the CBOR payload codec.

use std::cell::RefCell;

use forkbus_router::{Destination, Envelope, Hop, LinkId, MessageId, NodeId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{DecodeError, SendError};

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
    let value = result.map_err(|e| match e {
        ciborium::de::Error::Io(_) => DecodeError::Syntax {
            expected,
            offset: payload.len(),
        },
        ciborium::de::Error::Syntax(offset) => DecodeError::Syntax { expected, offset },
        ciborium::de::Error::Semantic(_, detail) => DecodeError::Mismatch { expected, detail },
        ciborium::de::Error::RecursionLimitExceeded => DecodeError::TooDeep { expected },
    })?;
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
pub(crate) fn encode<T: Serialize + ?Sized>(
    value: &T,
    scratch: &mut Vec<u8>,
) -> Result<Vec<u8>, SendError> {
    scratch.clear();
    ciborium::ser::into_writer(value, &mut *scratch)
        .map_err(|e| SendError::Encode(e.to_string()))?;
    let out = scratch.as_slice().to_vec();
    if scratch.capacity() > 1 << 20 {
        // Do not keep a huge buffer around for one huge message.
        *scratch = Vec::new();
    }
    Ok(out)
}

thread_local! {
    /// The encoder's scratch buffer for threads without a bus (handles).
    static ENCODE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// [`encode`] with this thread's scratch buffer.
pub(crate) fn encode_local<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, SendError> {
    ENCODE_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => encode(value, &mut scratch),
        Err(_) => encode(value, &mut Vec::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

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
            Err(DecodeError::Syntax { .. })
        ));
    }
}
