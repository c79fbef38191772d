//! A `Send + Clone` handle for other threads: send and stop through a channel plus the
//! poller's notify.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Sender, TrySendError};
use forkbus_router::{Address, SendOptions};
use serde::Serialize;

use crate::error::SendError;
use crate::reactor::Shared;
use crate::ticket::Ticket;

/// A send waiting for the loop.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) ticket: Ticket,
    pub(crate) to: Address,
    pub(crate) payload: Vec<u8>,
    pub(crate) options: SendOptions,
}

/// A request to the loop other than a send.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Request {
    Stop,
    Shutdown,
}

/// Lets other threads of this process send on the bus and stop it.
///
/// Sends go through a bounded channel: when the loop cannot keep up (or a link queue is
/// full, in which case the loop holds the send back until the link has room),
/// [`send`](Self::send) blocks and [`try_send`](Self::try_send) refuses. The loop is woken
/// with the poller's notify. A handle copied into a forked child refuses everything
/// ([`SendError::OtherProcess`]).
#[derive(Clone, Debug)]
pub struct BusHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) requests: Sender<Request>,
    pub(crate) sends: Sender<Outgoing>,
    /// The frame limit: a value that would encode past it is refused while encoding.
    pub(crate) max_frame: usize,
    /// The next ticket, shared by every clone of the bus's handles.
    pub(crate) tickets: Arc<AtomicU64>,
}

impl BusHandle {
    /// Sends a value (CBOR) to `to`; blocks while the channel to the loop is full.
    pub fn send<T: Serialize + ?Sized>(
        &self,
        to: impl Into<Address>,
        value: &T,
    ) -> Result<Ticket, SendError> {
        self.send_with(to, value, SendOptions::default())
    }

    /// Sends a value with options; blocks while the channel to the loop is full. The
    /// ticket is matched on the loop's side: with a receipt or a trace,
    /// [`Event::Submitted`](crate::Event::Submitted) gives the envelope's id (which the
    /// receipt and the trace carry); a refusal is a
    /// [`BusError::HandleSend`](crate::BusError::HandleSend) with the ticket.
    pub fn send_with<T: Serialize + ?Sized>(
        &self,
        to: impl Into<Address>,
        value: &T,
        options: SendOptions,
    ) -> Result<Ticket, SendError> {
        let out = self.outgoing(to.into(), value, options)?;
        let ticket = out.ticket;
        self.sends.send(out).map_err(|_| SendError::Disconnected)?;
        self.shared.notify().map(|()| ticket)
    }

    /// Sends a value if the channel to the loop has room, without blocking.
    pub fn try_send<T: Serialize + ?Sized>(
        &self,
        to: impl Into<Address>,
        value: &T,
    ) -> Result<Ticket, SendError> {
        let out = self.outgoing(to.into(), value, SendOptions::default())?;
        let ticket = out.ticket;
        match self.sends.try_send(out) {
            Ok(()) => self.shared.notify().map(|()| ticket),
            Err(TrySendError::Full(_)) => Err(SendError::HandleFull),
            Err(TrySendError::Disconnected(_)) => Err(SendError::Disconnected),
        }
    }

    /// Ends the loop ([`Bus::run`](crate::Bus::run) returns
    /// [`Stop::Stopped`](crate::Stop::Stopped)).
    pub fn stop(&self) -> Result<(), SendError> {
        self.request(Request::Stop)
    }

    /// Starts a graceful shutdown of this node's subtree (the whole tree at the root).
    pub fn shutdown_tree(&self) -> Result<(), SendError> {
        self.request(Request::Shutdown)
    }

    fn request(&self, r: Request) -> Result<(), SendError> {
        if std::process::id() != self.shared.owner {
            return Err(SendError::OtherProcess);
        }
        self.requests.send(r).map_err(|_| SendError::Disconnected)?;
        self.shared.notify()
    }

    fn outgoing<T: Serialize + ?Sized>(
        &self,
        to: Address,
        value: &T,
        options: SendOptions,
    ) -> Result<Outgoing, SendError> {
        if std::process::id() != self.shared.owner {
            return Err(SendError::OtherProcess);
        }
        let payload = crate::message::encode_local(value, self.max_frame)?;
        Ok(Outgoing {
            ticket: Ticket::new(self.tickets.fetch_add(1, Ordering::Relaxed)),
            to,
            payload,
            options,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_clone<T: Send + Clone>() {}

    #[test]
    fn a_handle_goes_to_other_threads() {
        send_clone::<BusHandle>();
    }
}
