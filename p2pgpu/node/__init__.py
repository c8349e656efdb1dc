"""The trio + py-libp2p driver of the protocol cores: the node daemon.

Public: :class:`Node`, :class:`NodeOptions`, the topic and protocol names, and
the control API client (:func:`call`, :class:`DaemonUnavailable`).
"""

from ._control import ControlError, DaemonUnavailable, call, call_stream
from ._daemon import ADVERTS_TOPIC, MARKET_PROTOCOL, STREAM_PROTOCOLS, TOPICS, Node, NodeOptions, wall_ms
from ._market import market_row

__all__ = [
    "ADVERTS_TOPIC",
    "MARKET_PROTOCOL",
    "ControlError",
    "DaemonUnavailable",
    "Node",
    "NodeOptions",
    "STREAM_PROTOCOLS",
    "TOPICS",
    "call",
    "call_stream",
    "market_row",
    "wall_ms",
]
