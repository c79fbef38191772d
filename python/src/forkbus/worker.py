"""A leaf worker: one link, to the parent that started this program with ``Bus::exec_node``.

What a leaf must do is section 3 of ``docs/wire.md``: hello, acknowledgements, numbered
envelopes and notices, receipts for what it takes, its names announced as changes of
itself, and the drain (answer probes, report its tally, exit). Everything it sends goes to
its parent, which routes it. Malformed input from the parent ends the worker with a
:class:`~forkbus.wire.ProtocolError`; nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Set, Tuple

import cbor2

from forkbus import wire
from forkbus.wire import NodeId

#: Control codes of the node core (``docs/wire.md``, section 4).
DRAIN, TALLY, PROBE, QUIET, EXIT = 0x46420001, 0x46420002, 0x46420003, 0x46420004, 0x46420005
#: Control codes of supervision a supervised worker takes or sends.
PING, PONG, READY, STOP = 0x46420101, 0x46420102, 0x46420103, 0x46420104

#: How many sequence numbers per origin the duplicate window covers.
SEEN_WINDOW = 128
#: Acknowledge at the latest after this many numbered frames.
ACK_EVERY = 32


@dataclass(frozen=True)
class Message:
    """An envelope for this worker: its origin, id and payload (decoded with
    :meth:`decode`)."""

    origin: NodeId
    seq: int
    payload: bytes

    def decode(self) -> Any:
        """The payload as the Rust side's ``send`` encoded it (CBOR)."""
        return cbor2.loads(self.payload)


@dataclass(frozen=True)
class Outcome:
    """The outcome of a send with a receipt: delivered, or lost with its fate; ``sure`` is
    true for losses that are safe to retry."""

    seq: int
    delivered: bool
    fate: Optional[str] = None
    sure: bool = False


class Worker:
    """A leaf worker on an inherited socket.

    Use :meth:`from_env` in a program started by ``Bus::exec_node``, register handlers,
    then :meth:`run` until the tree drains or the parent goes away.
    """

    def __init__(
        self, sock: socket.socket, me: NodeId, parent: NodeId, supervised: bool = False
    ) -> None:
        self.sock = sock
        self.me = me
        self.parent = parent
        #: Started by a supervisor (``Supervisor::spawn_program``): it takes heartbeats and
        #: stop requests, and says when it is ready.
        self.supervised = supervised
        self.on_message: Optional[Callable[["Worker", Message], Any]] = None
        self.on_outcome: Optional[Callable[["Worker", Outcome], None]] = None
        #: Called when the supervisor asks this worker to stop, before it exits.
        self.on_stop: Optional[Callable[["Worker"], None]] = None
        self._ready_sent = False
        #: Awaitables returned by handlers (``run_async`` only).
        self._awaiting: Optional[List[Awaitable[Any]]] = None
        self._deframer = wire.Deframer()
        self._out = bytearray()
        self._tx_numbered = 0  # numbered frames written on the link
        self._tx_acked = 0  # of those, acknowledged by the parent
        self._rx_numbered = 0  # numbered frames received
        self._rx_acked = 0  # of those, acknowledged to the parent
        self._rx_mark = 0  # numbered frames received at the last QUIET
        self._seq = 0  # this worker's envelopes, as their origin
        self._seen: Dict[NodeId, Tuple[int, Set[int]]] = {}
        self._pending: Set[int] = set()  # seqs awaiting a receipt
        self._names: List[str] = []
        self._version = 0
        self._pids: Dict[int, NodeId] = {parent.pid: parent}
        self._hello = False
        self._draining = False
        self._done = False
        self.counts = {"sent": 0, "delivered": 0, "duplicates": 0}
        self._write(wire.Hello(wire.WIRE_VERSION, me))

    @classmethod
    def from_env(cls) -> "Worker":
        """The worker of a program started by ``Bus::exec_node``: its link is the descriptor
        in ``FORKBUS_FD``, its parent ``FORKBUS_PARENT`` (``host:pid:incarnation``), its own
        incarnation ``FORKBUS_INCARNATION``."""
        try:
            fd = int(os.environ["FORKBUS_FD"])
            host, pid, inc = (int(x) for x in os.environ["FORKBUS_PARENT"].split(":"))
            incarnation = int(os.environ["FORKBUS_INCARNATION"])
        except (KeyError, ValueError) as e:
            raise RuntimeError(f"not started by forkbus (Bus::exec_node): {e}") from e
        name = os.environ.get("FORKBUS_NAME")
        supervised = os.environ.get("FORKBUS_SUPERVISED") == "1"
        for var in ("FORKBUS_FD", "FORKBUS_PARENT", "FORKBUS_INCARNATION", "FORKBUS_NAME",
                    "FORKBUS_SUPERVISED"):
            os.environ.pop(var, None)
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        worker = cls(
            sock, NodeId(host, os.getpid(), incarnation), NodeId(host, pid, inc), supervised
        )
        if name:
            # The name its supervisor gave it (kept across restarts).
            worker.register_name(name)
        return worker

    @property
    def names(self) -> List[str]:
        """The names this worker registered."""
        return list(self._names)

    def ready(self) -> None:
        """Tells the supervisor this worker is up (its model loaded, say). :meth:`run` says
        it on its own if the worker did not; a worker nobody supervises says nothing."""
        if self.supervised and not self._ready_sent:
            self._ready_sent = True
            self._write(wire.Control(READY, b""))

    # -----------------------------------------------------------------------------------
    # Sending

    def register_name(self, name: str) -> None:
        """Takes a name (unique in the tree), announced through the parent."""
        if not name or len(name.encode()) > wire.MAX_NAME:
            raise ValueError(f"a name of 1 to {wire.MAX_NAME} bytes: {name!r}")
        self._names.append(name)
        self._version += 1
        delta = wire.NodeDelta(self.me, self._version, add_names=(name,))
        self._write(wire.Routes(change=(delta,)))

    def send_bytes(self, to: Any, payload: bytes, receipt: bool = False) -> int:
        """Like :meth:`send`, with the payload's bytes as they are (not encoded)."""
        return self._send(to, bytes(payload), receipt)

    def send(self, to: Any, value: Any, receipt: bool = False) -> int:
        """Sends ``value`` (encoded as CBOR) to a :class:`~forkbus.wire.NodeId`, a pid
        (``int``, a node this worker has heard of), a name (``str``), or ``("group", g)``
        / ``"*"`` for everyone. Returns the envelope's sequence number; with ``receipt``,
        :attr:`on_outcome` hears exactly once what became of it."""
        return self._send(to, cbor2.dumps(value), receipt)

    def _send(self, to: Any, payload: bytes, receipt: bool) -> int:
        if self._draining:
            raise RuntimeError("the tree is draining: nothing new is sent")
        if isinstance(to, NodeId):
            dst = wire.Destination("node", node=to)
        elif isinstance(to, int):
            node = self._pids.get(to)
            if node is None:
                raise LookupError(f"no node with pid {to} known here")
            dst = wire.Destination("node", node=node)
        elif to == "*":
            dst = wire.Destination("broadcast")
        elif isinstance(to, tuple) and len(to) == 2 and to[0] == "group":
            dst = wire.Destination("group", name=str(to[1]))
        elif isinstance(to, str):
            dst = wire.Destination("name", name=to)
        else:
            raise TypeError(f"not an address: {to!r}")
        seq = self._seq
        self._seq += 1
        flags = wire.FLAG_RECEIPT if receipt else 0
        env = wire.Envelope(
            self._tx_numbered, self.me, seq, 0, 64, flags, dst, payload
        )
        self._tx_numbered += 1
        self.counts["sent"] += 1
        if receipt:
            self._pending.add(seq)
        self._write(env)
        return seq

    # -----------------------------------------------------------------------------------
    # The loop

    def run(self) -> int:
        """Serves until the tree drains (returns 0) or the parent goes away (returns 1).
        Raises :class:`~forkbus.wire.ProtocolError` on malformed input from the parent."""
        self.sock.setblocking(True)
        self.ready()
        self._flush()
        while not self._done:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                return 1
            self._take(data)
            self._flush()
        self._flush()
        return 0

    async def run_async(self) -> int:
        """:meth:`run` on the running ``asyncio`` loop: the same protocol, the socket read
        and written without blocking the loop, so handlers may start tasks of their own (a
        handler that returns an awaitable is awaited before the next frame)."""
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._awaiting = []
        self.ready()
        await self._flush_async(loop)
        while not self._done:
            try:
                data = await loop.sock_recv(self.sock, 1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                return 1
            self._take(data)
            while self._awaiting:
                await self._awaiting.pop(0)
            await self._flush_async(loop)
        await self._flush_async(loop)
        return 0

    def _take(self, data: bytes) -> None:
        for frame in self._deframer.feed(data):
            self._handle(frame)
        self._ack()

    def _handle(self, frame: wire.Frame) -> None:
        if not self._hello:
            if not isinstance(frame, wire.Hello):
                raise wire.ProtocolError("the first frame is not a hello")
            if frame.version != wire.WIRE_VERSION or frame.node != self.parent:
                raise wire.ProtocolError(f"a hello from {frame.node}, not the parent {self.parent}")
            self._hello = True
            return
        if isinstance(frame, wire.Hello):
            raise wire.ProtocolError("a second hello")
        if isinstance(frame, wire.Ack):
            self._tx_acked = max(self._tx_acked, min(frame.count, self._tx_numbered))
        elif isinstance(frame, wire.Routes):
            for info in frame.upsert:
                self._pids[info.node.pid] = info.node
            for node in frame.remove:
                if self._pids.get(node.pid) == node:
                    del self._pids[node.pid]
        elif isinstance(frame, wire.Envelope):
            if self._numbered(frame.link_seq):
                self._envelope(frame)
        elif isinstance(frame, wire.Notice):
            if self._numbered(frame.link_seq):
                self._notice(frame)
        elif isinstance(frame, wire.Control):
            self._control(frame)

    def _numbered(self, link_seq: int) -> bool:
        if link_seq < self._rx_numbered:
            return False  # a replay
        if link_seq > self._rx_numbered:
            raise wire.ProtocolError(f"frame {link_seq} after {self._rx_numbered - 1}: a gap")
        self._rx_numbered += 1
        if self._rx_numbered - self._rx_acked >= ACK_EVERY:
            self._ack()
        return True

    def _for_me(self, d: wire.Destination) -> bool:
        if d.kind in ("node", "name_at"):
            return d.node == self.me
        if d.kind == "name":
            return d.name in self._names
        return d.kind in ("broadcast", "group")

    def _envelope(self, env: wire.Envelope) -> None:
        if not self._for_me(env.destination):
            return  # a leaf routes nothing; its parent sent it here by mistake
        base, seen = self._seen.get(env.origin, (0, set()))
        if env.seq < base or env.seq in seen:
            self.counts["duplicates"] += 1
            return
        seen.add(env.seq)
        if len(seen) > SEEN_WINDOW:
            base = max(seen) - SEEN_WINDOW + 1
            seen = {s for s in seen if s >= base}
        self._seen[env.origin] = (base, seen)
        self.counts["delivered"] += 1
        if self.on_message is not None:
            done = self.on_message(self, Message(env.origin, env.seq, env.payload))
            if inspect.isawaitable(done):
                if self._awaiting is None:
                    close = getattr(done, "close", None)
                    if close is not None:
                        close()  # never awaited: say so once, as this error
                    raise TypeError("an async handler needs run_async()")
                self._awaiting.append(done)
        if env.flags & wire.FLAG_RECEIPT:
            self._write(
                wire.Notice(self._tx_numbered, env.origin, env.seq, self.me, 0, 0)
            )
            self._tx_numbered += 1

    def _notice(self, n: wire.Notice) -> None:
        if n.origin != self.me or n.seq not in self._pending:
            return
        if n.kind == 2:
            return  # custody moved the receipt to a new holder: still pending
        self._pending.discard(n.seq)
        if n.kind == 0:
            outcome = Outcome(n.seq, True)
        else:
            sure, name = wire.FATES[n.fate or 0]
            outcome = Outcome(n.seq, False, fate=name, sure=sure)
        if self.on_outcome is not None:
            self.on_outcome(self, outcome)

    def _control(self, c: wire.Control) -> None:
        if c.code == DRAIN and not c.data:
            self._draining = True
        elif c.code == PROBE and len(c.data) == 8:
            self._draining = True
            idle = self._tx_acked == self._tx_numbered and not self._pending
            still = idle and self._rx_numbered == self._rx_mark
            self._rx_mark = self._rx_numbered
            self._write(wire.Control(QUIET, c.data + bytes([int(still)])))
        elif c.code == EXIT and not c.data:
            self._write(wire.Control(TALLY, self._tally()))
            self._done = True
        elif c.code == PING and len(c.data) == 8 and self.supervised:
            # The loop is running: that is the answer.
            self._write(wire.Control(PONG, c.data))
        elif c.code == STOP and len(c.data) == 17 and self.supervised:
            # Asked to stop (recycling, reload, a stop request): finish, report, exit 0.
            self._draining = True
            if self.on_stop is not None:
                self.on_stop(self)
            self._write(wire.Control(TALLY, self._tally()))
            self._done = True
        else:
            # Refused and otherwise ignored, as the Rust node does (the parent's frames a
            # leaf that is no supervised worker does not take).
            pass

    def _tally(self) -> bytes:
        counts = [1, 0, self.counts["sent"], 0, self.counts["delivered"], 0, 0]
        counts += [self.counts["duplicates"], 0, 0, 0, 0]
        return b"".join(struct.pack("<Q", c) for c in counts)

    # -----------------------------------------------------------------------------------
    # Output

    def _ack(self) -> None:
        if self._rx_numbered > self._rx_acked:
            self._rx_acked = self._rx_numbered
            self._write(wire.Ack(self._rx_acked))

    def _write(self, frame: wire.Frame) -> None:
        self._out += wire.encode(frame)

    def _flush(self) -> None:
        if self._out:
            self.sock.sendall(bytes(self._out))
            self._out.clear()

    async def _flush_async(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._out:
            out = bytes(self._out)
            self._out.clear()
            await loop.sock_sendall(self.sock, out)
