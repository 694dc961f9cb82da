"""Memory used by Corral's worker vs by others, from NVML's per-process list (pure function;
the real NVML path is checked on a GPU host, see the GPU issue's note)."""

from __future__ import annotations

from types import SimpleNamespace

from corral.engine.agent.inventory import _used_by


def test_only_the_workers_processes_count_as_corral() -> None:
    procs = [
        SimpleNamespace(pid=10, usedGpuMemory=3 << 30),
        SimpleNamespace(pid=11, usedGpuMemory=1 << 30),
        SimpleNamespace(pid=12, usedGpuMemory=None),  # NVML cannot say (no permission)
    ]
    nvml = SimpleNamespace(nvmlDeviceGetComputeRunningProcesses=lambda h: procs)
    assert _used_by(nvml, object(), frozenset({10, 12})) == 3 << 30
    assert _used_by(nvml, object(), frozenset()) == 0
