//! The one event stream of the bus: everything that happens to a process, as data.
//!
//! [`Bus::run_with`](crate::Bus::run_with) hands every [`Event`] to one closure, so the
//! state that message handling and timers share lives in one place; [`Listener`]s
//! (crate::Listener) are sugar over the same stream. A service (supervision, the task
//! pool) brings its events nested in [`ServiceEvent`] instead of widening the listener
//! interface.

use forkbus_node::{ExitStatus, PeerShutdown, Pid};
use forkbus_router::{LossReport, MessageId, NodeId};

use crate::error::BusError;
use crate::message::Message;
use crate::pool::types::TaskOutcome;
use crate::supervisor::types::{StopRequest, SupervisionEvent};
use crate::ticket::Ticket;
use crate::timer::TimerId;

/// Something that happened on the bus.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// An envelope for this node arrived (or this node sent one to itself).
    Message(Message),
    /// An envelope this node sent was written to the kernel on every link it went out on
    /// (a hand-off, not a delivery).
    Sent(MessageId),
    /// A send made through a [`BusHandle`](crate::BusHandle) with a receipt or a trace was
    /// submitted: the envelope has this id (its receipt and trace say it).
    Submitted {
        /// What the handle's send returned.
        ticket: Ticket,
        /// The envelope's id.
        id: MessageId,
    },
    /// A receipt: the destination took the envelope.
    Delivered(MessageId),
    /// An envelope this node sent was lost, here or anywhere on its path, or its fate is
    /// unknown ([`LossReport::fate`]).
    Lost(LossReport),
    /// A neighbour said hello.
    PeerUp(NodeId),
    /// A neighbour went away, with every envelope queued for it or written and not
    /// acknowledged. Exactly once per link.
    PeerShutdown(PeerShutdown),
    /// A node left the tree (its route was withdrawn).
    NodeDown(NodeId),
    /// A link that refused a send ([`SendError::QueueFull`](crate::SendError::QueueFull))
    /// has room again.
    SendReady,
    /// Something went wrong that the loop survived.
    Error(BusError),
    /// A child of this process exited and was reaped. Exactly once per child, after its
    /// link's peer shutdown.
    ChildExit {
        /// The child.
        pid: Pid,
        /// How it ended.
        status: ExitStatus,
    },
    /// The tree is shutting down: this node drains (sends are refused from now on) and
    /// exits once its children are gone and its queues acknowledged.
    Shutdown,
    /// A signal the loop does not handle itself arrived (today `SIGHUP`).
    Signal(i32),
    /// A timer set with [`Bus::timer`](crate::Bus::timer) is due.
    Timer(TimerId),
    /// A service's event.
    Service(ServiceEvent),
}

/// The events of the runtime's services.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServiceEvent {
    /// A supervisor of this process (or one in a child process that gave up on a child)
    /// reports on its children: starts, exits with their status (one per process, whatever
    /// path reaped it), kills and why, recycling, reloads, giving up.
    Supervision(SupervisionEvent),
    /// This process is a supervised worker and its supervisor asks it to stop (recycling,
    /// reload, a stop request): finish what is in hand. Unless a listener calls
    /// [`hold_stop`](crate::supervisor::hold_stop), the worker keeps serving until quiet,
    /// then drains and exits 0; past the deadline it is killed.
    Stopping(StopRequest),
    /// A job of a task pool this process owns ended (exactly once per job).
    Task(TaskOutcome),
}

impl Event {
    /// The listener method this event is for (in reports of a panicking listener).
    pub(crate) fn method(&self) -> &'static str {
        match self {
            Self::Message(_) => "on_message",
            Self::Sent(_) => "on_sent",
            Self::Submitted { .. } => "on_submitted",
            Self::Delivered(_) => "on_delivered",
            Self::Lost(_) => "on_lost",
            Self::PeerUp(_) => "on_peer_up",
            Self::PeerShutdown(_) => "on_peer_shutdown",
            Self::NodeDown(_) => "on_node_down",
            Self::SendReady => "on_send_ready",
            Self::Error(_) => "on_router_error",
            Self::ChildExit { .. } => "on_child_exit",
            Self::Shutdown => "on_shutdown",
            Self::Signal(_) => "on_signal",
            Self::Timer(_) => "on_timer",
            Self::Service(_) => "on_service",
        }
    }
}
