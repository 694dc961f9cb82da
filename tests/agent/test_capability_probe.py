"""The agent's capability probe: a child process that asks this host's ggml backend which
K/V cache types and flash-attention kernels it has (engine/agent/inventory.py)."""

from __future__ import annotations

import asyncio

import pytest

from corral.engine.agent.inventory import ask_capabilities


def test_the_probe_answers_each_question_from_the_cpu_backend() -> None:
    answers = asyncio.run(
        ask_capabilities("CPU", [("f16", "f16", 128, True), ("q8_0", "q8_0", 64, False)])
    )
    assert answers == [True, True]


def test_a_probe_past_its_deadline_is_killed_run_again_then_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(RuntimeError, match="ran past 0 s twice: run `corral-agent doctor`"):
        asyncio.run(ask_capabilities("CPU", [("f16", "f16", 128, True)], timeout=0.01))
    assert [r.message.split(" (")[1][:12] for r in caplog.records] == [
        "attempt 1 of",
        "attempt 2 of",
    ]


def test_an_unknown_device_is_an_error_not_a_crash() -> None:
    with pytest.raises(RuntimeError):
        asyncio.run(ask_capabilities("CUDA9", [("f16", "f16", 128, True)]))
