"""Identities, pin lists and the pairing gate: files, permissions, expiry, tries."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

from corral.engine.protocol import Message, PairDone
from corral.engine.security.files import SecurityFileError
from corral.engine.security.identity import load_or_create
from corral.engine.security.pairing import (
    MAX_TRIES,
    AgentSide,
    PairingGate,
    PairingRefused,
    agent_confirm,
    answer_pairing,
    check_code_text,
    desktop_confirm,
    desktop_finish,
    desktop_start,
    new_code,
    pair_with_agent,
)
from corral.engine.security.pins import Peer, PinStore


def test_identity_is_made_once_owner_only_and_kept(tmp_path: Path) -> None:
    first = load_or_create(tmp_path / "id", "desktop", "ada@studio")
    assert first.name == "ada@studio" and len(first.fingerprint) == 64
    for path in (first.key_path, first.cert_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "id").st_mode) == 0o700
    assert load_or_create(tmp_path / "id", "desktop").fingerprint == first.fingerprint


def test_a_damaged_identity_is_refused_not_replaced(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path, "agent")
    ident.key_path.write_text("not a key")
    with pytest.raises(SecurityFileError, match=r"damaged.*delete .*key\.pem"):
        load_or_create(tmp_path, "agent")
    assert ident.key_path.read_text() == "not a key"  # nothing was overwritten
    other = load_or_create(tmp_path / "other", "agent")
    ident.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(SecurityFileError, match="does not belong"):
        load_or_create(tmp_path, "agent")


def test_pins_add_find_replace_remove(tmp_path: Path) -> None:
    a = load_or_create(tmp_path / "a", "agent", "gpu-a")
    b = load_or_create(tmp_path / "b", "agent", "gpu-b")
    pins = PinStore(tmp_path / "pins.json")
    pins.add(Peer(a.fingerprint, "gpu-a", a.cert_der, peer_id="id-a", address="10.0.0.2:7340"))
    pins.add(Peer(b.fingerprint, "gpu-b", b.cert_der, peer_id="id-b"))
    assert stat.S_IMODE(os.stat(pins.path).st_mode) == 0o600
    assert pins.find(a.fingerprint) is not None and pins.find("0" * 64) is None
    # the same agent id with a new certificate (the agent's identity was remade) replaces it
    c = load_or_create(tmp_path / "c", "agent", "gpu-a")
    pins.add(Peer(c.fingerprint, "gpu-a", c.cert_der, peer_id="id-a"))
    assert {p.name for p in pins.peers()} == {"gpu-a", "gpu-b"}
    assert pins.find(a.fingerprint) is None
    assert [p.name for p in pins.remove(b.fingerprint[:10])] == ["gpu-b"]
    assert pins.remove("nobody") == []
    assert [p.name for p in pins.peers()] == ["gpu-a"]


def test_a_damaged_pin_list_says_which_file(tmp_path: Path) -> None:
    pins = PinStore(tmp_path / "pins.json")
    pins.path.write_text('{"peers": [{"fingerprint": "ab", "cert": "!!"}]}')
    with pytest.raises(SecurityFileError, match=r"pins\.json is damaged"):
        pins.peers()


def _exchange(gate: PairingGate, code: str) -> bool:
    """One full exchange with the real SPAKE2 halves; True when both confirmations match."""
    side, a = desktop_start(code)
    b, agent_key = gate.begin(a)
    key = desktop_finish(side, b)
    ok = desktop_confirm(key, "fa", "fd") == desktop_confirm(agent_key, "fa", "fd")
    assert ok == (agent_confirm(key, "fa", "fd") == agent_confirm(agent_key, "fa", "fd"))
    if ok:
        gate.succeeded()
    return ok


def test_the_right_code_pairs_once() -> None:
    gate = PairingGate("gpu-a")
    code = gate.issue()
    assert check_code_text(code) and len(code) == 9
    assert _exchange(gate, code)
    with pytest.raises(PairingRefused, match="no pairing code active"):
        _exchange(gate, code)


def test_five_wrong_codes_lock_even_the_right_one() -> None:
    gate = PairingGate("gpu-a")
    code = gate.issue("4821-0937")
    for _ in range(MAX_TRIES):
        assert not _exchange(gate, "0000-0000")
    assert gate.locked
    with pytest.raises(PairingRefused, match=r"locked after 5 wrong codes.*corral-agent pair"):
        _exchange(gate, code)
    assert _exchange(gate, gate.issue())  # a new code unlocks


def test_an_expired_code_is_refused() -> None:
    gate = PairingGate("gpu-a")
    code = gate.issue(ttl=0.05)
    time.sleep(0.1)
    with pytest.raises(PairingRefused, match="expired"):
        _exchange(gate, code)


def test_fingerprints_are_bound_into_the_confirmation() -> None:
    side, a = desktop_start("12345678")
    gate = PairingGate("h")
    gate.issue("12345678")
    b, k = gate.begin(a)
    key = desktop_finish(side, b)
    assert desktop_confirm(key, "fa", "fd") == desktop_confirm(k, "fa", "fd")
    # a man in the middle shows the desktop another agent certificate: no match
    assert desktop_confirm(key, "fa-mitm", "fd") != desktop_confirm(k, "fa", "fd")


@pytest.mark.parametrize("bad", ["", "12", "12 34", "abc!defg", "ñññññññ"])
def test_bad_code_text(bad: str) -> None:
    with pytest.raises(ValueError, match="not a pairing code"):
        check_code_text(bad)


def test_codes_are_random() -> None:
    assert len({new_code() for _ in range(50)}) > 45


class _Pipe:
    """One end of an in-memory pairing channel (the halves never see a socket)."""

    def __init__(self, inbox: asyncio.Queue[Message], outbox: asyncio.Queue[Message]) -> None:
        self.inbox, self.outbox = inbox, outbox

    def send(self, msg: Message) -> None:
        self.outbox.put_nowait(msg)

    async def recv(self, timeout: float) -> Message | None:
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return None


def _both_halves(
    tmp_path: Path, agent_code: str, typed: str, *, seen_agent_fp: str = "", save_fails=False
) -> tuple[object, object, list[Peer]]:
    """Run the desktop's and the agent's half against each other; what each ended with."""
    desktop = load_or_create(tmp_path / "desktop", "desktop", "ada@studio")
    agent = load_or_create(tmp_path / "agent", "agent", "gpu-a")
    gate = PairingGate("gpu-a")
    gate.issue(agent_code)
    saved: list[Peer] = []

    def save(peer: Peer) -> None:
        if save_fails:
            raise SecurityFileError("no space left on device")
        saved.append(peer)

    side = AgentSide(gate, agent.fingerprint, "agent-1", "gpu-a", 7399, save)

    async def run() -> tuple[object, object]:
        to_agent: asyncio.Queue[Message] = asyncio.Queue()
        to_desktop: asyncio.Queue[Message] = asyncio.Queue()
        fp = seen_agent_fp or agent.fingerprint
        return tuple(
            await asyncio.gather(
                pair_with_agent(_Pipe(to_desktop, to_agent), typed, desktop, fp, "agent gpu-a", 5),
                answer_pairing(_Pipe(to_agent, to_desktop), side),
                return_exceptions=True,
            )
        )

    mine, theirs = asyncio.run(run())
    return mine, theirs, saved


def test_the_two_halves_pair_and_pin_each_other(tmp_path: Path) -> None:
    mine, theirs, saved = _both_halves(tmp_path, "4821-0937", "4821 0937")
    assert isinstance(mine, PairDone) and mine.agent_id == "agent-1" and mine.hostname == "gpu-a"
    desktop = load_or_create(tmp_path / "desktop", "desktop")
    assert isinstance(theirs, Peer) and saved == [theirs]
    assert theirs.fingerprint == desktop.fingerprint and theirs.name == "ada@studio"


def test_the_two_halves_refuse_a_wrong_code_on_both_sides(tmp_path: Path) -> None:
    mine, theirs, saved = _both_halves(tmp_path, "4821-0937", "4821-0938")
    assert isinstance(mine, PairingRefused) and "code is wrong" in str(mine)
    assert isinstance(theirs, PairingRefused) and saved == []


def test_a_man_in_the_middle_fails_the_confirmation(tmp_path: Path) -> None:
    # the desktop's TLS connection saw another certificate than the agent's own
    mine, theirs, saved = _both_halves(tmp_path, "4821-0937", "4821-0937", seen_agent_fp="ff" * 32)
    assert isinstance(mine, PairingRefused) and "intercepting" in str(mine)
    assert not isinstance(theirs, Peer) and saved == []


def test_a_pin_not_saved_is_reported_and_pairs_nothing(tmp_path: Path) -> None:
    mine, theirs, saved = _both_halves(tmp_path, "4821-0937", "4821-0937", save_fails=True)
    assert isinstance(mine, PairingRefused)
    assert "could not save the pairing" in str(mine) and "pair again" in str(mine)
    assert isinstance(theirs, PairingRefused) and saved == []
