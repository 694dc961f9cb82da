"""Who is at the other end of a loopback TCP connection.

A loopback port is open to every local user, not only to the one who opened it
(docs/SECURITY.md). Where a tunnel endpoint has to stay on TCP (no in-process data path), it
serves only connections whose other end belongs to this process's user. SO_PEERCRED answers
for Unix sockets only; for TCP, Linux lists every socket of the network namespace with its
owner's uid in /proc/net/tcp and /proc/net/tcp6: the client's own socket is the row whose
local address is our peer's and whose remote address is ours.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


class PeerUnknown(Exception):
    """The owner of the other end cannot be found (the message says why)."""


def _address(field: str) -> tuple[str, int]:
    """/proc/net/tcp's "0100007F:1F90": the address as the kernel stores it (network order),
    printed 32 bits at a time in this machine's byte order, then the port in hex."""
    raw, _, port = field.partition(":")
    words = [int(raw[i : i + 8], 16) for i in range(0, len(raw), 8)]
    packed = b"".join(struct.pack("=I", w) for w in words)
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return _unmapped(socket.inet_ntop(family, packed)), int(port, 16)


LISTEN = "0A"  # the state column of a listening socket


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One row of /proc/net/tcp or tcp6."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    uid: int
    inode: str


def tcp_sockets() -> Iterator[TcpSocket]:
    """Every TCP socket of this network namespace, as Linux lists them (none elsewhere)."""
    for table in _TABLES:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9:
                yield TcpSocket(_address(f[1]), _address(f[2]), f[3], int(f[7]), f[9])


def available() -> bool:
    """Whether this system says who owns a TCP socket (Linux)."""
    return _TABLES[0].is_file()


def peer_uid(conn: socket.socket) -> int:
    """The uid owning the client socket of `conn`, a loopback TCP connection this process
    accepted. Raises PeerUnknown where the system does not say or the client is gone."""
    try:
        peer = conn.getpeername()[:2]
        mine = conn.getsockname()[:2]
    except OSError as exc:
        raise PeerUnknown(f"the connection is gone ({exc.strerror or exc})") from None
    peer, mine = (_unmapped(peer[0]), int(peer[1])), (_unmapped(mine[0]), int(mine[1]))
    if not available():
        raise PeerUnknown("this system does not list socket owners (/proc/net/tcp)")
    for sock in tcp_sockets():
        if sock.local == peer and sock.remote == mine:
            return sock.uid
    raise PeerUnknown(f"no socket {peer[0]}:{peer[1]} is listed (the client left)")


def _unmapped(host: str) -> str:
    """An IPv4 address as itself, not as the IPv4-mapped IPv6 form (::ffff:127.0.0.1)."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def same_user(conn: socket.socket) -> tuple[bool, str]:
    """(True, "") when the other end of `conn` runs as this process's user (or root), else
    (False, why) naming the uid or what could not be read."""
    try:
        uid = peer_uid(conn)
    except PeerUnknown as exc:
        return False, str(exc)
    if uid in (os.getuid(), 0):
        return True, ""
    return False, f"the connection comes from uid {uid}, not this user (uid {os.getuid()})"


def listening_port(pid: int, host: str = "127.0.0.1") -> int:
    """The TCP port process `pid` listens on at `host`, 0 while it listens on none: a worker
    started on port 0 takes whatever port the kernel gives it, so no other local user can
    take that port first (no port chosen, closed, then bound again)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    held = set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            held.add(link[8:-1])
    for sock in tcp_sockets():
        if sock.state == LISTEN and sock.inode in held and sock.local[0] == host:
            return sock.local[1]
    return 0
