//! Ping-pong of a 64-byte payload between the root and one child.
//!
//! Prints the mean round trip. It is also the program the reactor's syscalls per round trip
//! were counted with:
//!
//! ```text
//! cargo build --release --example pingpong
//! strace -f -c -o /tmp/pp.strace target/release/examples/pingpong 20000
//! ```
//! (divide each count by the rounds; start-up and shutdown add a fixed few hundred).

use std::time::Instant;

use forkbus::{Bus, BusConfig, ForkOptions, Listener, Message, Pid, SendOptions, Stop};

const HELP: &str = "\
pingpong: round trips of a 64-byte payload between the root and one child

USAGE: pingpong [ROUNDS]

  ROUNDS   round trips, at least 1  [10000]";

struct Pong;

impl Listener for Pong {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let _ = bus.send_bytes(msg.origin(), msg.payload().to_vec(), SendOptions::default());
    }
}

struct Ping {
    left: u64,
}

impl Listener for Ping {
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        self.left -= 1;
        if self.left == 0 {
            bus.stop();
        } else {
            let _ = bus.send_bytes(msg.origin(), msg.payload().to_vec(), SendOptions::default());
        }
    }
}

/// The rounds, or `None` for `--help`.
fn parse_args() -> Result<Option<u64>, lexopt::Error> {
    use lexopt::prelude::*;
    let mut rounds = None;
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Value(v) if rounds.is_none() => {
                let v = v.string()?;
                let n: u64 = v.parse().map_err(|e| format!("ROUNDS {v:?}: {e}"))?;
                rounds = Some(n);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Some(rounds.unwrap_or(10_000).max(1)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds = match parse_args() {
        Ok(Some(n)) => n,
        Ok(None) => {
            println!("{HELP}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("pingpong: {e} (try --help)");
            std::process::exit(2);
        }
    };
    let mut bus = Bus::root(BusConfig::default())?;
    let child: Pid = bus.fork(ForkOptions::named("pong"), |bus| {
        bus.add_listener(0, Pong);
    })?;
    bus.add_listener(0, Ping { left: rounds });
    let start = Instant::now();
    bus.send_bytes(child, vec![7; 64], SendOptions::default())?;
    bus.run()?;
    let elapsed = start.elapsed();
    println!(
        "{rounds} round trips in {elapsed:?}: {:.2} µs each",
        elapsed.as_secs_f64() * 1e6 / rounds as f64
    );
    bus.shutdown_tree();
    match bus.run()? {
        Stop::Shutdown(tally) => println!("tally: {tally:?}"),
        other => println!("ended: {other:?}"),
    }
    Ok(())
}
