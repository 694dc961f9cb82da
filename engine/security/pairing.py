"""Pairing: a one-time code shown on the agent, typed on the desktop, never sent anywhere.

Both sides run SPAKE2 over the code inside a TLS connection (the desktop has no client
certificate yet), then confirm the shared key with a MAC over both certificate fingerprints
as each side sees them. A wrong code, a man in the middle (who sees other fingerprints) and a
replayed exchange (the agent's SPAKE2 half is fresh every time) all fail the confirmation.
SPAKE2 gives a guesser one try per exchange; the agent allows five, then locks the code.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from spake2 import SPAKE2_A, SPAKE2_B

CODE_TTL = 300.0  # seconds a code stays valid
MAX_TRIES = 5
_ID_DESKTOP = b"corral-desktop"
_ID_AGENT = b"corral-agent"


class PairingRefused(Exception):
    """Pairing cannot go on; the message says why and what to do."""


def new_code() -> str:
    """Eight random digits, shown as 1234-5678."""
    digits = f"{secrets.randbelow(10**8):08d}"
    return f"{digits[:4]}-{digits[4:]}"


def normalize(code: str) -> str:
    """What is compared: the code without spaces and dashes, lowercased."""
    return "".join(ch for ch in code.lower() if ch not in " -\t")


def check_code_text(code: str) -> str:
    """A usable code for --pairing-code / --code, or ValueError saying what is wrong."""
    norm = normalize(code)
    if len(norm) < 6 or not norm.isascii() or not norm.isalnum():
        raise ValueError(
            f"{code!r} is not a pairing code: use at least 6 letters or digits (dashes and "
            "spaces are ignored), for example 4821-0937"
        )
    return norm


def check_chosen_code(code: str) -> str:
    """A code the agent's owner chose (--pairing-code, `corral-agent pair --code`): usable,
    and at least as hard to guess as a random one (8 digits, 10^8): 8 or more characters, or
    6 or more with a letter among them (36^6 > 10^8). ValueError says what is wrong."""
    norm = check_code_text(code)
    if len(norm) < 8 and norm.isdigit():
        raise ValueError(
            f"a pairing code of {len(norm)} digits is easier to guess than the random one (8 "
            "digits): use 8 or more characters, or 6 or more with letters"
        )
    return norm


def _mac(key: bytes, role: bytes, fp_agent: str, fp_desktop: str) -> bytes:
    msg = b"corral-pair-v1|" + role + b"|" + fp_agent.encode() + b"|" + fp_desktop.encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


def agent_confirm(key: bytes, fp_agent: str, fp_desktop: str) -> bytes:
    return _mac(key, b"agent", fp_agent, fp_desktop)


def desktop_confirm(key: bytes, fp_agent: str, fp_desktop: str) -> bytes:
    return _mac(key, b"desktop", fp_agent, fp_desktop)


def desktop_start(code: str) -> tuple[SPAKE2_A, bytes]:
    side = SPAKE2_A(check_code_text(code).encode(), idA=_ID_DESKTOP, idB=_ID_AGENT)
    return side, side.start()


def desktop_finish(side: SPAKE2_A, theirs: bytes) -> bytes:
    """The shared key; ValueError when the agent's message is not a group element."""
    try:
        return bytes(side.finish(theirs))
    except Exception as exc:  # spake2 raises its own error types for bad points
        raise ValueError(f"the agent's pairing message is not valid ({exc})") from None


@dataclass
class _Code:
    text: str  # normalized
    expires: float  # time.monotonic()
    tries_left: int = MAX_TRIES


class PairingGate:
    """The agent's current code: issue, check, count tries, consume on success.

    Every exchange costs one try when it starts (a guesser who hangs up after seeing the
    agent's confirmation still paid for the guess); success consumes the code.
    """

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self._code: _Code | None = None

    def issue(self, code: str = "", ttl: float = CODE_TTL) -> str:
        """A new code (random, or `code`), valid for `ttl` seconds; replaces any other."""
        shown = code.strip() or new_code()
        self._code = _Code(check_chosen_code(shown), time.monotonic() + ttl)
        return shown

    def expires_in(self) -> float:
        return max(0.0, self._code.expires - time.monotonic()) if self._code else 0.0

    @property
    def locked(self) -> bool:
        return self._code is not None and self._code.tries_left <= 0

    @property
    def fix(self) -> str:
        return f"run `corral-agent pair` on {self._hostname} for a new code"

    def refusal(self) -> str:
        """Why a pairing attempt now would be refused ("" while a code is usable); uses no
        try. The agent gives a peer with nothing to pair with one short step, not five."""
        code = self._code
        if code is None:
            return f"{self._hostname} has no pairing code active: {self.fix}"
        if time.monotonic() > code.expires:
            return f"the pairing code of {self._hostname} has expired: {self.fix}"
        if code.tries_left <= 0:
            return f"pairing is locked after {MAX_TRIES} wrong codes: {self.fix}"
        return ""

    def begin(self, spake_a: bytes) -> tuple[bytes, bytes]:
        """Answer SPAKE2 message A with (message B, shared key), or PairingRefused."""
        fix = self.fix
        code = self._code
        if code is None:
            raise PairingRefused(f"{self._hostname} has no pairing code active: {fix}")
        if time.monotonic() > code.expires:
            self._code = None
            raise PairingRefused(f"the pairing code of {self._hostname} has expired: {fix}")
        if code.tries_left <= 0:
            raise PairingRefused(f"pairing is locked after {MAX_TRIES} wrong codes: {fix}")
        code.tries_left -= 1
        side = SPAKE2_B(code.text.encode(), idA=_ID_DESKTOP, idB=_ID_AGENT)
        b = side.start()
        try:
            key = bytes(side.finish(spake_a))
        except Exception as exc:  # spake2 raises its own error types for bad points
            raise PairingRefused(f"the desktop's pairing message is not valid ({exc})") from None
        return b, key

    def succeeded(self) -> None:
        """The code did its job: it is gone (one-time)."""
        self._code = None
