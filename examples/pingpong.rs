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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000)
        .max(1);
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
