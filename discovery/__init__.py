"""corral.discovery: zeroconf advertise (agent), browse (desktop), and the host registry.

Qt-free. Liveness (the heartbeat on the control channel) lives in corral.engine.runtime.hosts,
which feeds its verdicts into the same registry.
"""

from .advertise import Advertiser
from .browse import Browser
from .registry import (
    Advertised,
    Event,
    Host,
    Hosts,
    Inventoried,
    ManualAdded,
    Offline,
    Online,
    Unpaired,
    Withdrawn,
    apply,
)
from .txt import SERVICE_TYPE, AgentHints, BadTxt, decode_txt, encode_txt

__all__ = [
    "SERVICE_TYPE",
    "Advertised",
    "Advertiser",
    "AgentHints",
    "BadTxt",
    "Browser",
    "Event",
    "Host",
    "Hosts",
    "Inventoried",
    "ManualAdded",
    "Offline",
    "Online",
    "Unpaired",
    "Withdrawn",
    "apply",
    "decode_txt",
    "encode_txt",
]
