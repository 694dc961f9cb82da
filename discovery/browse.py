"""The desktop's mDNS browser: resolves `_corral._tcp.local.` services into registry events.

Runs on the engine's asyncio loop. mDNS says who exists and where; it cannot say who died
(a host killed with -9 stays cached for ~19 minutes), so liveness comes from the control
channel's heartbeat, not from here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .interfaces import choose_addresses, usable_local_ips
from .registry import Advertised, Event, Withdrawn
from .txt import SERVICE_TYPE, BadTxt, decode_txt

log = logging.getLogger(__name__)

_RESOLVE_MS = 3000


class Browser:
    """Emits Advertised / Withdrawn events for Corral agents on the chosen interfaces."""

    def __init__(
        self,
        emit: Callable[[Event], None],
        interfaces: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        allow_link_local: bool = False,
        allow_bridges: bool = False,
    ) -> None:
        self._emit = emit
        self._ips = list(ips) or usable_local_ips(interfaces, allow_link_local, allow_bridges)
        self._allow_link_local = allow_link_local
        self._allow_bridges = allow_bridges
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # keep fire-and-forget tasks alive
        self.ignored: list[str] = []  # why announcements were dropped (also logged)

    @property
    def ips(self) -> list[str]:
        return list(self._ips)

    async def start(self) -> None:
        if not self._ips:
            log.warning("no usable interface for discovery; add agents by address")
            return
        v6 = any(":" in ip for ip in self._ips)
        v4 = any(":" not in ip for ip in self._ips)
        version = IPVersion.All if v4 and v6 else (IPVersion.V6Only if v6 else IPVersion.V4Only)
        self._zc = AsyncZeroconf(interfaces=self._ips, ip_version=version)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._emit(Withdrawn(service=name, at=time.monotonic()))
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, _RESOLVE_MS):
            log.info("could not resolve %s", name)
            return
        try:
            hints = decode_txt(info.properties)
        except BadTxt as exc:
            why = f"ignoring the announcement {name!r}: {exc}"
            log.warning(why)
            self.ignored.append(why)
            return
        addresses = choose_addresses(
            info.parsed_scoped_addresses(IPVersion.All),
            self._allow_link_local,
            self._allow_bridges,
        )
        if not addresses:
            log.info("ignoring %s: no usable address", name)
            return
        self._emit(
            Advertised(service=name, hints=hints, addresses=tuple(addresses), at=time.monotonic())
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
