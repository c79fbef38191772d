//! A program that joins a forkbus tree as a node, through the public API only.
//!
//! A bus process starts it with `Bus::exec_node`; it joins with `Bus::join_from_env`
//! (its parent link is the inherited descriptor named in `FORKBUS_FD`), registers the name
//! given as its first argument, and answers string messages:
//!
//! - a unicast `text` (to its pid or its name): `"echo:" + text` back to the origin;
//! - a broadcast `text`: `"ack:" + text` back to the origin;
//! - `"exit"`: a graceful shutdown of this node (its acknowledgements and tally go to its
//!   parent), then exit 0.
//!
//! It exits 0 after a shutdown (its own or the tree's), 1 when its parent link closes
//! (`EXIT_PARENT_GONE`), 2 when it was not started as a node.
//!
//! ```text
//! let pid = bus.exec_node(
//!     &Command::new("target/debug/examples/external_node")
//!         .arg("ext")
//!         .stdout(Output::Inherit)
//!         .stderr(Output::Inherit),
//! )?;
//! bus.send(to::name("ext"), &"hello")?; // "echo:hello" comes back
//! ```
//!
//! The tests run it as the binary `forkbus-external-node` (`src/bin/`, which includes this
//! file), so that `env!("CARGO_BIN_EXE_forkbus-external-node")` finds it built.

use forkbus::bus::EXIT_PARENT_GONE;
use forkbus::{Bus, BusConfig, Destination, Listener, Message, Stop};

struct Answer;

impl Listener for Answer {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let Ok(text) = msg.decode::<String>() else {
            return;
        };
        if text == "exit" {
            bus.shutdown_tree();
            return;
        }
        let reply = match msg.destination() {
            Destination::Broadcast => format!("ack:{text}"),
            _ => format!("echo:{text}"),
        };
        if let Err(e) = bus.send(msg.origin(), &reply) {
            eprintln!("external_node: cannot answer {}: {e}", msg.origin());
        }
    }
}

pub(crate) fn main() {
    let config = match std::env::args().nth(1) {
        Some(name) => BusConfig::default().name(name),
        None => BusConfig::default(),
    };
    let mut bus = match Bus::join_from_env(config) {
        Ok(bus) => bus,
        Err(e) => {
            eprintln!("external_node: cannot join a forkbus tree: {e}");
            std::process::exit(2);
        }
    };
    bus.add_listener(0, Answer);
    let code = match bus.run() {
        Ok(Stop::ParentGone) => EXIT_PARENT_GONE,
        Ok(_) => 0,
        Err(e) => {
            eprintln!("external_node: the loop failed: {e}");
            3
        }
    };
    drop(bus);
    std::process::exit(code);
}
