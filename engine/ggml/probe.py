"""Speak just enough ggml RPC (the HELLO command) to check an endpoint without llama.cpp.

llama.cpp aborts the whole process when a registered RPC server is unreachable or speaks
another protocol version, so the desktop asks each endpoint itself first.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

_CMD_HELLO = 14  # fixed forever by ggml-rpc ("RPC_CMD_HELLO must be always 14")
_CAPS = 24  # RPC_CONN_CAPS_SIZE; all-zero caps asks for plain TCP
_HELLO = bytes([_CMD_HELLO]) + struct.pack("<Q", _CAPS) + bytes(_CAPS)
_REPLY = 4 + _CAPS


class RpcProbeError(OSError):
    """The endpoint is not a ggml RPC server we can use; the message says why."""


def probe_rpc(
    endpoint: str,
    timeout: float = 3.0,
    connect: Callable[[float], socket.socket] | None = None,
) -> tuple[int, int, int]:
    """Connect to host:port (or call `connect(timeout)`, for an endpoint reached some other
    way: a tunnel's or a worker's Unix socket), say HELLO, and return the server's RPC
    protocol version. `endpoint` names it in messages."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        if connect is not None:
            opened = connect(timeout)
            opened.settimeout(timeout)
        else:
            opened = socket.create_connection((host, int(port)), timeout=timeout)
            opened.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with opened as sock:
            sock.sendall(_HELLO)
            (size,) = struct.unpack("<Q", _recv_exactly(sock, 8, endpoint))
            if size != _REPLY:
                raise RpcProbeError(
                    f"RPC endpoint {endpoint} answered HELLO with {size} bytes, expected "
                    f"{_REPLY}: it runs another ggml RPC protocol generation"
                )
            data = _recv_exactly(sock, _REPLY, endpoint)
    except TimeoutError:
        raise RpcProbeError(
            f"RPC endpoint {endpoint} did not answer HELLO within {timeout:.0f} s "
            "(busy serving another client, or not a ggml RPC server)"
        ) from None
    except ValueError:
        raise RpcProbeError(f"bad RPC endpoint {endpoint!r}: expected HOST:PORT") from None
    except OSError as exc:
        if isinstance(exc, RpcProbeError):
            raise
        raise RpcProbeError(
            f"cannot reach RPC endpoint {endpoint}: {exc.strerror or exc}"
        ) from None
    return data[0], data[1], data[2]


def _recv_exactly(sock: socket.socket, n: int, endpoint: str) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RpcProbeError(f"RPC endpoint {endpoint} closed the connection at HELLO")
        data += chunk
    return data
