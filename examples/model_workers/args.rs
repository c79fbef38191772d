//! The flags: `--help`'s text, what they set ([`Args`]), and their parsing (lexopt).

#[path = "../common/flags.rs"]
mod flags;
use flags::number;

pub(crate) const HELP: &str = "\
model_workers: a forkbus tree of model-serving workers

USAGE: model_workers [FLAGS]

  --shards N        shard supervisors under the root              [2]
  --workers N       workers per shard                             [3]
  --requests N      inference requests the root sends             [2000]
  --window N        requests in flight at most                    [64]
  --trace-every N   trace every Nth request (0: none)             [500]
  --kill-at N       kill the target of request N right after sending it; its
                    shard's supervisor restarts it          [7/10 of --requests]
  --hang-ms N       before the SIGKILL, freeze it (SIGSTOP) N ms, so requests pile
                    up unacknowledged on its link (0: a plain SIGKILL)  [20]
  --backoff-ms N    the supervisors' delay before a restart               [20]
  --no-kill         kill nobody
  --seed N          seed of the models and the inputs             [42]
  --help            this text";

#[derive(Clone, Debug)]
pub(crate) struct Args {
    pub(crate) shards: usize,
    pub(crate) workers: usize,
    pub(crate) requests: u64,
    pub(crate) window: usize,
    pub(crate) trace_every: u64,
    pub(crate) kill_at: Option<u64>,
    pub(crate) hang_ms: u64,
    pub(crate) backoff_ms: u64,
    pub(crate) seed: u64,
}

/// The flags, or `None` for `--help`.
pub(crate) fn parse() -> Result<Option<Args>, lexopt::Error> {
    use lexopt::prelude::*;
    let mut a = Args {
        shards: 2,
        workers: 3,
        requests: 2000,
        window: 64,
        trace_every: 500,
        kill_at: None,
        hang_ms: 20,
        backoff_ms: 20,
        seed: 42,
    };
    let mut kill = true;
    let mut kill_at = None;
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("shards") => a.shards = number(&mut p, "--shards")?,
            Long("workers") => a.workers = number(&mut p, "--workers")?,
            Long("requests") => a.requests = number(&mut p, "--requests")?,
            Long("window") => a.window = number(&mut p, "--window")?,
            Long("trace-every") => a.trace_every = number(&mut p, "--trace-every")?,
            Long("kill-at") => kill_at = Some(number(&mut p, "--kill-at")?),
            Long("hang-ms") => a.hang_ms = number(&mut p, "--hang-ms")?,
            Long("backoff-ms") => a.backoff_ms = number(&mut p, "--backoff-ms")?,
            Long("no-kill") => kill = false,
            Long("seed") => a.seed = number(&mut p, "--seed")?,
            _ => return Err(arg.unexpected()),
        }
    }
    if a.shards == 0 || a.workers == 0 || a.requests == 0 || a.window == 0 {
        return Err("--shards, --workers, --requests and --window must be positive".into());
    }
    if a.shards.saturating_mul(a.workers) > 512 {
        return Err("at most 512 workers, please".into());
    }
    a.kill_at = kill.then(|| kill_at.unwrap_or(a.requests * 7 / 10));
    Ok(Some(a))
}
