//! Listeners: what the loop tells the application, in priority order.

use std::fmt;

use forkbus_node::PeerShutdown;
use forkbus_router::{LossReport, MessageId, NodeId};

use crate::bus::Bus;
use crate::error::BusError;
use crate::message::Message;
use crate::pool::TaskOutcome;
use crate::supervisor::{StopRequest, SupervisionEvent};
use forkbus_node::{ExitStatus, Pid};

/// Receives what happens on the bus. Every method does nothing by default.
///
/// Listeners run in ascending priority (lowest first), ties in registration order. Each gets
/// the [`Bus`] and may send, fork, add timers or stop from inside. A listener that panics is
/// caught: the panic is reported (to `tracing` and to the other listeners'
/// [`on_router_error`](Self::on_router_error)) and the other listeners and the loop go on.
pub trait Listener {
    /// An envelope for this node arrived (or this node sent one to itself).
    fn on_message(&mut self, bus: &mut Bus, message: &Message) {
        let _ = (bus, message);
    }

    /// An envelope this node sent was written to the kernel on every link it went out on
    /// (a hand-off, not a delivery).
    fn on_sent(&mut self, bus: &mut Bus, id: MessageId) {
        let _ = (bus, id);
    }

    /// A receipt: the destination took the envelope.
    fn on_delivered(&mut self, bus: &mut Bus, id: MessageId) {
        let _ = (bus, id);
    }

    /// An envelope this node sent was lost, here or anywhere on its path.
    fn on_lost(&mut self, bus: &mut Bus, report: &LossReport) {
        let _ = (bus, report);
    }

    /// A neighbour said hello.
    fn on_peer_up(&mut self, bus: &mut Bus, peer: NodeId) {
        let _ = (bus, peer);
    }

    /// A neighbour went away (end of file, error, reaped, or a protocol violation), with
    /// every envelope that was queued for it or written and not acknowledged. Exactly once
    /// per link.
    fn on_peer_shutdown(&mut self, bus: &mut Bus, shutdown: &PeerShutdown) {
        let _ = (bus, shutdown);
    }

    /// A node left the tree (its route was withdrawn).
    fn on_node_down(&mut self, bus: &mut Bus, node: NodeId) {
        let _ = (bus, node);
    }

    /// A link that refused a send ([`SendError::QueueFull`](crate::SendError::QueueFull)) has
    /// room again.
    fn on_send_ready(&mut self, bus: &mut Bus) {
        let _ = bus;
    }

    /// Something went wrong that the loop survived.
    fn on_router_error(&mut self, bus: &mut Bus, error: &BusError) {
        let _ = (bus, error);
    }

    /// A child of this process exited and was reaped. Exactly once per child.
    fn on_child_exit(&mut self, bus: &mut Bus, pid: Pid, status: ExitStatus) {
        let _ = (bus, pid, status);
    }

    /// The tree is shutting down: this node drains (sends are refused from now on) and
    /// exits once its children are gone and its queues acknowledged.
    fn on_shutdown(&mut self, bus: &mut Bus) {
        let _ = bus;
    }

    /// A signal the loop does not handle itself arrived (today `SIGHUP`).
    fn on_signal(&mut self, bus: &mut Bus, signal: i32) {
        let _ = (bus, signal);
    }

    /// A supervisor of this process (or one in a child process that gave up on a child)
    /// reports on its children: starts, exits with their status (one per process, whatever
    /// path reaped it), kills and why, recycling, reloads, giving up.
    fn on_supervision(&mut self, bus: &mut Bus, event: &SupervisionEvent) {
        let _ = (bus, event);
    }

    /// This process is a supervised worker and its supervisor asks it to stop (recycling,
    /// reload, a stop request): finish what is in hand. Unless a listener calls
    /// [`hold_stop`](crate::supervisor::hold_stop), the worker keeps serving until quiet,
    /// then drains and exits 0; past the deadline it is killed.
    fn on_stopping(&mut self, bus: &mut Bus, request: &StopRequest) {
        let _ = (bus, request);
    }

    /// A job of a task pool this process owns ended (exactly once per job).
    fn on_task(&mut self, bus: &mut Bus, outcome: &TaskOutcome) {
        let _ = (bus, outcome);
    }
}

/// A registered listener, for [`Bus::remove_listener`].
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
