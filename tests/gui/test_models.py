"""What the hosts table says about a host's memory (pure formatting)."""

from __future__ import annotations

from corral.discovery import Host
from corral.engine.protocol import GpuInfo, Inventory
from corral.gui.models import gpus_text, memory_text

GiB = 1 << 30


def test_gpu_host_shows_live_vram_load_and_temperature() -> None:
    inv = Inventory(
        req=0,
        agent_id="a" * 32,
        hostname="gpu-a",
        gpus=(
            GpuInfo(
                0,
                "NVIDIA H200",
                memory_total=140 * GiB,
                memory_free=100 * GiB,
                utilization_pct=35,
                temperature_c=48,
            ),
            GpuInfo(
                1,
                "NVIDIA H200",
                memory_total=140 * GiB,
                memory_free=140 * GiB,
                utilization_pct=0,
                temperature_c=31,
            ),
        ),
    )
    host = Host("k", "gpu-a", ("10.0.0.2",), 7340, inventory=inv)
    assert gpus_text(host) == "2 × NVIDIA H200"
    assert memory_text(host) == "VRAM 40.0/280.0 GiB used, 35% busy, 48 °C"


def test_before_the_first_inventory_the_announcement_is_shown() -> None:
    assert memory_text(Host("k", "x", (), 1)) == "?"


def test_a_cpu_only_host_announced_before_pairing_says_so() -> None:
    """Not "GPUs 0, 0.0 GiB VRAM": what the announcement says, in words."""
    from corral.discovery.txt import AgentHints

    hints = AgentHints("a" * 32, "0.1", "1.0", gpu_count=0, vram_total=0, port=7340)
    host = Host("k", "cpu-box", ("10.0.0.3",), 7340, status="unpaired", hints=hints)
    assert (gpus_text(host), memory_text(host)) == ("none", "CPU only")
    gpu = Host(
        "k",
        "gpu-b",
        ("10.0.0.4",),
        7340,
        hints=AgentHints("b" * 32, "0.1", "1.0", 2, 48 * GiB, 7340),
    )
    assert (gpus_text(gpu), memory_text(gpu)) == ("2", "48.0 GiB VRAM")
