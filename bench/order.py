"""Does speed's agent order pay? Two real agents (worker threads 1 and 2 by default), each
with room for FRACTION of what the model needs on one device (the desktop's reserve), so
both must hold layers. Speed plans with the agents listed each way round; then each order
is loaded with speed's layer counts for it and timed side by side (rounds interleaved, so
the machine's drift falls on both), giving each order's measured and predicted tokens/s.

    .venv/bin/python bench/order.py [--model M] [--threads 1,2] [--fraction 0.8]
        [--rounds 5] [--tokens 48] [--json out.json]

Reports, per order: the hosts in order, the layer counts, predicted and measured tokens/s
(median of the rounds), and which order speed took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from corral.engine.model.catalog import default_model_path
from corral.engine.runtime.session import ChatSession, LoadSettings

sys.path.insert(0, str(Path(__file__).parent))
from placement import start_agents, timed

MIB = 1 << 20


async def _plan(addresses: list[str], settings: LoadSettings) -> dict:
    session = ChatSession(addresses)
    try:
        await session.connect(0)
        _, exact = await session.plan(settings)
        counts = tuple(len(exact.layers_of(i)) for i in range(len(exact.devices)))
        address = {c.name: c.address for c in session.clients}
        return {
            "hosts": [c.address for c in session.clients],
            "counts": counts,
            "predicted": session.prediction.tokens_per_s if session.prediction else 0.0,
            # every order speed tried: hosts → (predicted tok/s, its layer counts)
            "orders": {tuple(address[n] for n in k): (v, c) for k, v, c in session.orders},
            "note": session.order_note,
            "free": min(d.free for d in exact.devices),
            "need": sum(u.total for u in exact.usage),
        }
    finally:
        await session.close(stop_workers=True)


async def _time(order: dict, settings: LoadSettings, tokens: int) -> float:
    session = ChatSession(order["hosts"])
    try:
        await session.connect(0)
        fixed = dataclasses.replace(settings, strategy="balanced", layers=order["counts"])
        await session.open_after_connect(fixed)
        return await timed(session, tokens, 1)
    finally:
        await session.close(stop_workers=True)


async def run(opts: argparse.Namespace) -> dict:
    threads = [int(t) for t in opts.threads.split(",")]
    with contextlib.ExitStack() as stack:
        addresses = start_agents(stack, [(t, 0.0, 0.0, "CPU") for t in threads])
        base = LoadSettings(model=opts.model, n_ctx=512)
        whole = await _plan(addresses[:1], base)
        reserve = (whole["free"] - int(opts.fraction * whole["need"])) // MIB
        settings = dataclasses.replace(base, strategy="speed", reserve_mib=reserve)
        plans = [await _plan(addresses, settings), await _plan(addresses[::-1], settings)]
        # each order as llama.cpp will run it (the hosts speed ended with), deduplicated
        orders = {tuple(p["hosts"]): p for p in plans}
        # the order speed did not take, with the counts and prediction speed gave it
        for hosts, (rate, counts) in plans[0]["orders"].items():
            if hosts not in orders:
                orders[hosts] = {"hosts": list(hosts), "counts": counts, "predicted": rate}
        rates: dict[tuple[str, ...], list[float]] = {k: [] for k in orders}
        for _ in range(opts.rounds):
            for key, order in orders.items():
                rates[key].append(await _time(order, base, opts.tokens))
        chosen = tuple(plans[0]["hosts"])
        rows = []
        for key, order in orders.items():
            row = {
                "hosts": list(key),
                "threads": [threads[addresses.index(h)] for h in key],
                "counts": list(order["counts"]),
                "predicted": order["predicted"],
                "measured": statistics.median(rates[key]),
                "rounds": rates[key],
                "speed_took": key == chosen,
            }
            rows.append(row)
            print(
                f"threads {' > '.join(map(str, row['threads']))} (the last holds the output)"
                f" counts {row['counts']}: measured {row['measured']:.1f} tok/s, predicted "
                f"{row['predicted']:.1f}{'  <- speed' if row['speed_took'] else ''}",
                flush=True,
            )
        print(f"speed's note: {plans[0]['note'] or plans[1]['note'] or '(order kept)'}")
        return {"model": str(opts.model), "reserve_mib": reserve, "orders": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--fraction", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--json", type=Path, default=None)
    opts = p.parse_args()
    if opts.rounds < 1 or opts.tokens < 1 or not 0 < opts.fraction < 1:
        p.error("--rounds and --tokens must be 1 or more, --fraction between 0 and 1")
    opts.model = opts.model or default_model_path()
    os.environ.setdefault("CORRAL_SPEEDS_DIR", tempfile.mkdtemp(prefix="corral-order-"))
    out = asyncio.run(run(opts))
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
