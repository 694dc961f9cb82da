"""The peers this side has paired with, by certificate fingerprint (pins.json, owner-only).

The file is read on every lookup, so a pairing made by one process (`corral pair`) is seen at
once by another (the desktop app), and written atomically, so a crash or a full disk never
leaves half a list.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import SecurityFileError, write_private
from .identity import fingerprint

_VERSION = 1


@dataclass(frozen=True)
class Peer:
    fingerprint: str
    name: str  # the peer's own name: hostname for an agent, user@host for a desktop
    cert_der: bytes
    peer_id: str = ""  # an agent's id (the desktop side keeps it)
    address: str = ""  # where the desktop last reached this agent
    paired_at: float = 0.0

    def matches(self, text: str) -> bool:
        """Does `text` name this peer: fingerprint (or a prefix of 8+), name, id or address."""
        t = text.strip().lower().replace(":", "")
        return bool(t) and (
            (len(t) >= 8 and self.fingerprint.startswith(t))
            or text.strip() in (self.name, self.peer_id, self.address)
        )


class PinStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def peers(self) -> list[Peer]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SecurityFileError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        fix = f"fix or delete {self.path} (deleting it forgets every pairing)"
        try:
            data = json.loads(raw)
            items = data["peers"] if isinstance(data, dict) else None
            if not isinstance(items, list):
                raise ValueError("no list of peers")
            out = []
            for item in items:
                der = base64.b64decode(item["cert"], validate=True)
                if fingerprint(der) != item["fingerprint"]:
                    raise ValueError(f"the certificate of {item.get('name')!r} does not match")
                out.append(
                    Peer(
                        fingerprint=str(item["fingerprint"]),
                        name=str(item.get("name", "")),
                        cert_der=der,
                        peer_id=str(item.get("peer_id", "")),
                        address=str(item.get("address", "")),
                        paired_at=float(item.get("paired_at", 0.0)),
                    )
                )
            return out
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise SecurityFileError(f"{self.path} is damaged ({exc}): {fix}") from None

    def find(self, fp: str) -> Peer | None:
        return next((p for p in self.peers() if p.fingerprint == fp), None)

    def add(self, peer: Peer) -> None:
        """Pin `peer`, replacing an older pin with the same fingerprint or the same agent id."""
        if not peer.paired_at:
            peer = Peer(**{**asdict(peer), "paired_at": time.time()})
        kept = [
            p
            for p in self.peers()
            if p.fingerprint != peer.fingerprint
            and not (peer.peer_id and p.peer_id == peer.peer_id)
        ]
        self._write([*kept, peer])

    def remove(self, text: str) -> list[Peer]:
        """Forget every peer `text` names; return them (empty when none matched)."""
        peers = self.peers()
        gone = [p for p in peers if p.matches(text)]
        if gone:
            self._write([p for p in peers if p not in gone])
        return gone

    def _write(self, peers: list[Peer]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        items = []
        for p in peers:
            d = asdict(p)
            d["cert"] = base64.b64encode(d.pop("cert_der")).decode()
            items.append(d)
        body = json.dumps({"version": _VERSION, "peers": items}, indent=1) + "\n"
        write_private(self.path, body.encode())
