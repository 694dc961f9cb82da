"""The `_corral._tcp.local.` TXT record: what an agent says about itself before we ask it.

Hints only: the control channel is the truth. A record that is garbled or oversized is ignored
(with a log line by the caller), never trusted partially.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SERVICE_TYPE = "_corral._tcp.local."
MAX_TXT_BYTES = 1024  # our own records are ~100 bytes; anything near a packet is not ours
_ID = re.compile(r"[0-9a-f]{8,64}")


class BadTxt(ValueError):
    """The TXT record is not one a Corral agent writes; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class AgentHints:
    agent_id: str
    corral_version: str
    protocol: str
    gpu_count: int
    vram_total: int
    port: int


def encode_txt(h: AgentHints) -> dict[str, str]:
    return {
        "id": h.agent_id,
        "v": h.corral_version,
        "proto": h.protocol,
        "gpus": str(h.gpu_count),
        "vram": str(h.vram_total),
        "port": str(h.port),
    }


def _int(props: dict[str, str], key: str, low: int, high: int) -> int:
    text = props.get(key, "")
    # isdigit() alone takes "²" and other digits int() refuses
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise BadTxt(f"TXT key {key!r} is {text[:40]!r}, expected a number in {low}..{high}")
    return int(text)


def decode_txt(raw: dict[bytes, bytes | None]) -> AgentHints:
    """Validate a TXT record as zeroconf hands it over (bytes keys and values)."""
    size = sum(len(k) + len(v or b"") + 2 for k, v in raw.items())
    if size > MAX_TXT_BYTES:
        raise BadTxt(f"TXT record of {size} bytes exceeds {MAX_TXT_BYTES}")
    try:
        props = {k.decode("ascii"): (v or b"").decode("utf-8") for k, v in raw.items()}
    except UnicodeDecodeError:
        raise BadTxt("TXT record is not text") from None
    agent_id = props.get("id", "")
    if not _ID.fullmatch(agent_id):
        raise BadTxt(f"TXT key 'id' is {agent_id[:40]!r}, expected 8-64 lowercase hex digits")
    proto = props.get("proto", "")
    if not re.fullmatch(r"\d{1,4}\.\d{1,4}", proto):
        raise BadTxt(f"TXT key 'proto' is {proto[:40]!r}, expected MAJOR.MINOR")
    return AgentHints(
        agent_id=agent_id,
        corral_version=props.get("v", "")[:32],
        protocol=proto,
        gpu_count=_int(props, "gpus", 0, 4096),
        vram_total=_int(props, "vram", 0, 1 << 60),
        port=_int(props, "port", 1, 65535),
    )
