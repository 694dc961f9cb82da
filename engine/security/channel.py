"""Framed messages over TLS 1.3 on the engine's asyncio loop, with memory BIOs.

One `TlsConnection` protocol serves both sides of a control connection. It owns its
`ssl.SSLObject`, so a connection that turns into an RPC tunnel can be handed, socket and TLS
state together, to the threaded pump in `tunnel` (asyncio's own TLS transport cannot be
taken apart like that).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from typing import Any

from corral.engine.aio import within
from corral.engine.protocol import CONTROL, FrameDecoder, FrameLimits, ProtocolError, encode_frame

from .identity import fingerprint

_READ = 256 * 1024


class TlsFailed(ConnectionError):
    """The TLS handshake or a record failed; `reason` is OpenSSL's short reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def set_nodelay(sock: Any) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TlsConnection(asyncio.Protocol):
    def __init__(
        self,
        ctx: ssl.SSLContext,
        server_side: bool,
        handshake_timeout: float,
        hello_timeout: float | None = None,
        limits: FrameLimits = CONTROL,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._inc = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._inc, self._out, server_side=server_side)
        # frames are decoded one at a time, as they are asked for, and nothing more is read
        # while a whole one waits: a peer cannot queue frames (or bytes) faster than the
        # owner handles them
        self._decoder = FrameDecoder(limits)
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        # server side: a client sends its ClientHello with its first write; one that has not
        # within `hello_timeout`, or whose first bytes cannot be one, is dropped at once
        self._server_side = server_side
        self._hello_timeout = hello_timeout
        self._hello_timer: asyncio.TimerHandle | None = None
        self._head = b""
        self._detached = False
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self.peername: Any = None
        self.peer_der = b""  # the certificate the peer proved it holds, b"" if none

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peername = transport.get_extra_info("peername")
        set_nodelay(transport.get_extra_info("socket"))
        self._timer = self._loop.call_later(self._timeout, self._handshake_expired)
        if self._server_side and self._hello_timeout is not None:
            self._hello_timer = self._loop.call_later(self._hello_timeout, self._no_client_hello)
        self._step_handshake()

    def data_received(self, data: bytes) -> None:
        if self._server_side and len(self._head) < 6:
            self._head += data[: 6 - len(self._head)]
            if not _could_be_client_hello(self._head):
                self._fail(TlsFailed("not a TLS ClientHello"))
                return
        self._inc.write(data)
        if not self.handshake.done():
            self._step_handshake()
        else:
            self._read_plain()

    def eof_received(self) -> bool:
        self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._timer, self._hello_timer):
            if timer is not None:
                timer.cancel()
        if not self._detached:
            self._finish(exc)

    # ------------------------------------------------------------------ TLS

    def _step_handshake(self) -> None:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()
            self._fail(TlsFailed(exc.reason or str(exc)))
            return
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
        # kept now: after a fatal alert OpenSSL no longer reports the peer's certificate
        self.peer_der = self.ssl.getpeercert(binary_form=True) or b""
        if not self.handshake.done():
            self.handshake.set_result(None)
        if self._inc.pending:
            self._read_plain()

    def _handshake_expired(self) -> None:
        if not self.handshake.done():
            self._fail(TlsFailed("no TLS handshake in time"))

    def _read_plain(self) -> None:
        chunks = []
        while True:
            try:
                chunk = self.ssl.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._finish(None)
                break
            except ssl.SSLError as exc:
                self._fail(TlsFailed(exc.reason or str(exc)))
                return
            if not chunk:
                self._finish(None)
                break
            chunks.append(chunk)
        self._flush()
        if not chunks:
            return
        self._decoder.push(b"".join(chunks))
        self._flow()
        self._wake()

    def _flow(self) -> None:
        """Read on only while no whole frame waits and less than one frame is buffered."""
        if self.transport is None or self._detached or self.transport.is_closing():
            return
        try:
            full = (
                self._decoder.ready() or self._decoder.buffered > self._decoder.limits.max_frame + 4
            )
        except ProtocolError as exc:
            self._unframeable(exc)
            return
        if full and not self._paused:
            self.transport.pause_reading()
            self._paused = True
        elif not full and self._paused:
            self.transport.resume_reading()
            self._paused = False

    def _unframeable(self, exc: ProtocolError) -> None:
        """The stream cannot be framed any more: stop reading, but leave the connection open
        so the owner can say why before it closes."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self._paused = True
        self._finish(exc)

    def _no_client_hello(self) -> None:
        # cancelled by `_flush` once the server answers a whole ClientHello
        if not self.handshake.done():
            self._fail(TlsFailed("no TLS ClientHello in time"))

    def _flush(self) -> None:
        if self._out.pending and self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self._out.pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._out.read())

    # ------------------------------------------------------------------ state

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _finish(self, exc: BaseException | None) -> None:
        if exc is not None and self._error is None:
            self._error = exc
        self._eof = True
        if not self.handshake.done():
            self.handshake.set_exception(self._error or ConnectionResetError("connection closed"))
            self.handshake.exception()  # mark retrieved: a failed stranger is not news
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._finish(exc)
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ public

    @property
    def peer_fingerprint(self) -> str:
        return fingerprint(self.peer_der) if self.peer_der else ""

    @property
    def closed(self) -> bool:
        return self._eof

    @property
    def limits(self) -> FrameLimits:
        return self._decoder.limits

    @limits.setter
    def limits(self, value: FrameLimits) -> None:
        """Other limits from now on (the agent raises them once a peer proved it is paired)."""
        self._decoder.limits = value
        self._flow()

    async def recv(self) -> Any | None:
        """The next decoded frame; None at a clean end; raises the error that ended it."""
        while True:
            try:
                if self._decoder.ready():
                    frame = self._decoder.pop()
                    self._flow()
                    return frame
            except ProtocolError as exc:
                self._unframeable(exc)
                raise
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            self._waiter = self._loop.create_future()
            await self._waiter

    def send(self, obj: Any) -> None:
        self.send_frame(encode_frame(obj))

    def send_frame(self, frame: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.ssl.write(frame)
        self._flush()

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until the kernel took what was written (bounded)."""
        deadline = self._loop.time() + timeout
        while self.write_buffer_size() and not self._eof and self._loop.time() < deadline:
            await asyncio.sleep(0.002)

    def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.ssl.unwrap()  # close_notify; the peer's answer is not awaited
        self._flush()
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def detach(
        self,
    ) -> tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
        """Hand the connection over to blocking threads: (socket, TLS, in, out, plaintext
        already read past the last frame). This protocol is done with it afterwards."""
        assert self.transport is not None
        self._detached = True  # no more flow control here: the bytes belong to the taker
        self.transport.pause_reading()
        await self.drain(5.0)
        raw = self.transport.get_extra_info("socket")
        sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
        sock.setblocking(True)
        self._detached = True
        self.transport.abort()  # closes asyncio's descriptor; the duplicate keeps the link
        return sock, self.ssl, self._inc, self._out, self._decoder.take_rest()


def _could_be_client_hello(head: bytes) -> bool:
    """Can these first bytes start a TLS record carrying a ClientHello: type 22, version
    3.x, a length a record may have, then handshake type 1."""
    n = len(head)
    if n >= 1 and head[0] != 0x16:
        return False
    if n >= 2 and head[1] != 0x03:
        return False
    if n >= 3 and head[2] > 0x04:
        return False
    if n >= 5 and not 0 < int.from_bytes(head[3:5], "big") <= 16384 + 2048:
        return False
    return not (n >= 6 and head[5] != 0x01)


async def connect(ctx: ssl.SSLContext, host: str, port: int, timeout: float) -> TlsConnection:
    """Open a TCP connection and finish the TLS handshake within `timeout`. TimeoutError:
    nothing accepted the connection in time; TlsFailed: something accepted it and did not
    complete a handshake (a silent program is told apart from an unreachable host)."""
    loop = asyncio.get_running_loop()
    accepted = False

    async def go() -> TlsConnection:
        nonlocal accepted
        _, proto = await loop.create_connection(
            lambda: TlsConnection(ctx, server_side=False, handshake_timeout=timeout), host, port
        )
        accepted = True
        try:
            await proto.handshake
        except BaseException:
            proto.abort()
            raise
        return proto

    try:
        return await within(go(), timeout)
    except TimeoutError:
        if not accepted:
            raise
        raise TlsFailed(
            f"the program at that port accepted the connection but said nothing for {timeout:.0f} s"
        ) from None
