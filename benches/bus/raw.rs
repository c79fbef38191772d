//! The raw-socketpair baseline: the same work as forkbus does, with nothing but blocking
//! socketpairs and a 4-byte length prefix, written here so that both run on the same machine
//! in the same run.
//!
//! It is meant to be the leanest honest loop: frames are read through a buffer (one `read`
//! per frame when frames come one at a time, many frames per `read` when they stream), and
//! written with one `write` each (many per `write` when streaming).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{recv, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

use crate::proc::{fork_child, monotonic_ns, Child, SharedStamps};
use crate::stats::Samples;

/// A connected pair of blocking stream sockets, close-on-exec.
pub(crate) fn pair() -> io::Result<(UnixStream, UnixStream)> {
    let (a, b): (OwnedFd, OwnedFd) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((UnixStream::from(a), UnixStream::from(b)))
}

/// Writes length-prefixed frames, one `write` each, from a reused buffer.
#[derive(Debug, Default)]
struct FrameWriter {
    buf: Vec<u8>,
}

impl FrameWriter {
    fn write(&mut self, s: &mut impl Write, payload: &[u8]) -> io::Result<()> {
        self.buf.clear();
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(payload);
        s.write_all(&self.buf)
    }
}

/// Reads length-prefixed frames through a buffer: a frame that arrives whole costs one
/// `read` (the old baseline read the prefix and the body separately: two).
#[derive(Debug)]
struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    fn new() -> Self {
        Self {
            buf: vec![0; 64 << 10],
            start: 0,
            end: 0,
        }
    }

    /// The next frame's payload; `UnexpectedEof` at end of file.
    fn next(&mut self, s: &mut impl Read) -> io::Result<&[u8]> {
        loop {
            let have = self.end - self.start;
            let mut need = 4;
            if have >= 4 {
                let mut len = [0u8; 4];
                len.copy_from_slice(&self.buf[self.start..self.start + 4]);
                let len = u32::from_be_bytes(len) as usize;
                if have >= 4 + len {
                    let at = self.start + 4;
                    self.start = at + len;
                    return Ok(&self.buf[at..at + len]);
                }
                need = 4 + len;
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.buf.len() - self.start < need {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
            let n = s.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += n;
        }
    }
}

/// How a raw process waits for its next frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// A blocking `read`: the floor.
    Blocking,
    /// `epoll_wait` (level-triggered, no timeout), then a non-blocking `read`: what any
    /// reactor over many sockets must do at least.
    Epoll,
}

/// A socket whose reads wait in `epoll_wait` first (one epoll instance per socket), or
/// block in `read`.
#[derive(Debug)]
struct Link {
    s: UnixStream,
    ep: Option<OwnedFd>,
}

impl Link {
    fn new(s: UnixStream, wait: Wait) -> io::Result<Self> {
        let ep = match wait {
            Wait::Blocking => None,
            Wait::Epoll => {
                // SAFETY: epoll_create1 takes flags and returns a new descriptor or -1.
                let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
                let ep = unsafe { OwnedFd::from_raw_fd(fd) };
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: 0,
                };
                // SAFETY: both descriptors are open; `ev` is a valid epoll_event.
                let r = unsafe {
                    libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev)
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Some(ep)
            }
        };
        Ok(Self { s, ep })
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(ep) = &self.ep else {
            return self.s.read(buf);
        };
        loop {
            let mut ev = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: `ep` is an open epoll descriptor; `ev` has room for one event.
            let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), &mut ev, 1, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            match recv(self.s.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// Round trips of a 64-byte frame over a chain of `hops` links: the far end echoes, the
/// middle relays; every process waits as `wait` says. `after_fork` runs in this process
/// once the chain's first process is forked (to move this process to another CPU, say).
/// Returns one sample per round trip.
pub(crate) fn round_trip(
    hops: usize,
    rounds: usize,
    warmup: usize,
    wait: Wait,
    after_fork: impl FnOnce() -> io::Result<()>,
) -> io::Result<Samples> {
    assert!(hops >= 1);
    let (near, far) = pair()?;
    let child = fork_child(&[near.as_raw_fd()], move || {
        relay_chain(far, hops - 1, wait)
    })?;
    after_fork()?;
    let mut near = Link::new(near, wait)?;
    let payload = [7u8; 64];
    let mut reader = FrameReader::new();
    let mut writer = FrameWriter::default();
    let mut samples = Samples::with_capacity(rounds);
    for i in 0..warmup + rounds {
        let t = Instant::now();
        writer.write(&mut near, &payload)?;
        reader.next(&mut near)?;
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    drop(near);
    child.wait()?;
    Ok(samples)
}

/// One process of the chain: relays between its upstream link and a child further down,
/// or echoes when it is the last. Ends at end of file.
fn relay_chain(up: UnixStream, below: usize, wait: Wait) -> i32 {
    let result = (|| -> io::Result<()> {
        let up_fd = up.as_raw_fd();
        let mut up = Link::new(up, wait)?;
        let mut from_up = FrameReader::new();
        let mut writer = FrameWriter::default();
        if below == 0 {
            loop {
                match from_up.next(&mut up) {
                    Ok(frame) => writer.write(&mut up, frame)?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        let (down, far) = pair()?;
        let mut close = vec![down.as_raw_fd(), up_fd];
        close.extend(up.ep.as_ref().map(AsRawFd::as_raw_fd));
        let child = fork_child(&close, move || relay_chain(far, below - 1, wait))?;
        let mut down = Link::new(down, wait)?;
        let mut from_down = FrameReader::new();
        loop {
            match from_up.next(&mut up) {
                Ok(frame) => writer.write(&mut down, frame)?,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let frame = from_down.next(&mut down)?;
            writer.write(&mut up, frame)?;
        }
        drop(down);
        child.wait()?;
        Ok(())
    })();
    i32::from(result.is_err())
}

/// One-way streaming of `count` frames of `size` bytes, many frames per write (up to
/// 64 KiB, or one frame when a frame is larger). Returns the elapsed time from the first
/// write until the reader has counted every frame (the reader says it is ready first, so
/// its start-up is not timed).
pub(crate) fn throughput(size: usize, count: usize) -> io::Result<Duration> {
    let (mut tx, mut rx) = pair()?;
    let child = fork_child(&[tx.as_raw_fd()], move || {
        let r = (|| -> io::Result<()> {
            rx.write_all(&[0])?;
            let mut buf = vec![0u8; 256 << 10];
            let mut seen = 0usize;
            let mut frame_left = 0usize;
            let mut header = [0u8; 4];
            let mut header_len = 0usize;
            while seen < count {
                let n = rx.read(&mut buf)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let mut at = 0;
                while at < n {
                    if frame_left == 0 {
                        let take = (4 - header_len).min(n - at);
                        header[header_len..header_len + take].copy_from_slice(&buf[at..at + take]);
                        header_len += take;
                        at += take;
                        if header_len == 4 {
                            frame_left = u32::from_be_bytes(header) as usize;
                            header_len = 0;
                            if frame_left == 0 {
                                seen += 1;
                            }
                        }
                    } else {
                        let take = frame_left.min(n - at);
                        frame_left -= take;
                        at += take;
                        if frame_left == 0 {
                            seen += 1;
                        }
                    }
                }
            }
            rx.write_all(&[1])
        })();
        i32::from(r.is_err())
    })?;
    let frame = {
        let mut f = (size as u32).to_be_bytes().to_vec();
        f.extend(std::iter::repeat_n(9u8, size));
        f
    };
    let batch = ((64 << 10) / frame.len()).max(1);
    let mut buf = Vec::with_capacity(batch * frame.len());
    let mut ready = [0u8; 1];
    tx.read_exact(&mut ready)?;
    let t = Instant::now();
    let mut sent = 0;
    while sent < count {
        buf.clear();
        let n = batch.min(count - sent);
        for _ in 0..n {
            buf.extend_from_slice(&frame);
        }
        tx.write_all(&buf)?;
        sent += n;
    }
    let mut done = [0u8; 1];
    tx.read_exact(&mut done)?;
    let elapsed = t.elapsed();
    drop(tx);
    child.wait()?;
    Ok(elapsed)
}

/// Flood over a complete binary tree of `n` processes (node `i` has children `2i+1` and
/// `2i+2`) by raw relays: every process writes what it reads from its parent to each
/// child. Returns, per round, the time from the root's send until the last process had it
/// (each process stamps its arrival time in shared memory).
pub(crate) fn broadcast(n: usize, rounds: usize) -> io::Result<Samples> {
    let stamps = SharedStamps::new(n)?;
    let mut children = Vec::new();
    let mut downs = Vec::new();
    for c in [1, 2] {
        if c < n {
            let (down, up) = pair()?;
            let st = stamps.clone();
            downs.push(down);
            let close: Vec<RawFd> = downs.iter().map(AsRawFd::as_raw_fd).collect();
            children.push(fork_child(&close, move || flood_node(up, c, n, st))?);
        }
    }
    // Every process is up once each subtree answered the first (untimed) rounds.
    let mut samples = Samples::with_capacity(rounds);
    let mut ack = [0u8; 1];
    let mut writer = FrameWriter::default();
    for round in 1..=rounds as u64 + 5 {
        let payload = round.to_be_bytes();
        let t0 = monotonic_ns();
        for d in &mut downs {
            writer.write(d, &payload)?;
        }
        // Convergecast: each subtree answers once all of it has the frame.
        for d in &mut downs {
            d.read_exact(&mut ack)?;
        }
        let last = (1..n).map(|i| stamps.get(i)).max().unwrap_or(t0);
        if round > 5 {
            samples.push(Duration::from_nanos(last.saturating_sub(t0)));
        }
    }
    drop(downs);
    for c in children {
        c.wait()?;
    }
    Ok(samples)
}

fn flood_node(mut up: UnixStream, me: usize, n: usize, stamps: SharedStamps) -> i32 {
    let r = (|| -> io::Result<()> {
        let mut downs = Vec::new();
        let mut children = Vec::new();
        for c in [2 * me + 1, 2 * me + 2] {
            if c < n {
                let (down, child_up) = pair()?;
                let st = stamps.clone();
                downs.push(down);
                let mut close: Vec<RawFd> = downs.iter().map(AsRawFd::as_raw_fd).collect();
                close.push(up.as_raw_fd());
                children.push(fork_child(&close, move || flood_node(child_up, c, n, st))?);
            }
        }
        let mut reader = FrameReader::new();
        let mut writer = FrameWriter::default();
        let mut ack = [0u8; 1];
        loop {
            let frame = match reader.next(&mut up) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            };
            stamps.set(me, monotonic_ns());
            for d in &mut downs {
                writer.write(d, frame)?;
            }
            for d in &mut downs {
                d.read_exact(&mut ack)?;
            }
            up.write_all(&[1])?;
        }
        drop(downs);
        for c in children {
            c.wait()?;
        }
        Ok(())
    })();
    i32::from(r.is_err())
}

/// A forked child that says it is ready and then blocks on a read: fork-to-ready time (from
/// just before `fork` until the parent read the child's byte) and the child, kept at rest
/// until its socket closes.
pub(crate) fn idle_child() -> io::Result<(Duration, Child, UnixStream)> {
    let (mut near, mut far) = pair()?;
    let t = Instant::now();
    let child = fork_child(&[near.as_raw_fd()], move || {
        let r = far.write_all(&[1]).and_then(|()| {
            let mut b = [0u8; 1];
            far.read(&mut b).map(|_| ())
        });
        i32::from(r.is_err())
    })?;
    let mut b = [0u8; 1];
    near.read_exact(&mut b)?;
    Ok((t.elapsed(), child, near))
}
