"""A slower link between the desktop and one agent, for bench/placement.py: a TCP relay on
127.0.0.1 that delivers each piece of data `delay` ms after it came (each way) and no faster
than `rate` megabits a second.

Where the kernel has sch_netem, `tc qdisc add dev … netem delay 5ms rate 100mbit` does the
same inside a network namespace; the kernels these benches ran on lacked it (only tbf), so
the relay stands in. Two threads a direction: a reader stamps each piece with when it may
leave (after the pieces before it, at the rate, plus the delay), a writer sends it then
(time.sleep is precise to ~0.1 ms here, asyncio's timers only to 1 ms).

    python bench/linkem.py TARGET_HOST:PORT DELAY_MS RATE_MBIT   (0: no limit)

prints "listening on 127.0.0.1:PORT" and relays until killed.
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time


def pipe(src: socket.socket, dst: socket.socket, delay: float, rate: float) -> None:
    pieces: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def read() -> None:
        free = 0.0  # when the link is free to send the next piece (the rate)
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            now = time.perf_counter()
            if not data:
                pieces.put((now, b""))
                return
            free = max(free, now) + (len(data) * 8 / rate if rate else 0.0)
            pieces.put((free + delay, data))

    def write() -> None:
        while True:
            due, data = pieces.get()
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def main() -> int:
    host, port = sys.argv[1].rsplit(":", 1)
    delay = float(sys.argv[2]) / 1000.0
    rate = float(sys.argv[3]) * 1e6
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection((host, int(port)))
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe(client, upstream, delay, rate)
        pipe(upstream, client, delay, rate)


if __name__ == "__main__":
    sys.exit(main())
