"""The bench's Python leaf: says it is up, then answers every payload with the same bytes
(``benches/bus``, group ``python``)."""

from __future__ import annotations

import sys

from forkbus import Message, Worker


def main() -> int:
    worker = Worker.from_env()

    def echo(w: Worker, m: Message) -> None:
        w.send_bytes(m.origin, m.payload)

    worker.on_message = echo
    worker.send_bytes(worker.parent, b"\x01")  # ready
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
