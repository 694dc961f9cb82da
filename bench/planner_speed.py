"""Planning time for a big cluster: 64 hosts x 8 GPUs, a 128-layer model (target < 50 ms;
speed, a search over measured speeds, < 1 s).

.venv/bin/python bench/planner_speed.py [--rounds 21]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from corral.engine.model.spec import LayerSpec, ModelSpec
from corral.engine.planner.plan import Device, Settings, make_plan
from corral.engine.planner.speed import DeviceSpeed, LinkSpeed, Speeds, speed_plan

GiB = 1 << 30


def big_model(n_layer: int = 128) -> ModelSpec:
    """A 405B-class shape: 128 layers of ~1.6 GiB (q4), 128 heads, GQA 8, head dim 128.

    The GPUs have 8-16 GiB free, so `fewest` needs about half of the 64 hosts."""
    layers = tuple(LayerSpec(i, int(1.6 * GiB), 128, 8, 128, 128) for i in range(n_layer))
    return ModelSpec(
        path="synthetic",
        arch="llama",
        name="big",
        n_layer=n_layer,
        n_embd=16384,
        n_ff=53248,
        n_vocab=128256,
        n_ctx_train=131072,
        layers=layers,
        token_embd_bytes=2 * GiB,
        output_bytes=2 * GiB,
        output_norm_bytes=65536,
        tied_embeddings=False,
        other_bytes=0,
        swa=False,
        moe=False,
        n_expert=0,
        file_bytes=0,
    )


def cluster(hosts: int = 64, gpus: int = 8) -> list[Device]:
    return [
        Device(
            f"RPC{h * gpus + g}",
            f"host{h:02d}",
            f"10.0.{h}.1:7350",
            free=int((8 + (h % 5) * 2) * GiB),
            total=80 * GiB,
            speed=1.0 + (h % 3) / 2,
        )
        for h in range(hosts)
        for g in range(gpus)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    opts = parser.parse_args()
    spec, devices, settings = big_model(), cluster(), Settings(n_ctx=8192, flash_attn=True)
    print(
        f"{len(devices)} devices on 64 hosts, {spec.n_layer}-layer model, median of "
        f"{opts.rounds} (ms)"
    )
    print("| strategy | median ms | max ms | fits | hosts used |")
    print("|---|---|---|---|---|")
    # measured-looking speeds: per layer 1-2 ms by host, a step's hop 0.3-3 ms by host
    speeds = Speeds(
        base=0.001,
        devices={
            d.name: DeviceSpeed(hop=(0.3 + (i // 8 % 4) * 0.9) / 1000, layer=0.001 / d.speed)
            for i, d in enumerate(devices)
        },
        links={d.host: LinkSpeed(0.0002, 1.25e9) for d in devices},
    )
    for strategy in ("balanced", "fewest", "speed"):
        times = []
        for _ in range(opts.rounds):
            t0 = time.perf_counter()
            if strategy == "speed":
                plan = speed_plan(spec, devices, settings, speeds)
            else:
                plan = make_plan(spec, devices, settings, strategy)
            times.append((time.perf_counter() - t0) * 1000)
        used = {plan.devices[d].host for d in plan.layer_device if d >= 0}
        print(
            f"| {strategy} | {statistics.median(times):.1f} | {max(times):.1f} | "
            f"{plan.fits} | {len(used)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
