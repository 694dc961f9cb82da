"""The tunnel's native relay (engine/security/_relay.c) on real sockets, and its wire format
checked against an independent AES-GCM (the `cryptography` package), so a record the relay
accepts is exactly what the format says: length, ciphertext, tag, nonce = IV ^ sequence."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from corral.engine.security import tunnel
from corral.engine.security.tunnel import DesktopTunnel, NativePump, relay_keys
from tests.support.relay import read_record, recv_exactly, seal

relay = tunnel._load_relay()


def test_the_native_relay_is_built() -> None:
    """`make test` installs with a compiler and OpenSSL headers: the relay must be there
    (elsewhere the install goes on without it and tunnels use the Python pumps)."""
    assert relay is not None, "engine/security/_relay.c was not built: see setup.py"
    assert tunnel.relay_mode() != "python"


def test_relay_keys_pair_up_and_differ_per_direction() -> None:
    d, a = os.urandom(32), os.urandom(32)
    desk, agent = relay_keys(d, a, "desktop"), relay_keys(d, a, "agent")
    assert desk[:2] == agent[2:] and desk[2:] == agent[:2]
    assert desk[0] != desk[2]
    assert [len(x) for x in desk] == [32, 12, 32, 12]
    assert relay_keys(os.urandom(32), a, "desktop") != desk
    with pytest.raises(ValueError, match="32 bytes"):
        relay_keys(b"short", a, "desktop")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


@dataclass
class Ends:
    """client ⇄ [desktop relay] ⇄ TCP ⇄ [agent relay] ⇄ server, all real sockets."""

    client: socket.socket
    server: socket.socket
    pumps: list[NativePump] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


@pytest.fixture()
def ends() -> Iterator[Ends]:
    d, a = os.urandom(32), os.urandom(32)
    client, desk_plain = socket.socketpair()
    server, agent_plain = socket.socketpair()
    desk_net, agent_net = _tcp_pair()
    gone: list[NativePump] = []
    e = Ends(client, server)

    def closed(p: NativePump) -> None:
        gone.append(p)
        if len(gone) == 2:
            e.done.set()

    e.pumps = [
        NativePump(desk_net, desk_plain, relay_keys(d, a, "desktop"), on_close=closed),
        NativePump(agent_net, agent_plain, relay_keys(d, a, "agent"), on_close=closed),
    ]
    for p in e.pumps:
        p.start()
    yield e
    client.close()
    server.close()
    assert e.done.wait(10), "a relay did not end after its client closed"


def test_bytes_cross_both_ways_intact_in_every_size(ends: Ends) -> None:
    rng = random.Random(7)
    sizes = [1, 9, 4096, 256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024]
    sizes += [rng.randrange(1, 70_000) for _ in range(40)]
    for size in sizes:
        data = rng.randbytes(size)
        # the server echoes in its own thread, so large payloads do not deadlock on buffers
        echo = threading.Thread(
            target=lambda n=size: ends.server.sendall(recv_exactly(ends.server, n))
        )
        echo.start()
        ends.client.sendall(data)
        assert recv_exactly(ends.client, size) == data, f"{size} bytes came back changed"
        echo.join()
    ends.client.close()
    assert ends.done.wait(10)
    assert [p.ended for p in ends.pumps] == ["", ""]
    assert ends.server.recv(1) == b""  # the end travelled through


def test_closing_a_pump_ends_both_relays(ends: Ends) -> None:
    ends.client.sendall(b"x")
    assert recv_exactly(ends.server, 1) == b"x"
    ends.pumps[1].close()
    assert ends.done.wait(10)
    assert ends.client.recv(1) == b""


Keys = tuple[bytes, bytes, bytes, bytes]


def _one_relay() -> tuple[socket.socket, socket.socket, NativePump, Keys]:
    """A desktop-side relay whose network side is a socket this test writes records into."""
    keys = relay_keys(os.urandom(32), os.urandom(32), "desktop")
    plain_app, plain = socket.socketpair()
    net, peer = _tcp_pair()
    pump = NativePump(net, plain, keys)
    pump.start()
    return plain_app, peer, pump, keys


def _ended(pump: NativePump, *socks: socket.socket) -> str:
    assert pump.wait(10), "the relay did not end"
    for s in socks:
        s.close()
    return pump.ended


def test_records_from_an_independent_aes_gcm_are_accepted_in_order() -> None:
    plain_app, peer, pump, (tx_key, tx_iv, rx_key, rx_iv) = _one_relay()
    try:
        for seq, msg in enumerate([b"hello", b"", b"x" * 100_000, b"end"]):
            peer.sendall(seal(rx_key, rx_iv, seq, msg))
        assert recv_exactly(plain_app, 5 + 100_000 + 3) == b"hello" + b"x" * 100_000 + b"end"
        plain_app.sendall(b"reply")
        assert read_record(peer, tx_key, tx_iv, 0) == b"reply"
    finally:
        plain_app.close()
        peer.close()
        _ended(pump)


def test_ciphertext_that_came_with_the_handshake_is_relayed_first() -> None:
    keys = relay_keys(os.urandom(32), os.urandom(32), "desktop")
    first = seal(keys[2], keys[3], 0, b"early")
    plain_app, plain = socket.socketpair()
    net, peer = _tcp_pair()
    pump = NativePump(net, plain, keys, pending=first)
    pump.start()
    peer.sendall(seal(keys[2], keys[3], 1, b" late"))
    assert recv_exactly(plain_app, 10) == b"early late"
    plain_app.close()
    assert _ended(pump, peer) == ""


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", "failed authentication"),
        ("replay", "failed authentication"),
        ("wrong_key", "failed authentication"),
        ("huge", "larger than the protocol allows"),
        ("cut", "in the middle of a record"),
    ],
)
def test_a_damaged_or_forged_record_ends_the_tunnel_and_delivers_nothing(
    damage: str, reason: str
) -> None:
    plain_app, peer, pump, (_, _, rx_key, rx_iv) = _one_relay()
    good = seal(rx_key, rx_iv, 0, b"first")
    peer.sendall(good)
    assert recv_exactly(plain_app, 5) == b"first"
    second = seal(rx_key, rx_iv, 1, b"second")
    bad = {
        "flip": lambda: second[:6] + bytes([second[6] ^ 1]) + second[7:],
        "replay": lambda: good,  # sequence 0 again: the nonce no longer matches
        "wrong_key": lambda: seal(os.urandom(32), rx_iv, 1, b"second"),
        "huge": lambda: struct.pack(">I", 256 * 1024 + 1) + bytes(64),
        "cut": lambda: second[:10],
    }[damage]()
    peer.sendall(bad)
    if damage == "cut":
        peer.shutdown(socket.SHUT_WR)
    plain_app.settimeout(10)
    assert plain_app.recv(100) == b"", "bytes of a bad record reached the plain side"
    assert reason in _ended(pump, plain_app, peer)


def test_a_pump_closed_before_it_starts_closes_its_sockets_and_never_runs() -> None:
    keys = relay_keys(os.urandom(32), os.urandom(32), "desktop")
    plain_app, plain = socket.socketpair()
    net, peer = _tcp_pair()
    gone: list[NativePump] = []
    pump = NativePump(net, plain, keys, on_close=gone.append)
    pump.close()
    pump.start()  # too late: nothing runs on the closed descriptors
    assert pump.wait(1) and gone == [pump]
    assert plain.fileno() == -1 and net.fileno() == -1
    assert plain_app.recv(1) == b"" and peer.recv(1) == b""
    plain_app.close()
    peer.close()


@pytest.mark.parametrize("native", [True, False], ids=["relay", "python-pumps"])
def test_a_connection_accepted_as_the_tunnel_closes_is_dropped_without_a_deadlock(
    native: bool,
) -> None:
    """The channel opens while the tunnel is being closed: the new pump is closed at once,
    and its close (which reports back to the tunnel) must not wait on the tunnel's lock."""
    opening, release = threading.Event(), threading.Event()
    ends: list[socket.socket] = []

    def open_channel() -> Any:
        opening.set()
        release.wait(10)
        net, peer = _tcp_pair()
        ends.append(peer)
        keys = relay_keys(os.urandom(32), os.urandom(32), "desktop") if native else None
        return SimpleNamespace(
            sock=net, obj=None, inc=None, out=None, relay_keys=keys, leftover=lambda: b""
        )

    tunnel = DesktopTunnel(open_channel, "test")
    app = tunnel.connect_plain(10)
    assert opening.wait(10)
    tunnel.close()
    release.set()
    app.settimeout(10)
    assert app.recv(1) == b"", "the pump was not closed"
    assert ends[0].recv(1) == b""
    # the thread that served the connection has let go of the tunnel's lock
    assert tunnel._lock.acquire(timeout=5), "deadlock: the tunnel's lock is still held"
    tunnel._lock.release()
    assert not tunnel._pumps
    app.close()
    ends[0].close()
