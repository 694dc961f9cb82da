"""The hand-over's own cost per RPC message, by size, without llama.cpp: two processes talk
ggml-rpc's framing (command byte, 8-byte size, payload; 8-byte size and 4 bytes back) over
loopback TCP, either plainly or with the shim preloaded in both and the connection handed
over with record keys (as a desktop and an agent do). Reported: mean µs per round trip,
median of rounds, and the difference. 128 KiB is the logits a worker returns each token for
a 32k vocabulary; 200 KB about a graph a worker gets when llama.cpp cannot reuse the last.

    .venv/bin/python bench/handover.py [--rounds 7] [--count 2000] [--sizes 12,131072]
                                       [--also OTHER_SHIM.so]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.engine.security.tunnel import TUNNEL_HOST, hand_over, relay_keys, shim_file

sys.path.insert(0, str(Path(__file__).parent))
from tunnel import recv_exactly, rotated  # bench/tunnel.py, beside this file


def serve(host: str, port: int) -> None:
    """The worker's side (a process of its own): answer each message with 12 bytes. With the
    shim, TUNNEL_HOST:port binds nothing and accept() takes the hand-over."""
    srv = socket.create_server((host, port))
    print("ready", flush=True)
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ggml-rpc does
    with contextlib.suppress(ConnectionError):  # the client is done
        while True:
            head = recv_exactly(c, 9)
            recv_exactly(c, int.from_bytes(head[1:], "little"))
            c.sendall((4).to_bytes(8, "little"))
            c.sendall(bytes(4))


def client(host: str, port: int, size: int, count: int) -> float:
    """The inference child's side (a process of its own): mean µs per round trip, written in
    three pieces as ggml-rpc writes a command."""
    s = socket.create_connection((host, port), timeout=20)
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ggml-rpc does
    payload = bytes(size)

    def once() -> None:
        s.sendall(b"\x0f")
        s.sendall(size.to_bytes(8, "little"))
        s.sendall(payload)
        recv_exactly(s, 12)

    for _ in range(50):
        once()
    t0 = time.perf_counter()
    for _ in range(count):
        once()
    return (time.perf_counter() - t0) / count * 1e6


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env=dict(os.environ, **env),
        stdout=subprocess.PIPE,
        text=True,
    )


def round_trip(size: int, count: int, handed: bool, lib: str) -> float:
    folder = tempfile.mkdtemp(prefix="corral-b-", dir="/tmp")
    # handed over: the client asks TUNNEL_HOST:1, which only a hand-over answers, and the
    # server's TUNNEL_HOST:port is a label; plain: both on a free loopback port
    port, asked = (4242, 1) if handed else (_free_port(), 0)
    host = TUNNEL_HOST if handed else "127.0.0.1"
    shim = {"LD_PRELOAD": lib, "CORRAL_RPCSHIM_PRELOAD_WAS": ""} if handed else {}
    listen = os.path.join(folder, "worker")
    server = _spawn(
        ["--serve", host, str(port)],
        {**shim, "CORRAL_RPCSHIM_LISTEN": listen, "CORRAL_RPCSHIM_PORT": str(port)}
        if handed
        else {},
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        if not handed:
            proc = _spawn(["--client", host, str(port), str(size), str(count)], {})
            return float(proc.communicate(timeout=600)[0])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as desk:
            desk.bind(os.path.join(folder, str(asked)))
            desk.listen(1)
            proc = _spawn(
                ["--client", host, str(asked), str(size), str(count)],
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
            out = float(proc.communicate(timeout=600)[0])
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
        help="another build of the shim to measure beside this one (one that knows the "
        "tunnel address, 127.82.80.67)",
    )
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)  # round_trip's worker
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)  # and its client
    opts = parser.parse_args()
    if opts.serve:
        serve(opts.serve[0], int(opts.serve[1]))
        return 0
    if opts.client:
        host, *numbers = opts.client
        print(client(host, *(int(x) for x in numbers)))
        return 0
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
            for lib in rotated(list(got), r):
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
