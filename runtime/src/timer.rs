//! Timers: deadlines ordered by time, then by creation.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use forkbus_router::Timestamp;

/// A timer of the loop, for [`Bus::cancel_timer`](crate::Bus::cancel_timer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(u64);

impl fmt::Display for TimerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timer {}", self.0)
    }
}

/// Timers keyed by `(deadline, id)`: the earliest first, equal deadlines in the order they
/// were added. The first key is the loop's wait timeout.
#[derive(Debug)]
pub(crate) struct Timers<T> {
    by_time: BTreeMap<(Timestamp, u64), T>,
    deadline_of: HashMap<u64, Timestamp>,
    next: u64,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Self {
            by_time: BTreeMap::new(),
            deadline_of: HashMap::new(),
            next: 0,
        }
    }
}

impl<T> Timers<T> {
    pub(crate) fn insert(&mut self, at: Timestamp, item: T) -> TimerId {
        let id = self.next;
        self.next += 1;
        self.by_time.insert((at, id), item);
        self.deadline_of.insert(id, at);
        TimerId(id)
    }

    pub(crate) fn cancel(&mut self, id: TimerId) -> Option<T> {
        let at = self.deadline_of.remove(&id.0)?;
        self.by_time.remove(&(at, id.0))
    }

    /// The earliest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Timestamp> {
        self.by_time.first_key_value().map(|((at, _), _)| *at)
    }

    /// The earliest timer due at `now`, removed.
    pub(crate) fn pop_due(&mut self, now: Timestamp) -> Option<(TimerId, T)> {
        let entry = self.by_time.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        let ((_, id), item) = entry.remove_entry();
        self.deadline_of.remove(&id);
        Some((TimerId(id), item))
    }

    pub(crate) fn len(&self) -> usize {
        self.by_time.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u64) -> Timestamp {
        Timestamp::from_nanos(n)
    }

    #[test]
    fn earliest_first_then_insertion_order() {
        let mut timers = Timers::default();
        timers.insert(t(30), "c");
        timers.insert(t(10), "a");
        timers.insert(t(30), "d");
        timers.insert(t(20), "b");
        assert_eq!(timers.next_deadline(), Some(t(10)));
        let mut fired = Vec::new();
        while let Some((_, x)) = timers.pop_due(t(30)) {
            fired.push(x);
        }
        assert_eq!(fired, ["a", "b", "c", "d"]);
        assert_eq!(timers.next_deadline(), None);
    }

    #[test]
    fn nothing_fires_early() {
        let mut timers = Timers::default();
        timers.insert(t(100), 1);
        assert!(timers.pop_due(t(99)).is_none());
        assert_eq!(timers.pop_due(t(100)).map(|(_, x)| x), Some(1));
    }

    #[test]
    fn cancel_removes_exactly_one() {
        let mut timers = Timers::default();
        let a = timers.insert(t(5), 'a');
        let b = timers.insert(t(5), 'b');
        assert_eq!(timers.cancel(a), Some('a'));
        assert_eq!(timers.cancel(a), None);
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.pop_due(t(5)), Some((b, 'b')));
        assert_eq!(timers.cancel(b), None);
    }
}
