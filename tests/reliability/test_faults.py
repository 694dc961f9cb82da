"""The reliability suite, one trial of each fault (bench/reliability.py runs 20+ of each and
the soak): real agents, real RPC workers, the real inference child, real namespaces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.localagents import LocalAgents
from tests.support import faults
from tests.support.netns import Lan, LanUnavailable
from tests.support.watch import start_agent


@pytest.fixture(scope="module")
def agents() -> Iterator[LocalAgents]:
    with LocalAgents(2) as started:
        yield started


def _ok(trial: faults.Trial) -> None:
    print(trial)
    assert trial.ok, trial.note


@pytest.mark.parametrize("during", ["generation", "load"])
def test_worker_killed(agents: LocalAgents, during: str) -> None:
    trial = asyncio.run(faults.worker_kill(agents, during))
    _ok(trial)


@pytest.mark.parametrize("during", ["generation", "load"])
def test_agent_killed(agents: LocalAgents, during: str) -> None:
    trial = asyncio.run(faults.agent_kill(agents, during))
    _ok(trial)


def test_inference_child_killed(agents: LocalAgents) -> None:
    _ok(asyncio.run(faults.child_kill(agents)))


def test_agent_restart_needs_no_pairing(agents: LocalAgents) -> None:
    _ok(asyncio.run(faults.agent_restart(agents)))


def test_disk_full_loses_nothing(tmp_path: Path) -> None:
    try:
        _ok(faults.disk_full(tmp_path))
    except PermissionError as exc:  # pragma: no cover - needs root for mount
        pytest.skip(f"cannot mount a small filesystem here: {exc}")


def test_disk_full_on_an_agent_loses_nothing(tmp_path: Path) -> None:
    try:
        _ok(faults.agent_disk_full(tmp_path))
    except PermissionError as exc:  # pragma: no cover - needs root for mount
        pytest.skip(f"cannot mount a small filesystem here: {exc}")


def test_hundred_control_clients(agents: LocalAgents) -> None:
    got = asyncio.run(faults.many_clients(agents.addresses[0], 100, rounds=1))
    print(got)
    assert got["connected"] == 100 and got["n_errors"] == 0, got


def test_connection_flood_leaves_the_paired_session_alone(agents: LocalAgents) -> None:
    got = faults.flood(agents.addresses[0], agents.procs[0].pid, seconds=8)
    print(got)
    assert got["served"] == 0 and not got["session_errors"], got
    assert got["session_tokens_s"]["flood"] > 0, got
    assert got["agent_rss_mib"]["peak"] < got["agent_rss_mib"]["before"] + 64, got  # bounded


def test_soak_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.RUN_MARK, f"soak-{time.time_ns()}")
    with LocalAgents(2) as fresh:
        got = asyncio.run(faults.soak(fresh, counts=(4, 2)))  # events, not events a minute
        assert got["agents_alive"] == 2, got
    print(got)
    assert got["restarts"] == 2 and got["replies"] >= 4 and not got["errors"], got
    assert faults.left_behind() == []  # agents, workers and inference children all ended


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    try:
        with Lan(3) as built:
            for i in (1, 2):
                start_agent(lan=built, i=i, desktop=3)
            time.sleep(1)
            yield built
    except LanUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("mode", ["link down", "silent drop"])
def test_partition_is_detected(lan: Lan, mode: str, smollm2: Path) -> None:
    trial = faults.partition(lan, mode, smollm2)
    _ok(trial)
