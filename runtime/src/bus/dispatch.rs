//! What the node says, turned into calls: its actions (a kill at the drain deadline), its
//! events and the router's (messages, outcomes, peers up and down, child exits, control
//! frames, the drain) and the loop's internal reports, each made an [`Event`] and emitted to
//! the services, the listeners and [`run_with`](Bus::run_with)'s handler.

use std::panic::{catch_unwind, AssertUnwindSafe};

use forkbus_node::{Action, Control, LinkInfo, NodeEvent, PeerShutdown};
use forkbus_router::{DownCause, Event as RouterEvent};
use nix::sys::signal::{kill, Signal};

use super::{Bus, Deferred, Internal, Source, Stop};
use crate::child::{Pid, PidExt};
use crate::error::BusError;
use crate::event::Event;
use crate::listener::Listener;
use crate::listener_set::{panic_message, ListenerId};
use crate::message::Message;

impl Bus {
    /// Asks each service whether it owns `pid` (and killed it).
    fn service_kill(&mut self, pid: Pid) -> bool {
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            if service.kill(self, pid) {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Offers a control frame to each service; `false` when none took it.
    fn service_control(&mut self, from: LinkInfo, control: &Control) -> bool {
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            if service.on_control(self, from, control) {
                return true;
            }
            i += 1;
        }
        false
    }

    pub(super) fn on_action(&mut self, action: Action) {
        match action {
            Action::Kill(pid) => {
                if !self.service_kill(pid) {
                    tracing::warn!(parent: &self.span, %pid, "drain deadline passed: SIGKILL");
                    let _ = kill(pid.nix(), Signal::SIGKILL);
                }
            }
            other => tracing::debug!(action = ?other, "unhandled node action"),
        }
    }

    pub(super) fn on_node_event(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Router(event) => self.on_router_event(event),
            NodeEvent::PeerShutdown(shutdown) => self.on_peer_shutdown(shutdown),
            NodeEvent::ChildExit { pid, status } => {
                self.emit(Event::ChildExit { pid, status });
            }
            NodeEvent::Control {
                link,
                from,
                control,
            } => {
                if !self.service_control(from, &control) {
                    let (code, _) = control.encode();
                    tracing::warn!(%link, code, relation = ?from.relation, "control frame refused");
                    let peer = self.peer_of(link);
                    self.emit(Event::Error(BusError::BadControl { peer, code }));
                }
            }
            NodeEvent::BadControl { peer, code, .. } => {
                self.emit(Event::Error(BusError::BadControl { peer, code }));
            }
            NodeEvent::Draining => {
                tracing::info!(parent: &self.span, "draining");
                // Frames queued after this iteration's writes: write them before sleeping.
                self.busy = true;
                self.emit(Event::Shutdown);
            }
            NodeEvent::Drained(tally) => {
                tracing::info!(parent: &self.span, ?tally, "drained");
                // The tally is this process's last word to its parent: hand it to the
                // kernel before the loop ends.
                if let Some(link) = self.node.parent_link() {
                    self.flush_final(link);
                }
                self.stop = Some(Stop::Shutdown(tally));
            }
            NodeEvent::ParentGone => {
                if self.stop.is_none() {
                    self.stop = Some(Stop::ParentGone);
                }
            }
            other => tracing::debug!(event = ?other, "unhandled node event"),
        }
    }

    fn on_router_event(&mut self, event: RouterEvent) {
        match event {
            RouterEvent::Message { envelope, link } => {
                self.emit(Event::Message(Message::new(envelope, link)));
            }
            RouterEvent::Held { name, id } => {
                tracing::debug!(%name, %id, "held in custody");
            }
            RouterEvent::Sent(id) => self.emit(Event::Sent(id)),
            RouterEvent::Delivered(id) => self.emit(Event::Delivered(id)),
            RouterEvent::Lost(report) => self.emit(Event::Lost(report)),
            RouterEvent::LinkUp { link, peer } => {
                if let Some(Source::Link(src)) = self
                    .links
                    .get(&link)
                    .and_then(|k| self.reactor.sources.get_mut(*k))
                {
                    src.peer = Some(peer);
                }
                tracing::debug!(%link, %peer, "peer up");
                self.emit(Event::PeerUp(peer));
            }
            RouterEvent::LinkReady(_) => {
                self.pump_handle_sends();
                self.emit(Event::SendReady);
            }
            RouterEvent::NodeDown(node) => self.emit(Event::NodeDown(node)),
            other => tracing::debug!(event = ?other, "unhandled router event"),
        }
    }

    /// A link went down: its descriptor closes, its errors and its peer shutdown go to
    /// the listeners.
    fn on_peer_shutdown(&mut self, shutdown: PeerShutdown) {
        let link = shutdown.link;
        let source = self
            .links
            .remove(&link)
            .and_then(|key| self.reactor.remove(key));
        // Deregistered above; the descriptor closes here.
        drop(source);
        tracing::debug!(%link, peer = ?shutdown.peer, cause = ?shutdown.cause, lost = shutdown.lost.len(), "link down");
        let mut errors = Vec::new();
        while let Some(at) = self.link_errors.iter().position(|(l, _)| *l == link) {
            errors.push(self.link_errors.swap_remove(at).1);
        }
        match &shutdown.cause {
            DownCause::Protocol(error) => errors.push(BusError::Protocol {
                peer: shutdown.peer,
                link,
                error: error.clone(),
            }),
            DownCause::Overrun => errors.push(BusError::Overrun {
                peer: shutdown.peer,
            }),
            _ => {}
        }
        for error in errors {
            self.emit(Event::Error(error));
        }
        self.emit(Event::PeerShutdown(shutdown));
    }

    pub(super) fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::Error(error) => {
                tracing::warn!(%error, "bus error");
                self.emit(Event::Error(error));
            }
            Internal::Signal(signal) => self.emit(Event::Signal(signal)),
            Internal::Submitted(ticket, id) => self.emit(Event::Submitted { ticket, id }),
            Internal::Deferred(Deferred(work)) => work(self),
        }
    }

    /// Hands an event to the services, then to every listener, then to the services
    /// again (`Service::after_event`), then queues it for [`run_with`](Self::run_with)'s
    /// handler (only from the loop's top level: a deferred closure, a timer, a runtime
    /// event; never from inside a listener).
    pub(crate) fn emit(&mut self, event: Event) {
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            service.on_event(self, &event);
            i += 1;
        }
        self.dispatch(&event, None);
        let mut i = 0;
        while let Some(service) = self.services.hook(i) {
            service.after_event(self, &event);
            i += 1;
        }
        if self.handler_active {
            self.for_handler.push_back(event);
        }
    }

    /// Calls every listener in order (but `except`), each under `catch_unwind`. Listeners
    /// added meanwhile run from the next event on; those removed meanwhile are skipped. A
    /// listener's panic is reported to the others as an error event.
    fn dispatch(&mut self, event: &Event, except: Option<ListenerId>) {
        if self.listeners.len() == 0 {
            return;
        }
        let mut taken = self.listeners.take();
        let mut panics = Vec::new();
        for entry in &mut taken {
            if Some(entry.id) == except || self.listeners.is_removed(entry.id) {
                continue;
            }
            let listener: &mut dyn Listener = &mut *entry.item;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| listener.on_event(self, event))) {
                panics.push((entry.id, panic_message(&*panic)));
            }
        }
        self.listeners.restore(taken);
        let method = event.method();
        for (listener, message) in panics {
            tracing::error!(%listener, method, %message, "listener panicked");
            if !matches!(event, Event::Error(_)) {
                let error = Event::Error(BusError::ListenerPanicked {
                    listener,
                    method,
                    message,
                });
                self.dispatch(&error, Some(listener));
            }
        }
    }
}
