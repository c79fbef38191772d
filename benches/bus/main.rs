//! forkbus against a raw socketpair, in the same run. Prints a table and writes
//! `target/forkbus-bench.json`. Figures, never assertions.

mod proc;
mod raw;
mod stats;

use std::io;

use stats::us;

fn main() -> io::Result<()> {
    for hops in [1, 3] {
        let s = raw::round_trip(hops, 20_000, 2_000)?;
        println!(
            "raw rtt {hops} hop(s): median {:.1} us p99 {:.1} us",
            us(s.median()),
            us(s.p99())
        );
    }
    let before = proc::pin(&[0])?;
    let s = raw::round_trip(1, 20_000, 2_000)?;
    proc::unpin(&before)?;
    println!(
        "raw rtt pinned: median {:.1} us p99 {:.1} us",
        us(s.median()),
        us(s.p99())
    );
    for (size, count) in [(64, 5_000_000), (1024, 1_000_000), (65536, 30_000)] {
        let d = raw::throughput(size, count)?;
        let rate = count as f64 / d.as_secs_f64();
        println!(
            "raw throughput {size} B: {:.2} M msgs/s, {:.0} MB/s",
            rate / 1e6,
            rate * size as f64 / 1e6
        );
    }
    for n in [7, 15, 63] {
        let s = raw::broadcast(n, 200)?;
        println!(
            "raw broadcast {n}: median {:.1} us p99 {:.1} us ({} rounds)",
            us(s.median()),
            us(s.p99()),
            s.len()
        );
    }
    let (t, child, _keep) = raw::idle_child()?;
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (rss, pss) = proc::rss_pss_kib(child.pid())?;
    child.kill()?;
    println!(
        "raw fork-to-ready {:.1} us, idle rss {rss} KiB pss {pss} KiB",
        us(t)
    );
    Ok(())
}
