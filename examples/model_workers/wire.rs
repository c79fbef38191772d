//! What travels on the bus: one enum, [`Wire`], encoded as CBOR through serde, and the
//! small views it carries (a hop of a trace, an envelope of a lost list). Every process of
//! the tree sends and decodes these and nothing else; each announces itself with
//! [`say_ready`].

use forkbus::{Address, Bus};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Role {
    Supervisor,
    Worker,
}

/// One hop of a routing trace, as a worker echoes it back.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct HopView {
    pub(crate) pid: u32,
    pub(crate) link: Option<u32>,
    pub(crate) at_ns: u64,
}

/// One envelope of a supervisor's lost list.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LostView {
    pub(crate) origin: u32,
    /// What it was, read from its payload.
    pub(crate) what: String,
    pub(crate) req: Option<u64>,
    pub(crate) reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Wire {
    /// A process is up (a worker: with the model version it built).
    Ready {
        name: String,
        role: Role,
        parent: u32,
        version: u32,
    },
    /// Root → worker.
    Infer { req: u64, input: Vec<f32> },
    /// Worker → root.
    Reply {
        req: u64,
        worker: String,
        pid: u32,
        version: u32,
        class: u32,
        score: f32,
        /// The request's own trace, when it had one.
        trace: Vec<HopView>,
    },
    /// Root → everyone.
    LoadModel { version: u32 },
    /// Worker → root: switched (once).
    Loaded { worker: String, version: u32 },
    /// Supervisor → root: a child's link went down, with its lost list.
    PeerLost {
        supervisor: String,
        peer: u32,
        cause: String,
        lost: Vec<LostView>,
    },
    /// Supervisor → root: a child's process exited, and what follows.
    ChildExit {
        supervisor: String,
        pid: u32,
        status: String,
        next: String,
    },
    /// Supervisor → root: a child is back under its name, in a new process.
    Restarted {
        supervisor: String,
        name: String,
        old: u32,
        new: u32,
        generation: u32,
        /// From the old process reaped to the new one ready.
        down_us: u64,
    },
}

/// A routing trace as it travels back to the root.
pub(crate) fn hops(trace: &[forkbus::router::Hop]) -> Vec<HopView> {
    trace
        .iter()
        .map(|h| HopView {
            pid: h.node.pid,
            link: h.link,
            at_ns: h.at.as_nanos(),
        })
        .collect()
}

/// Tells the root this process is up (a worker: on which model version).
pub(crate) fn say_ready(bus: &mut Bus, root: u32, name: &str, role: Role, version: u32) {
    let parent = bus.parent().map_or(0, |p| p.pid);
    let ready = Wire::Ready {
        name: name.to_owned(),
        role,
        parent,
        version,
    };
    if let Err(e) = bus.send(Address::Pid(root), &ready) {
        eprintln!("{name}: cannot say ready: {e}");
    }
}
