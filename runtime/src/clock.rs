//! The clock and the incarnation nonce: the only places the runtime reads the time.

use std::sync::atomic::{AtomicU64, Ordering};

use forkbus_router::Timestamp;
use nix::time::{clock_gettime, ClockId};

/// Now, on `CLOCK_MONOTONIC`, in nanoseconds.
///
/// Every process of a machine shares this clock, so the times of a routing trace compare
/// across the tree.
pub fn monotonic_now() -> Timestamp {
    Timestamp::from_nanos(read_clock(ClockId::CLOCK_MONOTONIC))
}

fn read_clock(id: ClockId) -> u64 {
    // CLOCK_MONOTONIC and CLOCK_REALTIME cannot fail on Linux; zero is a harmless fallback.
    clock_gettime(id).map_or(0, |ts| {
        let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
        let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
        secs.saturating_mul(1_000_000_000).saturating_add(nanos)
    })
}

/// A fresh, non-zero incarnation nonce.
///
/// Mixes both clocks, the pid and a per-process counter through SplitMix64: a restarted worker
/// that inherits a dead node's pid gets another nonce (a different instant), and two children
/// forked in the same nanosecond differ by the counter.
pub(crate) fn nonce(salt: u32) -> u32 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = read_clock(ClockId::CLOCK_MONOTONIC)
        ^ read_clock(ClockId::CLOCK_REALTIME).rotate_left(17)
        ^ (u64::from(std::process::id()) << 32)
        ^ u64::from(salt)
        ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let folded = (z ^ (z >> 32)) as u32;
    folded.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic() {
        let a = monotonic_now();
        let b = monotonic_now();
        assert!(b >= a);
        assert!(a.as_nanos() > 0);
    }

    #[test]
    fn nonces_differ_and_are_never_zero() {
        let a = nonce(7);
        let b = nonce(7);
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_ne!(b, 0);
    }
}
