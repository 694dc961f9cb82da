"""The planner against real loads: real agents, real RPC workers, llama.cpp's own log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from corral.engine.planner.plan import MiB
from corral.engine.runtime.localagents import LocalAgents
from corral.engine.runtime.session import ChatSession, LoadSettings
from tests.conftest import corral


def _agents(agents: LocalAgents) -> list[str]:
    return [x for a in agents.addresses for x in ("--agent", a)]


def test_plan_then_chat_puts_every_layer_where_the_plan_said(
    smollm2: Path, two_agents: LocalAgents
) -> None:
    plan = corral("plan", str(smollm2), *_agents(two_agents), "--layers", "7,24", "--json")
    assert plan.returncode == 0, plan.stderr
    exact = json.loads(plan.stdout)["exact"]
    planned = {d["device"]: d["layers"] for d in exact["devices"]}
    assert planned == {"RPC0": list(range(7)), "RPC1": list(range(7, 31))}
    chat = corral(
        "chat",
        str(smollm2),
        *_agents(two_agents),
        "--layers",
        "7,24",
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
        "--json",
    )
    assert chat.returncode == 0, chat.stderr
    done = json.loads(chat.stdout.splitlines()[-1])
    # "devices" comes from llama.cpp's "layer N assigned to device X" lines
    assert {d["device"]: d["layers"] for d in done["devices"] if d["layers"]} == planned


def test_exact_plan_is_within_tolerance_of_what_llama_cpp_reports(
    tiny_model: Path, two_agents: LocalAgents
) -> None:
    async def run(fa: bool) -> None:
        session = ChatSession(two_agents.addresses)
        try:
            result = await session.open(LoadSettings(model=tiny_model, n_ctx=1024, flash_attn=fa))
        finally:
            await session.close()
        assert result.comparison is not None
        for name, planned, actual, _ in result.comparison.rows():
            assert abs(planned - actual) <= max(0.01 * actual, 2 * MiB), name
            assert actual - planned <= MiB, f"{name}: planned under what llama.cpp used"

    asyncio.run(run(False))
    asyncio.run(run(True))


def test_a_model_that_cannot_fit_is_refused_before_any_load(
    smollm2: Path, two_agents: LocalAgents
) -> None:
    plan = corral("plan", str(smollm2), *_agents(two_agents), "--reserve", "100000000")
    assert plan.returncode == 2
    assert "does not fit: RPC0" in plan.stderr and "short by" in plan.stderr
    chat = corral(
        "chat", str(smollm2), *_agents(two_agents), "--reserve", "100000000", "--prompt", "Hi"
    )
    assert chat.returncode == 2
    assert "does not fit" in chat.stderr and "loaded" not in chat.stderr


def test_bad_layer_counts_are_a_clear_error(smollm2: Path, two_agents: LocalAgents) -> None:
    done = corral("plan", str(smollm2), *_agents(two_agents), "--layers", "10,10")
    assert done.returncode == 2 and "must add up to 31" in done.stderr
    done = corral("plan", str(smollm2), "--layers", "ten")
    assert done.returncode == 2 and "is not a list of layer counts" in done.stderr
