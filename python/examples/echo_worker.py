"""A Python leaf worker: takes a name (its argument, or the one its supervisor gives it),
answers every message with the same value and a receipt, and says how its own receipts
ended. Started by a forkbus process with ``Bus::exec_node`` or supervised with
``Supervisor::spawn_program`` (``tests/python_worker.rs`` runs it both ways)."""

from __future__ import annotations

import sys

from forkbus import Message, Outcome, Worker


def main() -> int:
    worker = Worker.from_env()  # takes the name its supervisor gave it, if any
    if len(sys.argv) > 1:
        worker.register_name(sys.argv[1])
    name = ",".join(worker.names)
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
