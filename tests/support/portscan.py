"""A TCP connect scan of every port of one address (run inside a network namespace).

python -m tests.support.portscan 10.77.0.1   → prints the open ports, one per line
"""

from __future__ import annotations

import errno
import select
import socket
import sys


def scan(address: str, batch: int = 400, timeout: float = 2.0) -> list[int]:
    open_ports: list[int] = []
    for first in range(1, 65536, batch):
        socks: dict[int, tuple[socket.socket, int]] = {}
        poller = select.poll()
        for port in range(first, min(first + batch, 65536)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            code = s.connect_ex((address, port))
            if code not in (0, errno.EINPROGRESS):
                s.close()
                continue
            socks[s.fileno()] = (s, port)
            poller.register(s, select.POLLOUT | select.POLLERR | select.POLLHUP)
        left = dict(socks)
        while left:
            events = poller.poll(timeout * 1000)
            if not events:
                break  # filtered: no answer at all counts as not open
            for fd, _ in events:
                s, port = left.pop(fd)
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    open_ports.append(port)
        for s, _ in socks.values():
            s.close()
    return sorted(open_ports)


if __name__ == "__main__":
    for p in scan(sys.argv[1]):
        print(p)
