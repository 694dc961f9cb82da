"""The hand-over's own cost per RPC message, by size, without llama.cpp: two processes talk
ggml-rpc's framing (command byte, 8-byte size, payload; 8-byte size and 4 bytes back) over
loopback TCP, either plainly or with the shim preloaded in both and the connection handed
over with record keys (as a desktop and an agent do). Reported: mean µs per round trip,
median of rounds, and the difference; 200 KB is about one graph per worker per token of a
7B model split in two.

    .venv/bin/python bench/handover.py [--rounds 7] [--count 2000] [--sizes 12,131072]
                                       [--also OTHER_SHIM.so]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap

from corral.engine.security.tunnel import hand_over, relay_keys, shim_file

SERVER = """
    import socket, sys
    srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ggml-rpc does
    def exactly(n):
        data = bytearray()
        while len(data) < n:
            more = c.recv(n - len(data))
            if not more:
                raise SystemExit
            data += more
        return data
    while True:
        head = exactly(9)
        exactly(int.from_bytes(head[1:], "little"))
        c.sendall((4).to_bytes(8, "little"))
        c.sendall(b"\\0\\0\\0\\0")
"""

CLIENT = """
    import socket, sys, time
    size, count = int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ggml-rpc does
    payload = bytes(size)
    def exactly(n):
        data = bytearray()
        while len(data) < n:
            more = s.recv(n - len(data))
            if not more:
                raise SystemExit("closed")
            data += more
        return data
    def once():
        s.sendall(b"\\x0f")
        s.sendall(size.to_bytes(8, "little"))
        s.sendall(payload)
        exactly(12)
    for _ in range(50):
        once()
    t0 = time.perf_counter()
    for _ in range(count):
        once()
    print((time.perf_counter() - t0) / count * 1e6)
"""


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def _spawn(code: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=dict(os.environ, **env),
        stdout=subprocess.PIPE,
        text=True,
    )


def round_trip(size: int, count: int, handed: bool, lib: str) -> float:
    folder = tempfile.mkdtemp(prefix="corral-b-", dir="/tmp")
    port, asked = _free_port(), 1  # the client asks 127.0.0.1:1, which only a hand-over answers
    shim = {"LD_PRELOAD": lib, "CORRAL_RPCSHIM_PRELOAD_WAS": ""} if handed else {}
    listen = os.path.join(folder, "worker")
    server = _spawn(
        SERVER,
        [str(port)],
        {**shim, "CORRAL_RPCSHIM_LISTEN": listen, "CORRAL_RPCSHIM_PORT": str(port)}
        if handed
        else {},
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        if not handed:
            client = _spawn(CLIENT, [str(port), str(size), str(count)], {})
            return float(client.communicate(timeout=600)[0])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as desk:
            desk.bind(os.path.join(folder, str(asked)))
            desk.listen(1)
            client = _spawn(
                CLIENT,
                [str(asked), str(size), str(count)],
                {**shim, "CORRAL_RPCSHIM_CONNECT": folder},
            )
            with socket.create_server(("127.0.0.1", 0)) as lsn:
                a = socket.create_connection(lsn.getsockname())
                b, _ = lsn.accept()
            d_share, a_share = os.urandom(32), os.urandom(32)
            u, _ = desk.accept()
            hand_over(u, a, relay_keys(d_share, a_share, "desktop"), b"")
            w = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            w.connect(listen)
            hand_over(w, b, relay_keys(d_share, a_share, "agent"), b"")
            for x in (a, b):
                x.close()
            out = float(client.communicate(timeout=600)[0])
            u.close()
            w.close()
            return out
    finally:
        server.kill()
        server.communicate()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--sizes", default="12,131072,204800")
    parser.add_argument(
        "--also",
        default="",
        help="another build of the shim to measure beside this one (e.g. an older one)",
    )
    opts = parser.parse_args()
    libs = [shim_file()] + ([opts.also] if opts.also else [])
    if not libs[0]:
        print("the shim (engine/security/_rpcshim.c) is not built here", file=sys.stderr)
        return 1
    print(
        "| request bytes | plain µs | handed over µs (added) |"
        + (" --also µs (added) |" if opts.also else "")
    )
    print("|---|---|---|" + ("---|" if opts.also else ""))
    for size in (int(x) for x in opts.sizes.split(",")):
        got: dict[str, list[float]] = {"": [], **{lib: [] for lib in libs}}
        for r in range(opts.rounds):
            order = list(got)
            order = order[r % len(order) :] + order[: r % len(order)]
            for lib in order:
                got[lib].append(round_trip(size, opts.count, bool(lib), lib))
        plain = statistics.median(got[""])
        cells = [
            f"{statistics.median(got[lib]):.1f} ({statistics.median(got[lib]) - plain:+.1f})"
            for lib in libs
        ]
        print(f"| {size} | {plain:.1f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
