//! `--hostile <kind> [key=value ...]`: a node that runs no bus at all. It takes the
//! inherited parent link the way `Bus::join_from_env` does (`FORKBUS_FD`, `FORKBUS_PARENT`,
//! `FORKBUS_INCARNATION`; its own id is the parent's host, its pid and that incarnation),
//! writes raw frames with `forkbus::router::wire::encode_frame` — a hello naming itself,
//! then the attack — and then stays alive, doing nothing more, until it is killed. It
//! never exits on its own once joined, so that a link that closes was closed by its parent.
//!
//! Nodes are written `host:pid:incarnation`. Fake nodes of its "subtree" are
//! `(its host, FAKE_PID_BASE + i, 1)`, pids no kernel hands out. Payloads are CBOR text
//! strings, as the typed API would send a `String`.
//!
//! | kind          | arguments                       | what it writes after its hello |
//! |---------------|---------------------------------|--------------------------------|
//! | `origin`      | `origin=N to=N\|broadcast`      | one envelope from another node, payload `"forged"` |
//! | `unknown`     | `to=N`                          | one envelope from a node nobody announced |
//! | `notice`      | `from=N origin=N seq=S kind=delivered\|lost` | one notice in another node's name |
//! | `announce`    | `node=N`                        | an announcement of a node living elsewhere, with the name `"hijacked"` |
//! | `steal`       | `name=S`                        | a claim of a name for itself (refused quietly: not a violation) |
//! | `names`       | `count=C frames=F len=L`        | F announcements of itself with C names of L bytes each |
//! | `name-deltas` | `per=P frames=F`                | F changes adding P names each to itself |
//! | `nodes`       | `per=P frames=F names=K [first=I]` | F announcements of P fresh fake nodes (from fake I + 1 on) with K names each |
//! | `flood`       | `nodes=N envelopes=M [window=W]` | N fake nodes, then M broadcasts `"flood"`, each from the next fake (round robin), then its own broadcast `"flood-done"`; with a window, at most W of them unacknowledged at a time (as an honest router's queue bound allows) |
//! | `no-ack`      | `envelopes=M [window=W]`        | M unicasts to a node that does not exist (each comes back as a loss notice), then `"flood-done"`, paced like `flood`; it never acknowledges |
//! | `partial`     | `len=L bytes=B`                 | a length prefix announcing L bytes, then B bytes of it, then silence |
//! | `deaf`        |                                 | nothing; it never reads |
//!
//! Every kind but `deaf` keeps reading what its parent sends, and every kind but `deaf` and
//! `no-ack` acknowledges the numbered frames it reads (envelopes and notices), as an honest
//! peer does, so that only the attack itself is wrong.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use forkbus::external::{ENV_FD, ENV_INCARNATION, ENV_PARENT};
use forkbus::router::wire::{
    decode_frame, encode_frame, DecodeLimits, Deframer, Envelope, Flags, Frame, Hello, NodeDelta,
    NodeInfo, Notice, NoticeKind, RouteUpdate, WIRE_VERSION,
};
use forkbus::router::RouterConfig;
use forkbus::{Destination, Fate, LossReason, MessageId, NodeId};

/// Pids of the fake nodes start here (above any `pid_max` Linux allows, 2^22).
const FAKE_PID_BASE: u32 = 0x4000_0000;

/// Bytes written per batch while flooding.
const BATCH: usize = 64 << 10;

fn fail(what: impl std::fmt::Display) -> String {
    format!("hostile node: {what}")
}

/// Parses `host:pid:incarnation`.
fn parse_node(text: &str) -> Result<NodeId, String> {
    let parts: Vec<u32> = text
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| fail(format!("not a node: {text:?}")))?;
    match parts.as_slice() {
        [host, pid, inc] => Ok(NodeId::new(*host, *pid, *inc)),
        _ => Err(fail(format!("not a node: {text:?}"))),
    }
}

/// The `key=value` arguments.
struct Args(BTreeMap<String, String>);

impl Args {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for a in args {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| fail(format!("not key=value: {a:?}")))?;
            map.insert(k.to_owned(), v.to_owned());
        }
        Ok(Self(map))
    }

    fn text(&self, key: &str) -> Result<&str, String> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| fail(format!("missing {key}=")))
    }

    fn num(&self, key: &str) -> Result<u64, String> {
        let t = self.text(key)?;
        t.parse()
            .map_err(|_| fail(format!("{key}={t:?} is not a number")))
    }

    fn node(&self, key: &str) -> Result<NodeId, String> {
        parse_node(self.text(key)?)
    }

    fn num_or(&self, key: &str, default: u64) -> Result<u64, String> {
        if self.0.contains_key(key) {
            self.num(key)
        } else {
            Ok(default)
        }
    }
}

/// A CBOR text string (what `Bus::send(.., &String)` puts in a payload).
fn cbor_text(s: &str) -> Vec<u8> {
    let n = s.len();
    let mut v = Vec::with_capacity(n + 9);
    match n {
        0..=23 => v.push(0x60 | n as u8),
        24..=0xff => v.extend_from_slice(&[0x78, n as u8]),
        _ => {
            v.push(0x79);
            v.extend_from_slice(&(n.min(0xffff) as u16).to_be_bytes());
        }
    }
    v.extend_from_slice(&s.as_bytes()[..n.min(0xffff)]);
    v
}

fn fake(host: u32, i: u32) -> NodeId {
    NodeId::new(host, FAKE_PID_BASE + i, 1)
}

/// The link to the parent, written by hand.
struct Peer {
    sock: UnixStream,
    me: NodeId,
    /// The next link sequence number (envelopes and notices share it).
    link_seq: u64,
    /// Frames waiting to be written.
    out: Vec<u8>,
    rx: Deframer,
    limits: DecodeLimits,
    /// Numbered frames read (envelopes and notices).
    numbered: u64,
    /// The count last acknowledged.
    acked: u64,
    /// How many of this peer's numbered frames the parent acknowledged.
    peer_acked: u64,
    /// Whether this peer acknowledges what it reads.
    acks: bool,
    /// The parent closed the link (end of file, or an error).
    closed: bool,
}

impl Peer {
    /// Takes the inherited link, as `Bus::join_from_env` does.
    fn join(acks: bool) -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).map_err(|_| fail(format!("{name} is not set")));
        let fd_text = var(ENV_FD)?;
        let parent = parse_node(&var(ENV_PARENT)?)?;
        let inc_text = var(ENV_INCARNATION)?;
        for name in [ENV_FD, ENV_PARENT, ENV_INCARNATION] {
            std::env::remove_var(name);
        }
        let fd: RawFd = fd_text
            .parse()
            .ok()
            .filter(|fd| *fd > 2)
            .ok_or_else(|| fail(format!("{ENV_FD}={fd_text:?}")))?;
        let incarnation: u32 = inc_text
            .parse()
            .map_err(|_| fail(format!("{ENV_INCARNATION}={inc_text:?}")))?;
        // The descriptor must be an open socket before this process takes it over.
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map_err(|e| fail(format!("descriptor {fd}: {e}")))?;
        if !target.to_string_lossy().starts_with("socket:") {
            return Err(fail(format!("descriptor {fd} is {target:?}, not a socket")));
        }
        // SAFETY: the descriptor is open (checked above), was passed to this process to be
        // its parent link, and nothing else in this process owns it (the variables naming
        // it were removed).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let sock = UnixStream::from(owned);
        sock.set_nonblocking(true)
            .map_err(|e| fail(format!("non-blocking: {e}")))?;
        let config = RouterConfig::default();
        let me = NodeId::new(parent.host, std::process::id(), incarnation);
        let mut peer = Self {
            sock,
            me,
            link_seq: 0,
            out: Vec::new(),
            rx: Deframer::new(config.max_frame),
            limits: DecodeLimits::from(&config),
            numbered: 0,
            acked: 0,
            peer_acked: 0,
            acks,
            closed: false,
        };
        peer.frame(&Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: me,
        }));
        Ok(peer)
    }

    fn frame(&mut self, frame: &Frame) {
        encode_frame(&mut self.out, frame);
    }

    fn envelope(&mut self, origin: NodeId, seq: u64, destination: Destination, text: &str) {
        let envelope = Envelope {
            id: MessageId { origin, seq },
            destination,
            hops: 1,
            hop_limit: 16,
            flags: Flags::empty(),
            trace: Vec::new(),
            payload: cbor_text(text),
        };
        let link_seq = self.link_seq;
        self.link_seq += 1;
        self.frame(&Frame::Envelope { link_seq, envelope });
    }

    fn notice(&mut self, notice: Notice) {
        let link_seq = self.link_seq;
        self.link_seq += 1;
        self.frame(&Frame::Notice { link_seq, notice });
    }

    /// Reads what the parent sent until the socket is empty; counts its numbered frames
    /// and queues their acknowledgement. `true` when anything was read.
    fn drain(&mut self) -> bool {
        let mut buf = [0u8; 64 << 10];
        let mut any = false;
        while !self.closed {
            match self.sock.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    any = true;
                    let limits = self.limits;
                    let mut numbered = 0;
                    let mut peer_acked = self.peer_acked;
                    let fed = self.rx.feed(&buf[..n], |kind, body| {
                        match decode_frame(kind, body, limits)? {
                            Frame::Envelope { .. } | Frame::Notice { .. } => numbered += 1,
                            Frame::Ack(n) => peer_acked = peer_acked.max(n),
                            _ => {}
                        }
                        Ok::<_, forkbus::router::ProtocolError>(())
                    });
                    self.numbered += numbered;
                    self.peer_acked = peer_acked;
                    if let Err(e) = fed {
                        eprintln!("hostile node: the parent's bytes do not decode: {e}");
                        self.closed = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
        if self.acks && self.numbered > self.acked {
            self.acked = self.numbered;
            let n = self.acked;
            self.frame(&Frame::Ack(n));
        }
        any
    }

    /// Writes everything queued; while the parent does not take it, keeps reading (and
    /// acknowledging) unless `deaf`. Gives up quietly when the parent closed the link.
    fn flush(&mut self, deaf: bool) {
        let mut off = 0;
        while off < self.out.len() && !self.closed {
            match self.sock.write(&self.out[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deaf || !self.drain() {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
        self.out.clear();
    }

    /// Waits until fewer than `window` of this peer's numbered frames are unacknowledged
    /// (flushing what is queued, reading the parent's acknowledgements).
    fn wait_window(&mut self, window: u64) {
        while !self.closed && self.link_seq - self.peer_acked >= window {
            self.flush(false);
            if !self.drain() {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Flushes when a batch is full.
    fn batch(&mut self) {
        if self.out.len() >= BATCH {
            if !self.closed {
                self.drain();
            }
            self.flush(false);
        }
    }

    /// Stays alive until killed: reading and acknowledging (unless `deaf`) while the link
    /// is open.
    fn hang(mut self, deaf: bool) -> ! {
        self.flush(deaf);
        loop {
            if deaf || self.closed {
                std::thread::sleep(Duration::from_secs(3600));
            } else {
                self.drain();
                self.flush(false);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Runs the attack `kind` and stays alive until killed; returns only on a usage or join
/// error.
pub(crate) fn main(kind: &str, args: &[String]) -> Result<Infallible, String> {
    let a = Args::parse(args)?;
    let deaf = kind == "deaf";
    let mut p = Peer::join(!deaf && kind != "no-ack")?;
    let me = p.me;
    match kind {
        "origin" => {
            let origin = a.node("origin")?;
            let to = match a.text("to")? {
                "broadcast" => Destination::Broadcast,
                _ => Destination::Node(a.node("to")?),
            };
            p.envelope(origin, 0, to, "forged");
        }
        "unknown" => {
            let to = Destination::Node(a.node("to")?);
            p.envelope(NodeId::new(me.host, FAKE_PID_BASE, 1), 0, to, "forged");
        }
        "notice" => {
            let kind = match a.text("kind")? {
                "delivered" => NoticeKind::Delivered,
                "lost" => NoticeKind::Lost {
                    fate: Fate::Lost(LossReason::QueueFull),
                    receipt: true,
                },
                other => return Err(fail(format!("kind={other:?}"))),
            };
            p.notice(Notice {
                origin: a.node("origin")?,
                seq: a.num("seq")?,
                from: a.node("from")?,
                hops: 1,
                kind,
            });
        }
        "announce" => p.frame(&Frame::Routes(RouteUpdate {
            upsert: vec![NodeInfo {
                node: a.node("node")?,
                version: 1 << 40,
                names: vec!["hijacked".into()],
                groups: Vec::new(),
            }],
            ..RouteUpdate::default()
        })),
        "steal" => p.frame(&Frame::Routes(RouteUpdate {
            change: vec![NodeDelta {
                node: me,
                version: 1,
                add_names: vec![a.text("name")?.to_owned()],
                ..NodeDelta::default()
            }],
            ..RouteUpdate::default()
        })),
        "names" => {
            let (count, frames, len) = (a.num("count")?, a.num("frames")?, a.num("len")?);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            for f in 0..frames {
                let names = (0..count)
                    .map(|i| {
                        let mut s = format!("h{f}-{i}-");
                        while s.len() < len {
                            s.push('x');
                        }
                        s
                    })
                    .collect();
                p.frame(&Frame::Routes(RouteUpdate {
                    upsert: vec![NodeInfo {
                        node: me,
                        version: f + 1,
                        names,
                        groups: Vec::new(),
                    }],
                    ..RouteUpdate::default()
                }));
                p.flush(false);
            }
        }
        "name-deltas" => {
            let (per, frames) = (a.num("per")?, a.num("frames")?);
            for f in 0..frames {
                p.frame(&Frame::Routes(RouteUpdate {
                    change: vec![NodeDelta {
                        node: me,
                        version: f + 1,
                        add_names: (0..per).map(|i| format!("d{f}-{i}")).collect(),
                        ..NodeDelta::default()
                    }],
                    ..RouteUpdate::default()
                }));
                p.flush(false);
            }
        }
        "nodes" => {
            let (per, frames, names) = (a.num("per")?, a.num("frames")?, a.num("names")?);
            let mut i =
                u32::try_from(a.num_or("first", 0)?).map_err(|_| fail("first= too large"))?;
            for _ in 0..frames {
                let upsert = (0..per)
                    .map(|_| {
                        i += 1;
                        NodeInfo {
                            node: fake(me.host, i),
                            version: 1,
                            names: (0..names).map(|k| format!("f{i}-{k}")).collect(),
                            groups: Vec::new(),
                        }
                    })
                    .collect();
                p.frame(&Frame::Routes(RouteUpdate {
                    upsert,
                    ..RouteUpdate::default()
                }));
                p.flush(false);
            }
        }
        "flood" => {
            let nodes = u32::try_from(a.num("nodes")?).map_err(|_| fail("nodes= too large"))?;
            let envelopes = a.num("envelopes")?;
            let window = a.num_or("window", u64::MAX)?.max(1);
            for chunk in (0..nodes).collect::<Vec<u32>>().chunks(1000) {
                p.frame(&Frame::Routes(RouteUpdate {
                    upsert: chunk
                        .iter()
                        .map(|i| NodeInfo {
                            node: fake(me.host, *i),
                            version: 1,
                            ..NodeInfo::default()
                        })
                        .collect(),
                    ..RouteUpdate::default()
                }));
            }
            p.flush(false);
            let n = u64::from(nodes.max(1));
            for k in 0..envelopes {
                let i = u32::try_from(k % n).unwrap_or(0);
                p.wait_window(window);
                p.envelope(fake(me.host, i), k / n, Destination::Broadcast, "flood");
                p.batch();
            }
            p.wait_window(window);
            p.envelope(me, 0, Destination::Broadcast, "flood-done");
        }
        "no-ack" => {
            let envelopes = a.num("envelopes")?;
            let window = a.num_or("window", u64::MAX)?.max(1);
            let nowhere = Destination::Node(NodeId::new(me.host, FAKE_PID_BASE - 1, 1));
            for k in 0..envelopes {
                p.wait_window(window);
                p.envelope(me, k, nowhere.clone(), "flood");
                p.batch();
            }
            p.wait_window(window);
            p.envelope(me, envelopes, Destination::Broadcast, "flood-done");
        }
        "partial" => {
            let len = u32::try_from(a.num("len")?).map_err(|_| fail("len= too large"))?;
            let bytes = usize::try_from(a.num("bytes")?).unwrap_or(0);
            p.out.extend_from_slice(&len.to_be_bytes());
            // An envelope frame's kind, then zeros: it never completes.
            p.out.push(2);
            p.out.resize(p.out.len() + bytes.saturating_sub(1), 0);
        }
        "deaf" => {}
        other => return Err(fail(format!("unknown kind {other:?}"))),
    }
    p.hang(deaf)
}
