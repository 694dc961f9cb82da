"""A small LAN inside one machine: network namespaces on a bridge (root only).

    with Lan(hosts=3) as lan:
        agent = lan.spawn(1, [sys.executable, "-m", "corral.engine.agentcli", ...])

Host i has address 10.77.0.i on interface `lan.veth(i)`; all hosts share one bridge in a
namespace of their own, with multicast on, so mDNS works between them. Every name carries a
per-run prefix, and `close()` kills whatever runs inside and deletes the namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from types import TracebackType
from typing import Any


class LanUnavailable(Exception):
    """Why namespaces cannot be made here (not root, no `ip`, no CAP_SYS_ADMIN)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Lan:
    def __init__(self, hosts: int = 3) -> None:
        self.count = hosts
        self.prefix = f"cr{os.getpid() % 100000}"
        self.bridge_ns = f"{self.prefix}br"
        self.procs: list[subprocess.Popen[Any]] = []
        self._state = tempfile.mkdtemp(prefix=f"corral-{self.prefix}-")

    def state_dir(self, i: int) -> str:
        """Where host i's agent keeps its identity: the same across restarts, like a real host."""
        return os.path.join(self._state, f"host{i}")

    def ns(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def veth(self, i: int, extra: int = 0) -> str:
        return f"{self.prefix}v{i}{'x' * extra}"[:15]

    @staticmethod
    def address(i: int) -> str:
        return f"10.77.0.{i}"

    @staticmethod
    def check() -> None:
        if os.geteuid() != 0:
            raise LanUnavailable("network-namespace tests need root (they create namespaces)")
        if shutil.which("ip") is None:
            raise LanUnavailable("network-namespace tests need iproute2's `ip`")

    def __enter__(self) -> Lan:
        self.check()
        try:
            self._build()
        except subprocess.CalledProcessError as exc:
            self.close()
            raise LanUnavailable(f"could not build the test LAN: {exc.stderr.strip()}") from None
        return self

    def _build(self) -> None:
        br = self.bridge_ns
        _ip("netns", "add", br)
        _ip("-n", br, "link", "set", "lo", "up")
        _ip("-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", "br0", "up")
        for i in range(1, self.count + 1):
            _ip("netns", "add", self.ns(i))
            _ip("-n", self.ns(i), "link", "set", "lo", "up")
            self.plug(i, self.address(i))

    def plug(self, i: int, address: str, extra: int = 0) -> str:
        """Give host i one more interface on the bridge, with this address; return its name."""
        veth, peer = self.veth(i, extra), f"{self.prefix}p{i}{'x' * extra}"[:15]
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", veth, "netns", self.ns(i))
        _ip("link", "set", peer, "netns", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "set", peer, "master", "br0")
        _ip("-n", self.bridge_ns, "link", "set", peer, "up")
        _ip("-n", self.ns(i), "addr", "add", f"{address}/24", "dev", veth)
        _ip("-n", self.ns(i), "link", "set", veth, "multicast", "on", "up")
        return veth

    def add_ipv6(self, i: int) -> str:
        """Give host i the address fd77::i (no duplicate-address wait); return it."""
        address = f"fd77::{i}"
        _ip("-n", self.ns(i), "-6", "addr", "add", f"{address}/64", "dev", self.veth(i), "nodad")
        return address

    def link(self, i: int, up: bool) -> None:
        """Cable in or out: host i's interface up or down (a network partition)."""
        _ip("-n", self.ns(i), "link", "set", self.veth(i), "up" if up else "down")

    def drop(self, i: int, on: bool) -> None:
        """A silent partition: host i's link stays up, but the bridge no longer carries its
        frames (its port is taken off the bridge), so packets vanish without an error."""
        port = f"{self.prefix}p{i}"[:15]
        if on:
            _ip("-n", self.bridge_ns, "link", "set", port, "nomaster")
        else:
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")

    def spawn(self, i: int, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside host i."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv], **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        names = [self.ns(i) for i in range(1, self.count + 1)] + [self.bridge_ns]
        for name in names:
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
        shutil.rmtree(self._state, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
