"""A Python leaf worker: takes a name, answers every message with the same value and a
receipt, and says how its own receipts ended. Started by a forkbus process with
``Bus::exec_node`` (``tests/python_worker.rs`` runs it)."""

from __future__ import annotations

import sys

from forkbus import Message, Outcome, Worker


def main() -> int:
    worker = Worker.from_env()
    name = sys.argv[1] if len(sys.argv) > 1 else "py-echo"
    worker.register_name(name)
    delivered = []

    def on_message(w: Worker, m: Message) -> None:
        value = m.decode()
        if value == "report":
            w.send(m.origin, f"delivered {len(delivered)}")
        else:
            w.send(m.origin, value, receipt=True)

    def on_outcome(w: Worker, o: Outcome) -> None:
        if o.delivered:
            delivered.append(o.seq)

    worker.on_message = on_message
    worker.on_outcome = on_outcome
    worker.send(worker.parent, f"ready {name}")
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
