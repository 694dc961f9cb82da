"""The agent's mDNS announcement: one `_corral._tcp.local.` service per agent identity."""

from __future__ import annotations

import logging
import socket

from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from .interfaces import usable_local_ips
from .txt import SERVICE_TYPE, AgentHints, encode_txt

log = logging.getLogger(__name__)


def _advertise_ips(listen_host: str, interfaces: tuple[str, ...]) -> list[str]:
    if listen_host not in ("", "0.0.0.0", "::"):
        return [listen_host]
    return usable_local_ips(interfaces)


class Advertiser:
    """Registers, updates and withdraws (with goodbye packets) the agent's service."""

    def __init__(self, hints: AgentHints, listen_host: str, interfaces: tuple[str, ...] = ()):
        self.hints = hints
        self.ips = _advertise_ips(listen_host, interfaces)
        self._zc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None
        short = hints.agent_id[:12]
        # Unique per identity, so two hosts both called "worker" stay two services, and the
        # A/AAAA records of one never overwrite the other's.
        self.instance = f"{socket.gethostname()[:40]}-{short}.{SERVICE_TYPE}"
        self.server = f"corral-{short}.local."

    def _service(self) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            self.instance,
            port=self.hints.port,
            properties=encode_txt(self.hints),
            server=self.server,
            parsed_addresses=self.ips,
        )

    async def start(self) -> None:
        if not self.ips:
            log.warning(
                "no usable network address to advertise on; discovery is off "
                "(desktops can still add this agent by address)"
            )
            return
        v6 = any(":" in ip for ip in self.ips)
        v4 = any(":" not in ip for ip in self.ips)
        version = IPVersion.All if v4 and v6 else (IPVersion.V6Only if v6 else IPVersion.V4Only)
        self._zc = AsyncZeroconf(interfaces=self.ips, ip_version=version)
        self._info = self._service()
        await (await self._zc.async_register_service(self._info))
        log.info("advertising %s on %s", self.instance, ", ".join(self.ips))

    async def update(self, hints: AgentHints) -> None:
        """Re-announce when what the record says has changed."""
        if hints == self.hints:
            return
        self.hints = hints
        if self._zc is not None:
            self._info = self._service()
            await (await self._zc.async_update_service(self._info))

    async def close(self) -> None:
        """Withdraw: the goodbye is only sent once the unregister task is awaited too."""
        if self._zc is None:
            return
        if self._info is not None:
            await (await self._zc.async_unregister_service(self._info))
        await self._zc.async_close()
        self._zc = None
