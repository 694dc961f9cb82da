"""A real model split across two real agents' RPC workers equals the local run."""

from __future__ import annotations

import json
from pathlib import Path

from corral.engine.localagents import LocalAgents
from tests.conftest import corral


def _run(model: Path, agents: list[str], prompt: str, tokens: int = 32) -> tuple[list[int], dict]:
    args = [
        "chat",
        str(model),
        "--prompt",
        prompt,
        "--max-tokens",
        str(tokens),
        "--ignore-eos",
        "--json",
        "--ctx",
        "512",
    ]
    for a in agents:
        args += ["--agent", a]
    done = corral(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    ids = [e["id"] for e in events if e["type"] == "token"]
    kvs = [e for e in events if e["type"] == "kv"]
    assert kvs, "KV status is reported while streaming"
    assert 0 < kvs[-1]["fill"] <= 1 and kvs[-1]["type_k"] == "f16"
    if agents:  # the cache in use, per device that holds layers
        assert set(kvs[-1]["device_bytes"]) == {"RPC0", "RPC1"}
        assert all(v > 0 for v in kvs[-1]["device_bytes"].values())
    return ids, events[-1]


def test_smollm2_split_over_two_agents_equals_local(smollm2: Path, two_agents: LocalAgents) -> None:
    prompt = "Explain what a GPU does, in one paragraph."
    local, local_done = _run(smollm2, [], prompt)
    split, split_done = _run(smollm2, two_agents.addresses, prompt)
    assert len(local) == 32
    assert split == local, "greedy tokens over RPC differ from the local run"
    assert split_done["content"] == local_done["content"]
    # llama.cpp's own log ("layer N assigned to device X") put layers on both RPC devices
    by_device = {d["device"]: d for d in split_done["devices"]}
    assert by_device["RPC0"]["layers"] and by_device["RPC1"]["layers"]
    hosts = sorted(by_device[d]["host"] for d in ("RPC0", "RPC1"))
    assert [any(a in h for a in two_agents.addresses) for h in hosts] == [True, True]
    assert hosts[0] != hosts[1]
    assert len(by_device["RPC0"]["layers"]) + len(by_device["RPC1"]["layers"]) == 31  # + output
    assert split_done["kv"]["used"] == local_done["kv"]["used"] > 32


def test_random_model_split_equals_local(tiny_model: Path, two_agents: LocalAgents) -> None:
    local, _ = _run(tiny_model, [], "hello world", tokens=24)
    split, done = _run(tiny_model, two_agents.addresses, "hello world", tokens=24)
    assert split == local
    assert {d["device"] for d in done["devices"] if d["layers"]} == {"RPC0", "RPC1"}
