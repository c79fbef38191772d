//! The prefork HTTP example (`examples/prefork_http.rs`) as a real program under load: no
//! failed request under keep-alive load, none through a `SIGHUP` rolling reload (and every
//! worker pid changes), none while workers recycle after a small request limit; `SIGTERM`
//! finishes a request in flight and the server exits 0 leaving nothing behind; HTTP
//! details (pipelining, `Connection: close`, HTTP/1.0, limits, backpressure with partial
//! writes). Prints requests per second of a short run (no speed is asserted).
//!
//! The server's binary is found (or built) as `tests/examples.rs` does. Each scenario runs
//! in a forked process of its own under a deadline (`tests/common`), starts the server in a
//! process group of its own, reads its `listening on` line and loads it from client
//! threads (the scenario's process never forks after starting them). A client is strict:
//! a refused or reset connection, a request without a response, a truncated or wrong
//! response are all failures. It reconnects only after a response that said
//! `Connection: close`, or when it sees, before writing a request, that the server closed
//! the idle connection (counted and printed; a request is never sent on it).
//! The last line is `N passed, M failed`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{ensure, Harness};
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid as NixPid;

/// The workspace root (the facade crate's manifest directory).
/// Per scenario (a loaded 2-core machine, a debug build).
const DEADLINE: Duration = Duration::from_secs(120);
/// A response slower than this is a failure.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The binary (as tests/examples.rs finds it).

// ---------------------------------------------------------------------------------------
// The server as a child process.

struct Server {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    /// Every line it printed so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts it in a process group of its own and waits for its address.
    fn start(bin: &Path, args: &[&str]) -> Result<Self, String> {
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new(bin)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .process_group(0)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?
        };
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut l) = keep.lock() {
                    l.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines,
            log,
        };
        let line = server.wait_for(|l| l.starts_with("listening on "), Duration::from_secs(30))?;
        server.addr = line["listening on ".len()..]
            .parse()
            .map_err(|e| format!("bad address in {line:?}: {e}"))?;
        Ok(server)
    }

    fn pid(&self) -> NixPid {
        NixPid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    /// The next line that matches, waiting at most `limit`.
    fn wait_for(&self, what: impl Fn(&str) -> bool, limit: Duration) -> Result<String, String> {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if what(&line) => return Ok(line),
                Ok(_) => {}
                Err(_) => return Err(format!("no such line within {limit:?}")),
            }
        }
    }

    fn signal(&self, signal: Signal) -> Result<(), String> {
        kill(self.pid(), signal).map_err(|e| format!("kill {signal}: {e}"))
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Sends `SIGTERM`; the server must exit 0 within `limit` and leave its process group
    /// empty.
    fn terminate(mut self, limit: Duration) -> Result<(), String> {
        self.signal(Signal::SIGTERM)?;
        let end = Instant::now() + limit;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() > end => {
                    return Err(format!("not gone {limit:?} after SIGTERM"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("wait: {e}")),
            }
        };
        ensure(status.success(), || format!("SIGTERM: the server {status}"))?;
        // Its workers were its children, reaped before it exited: the group is empty.
        let left = killpg(self.pid(), None::<Signal>);
        ensure(left == Err(Errno::ESRCH), || {
            format!("processes left in the server's group: {left:?}")
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = killpg(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// A strict keep-alive client.

/// One parsed response.
#[derive(Debug)]
struct Response {
    status: u16,
    close: bool,
    keep_alive: bool,
    body: String,
}

/// A connection and the bytes read from it beyond the last response.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// Whether the server closed this idle connection (end of file waiting, nothing sent).
    fn closed_by_peer(&mut self) -> Result<bool, String> {
        if !self.buf.is_empty() {
            return Err(format!("{} unexpected bytes", self.buf.len()));
        }
        self.stream
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let mut one = [0u8; 1];
        let seen = self.stream.peek(&mut one);
        self.stream
            .set_nonblocking(false)
            .map_err(|e| e.to_string())?;
        match seen {
            Ok(0) => Ok(true),
            Ok(_) => Err("unexpected bytes on an idle connection".into()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(format!("idle connection: {e}")),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("write: {e}"))
    }

    /// Reads one response. `Err((bad, why))`: `bad` when bytes of a response arrived but
    /// not a whole, well-formed one (otherwise nothing came).
    fn response(&mut self) -> Result<Response, (bool, String)> {
        loop {
            let parsed = {
                let mut headers = [httparse::EMPTY_HEADER; 16];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let mut length = None;
                        let (mut close, mut keep_alive) = (false, false);
                        for h in resp.headers.iter() {
                            if h.name.eq_ignore_ascii_case("content-length") {
                                length = std::str::from_utf8(h.value)
                                    .ok()
                                    .and_then(|v| v.trim().parse::<usize>().ok());
                            } else if h.name.eq_ignore_ascii_case("connection") {
                                close = h.value.eq_ignore_ascii_case(b"close");
                                keep_alive = h.value.eq_ignore_ascii_case(b"keep-alive");
                            }
                        }
                        let length = length.ok_or((true, "no Content-Length".to_string()))?;
                        Some((len, length, resp.code.unwrap_or(0), close, keep_alive))
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(e) => return Err((true, format!("bad response: {e}"))),
                }
            };
            if let Some((head, length, status, close, keep_alive)) = parsed {
                if self.buf.len() >= head + length {
                    let body = String::from_utf8_lossy(&self.buf[head..head + length]).into();
                    self.buf.drain(..head + length);
                    return Ok(Response {
                        status,
                        close,
                        keep_alive,
                        body,
                    });
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => {
                    return Err((false, "closed without a response".into()))
                }
                Ok(0) => {
                    return Err((true, format!("closed after {} bytes", self.buf.len())));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err((!self.buf.is_empty(), format!("read: {e}"))),
            }
        }
    }
}

/// The worker pid in a body `hello from worker PID request N`.
fn body_pid(body: &str) -> Option<u32> {
    body.strip_prefix("hello from worker ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The request number in such a body.
fn body_number(body: &str) -> Option<u64> {
    body.trim_end().rsplit(' ').next()?.parse().ok()
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Outcome {
    ok: u64,
    /// (phase when the request was sent or the connection opened, what happened,
    /// whether a malformed or truncated response was seen).
    failures: Vec<(u8, String, bool)>,
    /// Worker pids that answered, by the phase their request was sent in.
    pids: BTreeMap<u8, BTreeSet<u32>>,
    /// Reconnections after a `Connection: close` response.
    closes: u64,
    /// Idle connections found closed by the server before a request was written.
    idle_closed: u64,
}

impl Outcome {
    fn merge(&mut self, other: Self) {
        self.ok += other.ok;
        self.failures.extend(other.failures);
        for (phase, pids) in other.pids {
            self.pids.entry(phase).or_default().extend(pids);
        }
        self.closes += other.closes;
        self.idle_closed += other.idle_closed;
    }

    fn all_pids(&self) -> BTreeSet<u32> {
        self.pids.values().flatten().copied().collect()
    }

    fn no_failures(&self) -> Result<(), String> {
        ensure(self.failures.is_empty(), || {
            let some: Vec<_> = self.failures.iter().take(5).collect();
            format!(
                "{} failed requests ({} ok), e.g. {some:?}",
                self.failures.len(),
                self.ok
            )
        })
    }
}

/// Client threads, and what they share with the scenario.
struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicU8>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Outcome>>,
    started: Instant,
}

impl Load {
    /// `clients` threads, each sending up to `requests` requests over keep-alive
    /// connections, until stopped or `limit` passed. With `stop_at_failure`, a client ends
    /// at its first failure.
    fn start(
        addr: SocketAddr,
        clients: usize,
        requests: u64,
        limit: Duration,
        stop_at_failure: bool,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU8::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + limit;
        let threads = (0..clients)
            .map(|_| {
                let (stop, phase, ok) = (stop.clone(), phase.clone(), ok.clone());
                std::thread::spawn(move || {
                    client(addr, requests, end, &stop, &phase, &ok, stop_at_failure)
                })
            })
            .collect();
        Self {
            stop,
            phase,
            ok,
            threads,
            started: Instant::now(),
        }
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Waits until `n` more requests succeeded (or `limit` passed).
    fn wait_ok(&self, n: u64, limit: Duration) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        let end = Instant::now() + limit;
        while self.ok.load(Ordering::SeqCst) < target && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the clients (or lets them finish) and adds up what they saw.
    fn finish(self, stop: bool) -> (Outcome, Duration) {
        if stop {
            self.stop.store(true, Ordering::SeqCst);
        }
        let mut all = Outcome::default();
        for t in self.threads {
            match t.join() {
                Ok(o) => all.merge(o),
                Err(_) => all.failures.push((0, "a client panicked".into(), true)),
            }
        }
        (all, self.started.elapsed())
    }
}

fn client(
    addr: SocketAddr,
    requests: u64,
    end: Instant,
    stop: &AtomicBool,
    phase: &AtomicU8,
    ok: &AtomicU64,
    stop_at_failure: bool,
) -> Outcome {
    let mut out = Outcome::default();
    let mut conn: Option<Conn> = None;
    let mut sent = 0;
    while sent < requests && !stop.load(Ordering::SeqCst) && Instant::now() < end {
        let now_phase = phase.load(Ordering::SeqCst);
        let fail = |out: &mut Outcome, why: String, bad: bool| {
            if out.failures.len() < 1000 {
                out.failures.push((now_phase, why, bad));
            }
        };
        let c = match conn.as_mut() {
            Some(c) => match c.closed_by_peer() {
                Ok(false) => c,
                Ok(true) => {
                    out.idle_closed += 1;
                    conn = None;
                    continue;
                }
                Err(e) => {
                    fail(&mut out, e, true);
                    conn = None;
                    if stop_at_failure {
                        break;
                    }
                    continue;
                }
            },
            None => match Conn::open(addr) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    fail(&mut out, e, false);
                    if stop_at_failure {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let request = format!("GET /{sent} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        sent += 1;
        let result = c
            .send(request.as_bytes())
            .map_err(|e| (false, e))
            .and_then(|()| c.response());
        match result {
            Ok(r) if r.status == 200 && body_pid(&r.body).is_some() => {
                out.ok += 1;
                ok.fetch_add(1, Ordering::SeqCst);
                if let Some(pid) = body_pid(&r.body) {
                    out.pids.entry(now_phase).or_default().insert(pid);
                }
                if r.close {
                    out.closes += 1;
                    conn = None;
                }
            }
            Ok(r) => {
                fail(&mut out, format!("unexpected response {r:?}"), true);
                conn = None;
                if stop_at_failure {
                    break;
                }
            }
            Err((bad, why)) => {
                fail(&mut out, why, bad);
                conn = None;
                if stop_at_failure {
                    break;
                }
            }
        }
    }
    out
}

/// Pids in lines `worker PID <word>` with this word.
fn pids_with(log: &[String], word: &str) -> BTreeSet<u32> {
    log.iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("worker ")?;
            let (pid, what) = rest.split_once(' ')?;
            what.starts_with(word).then(|| pid.parse().ok()).flatten()
        })
        .collect()
}

/// Waits for `n` workers to be ready; their pids.
fn ready_workers(server: &Server, n: usize) -> Result<BTreeSet<u32>, String> {
    let mut ready = BTreeSet::new();
    while ready.len() < n {
        let line = server.wait_for(|l| l.ends_with(" ready"), Duration::from_secs(30))?;
        if let Some(pid) = pids_with(&[line], "ready").into_iter().next() {
            ready.insert(pid);
        }
    }
    Ok(ready)
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// 1. Keep-alive load: every request answered; the stats broadcast adds up to it.
fn load_and_stats(bin: &Path) -> Result<(), String> {
    let server = Server::start(
        bin,
        &[
            "--workers",
            "4",
            "--max-requests",
            "0",
            "--stats-every",
            "200",
        ],
    )?;
    let workers = ready_workers(&server, 4)?;
    let load = Load::start(server.addr, 4, 1000, Duration::from_secs(60), false);
    let (out, took) = load.finish(false);
    out.no_failures()?;
    ensure(out.ok == 4000, || format!("{} requests answered", out.ok))?;
    ensure(out.all_pids().is_subset(&workers), || {
        format!("answers from {:?}, workers {workers:?}", out.all_pids())
    })?;
    // A stats round sent after the load: its answers add up to every request.
    let mut rounds: BTreeMap<u64, Vec<(u32, u64)>> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let line = server
            .wait_for(|l| l.starts_with("stats #"), left)
            .map_err(|e| format!("no stats round adding up to 4000: {rounds:?}: {e}"))?;
        // stats #R: worker PID requests N connections C
        let words: Vec<&str> = line.split_whitespace().collect();
        let parsed = (|| {
            let round = words.get(1)?.trim_start_matches('#').trim_end_matches(':');
            Some((
                round.parse::<u64>().ok()?,
                words.get(3)?.parse::<u32>().ok()?,
                words.get(5)?.parse::<u64>().ok()?,
            ))
        })();
        let (round, pid, requests) = parsed.ok_or(format!("bad stats line {line:?}"))?;
        let r = rounds.entry(round).or_default();
        r.push((pid, requests));
        if r.len() == workers.len() {
            let pids: BTreeSet<u32> = r.iter().map(|(p, _)| *p).collect();
            ensure(pids == workers, || format!("stats from {pids:?}"))?;
            if r.iter().map(|(_, n)| n).sum::<u64>() == 4000 {
                println!(
                    "    4000 requests in {took:.2?} over 4 keep-alive clients; stats #{round}: {r:?}"
                );
                break;
            }
        }
    }
    server.terminate(Duration::from_secs(30))
}

/// 2. HTTP details: pipelining, `Connection: close`, HTTP/1.0, HEAD, limits, and a
///    pipelined flood read late (the server's writes are partial and resumed).
fn http_semantics(bin: &Path) -> Result<(), String> {
    let server = Server::start(
        bin,
        &[
            "--workers",
            "2",
            "--max-requests",
            "0",
            "--stats-every",
            "0",
        ],
    )?;
    ready_workers(&server, 2)?;
    let addr = server.addr;
    let get = |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
    let at_eof = |c: &mut Conn| {
        let mut b = [0u8; 1];
        matches!(c.stream.read(&mut b), Ok(0))
    };
    let fail = |(_, e): (bool, String)| e;

    // Three pipelined requests in one write: three answers, in order, the last closing.
    let mut c = Conn::open(addr)?;
    c.send(
        format!(
            "{}{}{}",
            get("/a", ""),
            get("/b", ""),
            get("/c", "Connection: close\r\n")
        )
        .as_bytes(),
    )?;
    let rs: Vec<Response> = (0..3)
        .map(|_| c.response().map_err(fail))
        .collect::<Result<_, _>>()?;
    let numbers: Vec<Option<u64>> = rs.iter().map(|r| body_number(&r.body)).collect();
    ensure(
        rs.iter().all(|r| r.status == 200)
            && numbers
                .windows(2)
                .all(|w| matches!(w, [Some(a), Some(b)] if b == &(a + 1)))
            && !rs[0].close
            && !rs[1].close
            && rs[2].close,
        || format!("pipelined: {rs:?}"),
    )?;
    ensure(at_eof(&mut c), || "open after Connection: close".into())?;

    // HTTP/1.0 without keep-alive closes; with it, stays open. HEAD has no body.
    let mut c = Conn::open(addr)?;
    c.send(b"GET / HTTP/1.0\r\n\r\n")?;
    let r = c.response().map_err(fail)?;
    ensure(r.status == 200 && r.close && at_eof(&mut c), || {
        format!("1.0: {r:?}")
    })?;
    let mut c = Conn::open(addr)?;
    c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let r = c.response().map_err(fail)?;
    ensure(r.status == 200 && !r.close && r.keep_alive, || {
        format!("1.0 keep-alive: {r:?}")
    })?;
    while !c.buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 256];
        match c.stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err("HEAD: no complete answer".into()),
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&c.buf);
    ensure(
        text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\n"),
        || format!("HEAD: {text:?}"),
    )?;

    // Limits: a head over 8 KiB gets 431, garbage 400, a chunked body 501, a large one
    // 413; each then closes.
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}", "a".repeat(9000));
    for (request, code) in [
        (big, 431),
        ("BL\u{1}AH / HTTP/1.1\r\n\r\n".to_string(), 400),
        (get("/", "Transfer-Encoding: chunked\r\n"), 501),
        (get("/", "Content-Length: 100000\r\n"), 413),
    ] {
        let mut c = Conn::open(addr)?;
        c.send(request.as_bytes())?;
        let r = c.response().map_err(fail)?;
        ensure(r.status == code && r.close && at_eof(&mut c), || {
            format!("expected {code}: {r:?}")
        })?;
    }

    // A body is read and skipped; the next request on the connection is answered.
    let mut c = Conn::open(addr)?;
    c.send(
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello{}",
            get("/", "")
        )
        .as_bytes(),
    )?;
    for _ in 0..2 {
        let r = c.response().map_err(fail)?;
        ensure(r.status == 200, || format!("after a body: {r:?}"))?;
    }

    // A flood of 5000 pipelined requests, read only after a pause: the answers (~250 KB)
    // outgrow the socket buffers, so the worker pauses reading and resumes partial writes.
    let n = 5000u64;
    let c = Conn::open(addr)?;
    let mut writer = c.stream.try_clone().map_err(|e| e.to_string())?;
    let flood: String = (0..n).map(|i| get(&format!("/{i}"), "")).collect();
    let w = std::thread::spawn(move || writer.write_all(flood.as_bytes()));
    std::thread::sleep(Duration::from_millis(500));
    let mut c = c;
    let mut last = None;
    for i in 0..n {
        let r = c
            .response()
            .map_err(|(_, e)| format!("flood answer {i}: {e}"))?;
        let num = body_number(&r.body);
        ensure(r.status == 200 && num.is_some(), || format!("flood: {r:?}"))?;
        if let (Some(prev), Some(num)) = (last, num) {
            ensure(num == prev + 1, || {
                format!("flood answer {i}: {num} after {prev}")
            })?;
        }
        last = num;
    }
    w.join()
        .map_err(|_| "the flood writer panicked".to_string())?
        .map_err(|e| format!("flood write: {e}"))?;
    println!("    pipelining, Connection: close, HTTP/1.0, HEAD, 431/400/501/413, {n} pipelined requests read late: ok");
    server.terminate(Duration::from_secs(30))
}

/// 3. `SIGHUP` in the middle of keep-alive load: no failed request, every worker replaced.
fn sighup_reload(bin: &Path) -> Result<(), String> {
    let server = Server::start(
        bin,
        &[
            "--workers",
            "4",
            "--max-requests",
            "0",
            "--stats-every",
            "0",
        ],
    )?;
    let before = ready_workers(&server, 4)?;
    let load = Load::start(server.addr, 4, u64::MAX, Duration::from_secs(90), false);
    load.wait_ok(500, Duration::from_secs(20));
    load.set_phase(1);
    server.signal(Signal::SIGHUP)?;
    let done = server.wait_for(
        |l| l.starts_with("reload finished"),
        Duration::from_secs(60),
    );
    // Requests sent from now on must reach new workers only.
    load.set_phase(2);
    load.wait_ok(500, Duration::from_secs(20));
    let (out, took) = load.finish(true);
    let done = done?;
    out.no_failures()?;
    ensure(done == "reload finished: 4 replaced, 0 failed", || {
        done.clone()
    })?;
    let log = server.log();
    let exited_ok = pids_with(&log, "exited with code 0");
    ensure(before.is_subset(&exited_ok), || {
        format!("old workers {before:?}, exited with 0: {exited_ok:?}")
    })?;
    let after = out.pids.get(&2).cloned().unwrap_or_default();
    ensure(!after.is_empty() && after.is_disjoint(&before), || {
        format!("after the reload, answers from {after:?}; old workers {before:?}")
    })?;
    let during = out.pids.get(&1).cloned().unwrap_or_default();
    println!(
        "    {} requests in {took:.2?}, 0 failed; workers {before:?} → {after:?} \
         ({} answering during the reload); {} reconnects after Connection: close, {} idle \
         closes",
        out.ok,
        during.len(),
        out.closes,
        out.idle_closed
    );
    server.terminate(Duration::from_secs(30))
}

/// 4. Recycling after a small request limit under load: no failed request.
fn recycling(bin: &Path) -> Result<(), String> {
    let server = Server::start(
        bin,
        &[
            "--workers",
            "3",
            "--max-requests",
            "150",
            "--jitter",
            "50",
            "--stats-every",
            "0",
        ],
    )?;
    let first = ready_workers(&server, 3)?;
    let load = Load::start(server.addr, 4, 1000, Duration::from_secs(90), false);
    let (out, took) = load.finish(false);
    out.no_failures()?;
    ensure(out.ok == 4000, || format!("{} requests answered", out.ok))?;
    let pids = out.all_pids();
    // 4000 requests at most 200 each: at least 20 processes served (the first 3 included).
    ensure(pids.len() >= 8 && !pids.is_disjoint(&first), || {
        format!("answers from {} workers: {pids:?}", pids.len())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let log = server.log();
    let recycled = pids_with(&log, "recycling after");
    let killed = pids_with(&log, "killed");
    let exited = pids_with(&log, "exited");
    let exited_ok = pids_with(&log, "exited with code 0");
    ensure(
        recycled.len() >= 5 && killed.is_empty() && exited == exited_ok,
        || format!("recycled {recycled:?}, killed {killed:?}, exits {exited:?} (0: {exited_ok:?})"),
    )?;
    println!(
        "    {} requests in {took:.2?}, 0 failed, answered by {} worker processes ({} recycled); {} reconnects after Connection: close",
        out.ok,
        pids.len(),
        recycled.len(),
        out.closes
    );
    server.terminate(Duration::from_secs(30))
}

/// 5. `SIGTERM` during load: a request in flight is finished, the server exits 0 and its
///    group is empty; no response is ever truncated or malformed.
fn sigterm(bin: &Path) -> Result<(), String> {
    let server = Server::start(
        bin,
        &[
            "--workers",
            "2",
            "--max-requests",
            "0",
            "--stats-every",
            "0",
        ],
    )?;
    ready_workers(&server, 2)?;
    // A connection a worker has accepted (it answered), then half a request.
    let mut slow = Conn::open(server.addr)?;
    slow.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")?;
    slow.response().map_err(|(_, e)| e)?;
    slow.send(b"GET /late HTTP/1.1\r\nHost: x\r\n")?;
    let load = Load::start(server.addr, 2, u64::MAX, Duration::from_secs(60), true);
    load.wait_ok(300, Duration::from_secs(20));
    load.set_phase(1);
    let pid = server.pid();
    kill(pid, Signal::SIGTERM).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    // The rest of the request in flight: answered, and the connection closed after it.
    slow.send(b"\r\n")?;
    let late = slow
        .response()
        .map_err(|(_, e)| format!("the request in flight: {e}"));
    let (out, _) = load.finish(false);
    let late = late?;
    ensure(late.status == 200 && late.close, || {
        format!("the request in flight: {late:?}")
    })?;
    let before: Vec<_> = out.failures.iter().filter(|(p, _, _)| *p == 0).collect();
    let bad: Vec<_> = out.failures.iter().filter(|(_, _, bad)| *bad).collect();
    ensure(before.is_empty() && bad.is_empty(), || {
        format!("failures before SIGTERM {before:?}; malformed {bad:?}")
    })?;
    // terminate() sends a second SIGTERM (harmless while draining) and checks the exit.
    server.terminate(Duration::from_secs(40))?;
    println!(
        "    {} requests before and during SIGTERM; the request in flight answered ({:?}); after it: {:?}",
        out.ok,
        late.body.trim_end(),
        out.failures.iter().map(|(_, e, _)| e.as_str()).collect::<BTreeSet<_>>()
    );
    Ok(())
}

/// 6. Requests per second of a short keep-alive run (printed, not asserted).
fn throughput(bin: &Path) -> Result<(), String> {
    let server = Server::start(
        bin,
        &[
            "--workers",
            "4",
            "--max-requests",
            "0",
            "--stats-every",
            "0",
        ],
    )?;
    ready_workers(&server, 4)?;
    let load = Load::start(server.addr, 4, u64::MAX, Duration::from_millis(2500), false);
    let (out, took) = load.finish(false);
    out.no_failures()?;
    let profile = if bin.components().any(|c| c.as_os_str() == "release") {
        "release"
    } else {
        "debug"
    };
    println!(
        "    {} requests in {took:.2?}: {:.0} requests/s (4 workers, 4 keep-alive client threads in this process, {profile} build)",
        out.ok,
        out.ok as f64 / took.as_secs_f64()
    );
    server.terminate(Duration::from_secs(30))
}

fn main() {
    let mut h = Harness::new();
    let bin = match common::example_binary("prefork_http") {
        Ok(b) => b,
        Err(e) => {
            println!("cannot find or build the example: {e}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    type Scenario = fn(&Path) -> Result<(), String>;
    let scenarios: [(&str, Scenario); 6] = [
        ("1_load_and_stats", load_and_stats),
        ("2_http_semantics", http_semantics),
        ("3_sighup_reload_under_load", sighup_reload),
        ("4_recycling_under_load", recycling),
        ("5_sigterm_finishes_in_flight", sigterm),
        ("6_requests_per_second", throughput),
    ];
    for (name, scenario) in scenarios {
        let bin = bin.clone();
        h.run(name, DEADLINE, move || scenario(&bin));
    }
    h.finish()
}
