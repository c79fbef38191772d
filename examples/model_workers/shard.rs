//! A shard supervisor: one process between the root and its workers. It forwards (the bus
//! does that), supervises its workers with a [`Supervisor`] (restart always, a short
//! backoff, each worker under its own name: the supervisor forks, reaps and restarts
//! them), and reports to the root what the root cannot see from where it is: a worker's
//! exit status, its link's lost list, and its restart.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use forkbus::supervisor::{AfterExit, Backoff, ChildId};
use forkbus::supervisor::{ChildSpec, Restart, SupervisionEvent, Supervisor};
use forkbus::{Address, Bus, ExitStatus, Listener, Message, PeerShutdown, Relation, ServiceEvent};

use crate::wire::{say_ready, LostView, Role, Wire};
use crate::worker;

/// The body of shard `name`'s process: supervises `workers` workers, says ready.
pub(crate) fn start(
    bus: &mut Bus,
    name: &str,
    root: u32,
    workers: usize,
    seed: u64,
    backoff: Duration,
) {
    let sup = Supervisor::new(bus);
    // The one value this process shares, so that a restarted worker builds the model
    // version its shard holds when it forks it: the listener writes it on the broadcast;
    // the start closure reads it. That closure is the supervisor's to keep (`'static`) and
    // runs in each new worker process, forked from this one, so it cannot borrow the
    // listener's state: they share a cell.
    let version = Rc::new(Cell::new(1));
    // Before the first spawn: supervision events are handed to listeners later, from the
    // loop, and this one hears them all.
    bus.add_listener(
        0,
        Shard {
            name: name.to_owned(),
            root,
            sup,
            version: version.clone(),
            generation: HashMap::new(),
            reaped: HashMap::new(),
        },
    );
    for w in 0..workers {
        let worker = format!("{name}/w{w}");
        let spec = ChildSpec::named(worker.clone())
            .restart(Restart::Always)
            .backoff(Backoff::new(backoff, backoff * 8));
        let version = version.clone();
        let spawned = sup.spawn(bus, spec, move |bus| {
            worker::start(bus, root, &worker, seed, version.get());
        });
        if let Err(e) = spawned {
            eprintln!("{name}: cannot supervise worker {w}: {e}");
        }
    }
    say_ready(bus, root, name, Role::Supervisor, 0);
}

struct Shard {
    name: String,
    root: u32,
    sup: Supervisor,
    /// The model version this shard last heard of (the broadcast passes through it).
    version: Rc<Cell<u32>>,
    /// Each child's generation (processes it has had); a reaped process, until the next
    /// one is ready.
    generation: HashMap<ChildId, u32>,
    reaped: HashMap<ChildId, (u32, Instant)>,
}

impl Shard {
    fn report(&self, bus: &mut Bus, report: &Wire, what: &str) {
        if let Err(e) = bus.send(Address::Pid(self.root), report) {
            eprintln!("{}: cannot report {what}: {e}", self.name);
        }
    }
}

impl Listener for Shard {
    fn on_message(&mut self, _bus: &mut Bus, msg: &Message) {
        if let Ok(Wire::LoadModel { version }) = msg.decode::<Wire>() {
            self.version.set(self.version.get().max(version));
        }
    }

    fn on_service(&mut self, bus: &mut Bus, event: &ServiceEvent) {
        let ServiceEvent::Supervision(event) = event else {
            return;
        };
        match event {
            SupervisionEvent::Started {
                child, generation, ..
            } => {
                self.generation.insert(child.child, *generation);
            }
            SupervisionEvent::Exited {
                child,
                pid,
                status,
                next,
            } if !bus.is_stopping() => {
                self.reaped
                    .insert(child.child, (pid.as_raw(), Instant::now()));
                let status = match status {
                    ExitStatus::Code(c) => format!("exited with code {c}"),
                    ExitStatus::Signal(9) => "killed by signal 9 (SIGKILL)".to_owned(),
                    ExitStatus::Signal(s) => format!("killed by signal {s}"),
                };
                let next = match next {
                    AfterExit::Restart { after } => {
                        format!("restart in {} ms (backoff)", after.as_millis())
                    }
                    other => format!("{other:?}"),
                };
                let report = Wire::ChildExit {
                    supervisor: self.name.clone(),
                    pid: pid.as_raw(),
                    status,
                    next,
                };
                self.report(bus, &report, "a child exit");
            }
            SupervisionEvent::Ready { child, pid } => {
                let Some((old, at)) = self.reaped.remove(&child.child) else {
                    return; // a first start
                };
                let report = Wire::Restarted {
                    supervisor: self.name.clone(),
                    name: self.sup.name(bus, child.child).unwrap_or_default(),
                    old,
                    new: pid.as_raw(),
                    generation: self.generation.get(&child.child).copied().unwrap_or(0),
                    down_us: u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX),
                };
                self.report(bus, &report, "a restart");
            }
            _ => {}
        }
    }

    fn on_peer_shutdown(&mut self, bus: &mut Bus, s: &PeerShutdown) {
        let Relation::Child(pid) = s.relation else {
            return;
        };
        if bus.is_stopping() {
            return; // the graceful end of the run: nothing to report
        }
        let lost = s
            .lost
            .iter()
            .map(|l| {
                // The lost list holds whole envelopes: what each was is readable.
                let decoded = forkbus::bus::decode::<Wire>(&l.envelope.payload);
                LostView {
                    origin: l.envelope.id.origin.pid,
                    what: match &decoded {
                        Ok(Wire::Infer { .. }) => "requests".into(),
                        Ok(Wire::LoadModel { version }) => format!("\"load model v{version}\""),
                        Ok(_) => "a message".into(),
                        Err(_) => format!("seq {}", l.envelope.id.seq),
                    },
                    req: match decoded {
                        Ok(Wire::Infer { req, .. }) => Some(req),
                        _ => None,
                    },
                    reason: l.fate.to_string(),
                }
            })
            .collect();
        let report = Wire::PeerLost {
            supervisor: self.name.clone(),
            peer: pid.as_raw(),
            cause: format!("{:?}", s.cause),
            lost,
        };
        self.report(bus, &report, "a lost list");
    }
}
