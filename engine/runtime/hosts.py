"""The desktop's live view of hosts: mDNS discovery, hosts added by address, and heartbeats.

A host is online while its control channel answers pings. A dead process closes its sockets
(offline at once); a cut cable or a frozen host does not, so a ping unanswered within
`timeout` marks it offline too. Offline hosts are retried every `retry` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from corral.discovery import (
    Browser,
    Event,
    Host,
    Hosts,
    Inventoried,
    ManualAdded,
    Offline,
    Online,
    Unpaired,
    apply,
)
from corral.engine.aio import within

from .agent_client import AgentClient, parse_address
from .errors import AgentUnreachable, NotPaired, RuntimeFailure

log = logging.getLogger(__name__)

_HELLO_TIMEOUT = 10.0


class _Heartbeat:
    """Keeps one control connection to a host and reports online/offline."""

    def __init__(self, directory: HostDirectory, key: str) -> None:
        self.key = key
        self.agent_id = ""
        self._dir = directory
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _host(self) -> Host | None:
        return self._dir.hosts.get(self.key)

    async def _run(self) -> None:
        while self._host() is not None:
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the heartbeat silently
                log.exception("heartbeat for %s failed", self.key)
                self._dir.emit(Offline(self.key, f"internal error: {exc}", time.monotonic()))
                await asyncio.sleep(self._dir.retry)

    async def _watch(self) -> None:
        """Connect, say the host is online, and wait on the connection until it fails."""
        d = self._dir
        while True:
            host = self._host()
            if host is None:
                return
            client, failure = await self._connect(host)
            if client is None:
                if isinstance(failure, NotPaired):
                    d.emit(Unpaired(self.key, str(failure), time.monotonic(), failure.fingerprint))
                    await asyncio.sleep(d.retry * 3)  # until someone pairs: no hurry
                else:
                    d.emit(Offline(self.key, str(failure or "no address"), time.monotonic()))
                    await asyncio.sleep(d.retry)
                continue
            try:
                assert client.hello is not None
                self.agent_id = client.hello.agent_id
                d.emit(
                    Online(self.key, client.hello.agent_id, client.hello.hostname, time.monotonic())
                )
                host = d.hosts.get(self.key)
                if host is None or host.status != "online":  # another agent answered there
                    continue  # (the finally closes the client; retry after the pause below)
                next_inventory = 0.0
                while True:
                    if d.inventory_every and time.monotonic() >= next_inventory:
                        # an inventory answers like a ping, and carries the live VRAM
                        inv = await within(client.inventory(), d.timeout * 5)
                        d.emit(Inventoried(self.key, inv, time.monotonic()))
                        next_inventory = time.monotonic() + d.inventory_every
                    if await client.wait_lost(d.interval):
                        raise AgentUnreachable(
                            f"lost the connection to agent {client.address}: "
                            f"{client.closed_reason or 'closed'}"
                        )
                    await client.ping_within(d.timeout)
            except (RuntimeFailure, TimeoutError) as exc:
                d.emit(Offline(self.key, str(exc) or "no inventory in time", time.monotonic()))
            finally:
                await client.close()
            await asyncio.sleep(d.retry)

    async def _connect(self, host: Host) -> tuple[AgentClient | None, RuntimeFailure | None]:
        """A connected client, or why not (a NotPaired ends the search: the host answered)."""
        failure: RuntimeFailure | None = None
        for addr in host.addresses:
            text = f"[{addr}]:{host.port}" if ":" in addr else f"{addr}:{host.port}"
            client = AgentClient(text)
            try:
                # a cold agent answers hello only after listing its devices: give it longer
                # than a heartbeat (a dead link still shows within `timeout` of going down)
                await client.connect(timeout=max(self._dir.timeout, _HELLO_TIMEOUT))
                return client, None
            except NotPaired as exc:
                return None, exc
            except RuntimeFailure as exc:
                failure = exc
        return None, failure


class HostDirectory:
    """Owns the Browser and the heartbeats; `hosts` is the registry, `on_change` hears it."""

    def __init__(
        self,
        on_change: Callable[[Hosts, Event], None] | None = None,
        *,
        browse: bool = True,
        interfaces: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        allow_link_local: bool = False,
        allow_bridges: bool = False,
        interval: float = 1.0,
        timeout: float = 2.0,
        retry: float = 1.0,
        inventory_every: float = 0.0,
    ) -> None:
        self.hosts: dict[str, Host] = {}
        self.interval, self.timeout, self.retry = interval, timeout, retry
        self.inventory_every = inventory_every  # seconds; 0: heartbeats only
        self._on_change = on_change
        self._beats: dict[str, _Heartbeat] = {}
        self.browser: Browser | None = (
            Browser(self.emit, interfaces, ips, allow_link_local, allow_bridges) if browse else None
        )

    async def pair(self, key: str, code: str) -> str:
        """Pair with host `key` using the code its agent shows; returns its name. The
        heartbeat then finds it paired on its next try."""
        host = self.hosts.get(key)
        if host is None:
            raise AgentUnreachable(f"no host {key} in the list")
        peer = await AgentClient(host.address).pair(code)
        beat = self._beats.get(key)
        if beat is not None:  # do not wait out the unpaired back-off
            beat.task.cancel()
            self._beats[key] = _Heartbeat(self, key)
        return peer.name

    async def unpair(self, key: str) -> None:
        """Forget host `key` here and, while it is reachable, there too."""
        host = self.hosts.get(key)
        if host is None:
            raise AgentUnreachable(f"no host {key} in the list")
        client = AgentClient(host.address)
        try:
            await client.connect(timeout=3)
            await client.unpair()
        except RuntimeFailure:  # not reachable (or it already forgot us): forget it here
            client.keys.pins.remove(host.agent_id or host.address)
        finally:
            await client.close()

    async def start(self) -> None:
        if self.browser is not None:
            await self.browser.start()

    def add_manual(self, address: str) -> None:
        """HOST:PORT of an agent mDNS cannot see; ValueError if the text is not one."""
        host, port = parse_address(address)
        self.emit(ManualAdded(host, port, time.monotonic()))

    def emit(self, event: Event) -> None:
        before = self.hosts
        self.hosts = apply(self.hosts, event)
        if not isinstance(event, Inventoried):
            self._reconcile()
        if self._on_change is not None and self.hosts != before:
            self._on_change(self.hosts, event)

    def _reconcile(self) -> None:
        for key, beat in list(self._beats.items()):
            if key in self.hosts:
                continue
            del self._beats[key]
            # a manual entry that turned out to be a known agent continues under its id
            if beat.agent_id in self.hosts and beat.agent_id not in self._beats:
                beat.key = beat.agent_id
                self._beats[beat.agent_id] = beat
            else:
                beat.task.cancel()
        for key in self.hosts:
            if key not in self._beats:
                self._beats[key] = _Heartbeat(self, key)

    async def close(self) -> None:
        for beat in self._beats.values():
            beat.task.cancel()
        for beat in self._beats.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beat.task
        self._beats.clear()
        if self.browser is not None:
            await self.browser.close()
