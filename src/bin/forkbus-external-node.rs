//! `examples/external_node.rs` as a binary target of the facade crate, so that integration
//! tests find it built (`env!("CARGO_BIN_EXE_forkbus-external-node")`; cargo builds bins,
//! not examples, for `cargo test --test exec`). One source, two targets.
//!
//! With `--forge` as its first argument it is instead a node that breaks the rules of
//! link-level control frames, for `tests/exec.rs`: once joined, it sends its parent every
//! control frame a child may not send (`Bus::send_forged_control`), then the message
//! `"forged"`. It records the bad control frames it is sent and answers `"report"` with
//! `"bad:N"` (N distinct codes); `"exit"` shuts it down gracefully.
//!
//! With `--hostile <kind> [key=value ...]` it runs no bus at all: it takes the inherited
//! link by hand and writes raw frames that break the router's rules (forged origins and
//! notices, announcements past the bounds, a flood from fresh origins, a frame never
//! completed, a peer that never reads), for `tests/hostile_peers.rs`; see
//! `external-node/hostile.rs` for the kinds. It stays alive until it is killed.

#[path = "../../examples/external_node.rs"]
mod external_node;
#[path = "external-node/hostile.rs"]
mod hostile;

use std::collections::BTreeSet;

use forkbus::{Bus, BusConfig, Listener, Message, Relation};

use forkbus::error::BusError;

/// What a child may not send its parent.
const FORGED: [&str; 9] = [
    "gave-up", "pong", "ready", "recycle", "result", "ping", "stop", "job", "shutdown",
];

struct Forger {
    bad: BTreeSet<u32>,
}

impl Listener for Forger {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.decode::<String>().as_deref() {
            Ok("exit") => bus.shutdown_tree(),
            Ok("report") => {
                let reply = format!("bad:{}", self.bad.len());
                if let Err(e) = bus.send(msg.origin(), &reply) {
                    eprintln!("forge node: cannot report: {e}");
                }
            }
            _ => {}
        }
    }

    fn on_router_error(&mut self, _bus: &mut Bus, error: &BusError) {
        if let BusError::BadControl { code, .. } = error {
            self.bad.insert(*code);
        }
    }
}

fn forge() -> i32 {
    let mut bus = match Bus::join_from_env(BusConfig::default()) {
        Ok(bus) => bus,
        Err(e) => {
            eprintln!("forge node: cannot join a forkbus tree: {e}");
            return 2;
        }
    };
    let Some(parent) = bus.parent() else {
        return 2;
    };
    for kind in FORGED {
        if !bus.send_forged_control(Relation::Parent, kind) {
            eprintln!("forge node: cannot send {kind}");
            return 3;
        }
    }
    if let Err(e) = bus.send(parent, &"forged".to_owned()) {
        eprintln!("forge node: cannot send: {e}");
        return 3;
    }
    bus.add_listener(
        0,
        Forger {
            bad: BTreeSet::new(),
        },
    );
    let code = match bus.run() {
        Ok(forkbus::Stop::Shutdown(_)) => 0,
        Ok(other) => {
            eprintln!("forge node: the loop ended: {other:?}");
            1
        }
        Err(e) => {
            eprintln!("forge node: the loop failed: {e}");
            3
        }
    };
    drop(bus);
    code
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--forge") => std::process::exit(forge()),
        Some("--hostile") => {
            let kind = args.get(2).map_or("", String::as_str);
            let Err(e) = hostile::main(kind, args.get(3..).unwrap_or_default());
            eprintln!("{e}");
            std::process::exit(2);
        }
        _ => {}
    }
    external_node::main();
}
