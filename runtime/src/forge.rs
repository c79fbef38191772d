//! A test hook: control frames of every kind, sent from the wrong side on purpose, so that
//! tests can check that neighbours refuse them. Not part of the API.

use forkbus_node::{Control, Relation, Tally};

use crate::bus::Bus;

impl Bus {
    /// Not part of the API: a test hook. Queues a well-formed link-level control frame of
    /// the kind named (the drain's `"shutdown"`, `"probe"`, `"exit"`, `"quiet"`, `"tally"`, or a
    /// supervision frame: `"ping"`, `"pong"`,
    /// `"ready"`, `"stop"`, `"recycle"`, `"gave-up"`, `"job"`, `"result"`) for a neighbour,
    /// whether this process may send it or not, so that a test can check that the
    /// neighbour refuses a frame from the wrong relation. `false` for an unknown kind or
    /// without an open link.
    #[doc(hidden)]
    pub fn send_forged_control(&mut self, to: Relation, kind: &str) -> bool {
        let frame = match kind {
            "shutdown" => Some(Control::Drain.encode()),
            "probe" => Some(Control::Probe(1).encode()),
            "exit" => Some(Control::Exit.encode()),
            "quiet" => Some(
                Control::Quiet {
                    wave: 1,
                    still: true,
                }
                .encode(),
            ),
            "tally" => Some(Control::Tally(Tally::default()).encode()),
            other => crate::supervisor::forged_frame(other),
        };
        frame.is_some_and(|(code, data)| self.send_link_control(to, code, data))
    }
}
