"""Discovery across real network namespaces: agents in two hosts, the browser in a third."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.support.netns import Lan
from tests.support.watch import Watcher, by_address, start_agent


def test_agents_appear_stay_distinct_and_leave(lan: Lan) -> None:
    watcher = Watcher(lan, 3)
    try:
        a, b = start_agent(lan, 1), start_agent(lan, 2)
        a_ip, b_ip = lan.address(1), lan.address(2)

        def both_online(hosts: list[dict]) -> bool:
            ha, hb = by_address(hosts, a_ip), by_address(hosts, b_ip)
            return bool(ha and hb and ha["status"] == hb["status"] == "online")

        hosts = watcher.wait_for(both_online)["hosts"]
        ha, hb = by_address(hosts, a_ip), by_address(hosts, b_ip)
        assert ha and hb
        # the namespaces share one hostname: still two hosts, told apart by agent id
        assert ha["hostname"] == hb["hostname"] and ha["agent_id"] != hb["agent_id"]
        assert ha["gpus"] == 0 and ha["port"] == 7340

        b.send_signal(signal.SIGTERM)  # clean stop: goodbye packets
        watcher.wait_for(lambda hs: by_address(hs, b_ip) is None)

        a.kill()  # kill -9: no goodbye; the heartbeat notices
        event = watcher.wait_for(lambda hs: (by_address(hs, a_ip) or {}).get("status") == "offline")
        reason = by_address(event["hosts"], a_ip)["reason"]  # type: ignore[index]
        assert a_ip in reason
    finally:
        watcher.stop()


def test_link_down_goes_offline_and_back(lan: Lan) -> None:
    watcher = Watcher(lan, 3)
    try:
        start_agent(lan, 1)
        ip = lan.address(1)
        watcher.wait_for(lambda hs: (by_address(hs, ip) or {}).get("status") == "online")
        lan.link(1, up=False)
        event = watcher.wait_for(
            lambda hs: (by_address(hs, ip) or {}).get("status") == "offline", timeout=60
        )
        assert "heartbeat" in by_address(event["hosts"], ip)["reason"]  # type: ignore[index]
        lan.link(1, up=True)
        watcher.wait_for(lambda hs: (by_address(hs, ip) or {}).get("status") == "online", 60)
    finally:
        watcher.stop()


_BOGUS = """
import asyncio, sys
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf
async def main():
    zc = AsyncZeroconf(interfaces=[sys.argv[1]])
    infos = [
        ServiceInfo("_corral._tcp.local.", "garbled._corral._tcp.local.", port=7340,
                    properties={"id": "not-hex!", "proto": "x"}, server="garbled.local.",
                    parsed_addresses=[sys.argv[1]]),
        ServiceInfo("_corral._tcp.local.", "oversized._corral._tcp.local.", port=7340,
                    properties={**{f"k{i}": "v" * 200 for i in range(8)}, "id": "ab" * 16,
                                "proto": "1.0", "gpus": "0", "vram": "0", "port": "7340"},
                    server="oversized.local.", parsed_addresses=[sys.argv[1]]),
    ]
    for info in infos:
        await (await zc.async_register_service(info))
    print("registered", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_garbled_and_oversized_announcements_are_ignored(lan: Lan) -> None:
    watcher = Watcher(lan, 3)
    bogus = lan.spawn(
        2, [sys.executable, "-c", _BOGUS, lan.address(2)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert bogus.stdout is not None and bogus.stdout.readline().strip() == "registered"
        start_agent(lan, 1)  # a real one, so we know the browser has been listening
        watcher.wait_for(
            lambda hs: (by_address(hs, lan.address(1)) or {}).get("status") == "online"
        )
        time.sleep(1.0)
    finally:
        log = watcher.stop()
        bogus.kill()
    hosts = watcher.events[-1]["hosts"]
    assert by_address(hosts, lan.address(2)) is None
    assert "ignoring the announcement 'garbled._corral._tcp.local.'" in log
    assert "ignoring the announcement 'oversized._corral._tcp.local.'" in log
    assert "exceeds 1024" in log


def test_a_host_on_two_interfaces_is_one_host(lan: Lan) -> None:
    second = "10.77.0.11"
    lan.plug(1, second, extra=1)
    watcher = Watcher(lan, 3)
    try:
        start_agent(lan, 1, listen="0.0.0.0:7340")  # answers on both interfaces
        event = watcher.wait_for(
            lambda hs: (
                len(hs) == 1
                and {lan.address(1), second} <= set(hs[0]["addresses"])
                and hs[0]["status"] == "online"
            )
        )
        assert len(event["hosts"]) == 1
        time.sleep(1.0)
        assert len(watcher.events[-1]["hosts"]) == 1
    finally:
        watcher.stop()


def test_an_ipv6_only_agent_is_found_and_watched_over_ipv6(lan: Lan) -> None:
    agent_ip, _ = lan.add_ipv6(1), lan.add_ipv6(3)
    watcher = Watcher(lan, 3)
    try:
        start_agent(lan, 1, listen=f"[{agent_ip}]:7340")
        event = watcher.wait_for(
            lambda hs: (by_address(hs, agent_ip) or {}).get("status") == "online"
        )
        host = by_address(event["hosts"], agent_ip)
        assert host is not None and host["addresses"] == [agent_ip]
        assert host["address"] == f"[{agent_ip}]:7340"
    finally:
        watcher.stop()
