"""The leaf worker against a scripted parent on a socketpair: hello, receipts, acks, the
drain's probes and exit, and malformed input ending the worker with a clear error."""

from __future__ import annotations

import socket
import struct
import threading
from typing import List

import cbor2
import pytest

from forkbus import Message, NodeId, ProtocolError, Worker, wire
from forkbus.worker import EXIT, PROBE, QUIET, TALLY

PARENT = NodeId(0, 4000, 1)
ME = NodeId(0, 4242, 7)


def start() -> "tuple[Worker, socket.socket, List[Message], threading.Thread, list]":
    ours, theirs = socket.socketpair()
    w = Worker(theirs, ME, PARENT)
    got: List[Message] = []
    w.on_message = lambda worker, m: got.append(m)
    result: list = []

    def run() -> None:
        try:
            result.append(w.run())
        except ProtocolError as e:
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return w, ours, got, t, result


def read_frames(sock: socket.socket, want: int) -> List[wire.Frame]:
    d = wire.Deframer()
    frames: List[wire.Frame] = []
    sock.settimeout(5)
    while len(frames) < want:
        frames += d.feed(sock.recv(65536))
    return frames


def test_a_receipted_envelope_is_delivered_acknowledged_and_receipted() -> None:
    w, parent, got, t, result = start()
    (hello,) = read_frames(parent, 1)
    assert hello == wire.Hello(wire.WIRE_VERSION, ME)
    env = wire.Envelope(0, PARENT, 5, 0, 64, wire.FLAG_RECEIPT, wire.Destination("node", node=ME), cbor2.dumps("hi"))
    parent.sendall(wire.encode(wire.Hello(wire.WIRE_VERSION, PARENT)) + wire.encode(env))
    # The same envelope replayed on the link (same link_seq) is dropped, not delivered twice.
    parent.sendall(wire.encode(env))
    frames = read_frames(parent, 2)
    notices = [f for f in frames if isinstance(f, wire.Notice)]
    acks = [f for f in frames if isinstance(f, wire.Ack)]
    assert notices == [wire.Notice(0, PARENT, 5, ME, 0, 0)]
    assert acks and acks[-1].count == 1
    assert [m.decode() for m in got] == ["hi"]
    # The drain: a probe is answered (still only once idle: the notice is unacknowledged),
    # exit gets the tally and the worker returns 0.
    parent.sendall(wire.encode(wire.Control(PROBE, struct.pack("<Q", 1))))
    (quiet,) = [f for f in read_frames(parent, 1) if isinstance(f, wire.Control)]
    assert quiet == wire.Control(QUIET, struct.pack("<Q", 1) + b"\x00")
    parent.sendall(wire.encode(wire.Ack(1)) + wire.encode(wire.Control(PROBE, struct.pack("<Q", 2))))
    (quiet,) = [f for f in read_frames(parent, 1) if isinstance(f, wire.Control)]
    assert quiet == wire.Control(QUIET, struct.pack("<Q", 2) + b"\x01")
    parent.sendall(wire.encode(wire.Control(EXIT, b"")))
    (tally,) = [f for f in read_frames(parent, 1) if isinstance(f, wire.Control)]
    assert tally.code == TALLY
    counts = struct.unpack("<12Q", tally.data)
    assert counts[0] == 1 and counts[4] == 1  # one process, one delivered
    t.join(5)
    assert result == [0]
    with pytest.raises(RuntimeError):
        w.send(PARENT, "after the drain")


def test_a_gap_in_the_link_sequence_ends_the_worker() -> None:
    _, parent, _, t, result = start()
    read_frames(parent, 1)
    env = wire.Envelope(3, PARENT, 0, 0, 64, 0, wire.Destination("node", node=ME), b"\x00")
    parent.sendall(wire.encode(wire.Hello(wire.WIRE_VERSION, PARENT)) + wire.encode(env))
    t.join(5)
    assert len(result) == 1 and isinstance(result[0], ProtocolError)
    assert "gap" in str(result[0])


def test_garbage_and_a_stranger_end_the_worker() -> None:
    _, parent, _, t, result = start()
    read_frames(parent, 1)
    parent.sendall(wire.encode(wire.Hello(wire.WIRE_VERSION, NodeId(0, 1, 1))))
    t.join(5)
    assert isinstance(result[0], ProtocolError) and "not the parent" in str(result[0])
    _, parent, _, t, result = start()
    read_frames(parent, 1)
    parent.sendall(b"\x00\x00\x00\x03\x09\x80\x00")
    t.join(5)
    assert isinstance(result[0], ProtocolError)


def test_the_parent_going_away_ends_the_worker_with_1() -> None:
    _, parent, _, t, result = start()
    read_frames(parent, 1)
    parent.close()
    t.join(5)
    assert result == [1]


def test_sends_are_numbered_and_names_announced() -> None:
    w, parent, _, t, _ = start()
    read_frames(parent, 1)
    w.register_name("py-echo")
    assert w.send(PARENT, {"n": 1}, receipt=True) == 0
    assert w.send("root", [1, 2]) == 1
    w._flush()
    frames = read_frames(parent, 3)
    routes = [f for f in frames if isinstance(f, wire.Routes)]
    e0, e1 = [f for f in frames if isinstance(f, wire.Envelope)]
    assert len(routes) == 1, frames
    routes = routes[0]
    assert routes == wire.Routes(change=(wire.NodeDelta(ME, 1, add_names=("py-echo",)),))
    assert isinstance(e0, wire.Envelope) and e0.link_seq == 0 and e0.flags == wire.FLAG_RECEIPT
    assert isinstance(e1, wire.Envelope) and e1.link_seq == 1 and e1.destination.name == "root"
    assert cbor2.loads(e0.payload) == {"n": 1}
    parent.close()
    t.join(5)


def test_every_kind_of_address_becomes_its_destination() -> None:
    w, parent, _, t, _ = start()
    read_frames(parent, 1)
    w.send(PARENT, 1)
    w.send(PARENT.pid, 2)  # the parent's pid is known from the start
    w.send("a-name", 3)
    w.send(("group", "models"), 4)
    w.send("*", 5)
    with pytest.raises(LookupError):
        w.send(99999, 6)  # a pid nobody announced
    w.send_bytes(PARENT, b"as is")
    w._flush()
    envs = [f for f in read_frames(parent, 6) if isinstance(f, wire.Envelope)]
    raw = envs.pop()
    assert raw.payload == b"as is" and raw.seq == 5
    assert [e.destination for e in envs] == [
        wire.Destination("node", node=PARENT),
        wire.Destination("node", node=PARENT),
        wire.Destination("name", name="a-name"),
        wire.Destination("group", name="models"),
        wire.Destination("broadcast"),
    ]
    assert [e.seq for e in envs] == [0, 1, 2, 3, 4]
    parent.close()
    t.join(5)


def test_a_supervised_worker_says_ready_answers_pings_and_stops() -> None:
    ours, theirs = socket.socketpair()
    w = Worker(theirs, ME, PARENT, supervised=True)
    stopped: List[bool] = []
    w.on_stop = lambda worker: stopped.append(True)
    result: list = []
    t = threading.Thread(target=lambda: result.append(w.run()), daemon=True)
    t.start()
    hello, ready = read_frames(ours, 2)
    assert ready == wire.Control(0x46420103, b"")
    ours.sendall(wire.encode(wire.Hello(wire.WIRE_VERSION, PARENT)))
    ours.sendall(wire.encode(wire.Control(0x46420101, struct.pack("<Q", 7))))
    (pong,) = read_frames(ours, 1)
    assert pong == wire.Control(0x46420102, struct.pack("<Q", 7))
    stop = bytes([1]) + struct.pack("<Q", 5000) + struct.pack("<Q", 20)
    ours.sendall(wire.encode(wire.Control(0x46420104, stop)))
    (tally,) = read_frames(ours, 1)
    assert isinstance(tally, wire.Control) and tally.code == TALLY
    t.join(5)
    assert result == [0] and stopped == [True]


def test_an_unsupervised_worker_ignores_supervision() -> None:
    w, parent, _, t, result = start()
    read_frames(parent, 1)  # the hello, and no READY
    parent.sendall(wire.encode(wire.Hello(wire.WIRE_VERSION, PARENT)))
    parent.sendall(wire.encode(wire.Control(0x46420101, struct.pack("<Q", 7))))
    parent.sendall(wire.encode(wire.Control(PROBE, struct.pack("<Q", 1))))
    (quiet,) = read_frames(parent, 1)
    assert isinstance(quiet, wire.Control) and quiet.code == QUIET, "no pong before it"
    parent.close()
    t.join(5)
    assert result == [1]


def test_the_asyncio_loop_speaks_the_same_protocol() -> None:
    import asyncio

    ours, theirs = socket.socketpair()
    w = Worker(theirs, ME, PARENT)
    seen: List[object] = []

    async def on_message(worker: Worker, m: Message) -> None:
        await asyncio.sleep(0)  # an async handler, awaited before the next frame
        seen.append(m.decode())
        worker.send(m.origin, m.decode())

    w.on_message = on_message

    def parent() -> None:
        (hello,) = read_frames(ours, 1)
        assert hello == wire.Hello(wire.WIRE_VERSION, ME)
        env = wire.Envelope(0, PARENT, 0, 0, 64, 0, wire.Destination("node", node=ME), cbor2.dumps(42))
        ours.sendall(wire.encode(wire.Hello(wire.WIRE_VERSION, PARENT)) + wire.encode(env))
        frames = read_frames(ours, 2)
        echoes = [f for f in frames if isinstance(f, wire.Envelope)]
        assert [cbor2.loads(e.payload) for e in echoes] == [42]
        ours.sendall(wire.encode(wire.Control(EXIT, b"")))
        read_frames(ours, 1)

    t = threading.Thread(target=parent, daemon=True)
    t.start()
    assert asyncio.run(w.run_async()) == 0
    t.join(5)
    assert seen == [42]


def test_an_async_handler_under_the_blocking_loop_is_an_error() -> None:
    ours, theirs = socket.socketpair()
    w = Worker(theirs, ME, PARENT)

    async def handler(worker: Worker, m: Message) -> None:
        return None

    w.on_message = handler
    env = wire.Envelope(0, PARENT, 0, 0, 64, 0, wire.Destination("node", node=ME), cbor2.dumps(1))
    ours.sendall(wire.encode(wire.Hello(wire.WIRE_VERSION, PARENT)) + wire.encode(env))
    with pytest.raises(TypeError):
        w.run()
