//! Tickets: what a handle's send returns, to match with what the loop says of it.

use std::fmt;

/// A send made through a [`BusHandle`](crate::BusHandle), to match with what the loop says of it: the
/// envelope's id ([`Event::Submitted`](crate::Event::Submitted), for a send with a receipt
/// or a trace) or its refusal ([`BusError::HandleSend`](crate::BusError::HandleSend)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ticket {}", self.0)
    }
}

impl Ticket {
    pub(crate) fn new(n: u64) -> Self {
        Self(n)
    }
}
