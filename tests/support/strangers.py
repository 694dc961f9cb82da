"""Connection attempts without a paired certificate, for the security test and bench."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from pathlib import Path

from corral.engine.protocol import (
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    InventoryRequest,
    OpenTunnel,
    Ping,
    StartRpc,
    encode_frame,
    from_wire,
    to_wire,
)
from corral.engine.security.tls import client_context

# plaintext hello + requests; random bytes; TLS with a real but unpaired certificate +
# requests; TLS without a certificate + requests (and, slow to test: silence)
KINDS = ("plain-hello", "garbage", "unknown-cert", "no-cert")
ALL_KINDS = (*KINDS, "silent")
# answers that would mean a request was served
SERVED = {"Inventory", "Pong", "WorkerReply", "CapabilityReply", "OkReply", "PairDone", "Peers"}


def attempt(address: str, kind: str, stranger_ctx: ssl.SSLContext) -> tuple[float, list[str]]:
    """One connection attempt without a paired certificate: (seconds until the agent closed
    it, the message types it answered with)."""
    host, _, port = address.rpartition(":")
    hello = encode_frame(
        to_wire(
            Hello(role="desktop", proto_major=PROTOCOL_VERSION[0], proto_minor=PROTOCOL_VERSION[1])
        )
    )
    asks = b"".join(
        encode_frame(to_wire(m)) for m in (InventoryRequest(2), StartRpc(3), Ping(4), OpenTunnel(5))
    )
    start = time.monotonic()
    raw = socket.create_connection((host, int(port)), timeout=5)
    got: list[str] = []
    decoder = FrameDecoder()
    try:
        if kind == "plain-hello":
            raw.sendall(hello + asks)
            sock: socket.socket | ssl.SSLSocket = raw
        elif kind == "silent":  # connects and says nothing at all
            sock = raw
        elif kind == "garbage":
            raw.sendall(os.urandom(512))
            sock = raw
        else:
            ctx = stranger_ctx if kind == "unknown-cert" else client_context(None)
            sock = ctx.wrap_socket(raw)
            sock.sendall(hello + asks)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            if sock is raw:  # the agent answers a non-TLS peer with a TLS alert record, if at all
                got.append("tls-alert" if data[0] == 0x15 else f"raw {data[:8]!r}")
            else:
                got += [type(from_wire(f)).__name__ for f in decoder.feed(data)]
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        raw.close()
    return time.monotonic() - start, got


def _hello() -> bytes:
    return encode_frame(
        to_wire(
            Hello(role="desktop", proto_major=PROTOCOL_VERSION[0], proto_minor=PROTOCOL_VERSION[1])
        )
    )


def nested_frame() -> bytes:
    """Just under 4 MiB of msgpack that decodes to ~4 million empty lists (~230 MB)."""
    inner = b"\xdc\xff\xff" + b"\x90" * 0xFFFF  # an array of 65535 empty arrays
    body = b"\xdc\x00\x3f" + inner * 63
    return len(body).to_bytes(4, "big") + body


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Crowd:
    """`holders` certificate-less peers that finish TLS, send Hello and hold the connection
    (connecting again whenever the agent closes it), and `bombs` that each send Hello and a
    4 MiB frame of nested empty arrays, all at once, until stopped."""

    def __init__(self, address: str, holders: int, bombs: int = 0) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.stop = threading.Event()
        self.held: list[float] = []  # seconds each holder's connection lasted
        self.closed_by_agent = 0  # holder connections the agent ended (not the crowd)
        self._threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(holders)]
        self._threads += [threading.Thread(target=self._bomb, daemon=True) for _ in range(bombs)]

    def __enter__(self) -> Crowd:
        for t in self._threads:
            t.start()
        return self

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _connect(self, payload: bytes) -> None:
        try:
            raw = socket.create_connection((self.host, self.port), timeout=10)
        except OSError:
            time.sleep(0.05)
            return
        t0 = time.monotonic()
        ended = False
        try:
            sock = client_context(None).wrap_socket(raw)
            sock.sendall(payload)
            while sock.recv(65536) and not self.stop.is_set():
                pass
            ended = not self.stop.is_set()
        except (OSError, ssl.SSLError):
            ended = True  # closed on us
        finally:
            if len(payload) < 1024:
                self.held.append(time.monotonic() - t0)
                self.closed_by_agent += ended
            raw.close()
        time.sleep(0.05)

    def _hold(self) -> None:
        hello = _hello()
        while not self.stop.is_set():
            self._connect(hello)

    def _bomb(self) -> None:
        self._connect(_hello() + nested_frame())


def paired_connects(address: str, n: int = 8) -> int:
    """How many of `n` connects (connect, ping, close) this desktop's paired client makes."""
    import asyncio

    from corral.engine.runtime.agent_client import AgentClient

    async def run() -> int:
        ok = 0
        for _ in range(n):
            client = AgentClient(address)
            try:
                await client.connect()
                await client.ping()
                ok += 1
            except Exception:
                pass
            finally:
                await client.close()
        return ok

    return asyncio.run(run())
