"""What another local user reaches on this host: ggml-rpc HELLOs from uid 65534 ("nobody")
to every TCP listener of the host, and connects to Unix sockets, from a child forked from
the test that drops to that uid (the test runs as root, as CI does; no interpreter is
exec'd, so nothing depends on what that uid may read).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from corral.engine.security.loopback import LISTEN, tcp_sockets

NOBODY = 65534
_CMD_HELLO = 14  # ggml-rpc's HELLO, as engine/ggml/probe.py sends it
_HELLO = bytes([_CMD_HELLO]) + struct.pack("<Q", 24) + bytes(24)


def can_switch_user() -> bool:
    return os.geteuid() == 0


def tcp_listeners() -> list[tuple[str, int]]:
    """Every TCP listener of this network namespace, as an address to connect to."""
    found = {
        ({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(s.local[0], s.local[0]), s.local[1])
        for s in tcp_sockets()
        if s.state == LISTEN
    }
    return sorted(found)


def _hello(target: tuple[str, int], timeout: float) -> str:
    """What a ggml-rpc HELLO to `target` gets: 'refused', 'closed' (ended without a word),
    'silent' (nothing within the timeout), 'rpc X.Y.Z' (a ggml RPC server answered), or
    'other' (bytes that are not a HELLO answer: a TLS alert, an HTTP error)."""
    # numeric addresses, no getaddrinfo: the child as nobody cannot load more of Python
    sock = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except ConnectionRefusedError:
        sock.close()
        return "refused"
    except OSError as exc:
        sock.close()
        return f"error {exc.errno}"
    with sock:
        try:
            sock.sendall(_HELLO)
            got = b""
            while len(got) < 8 + 28:
                more = sock.recv(64)
                if not more:
                    break
                got += more
        except TimeoutError:
            return "silent" if not got else "other"
        except OSError:
            return "closed"
    if not got:
        return "closed"
    if len(got) >= 11 and struct.unpack("<Q", got[:8])[0] == 28:
        return "rpc {}.{}.{}".format(*got[8:11])
    return "other"


def _unix(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError as exc:
            return type(exc).__name__
    return "connected"


def as_nobody(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a forked child running as uid/gid 65534 with no groups; its result
    (JSON-able) comes back through a pipe."""
    import concurrent.futures.thread  # noqa: F401  (loaded here: nobody cannot read them)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, do the one thing, report, leave at once
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = json.dumps({"ok": fn(*args)}).encode()
            with os.fdopen(w, "wb") as pipe:
                pipe.write(out)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        raise RuntimeError(f"the child as uid {NOBODY} failed (status {status})")
    return json.loads(data)["ok"]


def _hello_all(targets: list[list[Any]], timeout: float) -> dict[str, str]:
    with ThreadPoolExecutor(32) as pool:
        outcomes = pool.map(lambda t: _hello((t[0], int(t[1])), timeout), targets)
        return {f"{h}:{p}": o for (h, p), o in zip(targets, outcomes, strict=True)}


def hellos_from_nobody(timeout: float = 1.5) -> dict[str, str]:
    """A ggml-rpc HELLO from uid 65534 to every TCP listener: {host:port: outcome}."""
    return dict(as_nobody(_hello_all, [list(t) for t in tcp_listeners()], timeout))


def unix_from_nobody(paths: Sequence[str]) -> dict[str, str]:
    """A connect from uid 65534 to each Unix socket: 'connected' or the error's name."""
    return dict(as_nobody(lambda ps: {p: _unix(p) for p in ps}, list(paths)))


def answered_rpc(outcomes: dict[str, str]) -> dict[str, str]:
    return {t: o for t, o in outcomes.items() if o.startswith("rpc")}
