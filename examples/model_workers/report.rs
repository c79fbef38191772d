//! The report: what the root prints once the requests are done (the kill and its loss
//! report, the routing traces, the summary and the tree as a picture), and the lines of
//! the run's other steps. It only reads the root's state (`root.rs`); `main` calls it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use forkbus::{to, Bus, Fate, LossReason, Stop, UnknownReason};

use crate::model::SHAPE;
use crate::root::{Member, Outcome, Request, Root};
use crate::wire::{Role, Wire};

pub(crate) fn section(title: &str) {
    println!(
        "\n── {title} {}",
        "─".repeat(78usize.saturating_sub(title.len() + 4))
    );
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn target(st: &Root, r: &Request) -> String {
    let m = &st.members[r.worker];
    if r.by_name {
        format!("{} by name", m.name)
    } else {
        format!("{} by pid {}", m.name, r.pid)
    }
}

/// Section 1's lines, once the tree is up.
pub(crate) fn print_tree_up(st: &Root, tree_up: Duration) {
    println!(
        "{} processes up in {:.1} ms: root, {} shard supervisors, {} workers each.",
        1 + st.members.len(),
        tree_up.as_secs_f64() * 1e3,
        st.args.shards,
        st.args.workers
    );
    println!(
        "Each shard supervises its workers (forkbus::supervisor::Supervisor: restart always, backoff \
         {} ms); a worker keeps its name (shard0/w1) across restarts.",
        st.args.backoff_ms
    );
    println!(
        "Each worker built model v1 in memory: an MLP {} ({} weights, seed {}).",
        SHAPE.map(|n| n.to_string()).join("→"),
        st.models[0].n_weights(),
        st.args.seed
    );
}

/// Section 2's lines, once the requests are done.
pub(crate) fn print_requests(st: &Root) {
    println!(
        "{} requests sent to {} workers (by pid and by name, in turn), each with a receipt.",
        st.reqs.len(),
        st.workers.len()
    );
    if let Some(at) = st.switch_at {
        println!("\"load model version 2\" broadcast to the whole tree before request #{at}.");
    }
    if let Some(k) = &st.kill {
        let m = &st.members[k.worker];
        match m.old_pid {
            Some(old) => println!(
                "{} (pid {old}) killed after request #{}, back as pid {}: the root sent to \
                 it again, by name and by its new pid.",
                m.name, k.after_req, m.pid
            ),
            None => println!("{} killed after request #{}.", m.name, k.after_req),
        }
    }
    if st.timed_out {
        println!("TIMED OUT with {} requests outstanding", st.outstanding);
    }
}

/// Sections 3 to 5: the kill and its loss report, the routing traces, the summary; returns
/// whether every check of the summary held.
pub(crate) fn print_report(st: &Root, bus: &Bus, tree_up: Duration) -> bool {
    print_loss_report(st);
    print_traces(st);
    print_summary(st, bus, tree_up)
}

/// The last line: how the graceful shutdown ended, and any child left.
pub(crate) fn print_shutdown(stop: &Stop, killed: bool, bus: &Bus) {
    match stop {
        Stop::Shutdown(tally) => println!(
            "\nshut down: {} processes drained and exited{}; {} left unreported.",
            tally.processes,
            if killed {
                " (the killed worker's old process was reaped by its supervisor already)"
            } else {
                ""
            },
            tally.unreported
        ),
        other => println!("\nshutdown ended with {other:?}"),
    }
    if !bus.children().is_empty() {
        println!("children left: {:?}", bus.children());
    }
}

/// `2nd`, `3rd`, `11th`.
fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// `#3 #9 #15 … #87 #93 (16)`: a few request numbers of a list.
fn ids(list: &[u64]) -> String {
    let fmt = |v: &[u64]| {
        v.iter()
            .map(|i| format!("#{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if list.len() <= 6 {
        fmt(list)
    } else {
        format!(
            "{} … {} ({} requests)",
            fmt(&list[..3]),
            fmt(&list[list.len() - 2..]),
            list.len()
        )
    }
}

fn print_loss_report(st: &Root) {
    section("3. kill, loss report, restart");
    let Some(k) = &st.kill else {
        println!("no worker was killed (--no-kill, or the kill point is past the last request)");
        return;
    };
    let victim = &st.members[k.worker];
    let parent = st.name_of(victim.parent);
    let old = k.old_pid;
    if st.args.hang_ms > 0 {
        println!(
            "{} (pid {old}) hung right after request #{} (SIGSTOP: it reads and acknowledges \
             nothing), then SIGKILL {} ms later.",
            victim.name, k.after_req, st.args.hang_ms
        );
        println!(
            "The root went on sending to it in turn (it cannot tell a hung worker from a slow \
             one) until its requests filled the window."
        );
    } else {
        println!(
            "{} (pid {old}) killed with SIGKILL right after request #{}.",
            victim.name, k.after_req
        );
    }
    for e in &k.exits {
        if let Wire::ChildExit {
            pid, status, next, ..
        } = e
        {
            println!("{parent}'s supervisor reaped pid {pid}: {status}; {next}.");
        }
    }
    for p in &k.peer_lost {
        let Wire::PeerLost {
            peer, cause, lost, ..
        } = p
        else {
            continue;
        };
        let what = if lost.is_empty() {
            "an empty lost list (nothing was queued for it or written and unacknowledged)"
                .to_owned()
        } else {
            format!("its lost list: {} envelopes, whole", lost.len())
        };
        println!("{parent} saw its link to pid {peer} go down ({cause}) and handed over {what}.");
        let mut by: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        for l in lost {
            let key = format!("{} from {}", l.what, st.name_of(l.origin));
            by.entry((key, l.reason.clone())).or_default().extend(l.req);
        }
        for ((what, reason), list) in by {
            println!(
                "    {what}, {reason}{}{}",
                if list.is_empty() { "" } else { ": " },
                ids(&list)
            );
        }
    }
    if k.exits.is_empty() || k.peer_lost.is_empty() || k.restarted.is_none() {
        println!("(the supervisor's reports did not all arrive within 3 s)");
    }
    // The supervisor's lost list and the root's receipts must name the same requests.
    let listed: BTreeSet<u64> = k
        .peer_lost
        .iter()
        .flat_map(|p| match p {
            Wire::PeerLost { lost, .. } => lost.iter().filter_map(|l| l.req).collect(),
            _ => Vec::new(),
        })
        .collect();
    let told: BTreeSet<u64> = (0..st.reqs.len() as u64)
        .filter(|&i| {
            matches!(st.reqs[i as usize].outcome,
                Outcome::Lost(
                    Fate::Lost(LossReason::NeverWritten | LossReason::PartiallyWritten)
                        | Fate::Unknown(UnknownReason::Unacknowledged),
                    at,
                ) if at == victim.parent)
        })
        .collect();
    if listed == told && !listed.is_empty() {
        println!(
            "{parent}'s lost list and the root's loss reports \"at {parent}: peer down\" name the \
             same {} requests ✓",
            listed.len()
        );
    } else if listed != told {
        // "Written, not acknowledged" is an upper bound: the worker may have taken one and
        // answered before it died; the receipt then says delivered, and the reply arrives.
        let answered: Vec<u64> = listed
            .iter()
            .copied()
            .filter(|&i| st.reqs[i as usize].outcome == Outcome::Replied)
            .collect();
        println!(
            "{parent}'s lost list names {} requests, the root's reports \"at {parent}: peer \
             down\" {}; answered after all (taken before it died, unacknowledged): {}",
            listed.len(),
            told.len(),
            ids(&answered)
        );
    }
    if let Some(Wire::Restarted {
        new,
        generation,
        down_us,
        ..
    }) = &k.restarted
    {
        println!(
            "{parent}'s supervisor restarted it: {} is pid {new} now (its {} process), ready \
             {:.1} ms after the old one was reaped, on model v{} (the version {parent} held \
             when it forked it).",
            victim.name,
            ordinal(*generation),
            *down_us as f64 / 1e3,
            victim.born
        );
    } else if k.back_at.is_none() {
        println!("{} did not come back in time.", victim.name);
    }
    if let (Some(held), Some(back)) = (k.held_at, k.back_at) {
        println!(
            "The root kept its last {} requests back from request #{held} until it was back \
             ({:.1} ms after the kill), so that its new process serves some of them.",
            st.args.requests - held,
            back.duration_since(k.at).as_secs_f64() * 1e3
        );
    }
    println!(
        "At the root, exactly one outcome per request sent to {} from its first loss on \
         (receipts):",
        victim.name
    );
    // From the first request it did not answer (some sent before the kill may be among them).
    let first = st
        .reqs
        .iter()
        .position(|r| r.worker == k.worker && r.outcome != Outcome::Replied)
        .map_or(k.after_req as usize, |p| p.min(k.after_req as usize));
    let mut by: Vec<(String, Vec<u64>)> = Vec::new();
    for (i, r) in st.reqs.iter().enumerate().skip(first) {
        if r.worker != k.worker {
            continue;
        }
        let mut outcome = match &r.outcome {
            Outcome::Replied if r.replied_by == old => {
                format!("replied by pid {old} before it died (model v{})", r.version)
            }
            Outcome::Replied => format!(
                "replied by its new process, pid {} (model v{})",
                r.replied_by, r.version
            ),
            Outcome::Lost(reason, at) => format!("lost at {}: {reason}", st.name_of(*at)),
            Outcome::ReplyLost => format!("delivered to pid {old}, the reply died with it"),
            other => format!("{other:?}"),
        };
        if k.down_probe == Some(i as u64) {
            outcome.push_str(" (by name, while no process held the name)");
        } else if k.stale_probe == Some(i as u64) {
            outcome.push_str(&format!(" (by the old pid {old}, after the restart)"));
        }
        match by.iter_mut().find(|(o, _)| *o == outcome) {
            Some((_, list)) => list.push(i as u64),
            None => by.push((outcome, vec![i as u64])),
        }
    }
    for (outcome, list) in by {
        println!("    {outcome}: {}", ids(&list));
    }
}

fn print_traces(st: &Root) {
    section("4. routing traces");
    let traced: Vec<(usize, &Request)> = st
        .reqs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.traced)
        .collect();
    if traced.is_empty() {
        println!("no request was traced (--trace-every 0)");
        return;
    }
    println!(
        "every {}th request carries a trace: each hop records node, the link it came in on (that \
         node's link index) and the time (CLOCK_MONOTONIC, shared by the tree), shown in µs after \
         the send.",
        st.args.trace_every
    );
    for (i, r) in traced.into_iter().take(6) {
        let head = format!("request #{i} → {}", target(st, r));
        let Outcome::Replied = r.outcome else {
            println!(
                "{head}: {:?} — a lost envelope brings no trace back",
                r.outcome
            );
            continue;
        };
        println!(
            "{head}: model v{}, round trip {} µs",
            r.version,
            us(r.latency_ns)
        );
        let t0 = r.request_trace.first().map_or(r.sent_ns, |h| h.at_ns);
        let legs = [("request", &r.request_trace), ("reply", &r.reply_trace)];
        for (leg, trace) in legs {
            for (n, h) in trace.iter().enumerate() {
                let how = match (n, h.link) {
                    (0, _) => format!("{leg} leaves"),
                    (_, Some(l)) => format!("in on link #{l}"),
                    (_, None) => "in".to_owned(),
                };
                println!(
                    "    {:>9} µs  {:<12} pid {:<7} {how}",
                    format!("+{}", us(h.at_ns.saturating_sub(t0))),
                    st.name_of(h.pid),
                    h.pid
                );
            }
        }
    }
}

fn tree_picture(st: &Root) -> String {
    let mut out = String::new();
    let root_pid = std::process::id();
    let _ = writeln!(out, "root  pid {root_pid}");
    let shards: Vec<&Member> = st
        .members
        .iter()
        .filter(|m| m.role == Role::Supervisor)
        .collect();
    for (si, s) in shards.iter().enumerate() {
        let last_s = si + 1 == shards.len();
        let _ = writeln!(
            out,
            "{} {}  pid {}  supervisor",
            if last_s { "└─" } else { "├─" },
            s.name,
            s.pid
        );
        let workers: Vec<&Member> = st
            .members
            .iter()
            .filter(|m| m.role == Role::Worker && m.parent == s.pid)
            .collect();
        for (wi, w) in workers.iter().enumerate() {
            let branch = if wi + 1 == workers.len() {
                "└─"
            } else {
                "├─"
            };
            let state = if w.alive {
                format!("model v{}", w.born + w.switches)
            } else {
                "✗ killed".to_owned()
            };
            let pids = match w.old_pid {
                Some(old) => format!("{old} → {}", w.pid),
                None => w.pid.to_string(),
            };
            let mut notes = Vec::new();
            if w.lost > 0 {
                notes.push(format!("lost {}", w.lost));
            }
            if let Some(old) = w.old_pid {
                let new = st
                    .reqs
                    .iter()
                    .filter(|r| r.outcome == Outcome::Replied && r.replied_by == w.pid)
                    .count();
                notes.push(format!(
                    "restarted: pid {old} killed, pid {} served {new}",
                    w.pid
                ));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            };
            let _ = writeln!(
                out,
                "{}{branch} {:<10} pid {:<15} {:<9} replies {:>4} (v1 {:>4}, v2 {:>4}){notes}",
                if last_s { "   " } else { "│  " },
                w.name,
                pids,
                state,
                w.replies[0] + w.replies[1],
                w.replies[0],
                w.replies[1]
            );
        }
    }
    out
}

/// The summary's lines on the restart; returns whether its checks held.
fn print_restart(st: &Root, bus: &Bus) -> bool {
    let Some(k) = &st.kill else {
        return true;
    };
    let m = &st.members[k.worker];
    let old = k.old_pid;
    let Some(back) = k.back_at.filter(|_| m.old_pid.is_some()) else {
        println!(
            "restart    {}: pid {old} killed after request #{}; NOT BACK ✗",
            m.name, k.after_req
        );
        return false;
    };
    println!(
        "restart    {}: pid {old} killed after request #{}; restarted by {}'s supervisor as \
         pid {}, up {:.1} ms after the kill, on model v{}",
        m.name,
        k.after_req,
        st.name_of(m.parent),
        m.pid,
        back.duration_since(k.at).as_secs_f64() * 1e3,
        m.born
    );
    let resolves = bus
        .router()
        .resolve(&to::name(m.name.clone()))
        .map(|n| n.pid);
    let old_gone = bus
        .router()
        .resolve(&to::pid(forkbus::Pid::from_raw(old)))
        .is_none();
    let name_ok = resolves == Some(m.pid) && old_gone;
    println!(
        "           the name {:?} now resolves to pid {} at the root {}; pid {old} to {}",
        m.name,
        resolves.map_or_else(|| "nothing".to_owned(), |p| p.to_string()),
        if name_ok { "✓" } else { "✗" },
        if old_gone { "nothing" } else { "a node still" }
    );
    // Its requests that were not answered, by which process and why.
    let mut killed: BTreeMap<String, u64> = BTreeMap::new();
    let mut probes = Vec::new();
    for (i, r) in st.reqs.iter().enumerate() {
        let reason = match &r.outcome {
            _ if r.worker != k.worker => continue,
            Outcome::Lost(reason, _) => reason.to_string(),
            Outcome::ReplyLost => "reply died with the worker".to_owned(),
            _ => continue,
        };
        let i = i as u64;
        if k.down_probe == Some(i) {
            probes.push(format!("to the name while it was down: 1 ({reason})"));
        } else if k.stale_probe == Some(i) {
            probes.push(format!("to the old pid after the restart: 1 ({reason})"));
        } else {
            *killed.entry(reason).or_default() += 1;
        }
    }
    let reasons: Vec<String> = killed.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    probes.insert(
        0,
        format!(
            "lost with pid {old}: {} — {}",
            killed.values().sum::<u64>(),
            reasons.join(", ")
        ),
    );
    println!("           {}", probes.join("; "));
    let to_new: Vec<&Request> = st.reqs.iter().filter(|r| r.pid == m.pid).collect();
    let served = to_new
        .iter()
        .filter(|r| r.outcome == Outcome::Replied && r.replied_by == m.pid)
        .count();
    let v2 = to_new
        .iter()
        .filter(|r| r.outcome == Outcome::Replied && r.version == 2)
        .count();
    let served_ok = served == to_new.len();
    if to_new.is_empty() {
        println!(
            "           replies from the new pid {}: none, no request was left to send to it",
            m.pid
        );
        return name_ok;
    }
    println!(
        "           replies from the new pid {}: {served} of the {} requests sent to it (model \
         v2 {v2}) {}",
        m.pid,
        to_new.len(),
        if served_ok { "✓" } else { "✗" }
    );
    name_ok && served_ok
}

/// Prints the summary; returns whether every check held.
fn print_summary(st: &Root, bus: &Bus, tree_up: Duration) -> bool {
    section("5. summary");
    let sent = st.reqs.len() as u64;
    let replied = st
        .reqs
        .iter()
        .filter(|r| r.outcome == Outcome::Replied)
        .count() as u64;
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for r in &st.reqs {
        match &r.outcome {
            Outcome::Lost(reason, _) => *by_reason.entry(reason.to_string()).or_default() += 1,
            Outcome::ReplyLost => {
                *by_reason
                    .entry("reply died with the worker".into())
                    .or_default() += 1
            }
            _ => {}
        }
    }
    let lost: u64 = by_reason.values().sum();
    let by_name = st.reqs.iter().filter(|r| r.by_name).count();
    let v2 = st
        .reqs
        .iter()
        .filter(|r| r.outcome == Outcome::Replied && r.version == 2)
        .count();
    let mut lat: Vec<u64> = st
        .reqs
        .iter()
        .filter(|r| r.outcome == Outcome::Replied)
        .map(|r| r.latency_ns)
        .collect();
    lat.sort_unstable();
    let balanced = sent == replied + lost;
    let live_workers: Vec<&Member> = st
        .members
        .iter()
        .filter(|m| m.role == Role::Worker && m.alive)
        .collect();
    // Each live process holds v2 once: switched once, or started on v2 (a restart after the
    // broadcast).
    let switched_once = live_workers
        .iter()
        .filter(|m| m.born == 1 && m.switches == 1)
        .count();
    let born_v2: Vec<&str> = live_workers
        .iter()
        .filter(|m| m.born == 2 && m.switches == 0)
        .map(|m| m.name.as_str())
        .collect();
    let switch_ok = st.switch_at.is_none() || switched_once + born_v2.len() == live_workers.len();
    let secs = match (st.started, st.finished) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    println!(
        "requests   {sent} sent ({} by pid, {by_name} by name), at most {} in flight, each with a receipt",
        sent - by_name as u64,
        st.args.window
    );
    println!(
        "replies    {replied} (model v1 {}, v2 {v2}); version as expected {}/{replied}; \
         checked against the root's copy of the model {}/{replied}",
        replied - v2 as u64,
        replied - st.wrong_version,
        st.checked
    );
    let reasons: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    println!(
        "lost       {lost}{}",
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" — {}", reasons.join(", "))
        }
    );
    println!(
        "balance    sent {sent} = replied {replied} + lost {lost}  {}",
        if balanced {
            "✓"
        } else {
            "✗ DOES NOT BALANCE"
        }
    );
    let restart_ok = print_restart(st, bus);
    println!(
        "latency    send → reply: p50 {} µs, p99 {} µs, max {} µs{}",
        us(percentile(&lat, 50.0)),
        us(percentile(&lat, 99.0)),
        us(lat.last().copied().unwrap_or(0)),
        if st.args.window > 1 {
            format!(
                " ({} in flight: mostly queueing; --window 1 shows a bare round trip)",
                st.args.window
            )
        } else {
            String::new()
        }
    );
    match st.switch_at {
        Some(at) if at != u64::MAX => println!(
            "switch     \"load model version 2\" broadcast once, before request #{at}; \
             {}/{} on v2: {switched_once} live workers switched, each exactly once{}{}",
            switched_once + born_v2.len(),
            live_workers.len(),
            if born_v2.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} restarted after it and started on v2",
                    born_v2.join(", ")
                )
            },
            if st.broadcast_lost.is_empty() {
                String::new()
            } else {
                format!(" (the broadcast was {})", st.broadcast_lost.join(", "))
            }
        ),
        _ => println!("switch     no broadcast"),
    }
    println!(
        "time       tree up in {:.1} ms; {sent} requests in {secs:.3} s ({:.0}/s)",
        tree_up.as_secs_f64() * 1e3,
        sent as f64 / secs.max(1e-9)
    );
    println!();
    print!("{}", tree_picture(st));
    for a in &st.anomalies {
        println!("anomaly: {a}");
    }
    let ok = balanced
        && st.wrong_version == 0
        && st.wrong_model == 0
        && switch_ok
        && restart_ok
        && st.refused == 0
        && st.anomalies.is_empty();
    if !ok {
        println!(
            "CHECKS FAILED: balanced {balanced}, wrong versions {}, wrong answers {}, \
             switches ok {switch_ok}, restart ok {restart_ok}, refused {}",
            st.wrong_version, st.wrong_model, st.refused
        );
    }
    ok
}
