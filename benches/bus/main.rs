//! forkbus against a raw socketpair, in the same run. Prints a table (figure, forkbus, raw,
//! ratio, goal, met?) and writes `target/forkbus-bench.json`. Figures, never assertions.
//!
//! ```text
//! cargo bench --bench bus                       # everything, a few minutes
//! cargo bench --bench bus -- --quick            # a short run (or FORKBUS_BENCH_QUICK=1)
//! cargo bench --bench bus -- --only rtt,fork    # some groups: fork rtt throughput broadcast frames python
//! ```
//!
//! Every figure is measured in repetitions that alternate between raw and forkbus (raw
//! first in even repetitions, forkbus first in odd ones), so that a change of load on the
//! machine hits both sides alike; a figure is the median over repetitions of each
//! repetition's statistic. The load average is recorded with each group.

mod fb;
mod proc;
mod raw;
mod report;
mod stats;

use std::io;
use std::time::{Duration, Instant};

use report::{Goal, Row, Unit};
use serde_json::{json, Value};
use stats::us;

/// The groups, in the order they run (memory first, while the bench's own heap is small
/// and alike for both sides).
const GROUPS: [&str; 6] = ["fork", "rtt", "throughput", "broadcast", "frames", "python"];

/// ZeroMQ PAIR over ipc:// on this machine, 64 B (issue 4 / DESIGN).
const ZMQ_LO: f64 = 3.0e6;
const ZMQ_HI: f64 = 6.6e6;

/// How much of everything.
#[derive(Clone, Debug)]
struct Plan {
    /// Which sides run (`--side`: for profiling one of them alone).
    raw: bool,
    forkbus: bool,
    /// Only the figures whose names contain this (`--filter`).
    filter: Option<String>,
    reps: usize,
    rtt_rounds: usize,
    rtt3_rounds: usize,
    rtt_warmup: usize,
    /// (payload size, raw count, forkbus count)
    throughput: [(usize, usize, usize); 3],
    tree_reps: usize,
    tree_sizes: Vec<usize>,
    broadcast_rounds: usize,
    idle_children: usize,
    cpu: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        let cpu = std::env::var("FORKBUS_BENCH_CPU")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if quick {
            Self {
                raw: true,
                forkbus: true,
                filter: None,
                reps: 3,
                rtt_rounds: 2_000,
                rtt3_rounds: 1_000,
                rtt_warmup: 200,
                throughput: [
                    (64, 1_000_000, 200_000),
                    (1024, 200_000, 100_000),
                    (65536, 3_000, 3_000),
                ],
                tree_reps: 2,
                tree_sizes: vec![7, 15, 63],
                broadcast_rounds: 50,
                idle_children: 5,
                cpu,
            }
        } else {
            Self {
                raw: true,
                forkbus: true,
                filter: None,
                reps: 7,
                rtt_rounds: 20_000,
                rtt3_rounds: 5_000,
                rtt_warmup: 1_000,
                throughput: [
                    (64, 4_000_000, 1_000_000),
                    (1024, 1_000_000, 300_000),
                    (65536, 20_000, 20_000),
                ],
                tree_reps: 5,
                tree_sizes: vec![7, 15, 63],
                broadcast_rounds: 200,
                idle_children: 10,
                cpu,
            }
        }
    }

    /// Whether a figure of this name runs.
    fn wants(&self, figure: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| figure.contains(f.as_str()))
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench bus [-- [--quick] [--only GROUP[,GROUP...]] [--side raw|forkbus] [--filter TEXT]]\n\
         groups: {}\n\
         env: FORKBUS_BENCH_QUICK=1 (same as --quick), FORKBUS_BENCH_CPU=N (the core for pinned runs),\n\
         --side and --filter (figures whose names contain TEXT) are for profiling",
        GROUPS.join(" ")
    );
    std::process::exit(2)
}

fn main() -> io::Result<()> {
    let mut quick = std::env::var("FORKBUS_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut only: Option<Vec<String>> = None;
    let mut side: Option<String> = None;
    let mut filter: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--only" => match args.next() {
                Some(g) => only = Some(g.split(',').map(str::to_owned).collect()),
                None => usage(),
            },
            s if s.starts_with("--only=") => {
                only = Some(s["--only=".len()..].split(',').map(str::to_owned).collect());
            }
            "--side" => side = args.next(),
            "--filter" => filter = args.next(),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--help" | "-h" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage()
            }
        }
    }
    if let Some(only) = &only {
        if let Some(bad) = only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
            eprintln!("unknown group {bad:?}");
            usage()
        }
    }
    proc::become_subreaper()?;
    let mut plan = Plan::new(quick);
    plan.filter = filter;
    match side.as_deref() {
        None => {}
        Some("raw") => plan.forkbus = false,
        Some("forkbus") => plan.raw = false,
        Some(_) => usage(),
    }
    let started = Instant::now();
    let load_start = proc::loadavg();
    let machine = report::machine();
    println!(
        "forkbus bench ({}): {} on {} CPUs, Linux {}; load {:.2} {:.2} {:.2}",
        if quick { "quick" } else { "full" },
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["kernel"].as_str().unwrap_or("?"),
        load_start[0],
        load_start[1],
        load_start[2],
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut groups_json = Vec::new();
    let mut extra = serde_json::Map::new();
    let mut interrupted = false;
    for group in GROUPS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|g| g == group)) {
            continue;
        }
        if interrupted {
            break;
        }
        let before = proc::loadavg();
        let t = Instant::now();
        let result = match group {
            "fork" => fork_group(&plan, &mut extra),
            "rtt" => rtt_group(&plan, &mut extra),
            "throughput" => throughput_group(&plan, &mut extra),
            "broadcast" => broadcast_group(&plan, &mut extra),
            "frames" => frames_group(&mut extra),
            "python" => python_group(&plan, &mut extra),
            _ => Ok(Vec::new()),
        };
        let (reaped, left) = proc::reap_strays(Duration::from_secs(2));
        let after = proc::loadavg();
        let secs = t.elapsed().as_secs_f64();
        let error = match result {
            Ok(mut r) => {
                for row in &r {
                    println!(
                        "  {:<34} forkbus {:>22}  raw {:>22}  {:.2}x",
                        row.figure,
                        row.unit.show(row.forkbus),
                        row.unit.show(row.raw),
                        row.ratio()
                    );
                }
                rows.append(&mut r);
                None
            }
            Err(e) => {
                eprintln!("group {group} failed: {e}");
                if e.kind() == io::ErrorKind::Interrupted {
                    interrupted = true;
                }
                Some(e.to_string())
            }
        };
        println!(
            "[{group}] {secs:.1} s, load {:.2} -> {:.2}{}",
            before[0],
            after[0],
            if reaped + left > 0 {
                format!(", {reaped} stray processes reaped, {left} still running")
            } else {
                String::new()
            }
        );
        groups_json.push(json!({
            "group": group,
            "seconds": secs,
            "load_before": before,
            "load_after": after,
            "strays_reaped": reaped,
            "strays_left": left,
            "error": error,
        }));
    }
    let load_end = proc::loadavg();
    println!();
    print!("{}", report::table(&rows));
    println!(
        "\n{:.0} s in all; load average {:.2} {:.2} {:.2} at the start, {:.2} {:.2} {:.2} at the end",
        started.elapsed().as_secs_f64(),
        load_start[0],
        load_start[1],
        load_start[2],
        load_end[0],
        load_end[1],
        load_end[2]
    );
    let doc = json!({
        "bench": "forkbus vs raw socketpair",
        "mode": if quick { "quick" } else { "full" },
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "machine": machine,
        "load_start": load_start,
        "load_end": load_end,
        "seconds": started.elapsed().as_secs_f64(),
        "plan": format!("{plan:?}"),
        "forkbus_config": format!("{:?}", fb::config()),
        "groups": groups_json,
        "figures": report::rows_json(&rows),
        "details": Value::Object(extra),
        "method": "medians over repetitions that alternate raw and forkbus; forkbus sends with \
                   Bus::send_bytes (raw payload bytes) under BusConfig::default(); raw is a \
                   blocking socketpair loop with a 4-byte length prefix and buffered reads",
    });
    // A partial run (some groups, one side, some figures) does not overwrite a whole run's.
    let partial = only.is_some() || !plan.raw || !plan.forkbus || plan.filter.is_some();
    let name = if partial {
        "forkbus-bench.partial.json"
    } else {
        "forkbus-bench.json"
    };
    let path = report::write_json(&doc, name)?;
    println!("wrote {}", path.display());
    if interrupted {
        return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
    }
    Ok(())
}

/// Runs `raw` and `fb` `reps` times each, alternating which goes first (only the sides the
/// plan runs).
fn alternate<A, B>(
    plan: &Plan,
    reps: usize,
    mut raw: impl FnMut() -> io::Result<A>,
    mut fb: impl FnMut() -> io::Result<B>,
) -> io::Result<(Vec<A>, Vec<B>)> {
    let mut a = Vec::with_capacity(reps);
    let mut b = Vec::with_capacity(reps);
    for rep in 0..reps {
        if rep % 2 == 0 && plan.raw {
            a.push(raw()?);
        }
        if plan.forkbus {
            b.push(fb()?);
        }
        if rep % 2 == 1 && plan.raw {
            a.push(raw()?);
        }
    }
    Ok((a, b))
}

fn tally_json(t: &forkbus::Tally) -> Value {
    json!({
        "processes": t.processes,
        "sent": t.sent,
        "delivered": t.delivered,
        "lost": t.lost,
        "duplicates": t.duplicates,
        "unreported": t.unreported,
    })
}

// -----------------------------------------------------------------------------------------
// Groups

fn fork_group(plan: &Plan, extra: &mut serde_json::Map<String, Value>) -> io::Result<Vec<Row>> {
    let k = plan.idle_children;
    // FORKBUS_BENCH_REST_MS: how long the children rest before their memory is read.
    let rest = Duration::from_millis(
        std::env::var("FORKBUS_BENCH_REST_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100),
    );
    let reps = plan.reps.min(5);
    let (raw, fb) = alternate(
        plan,
        reps,
        || {
            // k idle children at once, as on the forkbus side (PSS depends on sharers).
            let mut ready = stats::Samples::with_capacity(k);
            let mut kept = Vec::with_capacity(k);
            for _ in 0..k {
                let (t, child, sock) = raw::idle_child()?;
                ready.push(t);
                kept.push((child, sock));
            }
            std::thread::sleep(rest);
            let mut memory = Vec::with_capacity(k);
            for (child, _) in &kept {
                memory.push(proc::rss_pss_kib(child.pid())?);
            }
            // Each later child holds copies of the earlier children's sockets (a plain
            // fork keeps them), so closing ours ends nothing: kill them.
            for (child, sock) in kept {
                child.kill()?;
                drop(sock);
            }
            Ok((ready, memory))
        },
        || fb::idle_children(k, rest),
    )?;
    let med = |v: &[u64]| report::median(&v.iter().map(|x| *x as f64).collect::<Vec<_>>());
    let raw_ready: Vec<f64> = raw.iter().map(|(s, _)| us(s.median())).collect();
    let fb_ready: Vec<f64> = fb.iter().map(|(i, _)| us(i.ready.median())).collect();
    let rss = |m: &[(u64, u64)]| med(&m.iter().map(|x| x.0).collect::<Vec<_>>());
    let pss = |m: &[(u64, u64)]| med(&m.iter().map(|x| x.1).collect::<Vec<_>>());
    let raw_rss: Vec<f64> = raw.iter().map(|(_, m)| rss(m)).collect();
    let fb_rss: Vec<f64> = fb.iter().map(|(i, _)| rss(&i.memory)).collect();
    let raw_pss: Vec<f64> = raw.iter().map(|(_, m)| pss(m)).collect();
    let fb_pss: Vec<f64> = fb.iter().map(|(i, _)| pss(&i.memory)).collect();
    extra.insert(
        "fork".into(),
        json!({
            "children_per_rep": k,
            "rest_ms": rest.as_millis() as u64,
            "forkbus_tallies": fb.iter().map(|(_, t)| tally_json(t)).collect::<Vec<_>>(),
        }),
    );
    let note = format!("{k} children forked one after another, median per child");
    Ok(vec![
        Row::new(
            "fork",
            "fork-to-ready per worker",
            Unit::Micros,
            fb_ready,
            raw_ready,
            Goal::None,
        )
        .note(note.clone()),
        Row::new(
            "fork",
            "idle child RSS",
            Unit::Kib,
            fb_rss,
            raw_rss,
            Goal::None,
        )
        .note(format!("{note}; after {} ms at rest", rest.as_millis())),
        Row::new(
            "fork",
            "idle child PSS",
            Unit::Kib,
            fb_pss,
            raw_pss,
            Goal::None,
        )
        .note(format!("{note}; after {} ms at rest", rest.as_millis())),
    ])
}

/// Where the processes of a round trip run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// Wherever the scheduler puts them.
    Unpinned,
    /// All on one CPU.
    OneCore,
    /// The root on one CPU, the rest on the other: every hop to and from the root wakes the
    /// other CPU.
    CrossCore,
}

fn rtt_group(plan: &Plan, extra: &mut serde_json::Map<String, Value>) -> io::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut detail = Vec::new();
    let ncpus = std::thread::available_parallelism().map_or(1, usize::from);
    let other = (plan.cpu + 1) % ncpus.max(1);
    for placement in [
        Placement::Unpinned,
        Placement::OneCore,
        Placement::CrossCore,
    ] {
        if placement == Placement::CrossCore && other == plan.cpu {
            continue;
        }
        for hops in [1usize, 3] {
            let how = match placement {
                Placement::Unpinned => "unpinned",
                Placement::OneCore => "pinned",
                Placement::CrossCore => "cross-core",
            };
            let name = format!(
                "rtt 64 B {hops} hop{} {how}",
                if hops == 1 { "" } else { "s" }
            );
            if !plan.wants(&name) {
                continue;
            }
            let rounds = if hops == 1 {
                plan.rtt_rounds
            } else {
                plan.rtt3_rounds
            };
            let warmup = plan.rtt_warmup;
            // Cross-core: the chain is forked while this process is on the other CPU (its
            // processes inherit it), then this process moves to its own.
            let pin = || -> io::Result<Option<nix::sched::CpuSet>> {
                match placement {
                    Placement::Unpinned => Ok(None),
                    Placement::OneCore => proc::pin(&[plan.cpu]).map(Some),
                    Placement::CrossCore => proc::pin(&[other]).map(Some),
                }
            };
            let after_fork = || -> io::Result<()> {
                if placement == Placement::CrossCore {
                    proc::pin(&[plan.cpu])?;
                }
                Ok(())
            };
            let unpin = |saved: Option<nix::sched::CpuSet>| -> io::Result<()> {
                match saved {
                    Some(s) => proc::unpin(&s),
                    None => Ok(()),
                }
            };
            // The raw side runs twice per rep: blocking reads (the baseline the goals are
            // held to) and epoll-then-read (what any reactor must do), in turns.
            let turn = std::cell::Cell::new(0usize);
            let raw_once = |wait: raw::Wait| -> io::Result<(stats::Samples, Duration)> {
                let saved = pin()?;
                let r = proc::with_cpu(|| raw::round_trip(hops, rounds, warmup, wait, after_fork));
                unpin(saved)?;
                r
            };
            let (raw_both, fb) = alternate(
                plan,
                plan.reps,
                || {
                    turn.set(turn.get() + 1);
                    if turn.get() % 2 == 1 {
                        let b = raw_once(raw::Wait::Blocking)?;
                        Ok((b, raw_once(raw::Wait::Epoll)?))
                    } else {
                        let e = raw_once(raw::Wait::Epoll)?;
                        Ok((raw_once(raw::Wait::Blocking)?, e))
                    }
                },
                || {
                    let saved = pin()?;
                    let r = proc::with_cpu(|| fb::round_trip(hops, rounds, warmup, after_fork));
                    unpin(saved)?;
                    r
                },
            )?;
            let raw: Vec<_> = raw_both.iter().map(|(b, _)| b.clone()).collect();
            let raw_epoll: Vec<_> = raw_both.iter().map(|(_, e)| e.clone()).collect();
            let goal = match placement {
                Placement::OneCore => Goal::RatioAtMost(1.6),
                _ => Goal::RatioAtMost(1.2),
            };
            let note = format!(
                "{rounds} round trips per rep after {warmup}{}",
                match placement {
                    Placement::Unpinned => String::new(),
                    Placement::OneCore => format!(", every process on CPU {}", plan.cpu),
                    Placement::CrossCore => format!(
                        ", the root on CPU {}, the rest of the chain on CPU {other}",
                        plan.cpu
                    ),
                }
            );
            rows.push(
                Row::new(
                    "rtt",
                    format!("{name} median"),
                    Unit::Micros,
                    fb.iter().map(|((s, _), _)| us(s.median())).collect(),
                    raw.iter().map(|(s, _)| us(s.median())).collect(),
                    goal,
                )
                .note(note.clone()),
            );
            rows.push(
                Row::new(
                    "rtt",
                    format!("{name} p99"),
                    Unit::Micros,
                    fb.iter().map(|((s, _), _)| us(s.p99())).collect(),
                    raw.iter().map(|(s, _)| us(s.p99())).collect(),
                    Goal::None,
                )
                .note(note.clone()),
            );
            rows.push(
                Row::new(
                    "rtt",
                    format!("{name} median, raw epoll"),
                    Unit::Micros,
                    fb.iter().map(|((s, _), _)| us(s.median())).collect(),
                    raw_epoll.iter().map(|(s, _)| us(s.median())).collect(),
                    Goal::None,
                )
                .note(format!(
                    "{note}; the raw side waits in epoll_wait before each read (no timerfd, \
                     no eventfd): the floor for any reactor"
                )),
            );
            // CPU of every process of the rep (fork and shutdown included), per round trip.
            let per = (rounds + warmup) as f64;
            let fb_cpu: Vec<f64> = fb.iter().map(|(_, c)| us(*c) / per).collect();
            let raw_cpu: Vec<f64> = raw.iter().map(|(_, c)| us(*c) / per).collect();
            println!(
                "  {name}: CPU per round trip, all processes: forkbus {:.1} us, raw {:.1} us",
                report::median(&fb_cpu),
                report::median(&raw_cpu)
            );
            detail.push(json!({
                "figure": name,
                "forkbus_p90_us": fb.iter().map(|((s, _), _)| us(s.quantile(0.9))).collect::<Vec<_>>(),
                "raw_p90_us": raw.iter().map(|(s, _)| us(s.quantile(0.9))).collect::<Vec<_>>(),
                "forkbus_min_us": fb.iter().map(|((s, _), _)| us(s.quantile(0.0))).collect::<Vec<_>>(),
                "raw_min_us": raw.iter().map(|(s, _)| us(s.quantile(0.0))).collect::<Vec<_>>(),
                "forkbus_cpu_us_per_round_trip": fb_cpu,
                "raw_cpu_us_per_round_trip": raw_cpu,
                "raw_epoll_p99_us": raw_epoll.iter().map(|(s, _)| us(s.p99())).collect::<Vec<_>>(),
                "raw_epoll_cpu_us_per_round_trip": raw_epoll
                    .iter()
                    .map(|(_, c)| us(*c) / per)
                    .collect::<Vec<_>>(),
                "forkbus_tallies": fb.iter().map(|((_, t), _)| tally_json(t)).collect::<Vec<_>>(),
            }));
        }
    }
    extra.insert("rtt".into(), Value::Array(detail));
    Ok(rows)
}

fn throughput_group(
    plan: &Plan,
    extra: &mut serde_json::Map<String, Value>,
) -> io::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut detail = Vec::new();
    for (size, raw_count, fb_count) in plan.throughput {
        let label = if size >= 1024 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        let name = format!("one-way {label}");
        if !plan.wants(&name) {
            continue;
        }
        let (raw, fb) = alternate(
            plan,
            plan.reps,
            || proc::with_cpu(|| raw::throughput(size, raw_count)),
            || proc::with_cpu(|| fb::throughput(size, fb_count)),
        )?;
        let raw_rates: Vec<f64> = raw
            .iter()
            .map(|(d, _)| raw_count as f64 / d.as_secs_f64())
            .collect();
        let fb_rates: Vec<f64> = fb
            .iter()
            .map(|((d, _, _), _)| fb_count as f64 / d.as_secs_f64())
            .collect();
        // CPU of both processes (fork and shutdown included), per message.
        let fb_cpu: Vec<f64> = fb.iter().map(|(_, c)| us(*c) / fb_count as f64).collect();
        let raw_cpu: Vec<f64> = raw.iter().map(|(_, c)| us(*c) / raw_count as f64).collect();
        println!(
            "  {name}: CPU per message, both processes: forkbus {:.3} us, raw {:.3} us",
            report::median(&fb_cpu),
            report::median(&raw_cpu)
        );
        let goal = match size {
            64 => Goal::ValueAtLeast {
                lo: ZMQ_LO,
                hi: ZMQ_HI,
                what: "ZeroMQ PAIR",
            },
            65536 => Goal::RatioAtLeast(0.9),
            _ => Goal::None,
        };
        rows.push(
            Row::new(
                "throughput",
                name,
                Unit::Rate { size },
                fb_rates,
                raw_rates,
                goal,
            )
            .note(format!(
                "raw: {raw_count} frames, up to 64 KiB per write; forkbus: {fb_count} send_bytes, \
                 the router coalesces what is queued into one write"
            )),
        );
        detail.push(json!({
            "size": size,
            "raw_count": raw_count,
            "forkbus_count": fb_count,
            "forkbus_cpu_us_per_message": fb_cpu,
            "raw_cpu_us_per_message": raw_cpu,
            "forkbus_queue_full_refusals": fb.iter().map(|((_, r, _), _)| *r).collect::<Vec<_>>(),
            "forkbus_tallies": fb.iter().map(|((_, _, t), _)| tally_json(t)).collect::<Vec<_>>(),
        }));
    }
    extra.insert("throughput".into(), Value::Array(detail));
    Ok(rows)
}

fn broadcast_group(
    plan: &Plan,
    extra: &mut serde_json::Map<String, Value>,
) -> io::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut detail = Vec::new();
    for &n in &plan.tree_sizes {
        if !plan.wants(&format!("broadcast to {n} ")) {
            continue;
        }
        let rounds = plan.broadcast_rounds;
        let (raw, fb) = alternate(
            plan,
            plan.tree_reps,
            || raw::broadcast(n, rounds),
            || fb::broadcast(n, rounds),
        )?;
        let goal = if n == 63 {
            Goal::RatioAtMost(1.3)
        } else {
            Goal::None
        };
        let note = format!(
            "complete binary tree of {n} processes, {rounds} rounds per rep after 5; \
             until the last process had it (shared-memory stamps)"
        );
        rows.push(
            Row::new(
                "broadcast",
                format!("broadcast to {n} median"),
                Unit::Micros,
                fb.iter().map(|(s, _, _)| us(s.median())).collect(),
                raw.iter().map(|s| us(s.median())).collect(),
                goal,
            )
            .note(note.clone()),
        );
        rows.push(
            Row::new(
                "broadcast",
                format!("broadcast to {n} p99"),
                Unit::Micros,
                fb.iter().map(|(s, _, _)| us(s.p99())).collect(),
                raw.iter().map(|s| us(s.p99())).collect(),
                Goal::None,
            )
            .note(note),
        );
        detail.push(json!({
            "n": n,
            "forkbus_tree_start_us": fb.iter().map(|(_, d, _)| us(*d)).collect::<Vec<_>>(),
            "forkbus_tree_start_per_worker_us": fb
                .iter()
                .map(|(_, d, _)| us(*d) / (n - 1) as f64)
                .collect::<Vec<_>>(),
            "forkbus_tallies": fb.iter().map(|(_, _, t)| tally_json(t)).collect::<Vec<_>>(),
        }));
    }
    extra.insert("broadcast".into(), Value::Array(detail));
    Ok(rows)
}

fn frames_group(extra: &mut serde_json::Map<String, Value>) -> io::Result<Vec<Row>> {
    let n = 63;
    let (f, tally) = fb::frames(n)?;
    let flood = (n - 1) as f64;
    extra.insert(
        "frames".into(),
        json!({
            "n": f.n,
            "root_to_leaf": f.root_to_leaf,
            "root_to_leaf_hops": f.root_to_leaf_hops,
            "leaf_to_leaf": f.leaf_to_leaf,
            "leaf_to_leaf_hops": f.leaf_to_leaf_hops,
            "broadcast": f.broadcast,
            "tally": tally_json(&tally),
        }),
    );
    let note = "envelope frames from every router's LinkStats::frames_sent, summed over the \
                tree; raw: a relay without routes floods every unicast (n - 1 frames)";
    Ok(vec![
        Row::new(
            "frames",
            format!("frames per unicast root->leaf ({n})"),
            Unit::Count,
            vec![f.root_to_leaf as f64],
            vec![flood],
            Goal::ValueEquals(5.0),
        )
        .note(format!(
            "{note}; hops seen by the receiver: {}",
            f.root_to_leaf_hops
        )),
        Row::new(
            "frames",
            format!("frames per unicast leaf->leaf ({n})"),
            Unit::Count,
            vec![f.leaf_to_leaf as f64],
            vec![flood],
            Goal::ValueEquals(10.0),
        )
        .note(format!(
            "{note}; hops seen by the receiver: {}",
            f.leaf_to_leaf_hops
        )),
        Row::new(
            "frames",
            format!("frames per broadcast ({n})"),
            Unit::Count,
            vec![f.broadcast as f64],
            vec![flood],
            Goal::ValueEquals(flood),
        )
        .note(note),
    ])
}

/// A Python leaf worker's round trip through forkbus, beside Python's own
/// `multiprocessing.Pipe` between two Python processes (`benches/python/pipe_rtt.py`), in
/// the same run. The interpreter is `FORKBUS_PYTHON` (with `cbor2`), else `python3`.
fn python_group(plan: &Plan, extra: &mut serde_json::Map<String, Value>) -> io::Result<Vec<Row>> {
    let python = std::env::var("FORKBUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let (rounds, warmup, reps) = (plan.rtt_rounds, plan.rtt_warmup, plan.reps);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python/pipe_rtt.py");
    let (raw, fb) = alternate(
        plan,
        reps,
        || -> io::Result<f64> {
            let out = std::process::Command::new(&python)
                .arg(script)
                .arg(rounds.to_string())
                .arg(warmup.to_string())
                .output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "{script}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .map_err(|e| io::Error::other(format!("{script} printed no median: {e}")))
        },
        || -> io::Result<f64> {
            let (samples, _) = fb::python_round_trip(&python, rounds, warmup)?;
            Ok(us(samples.median()))
        },
    )?;
    extra.insert(
        "python".into(),
        json!({ "interpreter": python, "rounds": rounds, "warmup": warmup }),
    );
    Ok(vec![Row::new(
        "python",
        "rtt 64 B Python worker median",
        Unit::Micros,
        fb,
        raw,
        Goal::None,
    )
    .note(
        "raw: multiprocessing.Pipe between two Python processes".to_owned(),
    )])
}
