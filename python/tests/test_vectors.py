"""The package against the wire's conformance vectors (``docs/vectors/frames.json``),
which the Rust tests generate from the Rust implementation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from forkbus import wire

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors" / "frames.json"


def vectors() -> List[Dict[str, Any]]:
    data = json.loads(VECTORS.read_text())
    assert data["wire_version"] == wire.WIRE_VERSION
    return data["vectors"]


@pytest.mark.parametrize("v", vectors(), ids=lambda v: v["name"])
def test_each_vector_decodes_and_encodes_back(v: Dict[str, Any]) -> None:
    raw = bytes.fromhex(v["hex"])
    frames = wire.decode_stream(raw)
    assert len(frames) == 1
    assert raw[4] == v["kind"]
    assert wire.diagnostic(raw[5:]) == v["diag"]
    if v["name"] == "ack-fixed-width":
        # Readers take any head width; writers use the shortest.
        assert frames[0] == wire.Ack(5)
    else:
        assert wire.encode(frames[0]) == raw


def test_the_vectors_cover_every_frame_kind() -> None:
    kinds = {v["kind"] for v in vectors()}
    assert kinds == {1, 2, 3, 4, 5, 6}


def test_a_stream_splits_anywhere() -> None:
    raw = b"".join(bytes.fromhex(v["hex"]) for v in vectors())
    whole = wire.decode_stream(raw)
    d = wire.Deframer()
    got: List[wire.Frame] = []
    for i in range(len(raw)):
        got += d.feed(raw[i : i + 1])
    assert got == whole and not d.buf


@pytest.mark.parametrize(
    "raw",
    [
        bytes.fromhex("00000000"),  # an empty frame
        bytes.fromhex("ffffffff01"),  # over the limit, refused before anything is kept
        bytes.fromhex("0000000209" + "80"),  # an unknown kind
        bytes.fromhex("0000000301" + "8100"),  # a hello of the wrong arity
        bytes.fromhex("0000000303" + "a0" + "00"),  # a map where an array must be
        bytes.fromhex("0000000403" + "8100" + "00"),  # trailing bytes
    ],
)
def test_malformed_frames_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.Deframer().feed(raw)


def test_unknown_flags_and_fates_are_refused() -> None:
    env = next(v for v in vectors() if v["name"] == "envelope-to-node")
    raw = bytearray(bytes.fromhex(env["hex"]))
    frame = wire.decode_stream(bytes(raw))[0]
    assert isinstance(frame, wire.Envelope)
    bad = wire.encode(
        wire.Envelope(
            frame.link_seq, frame.origin, frame.seq, frame.hops, frame.hop_limit,
            8, frame.destination, frame.payload,
        )
    )
    with pytest.raises(wire.ProtocolError):
        wire.decode_stream(bad)
    lost = next(v for v in vectors() if v["name"] == "notice-lost")
    n = wire.decode_stream(bytes.fromhex(lost["hex"]))[0]
    assert isinstance(n, wire.Notice)
    assert wire.FATES[n.fate or 0] == (True, "no route")
    bad_fate = wire.encode(
        wire.Notice(n.link_seq, n.origin, n.seq, n.from_, n.hops, 1, fate=99, receipt=True)
    )
    with pytest.raises(wire.ProtocolError):
        wire.decode_stream(bad_fate)
