//! Real processes: a Python leaf worker (`python/examples/echo_worker.py`, on the
//! `forkbus` package in `python/src`) joined to a Rust tree with `Bus::exec_node`. It takes
//! a name, answers messages sent by pid and by name with receipts both ways, and drains
//! with the tree: the tally counts it and balances, and it exits 0. Then a Python worker
//! supervised like a forked child (`Supervisor::spawn_program`): ready, heartbeats
//! answered, SIGKILLed and restarted under its name.
//!
//! The interpreter is `FORKBUS_PYTHON` (CI points it at a venv with `cbor2`), else
//! `python3`; without `cbor2` the worker cannot start and the test fails.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

use common::{ensure, nix_pid, run_until, Harness};
use forkbus::exec::{Command, Output};
use forkbus::supervisor::{
    ChildSpec, Restart, SuperviseError, SupervisionEvent, Supervisor, WhileDown,
};
use forkbus::{
    to, Bus, BusConfig, ExitStatus, Listener, Message, MessageId, Pid, SendOptions, ServiceEvent,
    Stop,
};
use nix::sys::signal::{kill, Signal};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Debug, Default)]
struct Heard {
    texts: Vec<String>,
    numbers: Vec<u64>,
    /// Who answered each number.
    answered_by: Vec<(u64, u32)>,
    supervision: Vec<SupervisionEvent>,
    delivered: BTreeSet<MessageId>,
    exits: Vec<(Pid, ExitStatus)>,
}

struct Ear(Rc<RefCell<Heard>>);

impl Listener for Ear {
    fn on_message(&mut self, _bus: &mut Bus, m: &Message) {
        let mut h = self.0.borrow_mut();
        if let Ok(n) = m.decode::<u64>() {
            h.numbers.push(n);
            h.answered_by.push((n, m.origin().pid));
        } else if let Ok(t) = m.decode::<String>() {
            h.texts.push(t);
        }
    }

    fn on_delivered(&mut self, _bus: &mut Bus, id: MessageId) {
        self.0.borrow_mut().delivered.insert(id);
    }

    fn on_child_exit(&mut self, _bus: &mut Bus, pid: Pid, status: ExitStatus) {
        self.0.borrow_mut().exits.push((pid, status));
    }

    fn on_service(&mut self, _bus: &mut Bus, event: &ServiceEvent) {
        if let ServiceEvent::Supervision(e) = event {
            self.0.borrow_mut().supervision.push(e.clone());
        }
    }
}

fn worker_command() -> Command {
    Command::new(python())
        .arg(format!("{ROOT}/python/examples/echo_worker.py"))
        .env("PYTHONPATH", format!("{ROOT}/python/src"))
        .stdout(Output::Inherit)
        .stderr(Output::Inherit)
}

fn ready_pids(h: &Heard) -> Vec<u32> {
    h.supervision
        .iter()
        .filter_map(|e| match e {
            SupervisionEvent::Ready { pid, .. } => Some(pid.as_raw()),
            _ => None,
        })
        .collect()
}

/// A Python worker supervised like a forked child: ready, heartbeats answered, SIGKILLed and
/// restarted under the same name, the name answering from the new process.
fn supervised_worker() -> Result<(), String> {
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let heard = Rc::new(RefCell::new(Heard::default()));
    bus.add_listener(0, Ear(heard.clone()));
    let sup = Supervisor::new(&mut bus);
    // What a program cannot honour yet is refused before anything starts.
    let queued = ChildSpec::named("q").while_down(WhileDown::Queue { capacity: 8 });
    let recycled = ChildSpec::named("r").max_requests(100, 10);
    for spec in [queued, recycled] {
        match sup.spawn_program(&mut bus, spec, worker_command()) {
            Err(SuperviseError::InvalidSpec(_)) => {}
            other => return Err(format!("a program with custody or recycling: {other:?}")),
        }
    }
    ensure(bus.children().is_empty(), || {
        "a refused spec started".into()
    })?;
    let spec = ChildSpec::named("py-sup")
        .restart(Restart::Always)
        .heartbeat(Duration::from_millis(50), Duration::from_millis(500));
    sup.spawn_program(&mut bus, spec, worker_command())
        .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        !ready_pids(&h.borrow()).is_empty()
    })?;
    let first = ready_pids(&heard.borrow())[0];
    // Heartbeats every 50 ms, 500 ms to answer, for 1.5 s: all answered, nothing killed.
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    run_until(&mut bus, Duration::from_secs(5), move |_| {
        std::time::Instant::now() >= until
    })?;
    ensure(
        !heard
            .borrow()
            .supervision
            .iter()
            .any(|e| matches!(e, SupervisionEvent::Killed { .. })),
        || format!("killed: {:?}", heard.borrow().supervision),
    )?;
    bus.send(to::name("py-sup"), &1u64)
        .map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        h.borrow().answered_by.contains(&(1, first))
    })?;
    // SIGKILL: the supervisor sees it exit and starts a new process under the same name.
    kill(nix_pid(Pid::from_raw(first)), Signal::SIGKILL).map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        ready_pids(&h.borrow()).iter().any(|p| *p != first)
    })?;
    let second = *ready_pids(&heard.borrow())
        .iter()
        .find(|p| **p != first)
        .ok_or("no second process")?;
    let h = heard.clone();
    let mut sent = false;
    run_until(&mut bus, Duration::from_secs(30), move |bus| {
        // The new process registers the name when it starts: send once it resolves to it.
        if !sent && bus.router().resolve(&to::name("py-sup")).is_some() {
            sent = bus.send(to::name("py-sup"), &2u64).is_ok();
        }
        h.borrow().answered_by.contains(&(2, second))
    })?;
    ensure(
        heard.borrow().supervision.iter().any(|e| matches!(
            e,
            SupervisionEvent::Exited { pid, status: ExitStatus::Signal(9), .. } if pid.as_raw() == first
        )),
        || format!("no exit of {first}: {:?}", heard.borrow().supervision),
    )?;
    // The killed process's counts are missing; the new one drains with the tree.
    common::shutdown_after_kills(bus, 1)
}

fn python() -> String {
    std::env::var("FORKBUS_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn echo_worker() -> Result<(), String> {
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let heard = Rc::new(RefCell::new(Heard::default()));
    bus.add_listener(0, Ear(heard.clone()));
    let command = worker_command().arg("py-echo");
    let pid = bus.exec_node(&command).map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        h.borrow().texts.iter().any(|t| t == "ready py-echo")
    })?;
    // By pid and by name, each with a receipt; the worker answers each with a receipt of
    // its own, which this root's router completes.
    let receipt = SendOptions::new().receipt(true);
    let mut ids = Vec::new();
    for n in 0..20u64 {
        let id = if n % 2 == 0 {
            bus.send_with(to::pid(pid), &n, receipt)
        } else {
            bus.send_with(to::name("py-echo"), &n, receipt)
        };
        ids.push(id.map_err(|e| e.to_string())?);
    }
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        let h = h.borrow();
        h.numbers.len() == 20 && h.delivered.len() == 20
    })?;
    {
        let h = heard.borrow();
        let mut got = h.numbers.clone();
        got.sort_unstable();
        ensure(got == (0..20).collect::<Vec<_>>(), || {
            format!("answers {got:?}")
        })?;
        ensure(ids.iter().all(|id| h.delivered.contains(id)), || {
            format!("receipts {:?} for {ids:?}", h.delivered)
        })?;
    }
    bus.send(pid, &"report").map_err(|e| e.to_string())?;
    let h = heard.clone();
    run_until(&mut bus, Duration::from_secs(30), move |_| {
        h.borrow().texts.iter().any(|t| t.starts_with("delivered"))
    })?;
    ensure(
        heard.borrow().texts.iter().any(|t| t == "delivered 20"),
        || format!("the worker's receipts: {:?}", heard.borrow().texts),
    )?;
    // The drain reaches the worker: it answers the probes, reports its tally and exits 0.
    bus.shutdown_tree();
    let tally = match bus.run().map_err(|e| e.to_string())? {
        Stop::Shutdown(t) => t,
        other => return Err(format!("shutdown ended with {other:?}")),
    };
    ensure(tally.processes == 2 && tally.unreported == 0, || {
        format!("tally {tally:?}")
    })?;
    ensure(tally.balanced(), || format!("unbalanced tally {tally:?}"))?;
    ensure(heard.borrow().exits == [(pid, ExitStatus::Code(0))], || {
        format!("exits {:?}", heard.borrow().exits)
    })?;
    Ok(())
}

fn main() {
    let mut h = Harness::new();
    h.run("python_echo_worker", Duration::from_secs(90), echo_worker);
    h.run(
        "python_supervised_worker",
        Duration::from_secs(90),
        supervised_worker,
    );
    h.finish()
}
