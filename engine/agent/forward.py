"""--trusted-network's plain endpoint: a TCP forwarder from the agent's address to the worker.

The ggml RPC port is unauthenticated; desktops reach the worker through the authenticated
tunnel, and through here only where the agent's owner opted in (--trusted-network).
Protocol objects write straight into the peer transport, with flow control both ways, and
TCP_NODELAY on both sockets: ggml-rpc writes 1-byte and 8-byte pieces separately.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Half(asyncio.Protocol):
    """One side of a forwarded connection; the other side's transport is `peer`."""

    def __init__(self, live: set[_Half]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self._live = live
        self._pending = bytearray()  # bytes that arrived before the peer connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._live.add(self)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self._pending += data

    def attach(self, peer: _Half) -> None:
        self.peer = peer
        if self._pending and peer.transport is not None:
            peer.transport.write(bytes(self._pending))
            self._pending.clear()

    def eof_received(self) -> bool:
        self._close_peer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        self._close_peer()

    def _close_peer(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # flow control: when our transport's buffer fills, stop reading from the peer
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Forwarder:
    """Listens on (host, port) and connects each client to the worker with the function
    `target()` returns (None: not running), called with a timeout in a thread."""

    def __init__(self, target: Callable[[], Callable[[float], socket.socket] | None]) -> None:
        self._target = target
        self._server: asyncio.Server | None = None
        self._connections: set[_Half] = set()

    async def start(self, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    def _accept(self) -> _Half:
        down = _Half(self._connections)
        asyncio.get_running_loop().create_task(self._connect(down))
        return down

    async def _connect(self, down: _Half) -> None:
        connect = self._target()
        if connect is None:
            if down.transport is not None:
                down.transport.close()
            return
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(None, connect, 5.0)
            sock.setblocking(False)
            _, up = await loop.connect_accepted_socket(lambda: _Half(self._connections), sock)
        except OSError as exc:
            log.warning("tunnel: the RPC worker is unreachable: %s", exc)
            if down.transport is not None:
                down.transport.close()
            return
        if down.transport is None or down.transport.is_closing():
            if up.transport is not None:
                up.transport.close()
            return
        up.peer = down
        down.attach(up)

    def drop_all(self) -> None:
        """Close every forwarded connection (the worker behind them is gone)."""
        for half in list(self._connections):
            if half.transport is not None:
                half.transport.close()
        self._connections.clear()

    async def close(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
