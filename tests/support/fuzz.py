"""Fuzz targets: every parser that reads bytes from outside, fed with hypothesis.

One table, two budgets: tests/reliability/test_fuzz.py runs each target briefly inside
`make test`; bench/fuzz.py runs them for 100,000+ cases and reports crashes, the slowest
case and memory. A target passes when every input either parses or raises the one error
type that parser documents (the caller turns that into a message), each case within 1 s.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import gc
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from corral.discovery.txt import AgentHints, BadTxt, decode_txt, encode_txt
from corral.engine.agent.config import ConfigError, parse_config
from corral.engine.model.spec import ModelError, read_model_spec
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
from corral.engine.protocol import FrameDecoder, ProtocolError, encode_frame, read_frame
from corral.engine.protocol.messages import CONTROL_MESSAGES, from_wire, to_wire
from corral.engine.runtime import history
from corral.engine.runtime.agent_client import parse_address
from corral.engine.runtime.history import HistoryError
from corral.engine.security.files import SecurityFileError
from corral.engine.security.pins import PinStore
from corral.engine.security.tunnel import (
    TUNNEL_HOST,
    NativePump,
    hand_over,
    relay_keys,
    shim_file,
)
from tests.support import relay as relay_format

CASE_LIMIT_S = 1.0  # a case slower than this is a hang

# msgpack-shaped values: what a peer can put in a frame
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=24,
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


@dataclass
class Stats:
    cases: int = 0
    slowest_s: float = 0.0
    accepted: int = 0  # inputs that parsed (the rest raised the documented error)
    slowest_input: str = ""  # the start of the slowest input's repr, and its length


@dataclass
class Target:
    name: str
    what: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], bool]  # True when parsed; raises only the documented error
    stats: Stats = field(default_factory=Stats)


# ---------------------------------------------------------------- frames and messages


def _frames(data: bytes, cuts: list[int]) -> bool:
    """Feed the incremental decoder in pieces; every complete frame is valid msgpack."""
    dec = FrameDecoder()
    got = False
    try:
        start = 0
        for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
            got = bool(dec.feed(data[start:cut])) or got
            start = cut
    except ProtocolError:
        return False
    return got


_loop: asyncio.AbstractEventLoop | None = None


def _stream(data: bytes) -> bool:
    """The agent's reader: a StreamReader fed these bytes then EOF, read to the end."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()

    async def run() -> bool:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        n = 0
        try:
            while await read_frame(reader) is not None:
                n += 1
        except ProtocolError:
            return False
        return n > 0

    return _loop.run_until_complete(asyncio.wait_for(run(), CASE_LIMIT_S))


def _frame_bytes() -> st.SearchStrategy[bytes]:
    """Raw bytes, and real frames with some bytes changed or cut short."""
    real = values.map(lambda v: encode_frame(v))
    mutated = st.tuples(real, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255))))

    def mutate(pair: tuple[bytes, list[tuple[int, int]]]) -> bytes:
        data = bytearray(pair[0])
        for pos, byte in pair[1]:
            data[pos % len(data)] = byte
        return bytes(data)

    return st.binary(max_size=2048) | real | mutated.map(mutate) | real.map(lambda b: b[:-1])


def _message(obj: Any) -> bool:
    """A decoded frame as a message: refused with ProtocolError, or a message that survives
    a round trip unchanged."""
    try:  # only what msgpack can carry reaches the decoder
        obj = msgpack.unpackb(msgpack.packb(obj), raw=False, strict_map_key=False)
    except (OverflowError, ValueError):
        return False
    try:
        msg = from_wire(obj)
    except ProtocolError:
        return False
    again = from_wire(msgpack.unpackb(msgpack.packb(to_wire(msg)), raw=False))
    assert repr(again) == repr(msg)  # repr: NaN fields compare unequal
    return True


def _address(text: str) -> bool:
    """HOST[:PORT] as typed on the command line or in the app's Add host box."""
    try:
        parse_address(text)
    except ValueError:
        return False
    return True


def _message_shapes() -> st.SearchStrategy[Any]:
    """Anything, and the right type number with its own field names holding random values."""

    def typed(number: int) -> st.SearchStrategy[Any]:
        cls = CONTROL_MESSAGES.types[number]
        names = [f.name for f in dataclasses.fields(cls)]
        fields = st.dictionaries(st.sampled_from(names) | st.text(max_size=8), values, max_size=12)
        return st.tuples(st.just(number), fields).map(list)

    def valid(number: int) -> st.SearchStrategy[Any]:
        """A real message of this type (hypothesis fills the fields from the type hints),
        sometimes with one field replaced by any value."""
        cls = CONTROL_MESSAGES.types[number]
        names = [f.name for f in dataclasses.fields(cls)]
        real = st.builds(cls).map(to_wire)
        if not names:
            return real
        return st.tuples(real, st.sampled_from(names), st.none() | values).map(
            lambda t: t[0] if t[2] is None else [t[0][0], {**t[0][1], t[1]: t[2]}]
        )

    numbers = st.sampled_from(sorted(CONTROL_MESSAGES.types))
    return values | numbers.flatmap(typed) | numbers.flatmap(valid)


# ---------------------------------------------------------------- TXT records


_GOOD_TXT = {
    k.encode(): v.encode()
    for k, v in encode_txt(AgentHints("0123456789ab", "0.1.0", "2.0", 1, 1 << 34, 7340)).items()
}


def _txt(raw: dict[bytes, bytes | None]) -> bool:
    try:
        decode_txt(raw)
    except BadTxt:
        return False
    return True


def _txt_records() -> st.SearchStrategy[dict[bytes, bytes | None]]:
    anything = st.dictionaries(st.binary(max_size=12), st.none() | st.binary(max_size=64))
    one_bad = st.tuples(
        st.sampled_from(sorted(_GOOD_TXT)),
        st.none() | st.binary(max_size=40) | st.text().map(str.encode),
    ).map(lambda kv: {**_GOOD_TXT, kv[0]: kv[1]})
    return anything | one_bad


# ---------------------------------------------------------------- GGUF files

_gguf_base: bytes | None = None
_scratch = Path(
    tempfile.mkdtemp(prefix="corral-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
)


def _base_gguf() -> bytes:
    global _gguf_base
    if _gguf_base is None:
        path = _scratch / "base.gguf"
        write_tiny_llama(
            path, TinyLlama(n_layer=2, n_embd=32, n_head=2, n_head_kv=1, n_ff=64, n_vocab=300)
        )
        _gguf_base = path.read_bytes()
    return _gguf_base


def _gguf(edit: tuple[int, list[tuple[int, int]], int | None, int]) -> bool:
    """A real model file with bytes changed, u64 fields overwritten and/or cut short."""
    seed, flips, cut, n_words = edit
    data = bytearray(_base_gguf())
    rng = random.Random(seed)
    header = min(len(data), 16 * 1024)  # the metadata and tensor table live up front
    for pos, byte in flips:
        data[pos % header] = byte
    for _ in range(n_words):  # a count or a length replaced by something large
        pos = rng.randrange(0, header - 8)
        data[pos : pos + 8] = rng.choice(
            [2**64 - 1, 2**63, 2**32, rng.getrandbits(64), rng.getrandbits(20)]
        ).to_bytes(8, "little")
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    path = _scratch / f"case-{os.getpid()}.gguf"
    path.write_bytes(bytes(data))
    try:
        read_model_spec(path)
    except ModelError:
        return False
    return True


def _gguf_edits() -> st.SearchStrategy[Any]:
    return st.tuples(
        st.integers(0, 2**32),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
        st.none() | st.integers(0, 10**7),
        st.integers(0, 3),
    )


# ---------------------------------------------------------------- files we keep


def _file_contents() -> st.SearchStrategy[bytes]:
    return (
        st.binary(max_size=512)
        | _json.map(lambda v: json.dumps(v).encode())
        | st.builds(lambda v: json.dumps({"peers": v}).encode(), _json)
        | st.builds(lambda v: json.dumps({"version": 1, "messages": v}).encode(), _json)
        | st.integers(1, 100_000).map(lambda n: b"[" * n)
    )


def _pins(content: bytes) -> bool:
    path = _scratch / "paired-agents.json"
    path.write_bytes(content)
    try:
        PinStore(path).peers()
    except SecurityFileError:
        return False
    return True


def _chat(content: bytes) -> bool:
    (_scratch / "chats").mkdir(exist_ok=True)
    (_scratch / "chats" / "fuzz.json").write_bytes(content)
    old = os.environ.get("CORRAL_STATE_DIR")
    os.environ["CORRAL_STATE_DIR"] = str(_scratch)
    try:
        history.load("fuzz")
    except HistoryError:
        return False
    finally:
        if old is None:
            os.environ.pop("CORRAL_STATE_DIR", None)
        else:
            os.environ["CORRAL_STATE_DIR"] = old
    return True


_GOOD_CONFIG = """listen = "0.0.0.0:7340"
interfaces = ["eth0"]
devices = ["CUDA0"]
reserve_mib = { CUDA0 = 2048, default = 256 }
rpc_threads = 8
cache_dir = "/var/cache/corral"
cache_max_mib = 51200
log_level = "INFO"
"""


def _config_texts() -> st.SearchStrategy[str]:
    """Any text, and the documented example with a line replaced or cut."""
    lines = _GOOD_CONFIG.splitlines()
    edited = st.tuples(st.integers(0, len(lines) - 1), st.text(max_size=60)).map(
        lambda t: "\n".join([*lines[: t[0]], t[1], *lines[t[0] + 1 :]])
    )
    cut = st.integers(0, len(_GOOD_CONFIG)).map(lambda n: _GOOD_CONFIG[:n])
    return st.text(max_size=300) | edited | cut


def _config(text: str) -> bool:
    try:
        parse_config(text, Path("agent.toml"))
    except ConfigError as exc:
        assert ":" in str(exc)  # FILE:LINE: reason
        return False
    return True


# ---------------------------------------------------------------- the tunnel's native relay

_RELAY_KEYS = relay_keys(bytes(range(32)), bytes(range(32, 64)), "desktop")
_RELAY_MAX = 256 * 1024


def _sealed(seq: int, data: bytes) -> bytes:
    _, _, key, iv = _RELAY_KEYS
    return relay_format.seal(key, iv, seq, data)


def _relay_model(stream: bytes) -> tuple[bytes, bool]:
    """What the relay must deliver for this ciphertext stream: the plaintext of the leading
    records that authenticate, in order; and whether the whole stream was such records."""
    _, _, key, iv = _RELAY_KEYS
    out, at, seq = bytearray(), 0, 0
    while at < len(stream):
        if len(stream) - at < 4:
            return bytes(out), False
        (n,) = struct.unpack_from(">I", stream, at)
        if n > _RELAY_MAX or len(stream) - at < 4 + n + 16:
            return bytes(out), False
        try:
            out += AESGCM(key).decrypt(
                relay_format.nonce(iv, seq), stream[at + 4 : at + 4 + n + 16], stream[at : at + 4]
            )
        except InvalidTag:
            return bytes(out), False
        at, seq = at + 4 + n + 16, seq + 1
    return bytes(out), True


def _relay(stream: bytes) -> bool:
    """Feed a ciphertext stream to a real relay (engine/security/_relay.c) and compare what
    reaches the plain side with the Python model: byte for byte, nothing after a bad record."""
    plain_app, plain = socket.socketpair()
    net, peer = socket.socketpair()
    pump = NativePump(net, plain, _RELAY_KEYS)
    pump.start()

    def feed() -> None:
        with contextlib.suppress(OSError):  # the relay may end (and close) before all is sent
            peer.sendall(stream)
            peer.shutdown(socket.SHUT_WR)

    feeder = threading.Thread(target=feed)
    feeder.start()
    got = bytearray()
    plain_app.settimeout(CASE_LIMIT_S)
    while chunk := plain_app.recv(65536):
        got += chunk
    feeder.join()
    assert pump.wait(CASE_LIMIT_S), "the relay did not end"
    plain_app.close()
    peer.close()
    want, whole = _relay_model(stream)
    assert bytes(got) == want, f"delivered {len(got)} bytes, the model {len(want)}"
    assert (pump.ended == "") == whole, pump.ended
    return whole


# ---------------------------------------------------------------- the hand-over's record reader

_SHIM_SERVER = f"""
    import socket, struct, sys
    srv = socket.create_server(("{TUNNEL_HOST}", int(sys.argv[1])))  # a label: nothing bound
    report = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    report.connect(sys.argv[2])
    while True:
        conn, _ = srv.accept()  # a handed connection: the shim opens its records
        got, status = bytearray(), b"E"
        try:
            while chunk := conn.recv(65536):
                got += chunk
        except OSError:
            status = b"X"
        conn.close()
        report.sendall(status + struct.pack(">I", len(got)) + got)
"""


@dataclass
class _ShimWorker:
    """One long-lived process with the shim preloaded as a worker, serving every case."""

    proc: subprocess.Popen[bytes]
    listen: str
    report: socket.socket


_shim_worker: _ShimWorker | None = None


def _shim() -> _ShimWorker:
    global _shim_worker
    if _shim_worker is None or _shim_worker.proc.poll() is not None:
        assert shim_file(), "engine/security/_rpcshim.c was not built"
        folder = tempfile.mkdtemp(prefix="corral-f-", dir="/tmp")
        atexit.register(shutil.rmtree, folder, True)
        port = 4242
        reports = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        reports.bind(os.path.join(folder, "report"))
        reports.listen(1)
        reports.settimeout(30)
        listen = os.path.join(folder, "worker")
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_SHIM_SERVER), str(port), reports.getsockname()],
            env=dict(
                os.environ,
                LD_PRELOAD=shim_file(),
                CORRAL_RPCSHIM_PRELOAD_WAS="",
                CORRAL_RPCSHIM_LISTEN=listen,
                CORRAL_RPCSHIM_PORT=str(port),
            ),
        )
        atexit.register(proc.kill)
        report, _ = reports.accept()
        reports.close()
        _shim_worker = _ShimWorker(proc, listen, report)
    return _shim_worker


def _handed(stream: bytes) -> bool:
    """Hand a connection over to a real shim (engine/security/_rpcshim.c, in a worker
    process), feed it the ciphertext stream, and compare what its recv returned with the
    Python model: byte for byte, an error and nothing more after a bad record, a clean end
    exactly when the whole stream was good."""
    worker = _shim()
    near, far = socket.socketpair()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.connect(worker.listen)
        hand_over(unix, far, _RELAY_KEYS, b"")
        far.close()

        def feed() -> None:
            with contextlib.suppress(OSError):  # the worker may close before all is sent
                near.sendall(stream)
                near.shutdown(socket.SHUT_WR)

        feeder = threading.Thread(target=feed)
        feeder.start()
        worker.report.settimeout(CASE_LIMIT_S)
        head = relay_format.recv_exactly(worker.report, 5)
        got = relay_format.recv_exactly(worker.report, struct.unpack(">I", head[1:])[0])
        feeder.join()
    near.close()
    want, whole = _relay_model(stream)
    assert got == want, f"returned {len(got)} bytes, the model {len(want)}"
    assert (head[:1] == b"E") == whole, head[:1]
    return whole


def _relay_streams() -> st.SearchStrategy[bytes]:
    """Records in order, then damage: a changed byte, a cut, a replayed or skipped record,
    a huge length, or plain garbage."""
    plaintexts = st.lists(st.binary(max_size=300), min_size=0, max_size=5)
    good = plaintexts.map(lambda ps: b"".join(_sealed(i, p) for i, p in enumerate(ps)))
    edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3)

    def damage(pair: tuple[bytes, list[tuple[int, int]]]) -> bytes:
        data = bytearray(pair[0])
        for pos, byte in pair[1]:
            if data:
                data[pos % len(data)] = byte
        return bytes(data)

    skipped = plaintexts.map(lambda ps: b"".join(_sealed(i * 2, p) for i, p in enumerate(ps)))
    replayed = plaintexts.map(lambda ps: b"".join(_sealed(0, p) for p in ps))
    huge = st.integers(_RELAY_MAX + 1, 2**32 - 1).map(lambda n: struct.pack(">I", n) + bytes(16))
    return (
        good
        | st.tuples(good, edits).map(damage)
        | st.tuples(good, st.integers(0, 2000)).map(lambda g: g[0][: g[1]])
        | skipped
        | replayed
        | st.tuples(good, huge).map(lambda g: g[0] + g[1])
        | st.binary(max_size=600)
    )


def targets() -> list[Target]:
    return [
        Target(
            "frames",
            "FrameDecoder on bytes fed in pieces",
            st.tuples(_frame_bytes(), st.lists(st.integers(0, 4096), max_size=6)),
            lambda a: _frames(*a),
        ),
        Target(
            "stream", "read_frame on a socket stream (the agent's reader)", _frame_bytes(), _stream
        ),
        Target("messages", "from_wire on every message type", _message_shapes(), _message),
        Target("txt", "mDNS TXT record parser", _txt_records(), _txt),
        Target(
            "address",
            "HOST:PORT from the command line and the app",
            st.text(max_size=40) | st.from_regex(r"\[?[0-9a-f:.]{0,20}\]?:\w{0,8}", fullmatch=True),
            _address,
        ),
        Target("gguf", "GGUF header reader on corrupted model files", _gguf_edits(), _gguf),
        Target("pins", "the desktop's paired-agents.json", _file_contents(), _pins),
        Target("chats", "saved chat files", _file_contents(), _chat),
        Target("config", "the agent's TOML config file", _config_texts(), _config),
        Target(
            "relay",
            "the tunnel's native relay on damaged record streams (vs a Python model)",
            _relay_streams(),
            _relay,
        ),
        Target(
            "shim",
            "the hand-over's record reader in a worker on damaged record streams (vs a model)",
            _relay_streams(),
            _handed,
        ),
    ]


def run(target: Target, cases: int, derandomize: bool = False) -> Stats:
    """Run `cases` inputs through the target; raises (with hypothesis's minimal example) on
    the first input that crashes it or takes longer than CASE_LIMIT_S."""

    def one(value: Any) -> None:
        # the collector stays off for the case: a pass over hypothesis's own heap (hundreds
        # of MiB of bookkeeping) landing in a case that allocates many small lists took up
        # to 1.3 s, which is the harness's time, not the parser's
        gc.disable()
        try:
            t0 = time.perf_counter()
            parsed = target.check(value)
            took = time.perf_counter() - t0
        finally:
            gc.enable()
        target.stats.cases += 1
        target.stats.accepted += int(parsed)
        if took > target.stats.slowest_s:
            target.stats.slowest_s = took
            text = repr(value)
            target.stats.slowest_input = f"{text[:60]}… ({len(text)} chars)"

    test = given(target.strategy)(one)
    test = settings(
        max_examples=cases,
        deadline=timedelta(seconds=CASE_LIMIT_S),
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        derandomize=derandomize,
    )(test)
    test()
    return target.stats
