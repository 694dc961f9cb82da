"""The agent's local admin socket: new pairing codes, the paired list, unpairing.

A unix socket in the agent's state dir (owner-only), so only the agent's owner on that host
may ask; nothing here is reachable over the network. `corral-agent pair|paired|unpair`
are its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Protocol

from corral.engine.aio import within
from corral.engine.protocol import (
    ErrorCode,
    ErrorReply,
    Message,
    OkReply,
    PairCodeReply,
    PairCodeRequest,
    PeerInfo,
    Peers,
    PeersRequest,
    ProtocolError,
    Unpair,
    encode_frame,
    from_wire,
    read_frame,
    to_wire,
)
from corral.engine.security.pairing import CODE_TTL, PairingGate
from corral.engine.security.pins import Peer, PinStore


class AgentAdmin(Protocol):
    """What the admin socket needs of the agent (AgentServer is one): its state folder, the
    pairing gate that issues codes, the pinned desktops, who is connected and who holds the
    lease, and a way to forget a desktop."""

    state_dir: Path
    gate: PairingGate
    pins: PinStore

    def connected(self) -> set[str]: ...

    def lease_holder(self) -> str: ...

    def forget(self, who: str) -> list[Peer]: ...


log = logging.getLogger(__name__)

_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux


def _owned_folder(folder: Path, close_it: bool = False) -> None:
    """The admin socket's folder must be this user's own and closed to others: in /tmp
    another user could have made it first and listen there for the pairing codes sent.
    `close_it` (the agent) makes its own folder 0700 first."""
    import stat

    st = folder.lstat()
    if close_it and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        os.chmod(folder, 0o700)
        st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConnectionError(
            f"{folder} is not a folder of this user's that only it can open (another local "
            f"user may have made it): remove it, or use a shorter --state-dir so that the admin "
            "socket lives there"
        )


def admin_socket_path(state_dir: Path) -> Path:
    """state_dir/admin.sock, or a short owner-only path when that one is too long to bind."""
    path = state_dir.resolve() / "admin.sock"
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        return path
    import hashlib

    tag = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:16]
    return Path(f"/tmp/corral-{os.getuid()}") / f"agent-{tag}.sock"


class AdminServer:
    def __init__(self, agent: AgentAdmin) -> None:
        self.agent = agent
        self.path = admin_socket_path(agent.state_dir)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _owned_folder(self.path.parent, close_it=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a killed agent
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await within(self._server.wait_closed(), 2)
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            frame = await within(read_frame(reader), 5)
            if frame is None:
                return
            try:
                reply = self._handle(from_wire(frame))
            except ProtocolError as exc:
                reply = ErrorReply.of(0, exc.code, exc.message)
            writer.write(encode_frame(to_wire(reply)))
            await writer.drain()
        except (ConnectionError, TimeoutError, ProtocolError):
            pass
        finally:
            writer.close()

    def _handle(self, msg: Message) -> Message:
        agent = self.agent
        if isinstance(msg, PairCodeRequest):
            try:
                ttl = CODE_TTL if not 0 < msg.ttl < CODE_TTL else msg.ttl
                code = agent.gate.issue(msg.code, ttl)
            except ValueError as exc:
                return ErrorReply.of(msg.req, ErrorCode.BAD_MESSAGE, str(exc))
            log.info("a new pairing code was made (valid %.0f s)", agent.gate.expires_in())
            return PairCodeReply(req=msg.req, code=code, expires_in=agent.gate.expires_in())
        if isinstance(msg, PeersRequest):
            connected, holder = agent.connected(), agent.lease_holder()
            return Peers(
                req=msg.req,
                peers=tuple(
                    PeerInfo(
                        p.fingerprint,
                        p.name,
                        p.paired_at,
                        p.fingerprint in connected,
                        p.fingerprint == holder,
                    )
                    for p in agent.pins.peers()
                ),
            )
        if isinstance(msg, Unpair):
            gone = agent.forget(msg.who)
            if not gone:
                return ErrorReply.of(
                    msg.req,
                    ErrorCode.BAD_MESSAGE,
                    f"no paired desktop is named {msg.who!r}: `corral-agent paired` lists them",
                )
            return OkReply(req=msg.req)
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{type(msg).__name__} is not an admin request")


async def ask(state_dir: Path, msg: Message, timeout: float = 5.0) -> Message:
    """Send one admin request to the agent running with `state_dir`; ConnectionError if none."""
    path = admin_socket_path(state_dir)
    if path.parent.exists():
        _owned_folder(path.parent)
    try:
        reader, writer = await within(asyncio.open_unix_connection(str(path)), timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConnectionError(
            f"no corral-agent is running with state dir {state_dir} (no {path}): start it "
            "first (it prints a pairing code when it starts)"
        ) from None
    except PermissionError:
        raise ConnectionError(
            f"{path} belongs to another user: run this as the user the agent runs as"
        ) from None
    try:
        writer.write(encode_frame(to_wire(msg)))
        await writer.drain()
        frame = await within(read_frame(reader), timeout)
        if frame is None:
            raise ConnectionError("the agent closed the admin connection without an answer")
        return from_wire(frame)
    finally:
        writer.close()
