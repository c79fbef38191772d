"""forkbus for Python: a leaf worker of a forkbus tree.

``forkbus.wire`` is the wire (``docs/wire.md``) as Python values; ``forkbus.Worker`` is a
leaf that a forkbus process started with ``Bus::exec_node``.
"""

from forkbus.wire import NodeId, ProtocolError, WIRE_VERSION
from forkbus.worker import Message, Outcome, Worker

__all__ = ["Message", "NodeId", "Outcome", "ProtocolError", "Worker", "WIRE_VERSION"]
