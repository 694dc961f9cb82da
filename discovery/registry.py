"""The desktop's host registry: pure state, changed only by `apply(hosts, event)`.

A host is keyed by agent id once known. Hosts added by address (networks without multicast)
are keyed "manual:HOST:PORT" until their first hello tells us who they are; then a manual
entry and a discovered one for the same agent become one host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from corral.engine.protocol import Inventory

from .txt import AgentHints

Hosts = Mapping[str, "Host"]


@dataclass(frozen=True, slots=True)
class Host:
    key: str
    name: str  # hostname as the agent reports it, or the address typed in
    addresses: tuple[str, ...]
    port: int
    agent_id: str = ""
    hostname: str = ""  # from the agent's hello
    manual: bool = False
    advertised: bool = False
    status: str = "discovered"  # discovered | online | offline | unpaired
    reason: str = ""  # why offline, in words
    hints: AgentHints | None = None
    inventory: Inventory | None = None  # the latest, while online (live VRAM and the rest)
    fingerprint: str = ""  # the certificate an unpaired agent showed (to check when pairing)
    since: float = 0.0  # when status last changed (time.monotonic())

    @property
    def address(self) -> str:
        """HOST:PORT for the first (best) address."""
        host = self.addresses[0] if self.addresses else "?"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Advertised:
    service: str  # mDNS instance name
    hints: AgentHints
    addresses: tuple[str, ...]
    at: float


@dataclass(frozen=True, slots=True)
class Withdrawn:
    service: str
    at: float


@dataclass(frozen=True, slots=True)
class ManualAdded:
    host: str
    port: int
    at: float


@dataclass(frozen=True, slots=True)
class Online:
    key: str
    agent_id: str
    hostname: str
    at: float


@dataclass(frozen=True, slots=True)
class Offline:
    key: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Unpaired:
    """The host answers, but it and this desktop have not paired (or one side unpaired);
    `fingerprint`: the certificate it showed, where the connection got that far."""

    key: str
    reason: str
    at: float
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class Inventoried:
    """A fresh inventory from the host's control channel (GPUs, VRAM, worker)."""

    key: str
    inventory: Inventory
    at: float


Event = Advertised | Withdrawn | ManualAdded | Online | Offline | Unpaired | Inventoried


def service_key(hosts: Hosts, service: str) -> str | None:
    for h in hosts.values():
        if h.advertised and h.name == service:
            return h.key
    return None


def apply(hosts: Hosts, event: Event) -> dict[str, Host]:
    """The registry after one event (the input is never modified)."""
    out = dict(hosts)
    if isinstance(event, Advertised):
        key = event.hints.agent_id
        old = out.get(key)
        addrs = tuple(dict.fromkeys((*event.addresses, *(old.addresses if old else ()))))
        if old is None:
            out[key] = Host(
                key=key,
                name=event.service,
                addresses=addrs,
                port=event.hints.port,
                agent_id=key,
                advertised=True,
                hints=event.hints,
                since=event.at,
            )
        else:
            out[key] = dataclasses.replace(
                old,
                addresses=addrs,
                port=event.hints.port,
                advertised=True,
                hints=event.hints,
                name=event.service if not old.manual else old.name,
            )
    elif isinstance(event, Withdrawn):
        gone = service_key(out, event.service)
        if gone is not None:
            if out[gone].manual:
                out[gone] = dataclasses.replace(out[gone], advertised=False)
            else:
                del out[gone]
    elif isinstance(event, ManualAdded):
        key = f"manual:{event.host}:{event.port}"
        if key not in out and not any(
            event.host in h.addresses and h.port == event.port for h in out.values()
        ):
            out[key] = Host(
                key=key,
                name=f"{event.host}:{event.port}",
                addresses=(event.host,),
                port=event.port,
                manual=True,
                since=event.at,
            )
    elif isinstance(event, Online):
        host = out.get(event.key)
        if host is None:
            return out
        if host.agent_id and host.agent_id != event.agent_id:
            # the address now answers as another agent (restarted with a new identity, or the
            # address moved): this host is not there; the other one announces itself
            out[event.key] = dataclasses.replace(
                host,
                status="offline",
                since=event.at,
                reason=f"{host.address} now answers as another agent ({event.agent_id[:12]})",
            )
            return out
        if event.key != event.agent_id and event.agent_id in out:
            # a manual entry turned out to be an agent we already know: one host
            del out[event.key]
            twin = out[event.agent_id]
            host = dataclasses.replace(
                twin,
                manual=True,
                addresses=tuple(dict.fromkeys((*twin.addresses, *host.addresses))),
            )
        elif event.key != event.agent_id:
            del out[event.key]
            host = dataclasses.replace(host, key=event.agent_id)
        changed = host.status != "online"
        out[event.agent_id] = dataclasses.replace(
            host,
            agent_id=event.agent_id,
            hostname=event.hostname,
            status="online",
            reason="",
            since=event.at if changed else host.since,
        )
    elif isinstance(event, Inventoried):
        host = out.get(event.key)
        if host is not None:
            out[event.key] = dataclasses.replace(host, inventory=event.inventory)
    elif isinstance(event, Offline | Unpaired):
        host = out.get(event.key)
        status = "offline" if isinstance(event, Offline) else "unpaired"
        if host is not None:
            changed = host.status != status
            out[event.key] = dataclasses.replace(
                host,
                status=status,
                inventory=None if status == "unpaired" else host.inventory,
                reason=event.reason,
                fingerprint=event.fingerprint if isinstance(event, Unpaired) else host.fingerprint,
                since=event.at if changed else host.since,
            )
    return out
