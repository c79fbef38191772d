//! A worker: one process serving the model. It builds its [`Mlp`] at start, answers every
//! [`Wire::Infer`] with real arithmetic (a traced request gets a traced reply), and
//! switches to a new version once when the root's broadcast says so. Its shard's
//! supervisor starts it and restarts it (`shard.rs`); it holds no state but its model.

use forkbus::{Bus, Listener, Message, SendOptions};

use crate::model::Mlp;
use crate::wire::{hops, say_ready, Role, Wire};

/// Runs in every process of a worker, the first and each restart: builds model `version`,
/// listens, says ready to the root.
pub(crate) fn start(bus: &mut Bus, root: u32, name: &str, seed: u64, version: u32) {
    let model = Mlp::new(seed, version);
    let v = model.version;
    bus.add_listener(
        0,
        Worker {
            name: name.to_owned(),
            seed,
            model,
        },
    );
    say_ready(bus, root, name, Role::Worker, v);
}

struct Worker {
    name: String,
    seed: u64,
    model: Mlp,
}

impl Listener for Worker {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        match msg.decode::<Wire>() {
            Ok(Wire::Infer { req, input }) => {
                let (class, score) = self.model.infer(&input);
                let reply = Wire::Reply {
                    req,
                    worker: self.name.clone(),
                    pid: bus.pid().as_raw(),
                    version: self.model.version,
                    class,
                    score,
                    trace: hops(msg.trace()),
                };
                // A traced request gets a traced reply: the root sees the way back too.
                let options = SendOptions {
                    trace: !msg.trace().is_empty(),
                    ..SendOptions::default()
                };
                if let Err(e) = bus.send_with(msg.origin(), &reply, options) {
                    eprintln!("{}: reply to request #{req} refused: {e}", self.name);
                }
            }
            // Switch once; a repeated or older version is ignored.
            Ok(Wire::LoadModel { version }) if version > self.model.version => {
                self.model = Mlp::new(self.seed, version);
                let loaded = Wire::Loaded {
                    worker: self.name.clone(),
                    version,
                };
                if let Err(e) = bus.send(msg.origin(), &loaded) {
                    eprintln!("{}: cannot report the switch: {e}", self.name);
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("{}: undecodable message: {e}", self.name),
        }
    }
}
