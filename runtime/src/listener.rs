//! What the bus calls: the application's [`Listener`]s (the event stream, [`Event`], as
//! methods, in priority order) and the runtime's services (`Service`: supervision, the
//! task pool, exec, and the calls and gateways to come), which plug in ahead of the
//! listeners through one interface. The bus names no service: the crate root lists them,
//! each keeps its state in the bus's `Services` by type and brings its own events
//! ([`ServiceEvent`]) and control frames.

use std::any::{Any, TypeId};

use forkbus_node::PeerShutdown;
use forkbus_router::{LossReport, MessageId, NodeId};

use crate::bus::Bus;
use crate::error::BusError;
use crate::event::{Event, ServiceEvent};
use crate::message::Message;
use crate::ticket::Ticket;
use crate::timer::TimerId;
use forkbus_node::{Control, LinkInfo};
use forkbus_node::{ExitStatus, Pid};

/// Receives what happens on the bus: every [`Event`], through [`on_event`](Self::on_event),
/// which by default calls the method for the event's kind. Every method does nothing by
/// default.
///
/// Listeners run in ascending priority (lowest first), ties in registration order, after
/// the runtime's services. Each gets the [`Bus`] and may send, fork, add timers or stop from
/// inside. A listener that panics is caught: the panic is reported (to `tracing` and to the
/// other listeners' [`on_router_error`](Self::on_router_error)) and the other listeners and
/// the loop go on.
pub trait Listener {
    /// Any event; the default calls the method of its kind below.
    fn on_event(&mut self, bus: &mut Bus, event: &Event) {
        match event {
            Event::Message(m) => self.on_message(bus, m),
            Event::Sent(id) => self.on_sent(bus, *id),
            Event::Submitted { ticket, id } => self.on_submitted(bus, *ticket, *id),
            Event::Delivered(id) => self.on_delivered(bus, *id),
            Event::Lost(report) => self.on_lost(bus, report),
            Event::PeerUp(peer) => self.on_peer_up(bus, *peer),
            Event::PeerShutdown(s) => self.on_peer_shutdown(bus, s),
            Event::NodeDown(node) => self.on_node_down(bus, *node),
            Event::SendReady => self.on_send_ready(bus),
            Event::Error(e) => self.on_router_error(bus, e),
            Event::ChildExit { pid, status } => self.on_child_exit(bus, *pid, *status),
            Event::Shutdown => self.on_shutdown(bus),
            Event::Signal(s) => self.on_signal(bus, *s),
            Event::Timer(id) => self.on_timer(bus, *id),
            Event::Service(e) => self.on_service(bus, e),
        }
    }

    /// An envelope for this node arrived (or this node sent one to itself).
    fn on_message(&mut self, bus: &mut Bus, message: &Message) {
        let _ = (bus, message);
    }

    /// An envelope this node sent was written to the kernel on every link it went out on
    /// (a hand-off, not a delivery).
    fn on_sent(&mut self, bus: &mut Bus, id: MessageId) {
        let _ = (bus, id);
    }

    /// A handle's send with a receipt or a trace was submitted with this id.
    fn on_submitted(&mut self, bus: &mut Bus, ticket: Ticket, id: MessageId) {
        let _ = (bus, ticket, id);
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

    /// A timer set with [`Bus::timer`] is due.
    fn on_timer(&mut self, bus: &mut Bus, timer: TimerId) {
        let _ = (bus, timer);
    }

    /// A service's event: supervision, a stop request to this worker, a task outcome.
    fn on_service(&mut self, bus: &mut Bus, event: &ServiceEvent) {
        let _ = (bus, event);
    }
}

/// A part of the runtime that plugs into the bus ahead of the listeners. Each is a
/// zero-sized value that every bus is born with (`crate::builtin_services`, the one place
/// that names them); its state lives in the bus's [`Services`], keyed by type and made on
/// first use ([`Bus::service_state`]). Every method does nothing by default.
pub(crate) trait Service: Any {
    /// Hears an event before any listener does.
    fn on_event(&self, bus: &mut Bus, event: &Event) {
        let _ = (bus, event);
    }

    /// Hears an event after every listener did.
    fn after_event(&self, bus: &mut Bus, event: &Event) {
        let _ = (bus, event);
    }

    /// A service's control frame from a neighbour, decoded by the node; `true` when this
    /// service took it (else the next service is asked, and a frame nobody takes is a bad
    /// control frame).
    fn on_control(&self, bus: &mut Bus, from: LinkInfo, control: &Control) -> bool {
        let _ = (bus, from, control);
        false
    }

    /// `SIGCHLD` arrived: reap the processes this service started without a link.
    fn on_sigchld(&self, bus: &mut Bus) {
        let _ = bus;
    }

    /// The drain deadline passed for `pid`: `true` when this service owns it (and has
    /// killed it).
    fn kill(&self, bus: &mut Bus, pid: Pid) -> bool {
        let _ = (bus, pid);
        false
    }

    /// The bus is dropped in its own process: let go of everything, synchronously.
    fn on_drop(&self, bus: &mut Bus) {
        let _ = bus;
    }
}

/// The services registered with a bus and their states, by type.
#[derive(Default)]
pub(crate) struct Services {
    hooks: Vec<&'static dyn Service>,
    states: Vec<(TypeId, Box<dyn Any>)>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("hooks", &self.hooks.len())
            .field("states", &self.states.len())
            .finish()
    }
}

impl Services {
    /// A registry with these services.
    pub(crate) fn with(services: impl IntoIterator<Item = &'static dyn Service>) -> Self {
        let mut s = Self::default();
        for service in services {
            s.register(service);
        }
        s
    }

    /// Registers a service (once: a second registration of the same type does nothing).
    pub(crate) fn register(&mut self, service: &'static dyn Service) {
        let id = Any::type_id(service);
        if !self.hooks.iter().any(|h| Any::type_id(*h) == id) {
            self.hooks.push(service);
        }
    }

    /// The `i`th service registered.
    pub(crate) fn hook(&self, i: usize) -> Option<&'static dyn Service> {
        self.hooks.get(i).copied()
    }

    /// A service's state, made with `Default` on first use.
    pub(crate) fn state<T: Default + 'static>(&mut self) -> &mut T {
        let id = TypeId::of::<T>();
        let at = match self.states.iter().position(|(t, _)| *t == id) {
            Some(at) => at,
            None => {
                self.states.push((id, Box::new(T::default())));
                self.states.len() - 1
            }
        };
        match self.states[at].1.downcast_mut::<T>() {
            Some(state) => state,
            // The entry at `at` was stored under `T`'s type id.
            None => unreachable!("a service state of another type under this type id"),
        }
    }

    /// A service's state, if it was ever used.
    pub(crate) fn state_ref<T: 'static>(&self) -> Option<&T> {
        let id = TypeId::of::<T>();
        self.states
            .iter()
            .find(|(t, _)| *t == id)
            .and_then(|(_, s)| s.downcast_ref::<T>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct A;
    impl Service for A {}
    struct B;
    impl Service for B {}

    #[test]
    fn services_register_once_and_keep_state_by_type() {
        let mut s = Services::default();
        s.register(&A);
        s.register(&B);
        s.register(&A);
        assert!(s.hook(1).is_some() && s.hook(2).is_none());
        assert!(s.state_ref::<u32>().is_none());
        *s.state::<u32>() += 5;
        *s.state::<u32>() += 1;
        s.state::<String>().push_str("xy");
        assert_eq!(s.state_ref::<u32>(), Some(&6));
        assert_eq!(s.state_ref::<String>().map(String::as_str), Some("xy"));
    }
}
