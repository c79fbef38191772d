//! Holding a down child's name ([`WhileDown::Queue`](super::WhileDown::Queue)) with the
//! router's custody.
//!
//! When a queue-mode child's process exits and a restart follows, the supervisor's router
//! holds the child's name ([`Router::hold_name`](forkbus_router::Router::hold_name)):
//! envelopes addressed to it are taken, at most `capacity`, their receipts left open. The
//! restart is forked with the name, and the router hands the held envelopes to it ahead of
//! anything routed to it later, origin, id and flags kept — the new process sees them as
//! sent, and their receipts end `Delivered` when it takes them. A child that will not start
//! again (given up, stopped, the bus draining) gives the name up: what was held is reported
//! lost to its origins, for sure ([`LossReason::Abandoned`](forkbus_router::LossReason)),
//! through the router's notice path. Nothing of this rides in application payloads.

use super::types::{ChildId, SupervisionEvent, WhileDown};
use super::Entry;
use crate::bus::Bus;

/// Reacts to a supervisor's events: holds the name of a child that is restarting (queue
/// mode), forgets the hold once the restart took the name, gives the name up when the
/// child finishes.
pub(super) fn after_events(bus: &mut Bus, entry: &mut Entry, events: &[SupervisionEvent]) {
    for e in events {
        match e {
            SupervisionEvent::Exited {
                child,
                next: super::AfterExit::Restart { .. },
                ..
            } => hold(bus, entry, child.child),
            SupervisionEvent::Started { child, .. } => {
                // The fork handed the name and what was held to the new process.
                entry.held.remove(&child.child);
            }
            _ => {}
        }
    }
    let done: Vec<ChildId> = entry
        .held
        .keys()
        .copied()
        .filter(|c| entry.core.is_done(*c))
        .collect();
    for child in done {
        if let Some(name) = entry.held.remove(&child) {
            tracing::debug!(%name, "giving up a held name: its envelopes are reported lost");
            bus.release_held_name(&name);
        }
    }
}

fn hold(bus: &mut Bus, entry: &mut Entry, child: ChildId) {
    let Some(spec) = entry.core.spec(child) else {
        return;
    };
    let (WhileDown::Queue { capacity }, Some(name)) = (spec.while_down, spec.name.clone()) else {
        return;
    };
    if capacity == 0 || entry.held.contains_key(&child) || bus.is_stopping() {
        return;
    }
    match bus.hold_name(&name, capacity) {
        Ok(()) => {
            tracing::debug!(%name, capacity, "holding the name of a restarting child");
            entry.held.insert(child, name);
        }
        Err(e) => tracing::warn!(%name, error = %e, "cannot hold a down child's name"),
    }
}
