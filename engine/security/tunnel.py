"""The RPC data path: plain loopback bytes on one side, encrypted records on the other.

Each generated token costs about ten small ggml-rpc messages, so the per-message cost is what
matters. Three data paths, chosen per connection when the tunnel opens:

- in-process (`_rpcshim.c`, loaded into the inference child and the agent's worker with
  LD_PRELOAD): after the same key exchange, the authenticated connection itself is handed
  over (SCM_RIGHTS) to the ggml-rpc process, whose own send/recv seal and open the records.
  A round trip crosses the network once each way, as `llama-bench --rpc` does. Either end
  may hand over or relay: the records are the same (`_records.h`).
- `NativePump` (both ends have `_relay.c`): after OpenTunnel / TunnelOpen exchanged a key
  share each inside the TLS channel, AES-256-GCM records relayed by two C threads; no Python
  per message (+48-56 µs per round trip on an H200 host, half the pumps' cost).
- `TlsPump` (either end lacks it): TLS records in blocking Python threads, one per direction,
  sharing one `SSLObject` under a lock (docs/LLAMACPP.md: ~180 µs per round trip faster than
  asyncio streams). Only the writer thread encrypts; decrypt until the incoming BIO is empty,
  not until OpenSSL raises.

TCP_NODELAY everywhere (ggml-rpc writes 1-byte and 8-byte pieces separately).

`DesktopTunnel` is the desktop end: an endpoint the inference child registers as its RPC
server; each connection to it becomes a new mutually authenticated TLS connection to the
agent, which forwards to its worker after checking this desktop holds the lease.

No TCP port that speaks raw ggml-rpc is left open to other local users (docs/SECURITY.md):
where the shim runs, the endpoints are `TUNNEL_HOST:LABEL`, which the shim maps to Unix
sockets in this process's private folder and never to TCP, on the desktop and on the
worker alike; where it does not, the desktop's endpoint is a 127.0.0.1 port that serves
only this user's processes (loopback.same_user).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.machinery
import itertools
import logging
import os
import select
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from corral.engine.ggml.elfsyms import ElfError, imported_functions
from corral.engine.protocol import (
    ErrorReply,
    FrameDecoder,
    Hello,
    Message,
    OpenTunnel,
    TunnelOpen,
    encode_frame,
    from_wire,
    to_wire,
)

from .channel import TlsFailed, set_nodelay
from .loopback import available as owners_listed
from .loopback import same_user
from .tls import peer_fingerprint

log = logging.getLogger(__name__)

_BUF = 256 * 1024


class _Reader:
    """Reads a socket into one buffer of its own, reused for every message: a fresh 256 KiB
    bytes object per recv cost a large malloc and a shrinking realloc per RPC message, and
    the arenas of the pump threads kept growing with each tunnel (the soak found it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.view = memoryview(bytearray(_BUF))

    def next(self) -> memoryview:
        """Block for the next bytes, then take whatever else is already there: ggml-rpc
        sends a command as three writes (1 byte, 8 bytes, payload), and one TLS record and
        one wake-up of the far side for all three is what keeps the per-message cost down.
        Empty at EOF; valid until the next call."""
        size = self.sock.recv_into(self.view)
        while 0 < size < _BUF:
            try:
                more = self.sock.recv_into(self.view[size:], 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not more:
                break  # EOF: the next blocking recv says so
            size += more
        return self.view[:size]


class TlsPump:
    """Forwards between `plain` and the TLS connection (`tls`, `obj`, BIOs) until either ends."""

    def __init__(
        self,
        tls: socket.socket,
        obj: ssl.SSLObject,
        inc: ssl.MemoryBIO,
        out: ssl.MemoryBIO,
        plain: socket.socket,
        to_plain: bytes = b"",
        on_close: Callable[[TlsPump], None] | None = None,
    ) -> None:
        self.tls, self.obj, self.inc, self.out, self.plain = tls, obj, inc, out, plain
        self._to_plain = to_plain
        self._lock = threading.Lock()
        self._on_close = on_close
        self._closed = threading.Event()
        for s in (tls, plain):
            s.setblocking(True)
            set_nodelay(s)

    def start(self) -> None:
        threading.Thread(target=self._down, name="tunnel-tls>plain", daemon=True).start()
        threading.Thread(target=self._up, name="tunnel-plain>tls", daemon=True).start()

    def _down(self) -> None:
        """TLS records in, plaintext out to the plain socket."""
        # The buffers belong to the thread, not to the pump: they go when the thread ends.
        # Held by the pump, they lived until a full garbage collection freed the pump (it
        # sits in reference cycles with its threads and callbacks): 0.5 MiB per tunnel
        # piling up across reloads, which the soak counted as growth.
        clear = memoryview(bytearray(_BUF))  # decrypted bytes on their way out
        try:
            if self._to_plain:
                self.plain.sendall(self._to_plain)
            # records that arrived with the handshake or the opening frames
            if not self._decrypt_and_send(clear):
                return
            reader = _Reader(self.tls)
            while True:
                data = reader.next()
                if not data:
                    return
                self.inc.write(data)
                if not self._decrypt_and_send(clear):
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            self.close()

    def _decrypt_and_send(self, clear: memoryview) -> bool:
        """False when the peer closed the TLS session."""
        size, done = 0, False
        while not done:
            with self._lock:
                # until the incoming BIO is empty, and the plaintext OpenSSL already
                # decrypted but did not hand out, or the buffer is full
                while size < _BUF and (self.inc.pending or self.obj.pending()):
                    try:
                        # given a buffer, read returns a count (typeshed says bytes)
                        n = cast(int, self.obj.read(_BUF - size, clear[size:]))
                    except ssl.SSLWantReadError:
                        break  # a partial record: wait for the rest
                    except ssl.SSLZeroReturnError:
                        return False
                    if not n:
                        return False
                    size += n
                done = size < _BUF
            if size:
                self.plain.sendall(clear[:size])
                size = 0
        return True

    def _up(self) -> None:
        """Plaintext in from the plain socket, TLS records out."""
        try:
            reader = _Reader(self.plain)
            while True:
                data = reader.next()
                if not data:
                    return
                with self._lock:
                    self.obj.write(data)
                    records = self.out.read()
                self.tls.sendall(records)
        except (OSError, ssl.SSLError):
            return
        finally:
            self.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for s in (self.tls, self.plain):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        if self._on_close is not None:
            self._on_close(self)


def _relay_setting() -> str:
    return os.environ.get("CORRAL_RELAY", "").strip().lower()


def relay_turned_off() -> bool:
    """CORRAL_RELAY=off (or 0, no, python): the Python TLS pumps, for comparison or to rule
    the relay out."""
    return _relay_setting() in ("off", "0", "no", "python")


def relay_only() -> bool:
    """CORRAL_RELAY=relay: the native relay without the hand-over, for comparison."""
    return _relay_setting() == "relay"


def _load_relay() -> Any:
    """The native data path (`_relay.c`), or None where it was not built or is turned off."""
    if relay_turned_off():
        return None
    try:
        from . import _relay  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _relay


# Socket calls that send or receive besides the send()/recv() the shim seals: a ggml-rpc
# library that imports any of them could move bytes past the record layer.
_UNSEALED_CALLS = frozenset(
    {
        "write",
        "writev",
        "pwritev",
        "pwritev2",
        "sendmsg",
        "sendmmsg",
        "sendto",
        "sendfile",
        "sendfile64",
        "splice",
        "vmsplice",
        "read",
        "readv",
        "recvmsg",
        "recvmmsg",
        "recvfrom",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_submit",
        "aio_write",
        "aio_read",
    }
)


def _ggml_rpc_library() -> Path | None:
    """libggml-rpc of the installed llama-cpp-python, found without importing it."""
    from corral.engine.ggml._lib import installed_lib_dir

    folder = installed_lib_dir()
    for name in ("libggml-rpc.so.0", "libggml-rpc.so"):
        if folder is not None and (folder / name).is_file():
            return folder / name
    return None


@functools.cache
def unguarded_sends(library: str = "") -> tuple[str, ...]:
    """The calls the ggml-rpc library imports that could move RPC bytes past the shim's
    records (empty: the hand-over is safe). A library that cannot be read counts as unsafe."""
    path = Path(library) if library else _ggml_rpc_library()
    if path is None:
        return ()  # no llama.cpp here: nothing to hand over to
    try:
        imported = imported_functions(path)
    except (OSError, ElfError) as exc:
        return (f"unreadable: {exc}",)
    return tuple(sorted(imported & _UNSEALED_CALLS))


def shim_file() -> str:
    """The in-process data path's library (`_rpcshim.c`); '' where it was not built, where
    the relay cannot run (the shim needs its keys), with CORRAL_RELAY=relay (the native
    relay only, for comparison), or where ggml-rpc sends through calls the shim does not
    seal (unguarded_sends)."""
    if _load_relay() is None or relay_only() or unguarded_sends():
        return ""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        lib = here / f"_rpcshim{suffix}"
        if lib.is_file():
            return str(lib)
    return ""


def relay_mode() -> str:
    """What this process's tunnels use for their data: 'inproc' (hand-over to ggml-rpc's own
    sockets), 'native' (the C relay) or 'python' (the TLS pumps)."""
    if _load_relay() is None:
        return "python"
    return "inproc" if shim_file() else "native"


_handover_dir = ""


def handover_dir() -> str:
    """This process's private folder (0700) for hand-over sockets, removed at exit; '' where
    the shim is off."""
    global _handover_dir
    if not shim_file():
        return ""
    if not _handover_dir:
        for base in (None, "/tmp"):
            folder = tempfile.mkdtemp(prefix="corral-rpc-", dir=base)
            if len(folder) < 64:
                _handover_dir = folder
                atexit.register(shutil.rmtree, folder, True)
                break
            os.rmdir(folder)
    return _handover_dir


def shim_env(listen: str = "", port: int = 0) -> dict[str, str]:
    """The environment that loads the shim into a ggml-rpc process: the RPC client of this
    process's tunnels (no arguments), or the worker on `port` taking hand-overs on `listen`.
    Empty where the shim is off. The shim removes these variables (and restores LD_PRELOAD)
    when it loads, so nothing that process starts inherits them."""
    lib = shim_file()
    folder = handover_dir()
    if not lib or not folder:
        return {}
    was = os.environ.get("LD_PRELOAD", "")
    env = {"LD_PRELOAD": f"{lib}:{was}" if was else lib, "CORRAL_RPCSHIM_PRELOAD_WAS": was}
    if listen:
        env.update(CORRAL_RPCSHIM_LISTEN=listen, CORRAL_RPCSHIM_PORT=str(port))
    else:
        env["CORRAL_RPCSHIM_CONNECT"] = folder
    return env


HANDOVER_MAGIC = b"CRS1"

# Tunnel endpoints where the shim runs: its port is a label for a Unix socket, and the shim
# never connects to or binds this address over TCP (TUNNEL_ADDR in _rpcshim.c)
TUNNEL_HOST = "127.82.80.67"
_labels = itertools.count(1)


def new_label(folder: str, prefix: str = "") -> int:
    """A tunnel label (1..65535) no socket in `folder` uses yet."""
    for _ in range(65535):
        label = next(_labels) % 65535 + 1
        if not os.path.exists(os.path.join(folder, f"{prefix}{label}")):
            return label
    raise OSError(f"no free tunnel label in {folder}")


def unix_connection(path: str, timeout: float = 5.0) -> socket.socket:
    """A connection to the Unix socket `path`, with `timeout` on it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def plain_to_worker(path: str, timeout: float = 5.0) -> socket.socket:
    """A plain ggml-rpc connection to the worker whose shim listens on `path`: the Unix
    connection itself, after a mode 'P' hello (the agent's probe, relay and pump fallbacks).
    Only this user can open `path` (0600 in a 0700 folder)."""
    sock = unix_connection(path, timeout)
    try:
        sock.sendall(handover_hello(b"P"))
    except OSError:
        sock.close()
        raise
    return sock


def handover_hello(mode: bytes, keys: tuple[bytes, ...] = (), pending: bytes = b"") -> bytes:
    """The 100 bytes that start a hand-over (`_rpcshim.c`): magic, mode ('R' records on the
    descriptor that comes with it, 'P' plain bytes on this Unix connection), 3 zero bytes,
    the pending ciphertext's length (big-endian), then the record keys (tx key, tx IV, rx
    key, rx IV)."""
    material = b"".join(keys) or bytes(2 * (32 + 12))
    return HANDOVER_MAGIC + mode + bytes(3) + len(pending).to_bytes(4, "big") + material


def start_data_path(
    sock: socket.socket,
    obj: ssl.SSLObject,
    inc: ssl.MemoryBIO,
    out: ssl.MemoryBIO,
    plain: socket.socket,
    keys: RelayKeys | None,
    leftover: Callable[[], bytes],
    handover: bool,
    on_close: Callable[[Any], None],
    to_plain: bytes = b"",
) -> tuple[Pump, str]:
    """One tunnel's data path, the same choice at both ends: with relay keys and a hand-over
    socket, the records go to the RPC library itself ("inproc"); with keys only, two C
    threads relay them ("native"); without, TLS records in Python threads ("python").
    `leftover` gives the bytes read past the TLS handshake (the relay's first records); it
    is called only with keys (without, those bytes are TLS the Python pump still reads).
    Returns the pump, not started, and the mode's name. OSError: the hand-over failed (the
    caller closes both sockets)."""
    if keys is not None and handover:
        hand_over(plain, sock, keys, leftover())
        return HandedOver(sock, plain, on_close=on_close), "inproc"
    if keys is not None:
        return NativePump(sock, plain, keys, leftover(), on_close=on_close), "native"
    pump = TlsPump(sock, obj, inc, out, plain, to_plain=to_plain, on_close=on_close)
    return pump, "python"


def hand_over(
    unix: socket.socket,
    net: socket.socket,
    keys: tuple[bytes, bytes, bytes, bytes],
    pending: bytes,
) -> None:
    """Give `net` (the authenticated connection, keyed by `keys`) to the shim at the other
    end of `unix`; the caller's copy of `net` stays open until it closes it."""
    net.setblocking(True)
    set_nodelay(net)
    socket.send_fds(unix, [handover_hello(b"R", keys, pending)], [net.fileno()])
    if pending:
        unix.sendall(pending)


RELAY_SHARE = 32  # bytes of key material each end contributes


def relay_share() -> bytes:
    """This end's fresh key material for a tunnel; empty where it cannot run the relay."""
    return os.urandom(RELAY_SHARE) if _load_relay() is not None else b""


RelayKeys = tuple[bytes, bytes, bytes, bytes]  # what relay_keys gives one side


def relay_keys(desktop: bytes, agent: bytes, side: str) -> RelayKeys:
    """(tx_key, tx_iv, rx_key, rx_iv) for `side` ('desktop' or 'agent'), from both ends'
    shares. The shares travelled inside the mutually authenticated TLS channel, so only the
    two paired ends know them; HKDF-SHA256 gives each direction its own key and IV."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(desktop) != RELAY_SHARE or len(agent) != RELAY_SHARE:
        raise ValueError("a relay key share must be 32 bytes")
    okm = HKDF(
        algorithm=hashes.SHA256(), length=2 * 44, salt=None, info=b"corral rpc relay v1"
    ).derive(desktop + agent)
    up, down = okm[:44], okm[44:]  # desktop -> agent, agent -> desktop
    tx, rx = (up, down) if side == "desktop" else (down, up)
    return tx[:32], tx[32:], rx[:32], rx[32:]


class NativePump:
    """Forwards between `plain` and `net` in native code (`_relay.c`): AES-256-GCM records
    under keys from `relay_keys`, two threads that never take the GIL per message. `pending`
    is ciphertext that arrived with the channel's last TLS record.

    Only the relay's own thread closes the sockets once it runs (close() shuts them down,
    which wakes it), so the descriptors it works on stay valid until it has returned."""

    def __init__(
        self,
        net: socket.socket,
        plain: socket.socket | None,
        keys: tuple[bytes, bytes, bytes, bytes],
        pending: bytes = b"",
        on_close: Callable[[Any], None] | None = None,
    ) -> None:
        self.net, self.plain, self._keys, self._pending = net, plain, keys, pending
        self._socks = [s for s in (net, plain) if s is not None]
        self._on_close = on_close
        self._lock = threading.Lock()
        self._running = False
        self._closed = False
        self._done = threading.Event()
        self.ended = ""  # why the relay ended, once it has ("" for a clean end)
        for s in self._socks:
            s.setblocking(True)
            set_nodelay(s)

    def start(self) -> None:
        with self._lock:
            if self._closed:  # closed before it ran
                return
            self._running = True
        threading.Thread(target=self._run, name="tunnel-relay", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the relay has ended and its sockets are closed."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        relay = _load_relay()
        try:
            if relay is None or self.plain is None:
                self.ended = "the native relay is not available"
            else:
                tx_key, tx_iv, rx_key, rx_iv = self._keys
                self.ended = relay.run(
                    self.plain.fileno(),
                    self.net.fileno(),
                    tx_key,
                    tx_iv,
                    rx_key,
                    rx_iv,
                    self._pending,
                )
            if self.ended:
                log.debug("tunnel relay ended: %s", self.ended)
        finally:
            self._keys = (b"", b"", b"", b"")
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._closed = True
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()
        self._done.set()
        if self._on_close is not None:
            self._on_close(self)

    def close(self) -> None:
        """End the relay: shut the sockets down (the relay wakes, ends and closes them)."""
        with self._lock:
            if self._closed:
                return
            if self._running:
                for s in self._socks:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                return
        self._finish()  # never ran: nothing else will close them


class HandedOver(NativePump):
    """A connection handed over to a shim (`_rpcshim.c`): this end keeps its copy of the
    socket only to be able to end it (close() shuts it down, and both processes that speak
    ggml-rpc see the end), and the Unix connection it was handed over on, which the shim
    keeps open while it uses the connection. A thread waits, without reading, until the
    peer ends the connection or the shim's process closes it or dies, then shuts the
    connection down (so the far end learns at once) and closes both."""

    def __init__(
        self,
        net: socket.socket,
        unix: socket.socket | None = None,
        on_close: Callable[[Any], None] | None = None,
    ) -> None:
        super().__init__(net, unix, (b"", b"", b"", b""), on_close=on_close)

    def _run(self) -> None:
        try:
            watch = select.poll()
            # HUP and ERR always; RDHUP: the other end finished. Not POLLIN on the
            # connection: its data is the shim's to read. The shim never writes on the Unix
            # connection, so readable there means it was closed.
            watch.register(self.net.fileno(), select.POLLRDHUP)
            if self.plain is not None:
                watch.register(self.plain.fileno(), select.POLLRDHUP | select.POLLIN)
            while not watch.poll():
                pass
            with contextlib.suppress(OSError):
                self.net.shutdown(socket.SHUT_RDWR)
        finally:
            self._finish()


Pump = TlsPump | NativePump


class BlockingTls:
    """A client TLS connection on a blocking socket with memory BIOs (so it can be pumped)."""

    def __init__(self, ctx: ssl.SSLContext, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        set_nodelay(self.sock)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=False)
        self._decoder = FrameDecoder()
        self._frames: list[Any] = []
        self.relay_keys: RelayKeys | None = None
        try:
            while True:
                try:
                    self.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    self._fill()
            self._flush()
        except ssl.SSLError as exc:
            self.sock.close()
            raise TlsFailed(exc.reason or str(exc)) from None
        except BaseException:
            self.sock.close()
            raise

    def _flush(self) -> None:
        if self.out.pending:
            self.sock.sendall(self.out.read())

    def _fill(self) -> None:
        data = self.sock.recv(_BUF)
        if not data:
            raise ConnectionResetError("the agent closed the connection")
        self.inc.write(data)

    def send(self, msg: Message) -> None:
        self.obj.write(encode_frame(to_wire(msg)))
        self._flush()

    def recv(self) -> Message:
        while not self._frames:
            try:
                chunk = self.obj.read(_BUF)
            except ssl.SSLWantReadError:
                self._fill()
                continue
            except ssl.SSLError as exc:
                raise TlsFailed(exc.reason or str(exc)) from None
            if not chunk:
                raise ConnectionResetError("the agent closed the connection")
            self._frames.extend(self._decoder.feed(chunk))
        return from_wire(self._frames.pop(0))

    def has_frames(self) -> bool:
        """Whether decrypted bytes are waiting beyond the last message returned."""
        return bool(self._frames) or bool(self._decoder.take_rest())

    def leftover(self) -> bytes:
        """Bytes read from the socket that TLS has not consumed (the relay's first records)."""
        return self.inc.read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class DesktopTunnel:
    """The inference child's endpoint for one agent's worker → TLS to the agent → the worker.

    Where the shim runs: `TUNNEL_HOST:LABEL`; the child's shim asks the Unix socket
    FOLDER/LABEL, which hands over a fresh authenticated connection, and FOLDER/LABEL.plain
    carries plain bytes (the probe). No TCP. Elsewhere: 127.0.0.1:PORT, serving only this
    user's processes.

    `open_channel()` returns a BlockingTls already past hello and the agent's tunnel answer
    (it raises with the agent's message when the agent refuses, e.g. leased elsewhere).
    """

    def __init__(self, open_channel: Callable[[], BlockingTls], label: str) -> None:
        self._open = open_channel
        self.label = label
        self._pumps: set[Pump] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self.last_error = ""
        self.refused = 0  # TCP connections from other users, turned away
        self.mode = ""  # the data path of the last connection: 'inproc', 'native' or 'python'
        self._paths: list[str] = []
        self._listeners: list[tuple[socket.socket, bool]] = []  # (listener, hands over)
        folder = handover_dir()
        if folder:
            self.host, self.port = TUNNEL_HOST, new_label(folder)
            for suffix, hands in (("", True), (".plain", False)):
                path = os.path.join(folder, f"{self.port}{suffix}")
                unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                unix.bind(path)
                unix.listen(64)
                self._paths.append(path)
                self._listeners.append((unix, hands))
            self.plain_path = self._paths[1]
        else:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            tcp.listen(64)
            self.host, self.port = "127.0.0.1", int(tcp.getsockname()[1])
            self._listeners.append((tcp, False))
            self.plain_path = ""
            if not owners_listed():
                log.warning(
                    "tunnel to %s: this system does not say which user a loopback "
                    "connection comes from; other local users can use 127.0.0.1:%d",
                    label,
                    self.port,
                )
        for listener, hands in self._listeners:
            threading.Thread(
                target=self._accept,
                args=(listener, hands),
                name=f"tunnel-accept {label}",
                daemon=True,
            ).start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def connect_plain(self, timeout: float = 5.0) -> socket.socket:
        """A plain connection through this tunnel to the worker (for the probe)."""
        if self.plain_path:
            return unix_connection(self.plain_path, timeout)
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def probe(self, timeout: float = 5.0) -> tuple[int, int, int]:
        """The worker's ggml RPC protocol version, asked through this tunnel (probe_rpc)."""
        from corral.engine.ggml.probe import probe_rpc

        return probe_rpc(self.endpoint, timeout, self.connect_plain)

    def _accept(self, listener: socket.socket, hands: bool) -> None:
        while not self._stopped:
            try:
                local, _ = listener.accept()
            except OSError:
                return
            if local.family != socket.AF_UNIX and owners_listed():
                ok, why = same_user(local)
                if not ok:  # another local user: no tunnel, no RPC
                    self.refused += 1
                    log.warning("tunnel to %s: refused a local connection: %s", self.label, why)
                    local.close()
                    continue
            threading.Thread(target=self._serve, args=(local, hands), daemon=True).start()

    def _serve(self, local: socket.socket, handover: bool) -> None:
        try:
            chan = self._open()
        except Exception as exc:  # refused, unreachable, TLS: the child sees a closed socket
            self.last_error = str(exc)
            log.warning("tunnel to %s: %s", self.label, exc)
            local.close()
            return
        if chan.relay_keys is None and handover:
            try:  # the agent has no record layer: plain bytes on the Unix socket
                local.sendall(handover_hello(b"P"))
            except OSError:
                chan.close()
                local.close()
                return
        try:  # with a hand-over, the child's ggml-rpc owns the connection; this end a copy
            pump, self.mode = start_data_path(
                chan.sock,
                chan.obj,
                chan.inc,
                chan.out,
                local,
                chan.relay_keys,
                chan.leftover,
                handover,
                self._gone,
            )
        except OSError as exc:
            self.last_error = f"hand-over failed: {exc}"
            log.warning("tunnel to %s: hand-over failed: %s", self.label, exc)
            chan.close()
            local.close()
            return
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._pumps.add(pump)
        if stopped:
            pump.close()  # outside the lock: close() calls _gone, which takes it
            return
        pump.start()

    def _gone(self, pump: Pump) -> None:
        with self._lock:
            self._pumps.discard(pump)

    def close(self) -> None:
        self._stopped = True
        for listener, _ in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()
        for path in self._paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        with self._lock:
            pumps = list(self._pumps)
        for p in pumps:
            p.close()


def open_tunnel_channel(
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    expect_fp: str,
    hello: Hello,
    timeout: float = 10.0,
) -> BlockingTls:
    """TLS to the agent, pinned to `expect_fp`, hello, then OpenTunnel; the channel is ready
    to carry RPC bytes when this returns. Its `relay_keys` are set when both ends run the
    native relay (the bytes then leave TLS for the relay's records), else None."""
    chan = BlockingTls(ctx, host, port, timeout)
    try:
        if peer_fingerprint(chan.obj) != expect_fp:
            raise TlsFailed(f"the agent at {host}:{port} is not the one this desktop paired with")
        chan.send(hello)
        theirs = chan.recv()
        if isinstance(theirs, ErrorReply):
            raise ConnectionRefusedError(theirs.message)
        ours = relay_share()
        chan.send(OpenTunnel(req=1, relay=ours))
        reply = chan.recv()
        if isinstance(reply, ErrorReply):
            raise ConnectionRefusedError(reply.message)
        if isinstance(reply, TunnelOpen) and reply.relay and ours:
            if chan.obj.pending() or chan.has_frames():
                raise TlsFailed("the agent sent more than its answer before the relay started")
            chan.relay_keys = relay_keys(ours, reply.relay, "desktop")
        chan.sock.settimeout(None)
        return chan
    except BaseException:
        chan.close()
        raise
