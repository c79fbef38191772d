//! The README program of PHP's LightProcessExecutor, ported to forkbus.
//!
//! ```text
//! cargo run --release --example lightprocess
//! ```
//!
//! The PHP original (xilon-jul/php-lightprocess-executor), abridged:
//!
//! ```php
//! $root = new LightProcessExecutor();
//! $root->addRouterMessageListener(new TestListener());
//! $root->fork();
//! $pid2 = $root->fork("", null, function($executor){
//!     $executor->fork();
//! });
//! $root->submit("test", null, false, false, true);   // broadcast
//! $root->submit("for pid2 only", $pid2);              // unicast to one pid
//! $root->loop();
//! ```
//!
//! Each forkbus call below names the PHP call it stands for. Three differences:
//! - a forked child starts with no listener (PHP copies the parent's into the child), so
//!   each child's closure adds its own;
//! - PHP's loop never ends (its `shutdown()` does not tell the children); here every
//!   process answers what it receives, and once the root has the four answers it shuts the
//!   whole tree down gracefully (`Bus::shutdown_tree`), bottom-up, and prints the tally;
//! - `onPeerShutdown`'s lost messages arrive whole (PHP's come out as empty arrays).

use forkbus::{
    to, Bus, BusConfig, ExitStatus, ForkOptions, Listener, Message, MessageId, PeerShutdown, Pid,
    Stop,
};

use forkbus::error::BusError;

/// PHP's `TestListener implements RouterEventListener`; every method is optional here.
struct TestListener {
    who: &'static str,
    /// The root counts the answers; other processes answer.
    answers: Option<u32>,
}

impl TestListener {
    fn new(who: &'static str) -> Self {
        Self { who, answers: None }
    }

    fn tag(&self, bus: &Bus) -> String {
        format!("[{} {}]", self.who, bus.pid())
    }
}

impl Listener for TestListener {
    // onInterruptReceive(MessageEvent $e): the obsolete "urgent" flag; forkbus has none.

    // onMessageReceived(MessageEvent $e)
    fn on_message(&mut self, bus: &mut Bus, msg: &Message) {
        let text: String = msg.decode().unwrap_or_else(|e| format!("<{e}>"));
        let kind = if msg.destination() == &forkbus::Destination::Broadcast {
            "broadcast"
        } else {
            "unicast"
        };
        println!(
            "{} onMessageReceived {text:?} from {} ({kind}, {} hop(s))",
            self.tag(bus),
            msg.origin().pid,
            msg.hops()
        );
        match &mut self.answers {
            Some(n) => {
                *n += 1;
                if *n == 4 {
                    println!(
                        "{} all four answers in: shutting the tree down",
                        self.tag(bus)
                    );
                    bus.shutdown_tree();
                }
            }
            None => {
                let answer = format!("{} {} got {text:?}", self.who, bus.pid());
                if let Err(e) = bus.send(msg.origin(), &answer) {
                    println!("{} cannot answer: {e}", self.tag(bus));
                }
            }
        }
    }

    // onMessageSent(MessageEvent $e): written to the kernel on every link it went out on
    // (PHP fires it once, for the first neighbour, and on PHP 5 only).
    fn on_sent(&mut self, bus: &mut Bus, id: MessageId) {
        println!("{} onMessageSent #{}", self.tag(bus), id.seq);
    }

    // onPeerShutdown(LightProcessExecutor $executor, $pid, array $lostMessages)
    fn on_peer_shutdown(&mut self, bus: &mut Bus, s: &PeerShutdown) {
        let pid = s.peer.map_or(0, |p| p.pid);
        println!(
            "{} onPeerShutdown pid {pid} ({:?}), {} lost message(s)",
            self.tag(bus),
            s.relation,
            s.lost.len()
        );
    }

    // onRouterError($operation, $errno, $errstr, \Exception $e = NULL)
    fn on_router_error(&mut self, bus: &mut Bus, error: &BusError) {
        println!("{} onRouterError {error}", self.tag(bus));
    }

    // The executor's child table (readChildState): each child's end, reaped.
    fn on_child_exit(&mut self, bus: &mut Bus, pid: Pid, status: ExitStatus) {
        println!("{} child {pid} ended: {status:?}", self.tag(bus));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // $root = new LightProcessExecutor();
    let mut root = Bus::root(BusConfig::default())?;
    // $root->addRouterMessageListener(new TestListener());   (priority: getPriority())
    root.add_listener(
        0,
        TestListener {
            answers: Some(0),
            ..TestListener::new("root")
        },
    );

    // $root->fork();
    let pid1 = root.fork(ForkOptions::default(), |executor| {
        executor.add_listener(0, TestListener::new("child"));
    })?;

    // $pid2 = $root->fork("", null, function($executor){ $executor->fork(); });
    // (fork($name, $parentCallback, $childCallback): the name is ForkOptions::named, the
    // parent callback is simply the code after fork returns, the child callback the closure.)
    let pid2 = root.fork(ForkOptions::default(), |executor| {
        executor.add_listener(0, TestListener::new("pid2"));
        if let Err(e) = executor.fork(ForkOptions::default(), |executor| {
            executor.add_listener(0, TestListener::new("grandchild"));
        }) {
            println!("pid2: fork failed: {e}");
        }
    })?;
    println!("[root {}] forked {pid1} and pid2 = {pid2}", root.pid());

    // $root->submit("test", null, false, false, true);   ($broadcast = true)
    let id = root.send(to::broadcast(), &"test")?;
    println!(
        "[root {}] submit(\"test\", broadcast) = #{}",
        root.pid(),
        id.seq
    );
    // $root->submit("for pid2 only", $pid2);   ($ack = true would be SendOptions::receipt)
    let id = root.send(pid2, &"for pid2 only")?;
    println!(
        "[root {}] submit(\"for pid2 only\", {pid2}) = #{}",
        root.pid(),
        id.seq
    );

    // $root->loop();
    match root.run()? {
        Stop::Shutdown(tally) => println!(
            "[root {}] the tree is down: {} processes, {} envelopes sent, {} delivered, {} lost",
            root.pid(),
            tally.processes,
            tally.sent,
            tally.delivered,
            tally.lost
        ),
        other => println!("[root {}] the loop ended: {other:?}", root.pid()),
    }
    Ok(())
}
