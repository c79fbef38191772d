//! Model workers as addressable actors: the forkbus main job.
//!
//! ```text
//! cargo run --release --example model_workers
//! cargo run --release --example model_workers -- --shards 3 --workers 4 --requests 5000
//! ```
//!
//! A root forks a tree: shard supervisors, each supervising its workers with a
//! [`Supervisor`](forkbus::supervisor::Supervisor) (restart always, a short backoff, each worker under its own name). Every
//! worker builds a small model in memory at start (a seeded 16→64→64→8 MLP, tanh and ReLU
//! layers, no file, no download) and answers inference requests with real arithmetic. The
//! root:
//!
//! 1. sends requests to the workers by pid and by name (`shard0/w1`), a bounded window in
//!    flight, each with a delivery receipt, and checks every reply against its own copy of
//!    the model;
//! 2. half-way through broadcasts "load model version 2": every worker switches once, and
//!    every reply to a request sent after the broadcast carries version 2 (checked);
//! 3. kills one worker with `SIGKILL` and prints the loss report: the receipts give exactly
//!    one outcome per request, and the worker's supervisor reports its lost list. The
//!    supervisor restarts the worker under the same name with a new pid, on the model
//!    version its shard last heard of; the root sends to the name again, and once to the
//!    old pid (lost: no route);
//! 4. prints the routing trace of sampled requests, there and back;
//! 5. prints a summary (sent = replied + lost, the restart, the name now resolving to the
//!    new pid, every reply's version: checked, the exit code is 1 if not), then shuts the
//!    tree down gracefully.
//!
//! The files, one concern each:
//!
//! - `main.rs` (this one): the run in its order: the tree, the requests, the report, the
//!   shutdown. The root's state is a plain `Root` owned here; one [`Bus::run_with`]
//!   closure hands it every event of each phase.
//! - `args.rs`: the flags.
//! - `wire.rs`: what travels on the bus (the `Wire` enum and its small views).
//! - `shard.rs`: a shard supervisor: supervises its workers, reports their exits, lost
//!   lists and restarts to the root.
//! - `worker.rs`: a worker: serves the model, switches version on the broadcast.
//! - `root.rs`: the root's state machine: the requests window, the checks, the broadcast,
//!   the kill, one outcome per request, and its timers (each a [`Bus::timer`] whose id it
//!   remembers).
//! - `model.rs`: the toy MLP the workers serve and the root checks against.
//! - `report.rs`: prints what the root saw, reading its state only.

mod args;
mod model;
mod report;
mod root;
mod shard;
mod wire;
mod worker;

use std::time::{Duration, Instant};

use forkbus::router::RouterConfig;
use forkbus::{Bus, BusConfig, ForkOptions, Stop};

use args::{Args, HELP};
use root::Root;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match args::parse() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{HELP}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("model_workers: {e} (try --help)");
            std::process::exit(2);
        }
    };
    // Every receipt resolves within 5 s, whatever happens to the tree.
    let router = RouterConfig::default().receipt_timeout(Some(Duration::from_secs(5)));
    let mut bus = Bus::root(BusConfig::default().name("root").router(router))?;
    let mut root = Root::new(args.clone());
    // Whatever happens, the run ends: the loop is stopped after this.
    root.set_watchdog(&mut bus, Duration::from_secs(60));

    // 1. Fork the tree; the root's loop runs until every process said ready.
    report::section("1. the tree");
    let t0 = Instant::now();
    spawn_tree(&mut bus, &args)?;
    let stop = bus.run_with(|bus, event| root.handle(bus, event))?;
    let tree_up = t0.elapsed();
    if stop != Stop::Stopped || root.timed_out || root.members.len() != root.expected() {
        eprintln!(
            "the tree did not come up ({} processes ready)",
            root.members.len()
        );
        bus.shutdown_tree();
        bus.run_with(|bus, event| root.handle(bus, event))?;
        std::process::exit(1);
    }
    root.tree_is_up(&bus);
    report::print_tree_up(&root, tree_up);

    // 2. Send the requests; the loop runs until every one has its outcome and the
    // supervisor's reports of the kill are in.
    report::section("2. requests");
    root.start_requests(&mut bus);
    bus.run_with(|bus, event| root.handle(bus, event))?;
    report::print_requests(&root);
    // Sections 3 to 5: the kill, the traces, the summary and its checks.
    let ok = report::print_report(&root, &bus, tree_up) && !root.timed_out;

    // The graceful end: the tree drains and exits; the root still hears every event.
    root.cancel_deadlines(&mut bus);
    bus.shutdown_tree();
    let stop = bus.run_with(|bus, event| root.handle(bus, event))?;
    report::print_shutdown(&stop, root.kill.is_some(), &bus);
    drop(bus);
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

/// Forks the shard supervisors; each supervises its workers (`shard.rs`, `worker.rs`) and
/// every process tells the root it is ready.
fn spawn_tree(bus: &mut Bus, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let root = bus.pid().as_raw();
    for s in 0..args.shards {
        let (workers, seed) = (args.workers, args.seed);
        let backoff = Duration::from_millis(args.backoff_ms);
        let name = format!("shard{s}");
        bus.fork(ForkOptions::named(name.clone()), move |bus| {
            shard::start(bus, &name, root, workers, seed, backoff);
        })?;
    }
    Ok(())
}
