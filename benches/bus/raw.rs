//! The raw-socketpair baseline: the same work as forkbus does, with nothing but blocking
//! socketpairs and a 4-byte length prefix, written here so that both run on the same machine
//! in the same run.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

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

fn write_frame(s: &mut UnixStream, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    s.write_all(&buf)
}

fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    s.read_exact(buf)
}

/// Round trips of a 64-byte frame over a chain of `hops` links: the far end echoes, the
/// middle relays. Returns one sample per round trip.
pub(crate) fn round_trip(hops: usize, rounds: usize, warmup: usize) -> io::Result<Samples> {
    assert!(hops >= 1);
    let (mut near, far) = pair()?;
    let child = fork_child(&[near.as_raw_fd()], move || relay_chain(far, hops - 1))?;
    let payload = [7u8; 64];
    let mut buf = Vec::with_capacity(64);
    let mut samples = Samples::with_capacity(rounds);
    for i in 0..warmup + rounds {
        let t = Instant::now();
        write_frame(&mut near, &payload)?;
        read_frame(&mut near, &mut buf)?;
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
fn relay_chain(mut up: UnixStream, below: usize) -> i32 {
    let result = (|| -> io::Result<()> {
        let mut buf = Vec::with_capacity(64);
        if below == 0 {
            loop {
                match read_frame(&mut up, &mut buf) {
                    Ok(()) => write_frame(&mut up, &buf)?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        let (mut down, far) = pair()?;
        let child = fork_child(&[down.as_raw_fd(), up.as_raw_fd()], move || {
            relay_chain(far, below - 1)
        })?;
        loop {
            match read_frame(&mut up, &mut buf) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            write_frame(&mut down, &buf)?;
            read_frame(&mut down, &mut buf)?;
            write_frame(&mut up, &buf)?;
        }
        drop(down);
        child.wait()?;
        Ok(())
    })();
    i32::from(result.is_err())
}

/// One-way streaming of `count` frames of `size` bytes, many frames per write. Returns the
/// elapsed time from the first write until the reader has counted every frame.
pub(crate) fn throughput(size: usize, count: usize) -> io::Result<Duration> {
    let (mut tx, mut rx) = pair()?;
    let child = fork_child(&[tx.as_raw_fd()], move || {
        let r = (|| -> io::Result<()> {
            let mut buf = vec![0u8; 256 << 10];
            let (mut have, mut seen) = (0usize, 0usize);
            let mut frame_left = 0usize;
            let mut header = Vec::with_capacity(4);
            while seen < count {
                let n = rx.read(&mut buf)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                have += n;
                let mut at = 0;
                while at < n {
                    if frame_left == 0 {
                        let take = (4 - header.len()).min(n - at);
                        header.extend_from_slice(&buf[at..at + take]);
                        at += take;
                        if header.len() == 4 {
                            frame_left =
                                u32::from_be_bytes([header[0], header[1], header[2], header[3]])
                                    as usize;
                            header.clear();
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
            let _ = have;
            rx.write_all(&[1])
        })();
        i32::from(r.is_err())
    })?;
    let frame = {
        let mut f = (size as u32).to_be_bytes().to_vec();
        f.extend(std::iter::repeat_n(9u8, size));
        f
    };
    let batch = (64 << 10) / frame.len().max(1);
    let mut buf = Vec::with_capacity((batch.max(1)) * frame.len());
    let t = Instant::now();
    let mut sent = 0;
    while sent < count {
        buf.clear();
        let n = batch.max(1).min(count - sent);
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

/// Flood over a complete binary tree of `n` processes by raw relays: every process writes
/// what it reads from its parent to each child. Returns, per round, the time from the
/// root's send until the last process had it.
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
    let mut samples = Samples::with_capacity(rounds);
    let mut ack = [0u8; 1];
    for round in 1..=rounds as u64 + 5 {
        let payload = round.to_be_bytes();
        let t0 = monotonic_ns();
        for d in &mut downs {
            write_frame(d, &payload)?;
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
        let mut buf = Vec::with_capacity(8);
        let mut ack = [0u8; 1];
        loop {
            match read_frame(&mut up, &mut buf) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            stamps.set(me, monotonic_ns());
            for d in &mut downs {
                write_frame(d, &buf)?;
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

/// A forked child that says it is ready and then blocks on a read: fork-to-ready time and
/// the child's memory at rest.
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
