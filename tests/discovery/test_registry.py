"""The host registry and the TXT record: pure functions, no network."""

from __future__ import annotations

import pytest

from corral.discovery import (
    Advertised,
    AgentHints,
    BadTxt,
    ManualAdded,
    Offline,
    Online,
    Withdrawn,
    apply,
    decode_txt,
    encode_txt,
)
from corral.discovery.interfaces import choose_addresses

A = "a" * 32
B = "b" * 32


def _hints(agent_id: str = A, port: int = 7340) -> AgentHints:
    return AgentHints(agent_id, "0.1.0", "1.0", 2, 2 * 80 << 30, port)


def _adv(service: str, agent_id: str = A, addrs: tuple[str, ...] = ("10.0.0.1",)) -> Advertised:
    return Advertised(service, _hints(agent_id), addrs, 1.0)


def test_txt_round_trip() -> None:
    raw = {k.encode(): v.encode() for k, v in encode_txt(_hints()).items()}
    assert decode_txt(raw) == _hints()


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ({b"id": b"xyz", b"proto": b"1.0"}, "'id'"),
        ({b"id": A.encode(), b"proto": b"one"}, "'proto'"),
        (
            {b"id": A.encode(), b"proto": b"1.0", b"gpus": b"-1", b"vram": b"0", b"port": b"1"},
            "'gpus'",
        ),
        (
            {b"id": A.encode(), b"proto": b"1.0", b"gpus": b"1", b"vram": b"0", b"port": b"70000"},
            "'port'",
        ),
        ({b"id": b"\xff\xfe", b"proto": b"1.0"}, "not text"),
        ({f"k{i}".encode(): b"v" * 200 for i in range(6)}, "exceeds"),
    ],
)
def test_bad_txt_is_refused_with_the_reason(raw: dict[bytes, bytes | None], why: str) -> None:
    with pytest.raises(BadTxt, match=why):
        decode_txt(raw)


def test_discovered_then_online_then_offline_then_withdrawn() -> None:
    hosts = apply({}, _adv("w1._corral._tcp.local."))
    assert hosts[A].status == "discovered" and hosts[A].advertised
    hosts = apply(hosts, Online(A, A, "worker", 2.0))
    assert hosts[A].status == "online" and hosts[A].hostname == "worker"
    hosts = apply(hosts, Offline(A, "no answer", 3.0))
    assert (hosts[A].status, hosts[A].reason, hosts[A].since) == ("offline", "no answer", 3.0)
    assert apply(hosts, Withdrawn("w1._corral._tcp.local.", 4.0)) == {}


def test_same_hostname_different_agents_stay_two_hosts() -> None:
    hosts = apply(
        apply({}, _adv("worker-aaaa._corral._tcp.local.", A)),
        _adv("worker-bbbb._corral._tcp.local.", B, ("10.0.0.2",)),
    )
    assert set(hosts) == {A, B}


def test_one_agent_on_two_interfaces_is_one_host() -> None:
    hosts = apply({}, _adv("w._corral._tcp.local.", A, ("10.0.0.1",)))
    hosts = apply(hosts, _adv("w._corral._tcp.local.", A, ("192.168.5.1", "10.0.0.1")))
    assert list(hosts) == [A]
    assert set(hosts[A].addresses) == {"10.0.0.1", "192.168.5.1"}


def test_manual_entry_becomes_the_discovered_host_it_turns_out_to_be() -> None:
    hosts = apply({}, ManualAdded("10.0.0.9", 7340, 0.0))
    hosts = apply(hosts, _adv("w._corral._tcp.local.", A, ("10.0.0.1",)))
    hosts = apply(hosts, Online("manual:10.0.0.9:7340", A, "w", 1.0))
    assert list(hosts) == [A]
    assert hosts[A].manual and set(hosts[A].addresses) == {"10.0.0.1", "10.0.0.9"}
    # a manual host stays when its announcement goes away
    hosts = apply(hosts, Withdrawn("w._corral._tcp.local.", 2.0))
    assert hosts[A].manual and not hosts[A].advertised


def test_manual_entry_without_announcement_takes_its_agent_id() -> None:
    hosts = apply({}, ManualAdded("10.0.0.9", 7340, 0.0))
    hosts = apply(hosts, Online("manual:10.0.0.9:7340", B, "far", 1.0))
    assert list(hosts) == [B] and hosts[B].status == "online" and hosts[B].manual


def test_an_address_answering_as_another_agent_is_not_the_host() -> None:
    hosts = apply({}, _adv("w._corral._tcp.local.", A))
    hosts = apply(hosts, Online(A, B, "w", 1.0))
    assert hosts[A].status == "offline" and "another agent" in hosts[A].reason
    assert B not in hosts


def test_apply_never_mutates_its_input() -> None:
    before = apply({}, _adv("w._corral._tcp.local."))
    snapshot = dict(before)
    apply(before, Offline(A, "x", 1.0))
    assert before == snapshot


def test_address_choice() -> None:
    got = choose_addresses(["fe80::1%eth0", "169.254.3.4", "2001:db8::5", "10.1.2.3", "10.1.2.3"])
    assert got == ["10.1.2.3", "2001:db8::5"]
    assert "169.254.3.4" in choose_addresses(["169.254.3.4"], allow_link_local=True)


def test_inventory_updates_the_host_it_names() -> None:
    from corral.discovery import Inventoried
    from corral.engine.protocol import GpuInfo, Inventory

    hosts = apply({}, _adv("w._corral._tcp.local."))
    inv = Inventory(
        req=0,
        agent_id=A,
        hostname="w",
        gpus=(GpuInfo(index=0, name="H200", memory_total=10, memory_free=4),),
    )
    hosts = apply(hosts, Inventoried(A, inv, 1.0))
    assert hosts[A].inventory == inv
    assert apply(hosts, Inventoried("nobody", inv, 2.0)) == hosts
