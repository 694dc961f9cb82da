"""`corral doctor`: this desktop's llama.cpp, NVML, clock and mDNS, and every paired agent
(reachable, the agent's port held by an agent, versions that match this desktop's)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress

import corral
from corral.discovery import Advertised, Browser, Event
from corral.discovery.interfaces import local_addresses, usable_local_ips
from corral.engine.aio import within
from corral.engine.protocol import PROTOCOL_VERSION, Hello
from corral.engine.runtime.agent_client import AgentClient, parse_address
from corral.engine.runtime.errors import AgentUnreachable, NotPaired
from corral.engine.security.desktop import desktop_keys
from corral.engine.security.pins import Peer

from .checks import (
    FAIL,
    PASS,
    RELAY_FIX,
    WARN,
    Check,
    LocalBuild,
    build_checks,
    clock_check,
    kernel_check,
    local_build,
    nvml_check,
    port_owner,
    print_report,
    relay_check,
)

_TCP_TIMEOUT = 3.0


def _is_local(host: str) -> bool:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        return host == "localhost"
    return host in {a.ip for a in local_addresses()}


async def _tcp_answer(host: str, port: int) -> str:
    """'' when something accepts TCP there, else why not."""
    try:
        _, writer = await within(asyncio.open_connection(host, port), _TCP_TIMEOUT)
    except TimeoutError:
        return f"no answer within {_TCP_TIMEOUT:.0f} s (host down, or a firewall drops it)"
    except OSError as exc:
        return exc.strerror or str(exc)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


def version_checks(name: str, theirs: Hello, local: LocalBuild) -> list[Check]:
    """Corral, protocol and llama.cpp versions of one agent against this desktop's."""
    ours_proto = f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}"
    checks = []
    if theirs.corral_version != corral.__version__:
        checks.append(
            Check(
                f"{name} version",
                FAIL,
                f"the agent runs Corral {theirs.corral_version or '?'} (protocol "
                f"{theirs.proto_major}.{theirs.proto_minor}), this desktop "
                f"{corral.__version__} (protocol {ours_proto})",
                f"install Corral {corral.__version__} on that host (run install-worker.sh "
                "from the same release) or update this desktop, so both run one version",
            )
        )
    else:
        checks.append(Check(f"{name} version", PASS, f"Corral {theirs.corral_version}"))
    build = local.build
    rpc, commit = str(build.get("rpc_proto", "")), str(build.get("ggml_commit", ""))
    if rpc and theirs.rpc_proto and rpc.split(".")[0] != theirs.rpc_proto.split(".")[0]:
        checks.append(
            Check(
                f"{name} llama.cpp",
                FAIL,
                f"ggml RPC protocol {theirs.rpc_proto} there, {rpc} here: llama.cpp would "
                "abort at the handshake",
                "install the same llama-cpp-python version on both (install_llama.py)",
            )
        )
    elif commit and theirs.llama_commit and commit != theirs.llama_commit:
        checks.append(
            Check(
                f"{name} llama.cpp",
                WARN,
                f"llama.cpp commit {theirs.llama_commit} there, {commit} here (same RPC "
                f"protocol {rpc}): it works, but kernels may differ",
                "install the same llama-cpp-python version on both (install_llama.py)",
            )
        )
    else:
        checks.append(
            Check(
                f"{name} llama.cpp",
                PASS,
                f"llama-cpp-python {theirs.llama_version or '?'}, RPC {theirs.rpc_proto or '?'}",
            )
        )
    if "rpc-relay" not in theirs.features and "rpc-direct" not in theirs.features:
        checks.append(
            Check(
                f"{name} tunnel",
                WARN,
                "that agent has no native relay: tunnels to it use the slower Python TLS pumps",
                f"on that host: {RELAY_FIX}run packaging/install-worker.sh again",
            )
        )
    return checks


async def agent_checks(peer: Peer, local: LocalBuild) -> tuple[list[Check], Hello | None]:
    """Reach one paired agent and compare its versions; explain what holds its port if not."""
    name = f"agent {peer.name}"
    address = peer.address
    if not address:
        return [Check(name, WARN, "paired, but its address is unknown", "pair it again")], None
    host, port = parse_address(address)
    why = await _tcp_answer(host, port)
    if why:
        return [
            Check(
                name,
                FAIL,
                f"{address}: {why}",
                f"start the agent there (systemctl start corral-agent, or corral-agent), and "
                f"run `corral-agent doctor` on {peer.name}",
            )
        ], None
    client = AgentClient(address, keys=desktop_keys())
    try:
        hello = await client.connect(timeout=5)
    except NotPaired as exc:
        return [Check(name, FAIL, str(exc), f"corral pair {address} --code CODE")], None
    except AgentUnreachable as exc:
        text = str(exc)
        if "protocol" in text and "install the same Corral version" in text:
            return [Check(f"{name} version", FAIL, text, "install one Corral version on both")], (
                None
            )
        owner = port_owner(port) if _is_local(host) else ""
        held = f" ({owner})" if owner else ""
        return [
            Check(
                name,
                FAIL,
                f"{address} accepts connections but does not answer as a Corral agent: the "
                f"agent's port is in use by another program{held}",
                f"on {peer.name}: stop the program on port {port}, or move the agent to another "
                "port (listen in its config, or --listen) and pair again; "
                "`corral-agent doctor` there shows what holds it",
            )
        ], None
    finally:
        await client.close()
    checks = [Check(name, PASS, f"{address} answers as agent {hello.agent_id[:12]}")]
    return checks + version_checks(name, hello, local), hello


async def _mdns(seen: set[str], ips: list[str], hellos: list[Hello], wait: float) -> Check:
    """Which reachable agents were also heard on mDNS: the rest are behind blocked multicast."""
    if not ips:
        return Check(
            "mDNS",
            FAIL,
            "no network interface to browse on (only loopback, link-local or bridges)",
            "connect to the LAN; agents can still be added by address (--agent HOST:PORT)",
        )
    missing = [h for h in hellos if h.agent_id not in seen]
    if missing:
        names = ", ".join(h.hostname or h.agent_id[:12] for h in missing)
        return Check(
            "mDNS",
            FAIL,
            f"{names} answer(s) at their address but were not heard on mDNS within {wait:g} s "
            f"(browsing on {', '.join(ips)}): multicast is blocked between here and there",
            "allow UDP 5353 (224.0.0.251) through the firewalls on both hosts and on the "
            "switch or Wi-Fi (multicast filtering, client isolation); across subnets or VPNs "
            "mDNS cannot pass: add the agent by address (corral hosts --agent HOST:PORT)",
        )
    if not seen:
        return Check(
            "mDNS",
            WARN,
            f"no agent announced itself within {wait:g} s on {', '.join(ips)}",
            "start an agent on the LAN; if one runs, allow UDP 5353 through the firewalls",
        )
    return Check("mDNS", PASS, f"heard {len(seen)} agent(s) on {', '.join(ips)}")


async def desktop_checks(wait: float) -> list[Check]:
    keys = desktop_keys()
    seen: set[str] = set()

    def heard(event: Event) -> None:
        if isinstance(event, Advertised):
            seen.add(event.hints.agent_id)

    ips = usable_local_ips(())
    browser = Browser(heard, ips=tuple(ips))
    await browser.start()
    try:
        local = await local_build()
        cert = keys.root / "identity" / "cert.pem"
        checks = [
            *build_checks(local),
            nvml_check(),
            relay_check(),
            clock_check(cert),
            speed_check(),
        ]
        if not local.error:
            checks.insert(len(checks) - 4, await kernel_check("corral doctor"))
        peers = keys.pins.peers()
        results = await asyncio.gather(*(agent_checks(p, local) for p in peers))
        hellos = [h for _, h in results if h is not None]
        for found, _ in results:
            checks += found
        if not peers:
            checks.append(
                Check("paired agents", WARN, "none yet", "corral pair HOST:PORT --code CODE")
            )
        # give announcements the full wait, counted from the browser's start
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while loop.time() < deadline and any(h.agent_id not in seen for h in hellos):
            await asyncio.sleep(0.1)
        checks.append(await _mdns(seen, ips, hellos, wait))
    finally:
        await browser.close()
    return checks


def speed_check() -> Check:
    """Whether a split ran slower than its prediction the last time a reply was measured on
    it (corral chat keeps measured / predicted per placement in speeds.json)."""
    from corral.engine.runtime.speeds import SpeedCache, slower_than_predicted

    cache = SpeedCache()
    if not cache.errors:
        return Check("speed predictions", PASS, "no reply measured against a prediction yet")
    slow = slower_than_predicted(cache)
    if not slow:
        return Check(
            "speed predictions",
            PASS,
            f"{len(cache.errors)} split(s) ran within 15 % of their prediction, or faster",
        )
    said = "; ".join(f"{where} ({100 * err:+.0f} %)" for where, err in slow[:3])
    return Check(
        "speed predictions",
        WARN,
        f"{len(slow)} split(s) ran more than 15 % slower than predicted at their last reply: "
        f"{said}. A device or link is slower than when it was measured",
        "plan again with fresh measurements: corral plan MODEL --strategy speed --remeasure "
        "--agent HOST:PORT …",
    )


def run_desktop_doctor(opts: argparse.Namespace) -> int:
    checks = asyncio.run(desktop_checks(opts.wait))
    return print_report(f"corral doctor (Corral {corral.__version__})", checks, opts.json)
