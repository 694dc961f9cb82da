"""What this host has: NVIDIA GPUs through NVML, RAM, CPU, and the ggml devices."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.engine.aio import within
from corral.engine.protocol import DeviceInfo, GpuInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GgmlProbe:
    """Result of the one-shot device listing child: devices and build info, or why not."""

    devices: tuple[DeviceInfo, ...] = ()
    build: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def read_gpus(corral_pids: frozenset[int] = frozenset()) -> tuple[tuple[GpuInfo, ...], str]:
    """NVML's view of the GPUs, and "ok" or why there is none (no driver is not an error).
    `corral_pids` (the RPC worker) are counted apart: memory used by Corral vs by others."""
    try:
        import pynvml
    except ImportError:
        return (), "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return (), f"no NVIDIA driver ({exc})"
    try:
        gpus = []
        driver = _try(lambda: _text(pynvml.nvmlSystemGetDriverVersion()), "")
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(h)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
                    memory_total=int(mem.total),
                    memory_free=int(mem.free),
                    utilization_pct=_try(lambda h=h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                    temperature_c=_try(lambda h=h: pynvml.nvmlDeviceGetTemperature(h, 0)),
                    power_w=_try(lambda h=h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0, -1.0),
                    compute_capability=_try(
                        lambda h=h: ".".join(
                            map(str, pynvml.nvmlDeviceGetCudaComputeCapability(h))
                        ),
                        "",
                    ),
                    corral_used=_try(lambda h=h: _used_by(pynvml, h, corral_pids), 0)
                    if corral_pids
                    else 0,
                    driver=driver,
                )
            )
        return tuple(gpus), "ok"
    except pynvml.NVMLError as exc:
        return (), f"NVML failed: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _used_by(pynvml: Any, handle: Any, pids: frozenset[int]) -> int:
    """GPU memory that processes in `pids` hold on this device (0 where NVML cannot say)."""
    total = 0
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid in pids and proc.usedGpuMemory:
            total += int(proc.usedGpuMemory)
    return total


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _try(read: Any, default: Any = -1) -> Any:
    try:
        return type(default)(read())
    except Exception:  # NVML raises NotSupported per reading on some boards
        return default


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hostname() -> str:
    return socket.gethostname()


async def probe_ggml(timeout: float = 120.0) -> GgmlProbe:
    """List ggml devices and build info in a child process (driver init can abort or hang)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral.engine.agent.worker",
            "devices",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await within(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        return GgmlProbe(error=f"listing ggml devices took over {timeout:.0f} s")
    except OSError as exc:
        return GgmlProbe(error=f"could not run the device listing: {exc}")
    try:
        data = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return GgmlProbe(
            error=f"device listing failed (exit {proc.returncode}): {' | '.join(tail)}"
        )
    if "error" in data:
        return GgmlProbe(error=str(data["error"]))
    devices = tuple(
        DeviceInfo(
            name=d["name"],
            description=d["description"],
            backend=d["backend"],
            type=d["type"],
            memory_free=d["memory_free"],
            memory_total=d["memory_total"],
        )
        for d in data["devices"]
    )
    return GgmlProbe(devices=devices, build=data["build"])


async def ask_capabilities(
    device: str, questions: list[tuple[str, str, int, bool]], timeout: float = 45.0
) -> list[bool]:
    """Run the capability probe in a child (driver code can abort); raises RuntimeError.

    It takes under a second on a CPU and a few on a GPU (CUDA's first context); one that
    runs past `timeout` is killed and run once more before the request fails."""
    arg = ",".join(f"{k}:{v}:{hd}:{int(fa)}" for k, v, hd, fa in questions)
    for attempt in (1, 2):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral.engine.agent.worker",
            "capabilities",
            "--device",
            device,
            "--questions",
            arg,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await within(proc.communicate(), timeout)
            break
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning(
                "the capability probe on %s ran past %.0f s (attempt %d of 2), killed",
                device,
                timeout,
                attempt,
            )
    else:
        raise RuntimeError(
            f"the capability probe on {device} ran past {timeout:.0f} s twice: "
            "run `corral-agent doctor` on that host"
        )
    try:
        data = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(
            f"the capability probe on {device} failed (exit {proc.returncode}): {tail}"
        ) from None
    if "error" in data:
        raise RuntimeError(str(data["error"]))
    return [bool(a) for a in data["answers"]]


def cpu_count() -> int:
    return os.cpu_count() or 1
