//! The CBOR the wire needs (RFC 8949): unsigned integers, byte and text strings and arrays
//! of definite length — written and read by hand on the hot path.
//!
//! Every item starts with a head: the major type in the top three bits of one byte, and an
//! argument in the low five bits or in the 1, 2, 4 or 8 bytes after it.
//!
//! ```text
//!   major  0 unsigned integer   2 byte string   3 text string   4 array
//!   info   0..=23 the value itself; 24/25/26/27 the value in the next 1/2/4/8 bytes
//! ```
//!
//! Why not `ciborium-ll`: its `Decoder` costs about 115 instructions per head (a
//! `Title`↔`Header` conversion through a generic reader), 14 heads per envelope — a third of
//! all the work of routing one envelope, measured with callgrind. These few lines do a head in
//! about 15. The tests check every frame against `ciborium-ll` both ways, so the bytes stay
//! standard CBOR that any decoder reads.

/// Major type of unsigned integers.
pub(crate) const UINT: u8 = 0;
/// Major type of byte strings.
pub(crate) const BYTES: u8 = 2;
/// Major type of text strings.
pub(crate) const TEXT: u8 = 3;
/// Major type of arrays.
pub(crate) const ARRAY: u8 = 4;

/// Appends a head with the shortest encoding of `value`.
#[inline]
pub(crate) fn put_head(out: &mut Vec<u8>, major: u8, value: u64) {
    let m = major << 5;
    if value < 24 {
        out.push(m | value as u8);
    } else if value <= 0xff {
        out.extend_from_slice(&[m | 24, value as u8]);
    } else if value <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(value as u16).to_be_bytes());
    } else if value <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(value as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// Bytes the shortest head of `value` takes.
#[inline]
pub(crate) const fn head_len(value: u64) -> usize {
    match value {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Reads the head at `*pos`: its major type and argument. `None` at the end of `buf` or for
/// what the wire never uses (indefinite lengths, reserved values).
#[inline]
pub(crate) fn read_head(buf: &[u8], pos: &mut usize) -> Option<(u8, u64)> {
    let first = *buf.get(*pos)?;
    let (major, info) = (first >> 5, first & 0x1f);
    let extra = match info {
        0..=23 => {
            *pos += 1;
            return Some((major, u64::from(info)));
        }
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let bytes = buf.get(*pos + 1..*pos + 1 + extra)?;
    let mut v = 0u64;
    for &b in bytes {
        v = (v << 8) | u64::from(b);
    }
    *pos += 1 + extra;
    Some((major, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_at_every_width_edge() {
        for v in [
            0,
            23,
            24,
            255,
            256,
            65535,
            65536,
            u32::MAX as u64,
            1 << 32,
            u64::MAX,
        ] {
            for major in [UINT, BYTES, TEXT, ARRAY] {
                let mut out = Vec::new();
                put_head(&mut out, major, v);
                assert_eq!(out.len(), head_len(v));
                let mut pos = 0;
                assert_eq!(read_head(&out, &mut pos), Some((major, v)));
                assert_eq!(pos, out.len());
            }
        }
    }

    #[test]
    fn truncated_and_indefinite_heads_are_refused() {
        let mut pos = 0;
        assert_eq!(read_head(&[], &mut pos), None);
        assert_eq!(read_head(&[0x19, 0x01], &mut pos), None);
        assert_eq!(read_head(&[0x9f], &mut pos), None, "indefinite array");
        assert_eq!(read_head(&[0x1c], &mut pos), None, "reserved");
        assert_eq!(pos, 0, "nothing consumed on failure");
    }
}
