//! The ordered set the bus keeps its listeners in: by priority, ties in registration
//! order, safe against additions and removals during a dispatch. Plain data, no `Bus`.

use std::fmt;

/// A registered listener, for [`Bus::remove_listener`](crate::Bus::remove_listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub(crate) u64);

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One entry of a [`ListenerSet`].
#[derive(Debug)]
pub(crate) struct Entry<T> {
    pub(crate) id: ListenerId,
    pub(crate) priority: i32,
    pub(crate) item: T,
}

/// Items kept in ascending priority, ties in insertion order; can be taken out for a
/// dispatch (during which items may be added or removed) and put back.
#[derive(Debug)]
pub(crate) struct ListenerSet<T> {
    entries: Vec<Entry<T>>,
    next: u64,
    /// Removals asked for while the entries were taken out.
    removed: Vec<ListenerId>,
    taken: bool,
}

impl<T> Default for ListenerSet<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            next: 0,
            removed: Vec::new(),
            taken: false,
        }
    }
}

impl<T> ListenerSet<T> {
    pub(crate) fn insert(&mut self, priority: i32, item: T) -> ListenerId {
        let id = ListenerId(self.next);
        self.next += 1;
        self.place(Entry { id, priority, item });
        id
    }

    fn place(&mut self, entry: Entry<T>) {
        let at = self
            .entries
            .partition_point(|e| (e.priority, e.id) <= (entry.priority, entry.id));
        self.entries.insert(at, entry);
    }

    pub(crate) fn remove(&mut self, id: ListenerId) -> bool {
        if let Some(at) = self.entries.iter().position(|e| e.id == id) {
            self.entries.remove(at);
            return true;
        }
        if self.taken && id.0 < self.next && !self.removed.contains(&id) {
            self.removed.push(id);
            return true;
        }
        false
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Takes every entry out for a dispatch.
    pub(crate) fn take(&mut self) -> Vec<Entry<T>> {
        self.taken = true;
        std::mem::take(&mut self.entries)
    }

    /// Whether an entry taken out was removed meanwhile.
    pub(crate) fn is_removed(&self, id: ListenerId) -> bool {
        self.removed.contains(&id)
    }

    /// Puts taken entries back, with those added meanwhile in their places and those
    /// removed meanwhile gone.
    pub(crate) fn restore(&mut self, taken: Vec<Entry<T>>) {
        let added = std::mem::replace(&mut self.entries, taken);
        let removed = std::mem::take(&mut self.removed);
        self.entries.retain(|e| !removed.contains(&e.id));
        for e in added {
            self.place(e);
        }
        self.taken = false;
    }

    #[cfg(test)]
    fn order(&self) -> Vec<&T> {
        self.entries.iter().map(|e| &e.item).collect()
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_priority_first_ties_in_registration_order() {
        let mut set = ListenerSet::default();
        set.insert(5, "e");
        set.insert(-1, "a");
        set.insert(0, "b");
        set.insert(5, "f");
        set.insert(0, "c");
        set.insert(1, "d");
        assert_eq!(set.order(), [&"a", &"b", &"c", &"d", &"e", &"f"]);
    }

    #[test]
    fn added_and_removed_during_dispatch() {
        let mut set = ListenerSet::default();
        let a = set.insert(0, "a");
        let b = set.insert(0, "b");
        let c = set.insert(2, "c");
        let taken = set.take();
        assert_eq!(taken.len(), 3);
        // During the dispatch: one added at a tie with "a" (goes after all priority 0), one
        // removed that is out, and one removed that was added meanwhile.
        set.insert(0, "x");
        let y = set.insert(1, "y");
        assert!(set.remove(b));
        assert!(set.is_removed(b));
        assert!(set.remove(y));
        set.restore(taken);
        assert_eq!(set.order(), [&"a", &"x", &"c"]);
        assert!(set.remove(a));
        assert!(!set.remove(a));
        assert!(set.remove(c));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn removing_unknown_ids_is_refused() {
        let mut set: ListenerSet<()> = ListenerSet::default();
        assert!(!set.remove(ListenerId(3)));
        let _t = set.take();
        assert!(!set.remove(ListenerId(3)));
    }

    #[test]
    fn panic_messages() {
        let p: Box<dyn std::any::Any + Send> = Box::new("boom");
        assert_eq!(panic_message(&*p), "boom");
        let p: Box<dyn std::any::Any + Send> = Box::new(String::from("bang"));
        assert_eq!(panic_message(&*p), "bang");
        let p: Box<dyn std::any::Any + Send> = Box::new(3_u8);
        assert_eq!(panic_message(&*p), "(non-string panic payload)");
    }
}
