//! The pure parts of a restart policy: backoff, the restart-intensity window, and the
//! jittered request limits of recycling. No clock, no I/O: time comes in as `now`.

use std::collections::VecDeque;
use std::time::Duration;

use forkbus_router::Timestamp;

/// How long to wait before restarting a child that ended unexpectedly: a delay that doubles
/// (by `factor`) with every consecutive quick exit, up to `max`.
///
/// ```text
///   exits in a row:  1        2          3          ...   n
///   delay:           initial  initial·f  initial·f² ...   min(initial·fⁿ⁻¹, max)
/// ```
///
/// The count of exits in a row starts again once a process has been up (ready) for
/// `reset_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// Delay before the first restart.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Growth per consecutive exit (at least 1).
    pub factor: u32,
    /// A process up at least this long resets the count of exits in a row.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            factor: 2,
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// A backoff from `initial` to `max`, doubling.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            ..Self::default()
        }
    }

    /// The delay before a restart after `in_a_row` consecutive exits (1 for the first).
    pub fn delay(&self, in_a_row: u32) -> Duration {
        let mut d = self.initial;
        for _ in 1..in_a_row {
            if d >= self.max {
                break;
            }
            d = d.saturating_mul(self.factor.max(1));
        }
        d.min(self.max)
    }
}

/// The restart-intensity limit: more than `max_restarts` restarts within `within` and the
/// supervisor gives up on the child (Erlang/OTP's intensity and period).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Intensity {
    /// Restarts allowed within the window.
    pub max_restarts: u32,
    /// The window.
    pub within: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            within: Duration::from_secs(10),
        }
    }
}

impl Intensity {
    /// At most `max_restarts` restarts within `within`.
    pub fn new(max_restarts: u32, within: Duration) -> Self {
        Self {
            max_restarts,
            within,
        }
    }
}

/// The times of recent restarts, oldest first, for an [`Intensity`] check.
///
/// ```text
///        ── within ──►
///   ──x───[──x──x──x──]now      a restart at `now` is admitted while the window holds
///         now - within          at most `max_restarts` of them, this one included
/// ```
#[derive(Clone, Debug, Default)]
pub(crate) struct RestartWindow {
    times: VecDeque<Timestamp>,
}

impl RestartWindow {
    /// Records a restart wanted at `now`; `false` (nothing recorded) when it would be one
    /// too many: give up.
    pub(crate) fn admit(&mut self, limit: &Intensity, now: Timestamp) -> bool {
        while let Some(&t) = self.times.front() {
            if now.saturating_duration_since(t) >= limit.within {
                self.times.pop_front();
            } else {
                break;
            }
        }
        if self.times.len() >= limit.max_restarts as usize {
            return false;
        }
        self.times.push_back(now);
        true
    }

    /// Restarts in the window as last seen.
    pub(crate) fn len(&self) -> usize {
        self.times.len()
    }
}

/// Recycling: a worker is replaced after handling `base + j` messages, `j` drawn for each
/// process from `0..=jitter` so that a pool does not recycle all at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaxRequests {
    /// Messages a worker handles at least before it is replaced.
    pub base: u64,
    /// Extra messages, drawn at random per process (Swoole's `max_request_grace`).
    pub jitter: u64,
}

impl MaxRequests {
    /// `base` messages plus up to `jitter` more.
    pub fn new(base: u64, jitter: u64) -> Self {
        Self { base, jitter }
    }
}

/// Draws a limit in `base..=base + jitter` that no other live process of the supervisor
/// has (`taken`), uniformly among the free values; when every value is taken, any value.
pub(crate) fn pick_limit(rng: &mut Rng, max: MaxRequests, taken: &[u64]) -> u64 {
    let lo = max.base;
    let hi = max.base.saturating_add(max.jitter);
    let span = (hi - lo).saturating_add(1);
    let mut used: Vec<u64> = taken
        .iter()
        .copied()
        .filter(|t| (lo..=hi).contains(t))
        .collect();
    used.sort_unstable();
    used.dedup();
    let free = span - used.len() as u64;
    if free == 0 {
        return lo + rng.below(span);
    }
    // The k-th free value: start at `lo + k` and step over every used value at or below.
    let mut candidate = lo + rng.below(free);
    for u in used {
        if u <= candidate {
            candidate += 1;
        } else {
            break;
        }
    }
    candidate
}

/// A small SplitMix64 generator: jitter needs no cryptography and no dependency.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Rejection sampling against modulo bias.
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
            factor: 2,
            reset_after: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=7).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 100, 100, 100]);
        assert_eq!(b.delay(0), Duration::from_millis(10));
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(100));
        let flat = Backoff { factor: 1, ..b };
        assert_eq!(flat.delay(5), Duration::from_millis(10));
        let zero = Backoff { factor: 0, ..b };
        assert_eq!(zero.delay(5), Duration::from_millis(10));
    }

    #[test]
    fn intensity_admits_n_restarts_per_window() {
        let limit = Intensity::new(3, Duration::from_millis(1000));
        let mut w = RestartWindow::default();
        assert!(w.admit(&limit, t(0)));
        assert!(w.admit(&limit, t(100)));
        assert!(w.admit(&limit, t(200)));
        // A fourth within the second: refused, and not recorded.
        assert!(!w.admit(&limit, t(300)));
        assert!(!w.admit(&limit, t(999)));
        assert_eq!(w.len(), 3);
        // The first falls out of the window at 1000.
        assert!(w.admit(&limit, t(1000)));
        assert!(!w.admit(&limit, t(1050)));
        // Long after, the window is empty again.
        assert!(w.admit(&limit, t(5000)));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn zero_intensity_refuses_every_restart() {
        let limit = Intensity::new(0, Duration::from_secs(1));
        let mut w = RestartWindow::default();
        assert!(!w.admit(&limit, t(0)));
    }

    #[test]
    fn jittered_limits_are_distinct_while_values_are_free() {
        for seed in 0..200 {
            let mut rng = Rng::new(seed);
            let max = MaxRequests::new(100, 5);
            let mut taken = Vec::new();
            for _ in 0..6 {
                let l = pick_limit(&mut rng, max, &taken);
                assert!((100..=105).contains(&l), "{l}");
                assert!(!taken.contains(&l), "{l} drawn twice: {taken:?}");
                taken.push(l);
            }
            // All six values used: any value will do, still in range.
            let l = pick_limit(&mut rng, max, &taken);
            assert!((100..=105).contains(&l));
        }
    }

    #[test]
    fn jitter_spreads_over_the_range() {
        let mut rng = Rng::new(42);
        let max = MaxRequests::new(10, 9);
        let mut seen = [0u32; 10];
        for _ in 0..2000 {
            let l = pick_limit(&mut rng, max, &[12, 15]);
            assert!(l != 12 && l != 15);
            seen[(l - 10) as usize] += 1;
        }
        for (i, n) in seen.iter().enumerate() {
            if i == 2 || i == 5 {
                assert_eq!(*n, 0);
            } else {
                assert!(*n > 150, "value {} drawn {n} times of 2000", i + 10);
            }
        }
    }

    #[test]
    fn no_jitter_means_the_base() {
        let mut rng = Rng::new(1);
        assert_eq!(pick_limit(&mut rng, MaxRequests::new(50, 0), &[]), 50);
        assert_eq!(pick_limit(&mut rng, MaxRequests::new(50, 0), &[50]), 50);
        assert_eq!(
            pick_limit(&mut rng, MaxRequests::new(u64::MAX, 3), &[]),
            u64::MAX
        );
    }

    #[test]
    fn below_is_in_range() {
        let mut rng = Rng::new(3);
        assert_eq!(rng.below(0), 0);
        for n in 1..50 {
            assert!(rng.below(n) < n);
        }
    }
}
