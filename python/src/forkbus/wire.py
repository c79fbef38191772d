"""The forkbus wire, version 2 (``docs/wire.md``): frames as Python values, encoded and
decoded exactly as the Rust implementation does (``docs/vectors/frames.json`` checks it).

Every frame is a ``u32`` big-endian length, a kind byte and one CBOR array. Bodies are
written with ``cbor2`` (shortest heads, as Rust writes them) and read with a strict reader
of the wire's CBOR subset: unsigned integers, byte and text strings, definite arrays.
Anything else is a :class:`ProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import cbor2

MAGIC = 0x464B4253
WIRE_VERSION = 2
HEADER_LEN = 5
DEFAULT_MAX_FRAME = (1 << 20) + 4096
MAX_NAME = 256
MAX_NAMES_PER_NODE = 64

KIND_HELLO = 1
KIND_ENVELOPE = 2
KIND_ACK = 3
KIND_ROUTES = 4
KIND_CONTROL = 5
KIND_NOTICE = 6

FLAG_RECEIPT = 1
FLAG_TRACE = 2
FLAG_HANDED = 4
_FLAGS_ALL = FLAG_RECEIPT | FLAG_TRACE | FLAG_HANDED


class ProtocolError(Exception):
    """Bytes from the peer that break the wire: the link they came on must close."""


@dataclass(frozen=True)
class NodeId:
    """A node of the tree: host, pid and incarnation (the kernel reuses pids)."""

    host: int
    pid: int
    incarnation: int

    def fields(self) -> List[int]:
        """Its three wire fields."""
        return [self.host, self.pid, self.incarnation]


@dataclass(frozen=True)
class Destination:
    """Where an envelope goes: ``kind`` is ``node``, ``name``, ``group``, ``broadcast`` or
    ``name_at`` (a name as bound at the sender, with the holder it resolved to)."""

    kind: str
    node: Optional[NodeId] = None
    name: Optional[str] = None


@dataclass(frozen=True)
class Hop:
    """One hop of a trace: the node, the link it came in on plus one (0 at the origin),
    and the time in nanoseconds on that node's monotonic clock."""

    node: NodeId
    link: int
    at: int


@dataclass(frozen=True)
class Hello:
    """The first frame on every link: the sender's version and node."""

    version: int
    node: NodeId


@dataclass(frozen=True)
class Envelope:
    """A routed message, with its link sequence number."""

    link_seq: int
    origin: NodeId
    seq: int
    hops: int
    hop_limit: int
    flags: int
    destination: Destination
    payload: bytes
    trace: Optional[Tuple[Hop, ...]] = None


@dataclass(frozen=True)
class Ack:
    """Cumulative: this many numbered frames received."""

    count: int


@dataclass(frozen=True)
class NodeInfo:
    """A node behind the link, with all its names and groups."""

    node: NodeId
    version: int
    names: Tuple[str, ...]
    groups: Tuple[str, ...]


@dataclass(frozen=True)
class NodeDelta:
    """A change to a known node's names and groups."""

    node: NodeId
    version: int
    add_names: Tuple[str, ...] = ()
    remove_names: Tuple[str, ...] = ()
    join_groups: Tuple[str, ...] = ()
    leave_groups: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Routes:
    """Routing table changes: nodes reachable, gone, changed."""

    upsert: Tuple[NodeInfo, ...] = ()
    remove: Tuple[NodeId, ...] = ()
    change: Tuple[NodeDelta, ...] = ()


@dataclass(frozen=True)
class Control:
    """A link-level control frame: a code and its data (section 4 of the spec)."""

    code: int
    data: bytes


@dataclass(frozen=True)
class Notice:
    """About envelope ``seq`` of ``origin``, said by ``from_``: ``kind`` 0 delivered,
    1 lost or unknown (``fate``, ``receipt``), 2 moved (``moved_to``)."""

    link_seq: int
    origin: NodeId
    seq: int
    from_: NodeId
    hops: int
    kind: int
    fate: Optional[int] = None
    receipt: Optional[bool] = None
    moved_to: Optional[NodeId] = None


Frame = Union[Hello, Envelope, Ack, Routes, Control, Notice]

#: Fate codes of notices: code -> (sure, name). Sure losses are safe to retry.
FATES = {
    0: (True, "never written"),
    1: (True, "partially written"),
    2: (False, "unacknowledged"),
    3: (True, "no route"),
    4: (True, "hop limit"),
    5: (True, "queue full"),
    6: (False, "timeout"),
    7: (False, "destination down"),
    8: (True, "too large"),
    9: (True, "abandoned"),
}


# ---------------------------------------------------------------------------------------
# Encoding


def _frame(kind: int, body: list) -> bytes:
    data = bytes([kind]) + cbor2.dumps(body)
    return struct.pack(">I", len(data)) + data


def _destination(d: Destination) -> list:
    if d.kind == "node" and d.node is not None:
        return [0] + d.node.fields()
    if d.kind == "name" and d.name is not None:
        return [1, d.name]
    if d.kind == "group" and d.name is not None:
        return [2, d.name]
    if d.kind == "broadcast":
        return [3]
    if d.kind == "name_at" and d.name is not None and d.node is not None:
        return [4, d.name] + d.node.fields()
    raise ValueError(f"not a destination: {d!r}")


def encode(frame: Frame) -> bytes:
    """A frame's bytes on the wire."""
    if isinstance(frame, Hello):
        return _frame(KIND_HELLO, [MAGIC, frame.version] + frame.node.fields())
    if isinstance(frame, Envelope):
        body = [frame.link_seq] + frame.origin.fields()
        body += [frame.seq, frame.hops, frame.hop_limit, frame.flags]
        body += _destination(frame.destination) + [bytes(frame.payload)]
        if frame.flags & FLAG_TRACE:
            body.append([h.node.fields() + [h.link, h.at] for h in frame.trace or ()])
        return _frame(KIND_ENVELOPE, body)
    if isinstance(frame, Ack):
        return _frame(KIND_ACK, [frame.count])
    if isinstance(frame, Routes):
        return _frame(
            KIND_ROUTES,
            [
                [i.node.fields() + [i.version, list(i.names), list(i.groups)] for i in frame.upsert],
                [n.fields() for n in frame.remove],
                [
                    d.node.fields()
                    + [
                        d.version,
                        list(d.add_names),
                        list(d.remove_names),
                        list(d.join_groups),
                        list(d.leave_groups),
                    ]
                    for d in frame.change
                ],
            ],
        )
    if isinstance(frame, Control):
        return _frame(KIND_CONTROL, [frame.code, bytes(frame.data)])
    if isinstance(frame, Notice):
        body = [frame.link_seq] + frame.origin.fields() + [frame.seq]
        body += frame.from_.fields() + [frame.hops, frame.kind]
        if frame.kind == 1:
            body += [frame.fate, int(bool(frame.receipt))]
        elif frame.kind == 2 and frame.moved_to is not None:
            body += frame.moved_to.fields()
        return _frame(KIND_NOTICE, body)
    raise ValueError(f"not a frame: {frame!r}")


# ---------------------------------------------------------------------------------------
# Decoding


class _Reader:
    """A strict reader of the wire's CBOR subset over one frame body."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def _head(self) -> Tuple[int, int]:
        if self.pos >= len(self.buf):
            raise ProtocolError("truncated body")
        first = self.buf[self.pos]
        major, info = first >> 5, first & 0x1F
        self.pos += 1
        if info < 24:
            return major, info
        width = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
        if width is None or self.pos + width > len(self.buf):
            raise ProtocolError("bad CBOR head")
        value = int.from_bytes(self.buf[self.pos : self.pos + width], "big")
        self.pos += width
        return major, value

    def uint(self, limit: int = 1 << 64) -> int:
        major, v = self._head()
        if major != 0 or v >= limit:
            raise ProtocolError("expected an unsigned integer")
        return v

    def array(self) -> int:
        major, n = self._head()
        if major != 4:
            raise ProtocolError("expected an array")
        return n

    def _string(self, want: int, limit: int) -> bytes:
        major, n = self._head()
        if major != want or n > limit or self.pos + n > len(self.buf):
            raise ProtocolError("bad string")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def bytes_(self, limit: int) -> bytes:
        return self._string(2, limit)

    def text(self) -> str:
        try:
            return self._string(3, MAX_NAME).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("text is not UTF-8") from e

    def texts(self) -> Tuple[str, ...]:
        n = self.array()
        if n > MAX_NAMES_PER_NODE:
            raise ProtocolError("too many names")
        return tuple(self.text() for _ in range(n))

    def node(self) -> NodeId:
        return NodeId(self.uint(1 << 32), self.uint(1 << 32), self.uint(1 << 32))

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError("trailing bytes")


def decode_body(kind: int, body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """One frame from its kind and body; :class:`ProtocolError` for anything malformed."""
    r = _Reader(body)
    n = r.array()
    frame: Frame
    if kind == KIND_HELLO:
        if n != 5 or r.uint() != MAGIC:
            raise ProtocolError("a hello without the forkbus magic number")
        frame = Hello(r.uint(1 << 32), r.node())
    elif kind == KIND_ENVELOPE:
        link_seq, origin, seq = r.uint(), r.node(), r.uint()
        hops, hop_limit, flags = r.uint(256), r.uint(256), r.uint(256)
        if flags & ~_FLAGS_ALL:
            raise ProtocolError("unknown envelope flags")
        dst_kind = r.uint()
        if dst_kind == 0:
            dst = Destination("node", node=r.node())
        elif dst_kind == 1:
            dst = Destination("name", name=r.text())
        elif dst_kind == 2:
            dst = Destination("group", name=r.text())
        elif dst_kind == 3:
            dst = Destination("broadcast")
        elif dst_kind == 4:
            name = r.text()
            dst = Destination("name_at", node=r.node(), name=name)
        else:
            raise ProtocolError("unknown destination kind")
        payload = r.bytes_(max_frame)
        trace: Optional[Tuple[Hop, ...]] = None
        if flags & FLAG_TRACE:
            hops_list = []
            for _ in range(r.array()):
                if r.array() != 5:
                    raise ProtocolError("a trace hop of the wrong shape")
                hops_list.append(Hop(r.node(), r.uint(), r.uint()))
            trace = tuple(hops_list)
        expected = {0: 13, 1: 11, 2: 11, 3: 10, 4: 14}[dst_kind] + (1 if trace is not None else 0)
        if n != expected:
            raise ProtocolError("an envelope of the wrong arity")
        frame = Envelope(link_seq, origin, seq, hops, hop_limit, flags, dst, payload, trace)
    elif kind == KIND_ACK:
        if n != 1:
            raise ProtocolError("an ack of the wrong arity")
        frame = Ack(r.uint())
    elif kind == KIND_ROUTES:
        if n != 3:
            raise ProtocolError("routes of the wrong arity")
        upsert = []
        for _ in range(r.array()):
            if r.array() != 6:
                raise ProtocolError("a route entry of the wrong shape")
            upsert.append(NodeInfo(r.node(), r.uint(), r.texts(), r.texts()))
        remove = []
        for _ in range(r.array()):
            if r.array() != 3:
                raise ProtocolError("a removal of the wrong shape")
            remove.append(r.node())
        change = []
        for _ in range(r.array()):
            if r.array() != 8:
                raise ProtocolError("a change of the wrong shape")
            change.append(NodeDelta(r.node(), r.uint(), r.texts(), r.texts(), r.texts(), r.texts()))
        frame = Routes(tuple(upsert), tuple(remove), tuple(change))
    elif kind == KIND_CONTROL:
        if n != 2:
            raise ProtocolError("a control frame of the wrong arity")
        frame = Control(r.uint(1 << 32), r.bytes_(max_frame))
    elif kind == KIND_NOTICE:
        link_seq, origin, seq = r.uint(), r.node(), r.uint()
        from_, hops, nkind = r.node(), r.uint(256), r.uint()
        if nkind == 0 and n == 10:
            frame = Notice(link_seq, origin, seq, from_, hops, 0)
        elif nkind == 1 and n == 12:
            fate = r.uint()
            receipt = r.uint(2)
            if fate not in FATES:
                raise ProtocolError("unknown fate")
            frame = Notice(link_seq, origin, seq, from_, hops, 1, fate=fate, receipt=bool(receipt))
        elif nkind == 2 and n == 13:
            frame = Notice(link_seq, origin, seq, from_, hops, 2, moved_to=r.node())
        else:
            raise ProtocolError("a notice of an unknown kind or the wrong arity")
    else:
        raise ProtocolError(f"unknown frame kind {kind}")
    r.end()
    return frame


class Deframer:
    """Splits a byte stream into frames, whatever the split; the length is checked against
    the limit before anything is kept for a frame."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.buf = bytearray()

    def feed(self, data: bytes) -> List[Frame]:
        """The frames completed by ``data``; :class:`ProtocolError` on a bad one."""
        self.buf += data
        out: List[Frame] = []
        while len(self.buf) >= 4:
            (length,) = struct.unpack(">I", self.buf[:4])
            if length == 0 or length > self.max_frame:
                raise ProtocolError(f"a frame of {length} bytes (limit {self.max_frame})")
            if len(self.buf) < 4 + length:
                break
            kind = self.buf[4]
            body = bytes(self.buf[5 : 4 + length])
            del self.buf[: 4 + length]
            out.append(decode_body(kind, body, self.max_frame))
        return out


def decode_stream(data: bytes) -> List[Frame]:
    """Every frame of a complete byte stream."""
    d = Deframer()
    frames = d.feed(data)
    if d.buf:
        raise ProtocolError("a stream that ends inside a frame")
    return frames


def diagnostic(body: bytes) -> str:
    """A frame body in CBOR diagnostic notation, as the vectors show it."""

    def item(v: object) -> str:
        if isinstance(v, bool) or v is None:
            raise ProtocolError("outside the wire's subset")
        if isinstance(v, int):
            return str(v)
        if isinstance(v, bytes):
            return "h'" + v.hex() + "'"
        if isinstance(v, str):
            import json

            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(item(x) for x in v) + "]"
        raise ProtocolError("outside the wire's subset")

    return item(cbor2.loads(body))
