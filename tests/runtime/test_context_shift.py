"""Generation past n_ctx over two agents: the cache shifts, the system prompt stays."""

from __future__ import annotations

import json
from pathlib import Path

from corral.engine.localagents import LocalAgents
from tests.conftest import corral

SYSTEM = "You are a terse assistant who only counts numbers."


def _chat(model: Path, agents: LocalAgents, tokens: int) -> list[dict]:
    args = [
        "chat",
        str(model),
        "--system",
        SYSTEM,
        "--prompt",
        "Count upwards from one.",
        "--max-tokens",
        str(tokens),
        "--ignore-eos",
        "--ctx",
        "256",
        "--json",
    ]
    for a in agents.addresses:
        args += ["--agent", a]
    done = corral(*args, timeout=300)
    assert done.returncode == 0, done.stdout[-800:] + done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_three_times_past_the_context_over_two_agents(
    smollm2: Path, two_agents: LocalAgents
) -> None:
    short = _chat(smollm2, two_agents, 4)[-1]
    assert short["shifts"] == 0 and short["n_keep"] > 10  # the system prompt's tokens
    events = _chat(smollm2, two_agents, 800)
    final = events[-1]
    shifts = [e for e in events if e["type"] == "shift"]
    assert final["type"] == "done" and final["stop"] == "length" and final["tokens"] == 800
    assert len(shifts) >= 3 and final["kv"]["shifts"] == len(shifts)
    assert all(e["n_keep"] == short["n_keep"] for e in shifts)
    # token for token, the system prompt is still what the cache starts with, at position 0
    assert final["kv_head"] == short["kv_head"] and final["kv_pos_min"] == 0
    assert max(e["used"] for e in events if e["type"] == "kv") <= 256
