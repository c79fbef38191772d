"""The peer of the bench's Python round trip: ``multiprocessing.Pipe`` between a parent and
a forked child that echoes, 64-byte ``bytes`` each way. Prints the median round trip in
microseconds over ``ROUNDS`` after ``WARMUP``."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time


def echo(conn) -> None:  # type: ignore[no-untyped-def]
    while True:
        msg = conn.recv_bytes()
        if not msg:
            return
        conn.send_bytes(msg)


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    warmup = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    ctx = mp.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=echo, args=(theirs,))
    child.start()
    payload = bytes(64)
    samples = []
    for i in range(warmup + rounds):
        t = time.perf_counter()
        ours.send_bytes(payload)
        ours.recv_bytes()
        if i >= warmup:
            samples.append(time.perf_counter() - t)
    ours.send_bytes(b"")
    child.join(10)
    print(f"{statistics.median(samples) * 1e6:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
