"""Discovery on loopback (no root needed): an advertising agent shows up in `corral hosts`."""

from __future__ import annotations

import json

from corral.engine.localagents import LocalAgents
from tests.conftest import corral


def test_corral_hosts_lists_an_advertising_agent_and_a_manual_one() -> None:
    with LocalAgents(1, advertise=True) as agents, LocalAgents(1) as silent:
        done = corral(
            "hosts",
            "--interface",
            "lo",
            "--wait",
            "3",
            "--json",
            "--agent",
            silent.addresses[0],
            "--agent",
            "127.0.0.1:9",
        )
    assert done.returncode == 0, done.stderr
    hosts = json.loads(done.stdout)["hosts"]
    by_port = {h["port"]: h for h in hosts}
    seen = by_port[int(agents.addresses[0].rsplit(":", 1)[1])]
    assert seen["advertised"] and seen["status"] == "online" and seen["gpus"] == 0
    manual = by_port[int(silent.addresses[0].rsplit(":", 1)[1])]
    assert manual["manual"] and not manual["advertised"] and manual["status"] == "online"
    dead = by_port[9]
    assert dead["status"] == "offline" and "cannot reach agent 127.0.0.1:9" in dead["reason"]


def test_unknown_interface_is_a_clear_error() -> None:
    done = corral("hosts", "--interface", "nosuch0", "--wait", "0")
    assert done.returncode == 1 and "no network interface named nosuch0" in done.stderr
