"""Does the window keep up? 16 simulated hosts x 4 GPUs report status at 1 Hz each while a
real chat streams (two local agents, SmolLM2).

Measured on the GUI thread: the longest stall (a 5 ms QTimer's worst lateness) and the
latency from a token reaching the engine thread to its text being in the transcript
(p50/p99/max). Targets: stall < 50 ms, token p99 < 20 ms.

    xvfb-run -a -s "-screen 0 1440x900x24" .venv/bin/python bench/gui_stall.py [--seconds 20]
    (bench/gui_stall.py runs this module, corral.gui.stall: Qt stays under gui/)

The simulated hosts go through the same path as real ones (HostDirectory's change callback
→ bridge → hosts table, events log, memory plot), with inventories built in the engine
thread; only their sockets are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen" if not os.environ.get("DISPLAY") else "xcb")

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from corral.discovery import Host, Inventoried
from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.protocol import GpuInfo, Inventory

from .app import MainWindow

GiB = 1 << 30


def fake_host(i: int) -> Host:
    return Host(
        key=f"sim{i}",
        name=f"gpu-box-{i:02d}",
        addresses=(f"10.99.0.{i + 1}",),
        port=7340,
        agent_id=f"{i:032x}",
        hostname=f"gpu-box-{i:02d}",
        status="online",
    )


def fake_inventory(i: int, tick: int) -> Inventory:
    gpus = tuple(
        GpuInfo(
            index=g,
            name="NVIDIA H100 80GB HBM3",
            memory_total=80 * GiB,
            memory_free=int((40 + 20 * ((tick + g + i) % 7) / 7) * GiB),
            utilization_pct=(tick * 7 + g) % 100,
            temperature_c=40 + (tick + g) % 30,
            power_w=300.0,
            compute_capability="9.0",
        )
        for g in range(4)
    )
    return Inventory(req=0, agent_id=f"{i:032x}", hostname=f"gpu-box-{i:02d}", gpus=gpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--hosts", type=int, default=16)
    opts = parser.parse_args()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    with LocalAgents(2) as agents:
        win = MainWindow(browse=False, agents=tuple(agents.addresses))
        win.resize(1440, 880)
        win.show()
        deadline = time.monotonic() + 60
        while len(win.hosts_model.online_addresses()) < 2:
            app.processEvents()
            time.sleep(0.01)
            assert time.monotonic() < deadline, "the agents did not come online"
        win.model_edit.setText(str(default_model_path()))
        win.load_button.click()
        while not win.send_button.isEnabled():
            app.processEvents()
            time.sleep(0.01)
            assert time.monotonic() < deadline + 120, "the model did not load"

        # token latency: stamped when the engine thread posts, measured when the GUI runs it
        latencies: list[float] = []
        posted: list[tuple[float, bool]] = []  # (when, during the measured window)
        measuring = [True]
        real_post, real_on_update = win.bridge.post, win._on_update

        def post(fn: Any, *args: Any) -> None:
            if fn is on_update:
                posted.append((time.perf_counter(), measuring[0]))
            real_post(fn, *args)

        def on_update(update: Any) -> None:
            real_on_update(update)
            at, counted = posted.pop(0)
            if counted and update.text:
                latencies.append(time.perf_counter() - at)

        win.bridge.post = post  # type: ignore[method-assign]
        win._on_update = on_update  # type: ignore[method-assign]

        # the GUI thread's stalls: a 5 ms timer's lateness
        gaps: list[float] = []
        last = [time.perf_counter()]

        def tick() -> None:
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

        timer = QTimer()
        timer.setInterval(5)
        timer.timeout.connect(tick)

        # 16 hosts x 4 GPUs at 1 Hz each, spread over the second, from the engine thread
        stop = asyncio.Event()

        async def simulate() -> int:
            sent = 0
            hosts = {f"sim{i}": fake_host(i) for i in range(opts.hosts)}
            tick_n = 0
            while not stop.is_set():
                for i in range(opts.hosts):
                    key = f"sim{i}"
                    inv = fake_inventory(i, tick_n)
                    hosts[key] = dataclasses.replace(hosts[key], inventory=inv)
                    real_hosts = {h.key: h for h in win.directory.hosts.values()}
                    event = Inventoried(key, inv, time.monotonic())
                    real_post(win._hosts_changed, {**real_hosts, **hosts}, event)
                    sent += 1
                    await asyncio.sleep(1.0 / opts.hosts)
                tick_n += 1
            return sent

        sim = win.engine.submit(simulate())
        timer.start()
        last[0] = time.perf_counter()
        end = time.monotonic() + opts.seconds
        replies = 0
        win.max_tokens = 200
        while time.monotonic() < end:
            if win.send_button.isEnabled():
                win._new_chat()
                win.input.setText(f"Tell me a long story, part {replies + 1}.")
                win.send_button.click()
                replies += 1
            app.processEvents()
            time.sleep(0.001)
        timer.stop()
        measuring[0] = False
        win.engine.loop.call_soon_threadsafe(stop.set)
        while not sim.done():  # keep the window running while the simulation ends
            app.processEvents()
            time.sleep(0.001)
        updates = sim.result()
        win._stop()  # once: a second press would kill the inference process
        while win.stop_button.isEnabled():
            app.processEvents()
            time.sleep(0.01)
        win.close()
    if os.environ.get("CORRAL_STALL_DEBUG"):
        slow = [(i, round(x * 1000)) for i, x in enumerate(latencies) if x > 0.05]
        print("slow tokens (index, ms):", slow[:40], file=sys.stderr)
    stall = max(gaps) - 0.005 if gaps else 0.0
    lat = sorted(latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    print(
        f"{opts.hosts} simulated hosts x 4 GPUs at 1 Hz ({updates} status updates) while "
        f"{len(lat)} tokens streamed in {replies} replies, {opts.seconds:.0f} s, "
        f"platform {app.platformName()}"
    )
    late99 = (sorted(gaps)[int(0.99 * len(gaps))] - 0.005) * 1000
    rows = [
        ("GUI thread's longest stall", f"{stall * 1000:.1f} ms", "< 50 ms"),
        ("GUI timer lateness p99", f"{late99:.1f} ms", ""),
        (
            "token to screen p50 / p99 / max",
            f"{p(0.5):.2f} / {p(0.99):.2f} / {lat[-1] * 1000:.2f} ms",
            "p99 < 20 ms",
        ),
    ]
    print("| figure | value | target |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
