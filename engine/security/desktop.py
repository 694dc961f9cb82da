"""The desktop's keys: its identity and the agents it has paired with.

Kept under the desktop's state dir ($CORRAL_STATE_DIR, else the platform's user state dir):
identity/key.pem + cert.pem (owner-only) and paired-agents.json.
"""

from __future__ import annotations

import os
import ssl
import threading
from pathlib import Path

import platformdirs

from .identity import Identity, load_or_create
from .pins import Peer, PinStore
from .tls import client_context


def desktop_dir() -> Path:
    return Path(os.environ.get("CORRAL_STATE_DIR") or platformdirs.user_state_dir("corral"))


class DesktopKeys:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.identity: Identity = load_or_create(root / "identity", "desktop")
        self.pins = PinStore(root / "paired-agents.json")
        self.ctx: ssl.SSLContext = client_context(self.identity)
        self.pairing_ctx: ssl.SSLContext = client_context(None)

    def agent(self, fingerprint: str) -> Peer | None:
        return self.pins.find(fingerprint)


_cache: dict[Path, DesktopKeys] = {}
_lock = threading.Lock()


def desktop_keys(root: Path | None = None) -> DesktopKeys:
    """The keys of this desktop (made on first use), one object per state dir."""
    path = (root or desktop_dir()).resolve()
    with _lock:
        keys = _cache.get(path)
        if keys is None:
            keys = _cache[path] = DesktopKeys(path)
        return keys
