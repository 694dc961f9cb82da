"""Pairing: a one-time code shown on the agent, typed on the desktop, never sent anywhere.

Both sides run SPAKE2 over the code inside a TLS connection (the desktop has no client
certificate yet), then confirm the shared key with a MAC over both certificate fingerprints
as each side sees them. A wrong code, a man in the middle (who sees other fingerprints) and a
replayed exchange (the agent's SPAKE2 half is fresh every time) all fail the confirmation.
SPAKE2 gives a guesser one try per exchange; the agent allows five, then locks the code.

Both halves of the exchange are here, side by side: `pair_with_agent` is the desktop's,
`answer_pairing` the agent's. Each talks to a `PairingChannel` (send a message, wait for
the next), so neither knows about sockets, and the order of the four messages

    desktop                          agent
    PairStart(name, cert, spake A) →
                                   ← PairChallenge(spake B, agent's MAC)
    PairConfirm(desktop's MAC)     →
                                   ← PairDone(agent id, hostname)   (or ErrorReply)

is read in one file.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from spake2 import SPAKE2_A, SPAKE2_B

from corral.engine.protocol import (
    ErrorCode,
    ErrorReply,
    Message,
    PairChallenge,
    PairConfirm,
    PairDone,
    PairStart,
)

from .files import SecurityFileError
from .identity import Identity, fingerprint
from .pins import Peer

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


# ---------------------------------------------------------------- the exchange, both halves


class PairingChannel(Protocol):
    """What pairing needs from a connection: send one message, wait for the next.

    `recv` returns None when the peer closed or said nothing for `timeout` seconds; a side
    may instead raise PairingRefused with a message that names what went wrong."""

    def send(self, msg: Message) -> None: ...

    async def recv(self, timeout: float) -> Message | None: ...


STEP_TIMEOUT = 3.0  # seconds the agent waits for each of the desktop's messages
NOTHING_TO_PAIR_TIMEOUT = 0.75  # ...when it has no usable code: one short step to say why


def _expect(msg: Message | None, kind: type, who: str) -> None:
    if msg is None:
        raise PairingRefused(f"{who} closed the connection during pairing")
    if isinstance(msg, ErrorReply):
        raise PairingRefused(f"{who}: {msg.message}")
    if not isinstance(msg, kind):
        raise PairingRefused(f"{who} answered pairing with {msg}")


async def pair_with_agent(
    ch: PairingChannel, code: str, me: Identity, fp_agent: str, who: str, timeout: float
) -> PairDone:
    """The desktop's half: prove the code, check the agent proved it too, return its
    PairDone. `fp_agent` is the certificate the TLS connection saw; `who` names the agent in
    messages. PairingRefused says what went wrong (a wrong code reads as such)."""
    try:
        side, spake_a = desktop_start(code)
    except ValueError as exc:
        raise PairingRefused(str(exc)) from None
    fp_desktop = me.fingerprint
    ch.send(PairStart(req=1, name=me.name, cert=me.cert_der, spake=spake_a))
    challenge = await ch.recv(timeout)
    _expect(challenge, PairChallenge, who)
    assert isinstance(challenge, PairChallenge)
    try:
        key = desktop_finish(side, challenge.spake)
    except ValueError as exc:
        raise PairingRefused(str(exc)) from None
    if not hmac.compare_digest(challenge.confirm, agent_confirm(key, fp_agent, fp_desktop)):
        raise PairingRefused(
            f"pairing with {who} failed: the code is wrong (or someone between this desktop "
            "and the agent is intercepting); check the code and try again"
        )
    ch.send(PairConfirm(req=2, confirm=desktop_confirm(key, fp_agent, fp_desktop)))
    done = await ch.recv(timeout)
    _expect(done, PairDone, who)
    assert isinstance(done, PairDone)
    return done


@dataclass(frozen=True)
class AgentSide:
    """What the agent's half needs: its code, who it is, and where a new pin is kept."""

    gate: PairingGate
    fingerprint: str  # the agent's own certificate
    agent_id: str
    hostname: str
    port: int
    save: Callable[[Peer], None]  # SecurityFileError when it could not be written


def _error(ch: PairingChannel, req: int, code: ErrorCode, message: str) -> None:
    ch.send(ErrorReply.of(req, code, message))


async def answer_pairing(ch: PairingChannel, side: AgentSide) -> Peer | None:
    """The agent's half, for a desktop it has no pin for: check its proof of the code, prove
    ours, keep its certificate. The pin it saved, or None when pairing did not happen (the
    desktop was told why, where it was still listening)."""
    gate, host = side.gate, side.hostname
    start = await ch.recv(NOTHING_TO_PAIR_TIMEOUT if gate.refusal() else STEP_TIMEOUT)
    if start is None:
        return None
    if not isinstance(start, PairStart):
        _error(
            ch,
            getattr(start, "req", 0),
            ErrorCode.NOT_PAIRED,
            f"{host} has not paired with this desktop: run `corral pair {host}:{side.port} "
            "--code CODE` with the code `corral-agent pair` prints on that host",
        )
        return None
    try:
        spake_b, key = gate.begin(start.spake)
    except PairingRefused as exc:
        _error(ch, start.req, ErrorCode.PAIRING_REFUSED, str(exc))
        raise
    fp_desktop = fingerprint(start.cert)
    fp_agent = side.fingerprint
    ch.send(
        PairChallenge(
            req=start.req, spake=spake_b, confirm=agent_confirm(key, fp_agent, fp_desktop)
        )
    )
    confirm = await ch.recv(STEP_TIMEOUT)
    if not isinstance(confirm, PairConfirm):
        raise PairingRefused("pairing abandoned (wrong code?)")
    if not hmac.compare_digest(confirm.confirm, desktop_confirm(key, fp_agent, fp_desktop)):
        wrong = "wrong pairing code: check it and try again"
        if gate.locked:
            wrong = f"wrong pairing code; pairing is now locked: {gate.fix}"
        _error(ch, confirm.req, ErrorCode.PAIRING_REFUSED, wrong)
        raise PairingRefused("wrong code")
    if not valid_certificate(start.cert):
        _error(ch, confirm.req, ErrorCode.BAD_MESSAGE, "the desktop's certificate is not valid")
        return None
    peer = Peer(
        fingerprint=fp_desktop, name=start.name.strip()[:128] or "desktop", cert_der=start.cert
    )
    try:
        side.save(peer)
    except SecurityFileError as exc:  # a full disk: nothing was paired, the code stays
        _error(
            ch,
            confirm.req,
            ErrorCode.INTERNAL,
            f"{host} could not save the pairing: {exc}. Free space there, then pair again "
            "with the same code",
        )
        raise PairingRefused(f"pairing with {peer.name} not saved: {exc}") from None
    gate.succeeded()
    ch.send(PairDone(req=confirm.req, agent_id=side.agent_id, hostname=host))
    return peer


def valid_certificate(der: bytes) -> bool:
    """Whether `der` parses as an X.509 certificate (what a desktop sends to be pinned)."""
    from cryptography import x509

    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return True
