//! Real processes: a Python leaf worker (`python/examples/echo_worker.py`, on the
//! `forkbus` package in `python/src`) joined to a Rust tree with `Bus::exec_node`. It takes
//! a name, answers messages sent by pid and by name with receipts both ways, and drains
//! with the tree: the tally counts it and balances, and it exits 0.
//!
//! The interpreter is `FORKBUS_PYTHON` (CI points it at a venv with `cbor2`), else
//! `python3`; without `cbor2` the worker cannot start and the test fails.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

use common::{ensure, run_until, Harness};
use forkbus::exec::{Command, Output};
use forkbus::{
    to, Bus, BusConfig, ExitStatus, Listener, Message, MessageId, Pid, SendOptions, Stop,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Debug, Default)]
struct Heard {
    texts: Vec<String>,
    numbers: Vec<u64>,
    delivered: BTreeSet<MessageId>,
    exits: Vec<(Pid, ExitStatus)>,
}

struct Ear(Rc<RefCell<Heard>>);

impl Listener for Ear {
    fn on_message(&mut self, _bus: &mut Bus, m: &Message) {
        let mut h = self.0.borrow_mut();
        if let Ok(n) = m.decode::<u64>() {
            h.numbers.push(n);
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
}

fn python() -> String {
    std::env::var("FORKBUS_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn echo_worker() -> Result<(), String> {
    let mut bus = Bus::root(BusConfig::default()).map_err(|e| e.to_string())?;
    let heard = Rc::new(RefCell::new(Heard::default()));
    bus.add_listener(0, Ear(heard.clone()));
    let command = Command::new(python())
        .arg(format!("{ROOT}/python/examples/echo_worker.py"))
        .arg("py-echo")
        .env("PYTHONPATH", format!("{ROOT}/python/src"))
        .stdout(Output::Inherit)
        .stderr(Output::Inherit);
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
    h.finish()
}
