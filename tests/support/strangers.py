"""Connection attempts without a paired certificate, for the security test and bench."""

from __future__ import annotations

import os
import socket
import ssl
import time

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
