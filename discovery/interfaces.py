"""Which local interfaces and which advertised addresses Corral uses.

Link-local addresses and container bridges (docker0, br-…, veth…, virbr…) are skipped unless
the user allows them: an agent reached over a Docker bridge is almost never what the user
meant, and link-local addresses need a scope to be usable.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import ifaddr

_BRIDGE_PREFIXES = (
    "docker",
    "br-",
    "veth",
    "virbr",
    "lxcbr",
    "lxdbr",
    "cni",
    "flannel",
    "podman",
    "vboxnet",
    "vmnet",
    "tailscale-docker",
)


@dataclass(frozen=True, slots=True)
class LocalAddress:
    interface: str
    ip: str
    prefix: int
    loopback: bool
    link_local: bool
    bridge: bool


def is_bridge(interface: str) -> bool:
    return interface.startswith(_BRIDGE_PREFIXES)


def local_addresses() -> list[LocalAddress]:
    """Every IPv4/IPv6 address of every adapter, classified."""
    out = []
    for adapter in ifaddr.get_adapters():
        name = adapter.nice_name
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            addr = ipaddress.ip_address(text)
            out.append(
                LocalAddress(
                    name,
                    text,
                    ip.network_prefix,
                    addr.is_loopback,
                    addr.is_link_local,
                    is_bridge(name),
                )
            )
    return out


def usable_local_ips(
    interfaces: tuple[str, ...] = (), allow_link_local: bool = False, allow_bridges: bool = False
) -> list[str]:
    """IPs to run mDNS on: the named interfaces, or every ordinary non-loopback one."""
    chosen = []
    for a in local_addresses():
        if interfaces:
            if a.interface in interfaces and (allow_link_local or not a.link_local):
                chosen.append(a.ip)
            continue
        if (
            a.loopback
            or (a.link_local and not allow_link_local)
            or (a.bridge and not allow_bridges)
        ):
            continue
        chosen.append(a.ip)
    return chosen


def unknown_interfaces(interfaces: tuple[str, ...]) -> list[str]:
    names = {a.interface for a in local_addresses()}
    return [i for i in interfaces if i not in names]


def _bridge_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(f"{a.ip}/{a.prefix}", strict=False)
        for a in local_addresses()
        if a.bridge
    ]


def choose_addresses(
    addresses: list[str], allow_link_local: bool = False, allow_bridges: bool = False
) -> list[str]:
    """Advertised addresses worth connecting to, best first (IPv4, then global IPv6)."""
    bridges = [] if allow_bridges else _bridge_networks()
    keep = []
    for text in addresses:
        try:
            addr = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if addr.is_link_local and not allow_link_local:
            continue
        if addr.is_unspecified or addr.is_multicast:
            continue
        if any(addr in net for net in bridges if net.version == addr.version):
            continue
        keep.append(text)
    return sorted(dict.fromkeys(keep), key=lambda t: (":" in t, t))
